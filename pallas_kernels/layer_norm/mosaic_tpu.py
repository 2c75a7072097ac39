"""LayerNorm and RMSNorm in Pallas for TPUs (Mosaic): forward and backward kernels, their
wrappers, the custom_vjp wiring and the TPU "pallas" implementation of `layer_norm`.

Blocks are (block_rows, features): a whole row per block, so the statistics need no second pass
over memory. Rows are padded to whole blocks (zero rows, whose outputs are sliced off and whose
gradients are zero). The backward writes dx per row block and accumulates the weight and bias
gradients (and that of a traced eps) across row blocks in float32 output blocks that stay in
VMEM, so its grid axis is a reduction ("arbitrary"). RMSNorm (`centered=False`) is the same
kernel without the mean.

Block sizes: `NormTpuConfig` (rows per block, forward and backward); `config_space` lists the
tilings `tuned_config` times on a TPU, `vmem_bytes` estimates a config's VMEM use.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _tpu_tiles as tt
from pallas_kernels._target import current
from pallas_kernels.layer_norm.triton import eps_cotangent, eps_operand

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class NormTpuConfig:
    """Block size of the TPU norm kernels: whole rows, `block_rows` of them (a multiple of the
    dtype's sublane granule), in the forward and the backward alike."""
    block_rows: int


def default_config(n_rows: int, n_cols: int, dtype) -> NormTpuConfig:
    """About 1 MiB of float32 row data per block, at most 512 rows."""
    granule = tt.sublanes(dtype)
    cap = max(granule, (1 << 18) // max(1, n_cols) // granule * granule)
    return NormTpuConfig(tt.fit(n_rows, min(cap, 512), granule))


def _vmem_parts(config: NormTpuConfig, n_cols: int, dtype, param_dtypes=()) -> tuple[int, int]:
    """(forward, backward) VMEM estimates; `param_dtypes`: those of the scale and bias given."""
    br = config.block_rows
    forward = tt.block_bytes(((br, n_cols), dtype), ((br, n_cols), dtype), ((br, n_cols), _F32),
                             *(((1, n_cols), p) for p in param_dtypes))
    backward = tt.block_bytes(((br, n_cols), dtype), ((br, n_cols), dtype), ((br, n_cols), dtype),
                              ((br, n_cols), _F32), ((br, n_cols), _F32), ((3, n_cols), _F32))
    return forward, backward


def vmem_bytes(config: NormTpuConfig, n_cols: int, dtype, param_dtypes=()) -> int:
    """VMEM estimate of the larger kernel, forward or backward."""
    return max(_vmem_parts(config, n_cols, dtype, param_dtypes))


def config_space(n_rows: int, n_cols: int, dtype, param_dtypes=()) -> list[NormTpuConfig]:
    """The default and 64 to 1024 rows per block, fitted to the rows, within VMEM."""
    return tt.within_budget(
        default_config(n_rows, n_cols, dtype),
        [NormTpuConfig(br) for br in tt.block_options(n_rows, (64, 128, 256, 512, 1024),
                                                      tt.sublanes(dtype))],
        lambda c: vmem_bytes(c, n_cols, dtype, param_dtypes))


# ----------------------------------------------------------------------------------------------
# Forward kernel

def _forward_kernel(*refs, centered: bool, has_scale: bool, has_bias: bool, n_cols: int):
    refs = list(refs)
    x_ref, eps_ref = refs.pop(0), refs.pop(0)
    scale_ref = refs.pop(0) if has_scale else None
    bias_ref = refs.pop(0) if has_bias else None
    y_ref, mean_ref, rstd_ref = refs
    x = x_ref[...].astype(_F32)
    mean = jnp.sum(x, axis=1, keepdims=True) / n_cols if centered else jnp.zeros_like(x[:, :1])
    xc = x - mean
    rstd = jax.lax.rsqrt(jnp.sum(xc * xc, axis=1, keepdims=True) / n_cols + eps_ref[...])
    y = xc * rstd
    if has_scale:
        y = y * scale_ref[...].astype(_F32)
    if has_bias:
        y = y + bias_ref[...].astype(_F32)
    y_ref[...] = y.astype(y_ref.dtype)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


# Forward wrapper

def norm_forward(x, scale, bias, eps, *, centered: bool, config: NormTpuConfig, interpret: bool):
    """x [rows, features] (rows padded to whole blocks), eps [1, 1] float32 -> (y, mean, rstd),
    the statistics float32 [rows, 1] (mean zero when not centered)."""
    n_rows, n_cols = x.shape
    br = config.block_rows
    rows = pl.BlockSpec((br, n_cols), lambda i: (i, 0))
    stat = pl.BlockSpec((br, 1), lambda i: (i, 0))
    vector = pl.BlockSpec((1, n_cols), lambda i: (0, 0))
    params = [p.reshape(1, n_cols) for p in (scale, bias) if p is not None]
    vmem = tt.check_vmem("norm forward", _vmem_parts(config, n_cols, x.dtype,
                                                     [p.dtype for p in params])[0])
    stat_shape = jax.ShapeDtypeStruct((n_rows, 1), _F32)
    return tt.pallas_call(
        functools.partial(_forward_kernel, centered=centered, has_scale=scale is not None,
                          has_bias=bias is not None, n_cols=n_cols),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), stat_shape, stat_shape),
        grid=(n_rows // br,),
        in_specs=[rows, pl.BlockSpec((1, 1), lambda i: (0, 0))] + [vector] * len(params),
        out_specs=(rows, stat, stat),
        name="layer_norm_fwd" if centered else "rms_norm_fwd",
        semantics=("parallel",), interpret=interpret, vmem=vmem,
    )(x, eps, *params)


# ----------------------------------------------------------------------------------------------
# Backward kernel

def _backward_kernel(*refs, has_scale: bool, centered: bool, n_cols: int):
    refs = list(refs)
    x_ref, dy_ref, mean_ref, rstd_ref = refs[:4]
    scale_ref = refs[4] if has_scale else None
    dx_ref, dscale_ref, dbias_ref, deps_ref = refs[4 + has_scale:]

    @pl.when(pl.program_id(0) == 0)
    def _():
        dscale_ref[...] = jnp.zeros_like(dscale_ref)
        dbias_ref[...] = jnp.zeros_like(dbias_ref)
        deps_ref[...] = jnp.zeros_like(deps_ref)

    rstd = rstd_ref[...]
    xhat = (x_ref[...].astype(_F32) - mean_ref[...]) * rstd
    dy = dy_ref[...].astype(_F32)
    g = dy * scale_ref[...].astype(_F32) if has_scale else dy
    gx = jnp.sum(g * xhat, axis=1, keepdims=True)
    dx = g - xhat * (gx / n_cols)
    if centered:
        dx = dx - jnp.sum(g, axis=1, keepdims=True) / n_cols
    dx_ref[...] = (dx * rstd).astype(dx_ref.dtype)
    dscale_ref[...] += jnp.sum(dy * xhat, axis=0, keepdims=True)
    dbias_ref[...] += jnp.sum(dy, axis=0, keepdims=True)
    # d(rstd)/d(eps) = -rstd**3 / 2, so d(loss)/d(eps) sums -rstd**2 / 2 * g * xhat.
    deps_ref[...] += jnp.sum(-0.5 * rstd * rstd * gx, axis=0, keepdims=True)


# Backward wrapper

def norm_backward(x, scale, mean, rstd, dy, *, centered: bool, config: NormTpuConfig,
                  interpret: bool):
    """(dx, dscale [features] f32, dbias [features] f32, deps [1] f32) for `norm_forward`."""
    n_rows, n_cols = x.shape
    br = config.block_rows
    rows = pl.BlockSpec((br, n_cols), lambda i: (i, 0))
    stat = pl.BlockSpec((br, 1), lambda i: (i, 0))
    vector = pl.BlockSpec((1, n_cols), lambda i: (0, 0))
    operands = [x, dy, mean, rstd] + ([scale.reshape(1, n_cols)] if scale is not None else [])
    vmem = tt.check_vmem("norm backward", _vmem_parts(config, n_cols, x.dtype)[1])
    vec_shape = jax.ShapeDtypeStruct((1, n_cols), _F32)
    dx, dscale, dbias, deps = tt.pallas_call(
        functools.partial(_backward_kernel, has_scale=scale is not None, centered=centered,
                          n_cols=n_cols),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), vec_shape, vec_shape,
                   jax.ShapeDtypeStruct((1, 1), _F32)),
        grid=(n_rows // br,),
        in_specs=[rows, rows, stat, stat] + [vector] * (scale is not None),
        out_specs=(rows, vector, vector, pl.BlockSpec((1, 1), lambda i: (0, 0))),
        name="layer_norm_bwd" if centered else "rms_norm_bwd",
        semantics=("arbitrary",), interpret=interpret, vmem=vmem,
    )(*operands)
    return dx, dscale[0], dbias[0], deps.reshape(1)


