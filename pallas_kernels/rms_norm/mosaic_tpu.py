"""The TPU "pallas" implementation of `rms_norm`: LayerNorm's Mosaic kernels
(layer_norm/mosaic_tpu.py) with `centered=False`."""
from __future__ import annotations

from pallas_kernels.layer_norm.mosaic_tpu import NormTpuConfig, norm_mosaic_tpu


def rms_norm_mosaic_tpu(x, scale=None, *, eps: float, config: NormTpuConfig | None = None):
    """RMSNorm through the TPU kernels (same arguments as `rms_norm`); `config` fixes the block
    size (else tuned on a TPU, or LayerNorm's `default_config`)."""
    return norm_mosaic_tpu(x, scale, None, eps, centered=False, config=config,
                           what="rms_norm/mosaic_tpu", run=rms_norm_mosaic_tpu, args=(x, scale),
                           kwargs={"eps": eps})
