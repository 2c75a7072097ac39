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

Block sizes: `DenseTpuConfig` (row, column and depth blocks, forward and backward alike);
`config_space` lists the tilings `tuned_config` times on a TPU, `vmem_bytes` estimates a config's
VMEM use.
"""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class DenseTpuConfig:
    """Block sizes of the TPU dense kernels (x [m, k] @ w [k, n]), forward and backward."""
    block_m: int  # rows: a multiple of the dtype's sublane granule
    block_n: int  # output columns: a multiple of 128
    block_k: int  # depth: a multiple of 128 (it is the lane axis of x's blocks)


def default_config(m: int, n: int, k: int, dtype) -> DenseTpuConfig:
    """256 x 256 x 512 MXU-shaped tiles, smaller for small operands."""
    return DenseTpuConfig(tt.fit(m, 256, tt.sublanes(dtype)), tt.fit(n, 256, tt.LANES),
                          tt.fit(k, 512, tt.LANES))


def _vmem_parts(config: DenseTpuConfig, dtype, out_dtype, n_weights: int, n_pre: int) -> list:
    """VMEM estimates of the forward, dz, dx and dw kernels."""
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    matmul = lambda a, b, out, n_pairs: (  # noqa: E731
        tt.block_bytes(*[(a, dtype)] * n_pairs, *[(b, dtype)] * n_pairs, (out, dtype))
        + tt.scratch_bytes((out, _F32)))
    return [tt.block_bytes(((bm, bk), dtype), *[((bk, bn), dtype)] * n_weights,
                           ((1 + n_pre, bm * bn), out_dtype))
            + tt.scratch_bytes(*[((bm, bn), _F32)] * n_weights),
            tt.block_bytes(*[((bm, bn), dtype)] * (1 + n_pre + n_weights)),
            matmul((bm, bn), (bk, bn), (bm, bk), n_weights),
            matmul((bm, bk), (bm, bn), (bk, bn), 1)]


def vmem_bytes(config: DenseTpuConfig, dtype, out_dtype=None, *, n_weights: int = 1,
               n_pre: int | None = None) -> int:
    """VMEM estimate of the largest kernel, forward (saving `n_pre` pre-activations, by default
    one per weight) or backward."""
    n_pre = n_weights if n_pre is None else n_pre
    return max(_vmem_parts(config, dtype, out_dtype or dtype, n_weights, n_pre))


def config_space(m: int, n: int, k: int, dtype, *, n_weights: int = 1) -> list[DenseTpuConfig]:
    """The default and (128 | 256 | 512) rows x (256 | 512) columns x (512 | 1024) depth,
    fitted to the operands, within VMEM."""
    return tt.within_budget(
        default_config(m, n, k, dtype),
        [DenseTpuConfig(bm, bn, bk)
         for bm in tt.block_options(m, (128, 256, 512), tt.sublanes(dtype))
         for bn in tt.block_options(n, (256, 512), tt.LANES)
         for bk in tt.block_options(k, (512, 1024), tt.LANES)],
        lambda c: vmem_bytes(c, dtype, n_weights=n_weights))


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

def forward(kind, activation, x, weights, bias, out_dtype, *, save_pre: bool,
            config: DenseTpuConfig, interpret: bool):
    """Padded x [m, k], weights [k, n] each, bias [1, n] -> (y [m, n], saved pre-activations)."""
    (m, k), n = x.shape, weights[0].shape[1]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    n_pre = _saves_pre(kind, activation) if save_pre else 0
    tile = pl.BlockSpec((bm, bn), lambda i, j, r: (i, j))
    in_specs = ([pl.BlockSpec((bm, bk), lambda i, j, r: (i, r))]
                + [pl.BlockSpec((bk, bn), lambda i, j, r: (r, j))] * len(weights)
                + [pl.BlockSpec((1, bn), lambda i, j, r: (0, j))] * (bias is not None))
    vmem = tt.check_vmem(f"{kind} forward", _vmem_parts(config, x.dtype, out_dtype,
                                                         len(weights), n_pre)[0])
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


def _matmul(name, a_list, b_list, a_spec, b_spec, out_shape, out_block, grid, dims, interpret,
            vmem):
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

def backward(kind, activation, x, weights, pre, dy, *, config: DenseTpuConfig, interpret: bool):
    """(dx, [dw per weight], dz of the first weight) for `forward`'s cotangent dy (padded)."""
    (m, k), n = x.shape, dy.shape[1]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    _, dz_vmem, dx_vmem, dw_vmem = _vmem_parts(config, x.dtype, x.dtype, len(weights), len(pre))
    tile = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
    if kind == "dense" and activation == "identity":
        dzs = [dy]
    else:
        vmem = tt.check_vmem(f"{kind} dz", dz_vmem)
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
                 _NT, interpret, tt.check_vmem(f"{kind}_bwd_dx", dx_vmem))
    dws = [_matmul(f"{kind}_bwd_dw", [x], [dz],
                   pl.BlockSpec((bm, bk), lambda i, j, r: (r, i)),
                   pl.BlockSpec((bm, bn), lambda i, j, r: (r, j)),
                   jax.ShapeDtypeStruct((k, n), w.dtype), (bk, bn), (k // bk, n // bn, m // bm),
                   _TN, interpret, tt.check_vmem(f"{kind}_bwd_dw", dw_vmem))
           for w, dz in zip(weights, dzs)]
    return dx, dws, dzs[0]


# ----------------------------------------------------------------------------------------------
# custom_vjp wiring

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _dense(x, weights, bias, kind, activation, out_dtype, config, interpret):
    return forward(kind, activation, x, weights, bias, out_dtype, save_pre=False, config=config,
                   interpret=interpret)[0]


def _dense_fwd(x, weights, bias, kind, activation, out_dtype, config, interpret):
    y, pre = forward(kind, activation, x, weights, bias, out_dtype, save_pre=True, config=config,
                     interpret=interpret)
    return y, (x, weights, bias, pre)


def _dense_bwd(kind, activation, out_dtype, config, interpret, residuals, dy):
    x, weights, bias, pre = residuals
    dx, dws, dz = backward(kind, activation, x, weights, pre, dy.astype(x.dtype), config=config,
                           interpret=interpret)
    db = None
    if bias is not None:  # a row sum, left to XLA
        db = jnp.sum(dz.astype(_F32), axis=0, keepdims=True).astype(bias.dtype)
    return dx, dws, db


_dense.defvjp(_dense_fwd, _dense_bwd)


def _run(kind, activation, x, weights, bias, out_dtype, config, run, args):
    """Flatten, promote and pad to whole blocks, run the kernels, slice and reshape; without a
    `config`, the one `tuned_config` measures for `run(*args, activation=activation)`."""
    dtype = jnp.result_type(x, *weights)
    m, (k, n) = math.prod(x.shape[:-1]), weights[0].shape
    if m == 0 or n == 0:
        return jnp.zeros((*x.shape[:-1], n), out_dtype)
    if k == 0:
        raise NotImplementedError("d_in = 0: no matmul to tile, the output is act(bias) alone")
    if config is None:
        op = "dense_act" if kind == "dense" else "gated_dense"
        config = tt.tuned(f"{op}/{activation}/mosaic_tpu", run, args,
                          {"activation": activation},
                          config_space(m, n, k, dtype, n_weights=len(weights)),
                          default_config(m, n, k, dtype))
    mp, np_, kp = (tt.round_up(m, config.block_m), tt.round_up(n, config.block_n),
                   tt.round_up(k, config.block_k))
    x2d = tt.pad_axis(tt.pad_axis(x.reshape(m, k).astype(dtype), 0, mp), 1, kp)
    weights = [tt.pad_axis(tt.pad_axis(w.astype(dtype), 0, kp), 1, np_) for w in weights]
    if bias is not None:
        bias = tt.pad_axis(bias.reshape(1, n), 1, np_)
    y = _dense(x2d, weights, bias, kind, activation, jnp.dtype(out_dtype), config,
               current().interpret)
    return y[:m, :n].reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------
# The implementations

def dense_act_mosaic_tpu(x, w, b=None, *, activation: str, config: DenseTpuConfig | None = None):
    """dense_act through the TPU kernels (same arguments as `dense_act`); `config` fixes the
    block sizes (else tuned on a TPU, or `default_config`)."""
    out_dtype = jnp.result_type(x, w, *([b] if b is not None else []))
    return _run("dense", activation, x, [w], b, out_dtype, config, dense_act_mosaic_tpu,
                (x, w, b))


def gated_dense_mosaic_tpu(x, w_gate, w_up, *, activation: str,
                           config: DenseTpuConfig | None = None):
    """gated_dense through the TPU kernels (same arguments as `gated_dense`); `config` fixes the
    block sizes (else tuned on a TPU, or `default_config`)."""
    return _run("gated", activation, x, [w_gate, w_up], None, jnp.result_type(x, w_gate, w_up),
                config, gated_dense_mosaic_tpu, (x, w_gate, w_up))
