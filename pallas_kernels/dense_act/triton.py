"""Dense layers with the activation in the matmul epilogue, in Pallas for GPUs (Triton): the
kernels, their wrappers, the custom_vjp wiring and the "pallas" implementations of `dense_act`
and `gated_dense`.

Forward: a tiled matmul (f32 accumulator, loop over the contraction in `block_k` steps) whose
epilogue adds the bias, applies the activation (and the gate) and, under differentiation, also
stores the pre-activations the backward needs. Backward: an elementwise kernel turns dy and the
pre-activations into dz = dL/d(pre-activation) (dg and du for the gated form; dense identity
skips it), then two tiled matmuls: dx = dz @ w^T (one program per dx tile, looping over d_out)
and dw = x^T @ dz (one program per dw tile, looping over the rows; the programs in the first row
of tiles also sum db). The kernels serve both ops; `kind` says which epilogue.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _pallas_compat as compat
from pallas_kernels._dispatch import interpret_mode, tuned_config
from pallas_kernels._tiles import bound, fit, load_tile, params, store_tile


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    """Tile sizes (powers of two, >= 16) for every kernel here.

    Each kernel tiles its output in (block_m, block_n) and steps its contraction by block_k:
    forward (rows, d_out; d_in), dx (rows, d_in; d_out), dw (d_in, d_out; rows).
    """
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def dense_config_heuristic(m: int, n: int, k: int) -> DenseConfig:
    bm, bn, bk = fit(m, 128), fit(n, 128), fit(k, 64)
    return DenseConfig(bm, bn, bk, num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3)


def dense_config_space(m: int, n: int, k: int) -> list[DenseConfig]:
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
              (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4)]
    fitted = {DenseConfig(fit(m, bm), fit(n, bn), fit(k, bk), w, s)
              for bm, bn, bk, w, s in shapes}
    return sorted(fitted, key=dataclasses.astuple)


# ----------------------------------------------------------------------------------------------
# Activations in float32, as kernel code (tanh/exp only: Triton has no erf).

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715


def _erfc_nonnegative(a):
    """erfc(a) for a >= 0, fractional error below 1.2e-7 (Numerical Recipes, 2nd ed., 6.2)."""
    t = 1.0 / (1.0 + 0.5 * a)
    poly = 0.17087277
    for c in (-0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418,
              0.37409196, 1.00002368, -1.26551223):
        poly = c + t * poly
    return t * jnp.exp(poly - a * a)


def _normal_cdf(z):
    tail = 0.5 * _erfc_nonnegative(jnp.abs(z) * _INV_SQRT_2)
    return jnp.where(z >= 0, 1.0 - tail, tail)


def _sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))


def _activation(name: str, z):
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z * z * z)))
    if name == "gelu_erf":
        return z * _normal_cdf(z)
    if name == "relu":
        return jnp.maximum(z, 0.0)
    if name == "silu":
        return z * _sigmoid(z)
    return z


def _activation_grad(name: str, z):
    if name == "gelu_tanh":
        t = jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (
            1.0 + 3.0 * _GELU_CUBIC * z * z)
    if name == "gelu_erf":
        return _normal_cdf(z) + z * jnp.exp(-0.5 * z * z) * _INV_SQRT_2PI
    if name == "relu":
        return jnp.where(z > 0, 1.0, 0.0)
    if name == "silu":
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    return jnp.ones_like(z)


def _epilogue(kind: str, activation: str, pre):
    if kind == "dense":
        return _activation(activation, pre[0])
    gate, up = pre
    return _activation(activation, gate) * up


def _epilogue_grad(kind: str, activation: str, dy, pre):
    """d(loss)/d(pre-activations), given dy; `pre` is empty for dense identity."""
    if kind == "dense":
        return [dy if activation == "identity" else dy * _activation_grad(activation, pre[0])]
    gate, up = pre
    return [dy * up * _activation_grad(activation, gate), dy * _activation(activation, gate)]


def _saves_pre(kind: str, activation: str) -> int:
    """How many pre-activation arrays the backward needs."""
    return 2 if kind == "gated" else int(activation != "identity")


# ----------------------------------------------------------------------------------------------
# Forward kernel

def _forward_kernel(*refs, kind, activation, n_weights, has_bias, n_pre, m, n, k, block_k):
    x_ref, *refs = refs
    w_refs, refs = refs[:n_weights], refs[n_weights:]
    b_ref = refs.pop(0) if has_bias else None
    y_ref, pre_refs = refs[0], refs[1:]
    block_m, block_n = y_ref.shape
    rows = pl.program_id(0) * block_m + jnp.arange(block_m)
    cols = pl.program_id(1) * block_n + jnp.arange(block_n)
    m_bound, n_bound, k_bound = bound(m, block_m), bound(n, block_n), bound(k, block_k)

    def step(s, accs):
        k0 = pl.multiple_of(s * block_k, block_k)
        depth = k0 + jnp.arange(block_k)
        x = load_tile(x_ref.at[:, pl.ds(k0, block_k)], rows, depth, m_bound, k_bound)
        return tuple(
            acc + jnp.dot(x, load_tile(w_ref.at[pl.ds(k0, block_k), :], depth, cols, k_bound,
                                       n_bound), preferred_element_type=jnp.float32)
            for acc, w_ref in zip(accs, w_refs))

    zeros = jnp.zeros((block_m, block_n), jnp.float32)
    pre = list(lax.fori_loop(0, pl.cdiv(k, block_k), step, (zeros,) * n_weights))
    if has_bias:
        bias_mask = None if n_bound is None else cols < n
        bias = plgpu.load(b_ref, mask=bias_mask, other=0 if bias_mask is not None else None)
        pre[0] = pre[0] + bias.astype(jnp.float32)[None, :]
    store_tile(y_ref, _epilogue(kind, activation, pre), rows, cols, m_bound, n_bound)
    for ref, value in zip(pre_refs, pre[:n_pre]):
        store_tile(ref, value, rows, cols, m_bound, n_bound)


# Forward wrapper

def dense_forward(kind: str, activation: str, x, weights, bias, out_dtype, config: DenseConfig,
                  *, save_pre: bool):
    """x [m, k], weights [k, n] each -> (y [m, n] out_dtype, pre-activations saved if asked)."""
    m, k = x.shape
    n = weights[0].shape[1]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    k_padded = pl.cdiv(k, bk) * bk
    n_pre = _saves_pre(kind, activation) if save_pre else 0
    interpret = interpret_mode()
    operands = [x, *weights] + ([bias] if bias is not None else [])
    in_specs = ([pl.BlockSpec((bm, k_padded), lambda i, j: (i, 0))]
                + [pl.BlockSpec((k_padded, bn), lambda i, j: (0, j))] * len(weights)
                + ([pl.BlockSpec((bn,), lambda i, j: (j,))] if bias is not None else []))
    tile = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
    kernel = functools.partial(
        _forward_kernel, kind=kind, activation=activation, n_weights=len(weights),
        has_bias=bias is not None, n_pre=n_pre, m=m, n=n, k=k, block_k=bk)
    y, *pre = compat.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((m, n), out_dtype)]
        + [jax.ShapeDtypeStruct((m, n), x.dtype)] * n_pre,
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn)),
        in_specs=in_specs,
        out_specs=[tile] * (1 + n_pre),
        compiler_params=params(config, interpret),
        interpret=interpret,
        name=f"{kind}_fwd",
    )(*operands)
    return y, pre


# ----------------------------------------------------------------------------------------------
# Backward kernels

def _pre_grad_kernel(dy_ref, *refs, kind, activation, n_pre, m, n):
    """dL/d(pre-activation) tiles from dy and the saved pre-activations (elementwise)."""
    pre_refs, dz_refs = refs[:n_pre], refs[n_pre:]
    block_m, block_n = dy_ref.shape
    rows = pl.program_id(0) * block_m + jnp.arange(block_m)
    cols = pl.program_id(1) * block_n + jnp.arange(block_n)
    bounds = (bound(m, block_m), bound(n, block_n))
    dy = load_tile(dy_ref, rows, cols, *bounds).astype(jnp.float32)
    pre = [load_tile(r, rows, cols, *bounds).astype(jnp.float32) for r in pre_refs]
    for ref, dz in zip(dz_refs, _epilogue_grad(kind, activation, dy, pre)):
        store_tile(ref, dz, rows, cols, *bounds)


def _grad_input_kernel(*refs, n_weights, m, n, k, block_k):
    """dx tile = sum over branches of dz_branch @ w_branch^T, looping over d_out."""
    dz_refs, w_refs, dx_ref = refs[:n_weights], refs[n_weights:2 * n_weights], refs[-1]
    block_m, block_n = dx_ref.shape  # rows of x, columns of x (= rows of w)
    rows = pl.program_id(0) * block_m + jnp.arange(block_m)
    x_cols = pl.program_id(1) * block_n + jnp.arange(block_n)
    m_bound, k_bound, n_bound = bound(m, block_m), bound(k, block_n), bound(n, block_k)

    def step(s, acc):
        n0 = pl.multiple_of(s * block_k, block_k)
        out_cols = n0 + jnp.arange(block_k)
        chunk = pl.ds(n0, block_k)
        for dz_ref, w_ref in zip(dz_refs, w_refs):
            dz = load_tile(dz_ref.at[:, chunk], rows, out_cols, m_bound, n_bound)
            w = load_tile(w_ref.at[:, chunk], x_cols, out_cols, k_bound, n_bound)
            acc = acc + lax.dot_general(dz, w, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
        return acc

    acc = lax.fori_loop(0, pl.cdiv(n, block_k), step, jnp.zeros((block_m, block_n), jnp.float32))
    store_tile(dx_ref, acc, rows, x_cols, m_bound, k_bound)


def _grad_weights_kernel(*refs, n_weights, has_bias, m, n, k, block_k):
    """dw tile = x^T @ dz over all rows; the first row of programs also writes db = sum(dz)."""
    x_ref, refs = refs[0], refs[1:]
    dz_refs, dw_refs = refs[:n_weights], refs[n_weights:2 * n_weights]
    db_ref = refs[2 * n_weights] if has_bias else None
    block_m, block_n = dw_refs[0].shape  # columns of x, columns of y
    x_cols = pl.program_id(0) * block_m + jnp.arange(block_m)
    out_cols = pl.program_id(1) * block_n + jnp.arange(block_n)
    k_bound, n_bound, m_bound = bound(k, block_m), bound(n, block_n), bound(m, block_k)

    def step(s, accs):
        m0 = pl.multiple_of(s * block_k, block_k)
        rows = m0 + jnp.arange(block_k)
        chunk = pl.ds(m0, block_k)
        x = load_tile(x_ref.at[chunk, :], rows, x_cols, m_bound, k_bound)
        dzs = [load_tile(r.at[chunk, :], rows, out_cols, m_bound, n_bound) for r in dz_refs]
        new = tuple(acc + lax.dot_general(x, dz, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
                    for acc, dz in zip(accs, dzs))
        if has_bias:
            new += (accs[n_weights] + jnp.sum(dzs[0].astype(jnp.float32), axis=0),)
        return new

    accs = (jnp.zeros((block_m, block_n), jnp.float32),) * n_weights
    if has_bias:
        accs += (jnp.zeros((block_n,), jnp.float32),)
    accs = lax.fori_loop(0, pl.cdiv(m, block_k), step, accs)
    for dw_ref, acc in zip(dw_refs, accs):
        store_tile(dw_ref, acc, x_cols, out_cols, k_bound, n_bound)
    if has_bias:
        @pl.when(pl.program_id(0) == 0)
        def _():
            plgpu.store(db_ref, accs[n_weights].astype(db_ref.dtype),
                        mask=None if n_bound is None else out_cols < n)


# Backward wrapper

def dense_backward(kind: str, activation: str, x, weights, bias, pre, dy, config: DenseConfig):
    """(dx, [dw per weight], db or None) for `dense_forward`'s output cotangent dy.

    dL/d(pre-activation) is computed once by an elementwise kernel (skipped for dense identity,
    where it is dy) and then read by two matmul kernels: recomputing it inside them would repeat
    the activation's derivative once per tile of d_in, which costs more than a pass over memory.
    """
    m, k = x.shape
    n = dy.shape[1]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    n_weights = len(weights)
    interpret = interpret_mode()
    tile = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
    if kind == "dense" and activation == "identity":
        dzs = [dy]
    else:
        dzs = compat.pallas_call(
            functools.partial(_pre_grad_kernel, kind=kind, activation=activation,
                              n_pre=len(pre), m=m, n=n),
            out_shape=[jax.ShapeDtypeStruct((m, n), x.dtype)] * n_weights,
            grid=(pl.cdiv(m, bm), pl.cdiv(n, bn)),
            in_specs=[tile] * (1 + len(pre)),
            out_specs=[tile] * n_weights,
            compiler_params=params(config, interpret),
            interpret=interpret,
            name=f"{kind}_bwd_dz",
        )(dy, *pre)

    n_padded = pl.cdiv(n, bk) * bk
    dx = compat.pallas_call(
        functools.partial(_grad_input_kernel, n_weights=n_weights, m=m, n=n, k=k, block_k=bk),
        out_shape=jax.ShapeDtypeStruct((m, k), x.dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(k, bn)),
        in_specs=[pl.BlockSpec((bm, n_padded), lambda i, j: (i, 0))] * n_weights
        + [pl.BlockSpec((bn, n_padded), lambda i, j: (j, 0))] * n_weights,
        out_specs=tile,
        compiler_params=params(config, interpret),
        interpret=interpret,
        name=f"{kind}_bwd_dx",
    )(*dzs, *weights)

    m_padded = pl.cdiv(m, bk) * bk
    out_shape = [jax.ShapeDtypeStruct((k, n), w.dtype) for w in weights]
    out_specs = [tile] * n_weights
    if bias is not None:
        out_shape.append(jax.ShapeDtypeStruct((n,), bias.dtype))
        out_specs.append(pl.BlockSpec((bn,), lambda i, j: (j,)))
    grads = compat.pallas_call(
        functools.partial(_grad_weights_kernel, n_weights=n_weights, has_bias=bias is not None,
                          m=m, n=n, k=k, block_k=bk),
        out_shape=out_shape,
        grid=(pl.cdiv(k, bm), pl.cdiv(n, bn)),
        in_specs=[pl.BlockSpec((m_padded, bm), lambda i, j: (0, i))]
        + [pl.BlockSpec((m_padded, bn), lambda i, j: (0, j))] * n_weights,
        out_specs=out_specs,
        compiler_params=params(config, interpret),
        interpret=interpret,
        name=f"{kind}_bwd_dw",
    )(x, *dzs)
    return dx, list(grads[:n_weights]), grads[n_weights] if bias is not None else None


# ----------------------------------------------------------------------------------------------
# custom_vjp wiring

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense_act_pallas(x, w, b, activation, config):
    out_dtype = jnp.result_type(x, w, *([b] if b is not None else []))
    return dense_forward("dense", activation, x, [w], b, out_dtype, config, save_pre=False)[0]


def _dense_act_pallas_fwd(x, w, b, activation, config):
    out_dtype = jnp.result_type(x, w, *([b] if b is not None else []))
    y, pre = dense_forward("dense", activation, x, [w], b, out_dtype, config, save_pre=True)
    return y, (x, w, b, pre)


def _dense_act_pallas_bwd(activation, config, residuals, dy):
    x, w, b, pre = residuals
    dx, (dw,), db = dense_backward("dense", activation, x, [w], b, pre, dy, config)
    return dx, dw, db


_dense_act_pallas.defvjp(_dense_act_pallas_fwd, _dense_act_pallas_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gated_dense_pallas(x, w_gate, w_up, activation, config):
    return dense_forward("gated", activation, x, [w_gate, w_up], None, x.dtype, config,
                         save_pre=False)[0]


def _gated_dense_pallas_fwd(x, w_gate, w_up, activation, config):
    y, pre = dense_forward("gated", activation, x, [w_gate, w_up], None, x.dtype, config,
                           save_pre=True)
    return y, (x, w_gate, w_up, pre)


def _gated_dense_pallas_bwd(activation, config, residuals, dy):
    x, w_gate, w_up, pre = residuals
    dx, (dw_gate, dw_up), _ = dense_backward("gated", activation, x, [w_gate, w_up], None, pre,
                                             dy, config)
    return dx, dw_gate, dw_up


_gated_dense_pallas.defvjp(_gated_dense_pallas_fwd, _gated_dense_pallas_bwd)


def _flatten(x, weights):
    """Promote x and the weights to one dtype and x to [rows, d_in]."""
    dtype = jnp.result_type(x, *weights)
    rows = math.prod(x.shape[:-1])
    return x.reshape(rows, x.shape[-1]).astype(dtype), [w.astype(dtype) for w in weights]


def _empty_output(x, m: int, k: int, n: int, dtype):
    """The output when it has no elements (its gradients are then zero), None when the kernels
    have work to do; an empty contraction with a non-empty output, act(b) alone, is declined."""
    if m == 0 or n == 0:
        return jnp.zeros((*x.shape[:-1], n), dtype)
    if k == 0:
        raise NotImplementedError("d_in = 0: no matmul to tile, the output is act(bias) alone")
    return None


# ----------------------------------------------------------------------------------------------
# The implementations

def dense_act_pallas(x, w, b=None, *, activation: str, config: DenseConfig | None = None):
    """dense_act through the Pallas kernels; `config` fixes tile sizes (else tuned/heuristic)."""
    x2d, (w,) = _flatten(x, [w])
    m, (k, n) = x2d.shape[0], w.shape
    empty = _empty_output(x, m, k, n, jnp.result_type(x2d, w, *([b] if b is not None else [])))
    if empty is not None:
        return empty
    if config is None:
        config = tuned_config(f"dense_act/{activation}/pallas", dense_act_pallas, (x, w, b),
                              {"activation": activation}, dense_config_space(m, n, k),
                              dense_config_heuristic(m, n, k))
    y = _dense_act_pallas(x2d, w, b, activation, config)
    return y.reshape(*x.shape[:-1], n)


def gated_dense_pallas(x, w_gate, w_up, *, activation: str, config: DenseConfig | None = None):
    """gated_dense through the Pallas kernels; `config` fixes tile sizes (else tuned/heuristic)."""
    x2d, (w_gate, w_up) = _flatten(x, [w_gate, w_up])
    m, (k, n) = x2d.shape[0], w_gate.shape
    empty = _empty_output(x, m, k, n, x2d.dtype)
    if empty is not None:
        return empty
    if config is None:
        config = tuned_config(f"gated_dense/{activation}/pallas", gated_dense_pallas,
                              (x, w_gate, w_up), {"activation": activation},
                              dense_config_space(m, n, k), dense_config_heuristic(m, n, k))
    y = _gated_dense_pallas(x2d, w_gate, w_up, activation, config)
    return y.reshape(*x.shape[:-1], n)
