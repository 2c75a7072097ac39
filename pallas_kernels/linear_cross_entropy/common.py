"""What both linear_cross_entropy implementations share: the weight layouts, the loss dtype and
the size of the vocabulary chunks the backward works on."""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

W_LAYOUTS = ("dv", "vd")


def linear_loss_dtype(x, w):
    """The dtype of linear_cross_entropy's losses: at least float32. The log-sum-exp is
    accumulated in float32; rounding the loss to bf16 would throw away what a float32 loss
    computed from bf16 logits keeps."""
    return jnp.promote_types(jnp.result_type(x, w), jnp.float32)


def chunk_columns(n_tokens: int, vocab: int, itemsize: int, block: int,
                  budget_bytes: int = 64 << 20) -> int:
    """Columns per backward chunk: a multiple of `block` whose [tokens, chunk] buffer fits."""
    blocks = max(1, budget_bytes // max(1, n_tokens * itemsize * block))
    blocks = min(1 << (blocks.bit_length() - 1), pl.cdiv(vocab, block))
    return block * blocks
