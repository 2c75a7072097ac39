"""LayerNorm over the last axis.

One file per implementation: `triton.py` (the Pallas kernels for GPUs, "pallas"; RMSNorm shares
them) and `xla.py`; `reference.py` holds the textbook formula the tests compare against. This
module registers the implementations, in order of preference, on `layer_norm_op`.
"""
from __future__ import annotations

from pallas_kernels._dispatch import Op, by_platform
from pallas_kernels.layer_norm.mosaic_tpu import layer_norm_mosaic_tpu
from pallas_kernels.layer_norm.reference import layer_norm_reference
from pallas_kernels.layer_norm.triton import (NormConfig, layer_norm_pallas, norm_config_heuristic,
                                              norm_config_space)
from pallas_kernels.layer_norm.xla import layer_norm_xla
from pallas_kernels.layer_norm.sharding import layer_norm_sharding

layer_norm_op = Op("layer_norm", sharding=layer_norm_sharding)
layer_norm_op.register("pallas")(by_platform(gpu=layer_norm_pallas, tpu=layer_norm_mosaic_tpu))
layer_norm_op.register("xla")(layer_norm_xla)


def check_norm_arguments(name: str, x, params: dict) -> None:
    """Raise ValueError unless every non-None entry of `params` has shape (x.shape[-1],)."""
    if x.ndim < 1:
        raise ValueError(f"{name}: x must have at least one axis (the one normalised); "
                         f"got a scalar")
    for pname, p in params.items():
        if p is not None and tuple(p.shape) != (x.shape[-1],):
            raise ValueError(f"{name}: {pname} must have shape ({x.shape[-1]},) to match the last "
                             f"axis of x {tuple(x.shape)}; got {tuple(p.shape)}")


def layer_norm(x, scale=None, bias=None, *, eps: float = 1e-5, implementation=None, platform=None):
    """LayerNorm over the last axis of `x`.

    Ba, Kiros, Hinton, "Layer Normalization" (2016).

    Args:
      x: [..., features], any float dtype.
      scale, bias: optional [features] arrays (may be float32 when x is bf16).
      eps: added to the variance.
      implementation: None (choose), "pallas", "xla", or a list tried in order.
      platform: None (the default), "gpu", "tpu" or "cpu": the kernels' target.

    Returns:
      An array like x: (x - mean) / sqrt(var + eps) * scale + bias, statistics in float32.
    """
    check_norm_arguments("layer_norm", x, {"scale": scale, "bias": bias})
    return layer_norm_op(x, scale, bias, eps=eps, implementation=implementation,
                         platform=platform)


__all__ = ["layer_norm", "layer_norm_op", "layer_norm_pallas", "layer_norm_xla",
           "layer_norm_reference", "check_norm_arguments", "NormConfig",
           "norm_config_heuristic", "norm_config_space"]
