"""Per-example softmax cross-entropy, from logits or fused with the output projection.

softmax_cross_entropy(logits, labels)          = logsumexp(logits) - logits[label]
linear_cross_entropy(x, w, labels, w_layout)   = the same with logits = x @ w ("dv": w [d, vocab])
                                                 or x @ w.T ("vd": a tied [vocab, d] embedding),
                                                 never materialising the [tokens, vocab] logits.

Labels behave as in `jnp.take_along_axis`: a negative label counts from the end, and a label outside
[-vocab, vocab) gives a NaN loss (its gradient is then softmax * dloss, as the reference's).

softmax_cross_entropy: one program per block of rows, looping over the vocabulary with an online
log-sum-exp (forward), then a second pass writing (softmax - onehot) * dloss (backward).

linear_cross_entropy: the forward kernel computes logit tiles x_rows @ w_block in registers and
folds them into an online log-sum-exp, programs splitting the vocabulary as well as the tokens; a
small kernel merges the splits. Only the per-token log-sum-exp is saved. The backward runs
over vocabulary chunks of `chunk_vocab` columns (a lax loop): one kernel recomputes the chunk's
logits and writes dlogits = (softmax - onehot) * dloss for all tokens ([tokens, chunk], the only
large temporary), then dx += dlogits @ w_chunk^T and dw_chunk = x^T @ dlogits, each a tiled kernel
writing in place. The "xla" implementation follows the same chunking with lax loops and XLA's
matmuls.
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
from pallas_kernels._dispatch import Op, interpret_mode, tuned_config

softmax_cross_entropy_op = Op("softmax_cross_entropy")
linear_cross_entropy_op = Op("linear_cross_entropy")

W_LAYOUTS = ("dv", "vd")


@dataclasses.dataclass(frozen=True)
class CrossEntropyConfig:
    """Block sizes (powers of two) for the softmax_cross_entropy kernels."""
    block_rows: int = 1
    block_vocab: int = 4096
    num_warps: int = 8
    num_stages: int = 2


def cross_entropy_config_heuristic(n_rows: int, vocab: int) -> CrossEntropyConfig:
    block_vocab = min(4096, pl.next_power_of_2(vocab))
    block_rows = max(1, min(64, 4096 // block_vocab, pl.next_power_of_2(n_rows)))
    warps = max(1, min(8, block_rows * block_vocab // 512))
    return CrossEntropyConfig(block_rows, block_vocab, pl.next_power_of_2(warps))


def cross_entropy_config_space(n_rows: int, vocab: int) -> list[CrossEntropyConfig]:
    space = []
    for block_vocab in (1024, 2048, 4096, 8192):
        for block_rows in (1, 2, 4):
            if block_vocab <= 2 * pl.next_power_of_2(vocab) and block_rows <= n_rows:
                space.append(CrossEntropyConfig(block_rows, block_vocab,
                                                8 if block_rows * block_vocab >= 4096 else 4))
    return space


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyConfig:
    """Block sizes (powers of two, >= 16) for the linear_cross_entropy kernels.

    Logit tiles are (block_tokens, block_vocab), built in block_depth steps over d; the dx and dw
    tiles are (block_tokens, block_depth) and (block_depth, block_vocab). The backward works on
    chunk_vocab columns (a multiple of block_vocab) at a time: its one large temporary is
    [tokens, chunk_vocab] in x's dtype.
    """
    block_tokens: int = 64
    block_vocab: int = 128
    block_depth: int = 64
    chunk_vocab: int = 4096
    num_warps: int = 4
    num_stages: int = 3
    forward_programs: int = 512  # the forward splits the vocabulary to launch about this many


def _fit(dim: int, cap: int) -> int:
    return max(16, min(cap, pl.next_power_of_2(dim)))


def _chunk_columns(n_tokens: int, vocab: int, itemsize: int, block: int,
                   budget_bytes: int = 64 << 20) -> int:
    """Columns per backward chunk: a multiple of `block` whose [tokens, chunk] buffer fits."""
    blocks = max(1, budget_bytes // max(1, n_tokens * itemsize * block))
    blocks = min(1 << (blocks.bit_length() - 1), pl.cdiv(vocab, block))
    return block * blocks


def linear_cross_entropy_config_heuristic(n_tokens: int, d: int, vocab: int,
                                          itemsize: int) -> LinearCrossEntropyConfig:
    bt, bv, bd = _fit(n_tokens, 64), _fit(vocab, 128), _fit(d, 64)
    return LinearCrossEntropyConfig(bt, bv, bd, _chunk_columns(n_tokens, vocab, itemsize, bv),
                                    num_warps=4, num_stages=3)


def linear_cross_entropy_config_space(n_tokens: int, d: int, vocab: int,
                                      itemsize: int) -> list[LinearCrossEntropyConfig]:
    space = set()
    for bt, bv, bd, warps, stages in [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
                                      (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
                                      (64, 128, 32, 4, 4), (128, 256, 64, 8, 3)]:
        bt, bv, bd = _fit(n_tokens, bt), _fit(vocab, bv), _fit(d, bd)
        space.add(LinearCrossEntropyConfig(
            bt, bv, bd, _chunk_columns(n_tokens, vocab, itemsize, bv), warps, stages))
    return sorted(space, key=dataclasses.astuple)


def _normalize_labels(labels, vocab: int):
    labels = labels.astype(jnp.int32)
    return jnp.where(labels < 0, labels + vocab, labels)


def _bound(dim: int, block: int):
    """The limit to mask indices against, or None when blocks tile `dim` exactly."""
    return None if dim % block == 0 else dim


def _mask2(row_ids, col_ids, row_bound, col_bound):
    shape = (row_ids.size, col_ids.size)
    mask = None
    if row_bound is not None:
        mask = jnp.broadcast_to((row_ids < row_bound)[:, None], shape)
    if col_bound is not None:
        cols = jnp.broadcast_to((col_ids < col_bound)[None, :], shape)
        mask = cols if mask is None else mask & cols
    return mask


def _load(ref, mask):
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0)


def _vector_mask(ids, bound):
    return None if bound is None else ids < bound


def _params(config):
    return compat.gpu_compiler_params(num_warps=config.num_warps, num_stages=config.num_stages,
                                      interpret=interpret_mode())


# ----------------------------------------------------------------------------------------------
# softmax_cross_entropy: forward kernel

def _softmax_ce_forward_kernel(logits_ref, labels_ref, loss_ref, lse_ref, *, n_rows, vocab,
                               block_vocab):
    block_rows = labels_ref.shape[0]
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    row_bound, col_bound = _bound(n_rows, block_rows), _bound(vocab, block_vocab)
    row_mask = _vector_mask(rows, row_bound)
    labels = _load(labels_ref, row_mask)

    def step(s, carry):
        running_max, running_sum, picked = carry
        v0 = pl.multiple_of(s * block_vocab, block_vocab)
        cols = v0 + jnp.arange(block_vocab)
        t = _load(logits_ref.at[:, pl.ds(v0, block_vocab)],
                  _mask2(rows, cols, row_bound, col_bound)).astype(jnp.float32)
        if col_bound is not None:
            t = jnp.where((cols < vocab)[None, :], t, -jnp.inf)
        new_max = jnp.maximum(running_max, jnp.max(t, axis=1))
        running_sum = (running_sum * jnp.exp(running_max - new_max)
                       + jnp.sum(jnp.exp(t - new_max[:, None]), axis=1))
        picked = picked + jnp.sum(jnp.where(cols[None, :] == labels[:, None], t, 0.0), axis=1)
        return new_max, running_sum, picked

    init = (jnp.full((block_rows,), -jnp.inf, jnp.float32), jnp.zeros((block_rows,), jnp.float32),
            jnp.zeros((block_rows,), jnp.float32))
    running_max, running_sum, picked = lax.fori_loop(0, pl.cdiv(vocab, block_vocab), step, init)
    lse = running_max + jnp.log(running_sum)
    loss = jnp.where((labels >= 0) & (labels < vocab), lse - picked, jnp.nan)
    plgpu.store(loss_ref, loss.astype(loss_ref.dtype), mask=row_mask)
    plgpu.store(lse_ref, lse, mask=row_mask)


# Forward wrapper

def softmax_cross_entropy_forward(logits, labels, config: CrossEntropyConfig):
    """logits [rows, vocab], labels [rows] (normalised) -> (loss [rows], lse [rows] float32)."""
    n_rows, vocab = logits.shape
    br, bv = config.block_rows, config.block_vocab
    v_padded = pl.cdiv(vocab, bv) * bv
    rows = pl.BlockSpec((br,), lambda i: (i,))
    return pl.pallas_call(
        functools.partial(_softmax_ce_forward_kernel, n_rows=n_rows, vocab=vocab,
                          block_vocab=bv),
        out_shape=[jax.ShapeDtypeStruct((n_rows,), logits.dtype),
                   jax.ShapeDtypeStruct((n_rows,), jnp.float32)],
        grid=(pl.cdiv(n_rows, br),),
        in_specs=[pl.BlockSpec((br, v_padded), lambda i: (i, 0)), rows],
        out_specs=[rows, rows],
        compiler_params=_params(config),
        interpret=interpret_mode(),
        name="softmax_cross_entropy_fwd",
    )(logits, labels)


# Backward kernel

def _softmax_ce_backward_kernel(logits_ref, labels_ref, lse_ref, dloss_ref, dlogits_ref, *,
                                n_rows, vocab, block_vocab):
    block_rows = labels_ref.shape[0]
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    row_bound, col_bound = _bound(n_rows, block_rows), _bound(vocab, block_vocab)
    row_mask = _vector_mask(rows, row_bound)
    labels = _load(labels_ref, row_mask)
    lse = _load(lse_ref, row_mask)
    dloss = _load(dloss_ref, row_mask)

    @pl.loop(0, pl.cdiv(vocab, block_vocab))
    def _(s):
        v0 = pl.multiple_of(s * block_vocab, block_vocab)
        cols = v0 + jnp.arange(block_vocab)
        chunk = dlogits_ref.at[:, pl.ds(v0, block_vocab)]
        mask = _mask2(rows, cols, row_bound, col_bound)
        t = _load(logits_ref.at[:, pl.ds(v0, block_vocab)], mask).astype(jnp.float32)
        p = jnp.exp(t - lse[:, None])
        d = (p - jnp.where(cols[None, :] == labels[:, None], 1.0, 0.0)) * dloss[:, None]
        plgpu.store(chunk, d.astype(chunk.dtype), mask=mask)


# Backward wrapper

def softmax_cross_entropy_backward(logits, labels, lse, dloss, config: CrossEntropyConfig):
    n_rows, vocab = logits.shape
    br, bv = config.block_rows, config.block_vocab
    v_padded = pl.cdiv(vocab, bv) * bv
    rows = pl.BlockSpec((br,), lambda i: (i,))
    full_rows = pl.BlockSpec((br, v_padded), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(_softmax_ce_backward_kernel, n_rows=n_rows, vocab=vocab,
                          block_vocab=bv),
        out_shape=jax.ShapeDtypeStruct(logits.shape, logits.dtype),
        grid=(pl.cdiv(n_rows, br),),
        in_specs=[full_rows, rows, rows, rows],
        out_specs=full_rows,
        compiler_params=_params(config),
        interpret=interpret_mode(),
        name="softmax_cross_entropy_bwd",
    )(logits, labels, lse, dloss.astype(jnp.float32))


# custom_vjp wiring

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _softmax_ce_pallas(logits, labels, config):
    return softmax_cross_entropy_forward(logits, labels, config)[0]


def _softmax_ce_pallas_fwd(logits, labels, config):
    loss, lse = softmax_cross_entropy_forward(logits, labels, config)
    return loss, (logits, labels, lse)


def _softmax_ce_pallas_bwd(config, residuals, dloss):
    logits, labels, lse = residuals
    return softmax_cross_entropy_backward(logits, labels, lse, dloss, config), None


_softmax_ce_pallas.defvjp(_softmax_ce_pallas_fwd, _softmax_ce_pallas_bwd)


@softmax_cross_entropy_op.register("pallas")
def softmax_cross_entropy_pallas(logits, labels, *, config: CrossEntropyConfig | None = None):
    """softmax_cross_entropy through the Pallas kernels; `config` fixes block sizes."""
    vocab = logits.shape[-1]
    if labels.size == 0:
        return jnp.zeros(labels.shape, logits.dtype)
    logits2d = logits.reshape(-1, vocab)
    if config is None:
        config = tuned_config("softmax_cross_entropy/pallas", softmax_cross_entropy_pallas,
                              (logits, labels), {},
                              cross_entropy_config_space(logits2d.shape[0], vocab),
                              cross_entropy_config_heuristic(logits2d.shape[0], vocab))
    loss = _softmax_ce_pallas(logits2d, _normalize_labels(labels.reshape(-1), vocab), config)
    return loss.reshape(labels.shape)


@softmax_cross_entropy_op.register("xla")
def softmax_cross_entropy_xla(logits, labels):
    """log-sum-exp in float32 minus the label's logit; differentiated by JAX."""
    logits32 = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits32, axis=-1)
    picked = jnp.take_along_axis(logits32, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return (lse - picked).astype(logits.dtype)


# ----------------------------------------------------------------------------------------------
# linear_cross_entropy: forward kernel

def _logit_tile(x_ref, w_ref, col0, rows, cols, *, layout, d, block_vocab, block_depth,
                row_bound, vocab_bound):
    """f32 [block_tokens, block_vocab] tile of x @ w for columns col0 + arange(block_vocab)."""
    d_bound = _bound(d, block_depth)

    def step(s, acc):
        k0 = pl.multiple_of(s * block_depth, block_depth)
        depth = k0 + jnp.arange(block_depth)
        x = _load(x_ref.at[:, pl.ds(k0, block_depth)], _mask2(rows, depth, row_bound, d_bound))
        if layout == "dv":
            w = _load(w_ref.at[pl.ds(k0, block_depth), pl.ds(col0, block_vocab)],
                      _mask2(depth, cols, d_bound, vocab_bound))
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)
        w = _load(w_ref.at[pl.ds(col0, block_vocab), pl.ds(k0, block_depth)],
                  _mask2(cols, depth, vocab_bound, d_bound))
        return acc + lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    return lax.fori_loop(0, pl.cdiv(d, block_depth), step,
                         jnp.zeros((rows.size, block_vocab), jnp.float32))


