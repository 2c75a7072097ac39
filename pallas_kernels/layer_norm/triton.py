"""LayerNorm and RMSNorm in Pallas for GPUs (Triton): forward and backward kernels, their
wrappers, the custom_vjp wiring and the "pallas" implementation of `layer_norm`.

The kernels also serve RMSNorm (`centered=False`, see rms_norm/triton.py): the two differ only in
whether the mean is subtracted.

Forward: one program per block of rows; a row lives whole in registers (padded to a power of two
and masked), so statistics take two passes over registers, not over memory. Backward: a fixed
number of programs, each looping over its own contiguous rows, writes dx and one partial row of
dscale and dbias; the partials ([programs, features], far smaller than the input) are summed
afterwards. Nothing larger than the input is materialised.

`eps` is an operand (a [1] float32 array), so it may be traced; when it is, the backward also
writes partial rows of d(loss)/d(eps), summed like dscale's.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _pallas_compat as compat
from pallas_kernels._dispatch import interpret_mode, tuned_config


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Block sizes for the LayerNorm/RMSNorm kernels."""
    block_rows: int  # rows per program in the forward kernel (a power of two)
    bwd_block_rows: int  # rows per loop step in the backward kernel (a power of two)
    bwd_programs: int  # upper bound on backward programs, hence on partial dscale/dbias rows
    num_warps: int = 4


def norm_config_heuristic(n_rows: int, n_cols: int) -> NormConfig:
    width = pl.next_power_of_2(n_cols)
    rows = max(1, min(64, 4096 // width, pl.next_power_of_2(n_rows)))
    warps = max(1, min(16, rows * width // 1024))
    return NormConfig(block_rows=rows, bwd_block_rows=rows, bwd_programs=512,
                      num_warps=pl.next_power_of_2(warps))


def norm_config_space(n_rows: int, n_cols: int) -> list[NormConfig]:
    width = pl.next_power_of_2(n_cols)
    space = []
    for rows in (1, 2, 4, 8, 16):
        for warps in (4, 8):
            if 512 <= rows * width <= 32768 and rows <= pl.next_power_of_2(n_rows):
                space.append(NormConfig(rows, rows, 512, warps))
    return space


def _masks(row0, block_rows: int, width: int, n_rows: int, n_cols: int):
    rows = row0 + jnp.arange(block_rows)
    row_mask = rows < n_rows
    col_mask = jnp.arange(width) < n_cols
    return row_mask, col_mask, row_mask[:, None] & col_mask[None, :]


# ----------------------------------------------------------------------------------------------
# Forward kernel

def _norm_forward_kernel(*refs, centered: bool, has_scale: bool, has_bias: bool,
                         n_rows: int, n_cols: int):
    refs = iter(refs)
    x_ref, eps_ref = next(refs), next(refs)
    scale_ref = next(refs) if has_scale else None
    bias_ref = next(refs) if has_bias else None
    y_ref = next(refs)
    mean_ref = next(refs) if centered else None
    rstd_ref = next(refs)

    block_rows, width = x_ref.shape
    row_mask, col_mask, mask = _masks(pl.program_id(0) * block_rows, block_rows, width,
                                      n_rows, n_cols)
    x = plgpu.load(x_ref, mask=mask, other=0.0).astype(jnp.float32)
    if centered:
        mean = jnp.sum(x, axis=1) / n_cols
        x = jnp.where(mask, x - mean[:, None], 0.0)
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1) / n_cols + eps_ref[0])
    y = x * rstd[:, None]
    if has_scale:
        y = y * plgpu.load(scale_ref, mask=col_mask, other=0.0).astype(jnp.float32)[None, :]
    if has_bias:
        y = y + plgpu.load(bias_ref, mask=col_mask, other=0.0).astype(jnp.float32)[None, :]
    plgpu.store(y_ref, y.astype(y_ref.dtype), mask=mask)
    if centered:
        plgpu.store(mean_ref, mean, mask=row_mask)
    plgpu.store(rstd_ref, rstd, mask=row_mask)


# Forward wrapper

def norm_forward(x, scale, bias, eps, *, centered: bool, config: NormConfig):
    """x: [rows, features], eps: [1] float32 -> (y, mean or None, rstd); statistics are float32
    [rows]."""
    n_rows, n_cols = x.shape
    width = pl.next_power_of_2(n_cols)
    block_rows = config.block_rows
    row_block = pl.BlockSpec((block_rows, width), lambda i: (i, 0))
    vector = pl.BlockSpec((width,), lambda i: (0,))
    scalar = pl.BlockSpec((1,), lambda i: (0,))
    stat = pl.BlockSpec((block_rows,), lambda i: (i,))
    stat_shape = jax.ShapeDtypeStruct((n_rows,), jnp.float32)
    operands = [x, eps] + [a for a in (scale, bias) if a is not None]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)] + [stat_shape] * (2 if centered else 1)
    interpret = interpret_mode()
    kernel = functools.partial(
        _norm_forward_kernel, centered=centered, has_scale=scale is not None,
        has_bias=bias is not None, n_rows=n_rows, n_cols=n_cols)
    outs = compat.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n_rows, block_rows),),
        in_specs=[row_block, scalar] + [vector] * (len(operands) - 2),
        out_specs=[row_block] + [stat] * (len(out_shape) - 1),
        compiler_params=compat.gpu_compiler_params(num_warps=config.num_warps, num_stages=1,
                                                   interpret=interpret),
        interpret=interpret,
        name="layer_norm_fwd" if centered else "rms_norm_fwd",
    )(*operands)
    if centered:
        return outs[0], outs[1], outs[2]
    return outs[0], None, outs[1]


