"""Flash attention in Pallas for TPUs (Mosaic): forward and backward kernels, their wrappers, the
custom_vjp wiring and the TPU "pallas" implementation of `attention`.

Arrays are laid out (batch, heads, seq, head_dim) inside, so a block's last two dimensions are
(seq block, whole head_dim). Forward: grid (batch, heads, query blocks, key blocks), the key
axis a reduction; the running max, sum and output accumulate in float32 VMEM scratch and the
last key block writes the output and the row statistics (max, 1 / sum). Backward: a dQ kernel
(grid as the forward's) and a dK/dV kernel (grid (batch, kv heads, key blocks, group heads x
query blocks), the last axis a reduction), both recomputing probabilities from the statistics.
Grouped-query attention is in the index maps (query head h reads kv head h // group). Causal
grids skip the compute of blocks above the diagonal, and their key/value index maps repeat the
last needed block so that no DMA is spent on skipped ones. Sequences are padded to whole blocks
and the padding masked; rows without keys give zeros. A full-size bias's gradient is the dQ
kernel's dS tiles, written in the (padded) bias's dtype. A bias that broadcasts along some axes
gets its gradient from a dbias kernel whose grid puts those axes last, as reductions into a float32
VMEM accumulator (its own tiles recompute dS), so no full-size dS array exists.

Block sizes: `AttentionTpuConfig` (query and key block); `config_space` lists the tilings
`tuned_config` times on a TPU, `vmem_bytes` estimates a config's VMEM use.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _pallas_compat as compat
from pallas_kernels import _tpu_tiles as tt
from pallas_kernels._target import current
from pallas_kernels.attention.common import canonicalize

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class _Plan(NamedTuple):
    """Everything static the kernels need (hashable: a custom_vjp nondiff argument)."""
    group: int
    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    head_dim: int
    scale: float
    causal: bool
    mask: tuple | None  # which of (batch, heads, q, kv) the mask has in full; None: no mask
    bias: tuple | None
    interpret: bool

    @property
    def offset(self) -> int:
        """Causal diagonal: query i sees key j iff j <= i + offset."""
        return self.kv_len - self.q_len

    @property
    def kv_padded(self) -> bool:
        return self.kv_len % self.block_k != 0


@dataclasses.dataclass(frozen=True)
class AttentionTpuConfig:
    """Block sizes of the TPU attention kernels (forward and backward alike)."""
    block_q: int  # query rows per block: a multiple of the dtype's sublane granule
    block_k: int  # keys per block: a multiple of 128


def default_config(q_len: int, kv_len: int, dtype) -> AttentionTpuConfig:
    """128 x 128 tiles, smaller query blocks for short sequences."""
    return AttentionTpuConfig(tt.fit(q_len, 128, tt.sublanes(dtype)), tt.fit(kv_len, 128, tt.LANES))


def _vmem_parts(config: AttentionTpuConfig, head_dim: int, dtype, extra_dtypes) -> tuple[int, int]:
    """(forward, backward) VMEM estimates; the dbias kernel needs less than the dQ one."""
    bq, bk, d = config.block_q, config.block_k, head_dim
    extras = [((bq, bk), e) for e in extra_dtypes]
    forward = (tt.block_bytes(((bq, d), dtype), ((bk, d), dtype), ((bk, d), dtype),
                              ((bq, d), dtype), *extras, ((bq, 2), _F32))
               + tt.scratch_bytes(((bq, d + 2), _F32)) + 3 * bq * bk * 4)
    backward = (tt.block_bytes(((bq, d), dtype), ((bk, d), dtype), ((bk, d), dtype),
                               ((bq, d), dtype), ((bq, d), dtype), ((bk, d), dtype),
                               ((bk, d), dtype), ((bq, bk), _F32), *extras, ((bq, 3), _F32))
                + tt.scratch_bytes(((2 * bk + bq, d), _F32)) + 4 * bq * bk * 4)
    return forward, backward


def vmem_bytes(config: AttentionTpuConfig, head_dim: int, dtype, extra_dtypes=()) -> int:
    """VMEM estimate of the largest kernel, forward or backward; `extra_dtypes`: the in-kernel
    dtypes of a mask (int32) and a bias (float32) when present (counted as full tiles)."""
    return max(_vmem_parts(config, head_dim, dtype, extra_dtypes))


def config_space(q_len: int, kv_len: int, head_dim: int, dtype,
                 extra_dtypes=()) -> list[AttentionTpuConfig]:
    """The default and every (128 | 256 | 512)^2 tiling fitted to the sequences, within VMEM."""
    caps = (128, 256, 512)
    return tt.within_budget(
        default_config(q_len, kv_len, dtype),
        [AttentionTpuConfig(bq, bk) for bq in tt.block_options(q_len, caps, tt.sublanes(dtype))
         for bk in tt.block_options(kv_len, caps, tt.LANES)],
        lambda c: vmem_bytes(c, head_dim, dtype, extra_dtypes))


def _div(a, b: int):
    """a // b for traced int32 a >= 0 and a static b. Truncating division: Mosaic's floor
    division asks the TPU generation, which a host lowering for export does not have."""
    return lax.div(a, jnp.int32(b))


def _last_key_block(plan: _Plan, i):
    """The last key block query block i sees under the causal mask (-1: none)."""
    last_row = i * plan.block_q + plan.block_q - 1 + plan.offset
    return _div(jnp.maximum(last_row + plan.block_k, 0), plan.block_k) - 1


def _needed(plan: _Plan, i, j):
    return j <= _last_key_block(plan, i) if plan.causal else True


def _kv_index(plan: _Plan, i, j):
    """Key block to fetch: j, or under causal masking the last needed one for skipped blocks."""
    if not plan.causal:
        return j
    return jnp.maximum(jnp.minimum(j, _last_key_block(plan, i)), 0)


def _extra_spec(layout, plan: _Plan, index):
    """BlockSpec of a 4-D mask or bias; `index(*grid) -> (b, h, i, j)`."""
    sq = compat.squeezed
    shape = (sq, sq, plan.block_q if layout[2] else 1, plan.block_k if layout[3] else 1)

    def index_map(*grid):
        b, h, i, j = index(*grid)
        return tuple(x if full else 0 for x, full in zip((b, h, i, j), layout))

    return pl.BlockSpec(shape, index_map)


def _logits(plan: _Plan, q, k, mask_ref, bias_ref, i, j):
    """Scaled logits of the (i, j) tile with bias added and every mask applied (-inf)."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=_F32) * plan.scale
    if bias_ref is not None:
        s = s + bias_ref[...].astype(_F32)
    shape = s.shape
    keep = None if mask_ref is None else jnp.broadcast_to(mask_ref[...] != 0, shape)
    if plan.causal or plan.kv_padded:
        cols = j * plan.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
        cond = cols < plan.kv_len
        if plan.causal:
            rows = i * plan.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
            cond = cond & (cols <= rows + plan.offset)
        keep = cond if keep is None else keep & cond
    return s if keep is None else jnp.where(keep, s, -jnp.inf)