def _linear_ce_forward_kernel(x_ref, w_ref, labels_ref, max_ref, sum_ref, picked_ref, *, layout,
                              n_tokens, d, vocab, block_vocab, block_depth, blocks_per_split,
                              ragged):
    """Online log-sum-exp over one split of the vocabulary blocks: partial max, sum, label logit."""
    block_tokens = labels_ref.shape[0]
    rows = pl.program_id(0) * block_tokens + jnp.arange(block_tokens)
    row_bound, vocab_bound = _bound(n_tokens, block_tokens), _bound(vocab, block_vocab)
    row_mask = _vector_mask(rows, row_bound)
    labels = _load(labels_ref, row_mask)
    n_blocks = pl.cdiv(vocab, block_vocab)
    first_block = pl.program_id(1) * blocks_per_split
    tile = functools.partial(_logit_tile, x_ref, w_ref, layout=layout, d=d,
                             block_vocab=block_vocab, block_depth=block_depth,
                             row_bound=row_bound, vocab_bound=vocab_bound)

    def step(s, carry):
        running_max, running_sum, picked = carry
        block = first_block + s
        if ragged:  # the last split runs past the vocabulary: redo its last block, masked out
            keep_block = block < n_blocks
            block = jnp.minimum(block, n_blocks - 1)
        v0 = pl.multiple_of(block * block_vocab, block_vocab)
        cols = v0 + jnp.arange(block_vocab)
        keep = None if vocab_bound is None else (cols < vocab)[None, :]
        if ragged:
            keep = keep_block if keep is None else keep & keep_block
        t = tile(v0, rows, cols)
        hit = cols[None, :] == labels[:, None]
        if keep is not None:
            t = jnp.where(keep, t, -jnp.inf)
            hit = hit & keep
        new_max = jnp.maximum(running_max, jnp.max(t, axis=1))
        running_sum = (running_sum * jnp.exp(running_max - new_max)
                       + jnp.sum(jnp.exp(t - new_max[:, None]), axis=1))
        return new_max, running_sum, picked + jnp.sum(jnp.where(hit, t, 0.0), axis=1)

    init = (jnp.full((block_tokens,), -jnp.inf, jnp.float32),
            jnp.zeros((block_tokens,), jnp.float32), jnp.zeros((block_tokens,), jnp.float32))
    running_max, running_sum, picked = lax.fori_loop(0, blocks_per_split, step, init)
    plgpu.store(max_ref, running_max, mask=row_mask)
    plgpu.store(sum_ref, running_sum, mask=row_mask)
    plgpu.store(picked_ref, picked, mask=row_mask)


