"""Dense layers with the activation in the matmul epilogue, in Pallas for TPUs (Mosaic): the
kernels, their wrappers, the custom_vjp wiring and the TPU "pallas" implementations of
`dense_act` and `gated_dense`.

Forward: grid (row blocks, column blocks, depth blocks), depth a reduction into float32 VMEM
accumulators; the last depth step adds the bias, applies the activation (and the gate) and, under
differentiation, stores the pre-activations. Backward: an elementwise kernel turns dy and the
pre-activations into dz = dL/d(pre-activation), then two tiled matmuls with the same reduction
pattern, dx = dz @ w^T and dw = x^T @ dz. Operands are zero-padded to whole blocks; zero padding
adds nothing to a matmul, and padded rows and columns are sliced off. The activation formulas are
the Triton kernels' (tanh and exp only).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _tpu_tiles as tt
from pallas_kernels._target import current
from pallas_kernels.dense_act.triton import _epilogue, _epilogue_grad, _saves_pre

_F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def blocks(m: int, n: int, k: int, dtype) -> tuple[int, int, int]:
    """(block_m, block_n, block_k): MXU-shaped tiles, smaller for small operands."""
    return (tt.fit(m, 256, tt.sublanes(dtype)), tt.fit(n, 256, tt.LANES),
            tt.fit(k, 512, tt.LANES))


# ----------------------------------------------------------------------------------------------
# Forward kernel

def _forward_kernel(*refs, kind, activation, n_weights, has_bias, n_pre):
    refs = list(refs)
    x_ref = refs.pop(0)
    w_refs = [refs.pop(0) for _ in range(n_weights)]
    b_ref = refs.pop(0) if has_bias else None
    y_ref, pre_refs, acc_refs = refs[0], refs[1:1 + n_pre], refs[1 + n_pre:]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        for acc in acc_refs:
            acc[...] = jnp.zeros_like(acc)

    x = x_ref[...]
    for acc, w_ref in zip(acc_refs, w_refs):
        acc[...] += lax.dot_general(x, w_ref[...], _NN, preferred_element_type=_F32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        pre = [acc[...] for acc in acc_refs]
        if has_bias:
            pre[0] = pre[0] + b_ref[...].astype(_F32)
        y_ref[...] = _epilogue(kind, activation, pre).astype(y_ref.dtype)
        for ref, value in zip(pre_refs, pre):
            ref[...] = value.astype(ref.dtype)


# Forward wrapper

def forward(kind, activation, x, weights, bias, out_dtype, *, save_pre: bool, interpret: bool):
    """Padded x [m, k], weights [k, n] each, bias [1, n] -> (y [m, n], saved pre-activations)."""
    (m, k), n = x.shape, weights[0].shape[1]
    bm, bn, bk = blocks(m, n, k, x.dtype)
    n_pre = _saves_pre(kind, activation) if save_pre else 0
    tile = pl.BlockSpec((bm, bn), lambda i, j, r: (i, j))
    in_specs = ([pl.BlockSpec((bm, bk), lambda i, j, r: (i, r))]
                + [pl.BlockSpec((bk, bn), lambda i, j, r: (r, j))] * len(weights)
                + [pl.BlockSpec((1, bn), lambda i, j, r: (0, j))] * (bias is not None))
    vmem = tt.check_vmem(f"{kind} forward", tt.block_bytes(
        ((bm, bk), x.dtype), *[((bk, bn), x.dtype)] * len(weights), ((1 + n_pre, bm * bn),
                                                                       out_dtype))
        + tt.scratch_bytes(*[((bm, bn), _F32)] * len(weights)))
    y, *pre = tt.pallas_call(
        functools.partial(_forward_kernel, kind=kind, activation=activation,
                          n_weights=len(weights), has_bias=bias is not None, n_pre=n_pre),
        out_shape=[jax.ShapeDtypeStruct((m, n), out_dtype)]
        + [jax.ShapeDtypeStruct((m, n), x.dtype)] * n_pre,
        grid=(m // bm, n // bn, k // bk),
        in_specs=in_specs,
        out_specs=[tile] * (1 + n_pre),
        scratch_shapes=[tt.compat.tpu_vmem((bm, bn), _F32) for _ in weights],
        name=f"{kind}_fwd",
        semantics=("parallel", "parallel", "arbitrary"), interpret=interpret, vmem=vmem,
    )(x, *weights, *([bias] if bias is not None else []))
    return y, pre


# ----------------------------------------------------------------------------------------------
# Backward kernels

def _pre_grad_kernel(dy_ref, *refs, kind, activation, n_pre):
    """dL/d(pre-activation) tiles from dy and the saved pre-activations (elementwise)."""
    pre_refs, dz_refs = refs[:n_pre], refs[n_pre:]
    dy = dy_ref[...].astype(_F32)
    pre = [r[...].astype(_F32) for r in pre_refs]
    for ref, dz in zip(dz_refs, _epilogue_grad(kind, activation, dy, pre)):
        ref[...] = dz.astype(ref.dtype)


def _matmul_kernel(*refs, n_pairs, dims):
    """out tile = sum over pairs of dot_general(a, b, dims), the last grid axis the reduction."""
    a_refs, b_refs = refs[:n_pairs], refs[n_pairs:2 * n_pairs]
    out_ref, acc_ref = refs[2 * n_pairs:]

    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    for a_ref, b_ref in zip(a_refs, b_refs):
        acc_ref[...] += lax.dot_general(a_ref[...], b_ref[...], dims, preferred_element_type=_F32)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _matmul(name, a_list, b_list, a_spec, b_spec, out_shape, out_block, grid, dims, interpret):
    vmem = tt.check_vmem(name, tt.block_bytes(
        *[(a_spec.block_shape, a.dtype) for a in a_list],
        *[(b_spec.block_shape, b.dtype) for b in b_list], (out_block, out_shape.dtype))
        + tt.scratch_bytes((out_block, _F32)))
    return tt.pallas_call(
        functools.partial(_matmul_kernel, n_pairs=len(a_list), dims=dims),
        out_shape=out_shape,
        grid=grid,
        in_specs=[a_spec] * len(a_list) + [b_spec] * len(b_list),
        out_specs=pl.BlockSpec(out_block, lambda i, j, r: (i, j)),
        scratch_shapes=[tt.compat.tpu_vmem(out_block, _F32)],
        name=name,
        semantics=("parallel", "parallel", "arbitrary"), interpret=interpret, vmem=vmem,
    )(*a_list, *b_list)


# Backward wrapper

def backward(kind, activation, x, weights, pre, dy, *, interpret: bool):
    """(dx, [dw per weight], dz of the first weight) for `forward`'s cotangent dy (padded)."""
    (m, k), n = x.shape, dy.shape[1]
    bm, bn, bk = blocks(m, n, k, x.dtype)
    tile = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
    if kind == "dense" and activation == "identity":
        dzs = [dy]
    else:
        vmem = tt.check_vmem(f"{kind} dz", tt.block_bytes(
            *[((bm, bn), x.dtype)] * (1 + len(pre) + len(weights))))
        dzs = tt.pallas_call(
            functools.partial(_pre_grad_kernel, kind=kind, activation=activation,
                              n_pre=len(pre)),
            out_shape=[jax.ShapeDtypeStruct((m, n), x.dtype)] * len(weights),
            grid=(m // bm, n // bn),
            in_specs=[tile] * (1 + len(pre)),
            out_specs=[tile] * len(weights),
            name=f"{kind}_bwd_dz",
            semantics=("parallel", "parallel"), interpret=interpret, vmem=vmem,
        )(dy, *pre)
    dx = _matmul(f"{kind}_bwd_dx", dzs, weights,
                 pl.BlockSpec((bm, bn), lambda i, j, r: (i, r)),
                 pl.BlockSpec((bk, bn), lambda i, j, r: (j, r)),
                 jax.ShapeDtypeStruct((m, k), x.dtype), (bm, bk), (m // bm, k // bk, n // bn),
                 _NT, interpret)
    dws = [_matmul(f"{kind}_bwd_dw", [x], [dz],
                   pl.BlockSpec((bm, bk), lambda i, j, r: (r, i)),
                   pl.BlockSpec((bm, bn), lambda i, j, r: (r, j)),
                   jax.ShapeDtypeStruct((k, n), w.dtype), (bk, bn), (k // bk, n // bn, m // bm),
                   _TN, interpret)
           for w, dz in zip(weights, dzs)]
    return dx, dws, dzs[0]


# ----------------------------------------------------------------------------------------------
# custom_vjp wiring

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _dense(x, weights, bias, kind, activation, out_dtype, interpret):
    return forward(kind, activation, x, weights, bias, out_dtype, save_pre=False,
                   interpret=interpret)[0]


def _dense_fwd(x, weights, bias, kind, activation, out_dtype, interpret):
    y, pre = forward(kind, activation, x, weights, bias, out_dtype, save_pre=True,
                     interpret=interpret)
    return y, (x, weights, bias, pre)


def _dense_bwd(kind, activation, out_dtype, interpret, residuals, dy):
    x, weights, bias, pre = residuals
    dx, dws, dz = backward(kind, activation, x, weights, pre, dy.astype(x.dtype),
                           interpret=interpret)
    db = None
    if bias is not None:  # a row sum, left to XLA
        db = jnp.sum(dz.astype(_F32), axis=0, keepdims=True).astype(bias.dtype)
    return dx, dws, db


_dense.defvjp(_dense_fwd, _dense_bwd)


def _run(kind, activation, x, weights, bias, out_dtype):
    """Flatten, promote and pad to whole blocks, run the kernels, slice and reshape."""
    dtype = jnp.result_type(x, *weights)
    m, (k, n) = math.prod(x.shape[:-1]), weights[0].shape
    if m == 0 or n == 0:
        return jnp.zeros((*x.shape[:-1], n), out_dtype)
    if k == 0:
        raise NotImplementedError("d_in = 0: no matmul to tile, the output is act(bias) alone")
    bm, bn, bk = blocks(m, n, k, dtype)
    mp, np_, kp = tt.round_up(m, bm), tt.round_up(n, bn), tt.round_up(k, bk)
    x2d = tt.pad_axis(tt.pad_axis(x.reshape(m, k).astype(dtype), 0, mp), 1, kp)
    weights = [tt.pad_axis(tt.pad_axis(w.astype(dtype), 0, kp), 1, np_) for w in weights]
    if bias is not None:
        bias = tt.pad_axis(bias.reshape(1, n), 1, np_)
    y = _dense(x2d, weights, bias, kind, activation, jnp.dtype(out_dtype), current().interpret)
    return y[:m, :n].reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------
# The implementations

def dense_act_mosaic_tpu(x, w, b=None, *, activation: str):
    """dense_act through the TPU kernels (same arguments as `dense_act`)."""
    out_dtype = jnp.result_type(x, w, *([b] if b is not None else []))
    return _run("dense", activation, x, [w], b, out_dtype)


def gated_dense_mosaic_tpu(x, w_gate, w_up, *, activation: str):
    """gated_dense through the TPU kernels (same arguments as `gated_dense`)."""
    return _run("gated", activation, x, [w_gate, w_up], None, jnp.result_type(x, w_gate, w_up))