# ----------------------------------------------------------------------------------------------
# Backward kernel

def _norm_backward_kernel(*refs, centered: bool, has_scale: bool, has_bias: bool, eps_grad: bool,
                          n_rows: int, n_cols: int, block_rows: int):
    refs = iter(refs)
    x_ref, dy_ref = next(refs), next(refs)
    mean_ref = next(refs) if centered else None
    rstd_ref = next(refs)
    scale_ref = next(refs) if has_scale else None
    dx_ref = next(refs)
    dscale_ref = next(refs) if has_scale else None
    dbias_ref = next(refs) if has_bias else None
    deps_ref = next(refs) if eps_grad else None

    rows_per_program, width = x_ref.shape
    first_row = pl.program_id(0) * rows_per_program
    col_mask = jnp.arange(width) < n_cols
    scale = (plgpu.load(scale_ref, mask=col_mask, other=0.0).astype(jnp.float32)
             if has_scale else None)

    def step(s, sums):
        dscale_sum, dbias_sum, deps_sum = sums
        r0 = pl.multiple_of(s * block_rows, block_rows)
        row_mask, _, mask = _masks(first_row + r0, block_rows, width, n_rows, n_cols)
        rows = pl.ds(r0, block_rows)
        x = plgpu.load(x_ref.at[rows, :], mask=mask, other=0.0).astype(jnp.float32)
        dy = plgpu.load(dy_ref.at[rows, :], mask=mask, other=0.0).astype(jnp.float32)
        rstd = plgpu.load(rstd_ref.at[rows], mask=row_mask, other=0.0)
        if centered:
            mean = plgpu.load(mean_ref.at[rows], mask=row_mask, other=0.0)
            x = x - mean[:, None]
        xhat = jnp.where(mask, x * rstd[:, None], 0.0)
        g = dy * scale[None, :] if has_scale else dy
        dx = g - xhat * (jnp.sum(g * xhat, axis=1) / n_cols)[:, None]
        # d(rstd)/d(eps) = -rstd**3 / 2, so d(loss)/d(eps) sums -rstd**2 / 2 * g * xhat.
        if centered:
            dx = dx - (jnp.sum(g, axis=1) / n_cols)[:, None]
        plgpu.store(dx_ref.at[rows, :], (dx * rstd[:, None]).astype(dx_ref.dtype), mask=mask)
        return (dscale_sum + jnp.sum(dy * xhat, axis=0), dbias_sum + jnp.sum(dy, axis=0),
                deps_sum - 0.5 * jnp.sum((rstd * rstd)[:, None] * g * xhat, axis=0))

    zeros = jnp.zeros((width,), jnp.float32)
    dscale_sum, dbias_sum, deps_sum = lax.fori_loop(0, rows_per_program // block_rows, step,
                                                    (zeros, zeros, zeros))
    if has_scale:
        plgpu.store(dscale_ref, dscale_sum, mask=col_mask)
    if has_bias:
        plgpu.store(dbias_ref, dbias_sum, mask=col_mask)
    if eps_grad:
        plgpu.store(deps_ref, deps_sum, mask=col_mask)


# Backward wrapper

