"""Llama in Flax NNX: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU.

No biases anywhere and an untied output head. The projections are ``nnx.Einsum`` layers with
head axes spelled out (``"BTD,DNH->BTNH"``); keys and values have ``num_kv_heads`` heads and are
repeated to ``num_heads`` before the plain einsum-softmax-einsum attention.

FLOPs per example (MaxText's convention: 6 per matmul weight per token, embedding lookup
excluded, LM head included; causal attention halved)::

    attn_weights = d * (num_heads + 2 * num_kv_heads) * head_dim + num_heads * head_dim * d
    matmul_weights = num_layers * (attn_weights + 3 * d * d_ff) + d * vocab_size
    flops_per_example = seq_len * (6 * matmul_weights
                                   + 6 * num_layers * seq_len * num_heads * head_dim)

where the last term is ``2 * 2 * seq_len * num_heads * head_dim`` forward FLOPs per token per
layer for scores and weighted sum, times 3 for the backward pass, halved for causality.
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
class LlamaConfig:
    """Llama hyperparameters; the defaults are TinyLlama-1.1B's (Llama 2 architecture)."""

    vocab_size: int = 32000
    seq_len: int = 2048
    num_layers: int = 22
    num_heads: int = 32
    num_kv_heads: int = 4
    head_dim: int = 64
    d_model: int = 2048
    d_ff: int = 5632
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self):
        config_lib.check_positive(self, "vocab_size", "seq_len", "num_layers", "num_heads",
                                  "num_kv_heads", "head_dim", "d_model", "d_ff", "rope_theta",
                                  "norm_eps")
        config_lib.check_divisible(self, "num_heads", "num_kv_heads")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for rotary embeddings, "
                             f"got {self.head_dim}")
        config_lib.check_dtype(self.dtype)


PRESETS = {
    "llama-tiny": LlamaConfig(vocab_size=512, seq_len=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=32, d_model=128, d_ff=256),
    "llama-1b": LlamaConfig(),
}


def flops_per_example(c: LlamaConfig) -> float:
    d, attn_dim = c.d_model, c.num_heads * c.head_dim
    attn_weights = d * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + attn_dim * d
    matmul_weights = c.num_layers * (attn_weights + 3 * d * c.d_ff) + d * c.vocab_size
    return c.seq_len * (6 * matmul_weights + 6 * c.num_layers * c.seq_len * attn_dim)


def idioms(c: LlamaConfig) -> dict[str, int]:
    return {"attention": c.num_layers, "rms_norm": 2 * c.num_layers + 1,
            "dense_act": c.num_layers, "softmax_cross_entropy": 1}


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of (batch, seq, heads, head_dim) by rotating the two halves, in float32."""
    head_dim = x.shape[-1]
    inv_freq = theta ** -(jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq
    sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        einsum = functools.partial(nnx.Einsum, dtype=config_lib.compute_dtype(c.dtype),
                                   kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        d, heads, kv_heads, head_dim = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
        self.rope_theta = c.rope_theta
        self.q_proj = einsum("BTD,DNH->BTNH", (d, heads, head_dim))
        self.k_proj = einsum("BTD,DKH->BTKH", (d, kv_heads, head_dim))
        self.v_proj = einsum("BTD,DKH->BTKH", (d, kv_heads, head_dim))
        self.o_proj = einsum("BTNH,NHD->BTD", (heads, head_dim, d))

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        q = apply_rope(self.q_proj(x), positions, self.rope_theta)
        k = apply_rope(self.k_proj(x), positions, self.rope_theta)
        v = self.v_proj(x)
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) * q.shape[-1] ** -0.5
        causal = positions[:, None] >= positions[None, :]
        scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return self.o_proj(jnp.einsum("BNTS,BSNH->BTNH", probs, v))


class SwiGLU(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        linear = functools.partial(nnx.Linear, use_bias=False,
                                   dtype=config_lib.compute_dtype(c.dtype),
                                   kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.gate_proj = linear(c.d_model, c.d_ff)
        self.up_proj = linear(c.d_model, c.d_ff)
        self.down_proj = linear(c.d_ff, c.d_model)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        norm = functools.partial(nnx.RMSNorm, c.d_model, epsilon=c.norm_eps,
                                 dtype=config_lib.compute_dtype(c.dtype), rngs=rngs)
        self.input_norm = norm()
        self.attn = Attention(c, rngs=rngs)
        self.post_attn_norm = norm()
        self.mlp = SwiGLU(c, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        x = x + self.attn(self.input_norm(x), positions)
        return x + self.mlp(self.post_attn_norm(x))


class Llama(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        dtype = config_lib.compute_dtype(c.dtype)
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(c.vocab_size, c.d_model, dtype=dtype, embedding_init=init,
                               rngs=rngs)
        self.layers = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
        self.norm = nnx.RMSNorm(c.d_model, epsilon=c.norm_eps, dtype=dtype, rngs=rngs)
        self.lm_head = nnx.Linear(c.d_model, c.vocab_size, use_bias=False, dtype=dtype,
                                  kernel_init=init, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits (batch, seq, vocab) for int tokens (batch, seq)."""
        positions = jnp.arange(tokens.shape[1])
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, positions)
        return self.lm_head(self.norm(x))


def build(name: str, c: LlamaConfig) -> ModelSpec:
    return nnx_language_model(name, c, lambda rngs: Llama(c, rngs=rngs), flops_per_example(c),
                              idioms(c))
