"""The "xla" implementation of `layer_norm`: jnp with float32 statistics, differentiated by JAX;
XLA fuses it."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def layer_norm_xla(x, scale=None, bias=None, *, eps: float):
    """LayerNorm in jnp (statistics in float32), differentiated by JAX; XLA fuses it."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    y = centered * lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
