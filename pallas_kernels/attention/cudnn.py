"""The "cudnn" implementation of `attention`: cuDNN flash attention through
`jax.nn.dot_product_attention`, for the cases whose semantics match the op's exactly."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_cudnn(q, k, v, *, causal, mask, bias, scale):
    platform = jax.default_backend()
    if platform not in ("gpu", "cuda"):
        raise NotImplementedError(f"needs an NVIDIA GPU, the backend is {platform}")
    if q.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise NotImplementedError(f"cuDNN flash attention takes bfloat16/float16, not {q.dtype}")
    if mask is not None or bias is not None:
        raise NotImplementedError(
            "masks and biases are not routed to cuDNN, whose output for rows without "
            "keys is not the zeros this op promises")
    if causal and q.shape[1] != k.shape[1]:
        raise NotImplementedError(
            "cuDNN's causal mask aligns the diagonal at the start; this op aligns it at the "
            "end when q_seq != kv_seq")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        implementation="cudnn")