def norm_backward(x, scale, bias, mean, rstd, dy, *, centered: bool, eps_grad: bool,
                  config: NormConfig):
    """Gradients (dx, dscale or None, dbias or None, deps: [1] float32 if `eps_grad` else None)
    of `norm_forward`'s y, given dy."""
    n_rows, n_cols = x.shape
    width = pl.next_power_of_2(n_cols)
    block_rows = config.bwd_block_rows
    steps = pl.cdiv(pl.cdiv(n_rows, block_rows), config.bwd_programs)
    rows_per_program = steps * block_rows
    programs = pl.cdiv(n_rows, rows_per_program)
    rows_block = pl.BlockSpec((rows_per_program, width), lambda p: (p, 0))
    stat_block = pl.BlockSpec((rows_per_program,), lambda p: (p,))
    vector = pl.BlockSpec((width,), lambda p: (0,))
    partial_row = pl.BlockSpec((compat.squeezed, width), lambda p: (p, 0))
    partial_shape = jax.ShapeDtypeStruct((programs, n_cols), jnp.float32)

    operands = [x, dy] + ([mean] if centered else []) + [rstd]
    in_specs = [rows_block, rows_block] + [stat_block] * (len(operands) - 2)
    if scale is not None:
        operands.append(scale)
        in_specs.append(vector)
    n_partials = (scale is not None) + (bias is not None) + eps_grad
    interpret = interpret_mode()
    kernel = functools.partial(
        _norm_backward_kernel, centered=centered, has_scale=scale is not None,
        has_bias=bias is not None, eps_grad=eps_grad, n_rows=n_rows, n_cols=n_cols,
        block_rows=block_rows)
    dx, *partials = compat.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] + [partial_shape] * n_partials,
        grid=(programs,),
        in_specs=in_specs,
        out_specs=[rows_block] + [partial_row] * n_partials,
        compiler_params=compat.gpu_compiler_params(num_warps=config.num_warps, num_stages=1,
                                                   interpret=interpret),
        interpret=interpret,
        name="layer_norm_bwd" if centered else "rms_norm_bwd",
    )(*operands)
    partials = iter(partials)
    dscale = next(partials).sum(axis=0).astype(scale.dtype) if scale is not None else None
    dbias = next(partials).sum(axis=0).astype(bias.dtype) if bias is not None else None
    deps = next(partials).sum().reshape(1) if eps_grad else None
    return dx, dscale, dbias, deps


# ----------------------------------------------------------------------------------------------
# custom_vjp wiring

def eps_operand(eps):
    """(eps as a [1] float32 array, whether its gradient may be asked for: only a traced eps
    can be differentiated, and only then does the backward compute it)."""
    return jnp.asarray(eps, jnp.float32).reshape(1), isinstance(eps, jax.core.Tracer)


def eps_cotangent(deps):
    return jnp.zeros((1,), jnp.float32) if deps is None else deps


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _layer_norm_pallas(x, scale, bias, eps, eps_grad, config):
    return norm_forward(x, scale, bias, eps, centered=True, config=config)[0]


def _layer_norm_pallas_fwd(x, scale, bias, eps, eps_grad, config):
    y, mean, rstd = norm_forward(x, scale, bias, eps, centered=True, config=config)
    return y, (x, scale, bias, mean, rstd)


def _layer_norm_pallas_bwd(eps_grad, config, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    dx, dscale, dbias, deps = norm_backward(x, scale, bias, mean, rstd, dy, centered=True,
                                            eps_grad=eps_grad, config=config)
    return dx, dscale, dbias, eps_cotangent(deps)


_layer_norm_pallas.defvjp(_layer_norm_pallas_fwd, _layer_norm_pallas_bwd)


# ----------------------------------------------------------------------------------------------
# The implementation

def layer_norm_pallas(x, scale=None, bias=None, *, eps: float, config: NormConfig | None = None):
    """LayerNorm through the Pallas kernels; `config` fixes block sizes (else tuned/heuristic)."""
    if x.size == 0:
        return jnp.zeros_like(x)
    n_cols = x.shape[-1]
    x2d = x.reshape(-1, n_cols)
    if config is None:
        config = tuned_config("layer_norm/pallas", layer_norm_pallas, (x, scale, bias),
                              {"eps": eps}, norm_config_space(*x2d.shape),
                              norm_config_heuristic(*x2d.shape))
    return _layer_norm_pallas(x2d, scale, bias, *eps_operand(eps), config).reshape(x.shape)
