"""Flash attention in Pallas for GPUs (Triton): forward and backward kernels, their wrappers, the
custom_vjp wiring and the "pallas" implementation of `attention`.

The forward kernel (Dao et al., 2022; FlashAttention-2, 2023) keeps a running max and sum over key
blocks and writes the output and the softmax statistics; the backward recomputes probabilities
from them in a dK/dV kernel (one program per key block, looping over the query heads of its GQA
group, so no atomics) and a separate dQ kernel. Causal programs skip the key blocks above the
diagonal and mask only the blocks that cross it. Sequences are padded to the block sizes
internally and the padding masked. Logits are kept in base 2 inside the kernels (scale * log2(e)
folded in), so the softmax uses exp2; the saved statistics are in base 2 as well.

File layout: config, forward kernel, forward wrapper, backward kernels, backward wrapper,
custom_vjp wiring and the implementation. Choosing an implementation, the first-use lowering
check and config tuning live in `_dispatch`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _pallas_compat as compat
from pallas_kernels import _tiles
from pallas_kernels._dispatch import interpret_mode, tuned_config
from pallas_kernels.attention.common import canonicalize

LOG2E = 1.4426950408889634
_F32 = jnp.float32
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ---------------------------------------------------------------------------------------------
# Configuration


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Block sizes and Triton launch parameters of the Pallas attention kernels.

    Forward: one program per (batch, head, block_q queries), looping over block_k keys.
    dK/dV: one program per (batch, kv head, block_k_dkv keys), looping over block_q_dkv queries
    of every head in the group. dQ: one program per (batch, head, block_q_dq queries), looping
    over block_k_dq keys. All block sizes are powers of two >= 16 (Triton's dot needs them).
    """
    block_q: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    block_q_dkv: int = 32
    block_k_dkv: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 32
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionConfig.{f.name} must be a positive int, got {value!r}")
            if f.name.startswith("block") and (not _is_power_of_2(value) or value < 16):
                raise ValueError(
                    f"AttentionConfig.{f.name} must be a power of two >= 16, got {value}")

    @property
    def q_multiple(self) -> int:
        """Query padding granule: every query block size divides it."""
        return max(self.block_q, self.block_q_dkv, self.block_q_dq)

    @property
    def k_multiple(self) -> int:
        return max(self.block_k, self.block_k_dkv, self.block_k_dq)

    def clamped(self, q_len: int, kv_len: int) -> "AttentionConfig":
        """Shrink blocks that exceed the (power-of-two rounded) sequence, to limit padding."""
        qcap = max(16, pl.next_power_of_2(q_len))
        kcap = max(16, pl.next_power_of_2(kv_len))
        return dataclasses.replace(
            self, block_q=min(self.block_q, qcap), block_k=min(self.block_k, kcap),
            block_q_dkv=min(self.block_q_dkv, qcap), block_k_dkv=min(self.block_k_dkv, kcap),
            block_q_dq=min(self.block_q_dq, qcap), block_k_dq=min(self.block_k_dq, kcap))


def heuristic_config(q_len: int, kv_len: int, head_dim: int, *, interpret: bool) -> AttentionConfig:
    """Block sizes without measurement: Triton flash-attention shapes that fit an H100's
    registers (dK and dV accumulators of block_k_dkv x head_dim f32 each), or in interpret mode
    large blocks, since the interpreter pays per grid step rather than per flop."""
    if interpret:
        cfg = AttentionConfig(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=128,
                              block_q_dq=128, block_k_dq=128)
    elif head_dim <= 64:
        cfg = AttentionConfig(block_q=128, block_k=64, num_warps=4, num_stages=3,
                              block_q_dkv=32, block_k_dkv=128, block_q_dq=128, block_k_dq=32,
                              num_warps_bwd=4, num_stages_bwd=2)
    elif head_dim <= 128:
        cfg = AttentionConfig(block_q=128, block_k=64, num_warps=8, num_stages=3,
                              block_q_dkv=32, block_k_dkv=64, block_q_dq=128, block_k_dq=32,
                              num_warps_bwd=8, num_stages_bwd=2)
    else:  # 256-wide rows: halve the tiles so K/V stages fit shared memory
        cfg = AttentionConfig(block_q=64, block_k=32, num_warps=8, num_stages=2,
                              block_q_dkv=16, block_k_dkv=32, block_q_dq=64, block_k_dq=16,
                              num_warps_bwd=8, num_stages_bwd=2)
    return cfg.clamped(q_len, kv_len)