def _split(refs, plan: _Plan):
    q_ref, k_ref, v_ref, *rest = refs
    mask_ref = rest.pop(0) if plan.mask is not None else None
    bias_ref = rest.pop(0) if plan.bias is not None else None
    return q_ref, k_ref, v_ref, mask_ref, bias_ref, rest


# ---------------------------------------------------------------------------------------------
# Forward kernel


def _fwd_kernel(*refs, plan: _Plan):
    q_ref, k_ref, v_ref, mask_ref, bias_ref, rest = _split(refs, plan)
    o_ref, m_out, inv_l_out, m_ref, l_ref, acc_ref = rest
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(_needed(plan, i, j))
    def _():
        s = _logits(plan, q_ref[...], k_ref[...], mask_ref, bias_ref, i, j)
        m_old = m_ref[...]
        m_new = jnp.maximum(m_old, jnp.max(s, axis=1, keepdims=True))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - shift)
        alpha = jnp.exp(m_old - shift)
        l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_ref[...] = acc_ref[...] * alpha + lax.dot_general(
            p.astype(v.dtype), v, _NN, preferred_element_type=_F32)
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        l = l_ref[...]
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_ref[...] / l_safe).astype(o_ref.dtype)
        # +inf for rows without keys: the backward's exp(s - m) is then 0 for every s.
        m_out[...] = jnp.where(empty, jnp.inf, m_ref[...])
        inv_l_out[...] = 1.0 / l_safe