def _linear_ce_combine_kernel(max_ref, sum_ref, picked_ref, labels_ref, loss_ref, lse_ref, *,
                              n_tokens, vocab, splits):
    """Merge the splits' partial log-sum-exps; NaN loss where the label is out of range."""
    padded_splits, block_tokens = max_ref.shape
    rows = pl.program_id(0) * block_tokens + jnp.arange(block_tokens)
    row_mask = _vector_mask(rows, _bound(n_tokens, block_tokens))
    mask = _mask2(jnp.arange(padded_splits), rows, _bound(splits, padded_splits),
                  _bound(n_tokens, block_tokens))
    if mask is None:
        partial_max, partial_sum, picked = (plgpu.load(r) for r in (max_ref, sum_ref, picked_ref))
    else:
        partial_max = plgpu.load(max_ref, mask=mask, other=-jnp.inf)
        partial_sum = plgpu.load(sum_ref, mask=mask, other=0.0)
        picked = plgpu.load(picked_ref, mask=mask, other=0.0)
    total_max = jnp.max(partial_max, axis=0)
    total = jnp.sum(partial_sum * jnp.exp(partial_max - total_max[None, :]), axis=0)
    lse = total_max + jnp.log(total)
    labels = _load(labels_ref, row_mask)
    loss = jnp.where((labels >= 0) & (labels < vocab), lse - jnp.sum(picked, axis=0), jnp.nan)
    plgpu.store(loss_ref, loss.astype(loss_ref.dtype), mask=row_mask)
    plgpu.store(lse_ref, lse, mask=row_mask)


