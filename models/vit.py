"""Vision Transformer in Flax NNX: convolutional patch embedding, class token, pre-norm blocks.

Attention is Flax's own ``nnx.MultiHeadAttention`` (Flax's spelling of attention, beside the
hand-written einsums of GPT-2 and Llama); the MLP uses the exact (erf) GELU. The class token's
final state feeds a linear classifier.

FLOPs per example (MaxText's convention, 6 per matmul weight per use, bidirectional attention
counted in full). With ``patches = (image_size / patch_size)^2`` and ``tokens = patches + 1``::

    block_weights = 4 * d^2 + 2 * d * d_ff          # q, k, v, out; MLP in and out
    flops_per_example = 6 * (tokens * num_layers * block_weights
                             + patches * patch_size^2 * channels * d    # patch embedding
                             + d * num_classes)                         # head, class token only
                        + 12 * num_layers * tokens^2 * d                # scores and weighted sum
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models import config as config_lib
from models import data
from models.spec import ModelSpec, NNXFunctions, mean_cross_entropy

XAVIER = nnx.initializers.xavier_uniform()  # the original ViT's init for its dense layers


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """ViT hyperparameters; the defaults are ViT-B/16 at 224 x 224 with 1000 classes."""

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    num_classes: int = 1000
    num_layers: int = 12
    num_heads: int = 12
    d_model: int = 768
    d_ff: int = 3072
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"

    def __post_init__(self):
        config_lib.check_positive(self, "image_size", "patch_size", "channels", "num_classes",
                                  "num_layers", "num_heads", "d_model", "d_ff", "layer_norm_eps")
        config_lib.check_divisible(self, "image_size", "patch_size")
        config_lib.check_divisible(self, "d_model", "num_heads")
        config_lib.check_dtype(self.dtype)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PRESETS = {
    "vit-tiny": ViTConfig(image_size=32, patch_size=8, num_classes=10, num_layers=2,
                          num_heads=4, d_model=128, d_ff=256),
    "vit-base": ViTConfig(),
}


def flops_per_example(c: ViTConfig) -> float:
    d, patches = c.d_model, c.num_patches
    tokens = patches + 1
    block_weights = 4 * d * d + 2 * d * c.d_ff
    matmul_flops = (tokens * c.num_layers * block_weights
                    + patches * c.patch_size ** 2 * c.channels * d + d * c.num_classes)
    return 6 * matmul_flops + 12 * c.num_layers * tokens ** 2 * d


def idioms(c: ViTConfig) -> dict[str, int]:
    return {"attention": c.num_layers, "layer_norm": 2 * c.num_layers + 1,
            "dense_act": c.num_layers, "softmax_cross_entropy": 1}


class EncoderBlock(nnx.Module):
    def __init__(self, c: ViTConfig, *, rngs: nnx.Rngs):
        dtype = config_lib.compute_dtype(c.dtype)
        norm = functools.partial(nnx.LayerNorm, c.d_model, epsilon=c.layer_norm_eps, dtype=dtype,
                                 rngs=rngs)
        self.norm1 = norm()
        self.attn = nnx.MultiHeadAttention(num_heads=c.num_heads, in_features=c.d_model,
                                           decode=False, dtype=dtype, kernel_init=XAVIER,
                                           keep_rngs=False, rngs=rngs)
        self.norm2 = norm()
        self.mlp_in = nnx.Linear(c.d_model, c.d_ff, dtype=dtype, kernel_init=XAVIER, rngs=rngs)
        self.mlp_out = nnx.Linear(c.d_ff, c.d_model, dtype=dtype, kernel_init=XAVIER, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x)), approximate=False))


class ViT(nnx.Module):
    def __init__(self, c: ViTConfig, *, rngs: nnx.Rngs):
        dtype = config_lib.compute_dtype(c.dtype)
        p, d = c.patch_size, c.d_model
        self.patch_embed = nnx.Conv(c.channels, d, (p, p), strides=(p, p), padding="VALID",
                                    dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, d), jnp.float32))
        self.pos_embed = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, c.num_patches + 1, d), jnp.float32))
        self.blocks = nnx.List([EncoderBlock(c, rngs=rngs) for _ in range(c.num_layers)])
        self.norm = nnx.LayerNorm(d, epsilon=c.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(d, c.num_classes, dtype=dtype, kernel_init=XAVIER, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Logits (batch, num_classes) for NHWC images."""
        x = self.patch_embed(images)
        batch, d = x.shape[0], x.shape[-1]
        x = x.reshape(batch, -1, d)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (batch, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def build(name: str, c: ViTConfig) -> ModelSpec:
    fns = NNXFunctions(lambda rngs: ViT(c, rngs=rngs))

    def apply(params, batch):
        data.check_images(batch["images"], c.image_size, c.channels)
        return fns.merge(params)(batch["images"])

    def loss(params, batch):
        return mean_cross_entropy(apply(params, batch), batch["labels"])

    return ModelSpec(
        name=name, config=c, init=fns.init, apply=apply, loss=loss,
        batch=functools.partial(data.image_batch, image_size=c.image_size, channels=c.channels,
                                num_classes=c.num_classes),
        flops_per_example=flops_per_example(c), idioms=idioms(c))
