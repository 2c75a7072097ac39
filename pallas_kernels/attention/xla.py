"""The "xla" implementation of `attention`: the jnp reference, left to XLA to fuse."""
from __future__ import annotations

from pallas_kernels.attention.reference import attention_reference


def attention_xla(q, k, v, *, causal, mask, bias, scale):
    return attention_reference(q, k, v, causal=causal, mask=mask, bias=bias, scale=scale)