def _whole(shape):
    """A block spec handing every program the whole array (indexed inside the kernel)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _w_padded_shape(layout, d, vocab, config):
    d_padded = pl.cdiv(d, config.block_depth) * config.block_depth
    v_padded = pl.cdiv(vocab, config.chunk_vocab) * config.chunk_vocab
    return (d_padded, v_padded) if layout == "dv" else (v_padded, d_padded)


def _vocab_splits(n_tokens: int, vocab: int, config) -> tuple[int, int]:
    """(splits, vocabulary blocks per split) giving about config.forward_programs programs."""
    n_blocks = pl.cdiv(vocab, config.block_vocab)
    token_blocks = pl.cdiv(n_tokens, config.block_tokens)
    wanted = min(n_blocks, pl.next_power_of_2(pl.cdiv(config.forward_programs, token_blocks)))
    per_split = pl.cdiv(n_blocks, wanted)
    return pl.cdiv(n_blocks, per_split), per_split


# Forward wrapper

def linear_cross_entropy_forward(x, w, labels, layout, out_dtype, config):
    """x [tokens, d], labels [tokens] (normalised) -> (loss [tokens], lse [tokens] float32).

    The vocabulary is split across programs as well as the tokens (a few hundred programs keep
    the GPU busy); a second, small kernel merges the splits.
    """
    n_tokens, d = x.shape
    vocab = w.shape[1] if layout == "dv" else w.shape[0]
    bt = config.block_tokens
    d_padded = pl.cdiv(d, config.block_depth) * config.block_depth
    splits, per_split = _vocab_splits(n_tokens, vocab, config)
    partial_shape = jax.ShapeDtypeStruct((splits, n_tokens), jnp.float32)
    partial_block = pl.BlockSpec((compat.squeezed, bt), lambda i, s: (s, i))
    partials = pl.pallas_call(
        functools.partial(_linear_ce_forward_kernel, layout=layout, n_tokens=n_tokens, d=d,
                          vocab=vocab, block_vocab=config.block_vocab,
                          block_depth=config.block_depth, blocks_per_split=per_split,
                          ragged=splits * per_split != pl.cdiv(vocab, config.block_vocab)),
        out_shape=[partial_shape] * 3,
        grid=(pl.cdiv(n_tokens, bt), splits),
        in_specs=[pl.BlockSpec((bt, d_padded), lambda i, s: (i, 0)),
                  _whole(_w_padded_shape(layout, d, vocab, config)),
                  pl.BlockSpec((bt,), lambda i, s: (i,))],
        out_specs=[partial_block] * 3,
        compiler_params=_params(config),
        interpret=interpret_mode(),
        name="linear_cross_entropy_fwd",
    )(x, w, labels)
    tokens = pl.BlockSpec((bt,), lambda i: (i,))
    all_splits = pl.BlockSpec((pl.next_power_of_2(splits), bt), lambda i: (0, i))
    return pl.pallas_call(
        functools.partial(_linear_ce_combine_kernel, n_tokens=n_tokens, vocab=vocab,
                          splits=splits),
        out_shape=[jax.ShapeDtypeStruct((n_tokens,), out_dtype),
                   jax.ShapeDtypeStruct((n_tokens,), jnp.float32)],
        grid=(pl.cdiv(n_tokens, bt),),
        in_specs=[all_splits] * 3 + [tokens],
        out_specs=[tokens, tokens],
        compiler_params=compat.gpu_compiler_params(num_warps=4, num_stages=1,
                                                   interpret=interpret_mode()),
        interpret=interpret_mode(),
        name="linear_cross_entropy_fwd_combine",
    )(*partials, labels)


# Backward kernels (one vocabulary chunk of `chunk_vocab` columns starting at offset_ref[0])

def _linear_ce_dlogits_kernel(x_ref, w_ref, labels_ref, lse_ref, dloss_ref, offset_ref,
                              dlogits_ref, *, layout, n_tokens, d, vocab, block_depth):
    """dlogits tile = (softmax - onehot) * dloss, for this chunk's columns; 0 past the vocab."""
    block_tokens, block_vocab = dlogits_ref.shape
    rows = pl.program_id(0) * block_tokens + jnp.arange(block_tokens)
    col0 = offset_ref[0] + pl.program_id(1) * block_vocab
    cols = col0 + jnp.arange(block_vocab)
    row_bound = _bound(n_tokens, block_tokens)
    row_mask = _vector_mask(rows, row_bound)
    labels, lse, dloss = (_load(r, row_mask) for r in (labels_ref, lse_ref, dloss_ref))
    t = _logit_tile(x_ref, w_ref, pl.multiple_of(col0, block_vocab), rows, cols, layout=layout,
                    d=d, block_vocab=block_vocab, block_depth=block_depth, row_bound=row_bound,
                    vocab_bound=vocab)
    p = jnp.where((cols < vocab)[None, :], jnp.exp(t - lse[:, None]), 0.0)
    dlogits = (p - jnp.where(cols[None, :] == labels[:, None], 1.0, 0.0)) * dloss[:, None]
    plgpu.store(dlogits_ref, dlogits.astype(dlogits_ref.dtype),
                mask=_mask2(rows, cols, row_bound, None))


