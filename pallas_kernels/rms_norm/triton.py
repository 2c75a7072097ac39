"""The "pallas" implementation of `rms_norm`: LayerNorm's Triton kernels (layer_norm/triton.py)
with `centered=False`, the same row-in-registers forward and partial-sum backward minus the
mean, and their custom_vjp wiring."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import tuned_config
from pallas_kernels.layer_norm.triton import (NormConfig, eps_cotangent, eps_operand,
                                              norm_backward, norm_config_heuristic,
                                              norm_config_space, norm_forward)

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _rms_norm_pallas(x, scale, eps, eps_grad, config):
    return norm_forward(x, scale, None, eps, centered=False, config=config)[0]


def _rms_norm_pallas_fwd(x, scale, eps, eps_grad, config):
    y, _, rstd = norm_forward(x, scale, None, eps, centered=False, config=config)
    return y, (x, scale, rstd)


def _rms_norm_pallas_bwd(eps_grad, config, residuals, dy):
    x, scale, rstd = residuals
    dx, dscale, _, deps = norm_backward(x, scale, None, None, rstd, dy, centered=False,
                                        eps_grad=eps_grad, config=config)
    return dx, dscale, eps_cotangent(deps)


_rms_norm_pallas.defvjp(_rms_norm_pallas_fwd, _rms_norm_pallas_bwd)


def rms_norm_pallas(x, scale=None, *, eps: float, config: NormConfig | None = None):
    """RMSNorm through the Pallas kernels; `config` fixes block sizes (else tuned/heuristic)."""
    if x.size == 0:
        return jnp.zeros_like(x)
    x2d = x.reshape(-1, x.shape[-1])
    if config is None:
        config = tuned_config("rms_norm/pallas", rms_norm_pallas, (x, scale), {"eps": eps},
                              norm_config_space(*x2d.shape), norm_config_heuristic(*x2d.shape))
    return _rms_norm_pallas(x2d, scale, *eps_operand(eps), config).reshape(x.shape)
