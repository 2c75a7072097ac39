"""How the norm kernels split across devices (see pallas_kernels/_sharding.py).

Rows split freely. The features may split too (a residual stream placed over a tensor-parallel
axis): each device then computes its rows' partial sums over its own features, one all-reduce of
[rows] floats per statistic completes them, and the normalisation, scale and bias run locally on
the device's features. The forward keeps the statistics; the backward all-reduces only the two
per-row sums it needs (one all-reduce of [rows, 2]). Neither the activations nor the parameters
are gathered; these per-shard paths are written in jnp (statistics in float32), not with the kernel.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels._sharding import Collective, ShardingRule, batch_dims, row_statistic

_WHOLE = {"f": "each row's statistics run over all its features"}


def _param(p):
    return None if p is None else "f"


def _eps(eps):
    return "" if hasattr(eps, "shape") else eps  # a traced eps is a scalar operand


def _statistics(axes, shards, x32, eps, centred: bool):
    """(the mean, or None; 1/sqrt(var + eps)) of each row over the features of every shard,
    float32 with the rows' shape."""
    features = x32.shape[-1] * shards
    mean = None
    if centred:
        mean = lax.psum(jnp.sum(x32, axis=-1), axes) / features
        x32 = x32 - mean[..., None]
    var = lax.psum(jnp.sum(x32 * x32, axis=-1), axes) / features
    return mean, lax.rsqrt(var + eps)


def _forward(centred, axes, shards, x, scale=None, bias=None, *, eps):
    """(output, (statistics kept for the backward))."""
    x32 = x.astype(jnp.float32)
    mean, rstd = _statistics(axes, shards, x32, eps, centred)
    y = (x32 if mean is None else x32 - mean[..., None]) * rstd[..., None]
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), (rstd,) if mean is None else (mean, rstd)


def _backward(centred, axes, shards, cotangents, saved, x, scale=None, bias=None, *, eps):
    (g,) = cotangents
    features = x.shape[-1] * shards
    x32 = x.astype(jnp.float32)
    stats = _statistics(axes, shards, x32, eps, centred) if saved is None else (
        saved[1] if centred else (None, *saved[1]))
    mean, rstd = stats
    xc = x32 if mean is None else x32 - mean[..., None]
    rstd = rstd[..., None]
    xhat = xc * rstd
    g32 = g.astype(jnp.float32)
    gh = g32 if scale is None else g32 * scale.astype(jnp.float32)
    sums = [jnp.sum(gh * xhat, axis=-1, keepdims=True)]
    if centred:
        sums.append(jnp.sum(gh, axis=-1, keepdims=True))
    sums = lax.psum(jnp.concatenate(sums, axis=-1), axes) / features
    dx = gh - xhat * sums[..., :1]
    if centred:
        dx = dx - sums[..., 1:]
    rows = tuple(range(x.ndim - 1))
    grads = [(dx * rstd).astype(x.dtype)]
    if scale is not None:
        grads.append(jnp.sum(g32 * xhat, axis=rows).astype(scale.dtype))
    if bias is not None:
        grads.append(jnp.sum(g32, axis=rows).astype(bias.dtype))
    if hasattr(eps, "shape") and jnp.issubdtype(eps.dtype, jnp.inexact):
        # d rstd / d eps = -rstd^3 / 2; every feature of every shard contributes
        d_eps = lax.psum(jnp.sum(gh * xc * (-0.5 * rstd ** 3)), axes)
        grads.append(d_eps.astype(eps.dtype))
    return grads


def _layer_norm_forward(axes, shards, x, scale=None, bias=None, *, eps):
    return _forward(True, axes, shards, x, scale, bias, eps=eps)


def _layer_norm_backward(axes, shards, cotangents, saved, x, scale=None, bias=None, *, eps):
    return _backward(True, axes, shards, cotangents, saved, x, scale, bias, eps=eps)


def _rms_norm_forward(axes, shards, x, scale=None, *, eps):
    return _forward(False, axes, shards, x, scale, eps=eps)


def _rms_norm_backward(axes, shards, cotangents, saved, x, scale=None, *, eps):
    return _backward(False, axes, shards, cotangents, saved, x, scale, eps=eps)


def _row_statistics(count):
    """The float32 per-row statistics the forward keeps: (mean, rstd) or (rstd,)."""
    def saves(x, *args, **kwargs):
        return (row_statistic(x.shape[:-1]),) * count
    return saves


LAYER_NORM_FEATURE_PARALLEL = Collective("f", _layer_norm_forward, _layer_norm_backward,
                                         saves=_row_statistics(2))
RMS_NORM_FEATURE_PARALLEL = Collective("f", _rms_norm_forward, _rms_norm_backward,
                                       saves=_row_statistics(1))


def layer_norm_sharding(x, scale=None, bias=None, *, eps):
    rows = batch_dims(x.ndim - 1)
    return ShardingRule(args=(f"{rows} f", _param(scale), _param(bias)), kwargs=dict(eps=_eps(eps)),
                results=(f"{rows} f",), whole=_WHOLE,
                collectives=(LAYER_NORM_FEATURE_PARALLEL,))


def rms_norm_sharding(x, scale=None, *, eps):
    rows = batch_dims(x.ndim - 1)
    return ShardingRule(args=(f"{rows} f", _param(scale)), kwargs=dict(eps=_eps(eps)),
                results=(f"{rows} f",), whole=_WHOLE, collectives=(RMS_NORM_FEATURE_PARALLEL,))