# ---------------------------------------------------------------------------------------------
# Forward wrapper


def _forward(q, k, v, mask, bias, plan: _Plan):
    """(batch, heads, q_pad, d) q etc. -> (out, (row max, 1 / row sum) [b, h, q_pad, 1])."""
    B, H, q_pad, d = q.shape
    kv_pad = k.shape[2]
    bq, bk, g = plan.block_q, plan.block_k, plan.group
    sq = compat.squeezed
    q_spec = pl.BlockSpec((sq, sq, bq, d), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((sq, sq, bk, d),
                           lambda b, h, i, j: (b, _div(h, g), _kv_index(plan, i, j), 0))
    stat_spec = pl.BlockSpec((sq, sq, bq, 1), lambda b, h, i, j: (b, h, i, 0))
    extras = [(a, lay) for a, lay in ((mask, plan.mask), (bias, plan.bias)) if lay is not None]
    vmem = tt.check_vmem("attention forward", _vmem_parts(
        AttentionTpuConfig(bq, bk), d, q.dtype, [a.dtype for a, _ in extras])[0])
    stat_shape = jax.ShapeDtypeStruct((B, H, q_pad, 1), _F32)
    out, m, inv_l = tt.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), stat_shape, stat_shape),
        grid=(B, H, q_pad // bq, kv_pad // bk),
        in_specs=[q_spec, kv_spec, kv_spec,
                  *(_extra_spec(lay, plan, lambda b, h, i, j: (b, h, i, j)) for _, lay in extras)],
        out_specs=(q_spec, stat_spec, stat_spec),
        scratch_shapes=[compat.tpu_vmem((bq, 1), _F32), compat.tpu_vmem((bq, 1), _F32),
                        compat.tpu_vmem((bq, d), _F32)],
        name="attention_fwd",
        semantics=("parallel", "parallel", "parallel", "arbitrary"), interpret=plan.interpret,
        vmem=vmem,
    )(q, k, v, *(a for a, _ in extras))
    return out, (m, inv_l)


# ---------------------------------------------------------------------------------------------
# Backward kernels


def _grads_of_tile(plan: _Plan, q, k, v, do, m, inv_l, delta, mask_ref, bias_ref, i, j):
    """(p, ds) of one tile: probabilities and the logits' gradient (before the scale)."""
    s = _logits(plan, q, k, mask_ref, bias_ref, i, j)
    p = jnp.exp(s - m) * inv_l
    dp = lax.dot_general(do, v, _NT, preferred_element_type=_F32)
    return p, p * (dp - delta)


def _dq_kernel(*refs, plan: _Plan):
    q_ref, k_ref, v_ref, mask_ref, bias_ref, rest = _split(refs, plan)
    do_ref, m_ref, inv_l_ref, delta_ref, dq_ref, *rest = rest
    ds_ref = rest.pop(0) if _full_bias(plan) else None
    (acc_ref,) = rest
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(_needed(plan, i, j))
    def _():
        k = k_ref[...]
        _, ds = _grads_of_tile(plan, q_ref[...], k, v_ref[...], do_ref[...], m_ref[...],
                               inv_l_ref[...], delta_ref[...], mask_ref, bias_ref, i, j)
        acc_ref[...] += lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=_F32)
        if ds_ref is not None:
            ds_ref[...] = ds.astype(ds_ref.dtype)

    if ds_ref is not None and plan.causal:
        @pl.when(jnp.logical_not(_needed(plan, i, j)))
        def _():
            ds_ref[...] = jnp.zeros_like(ds_ref)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = (acc_ref[...] * plan.scale).astype(dq_ref.dtype)


