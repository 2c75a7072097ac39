"""The TPU "pallas" implementation of `rms_norm`: LayerNorm's Mosaic kernels
(layer_norm/mosaic_tpu.py) with `centered=False`."""
from __future__ import annotations

from pallas_kernels.layer_norm.mosaic_tpu import norm_mosaic_tpu


def rms_norm_mosaic_tpu(x, scale=None, *, eps: float):
    """RMSNorm through the TPU kernels (same arguments as `rms_norm`)."""
    return norm_mosaic_tpu(x, scale, None, eps, centered=False)
