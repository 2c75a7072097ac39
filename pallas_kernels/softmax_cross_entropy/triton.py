"""softmax_cross_entropy in Pallas for GPUs (Triton): the kernels, their wrappers, the
custom_vjp wiring and the "pallas" implementation.

One program per block of rows loops over the vocabulary with an online log-sum-exp (forward) and
saves only the per-row log-sum-exp; a second kernel writes (softmax - onehot) * dloss (backward).
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
from pallas_kernels._tiles import (bound, finish_logsumexp, load, mask2, online_logsumexp_step,
                                   params, vector_mask)
from pallas_kernels.softmax_cross_entropy.common import normalize_labels


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

# ----------------------------------------------------------------------------------------------
# softmax_cross_entropy: forward kernel

def _softmax_ce_forward_kernel(logits_ref, labels_ref, loss_ref, lse_ref, *, n_rows, vocab,
                               block_vocab):
    block_rows = labels_ref.shape[0]
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    row_bound, col_bound = bound(n_rows, block_rows), bound(vocab, block_vocab)
    row_mask = vector_mask(rows, row_bound)
    labels = load(labels_ref, row_mask)

    def step(s, carry):
        running_max, running_sum, picked = carry
        v0 = pl.multiple_of(s * block_vocab, block_vocab)
        cols = v0 + jnp.arange(block_vocab)
        t = load(logits_ref.at[:, pl.ds(v0, block_vocab)],
                 mask2(rows, cols, row_bound, col_bound)).astype(jnp.float32)
        if col_bound is not None:
            t = jnp.where((cols < vocab)[None, :], t, -jnp.inf)
        running_max, running_sum = online_logsumexp_step(running_max, running_sum, t)
        picked = picked + jnp.sum(jnp.where(cols[None, :] == labels[:, None], t, 0.0), axis=1)
        return running_max, running_sum, picked

    init = (jnp.full((block_rows,), -jnp.inf, jnp.float32), jnp.zeros((block_rows,), jnp.float32),
            jnp.zeros((block_rows,), jnp.float32))
    running_max, running_sum, picked = lax.fori_loop(0, pl.cdiv(vocab, block_vocab), step, init)
    lse = finish_logsumexp(running_max, running_sum)
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
    interpret = interpret_mode()
    return compat.pallas_call(
        functools.partial(_softmax_ce_forward_kernel, n_rows=n_rows, vocab=vocab,
                          block_vocab=bv),
        out_shape=[jax.ShapeDtypeStruct((n_rows,), logits.dtype),
                   jax.ShapeDtypeStruct((n_rows,), jnp.float32)],
        grid=(pl.cdiv(n_rows, br),),
        in_specs=[pl.BlockSpec((br, v_padded), lambda i: (i, 0)), rows],
        out_specs=[rows, rows],
        compiler_params=params(config, interpret),
        interpret=interpret,
        name="softmax_cross_entropy_fwd",
    )(logits, labels)


# Backward kernel

def _softmax_ce_backward_kernel(logits_ref, labels_ref, lse_ref, dloss_ref, dlogits_ref, *,
                                n_rows, vocab, block_vocab):
    block_rows = labels_ref.shape[0]
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    row_bound, col_bound = bound(n_rows, block_rows), bound(vocab, block_vocab)
    row_mask = vector_mask(rows, row_bound)
    labels = load(labels_ref, row_mask)
    lse = load(lse_ref, row_mask)
    dloss = load(dloss_ref, row_mask)

    @pl.loop(0, pl.cdiv(vocab, block_vocab))
    def _(s):
        v0 = pl.multiple_of(s * block_vocab, block_vocab)
        cols = v0 + jnp.arange(block_vocab)
        chunk = dlogits_ref.at[:, pl.ds(v0, block_vocab)]
        mask = mask2(rows, cols, row_bound, col_bound)
        t = load(logits_ref.at[:, pl.ds(v0, block_vocab)], mask).astype(jnp.float32)
        p = jnp.exp(t - lse[:, None])
        d = (p - jnp.where(cols[None, :] == labels[:, None], 1.0, 0.0)) * dloss[:, None]
        plgpu.store(chunk, d.astype(chunk.dtype), mask=mask)


# Backward wrapper

def softmax_cross_entropy_backward(logits, labels, lse, dloss, config: CrossEntropyConfig):
    n_rows, vocab = logits.shape
    br, bv = config.block_rows, config.block_vocab
    v_padded = pl.cdiv(vocab, bv) * bv
    rows = pl.BlockSpec((br,), lambda i: (i,))
    interpret = interpret_mode()
    full_rows = pl.BlockSpec((br, v_padded), lambda i: (i, 0))
    return compat.pallas_call(
        functools.partial(_softmax_ce_backward_kernel, n_rows=n_rows, vocab=vocab,
                          block_vocab=bv),
        out_shape=jax.ShapeDtypeStruct(logits.shape, logits.dtype),
        grid=(pl.cdiv(n_rows, br),),
        in_specs=[full_rows, rows, rows, rows],
        out_specs=full_rows,
        compiler_params=params(config, interpret),
        interpret=interpret,
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


def softmax_cross_entropy_pallas(logits, labels, *, config: CrossEntropyConfig | None = None):
    """softmax_cross_entropy through the Pallas kernels; `config` fixes block sizes."""
    vocab = logits.shape[-1]
    if labels.size == 0:
        return jnp.zeros(labels.shape, logits.dtype)
    if vocab == 0:
        raise NotImplementedError("an empty vocabulary (logits [..., 0]): the kernels tile none")
    logits2d = logits.reshape(labels.size, vocab)
    if config is None:
        config = tuned_config("softmax_cross_entropy/pallas", softmax_cross_entropy_pallas,
                              (logits, labels), {},
                              cross_entropy_config_space(logits2d.shape[0], vocab),
                              cross_entropy_config_heuristic(logits2d.shape[0], vocab))
    loss = _softmax_ce_pallas(logits2d, normalize_labels(labels.reshape(-1), vocab), config)
    return loss.reshape(labels.shape)
