"""The "xla" implementation of `linear_cross_entropy`: the Pallas implementation's vocabulary
chunking with lax loops (custom_vjp), XLA doing the matmuls."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._tiles import finish_logsumexp, online_logsumexp_step
from pallas_kernels.linear_cross_entropy.common import chunk_columns, linear_loss_dtype
from pallas_kernels.softmax_cross_entropy.common import normalize_labels


def _xla_chunks(vocab: int, chunk: int) -> list[tuple[int, int]]:
    """[(chunk size, count)]: the full chunks, then the tail if `chunk` does not divide vocab."""
    full, tail = divmod(vocab, chunk)
    return ([(chunk, full)] if full else []) + ([(tail, 1)] if tail else [])


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


def linear_ce_xla_forward(x, w, labels, layout, chunk):
    n_tokens = x.shape[0]
    vocab = w.shape[1] if layout == "dv" else w.shape[0]

    def body(start, size, carry):
        running_max, running_sum, picked = carry
        t, _ = _xla_chunk_logits(x, w, start, size, layout)
        running_max, running_sum = online_logsumexp_step(running_max, running_sum, t)
        hit = labels[:, None] == start + jnp.arange(size)
        return running_max, running_sum, picked + jnp.sum(jnp.where(hit, t, 0.0), axis=1)

    init = (jnp.full((n_tokens,), -jnp.inf, jnp.float32), jnp.zeros((n_tokens,), jnp.float32),
            jnp.zeros((n_tokens,), jnp.float32))
    running_max, running_sum, picked = _xla_for_each_chunk(vocab, chunk, body, init)
    lse = finish_logsumexp(running_max, running_sum)
    loss = jnp.where((labels >= 0) & (labels < vocab), lse - picked, jnp.nan)
    return loss, lse


def linear_ce_xla_backward(x, w, labels, lse, dloss, layout, chunk):
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
    return linear_ce_xla_forward(x, w, labels, layout, chunk)[0]


def _linear_ce_xla_fwd(x, w, labels, layout, chunk):
    loss, lse = linear_ce_xla_forward(x, w, labels, layout, chunk)
    return loss, (x, w, labels, lse)


def _linear_ce_xla_bwd(layout, chunk, residuals, dloss):
    x, w, labels, lse = residuals
    dx, dw = linear_ce_xla_backward(x, w, labels, lse, dloss, layout, chunk)
    return dx, dw, None


_linear_ce_xla.defvjp(_linear_ce_xla_fwd, _linear_ce_xla_bwd)


def linear_cross_entropy_xla(x, w, labels, *, w_layout: str = "dv"):
    """Chunked over the vocabulary with lax loops (custom_vjp), XLA doing the matmuls."""
    d = x.shape[-1]
    vocab = w.shape[1] if w_layout == "dv" else w.shape[0]
    dtype = jnp.result_type(x, w)
    if labels.size == 0:
        return jnp.zeros(labels.shape, linear_loss_dtype(x, w))
    x2d = x.reshape(labels.size, d).astype(dtype)
    # Chunks whose logits take about 64 MB; at least 128 columns (the whole vocab if less).
    chunk = max(1, min(vocab, chunk_columns(labels.size, vocab, jnp.dtype(dtype).itemsize, 128)))
    loss = _linear_ce_xla(x2d, w.astype(dtype), normalize_labels(labels.reshape(-1), vocab),
                          w_layout, chunk)
    return loss.astype(linear_loss_dtype(x, w)).reshape(labels.shape)
