"""RMSNorm over the last axis: Pallas forward and backward, custom_vjp, XLA reference.

The kernels are LayerNorm's (layer_norm.py) with `centered=False`: the same row-in-registers
forward and the same partial-sum backward, minus the mean.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._dispatch import Op, tuned_config
from pallas_kernels.layer_norm import (NormConfig, check_norm_arguments, norm_backward,
                                       norm_config_heuristic, norm_config_space, norm_forward)

rms_norm_op = Op("rms_norm")


# Forward and backward kernels and wrappers: `norm_forward` / `norm_backward` in layer_norm.py.

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm_pallas(x, scale, eps, config):
    return norm_forward(x, scale, None, centered=False, eps=eps, config=config)[0]


def _rms_norm_pallas_fwd(x, scale, eps, config):
    y, _, rstd = norm_forward(x, scale, None, centered=False, eps=eps, config=config)
    return y, (x, scale, rstd)


def _rms_norm_pallas_bwd(eps, config, residuals, dy):
    x, scale, rstd = residuals
    dx, dscale, _ = norm_backward(x, scale, None, None, rstd, dy, centered=False, config=config)
    return dx, dscale


_rms_norm_pallas.defvjp(_rms_norm_pallas_fwd, _rms_norm_pallas_bwd)


@rms_norm_op.register("pallas")
def rms_norm_pallas(x, scale=None, *, eps: float, config: NormConfig | None = None):
    """RMSNorm through the Pallas kernels; `config` fixes block sizes (else tuned/heuristic)."""
    if x.size == 0:
        return jnp.zeros_like(x)
    x2d = x.reshape(-1, x.shape[-1])
    if config is None:
        config = tuned_config("rms_norm/pallas", rms_norm_pallas, (x, scale), {"eps": eps},
                              norm_config_space(*x2d.shape), norm_config_heuristic(*x2d.shape))
    return _rms_norm_pallas(x2d, scale, float(eps), config).reshape(x.shape)


@rms_norm_op.register("xla")
def rms_norm_xla(x, scale=None, *, eps: float):
    """RMSNorm in jnp (statistics in float32), differentiated by JAX; XLA fuses it."""
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x, scale=None, *, eps: float = 1e-6, implementation=None):
    """RMSNorm over the last axis of `x`.

    Zhang, Sennrich, "Root Mean Square Layer Normalization" (2019).

    Args:
      x: [..., features], any float dtype.
      scale: optional [features] array (may be float32 when x is bf16).
      eps: added to the mean square.
      implementation: None (choose), "pallas", "xla", or a list tried in order.

    Returns:
      An array like x: x / sqrt(mean(x**2) + eps) * scale, statistics in float32.
    """
    check_norm_arguments("rms_norm", x, {"scale": scale})
    return rms_norm_op(x, scale, eps=eps, implementation=implementation)


def rms_norm_reference(x, scale=None, *, eps: float = 1e-6):
    """Textbook RMSNorm in the input's own precision; the oracle for tests."""
    y = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * scale if scale is not None else y
