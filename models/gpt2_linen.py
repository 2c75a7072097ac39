"""GPT-2 in Flax Linen, the same math as ``models.gpt2`` (same config, FLOPs and attention).

Linen names its submodules as the NNX model names its attributes, except that the blocks are
``h_0, h_1, ...`` (GPT-2's checkpoint names) rather than a list; ``params_from_nnx`` converts NNX
parameters so both models give the same outputs for the same weights.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import config as config_lib
from models import data
from models.gpt2 import GPT2Config, causal_attention, flops_per_example, idioms
from models.spec import ModelSpec, mean_cross_entropy

PRESETS = {
    "gpt2-tiny-linen": GPT2Config(vocab_size=512, seq_len=64, num_layers=2, num_heads=4,
                                  d_model=128),
    "gpt2-small-linen": GPT2Config(),
}


def _dense(c: GPT2Config, features: int, name: str, residual: bool = False) -> nn.Dense:
    std = 0.02 / (2 * c.num_layers) ** 0.5 if residual else 0.02
    return nn.Dense(features, dtype=config_lib.compute_dtype(c.dtype),
                    kernel_init=nn.initializers.normal(std), name=name)


class CausalSelfAttention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        batch, seq, d_model = x.shape
        heads = lambda t: t.reshape(batch, seq, c.num_heads, d_model // c.num_heads)
        q, k, v = map(heads, jnp.split(_dense(c, 3 * d_model, "c_attn")(x), 3, axis=-1))
        out = causal_attention(q, k, v).reshape(batch, seq, d_model)
        return _dense(c, d_model, "c_proj", residual=True)(out)


class MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = jax.nn.gelu(_dense(c, c.mlp_ratio * c.d_model, "c_fc")(x), approximate=True)
        return _dense(c, c.d_model, "c_proj", residual=True)(h)


class Block(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps,
                                 dtype=config_lib.compute_dtype(c.dtype))
        x = x + CausalSelfAttention(c, name="attn")(norm(name="ln_1")(x))
        return x + MLP(c, name="mlp")(norm(name="ln_2")(x))


class GPT2(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits (batch, seq, vocab) for int tokens (batch, seq)."""
        c = self.config
        dtype = config_lib.compute_dtype(c.dtype)
        embed = functools.partial(nn.Embed, features=c.d_model, dtype=dtype,
                                  embedding_init=nn.initializers.normal(0.02))
        wte = embed(c.vocab_size, name="wte")
        x = wte(tokens) + embed(c.seq_len, name="wpe")(jnp.arange(tokens.shape[1]))
        for i in range(c.num_layers):
            x = Block(c, name=f"h_{i}")(x)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=dtype, name="ln_f")(x)
        return wte.attend(x)


def params_from_nnx(nnx_params: dict) -> dict:
    """Parameters of ``models.gpt2`` (``{"params": {...}}``) laid out for this Linen model."""
    weights = dict(nnx_params["params"])
    blocks = weights.pop("blocks")
    return {"params": {**weights, **{f"h_{i}": block for i, block in blocks.items()}}}


def build(name: str, c: GPT2Config) -> ModelSpec:
    model = GPT2(c)

    def init(rng):
        return {"params": model.init(rng, jnp.zeros((1, c.seq_len), jnp.int32))["params"]}

    def apply(params, batch):
        data.check_tokens(batch["inputs"], c.seq_len)
        return model.apply(params, batch["inputs"])

    def loss(params, batch):
        return mean_cross_entropy(apply(params, batch), batch["targets"])

    return ModelSpec(
        name=name, config=c, init=init, apply=apply, loss=loss,
        batch=functools.partial(data.token_batch, seq_len=c.seq_len, vocab_size=c.vocab_size),
        flops_per_example=flops_per_example(c), idioms=idioms(c))