def _full_bias(plan: _Plan) -> bool:
    return plan.bias is not None and all(plan.bias)


def _dbias_kernel(*refs, plan: _Plan, order: tuple):
    """The gradient of a bias that broadcasts: grid `order` (a permutation of (batch, head, query
    block, key block)) ends in the axes the bias broadcasts along, reductions into `acc_ref`."""
    q_ref, k_ref, v_ref, mask_ref, bias_ref, rest = _split(refs, plan)
    do_ref, m_ref, inv_l_ref, delta_ref, db_ref, acc_ref = rest
    reduced = [p for p, axis in enumerate(order) if not plan.bias[axis]]
    first = functools.reduce(jnp.logical_and, [pl.program_id(p) == 0 for p in reduced])
    last = functools.reduce(jnp.logical_and,
                            [pl.program_id(p) == pl.num_programs(p) - 1 for p in reduced])
    i, j = pl.program_id(order.index(2)), pl.program_id(order.index(3))

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(_needed(plan, i, j))
    def _():
        _, ds = _grads_of_tile(plan, q_ref[...], k_ref[...], v_ref[...], do_ref[...], m_ref[...],
                               inv_l_ref[...], delta_ref[...], mask_ref, bias_ref, i, j)
        if not plan.bias[2]:
            ds = jnp.sum(ds, axis=0, keepdims=True)
        if not plan.bias[3]:
            ds = jnp.sum(ds, axis=1, keepdims=True)
        acc_ref[...] += ds

    @pl.when(last)
    def _():
        db_ref[...] = acc_ref[...].astype(db_ref.dtype)