def config_space(head_dim: int) -> list[AttentionConfig]:
    """The small space `tuned_config` times on a GPU: forward tiles and warps x dK/dV tiles."""
    if head_dim <= 64:
        dkv_tiles, bwd_warps = ((32, 128), (64, 64)), 4
    else:
        dkv_tiles, bwd_warps = ((32, 64), (64, 64)), 8
    return [AttentionConfig(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages,
                            block_q_dkv=bq_dkv, block_k_dkv=bk_dkv, block_q_dq=128,
                            block_k_dq=32, num_warps_bwd=bwd_warps, num_stages_bwd=2)
            for bq, bk, warps, stages in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                                          (64, 64, 4, 3))
            for bq_dkv, bk_dkv in dkv_tiles]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Which axes of a 4-D mask or bias are full (not broadcast): batch, heads, q_seq, kv_seq."""
    batch: bool
    heads: bool
    q: bool
    k: bool

    @classmethod
    def of(cls, shape: Sequence[int]) -> "_Layout":
        return cls(*(d != 1 for d in shape))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static a kernel needs (hashable: it is a custom_vjp nondiff argument)."""
    batch: int
    heads: int
    kv_heads: int
    q_len: int    # real lengths; the arrays the kernels see are padded to q_pad / kv_pad
    kv_len: int
    q_pad: int
    kv_pad: int
    head_dim: int  # padded head dim
    scale: float
    causal: bool
    mask: _Layout | None
    bias: _Layout | None
    config: AttentionConfig
    interpret: bool

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def offset(self) -> int:
        """Causal diagonal offset: query i sees key j iff j <= i + offset."""
        return self.kv_len - self.q_len

    def params(self, backward: bool):
        cfg = self.config
        if backward:
            return compat.gpu_compiler_params(num_warps=cfg.num_warps_bwd,
                                              num_stages=cfg.num_stages_bwd,
                                              interpret=self.interpret)
        return compat.gpu_compiler_params(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                          interpret=self.interpret)


# ---------------------------------------------------------------------------------------------
# Shared kernel pieces


def _dot_nt(a, b):
    """a @ b.T with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _dot_nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def _div(a, b):
    """a // b for non-negative integer arrays and a static divisor, in a's own dtype (with
    jax_enable_x64 a Python int would be int64 beside the kernel's int32 indices)."""
    return lax.div(a, lax.convert_element_type(b, a.dtype))


def _rem(a, b):
    return lax.rem(a, lax.convert_element_type(b, a.dtype))


def _cdiv(a, b):
    return _div(a + (b - 1), b)


def _keep(plan: _Plan, q0, k0, shape, mask_tile, structural: bool, transposed: bool = False):
    """Boolean keep-mask of a logits tile (None: keep all).

    `shape` is (queries, keys), or (keys, queries) when `transposed`. `structural` adds the
    causal and key-padding masks; blocks that cannot cross the diagonal or the padding skip them.
    """
    keep = None if mask_tile is None else mask_tile != 0
    if structural and (plan.causal or plan.kv_len != plan.kv_pad):
        q_axis, k_axis = (1, 0) if transposed else (0, 1)
        cols = k0 + lax.broadcasted_iota(jnp.int32, shape, k_axis)
        cond = None
        if plan.kv_len != plan.kv_pad:
            cond = cols < plan.kv_len
        if plan.causal:
            rows = q0 + lax.broadcasted_iota(jnp.int32, shape, q_axis)
            causal = cols <= rows + plan.offset
            cond = causal if cond is None else cond & causal
        keep = cond if keep is None else keep & cond
    return keep


