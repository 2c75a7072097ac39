"""Dense layers with the activation fused into the matmul: `dense_act` and `gated_dense`.

dense_act:   y = act(x @ w + b)
gated_dense: y = act(x @ w_gate) * (x @ w_up)       (SwiGLU with "silu", GeGLU with "gelu_*")

One file per implementation: `triton.py` (the Pallas kernels for GPUs, "pallas") and `xla.py`;
`reference.py` holds the textbook formulas the tests compare against. This module registers the
implementations, in order of preference, on `dense_act_op` and `gated_dense_op`.
"""
from __future__ import annotations

from pallas_kernels._dispatch import Op, by_platform
from pallas_kernels.dense_act.mosaic_tpu import dense_act_mosaic_tpu, gated_dense_mosaic_tpu
from pallas_kernels.dense_act.reference import dense_act_reference, gated_dense_reference
from pallas_kernels.dense_act.triton import (DenseConfig, dense_act_pallas, dense_config_heuristic,
                                             dense_config_space, gated_dense_pallas)
from pallas_kernels.dense_act.xla import dense_act_xla, gated_dense_xla
from pallas_kernels.dense_act.sharding import dense_act_sharding, gated_dense_sharding

ACTIVATIONS = ("gelu_tanh", "gelu_erf", "relu", "silu", "identity")

dense_act_op = Op("dense_act", sharding=dense_act_sharding)
dense_act_op.register("pallas")(by_platform(gpu=dense_act_pallas, tpu=dense_act_mosaic_tpu))
dense_act_op.register("xla")(dense_act_xla)

gated_dense_op = Op("gated_dense", sharding=gated_dense_sharding)
gated_dense_op.register("pallas")(
    by_platform(gpu=gated_dense_pallas, tpu=gated_dense_mosaic_tpu))
gated_dense_op.register("xla")(gated_dense_xla)


def _check_activation(name: str, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}; got {activation!r}")


def _check_weight(name: str, x, wname: str, w) -> None:
    if w.ndim != 2 or x.ndim < 1 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"{name}: {wname} must be [d_in, d_out] with d_in = x.shape[-1] = "
                         f"{x.shape[-1] if x.ndim else None}; got x {tuple(x.shape)}, "
                         f"{wname} {tuple(w.shape)}")


def dense_act(x, w, b=None, *, activation: str, implementation=None, platform=None):
    """act(x @ w + b) with the bias and activation fused into the matmul.

    Args:
      x: [..., d_in]. w: [d_in, d_out]. b: optional [d_out].
      activation: "gelu_tanh", "gelu_erf", "relu", "silu" or "identity".
      implementation: None (choose), "pallas", "xla", or a list tried in order.
      platform: None (the default), "gpu", "tpu" or "cpu": the kernels' target.

    Returns:
      [..., d_out] in the promoted dtype of x, w (and b).
    """
    _check_activation("dense_act", activation)
    _check_weight("dense_act", x, "w", w)
    if b is not None and tuple(b.shape) != (w.shape[1],):
        raise ValueError(f"dense_act: b must have shape ({w.shape[1]},) (d_out); "
                         f"got {tuple(b.shape)}")
    return dense_act_op(x, w, b, activation=activation, implementation=implementation,
                        platform=platform)


def gated_dense(x, w_gate, w_up, *, activation: str, implementation=None, platform=None):
    """act(x @ w_gate) * (x @ w_up): SwiGLU ("silu") or GeGLU ("gelu_tanh", "gelu_erf").

    Shazeer, "GLU Variants Improve Transformer" (2020).

    Args:
      x: [..., d_in]. w_gate, w_up: [d_in, d_ff].
      activation: applied to the gate branch; one of the `dense_act` activations.
      implementation: None (choose), "pallas", "xla", or a list tried in order.

    Returns:
      [..., d_ff] in the promoted dtype of x and the weights.
    """
    _check_activation("gated_dense", activation)
    _check_weight("gated_dense", x, "w_gate", w_gate)
    _check_weight("gated_dense", x, "w_up", w_up)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"gated_dense: w_gate and w_up must have the same shape; got "
                         f"{tuple(w_gate.shape)} and {tuple(w_up.shape)}")
    return gated_dense_op(x, w_gate, w_up, activation=activation, implementation=implementation,
                          platform=platform)


__all__ = ["ACTIVATIONS", "dense_act", "gated_dense", "dense_act_op", "gated_dense_op",
           "dense_act_pallas", "gated_dense_pallas", "dense_act_xla", "gated_dense_xla",
           "dense_act_reference", "gated_dense_reference", "DenseConfig",
           "dense_config_heuristic", "dense_config_space"]