def _dbias(q, k, bias, operands, plan: _Plan, vmem: int):
    """`_dbias_kernel` over grid (kept axes, broadcast axes) -> the padded bias's gradient."""
    B, H, q_pad, d = q.shape
    bq, bk, g = plan.block_q, plan.block_k, plan.group
    sq = compat.squeezed
    order = (tuple(a for a in range(4) if plan.bias[a])
             + tuple(a for a in range(4) if not plan.bias[a]))
    sizes = (B, H, q_pad // bq, k.shape[2] // bk)

    def unpermuted(index):
        def index_map(*grid):
            bhij = [None] * 4
            for p, axis in enumerate(order):
                bhij[axis] = grid[p]
            return index(*bhij)
        return index_map

    q_spec = pl.BlockSpec((sq, sq, bq, d), unpermuted(lambda b, h, i, j: (b, h, i, 0)))
    kv_spec = pl.BlockSpec((sq, sq, bk, d), unpermuted(
        lambda b, h, i, j: (b, _div(h, g), _kv_index(plan, i, j), 0)))
    stat_spec = pl.BlockSpec((sq, sq, bq, 1), unpermuted(lambda b, h, i, j: (b, h, i, 0)))
    extra_specs = [_extra_spec(lay, plan, unpermuted(lambda *bhij: bhij))
                   for lay in (plan.mask, plan.bias) if lay is not None]
    block = (bq if plan.bias[2] else 1, bk if plan.bias[3] else 1)
    return tt.pallas_call(
        functools.partial(_dbias_kernel, plan=plan, order=order),
        out_shape=jax.ShapeDtypeStruct(bias.shape, bias.dtype),
        grid=tuple(sizes[a] for a in order),
        in_specs=[q_spec, kv_spec, kv_spec, *extra_specs, q_spec, stat_spec, stat_spec,
                  stat_spec],
        out_specs=extra_specs[-1],
        scratch_shapes=[compat.tpu_vmem(block, _F32)],
        name="attention_bwd_dbias",
        semantics=tuple("parallel" if plan.bias[a] else "arbitrary" for a in order),
        interpret=plan.interpret, vmem=vmem,
    )(*operands)


def _dkv_kernel(*refs, plan: _Plan, n_q: int):
    q_ref, k_ref, v_ref, mask_ref, bias_ref, rest = _split(refs, plan)
    do_ref, m_ref, inv_l_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = rest
    j, t = pl.program_id(2), pl.program_id(3)
    i = lax.rem(t, jnp.int32(n_q))

    @pl.when(t == 0)
    def _():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    @pl.when(_needed(plan, i, j))
    def _():
        q, do = q_ref[...], do_ref[...]
        p, ds = _grads_of_tile(plan, q, k_ref[...], v_ref[...], do, m_ref[...], inv_l_ref[...],
                               delta_ref[...], mask_ref, bias_ref, i, j)
        dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=_F32)
        dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=_F32)

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = (dk_acc[...] * plan.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# Backward wrapper


def _backward(q, k, v, mask, bias, out, stats, do, plan: _Plan):
    B, H, q_pad, d = q.shape
    Hkv, kv_pad = k.shape[1], k.shape[2]
    bq, bk, g = plan.block_q, plan.block_k, plan.group
    nq, nk = q_pad // bq, kv_pad // bk
    sq = compat.squeezed
    delta = jnp.sum(out.astype(_F32) * do.astype(_F32), axis=-1, keepdims=True)
    extras = [(a, lay) for a, lay in ((mask, plan.mask), (bias, plan.bias)) if lay is not None]
    vmem = tt.check_vmem("attention backward", _vmem_parts(
        AttentionTpuConfig(bq, bk), d, q.dtype, [a.dtype for a, _ in extras])[1])
    params = ("parallel", "parallel", "parallel", "arbitrary")
    operands = (q, k, v, *(a for a, _ in extras), do, *stats, delta)

    # dQ (and dS for the bias gradient): grid over (batch, head, query block, key block).
    q_spec = pl.BlockSpec((sq, sq, bq, d), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((sq, sq, bk, d),
                           lambda b, h, i, j: (b, _div(h, g), _kv_index(plan, i, j), 0))
    stat_spec = pl.BlockSpec((sq, sq, bq, 1), lambda b, h, i, j: (b, h, i, 0))
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [q_spec]
    if _full_bias(plan):
        out_shape.append(jax.ShapeDtypeStruct(bias.shape, bias.dtype))
        out_specs.append(pl.BlockSpec((sq, sq, bq, bk), lambda b, h, i, j: (b, h, i, j)))
    dq, *ds = tt.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        out_shape=out_shape,
        grid=(B, H, nq, nk),
        in_specs=[q_spec, kv_spec, kv_spec,
                  *(_extra_spec(lay, plan, lambda b, h, i, j: (b, h, i, j)) for _, lay in extras),
                  q_spec, stat_spec, stat_spec, stat_spec],
        out_specs=out_specs,
        scratch_shapes=[compat.tpu_vmem((bq, d), _F32)],
        name="attention_bwd_dq",
        semantics=params, interpret=plan.interpret, vmem=vmem,
    )(*operands)

    # dK, dV: grid over (batch, kv head, key block, (group head, query block)).
    def rows(b, h, j, t):
        return b, h * g + _div(t, nq), lax.rem(t, jnp.int32(nq))

    def q_index(b, h, j, t):
        b, hq, i = rows(b, h, j, t)
        return b, hq, i, 0

    q_spec_t = pl.BlockSpec((sq, sq, bq, d), q_index)
    stat_spec_t = pl.BlockSpec((sq, sq, bq, 1), q_index)
    key_spec = pl.BlockSpec((sq, sq, bk, d), lambda b, h, j, t: (b, h, j, 0))
    dk, dv = tt.pallas_call(
        functools.partial(_dkv_kernel, plan=plan, n_q=nq),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(B, Hkv, nk, g * nq),
        in_specs=[q_spec_t, key_spec, key_spec,
                  *(_extra_spec(lay, plan, lambda b, h, j, t: (*rows(b, h, j, t), j))
                    for _, lay in extras),
                  q_spec_t, stat_spec_t, stat_spec_t, stat_spec_t],
        out_specs=(key_spec, key_spec),
        scratch_shapes=[compat.tpu_vmem((bk, d), _F32), compat.tpu_vmem((bk, d), _F32)],
        name="attention_bwd_dkv",
        semantics=params, interpret=plan.interpret, vmem=vmem,
    )(*operands)

    dbias = None
    if bias is not None:
        dbias = ds[0] if ds else _dbias(q, k, bias, operands, plan, vmem)
    return dq, dk, dv, dbias


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, bias, mask, plan):
    return _forward(q, k, v, mask, bias, plan)[0]