def _kv_blocks(plan: _Plan, q0, block_q: int, block_k: int):
    """Key blocks seen by queries [q0, q0 + block_q): [0, n_total); the first n_clean of them need
    neither the causal nor the padding mask."""
    n_blocks = plan.kv_pad // block_k
    n_unpadded = plan.kv_len // block_k
    if not plan.causal:
        return n_unpadded, n_blocks
    last_row = jnp.minimum(q0 + block_q, plan.q_len) - 1
    n_total = jnp.clip(_cdiv(jnp.maximum(last_row + plan.offset + 1, 0), block_k), 0, n_blocks)
    n_clean = _div(jnp.maximum(q0 + plan.offset + 1, 0), block_k)
    n_clean = jnp.minimum(jnp.minimum(n_clean, n_unpadded), n_total)
    return n_clean, n_total


def _q_blocks(plan: _Plan, k0, block_q: int, block_k: int):
    """Query blocks that see keys [k0, k0 + block_k): [start, n_q); those in [start, clean) need
    the causal or padding mask, the rest do not."""
    n_q = -(-plan.q_len // block_q)  # blocks holding real queries; the rest is all padding
    if plan.causal:
        start = jnp.minimum(_div(jnp.maximum(k0 - plan.offset, 0), block_q), n_q)
        clean = _cdiv(jnp.maximum(k0 + block_k - 1 - plan.offset, 0), block_q)
        clean = jnp.clip(clean, start, n_q)
    else:
        start, clean = 0, 0
    if plan.kv_len != plan.kv_pad:  # a block holding key padding is masked for every query
        padded = (k0 + block_k > plan.kv_len).astype(jnp.int32)
        # Arithmetic, not jnp.where: Triton's select lowering types two Python-int branches
        # as the predicate's i1 (jax 0.10.2).
        clean = clean + (n_q - clean) * padded
    return start, clean, n_q


def _split_refs(refs, plan: _Plan):
    """(q, k, v, mask|None, bias|None, rest...) from a kernel's ref list."""
    q_ref, k_ref, v_ref, *rest = refs
    mask_ref = rest.pop(0) if plan.mask is not None else None
    bias_ref = rest.pop(0) if plan.bias is not None else None
    return q_ref, k_ref, v_ref, mask_ref, bias_ref, rest


def _row_tile(ref, layout: _Layout, k0, block_k: int):
    """Mask/bias tile for a query block (the ref holds this block's rows and every key)."""
    return ref[:, pl.ds(k0, block_k)] if layout.k else ref[...]


def _row_block_logits(plan: _Plan, q, q0, k0, shape, k_ref, v_ref, mask_ref, bias_ref,
                      qk_scale, structural: bool):
    """(k, v, logits in log2 units, masked to -inf) for the key block at `k0` of a kernel
    gridded over query blocks (forward and dQ)."""
    bk = shape[1]
    k = k_ref[pl.ds(k0, bk), :]
    v = v_ref[pl.ds(k0, bk), :]
    s = _dot_nt(q, k) * qk_scale
    if bias_ref is not None:
        s = s + _row_tile(bias_ref, plan.bias, k0, bk).astype(_F32) * LOG2E
    mask_tile = None if mask_ref is None else _row_tile(mask_ref, plan.mask, k0, bk)
    keep = _keep(plan, q0, k0, shape, mask_tile, structural)
    return k, v, s if keep is None else jnp.where(keep, s, -jnp.inf)


def _probabilities(s, m, inv_l):
    """Softmax probabilities of a logits tile from the forward's row statistics (broadcast to the
    tile). The max and the sum stay apart: s - m is exact near the max, while a single
    log-sum-exp m + log2(l) would round to m's precision and the rows' sums drift from 1 as
    the logits grow."""
    return jnp.exp2(s - m) * inv_l


def _row_spec(layout: _Layout, plan: _Plan, block_q: int):
    """BlockSpec of a 4-D mask/bias for the kernels gridded over (batch, head, query block)."""
    sq = compat.squeezed
    shape = (sq, sq, block_q if layout.q else 1, plan.kv_pad if layout.k else 1)

    def index(b, h, i):
        return (b if layout.batch else 0, h if layout.heads else 0, i if layout.q else 0, 0)

    return pl.BlockSpec(shape, index)


# ---------------------------------------------------------------------------------------------
# Forward kernel


def _fwd_kernel(*refs, plan: _Plan):
    q_ref, k_ref, v_ref, mask_ref, bias_ref, (o_ref, m_ref, inv_l_ref) = _split_refs(refs, plan)
    cfg = plan.config
    bq, bk = cfg.block_q, cfg.block_k
    q0 = pl.program_id(2) * bq
    q = q_ref[...]
    qk_scale = plan.scale * LOG2E

    def step(j, carry, structural):
        m, l, acc = carry
        k0 = pl.multiple_of(j * bk, bk)
        k, v, s = _row_block_logits(plan, q, q0, k0, (bq, bk), k_ref, v_ref, mask_ref,
                                    bias_ref, qk_scale, structural)
        m_new, alpha, p = _tiles.online_softmax_step(m, s, exp=jnp.exp2)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot_nn(p.astype(v.dtype), v)
        return m_new, l, acc

    n_clean, n_total = _kv_blocks(plan, q0, bq, bk)
    carry = (jnp.full((bq,), -jnp.inf, _F32), jnp.zeros((bq,), _F32),
             jnp.zeros((bq, plan.head_dim), _F32))
    carry = lax.fori_loop(0, n_clean, functools.partial(step, structural=False), carry)
    m, l, acc = lax.fori_loop(n_clean, n_total, functools.partial(step, structural=True), carry)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    # +inf for rows without keys: the backward's exp2(s - m) is then 0 for every s.
    m_ref[...] = jnp.where(empty, jnp.inf, m)
    inv_l_ref[...] = 1.0 / l_safe


# ---------------------------------------------------------------------------------------------
# Forward wrapper


def _forward(q, k, v, mask, bias, plan: _Plan):
    """Padded inputs -> (output, (row max in base 2, 1 / row sum)), the statistics of shape
    (batch, heads, q_pad)."""
    cfg = plan.config
    bq = cfg.block_q
    sq = compat.squeezed
    d, group = plan.head_dim, plan.group
    in_specs = [
        pl.BlockSpec((sq, bq, sq, d), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((sq, plan.kv_pad, sq, d), lambda b, h, i: (b, 0, h // group, 0)),
        pl.BlockSpec((sq, plan.kv_pad, sq, d), lambda b, h, i: (b, 0, h // group, 0)),
    ]
    args = [q, k, v]
    for arr, layout in ((mask, plan.mask), (bias, plan.bias)):
        if layout is not None:
            in_specs.append(_row_spec(layout, plan, bq))
            args.append(arr)
    stat_shape = jax.ShapeDtypeStruct((plan.batch, plan.heads, plan.q_pad), _F32)
    stat_block = pl.BlockSpec((sq, sq, bq), lambda b, h, i: (b, h, i))
    out, m, inv_l = compat.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), stat_shape, stat_shape),
        grid=(plan.batch, plan.heads, plan.q_pad // bq),
        in_specs=in_specs,
        out_specs=(pl.BlockSpec((sq, bq, sq, d), lambda b, h, i: (b, i, h, 0)), stat_block,
                   stat_block),
        compiler_params=plan.params(backward=False),
        interpret=plan.interpret,
        name="attention_fwd",
    )(*args)
    return out, (m, inv_l)


# ---------------------------------------------------------------------------------------------
# Backward kernels


def _delta_kernel(o_ref, do_ref, delta_ref):
    """delta_i = sum_d o_id * do_id: the row term of the softmax backward."""
    delta_ref[...] = jnp.sum(o_ref[...].astype(_F32) * do_ref[...].astype(_F32), axis=1)


def _dkv_kernel(*refs, plan: _Plan):
    """dK and dV of one key block: loop over the query heads of its GQA group and their query
    blocks. Works on transposed tiles (keys x queries) so every matmul operand is loaded data."""
    q_ref, k_ref, v_ref, mask_ref, bias_ref, rest = _split_refs(refs, plan)
    do_ref, m_ref, inv_l_ref, delta_ref, dk_ref, dv_ref = rest
    cfg = plan.config
    bq, bk = cfg.block_q_dkv, cfg.block_k_dkv
    k0 = pl.program_id(2) * bk
    k = k_ref[...]
    v = v_ref[...]
    qk_scale = plan.scale * LOG2E

    def tile(ref, layout, g, q0):
        index = ((g,) if layout.heads else ()) + (pl.ds(q0, bq) if layout.q else slice(None),
                                                  slice(None))
        return ref[index].T

    def step(i, carry, g, structural):
        dk, dv = carry
        q0 = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(q0, bq), g, :]
        do = do_ref[pl.ds(q0, bq), g, :]
        m = m_ref[g, pl.ds(q0, bq)]
        inv_l = inv_l_ref[g, pl.ds(q0, bq)]
        delta = delta_ref[g, pl.ds(q0, bq)]
        s_t = _dot_nt(k, q) * qk_scale
        if bias_ref is not None:
            s_t = s_t + tile(bias_ref, plan.bias, g, q0).astype(_F32) * LOG2E
        mask_tile = None if mask_ref is None else tile(mask_ref, plan.mask, g, q0)
        keep = _keep(plan, q0, k0, (bk, bq), mask_tile, structural, transposed=True)
        if keep is not None:
            s_t = jnp.where(keep, s_t, -jnp.inf)
        p_t = _probabilities(s_t, m[None, :], inv_l[None, :])
        dv = dv + _dot_nn(p_t.astype(do.dtype), do)
        dp_t = _dot_nt(v, do)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dk + _dot_nn(ds_t.astype(q.dtype), q)
        return dk, dv

    start, clean, n_q = _q_blocks(plan, k0, bq, bk)

    def head(g, carry):
        carry = lax.fori_loop(start, clean, functools.partial(step, g=g, structural=True), carry)
        return lax.fori_loop(clean, n_q, functools.partial(step, g=g, structural=False), carry)

    zeros = jnp.zeros((bk, plan.head_dim), _F32)
    dk, dv = lax.fori_loop(0, plan.group, head, (zeros, zeros))
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, plan: _Plan):
    q_ref, k_ref, v_ref, mask_ref, bias_ref, rest = _split_refs(refs, plan)
    do_ref, m_ref, inv_l_ref, delta_ref, dq_ref = rest
    cfg = plan.config
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    q0 = pl.program_id(2) * bq
    q = q_ref[...]
    do = do_ref[...]
    m = m_ref[...]
    inv_l = inv_l_ref[...]
    delta = delta_ref[...]
    qk_scale = plan.scale * LOG2E

    def step(j, dq, structural):
        k0 = pl.multiple_of(j * bk, bk)
        k, v, s = _row_block_logits(plan, q, q0, k0, (bq, bk), k_ref, v_ref, mask_ref,
                                    bias_ref, qk_scale, structural)
        p = _probabilities(s, m[:, None], inv_l[:, None])
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot_nn(ds.astype(k.dtype), k)

    n_clean, n_total = _kv_blocks(plan, q0, bq, bk)
    dq = jnp.zeros((bq, plan.head_dim), _F32)
    dq = lax.fori_loop(0, n_clean, functools.partial(step, structural=False), dq)
    dq = lax.fori_loop(n_clean, n_total, functools.partial(step, structural=True), dq)
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _dbias_kernel(*refs, plan: _Plan):
    """One tile of d(bias): the logits gradient summed over the axes the bias broadcasts along.

    Inputs are whole arrays; the program loops over the (batch, head, query block, key block)
    tiles that fold into its output tile, so nothing of size (batch, heads, q, kv) is stored
    unless the bias itself has that shape.
    """
    q_ref, k_ref, v_ref, mask_ref, bias_ref, rest = _split_refs(refs, plan)
    do_ref, m_ref, inv_l_ref, delta_ref, dbias_ref = rest
    cfg, lay = plan.config, plan.bias
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    qk_scale = plan.scale * LOG2E
    pb, ph, pi, pj = (pl.program_id(a) for a in range(4))
    n_b = 1 if lay.batch else plan.batch
    n_h = 1 if lay.heads else plan.heads
    n_i = 1 if lay.q else -(-plan.q_len // bq)
    n_j = 1 if lay.k else plan.kv_pad // bk

    def index(layout, b, h, q0, k0):
        return (b if layout.batch else 0, h if layout.heads else 0,
                pl.ds(q0, bq) if layout.q else slice(None),
                pl.ds(k0, bk) if layout.k else slice(None))

    def step(t, acc):
        t, j = _div(t, n_j), _rem(t, n_j)
        t, i = _div(t, n_i), _rem(t, n_i)
        b, h = _div(t, n_h), _rem(t, n_h)
        b = pb if lay.batch else b
        h = ph if lay.heads else h
        q0 = pl.multiple_of((pi if lay.q else i) * bq, bq)
        k0 = pl.multiple_of((pj if lay.k else j) * bk, bk)
        kv_h = h // plan.group
        q = q_ref[b, pl.ds(q0, bq), h, :]
        k = k_ref[b, pl.ds(k0, bk), kv_h, :]
        v = v_ref[b, pl.ds(k0, bk), kv_h, :]
        do = do_ref[b, pl.ds(q0, bq), h, :]
        m = m_ref[b, h, pl.ds(q0, bq)]
        inv_l = inv_l_ref[b, h, pl.ds(q0, bq)]
        delta = delta_ref[b, h, pl.ds(q0, bq)]
        s = _dot_nt(q, k) * qk_scale + bias_ref[index(lay, b, h, q0, k0)].astype(_F32) * LOG2E
        mask_tile = None if mask_ref is None else mask_ref[index(plan.mask, b, h, q0, k0)]
        keep = _keep(plan, q0, k0, (bq, bk), mask_tile, structural=True)
        if keep is not None:
            s = jnp.where(keep, s, -jnp.inf)
        p = _probabilities(s, m[:, None], inv_l[:, None])
        ds = p * (_dot_nt(do, v) - delta[:, None])
        if not lay.q:
            ds = jnp.sum(ds, axis=0, keepdims=True)
        if not lay.k:
            ds = jnp.sum(ds, axis=1, keepdims=True)
        return acc + ds

    acc = jnp.zeros((bq if lay.q else 1, bk if lay.k else 1), _F32)
    dbias_ref[...] = lax.fori_loop(0, n_b * n_h * n_i * n_j, step, acc)


# ---------------------------------------------------------------------------------------------
# Backward wrapper


def _backward(q, k, v, mask, bias, out, stats, do, plan: _Plan):
    cfg = plan.config
    sq = compat.squeezed
    d, group = plan.head_dim, plan.group
    B, H, Hkv = plan.batch, plan.heads, plan.kv_heads
    params = plan.params(backward=True)
    mask_bias = [(arr, lay) for arr, lay in ((mask, plan.mask), (bias, plan.bias))
                 if lay is not None]

    bq = cfg.block_q_dq
    row_block = pl.BlockSpec((sq, bq, sq, d), lambda b, h, i: (b, i, h, 0))
    stat_block = pl.BlockSpec((sq, sq, bq), lambda b, h, i: (b, h, i))
    stat_shape = jax.ShapeDtypeStruct((B, H, plan.q_pad), _F32)
    delta = compat.pallas_call(
        _delta_kernel, out_shape=stat_shape, grid=(B, H, plan.q_pad // bq),
        in_specs=[row_block, row_block], out_specs=stat_block,
        compiler_params=params, interpret=plan.interpret, name="attention_bwd_delta",
    )(out, do)

    # dK, dV: grid over (batch, kv head, key block).
    bk = cfg.block_k_dkv
    group_rows = pl.BlockSpec((sq, plan.q_pad, group, d), lambda b, h, j: (b, 0, h, 0))
    group_stats = pl.BlockSpec((sq, group, plan.q_pad), lambda b, h, j: (b, h, 0))
    key_block = pl.BlockSpec((sq, bk, sq, d), lambda b, h, j: (b, j, h, 0))

    def group_spec(layout):
        shape = (sq, group if layout.heads else sq, plan.q_pad if layout.q else 1,
                 bk if layout.k else 1)
        return pl.BlockSpec(shape, lambda b, h, j: (b if layout.batch else 0,
                                                    h if layout.heads else 0, 0,
                                                    j if layout.k else 0))

    dk, dv = compat.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(B, Hkv, plan.kv_pad // bk),
        in_specs=[group_rows, key_block, key_block, *(group_spec(lay) for _, lay in mask_bias),
                  group_rows, group_stats, group_stats, group_stats],
        out_specs=(key_block, key_block),
        compiler_params=params, interpret=plan.interpret, name="attention_bwd_dkv",
    )(q, k, v, *(arr for arr, _ in mask_bias), do, *stats, delta)

    # dQ: grid over (batch, head, query block).
    all_keys = pl.BlockSpec((sq, plan.kv_pad, sq, d), lambda b, h, i: (b, 0, h // group, 0))
    dq = compat.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(B, H, plan.q_pad // bq),
        in_specs=[row_block, all_keys, all_keys, *(_row_spec(lay, plan, bq) for _, lay in mask_bias),
                  row_block, stat_block, stat_block, stat_block],
        out_specs=row_block,
        compiler_params=params, interpret=plan.interpret, name="attention_bwd_dq",
    )(q, k, v, *(arr for arr, _ in mask_bias), do, *stats, delta)

    dbias = None
    if bias is not None:
        lay = plan.bias
        bk = cfg.block_k_dq
        out_block = (bq if lay.q else 1, bk if lay.k else 1)
        grid = (bias.shape[0], bias.shape[1], bias.shape[2] // out_block[0],
                bias.shape[3] // out_block[1])
        whole = [pl.BlockSpec(a.shape, lambda *_, n=a.ndim: (0,) * n)
                 for a in (q, k, v, *(arr for arr, _ in mask_bias), do, *stats, delta)]
        dbias = compat.pallas_call(
            functools.partial(_dbias_kernel, plan=plan),
            out_shape=jax.ShapeDtypeStruct(bias.shape, _F32),
            grid=grid,
            in_specs=whole,
            out_specs=pl.BlockSpec((sq, sq, *out_block), lambda b, h, i, j: (b, h, i, j)),
            compiler_params=params, interpret=plan.interpret, name="attention_bwd_dbias",
        )(q, k, v, *(arr for arr, _ in mask_bias), do, *stats, delta).astype(bias.dtype)
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
    dq, dk, dv, dbias = _backward(q, k, v, mask, bias, out, stats, do, plan)
    return dq, dk, dv, dbias, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


@functools.partial(jax.jit,
                   static_argnames=("causal", "scale", "config", "interpret", "opaque"))
def _flash_attention(q, k, v, mask, bias, *, causal, scale, config, interpret, opaque=False):
    """Pad to the block sizes (and a power-of-two head dim), run the kernels, slice the result.

    `opaque` (`compat.opaque()`) only keys this jit's cache: the kernels read it themselves."""
    del opaque
    B, q_len, H, head_dim = q.shape
    kv_len, Hkv = k.shape[1], k.shape[2]
    q_pad = _round_up(q_len, config.q_multiple)
    kv_pad = _round_up(kv_len, config.k_multiple)
    d_pad = max(16, pl.next_power_of_2(head_dim))
    q = _pad_axis(_pad_axis(q, 1, q_pad), 3, d_pad)
    k = _pad_axis(_pad_axis(k, 1, kv_pad), 3, d_pad)
    v = _pad_axis(_pad_axis(v, 1, kv_pad), 3, d_pad)
    if mask is not None:
        mask = mask.astype(jnp.int8)  # bool refs are not portable to Triton
        mask = _pad_axis(_pad_axis(mask, 2, q_pad if mask.shape[2] != 1 else 1), 3,
                         kv_pad if mask.shape[3] != 1 else 1)
    if bias is not None:
        bias = _pad_axis(_pad_axis(bias, 2, q_pad if bias.shape[2] != 1 else 1), 3,
                         kv_pad if bias.shape[3] != 1 else 1)
    plan = _Plan(batch=B, heads=H, kv_heads=Hkv, q_len=q_len, kv_len=kv_len, q_pad=q_pad,
                 kv_pad=kv_pad, head_dim=d_pad, scale=scale, causal=causal,
                 mask=None if mask is None else _Layout.of(mask.shape),
                 bias=None if bias is None else _Layout.of(bias.shape),
                 config=config, interpret=interpret)
    out = _flash(q, k, v, bias, mask, plan)
    return out[:, :q_len, :, :head_dim]


# ---------------------------------------------------------------------------------------------
# The implementation


def _unsupported_by_kernel(q, k) -> str | None:
    if q.dtype not in _KERNEL_DTYPES:
        return f"dtype {q.dtype} is not supported (float32, bfloat16, float16)"
    if q.shape[3] > 256:
        return f"head_dim {q.shape[3]} > 256 does not fit the kernel's registers"
    return None


def pallas_attention(q, k, v, *, causal=False, mask=None, bias=None, scale=None,
                     config: AttentionConfig | None = None):
    """The Pallas flash-attention implementation (same arguments as `attention`).

    `config` fixes the block sizes; without it they are tuned on the device (cached) or, on a
    CPU, chosen by `heuristic_config`. Raises NotImplementedError(reason) for cases the kernel
    does not take. Through `attention(..., implementation="pallas")` the kernels are also lowered
    and compiled once per signature first, and a failure there declines the call.
    """
    q, k, v, mask, bias, scale = canonicalize(q, k, v, mask, bias, scale)
    if q.size == 0 or k.shape[1] == 0:  # no output to write, or no keys: rows without keys are 0
        return jnp.zeros(q.shape, q.dtype)
    reason = _unsupported_by_kernel(q, k)
    if reason is not None:
        raise NotImplementedError(reason)
    interpret = interpret_mode()
    if config is None:
        q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
        config = tuned_config(
            "attention/pallas", pallas_attention, (q, k, v),
            dict(causal=causal, mask=mask, bias=bias, scale=scale),
            list(dict.fromkeys(c.clamped(q_len, kv_len) for c in config_space(head_dim))),
            heuristic_config(q_len, kv_len, head_dim, interpret=interpret))
    return _flash_attention(q, k, v, mask, bias, causal=bool(causal), scale=scale, config=config,
                            interpret=interpret, opaque=compat.opaque())


# ---------------------------------------------------------------------------------------------
# One (query block, key block) pair, for ring attention (see ring.py)


def _block_plan(q, k, *, causal: bool, scale: float) -> tuple[_Plan, int, int, int]:
    B, q_len, H, head_dim = q.shape
    kv_len, Hkv = k.shape[1], k.shape[2]
    interpret = interpret_mode()
    config = heuristic_config(q_len, kv_len, head_dim, interpret=interpret)
    q_pad = _round_up(q_len, config.q_multiple)
    kv_pad = _round_up(kv_len, config.k_multiple)
    d_pad = max(16, pl.next_power_of_2(head_dim))
    plan = _Plan(batch=B, heads=H, kv_heads=Hkv, q_len=q_len, kv_len=kv_len, q_pad=q_pad,
                 kv_pad=kv_pad, head_dim=d_pad, scale=scale, causal=causal, mask=None,
                 bias=None, config=config, interpret=interpret)
    return plan, q_pad, kv_pad, d_pad


def _padded(x, rows: int, d_pad: int):
    return _pad_axis(_pad_axis(x, 1, rows), 3, d_pad)


def block_forward(q, k, v, *, causal: bool, scale: float):
    """Attention of q over one block of keys: (output normalised over that block, row max in
    base 2, row sum), statistics (batch, heads, q_len) in float32. No mask or bias; with
    `causal` q and k are the same positions."""
    plan, q_pad, kv_pad, d_pad = _block_plan(q, k, causal=causal, scale=scale)
    out, (m, inv_l) = _forward(_padded(q, q_pad, d_pad), _padded(k, kv_pad, d_pad),
                               _padded(v, kv_pad, d_pad), None, None, plan)
    q_len, head_dim = q.shape[1], q.shape[3]
    return out[:, :q_len, :, :head_dim], m[..., :q_len], 1.0 / inv_l[..., :q_len]


def block_backward(q, k, v, out, m, inv_l, do, *, causal: bool, scale: float):
    """(dq, dk, dv) of one block pair, given the output and base-2 statistics (row max,
    1 / row sum) of q's rows over every key."""
    plan, q_pad, kv_pad, d_pad = _block_plan(q, k, causal=causal, scale=scale)
    stat = lambda s: _pad_axis(s, 2, q_pad)  # noqa: E731 (padded rows: probability 0)
    dq, dk, dv, _ = _backward(_padded(q, q_pad, d_pad), _padded(k, kv_pad, d_pad),
                              _padded(v, kv_pad, d_pad), None, None,
                              _padded(out, q_pad, d_pad), (stat(m), stat(inv_l)),
                              _padded(do, q_pad, d_pad), plan)
    q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
    return (dq[:, :q_len, :, :head_dim], dk[:, :kv_len, :, :head_dim],
            dv[:, :kv_len, :, :head_dim])
