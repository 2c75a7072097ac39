"""GPT-2 in Flax NNX: learned positions, pre-LayerNorm blocks, causal self-attention, GELU MLP.

The attention is written the plain way (einsum, scale, causal mask, softmax, einsum) and the
output head is tied to the token embedding (``logits = x @ wte.T`` via ``Embed.attend``).

FLOPs per example (MaxText's convention): for one training step, 6 FLOPs per matmul weight per
token (2 forward, 4 backward), counting every weight used in a matmul, the tied LM head
included, embedding lookups excluded; plus attention scores and the attention-weighted sum,
``2 * 2 * seq_len * d_model`` FLOPs per token per layer forward, times 3 for forward and
backward, halved because causal attention needs only the lower triangle::

    matmul_weights = num_layers * (3 d^2 + d^2 + 2 * mlp_ratio * d^2) + d * vocab_size
    flops_per_example = seq_len * (6 * matmul_weights + 6 * num_layers * seq_len * d)

Biases, norms, GELU, softmax and the loss are not counted.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models import config as config_lib
from models.spec import ModelSpec, nnx_language_model


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyperparameters; the defaults are GPT-2 small (124M).

    ``vocab_size`` defaults to 50304, GPT-2's 50257 tokens padded to a multiple of 64 as
    nanoGPT does; ``seq_len`` is also the number of learned positions.
    """

    vocab_size: int = 50304
    seq_len: int = 1024
    num_layers: int = 12
    num_heads: int = 12
    d_model: int = 768
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self):
        config_lib.check_positive(self, "vocab_size", "seq_len", "num_layers", "num_heads",
                                  "d_model", "mlp_ratio", "layer_norm_eps")
        config_lib.check_divisible(self, "d_model", "num_heads")
        config_lib.check_dtype(self.dtype)


PRESETS = {
    "gpt2-tiny": GPT2Config(vocab_size=512, seq_len=64, num_layers=2, num_heads=4, d_model=128),
    "gpt2-small": GPT2Config(),
    "gpt2-medium": GPT2Config(num_layers=24, num_heads=16, d_model=1024),
}


def flops_per_example(c: GPT2Config) -> float:
    d, layers = c.d_model, c.num_layers
    matmul_weights = layers * (4 + 2 * c.mlp_ratio) * d * d + d * c.vocab_size
    return c.seq_len * (6 * matmul_weights + 6 * layers * c.seq_len * d)


def idioms(c: GPT2Config) -> dict[str, int]:
    return {"attention": c.num_layers, "layer_norm": 2 * c.num_layers + 1,
            "dense_act": c.num_layers, "softmax_cross_entropy": 1}


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax attention on (batch, seq, heads, head_dim); softmax in float32."""
    seq, head_dim = q.shape[1], q.shape[-1]
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) * head_dim ** -0.5
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("BNTS,BSNH->BTNH", weights, v)


def _initializers(c: GPT2Config):
    """GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * num_layers)."""
    return (nnx.initializers.normal(0.02),
            nnx.initializers.normal(0.02 / (2 * c.num_layers) ** 0.5))


class CausalSelfAttention(nnx.Module):
    def __init__(self, c: GPT2Config, *, rngs: nnx.Rngs):
        init, residual_init = _initializers(c)
        linear = functools.partial(nnx.Linear, dtype=config_lib.compute_dtype(c.dtype), rngs=rngs)
        self.num_heads = c.num_heads
        self.c_attn = linear(c.d_model, 3 * c.d_model, kernel_init=init)
        self.c_proj = linear(c.d_model, c.d_model, kernel_init=residual_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, seq, d_model = x.shape
        heads = lambda t: t.reshape(batch, seq, self.num_heads, d_model // self.num_heads)
        q, k, v = map(heads, jnp.split(self.c_attn(x), 3, axis=-1))
        return self.c_proj(causal_attention(q, k, v).reshape(batch, seq, d_model))


class MLP(nnx.Module):
    def __init__(self, c: GPT2Config, *, rngs: nnx.Rngs):
        init, residual_init = _initializers(c)
        linear = functools.partial(nnx.Linear, dtype=config_lib.compute_dtype(c.dtype), rngs=rngs)
        self.c_fc = linear(c.d_model, c.mlp_ratio * c.d_model, kernel_init=init)
        self.c_proj = linear(c.mlp_ratio * c.d_model, c.d_model, kernel_init=residual_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):
    def __init__(self, c: GPT2Config, *, rngs: nnx.Rngs):
        norm = functools.partial(nnx.LayerNorm, c.d_model, epsilon=c.layer_norm_eps,
                                 dtype=config_lib.compute_dtype(c.dtype), rngs=rngs)
        self.ln_1 = norm()
        self.attn = CausalSelfAttention(c, rngs=rngs)
        self.ln_2 = norm()
        self.mlp = MLP(c, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nnx.Module):
    def __init__(self, c: GPT2Config, *, rngs: nnx.Rngs):
        dtype = config_lib.compute_dtype(c.dtype)
        init, _ = _initializers(c)
        self.wte = nnx.Embed(c.vocab_size, c.d_model, dtype=dtype, embedding_init=init, rngs=rngs)
        self.wpe = nnx.Embed(c.seq_len, c.d_model, dtype=dtype, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
        self.ln_f = nnx.LayerNorm(c.d_model, epsilon=c.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits (batch, seq, vocab) for int tokens (batch, seq)."""
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.wte.attend(self.ln_f(x))


def build(name: str, c: GPT2Config) -> ModelSpec:
    return nnx_language_model(name, c, lambda rngs: GPT2(c, rngs=rngs), flops_per_example(c),
                              idioms(c))