def _flash_fwd(q, k, v, bias, mask, plan):
    out, stats = _forward(q, k, v, mask, bias, plan)
    return out, (q, k, v, bias, mask, out, stats)


def _flash_bwd(plan, residuals, do):
    q, k, v, bias, mask, out, stats = residuals
    dq, dk, dv, dbias = _backward(q, k, v, mask, bias, out, stats, do.astype(q.dtype), plan)
    return dq, dk, dv, dbias, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_extra(x, q_pad, kv_pad, dtype):
    """A (b, h, q|1, kv|1) mask or bias padded like the sequences (zeros: masked / no bias)."""
    x = x.astype(dtype)
    if x.shape[2] != 1:
        x = tt.pad_axis(x, 2, q_pad)
    return tt.pad_axis(x, 3, kv_pad) if x.shape[3] != 1 else x


def _flash_attention(q, k, v, mask, bias, *, causal, scale, config, interpret):
    B, q_len, H, d = q.shape
    kv_len, Hkv = k.shape[1], k.shape[2]
    bq, bk = config.block_q, config.block_k
    q_pad, kv_pad = tt.round_up(q_len, bq), tt.round_up(kv_len, bk)
    qt = tt.pad_axis(q.transpose(0, 2, 1, 3), 2, q_pad)
    kt = tt.pad_axis(k.transpose(0, 2, 1, 3), 2, kv_pad)
    vt = tt.pad_axis(v.transpose(0, 2, 1, 3), 2, kv_pad)
    # Which axes a mask or bias has in full: batch and heads when their sizes match (size 1
    # included: such a bias needs no reduction), queries and keys when not 1 (padded like them).
    layout = lambda x: None if x is None else (  # noqa: E731
        x.shape[0] == B, x.shape[1] == H, x.shape[2] != 1, x.shape[3] != 1)
    plan = _Plan(group=H // Hkv, q_len=q_len, kv_len=kv_len, block_q=bq, block_k=bk, head_dim=d,
                 scale=scale, causal=causal, mask=layout(mask), bias=layout(bias),
                 interpret=interpret)
    # int32 masks: boolean and int8 blocks would need (32, 128) tiles.
    mask = None if mask is None else _pad_extra(mask, q_pad, kv_pad, jnp.int32)
    if bias is not None:
        bias = _pad_extra(bias, q_pad, kv_pad, jnp.promote_types(bias.dtype, _F32))
    out = _flash(qt, kt, vt, bias, mask, plan)
    return out[:, :, :q_len].transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# The implementation


