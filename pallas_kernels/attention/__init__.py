"""Attention: flash attention in Pallas (forward and backward), cuDNN, and the XLA reference.

`attention(q, k, v, *, causal=False, mask=None, bias=None, scale=None, implementation=None)`
computes softmax(scale * q k^T + bias, masked) v with the layout of
`jax.nn.dot_product_attention`: q (batch, q_seq, heads, head_dim), k and v
(batch, kv_seq, kv_heads, head_dim) with heads % kv_heads == 0 (grouped-query attention).
`mask` (bool, True = keep) and `bias` (added to the scaled logits) broadcast to
(batch, heads, q_seq, kv_seq). With `causal` the diagonal is aligned at the end: query i sees
key j iff j <= i + kv_seq - q_seq. A query whose keys are all masked gets zeros (and passes zero
gradients). Softmax statistics are float32; the output has q's dtype. `bias` is differentiable
and its gradient has bias's own shape.

One file per implementation: `triton.py` (the Pallas kernels for GPUs, "pallas"), `cudnn.py`,
`xla.py` over `reference.py`; `common.py` checks the arguments all of them take. This module
registers them, in order of preference, on `attention_op`.
"""
from __future__ import annotations

from pallas_kernels._dispatch import Op, by_platform
from pallas_kernels.attention.common import canonicalize
from pallas_kernels.attention.cudnn import attention_cudnn
from pallas_kernels.attention.mosaic_tpu import attention_mosaic_tpu
from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.attention.triton import (AttentionConfig, config_space, heuristic_config,
                                             pallas_attention)
from pallas_kernels.attention.xla import attention_xla
from pallas_kernels.attention.sharding import attention_sharding

attention_op = Op("attention", sharding=attention_sharding)
attention_op.register("pallas")(by_platform(gpu=pallas_attention, tpu=attention_mosaic_tpu))
attention_op.register("cudnn", check_lowering=True)(attention_cudnn)
attention_op.register("xla")(attention_xla)


def attention(q, k, v, *, causal=False, mask=None, bias=None, scale=None, implementation=None,
              platform=None):
    """Scaled dot-product attention; see the module docstring for the exact semantics.

    Args:
      q: (batch, q_seq, heads, head_dim). k, v: (batch, kv_seq, kv_heads, head_dim).
      causal: query i sees key j iff j <= i + kv_seq - q_seq.
      mask: bool, True = keep, broadcastable to (batch, heads, q_seq, kv_seq).
      bias: float, added to the scaled logits, same broadcasting; differentiable.
      scale: logit scale, default head_dim ** -0.5.
      implementation: None (pick), "pallas", "cudnn", "xla", or an ordered list of them.
      platform: None (the default), "gpu", "tpu" or "cpu": the kernels' target.
    Returns:
      (batch, q_seq, heads, head_dim) in q's dtype.
    """
    q, k, v, mask, bias, scale = canonicalize(q, k, v, mask, bias, scale)
    return attention_op(q, k, v, causal=bool(causal), mask=mask, bias=bias, scale=scale,
                        implementation=implementation, platform=platform)


__all__ = ["attention", "attention_op", "attention_reference", "pallas_attention",
           "AttentionConfig", "heuristic_config", "config_space"]
