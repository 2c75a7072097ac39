"""linear_cross_entropy in Pallas for GPUs (Triton): the kernels, their wrappers, the custom_vjp
wiring and the "pallas" implementation.

The forward kernel computes logit tiles x_rows @ w_block in registers and folds them into an
online log-sum-exp, programs splitting the vocabulary as well as the tokens; a small kernel merges
the splits. Only the per-token log-sum-exp is saved. The backward runs over vocabulary chunks of
`chunk_vocab` columns (a lax loop): one kernel recomputes the chunk's logits and writes
dlogits = (softmax - onehot) * dloss for all tokens ([tokens, chunk], the only large temporary),
then dx += dlogits @ w_chunk^T and dw_chunk = x^T @ dlogits, each a tiled kernel writing in place.
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
from pallas_kernels._tiles import (bound, finish_logsumexp, fit, load, mask2,
                                   online_logsumexp_step, params, stable_shift, vector_mask)
from pallas_kernels.linear_cross_entropy.common import chunk_columns, linear_loss_dtype
from pallas_kernels.softmax_cross_entropy.common import normalize_labels


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


def linear_cross_entropy_config_heuristic(n_tokens: int, d: int, vocab: int,
                                          itemsize: int) -> LinearCrossEntropyConfig:
    bt, bv, bd = fit(n_tokens, 64), fit(vocab, 128), fit(d, 64)
    return LinearCrossEntropyConfig(bt, bv, bd, chunk_columns(n_tokens, vocab, itemsize, bv),
                                    num_warps=4, num_stages=3)


def linear_cross_entropy_config_space(n_tokens: int, d: int, vocab: int,
                                      itemsize: int) -> list[LinearCrossEntropyConfig]:
    space = set()
    for bt, bv, bd, warps, stages in [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
                                      (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
                                      (64, 128, 32, 4, 4), (128, 256, 64, 8, 3)]:
        bt, bv, bd = fit(n_tokens, bt), fit(vocab, bv), fit(d, bd)
        space.add(LinearCrossEntropyConfig(
            bt, bv, bd, chunk_columns(n_tokens, vocab, itemsize, bv), warps, stages))
    return sorted(space, key=dataclasses.astuple)


# ----------------------------------------------------------------------------------------------
# linear_cross_entropy: forward kernel

def _logit_tile(x_ref, w_ref, col0, rows, cols, *, layout, d, block_vocab, block_depth,
                row_bound, vocab_bound):
    """f32 [block_tokens, block_vocab] tile of x @ w for columns col0 + arange(block_vocab)."""
    d_bound = bound(d, block_depth)

    def step(s, acc):
        k0 = pl.multiple_of(s * block_depth, block_depth)
        depth = k0 + jnp.arange(block_depth)
        x = load(x_ref.at[:, pl.ds(k0, block_depth)], mask2(rows, depth, row_bound, d_bound))
        if layout == "dv":
            w = load(w_ref.at[pl.ds(k0, block_depth), pl.ds(col0, block_vocab)],
                     mask2(depth, cols, d_bound, vocab_bound))
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)
        w = load(w_ref.at[pl.ds(col0, block_vocab), pl.ds(k0, block_depth)],
                 mask2(cols, depth, vocab_bound, d_bound))
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
    row_bound, vocab_bound = bound(n_tokens, block_tokens), bound(vocab, block_vocab)
    row_mask = vector_mask(rows, row_bound)
    labels = load(labels_ref, row_mask)
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
        running_max, running_sum = online_logsumexp_step(running_max, running_sum, t)
        return running_max, running_sum, picked + jnp.sum(jnp.where(hit, t, 0.0), axis=1)

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
    row_mask = vector_mask(rows, bound(n_tokens, block_tokens))
    mask = mask2(jnp.arange(padded_splits), rows, bound(splits, padded_splits),
                 bound(n_tokens, block_tokens))
    if mask is None:
        partial_max, partial_sum, picked = (plgpu.load(r) for r in (max_ref, sum_ref, picked_ref))
    else:
        partial_max = plgpu.load(max_ref, mask=mask, other=-jnp.inf)
        partial_sum = plgpu.load(sum_ref, mask=mask, other=0.0)
        picked = plgpu.load(picked_ref, mask=mask, other=0.0)
    total_max = jnp.max(partial_max, axis=0)
    shift = stable_shift(total_max)
    total = jnp.sum(partial_sum * jnp.exp(partial_max - shift[None, :]), axis=0)
    lse = finish_logsumexp(total_max, total)
    labels = load(labels_ref, row_mask)
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
    interpret = interpret_mode()
    partial_shape = jax.ShapeDtypeStruct((splits, n_tokens), jnp.float32)
    partial_block = pl.BlockSpec((compat.squeezed, bt), lambda i, s: (s, i))
    partials = compat.pallas_call(
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
        compiler_params=params(config, interpret),
        interpret=interpret,
        name="linear_cross_entropy_fwd",
    )(x, w, labels)
    tokens = pl.BlockSpec((bt,), lambda i: (i,))
    all_splits = pl.BlockSpec((pl.next_power_of_2(splits), bt), lambda i: (0, i))
    return compat.pallas_call(
        functools.partial(_linear_ce_combine_kernel, n_tokens=n_tokens, vocab=vocab,
                          splits=splits),
        out_shape=[jax.ShapeDtypeStruct((n_tokens,), out_dtype),
                   jax.ShapeDtypeStruct((n_tokens,), jnp.float32)],
        grid=(pl.cdiv(n_tokens, bt),),
        in_specs=[all_splits] * 3 + [tokens],
        out_specs=[tokens, tokens],
        compiler_params=compat.gpu_compiler_params(num_warps=4, num_stages=1,
                                                   interpret=interpret),
        interpret=interpret,
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
    row_bound = bound(n_tokens, block_tokens)
    row_mask = vector_mask(rows, row_bound)
    labels, lse, dloss = (load(r, row_mask) for r in (labels_ref, lse_ref, dloss_ref))
    t = _logit_tile(x_ref, w_ref, pl.multiple_of(col0, block_vocab), rows, cols, layout=layout,
                    d=d, block_vocab=block_vocab, block_depth=block_depth, row_bound=row_bound,
                    vocab_bound=vocab)
    p = jnp.where((cols < vocab)[None, :], jnp.exp(t - lse[:, None]), 0.0)
    dlogits = (p - jnp.where(cols[None, :] == labels[:, None], 1.0, 0.0)) * dloss[:, None]
    plgpu.store(dlogits_ref, dlogits.astype(dlogits_ref.dtype),
                mask=mask2(rows, cols, row_bound, None))


def _linear_ce_dx_kernel(dlogits_ref, w_ref, offset_ref, dx_in_ref, dx_ref, *, layout,
                         n_tokens, d, vocab, block_vocab):
    """dx tile += dlogits_chunk @ w_chunk^T (float32, in place)."""
    block_tokens, block_depth = dx_ref.shape
    chunk = dlogits_ref.shape[1]
    rows = pl.program_id(0) * block_tokens + jnp.arange(block_tokens)
    depth = pl.program_id(1) * block_depth + jnp.arange(block_depth)
    row_bound, d_bound = bound(n_tokens, block_tokens), bound(d, block_depth)
    offset = offset_ref[0]
    k0 = pl.program_id(1) * block_depth

    def step(s, acc):
        c0 = pl.multiple_of(s * block_vocab, block_vocab)
        cols = offset + c0 + jnp.arange(block_vocab)
        dl = load(dlogits_ref.at[:, pl.ds(c0, block_vocab)],
                  mask2(rows, cols, row_bound, None))
        w_cols = pl.ds(pl.multiple_of(offset + c0, block_vocab), block_vocab)
        if layout == "dv":
            w = load(w_ref.at[pl.ds(k0, block_depth), w_cols],
                     mask2(depth, cols, d_bound, vocab))
            return acc + lax.dot_general(dl, w, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
        w = load(w_ref.at[w_cols, pl.ds(k0, block_depth)], mask2(cols, depth, vocab, d_bound))
        return acc + jnp.dot(dl, w, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, chunk // block_vocab, step,
                        jnp.zeros((block_tokens, block_depth), jnp.float32))
    mask = mask2(rows, depth, row_bound, d_bound)
    plgpu.store(dx_ref, load(dx_in_ref, mask) + acc, mask=mask)


def _linear_ce_dw_kernel(x_ref, dlogits_ref, offset_ref, dw_in_ref, dw_ref, *, layout,
                         n_tokens, d, vocab, block_tokens, block_depth, block_vocab):
    """dw tile for this chunk = x^T @ dlogits over all tokens, written into the whole dw."""
    del dw_in_ref  # aliased to dw_ref: the columns of other chunks stay as they are
    depth = pl.program_id(0) * block_depth + jnp.arange(block_depth)
    c0 = pl.program_id(1) * block_vocab
    col0 = pl.multiple_of(offset_ref[0] + c0, block_vocab)
    cols = col0 + jnp.arange(block_vocab)
    d_bound, row_bound = bound(d, block_depth), bound(n_tokens, block_tokens)

    def step(s, acc):
        r0 = pl.multiple_of(s * block_tokens, block_tokens)
        rows = r0 + jnp.arange(block_tokens)
        x = load(x_ref.at[pl.ds(r0, block_tokens), :], mask2(rows, depth, row_bound, d_bound))
        dl = load(dlogits_ref.at[pl.ds(r0, block_tokens), :], mask2(rows, cols, row_bound, None))
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
                    acc.astype(dw_ref.dtype), mask=mask2(depth, cols, d_bound, vocab))
    else:
        plgpu.store(dw_ref.at[pl.ds(col0, block_vocab), pl.ds(k0, block_depth)],
                    acc.astype(dw_ref.dtype), mask=mask2(cols, depth, vocab, d_bound))


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
    interpret = interpret_mode()

    dlogits_call = compat.pallas_call(
        functools.partial(_linear_ce_dlogits_kernel, block_depth=bd, **common),
        out_shape=jax.ShapeDtypeStruct((n_tokens, chunk), x.dtype),
        grid=(pl.cdiv(n_tokens, bt), chunk // bv),
        in_specs=[pl.BlockSpec((bt, d_padded), lambda i, j: (i, 0)), w_block, tokens, tokens,
                  tokens, offset_spec],
        out_specs=pl.BlockSpec((bt, bv), lambda i, j: (i, j)),
        compiler_params=params(config, interpret),
        interpret=interpret,
        name="linear_cross_entropy_bwd_dlogits",
    )
    dx_call = compat.pallas_call(
        functools.partial(_linear_ce_dx_kernel, block_vocab=bv, **common),
        out_shape=jax.ShapeDtypeStruct((n_tokens, d), jnp.float32),
        grid=(pl.cdiv(n_tokens, bt), pl.cdiv(d, bd)),
        in_specs=[pl.BlockSpec((bt, chunk), lambda i, j: (i, 0)), w_block, offset_spec,
                  pl.BlockSpec((bt, bd), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
        input_output_aliases={3: 0},
        compiler_params=params(config, interpret),
        interpret=interpret,
        name="linear_cross_entropy_bwd_dx",
    )
    dw_call = compat.pallas_call(
        functools.partial(_linear_ce_dw_kernel, block_tokens=bt, block_depth=bd, block_vocab=bv,
                          **common),
        out_shape=jax.ShapeDtypeStruct(w.shape, w.dtype),
        grid=(pl.cdiv(d, bd), chunk // bv),
        in_specs=[pl.BlockSpec((t_padded, bd), lambda i, j: (0, i)),
                  pl.BlockSpec((t_padded, bv), lambda i, j: (0, j)), offset_spec, w_block],
        out_specs=w_block,
        input_output_aliases={3: 0},
        compiler_params=params(config, interpret),
        interpret=interpret,
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


def linear_cross_entropy_pallas(x, w, labels, *, w_layout: str = "dv",
                                config: LinearCrossEntropyConfig | None = None):
    """linear_cross_entropy through the Pallas kernels; `config` fixes block sizes."""
    d = x.shape[-1]
    vocab = w.shape[1] if w_layout == "dv" else w.shape[0]
    dtype = jnp.result_type(x, w)
    if labels.size == 0:
        return jnp.zeros(labels.shape, linear_loss_dtype(x, w))
    if d == 0 or vocab == 0:
        raise NotImplementedError(f"zero-size logits' factors (d = {d}, vocab = {vocab}): the "
                                  f"kernels tile neither")
    x2d = x.reshape(labels.size, d).astype(dtype)
    w = w.astype(dtype)
    if config is None:
        shape = (x2d.shape[0], d, vocab, jnp.dtype(dtype).itemsize)
        config = tuned_config("linear_cross_entropy/pallas", linear_cross_entropy_pallas,
                              (x, w, labels), {"w_layout": w_layout},
                              linear_cross_entropy_config_space(*shape),
                              linear_cross_entropy_config_heuristic(*shape))
    loss = _linear_ce_pallas(x2d, w, normalize_labels(labels.reshape(-1), vocab), w_layout,
                             config)
    return loss.reshape(labels.shape)