def attention_mosaic_tpu(q, k, v, *, causal=False, mask=None, bias=None, scale=None,
                         config: AttentionTpuConfig | None = None):
    """The TPU flash-attention implementation (same arguments as `attention`); `config` fixes
    the block sizes (else tuned on a TPU, or `default_config`)."""
    q, k, v, mask, bias, scale = canonicalize(q, k, v, mask, bias, scale)
    if q.size == 0 or k.shape[1] == 0:  # no output to write, or no keys: rows without keys are 0
        return jnp.zeros(q.shape, q.dtype)
    if q.dtype not in _KERNEL_DTYPES:
        raise NotImplementedError(f"dtype {q.dtype} is not supported (float32, bfloat16, float16)")
    if config is None:
        q_len, kv_len, d = q.shape[1], k.shape[1], q.shape[3]
        extras = [dt for x, dt in ((mask, jnp.int32), (bias, _F32)) if x is not None]
        config = tt.tuned("attention/mosaic_tpu", attention_mosaic_tpu, (q, k, v),
                          dict(causal=causal, mask=mask, bias=bias, scale=scale),
                          config_space(q_len, kv_len, d, q.dtype, extras),
                          default_config(q_len, kv_len, q.dtype))
    return _flash_attention(q, k, v, mask, bias, causal=bool(causal), scale=scale, config=config,
                            interpret=current().interpret)


# ---------------------------------------------------------------------------------------------
# One (query block, key block) pair, for ring attention (see ring.py)


def _block_plan(q, k, *, causal: bool, scale: float) -> _Plan:
    q_len, H, d = q.shape[1], q.shape[2], q.shape[3]
    kv_len = k.shape[1]
    config = default_config(q_len, kv_len, q.dtype)
    return _Plan(group=H // k.shape[2], q_len=q_len, kv_len=kv_len, block_q=config.block_q,
                 block_k=config.block_k, head_dim=d, scale=scale, causal=causal, mask=None,
                 bias=None, interpret=current().interpret)


def _heads_major(x, rows: int):
    """(batch, seq, heads, d) -> (batch, heads, seq padded to `rows`, d)."""
    return tt.pad_axis(x.transpose(0, 2, 1, 3), 2, rows)


def block_forward(q, k, v, *, causal: bool, scale: float):
    """Attention of q over one block of keys: (output normalised over that block, row max,
    row sum), statistics (batch, heads, q_len) in float32 (natural base). No mask or bias; with
    `causal` q and k are the same positions."""
    plan = _block_plan(q, k, causal=causal, scale=scale)
    q_pad = tt.round_up(plan.q_len, plan.block_q)
    kv_pad = tt.round_up(plan.kv_len, plan.block_k)
    out, (m, inv_l) = _forward(_heads_major(q, q_pad), _heads_major(k, kv_pad),
                               _heads_major(v, kv_pad), None, None, plan)
    n = plan.q_len
    return out[:, :, :n].transpose(0, 2, 1, 3), m[:, :, :n, 0], 1.0 / inv_l[:, :, :n, 0]


def block_backward(q, k, v, out, m, inv_l, do, *, causal: bool, scale: float):
    """(dq, dk, dv) of one block pair, given the output and statistics (row max, 1 / row sum)
    of q's rows over every key."""
    plan = _block_plan(q, k, causal=causal, scale=scale)
    q_pad = tt.round_up(plan.q_len, plan.block_q)
    kv_pad = tt.round_up(plan.kv_len, plan.block_k)
    stat = lambda s: tt.pad_axis(s[..., None], 2, q_pad)  # noqa: E731 (padded rows: p = 0)
    dq, dk, dv, _ = _backward(_heads_major(q, q_pad), _heads_major(k, kv_pad),
                              _heads_major(v, kv_pad), None, None, _heads_major(out, q_pad),
                              (stat(m), stat(inv_l)), _heads_major(do, q_pad).astype(q.dtype),
                              plan)
    back = lambda x, n: x[:, :, :n].transpose(0, 2, 1, 3)  # noqa: E731
    return back(dq, plan.q_len), back(dk, plan.kv_len), back(dv, plan.kv_len)