def _linear_ce_dx_kernel(dlogits_ref, w_ref, offset_ref, dx_in_ref, dx_ref, *, layout,
                         n_tokens, d, vocab, block_vocab):
    """dx tile += dlogits_chunk @ w_chunk^T (float32, in place)."""
    block_tokens, block_depth = dx_ref.shape
    chunk = dlogits_ref.shape[1]
    rows = pl.program_id(0) * block_tokens + jnp.arange(block_tokens)
    depth = pl.program_id(1) * block_depth + jnp.arange(block_depth)
    row_bound, d_bound = _bound(n_tokens, block_tokens), _bound(d, block_depth)
    offset = offset_ref[0]
    k0 = pl.program_id(1) * block_depth

    def step(s, acc):
        c0 = pl.multiple_of(s * block_vocab, block_vocab)
        cols = offset + c0 + jnp.arange(block_vocab)
        dl = _load(dlogits_ref.at[:, pl.ds(c0, block_vocab)],
                   _mask2(rows, cols, row_bound, None))
        w_cols = pl.ds(pl.multiple_of(offset + c0, block_vocab), block_vocab)
        if layout == "dv":
            w = _load(w_ref.at[pl.ds(k0, block_depth), w_cols],
                      _mask2(depth, cols, d_bound, vocab))
            return acc + lax.dot_general(dl, w, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
        w = _load(w_ref.at[w_cols, pl.ds(k0, block_depth)], _mask2(cols, depth, vocab, d_bound))
        return acc + jnp.dot(dl, w, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, chunk // block_vocab, step,
                        jnp.zeros((block_tokens, block_depth), jnp.float32))
    mask = _mask2(rows, depth, row_bound, d_bound)
    plgpu.store(dx_ref, _load(dx_in_ref, mask) + acc, mask=mask)


def _linear_ce_dw_kernel(x_ref, dlogits_ref, offset_ref, dw_in_ref, dw_ref, *, layout,
                         n_tokens, d, vocab, block_tokens, block_depth, block_vocab):
    """dw tile for this chunk = x^T @ dlogits over all tokens, written into the whole dw."""
    del dw_in_ref  # aliased to dw_ref: the columns of other chunks stay as they are
    depth = pl.program_id(0) * block_depth + jnp.arange(block_depth)
    c0 = pl.program_id(1) * block_vocab
    col0 = pl.multiple_of(offset_ref[0] + c0, block_vocab)
    cols = col0 + jnp.arange(block_vocab)
    d_bound, row_bound = _bound(d, block_depth), _bound(n_tokens, block_tokens)

    def step(s, acc):
        r0 = pl.multiple_of(s * block_tokens, block_tokens)
        rows = r0 + jnp.arange(block_tokens)
        x = _load(x_ref.at[pl.ds(r0, block_tokens), :], _mask2(rows, depth, row_bound, d_bound))
        dl = _load(dlogits_ref.at[pl.ds(r0, block_tokens), :], _mask2(rows, cols, row_bound, None))
        if layout == "dv":
            return acc + lax.dot_general(x, dl, (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)
        return acc + lax.dot_general(dl, x, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    shape = (block_depth, block_vocab) if layout == "dv" else (block_vocab, block_depth)
    acc = lax.fori_loop(0, pl.cdiv(n_tokens, block_tokens), step, jnp.zeros(shape, jnp.float32))
    k0 = pl.program_id(0) * block_depth
    if layout == "dv":
        plgpu.store(dw_ref.at[pl.ds(k0, block_depth), pl.ds(col0, block_vocab)],
                    acc.astype(dw_ref.dtype), mask=_mask2(depth, cols, d_bound, vocab))
    else:
        plgpu.store(dw_ref.at[pl.ds(col0, block_vocab), pl.ds(k0, block_depth)],
                    acc.astype(dw_ref.dtype), mask=_mask2(cols, depth, vocab, d_bound))


# Backward wrapper

def linear_cross_entropy_backward(x, w, labels, lse, dloss, layout, config):
    """(dx, dw) by vocabulary chunks; the largest temporary is [tokens, chunk_vocab]."""
    n_tokens, d = x.shape
    vocab = w.shape[1] if layout == "dv" else w.shape[0]
    bt, bv, bd, chunk = (config.block_tokens, config.block_vocab, config.block_depth,
                         config.chunk_vocab)
    d_padded = pl.cdiv(d, bd) * bd
    t_padded = pl.cdiv(n_tokens, bt) * bt
    w_block = _whole(_w_padded_shape(layout, d, vocab, config))
    tokens = pl.BlockSpec((bt,), lambda i, j: (i,))
    offset_spec = pl.BlockSpec((1,), lambda i, j: (0,))
    common = dict(layout=layout, n_tokens=n_tokens, d=d, vocab=vocab)

    dlogits_call = pl.pallas_call(
        functools.partial(_linear_ce_dlogits_kernel, block_depth=bd, **common),
        out_shape=jax.ShapeDtypeStruct((n_tokens, chunk), x.dtype),
        grid=(pl.cdiv(n_tokens, bt), chunk // bv),
        in_specs=[pl.BlockSpec((bt, d_padded), lambda i, j: (i, 0)), w_block, tokens, tokens,
                  tokens, offset_spec],
        out_specs=pl.BlockSpec((bt, bv), lambda i, j: (i, j)),
        compiler_params=_params(config),
        interpret=interpret_mode(),
        name="linear_cross_entropy_bwd_dlogits",
    )
    dx_call = pl.pallas_call(
        functools.partial(_linear_ce_dx_kernel, block_vocab=bv, **common),
        out_shape=jax.ShapeDtypeStruct((n_tokens, d), jnp.float32),
        grid=(pl.cdiv(n_tokens, bt), pl.cdiv(d, bd)),
        in_specs=[pl.BlockSpec((bt, chunk), lambda i, j: (i, 0)), w_block, offset_spec,
                  pl.BlockSpec((bt, bd), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
        input_output_aliases={3: 0},
        compiler_params=_params(config),
        interpret=interpret_mode(),
        name="linear_cross_entropy_bwd_dx",
    )
    dw_call = pl.pallas_call(
        functools.partial(_linear_ce_dw_kernel, block_tokens=bt, block_depth=bd, block_vocab=bv,
                          **common),
        out_shape=jax.ShapeDtypeStruct(w.shape, w.dtype),
        grid=(pl.cdiv(d, bd), chunk // bv),
        in_specs=[pl.BlockSpec((t_padded, bd), lambda i, j: (0, i)),
                  pl.BlockSpec((t_padded, bv), lambda i, j: (0, j)), offset_spec, w_block],
        out_specs=w_block,
        input_output_aliases={3: 0},
        compiler_params=_params(config),
        interpret=interpret_mode(),
        name="linear_cross_entropy_bwd_dw",
    )
    dloss = dloss.astype(jnp.float32)

    def chunk_step(c, carry):
        dx, dw = carry
        offset = (c * chunk).astype(jnp.int32).reshape(1)
        dlogits = dlogits_call(x, w, labels, lse, dloss, offset)
        return dx_call(dlogits, w, offset, dx), dw_call(x, dlogits, offset, dw)

    dx, dw = lax.fori_loop(0, pl.cdiv(vocab, chunk), chunk_step,
                           (jnp.zeros((n_tokens, d), jnp.float32), jnp.zeros_like(w)))
    return dx.astype(x.dtype), dw


# custom_vjp wiring

def linear_loss_dtype(x, w):
    """The dtype of linear_cross_entropy's losses: at least float32. The log-sum-exp is
    accumulated in float32; rounding the loss to bf16 would throw away what a float32 loss
    computed from bf16 logits keeps."""
    return jnp.promote_types(jnp.result_type(x, w), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _linear_ce_pallas(x, w, labels, layout, config):
    return linear_cross_entropy_forward(x, w, labels, layout, linear_loss_dtype(x, w), config)[0]


def _linear_ce_pallas_fwd(x, w, labels, layout, config):
    loss, lse = linear_cross_entropy_forward(x, w, labels, layout, linear_loss_dtype(x, w), config)
    return loss, (x, w, labels, lse)


def _linear_ce_pallas_bwd(layout, config, residuals, dloss):
    x, w, labels, lse = residuals
    dx, dw = linear_cross_entropy_backward(x, w, labels, lse, dloss, layout, config)
    return dx, dw, None


_linear_ce_pallas.defvjp(_linear_ce_pallas_fwd, _linear_ce_pallas_bwd)


@linear_cross_entropy_op.register("pallas")
def linear_cross_entropy_pallas(x, w, labels, *, w_layout: str = "dv",
                                config: LinearCrossEntropyConfig | None = None):
    """linear_cross_entropy through the Pallas kernels; `config` fixes block sizes."""
    d = x.shape[-1]
    vocab = w.shape[1] if w_layout == "dv" else w.shape[0]
    dtype = jnp.result_type(x, w)
    if labels.size == 0:
        return jnp.zeros(labels.shape, linear_loss_dtype(x, w))
    x2d = x.reshape(-1, d).astype(dtype)
    w = w.astype(dtype)
    if config is None:
        shape = (x2d.shape[0], d, vocab, jnp.dtype(dtype).itemsize)
        config = tuned_config("linear_cross_entropy/pallas", linear_cross_entropy_pallas,
                              (x, w, labels), {"w_layout": w_layout},
                              linear_cross_entropy_config_space(*shape),
                              linear_cross_entropy_config_heuristic(*shape))
    loss = _linear_ce_pallas(x2d, w, _normalize_labels(labels.reshape(-1), vocab), w_layout,
                             config)
    return loss.reshape(labels.shape)


# ----------------------------------------------------------------------------------------------
# linear_cross_entropy, "xla": the same vocabulary chunking with lax loops and XLA matmuls.

def _xla_chunks(vocab: int, chunk: int) -> list[tuple[int, int]]:
    """[(chunk size, count)]: the full chunks, then the tail if `chunk` does not divide vocab."""
    full, tail = divmod(vocab, chunk)
    return [(chunk, full)] + ([(tail, 1)] if tail else [])


def _xla_chunk_logits(x, w, start, size, layout):
    """float32 logits of one column chunk, and the chunk of w.

    The matmul writes them in the inputs' dtype, as `x @ w` does, and they are widened after:
    the chunk round-trips through memory, so float32 there would double its traffic.
    """
    axis = 1 if layout == "dv" else 0
    w_chunk = lax.dynamic_slice_in_dim(w, start, size, axis=axis)
    dims = (((1,), (0,)), ((), ())) if layout == "dv" else (((1,), (1,)), ((), ()))
    return lax.dot_general(x, w_chunk, dims).astype(jnp.float32), w_chunk


def _xla_for_each_chunk(vocab, chunk, body, carry):
    """Run body(start, size, carry) over column chunks: a fori_loop, then the tail if any."""
    start = 0
    for size, count in _xla_chunks(vocab, chunk):
        first = start
        carry = lax.fori_loop(0, count,
                              lambda c, carry, size=size, first=first:
                              body(first + c * size, size, carry), carry)
        start += size * count
    return carry


def _linear_ce_xla_forward(x, w, labels, layout, chunk):
    n_tokens = x.shape[0]
    vocab = w.shape[1] if layout == "dv" else w.shape[0]

    def body(start, size, carry):
        running_max, running_sum, picked = carry
        t, _ = _xla_chunk_logits(x, w, start, size, layout)
        new_max = jnp.maximum(running_max, jnp.max(t, axis=1))
        running_sum = (running_sum * jnp.exp(running_max - new_max)
                       + jnp.sum(jnp.exp(t - new_max[:, None]), axis=1))
        hit = labels[:, None] == start + jnp.arange(size)
        return new_max, running_sum, picked + jnp.sum(jnp.where(hit, t, 0.0), axis=1)

    init = (jnp.full((n_tokens,), -jnp.inf, jnp.float32), jnp.zeros((n_tokens,), jnp.float32),
            jnp.zeros((n_tokens,), jnp.float32))
    running_max, running_sum, picked = _xla_for_each_chunk(vocab, chunk, body, init)
    lse = running_max + jnp.log(running_sum)
    loss = jnp.where((labels >= 0) & (labels < vocab), lse - picked, jnp.nan)
    return loss, lse


def _linear_ce_xla_backward(x, w, labels, lse, dloss, layout, chunk):
    vocab = w.shape[1] if layout == "dv" else w.shape[0]
    dloss = dloss.astype(jnp.float32)

    def body(start, size, carry):
        dx, dw = carry
        t, w_chunk = _xla_chunk_logits(x, w, start, size, layout)
        onehot = labels[:, None] == start + jnp.arange(size)
        dlogits = ((jnp.exp(t - lse[:, None]) - onehot) * dloss[:, None]).astype(x.dtype)
        if layout == "dv":
            dx = dx + lax.dot_general(dlogits, w_chunk, (((1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.float32)
            dw_chunk = lax.dot_general(x, dlogits, (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)
            return dx, lax.dynamic_update_slice_in_dim(dw, dw_chunk.astype(dw.dtype), start, 1)
        dx = dx + jnp.dot(dlogits, w_chunk, preferred_element_type=jnp.float32)
        dw_chunk = lax.dot_general(dlogits, x, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        return dx, lax.dynamic_update_slice_in_dim(dw, dw_chunk.astype(dw.dtype), start, 0)

    dx, dw = _xla_for_each_chunk(vocab, chunk, body,
                                 (jnp.zeros(x.shape, jnp.float32), jnp.zeros_like(w)))
    return dx.astype(x.dtype), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _linear_ce_xla(x, w, labels, layout, chunk):
    return _linear_ce_xla_forward(x, w, labels, layout, chunk)[0]


def _linear_ce_xla_fwd(x, w, labels, layout, chunk):
    loss, lse = _linear_ce_xla_forward(x, w, labels, layout, chunk)
    return loss, (x, w, labels, lse)


def _linear_ce_xla_bwd(layout, chunk, residuals, dloss):
    x, w, labels, lse = residuals
    dx, dw = _linear_ce_xla_backward(x, w, labels, lse, dloss, layout, chunk)
    return dx, dw, None


_linear_ce_xla.defvjp(_linear_ce_xla_fwd, _linear_ce_xla_bwd)


@linear_cross_entropy_op.register("xla")
def linear_cross_entropy_xla(x, w, labels, *, w_layout: str = "dv"):
    """Chunked over the vocabulary with lax loops (custom_vjp), XLA doing the matmuls."""
    d = x.shape[-1]
    vocab = w.shape[1] if w_layout == "dv" else w.shape[0]
    dtype = jnp.result_type(x, w)
    if labels.size == 0:
        return jnp.zeros(labels.shape, linear_loss_dtype(x, w))
    x2d = x.reshape(-1, d).astype(dtype)
    # Chunks whose logits take about 64 MB; at least 128 columns (the whole vocab if less).
    chunk = min(vocab, _chunk_columns(x2d.shape[0], vocab, jnp.dtype(dtype).itemsize, 128))
    loss = _linear_ce_xla(x2d, w.astype(dtype), _normalize_labels(labels.reshape(-1), vocab),
                          w_layout, chunk)
    return loss.astype(linear_loss_dtype(x, w)).reshape(labels.shape)


# ----------------------------------------------------------------------------------------------
# Public functions

def _check_labels(name: str, labels, batch_shape) -> None:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name}: labels must be integers (class indices); got {labels.dtype}")
    if tuple(labels.shape) != tuple(batch_shape):
        raise ValueError(f"{name}: labels must have shape {tuple(batch_shape)} (the leading axes "
                         f"of the inputs); got {tuple(labels.shape)}")


def softmax_cross_entropy(logits, labels, implementation=None):
    """Per-example cross-entropy: logsumexp(logits) - logits[label], over the last axis.

    Args:
      logits: [..., vocab] floats.
      labels: [...] integers; negative ones count from the end, ones outside [-vocab, vocab)
        give NaN (as with `jnp.take_along_axis`).
      implementation: None (choose), "pallas", "xla", or a list tried in order.

    Returns:
      [...] losses in logits' dtype (computed in float32).
    """
    if logits.ndim < 1:
        raise ValueError("softmax_cross_entropy: logits must have a vocabulary axis; got a scalar")
    _check_labels("softmax_cross_entropy", labels, logits.shape[:-1])
    return softmax_cross_entropy_op(logits, labels, implementation=implementation)


def linear_cross_entropy(x, w, labels, *, w_layout: str = "dv", implementation=None):
    """softmax_cross_entropy(x @ w, labels) without materialising the [tokens, vocab] logits.

    Args:
      x: [..., d] activations.
      w: [d, vocab] with w_layout="dv", or [vocab, d] with w_layout="vd" (a tied embedding table,
        used as it is, without a transpose).
      labels: [...] integers, as in `softmax_cross_entropy`.
      implementation: None (choose), "pallas", "xla", or a list tried in order.

    Returns:
      [...] per-example losses in float32 (float64 for float64 inputs), whatever the inputs'
      dtype: see `linear_loss_dtype`.
    """
    if w_layout not in W_LAYOUTS:
        raise ValueError(f"linear_cross_entropy: w_layout must be 'dv' (w is [d, vocab]) or 'vd' "
                         f"(w is [vocab, d]); got {w_layout!r}")
    d_axis = 0 if w_layout == "dv" else 1
    if w.ndim != 2 or x.ndim < 1 or w.shape[d_axis] != x.shape[-1]:
        expected = "[d, vocab]" if w_layout == "dv" else "[vocab, d]"
        raise ValueError(f"linear_cross_entropy: with w_layout={w_layout!r} w must be {expected} "
                         f"with d = x.shape[-1]; got x {tuple(x.shape)}, w {tuple(w.shape)}")
    _check_labels("linear_cross_entropy", labels, x.shape[:-1])
    return linear_cross_entropy_op(x, w, labels, w_layout=w_layout,
                                   implementation=implementation)


def softmax_cross_entropy_reference(logits, labels):
    """logsumexp(logits) - logits[label] via take_along_axis (optax's formulation); the oracle.

    On rows whose label is out of range the loss is NaN and the gradient softmax * dloss (a
    -log_softmax(logits)[label] formulation would give a zero gradient there instead).
    """
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def linear_cross_entropy_reference(x, w, labels, *, w_layout: str = "dv"):
    """The naive version (materialises the logits); the oracle for tests."""
    logits = x @ (w if w_layout == "dv" else w.T)
    return softmax_cross_entropy_reference(logits, labels)
