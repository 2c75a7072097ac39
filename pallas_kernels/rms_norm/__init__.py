"""RMSNorm over the last axis.

One file per implementation: `triton.py` (the Pallas kernels for GPUs, "pallas", which are
LayerNorm's without the mean) and `xla.py`; `reference.py` holds the textbook formula the tests
compare against. This module registers the implementations, in order of preference, on
`rms_norm_op`.
"""
from __future__ import annotations

from pallas_kernels._dispatch import Op, by_platform
from pallas_kernels.layer_norm import check_norm_arguments
from pallas_kernels.rms_norm.mosaic_tpu import rms_norm_mosaic_tpu
from pallas_kernels.rms_norm.reference import rms_norm_reference
from pallas_kernels.rms_norm.triton import rms_norm_pallas
from pallas_kernels.rms_norm.xla import rms_norm_xla
from pallas_kernels.layer_norm.sharding import rms_norm_sharding

rms_norm_op = Op("rms_norm", sharding=rms_norm_sharding)
rms_norm_op.register("pallas")(by_platform(gpu=rms_norm_pallas, tpu=rms_norm_mosaic_tpu))
rms_norm_op.register("xla")(rms_norm_xla)


def rms_norm(x, scale=None, *, eps: float = 1e-6, implementation=None, platform=None):
    """RMSNorm over the last axis of `x`.

    Zhang, Sennrich, "Root Mean Square Layer Normalization" (2019).

    Args:
      x: [..., features], any float dtype.
      scale: optional [features] array (may be float32 when x is bf16).
      eps: added to the mean square.
      implementation: None (choose), "pallas", "xla", or a list tried in order.
      platform: None (the default), "gpu", "tpu" or "cpu": the kernels' target.

    Returns:
      An array like x: x / sqrt(mean(x**2) + eps) * scale, statistics in float32.
    """
    check_norm_arguments("rms_norm", x, {"scale": scale})
    return rms_norm_op(x, scale, eps=eps, implementation=implementation,
                       platform=platform)


__all__ = ["rms_norm", "rms_norm_op", "rms_norm_pallas", "rms_norm_xla", "rms_norm_reference"]