# ----------------------------------------------------------------------------------------------
# custom_vjp wiring

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _norm(x, scale, bias, eps, centered, eps_grad, config, interpret):
    return norm_forward(x, scale, bias, eps, centered=centered, config=config,
                        interpret=interpret)[0]


def _norm_fwd(x, scale, bias, eps, centered, eps_grad, config, interpret):
    y, mean, rstd = norm_forward(x, scale, bias, eps, centered=centered, config=config,
                                 interpret=interpret)
    return y, (x, scale, bias, mean, rstd)


def _norm_bwd(centered, eps_grad, config, interpret, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    dx, dscale, dbias, deps = norm_backward(x, scale, mean, rstd, dy, centered=centered,
                                            config=config, interpret=interpret)
    return (dx, None if scale is None else dscale.astype(scale.dtype),
            None if bias is None else dbias.astype(bias.dtype),
            eps_cotangent(deps if eps_grad else None).reshape(1, 1))


_norm.defvjp(_norm_fwd, _norm_bwd)


def norm_mosaic_tpu(x, scale, bias, eps, *, centered: bool, config: NormTpuConfig | None,
                    what: str, run, args, kwargs):
    """LayerNorm (centered) or RMSNorm over the last axis through the TPU kernels; without a
    `config`, the one `tuned_config` measures for `run(*args, **kwargs)` under `what`."""
    if x.size == 0:
        return jnp.zeros_like(x)
    n_cols = x.shape[-1]
    x2d = x.reshape(-1, n_cols)
    n_rows = x2d.shape[0]
    if config is None:
        params = [p.dtype for p in (scale, bias) if p is not None]
        config = tt.tuned(what, run, args, kwargs, config_space(n_rows, n_cols, x.dtype, params),
                          default_config(n_rows, n_cols, x.dtype))
    eps_value, eps_grad = eps_operand(eps)
    y = _norm(tt.pad_axis(x2d, 0, tt.round_up(n_rows, config.block_rows)), scale, bias,
              eps_value.reshape(1, 1), centered, eps_grad, config, current().interpret)
    return y[:n_rows].reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# The implementation

def layer_norm_mosaic_tpu(x, scale=None, bias=None, *, eps: float,
                          config: NormTpuConfig | None = None):
    """LayerNorm through the TPU kernels (same arguments as `layer_norm`); `config` fixes the
    block size (else tuned on a TPU, or `default_config`)."""
    return norm_mosaic_tpu(x, scale, bias, eps, centered=True, config=config,
                           what="layer_norm/mosaic_tpu", run=layer_norm_mosaic_tpu,
                           args=(x, scale, bias), kwargs={"eps": eps})
