"""softmax_cross_entropy in Pallas for TPUs (Mosaic): the kernels, their wrappers, the custom_vjp
wiring and the TPU "pallas" implementation.

Forward: grid (row blocks, vocabulary blocks), the vocabulary axis a reduction; a running max,
sum and label logit per row live in VMEM scratch (float32) and the last vocabulary block writes
the loss and the log-sum-exp. Backward: every (row block, vocabulary block) writes
(softmax - onehot) * dloss independently. Rows and the vocabulary are padded to whole blocks;
padded columns are masked to -inf, padded rows sliced off.

Block sizes: `CrossEntropyTpuConfig` (rows and vocabulary columns per block, forward and backward
alike); `config_space` lists the tilings `tuned_config` times on a TPU, `vmem_bytes` estimates a
config's VMEM use.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _tpu_tiles as tt
from pallas_kernels._target import current
from pallas_kernels._tiles import stable_shift
from pallas_kernels.softmax_cross_entropy.common import normalize_labels

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class CrossEntropyTpuConfig:
    """Block sizes of the TPU softmax cross-entropy kernels, forward and backward."""
    block_rows: int  # a multiple of the dtype's sublane granule
    block_vocab: int  # a multiple of 128


def default_config(n_rows: int, vocab: int, dtype) -> CrossEntropyTpuConfig:
    """Up to 128 x 2048 logits per block."""
    return CrossEntropyTpuConfig(tt.fit(n_rows, 128, tt.sublanes(dtype)),
                                 tt.fit(vocab, 2048, tt.LANES))


def _vmem_parts(config: CrossEntropyTpuConfig, dtype) -> tuple[int, int]:
    """(forward, backward) VMEM estimates."""
    br, bv = config.block_rows, config.block_vocab
    return (tt.block_bytes(((br, bv), dtype), ((br, 1), jnp.int32), ((br, 2), _F32)) + 3 * br * 4,
            tt.block_bytes(((br, bv), dtype), ((br, bv), dtype), ((br, 3), _F32)))


def vmem_bytes(config: CrossEntropyTpuConfig, dtype) -> int:
    """VMEM estimate of the larger kernel, forward or backward."""
    return max(_vmem_parts(config, dtype))


def config_space(n_rows: int, vocab: int, dtype) -> list[CrossEntropyTpuConfig]:
    """The default and (128 | 256 | 512) rows x (1024 | 2048 | 4096 | 8192) columns, fitted to
    the logits, within VMEM."""
    return tt.within_budget(
        default_config(n_rows, vocab, dtype),
        [CrossEntropyTpuConfig(br, bv)
         for br in tt.block_options(n_rows, (128, 256, 512), tt.sublanes(dtype))
         for bv in tt.block_options(vocab, (1024, 2048, 4096, 8192), tt.LANES)],
        lambda c: vmem_bytes(c, dtype))


def online_step(m_ref, l_ref, t):
    """Fold a [rows, cols] float32 tile into the running max and sum held in VMEM scratch."""
    m_old = m_ref[...]
    m_new = jnp.maximum(m_old, jnp.max(t, axis=1, keepdims=True))
    shift = stable_shift(m_new)
    l_ref[...] = l_ref[...] * jnp.exp(m_old - shift) + jnp.sum(jnp.exp(t - shift), axis=1,
                                                                keepdims=True)
    m_ref[...] = m_new


def finish(m_ref, l_ref):
    """The log-sum-exp of the running (max, sum); -inf for a row of -inf."""
    return stable_shift(m_ref[...]) + jnp.log(l_ref[...])


def column_ids(shape, block: int, axis: int = 1):
    return pl.program_id(axis) * block + lax.broadcasted_iota(jnp.int32, shape, 1)


# ----------------------------------------------------------------------------------------------
# Forward kernel

def loss_block(t, cols, labels_ref, loss_ref, lse_ref, m_ref, l_ref, picked_ref, *, vocab: int):
    """One vocabulary block of the online loss, for this op and the linear one: start the row
    statistics at the first block, fold in this block's logits `t` (columns `cols`; those past
    `vocab` are padding), and write the loss and log-sum-exp after the last."""
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)
        picked_ref[...] = jnp.zeros_like(picked_ref)

    t = jnp.where(cols < vocab, t, -jnp.inf)
    online_step(m_ref, l_ref, t)
    labels = labels_ref[...]
    picked_ref[...] += jnp.sum(jnp.where(cols == labels, t, 0.0), axis=1, keepdims=True)

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        lse = finish(m_ref, l_ref)
        valid = (labels >= 0) & (labels < vocab)
        loss_ref[...] = jnp.where(valid, lse - picked_ref[...], jnp.nan).astype(loss_ref.dtype)
        lse_ref[...] = lse


def _forward_kernel(logits_ref, labels_ref, loss_ref, lse_ref, m_ref, l_ref, picked_ref, *,
                    vocab: int):
    br, bv = logits_ref.shape
    loss_block(logits_ref[...].astype(_F32), column_ids((br, bv), bv), labels_ref, loss_ref,
               lse_ref, m_ref, l_ref, picked_ref, vocab=vocab)


# Forward wrapper

def forward(logits, labels, *, vocab: int, config: CrossEntropyTpuConfig, interpret: bool):
    """Padded logits [rows, vocab_pad], labels [rows, 1] -> (loss [rows, 1], lse [rows, 1])."""
    n_rows, v_pad = logits.shape
    br, bv = config.block_rows, config.block_vocab
    row = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
    vmem = tt.check_vmem("softmax_cross_entropy forward", _vmem_parts(config, logits.dtype)[0])
    return tt.pallas_call(
        functools.partial(_forward_kernel, vocab=vocab),
        out_shape=(jax.ShapeDtypeStruct((n_rows, 1), logits.dtype),
                   jax.ShapeDtypeStruct((n_rows, 1), _F32)),
        grid=(n_rows // br, v_pad // bv),
        in_specs=[pl.BlockSpec((br, bv), lambda i, j: (i, j)), row],
        out_specs=(row, row),
        scratch_shapes=[tt.compat.tpu_vmem((br, 1), _F32) for _ in range(3)],
        name="softmax_cross_entropy_fwd",
        semantics=("parallel", "arbitrary"), interpret=interpret, vmem=vmem,
    )(logits, labels)


# ----------------------------------------------------------------------------------------------
# Backward kernel

def _backward_kernel(logits_ref, labels_ref, lse_ref, dloss_ref, dlogits_ref):
    br, bv = logits_ref.shape
    cols = column_ids((br, bv), bv)
    p = jnp.exp(logits_ref[...].astype(_F32) - lse_ref[...])
    onehot = jnp.where(cols == labels_ref[...], 1.0, 0.0)
    dlogits_ref[...] = ((p - onehot) * dloss_ref[...]).astype(dlogits_ref.dtype)


# Backward wrapper

def backward(logits, labels, lse, dloss, *, config: CrossEntropyTpuConfig, interpret: bool):
    n_rows, v_pad = logits.shape
    br, bv = config.block_rows, config.block_vocab
    row = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
    tile = pl.BlockSpec((br, bv), lambda i, j: (i, j))
    vmem = tt.check_vmem("softmax_cross_entropy backward", _vmem_parts(config, logits.dtype)[1])
    return tt.pallas_call(
        _backward_kernel,
        out_shape=jax.ShapeDtypeStruct(logits.shape, logits.dtype),
        grid=(n_rows // br, v_pad // bv),
        in_specs=[tile, row, row, row],
        out_specs=tile,
        name="softmax_cross_entropy_bwd",
        semantics=("parallel", "parallel"), interpret=interpret, vmem=vmem,
    )(logits, labels, lse, dloss.astype(_F32))


# ----------------------------------------------------------------------------------------------
# custom_vjp wiring

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _softmax_ce(logits, labels, vocab, config, interpret):
    return forward(logits, labels, vocab=vocab, config=config, interpret=interpret)[0]


def _softmax_ce_fwd(logits, labels, vocab, config, interpret):
    loss, lse = forward(logits, labels, vocab=vocab, config=config, interpret=interpret)
    return loss, (logits, labels, lse)


def _softmax_ce_bwd(vocab, config, interpret, residuals, dloss):
    logits, labels, lse = residuals
    return backward(logits, labels, lse, dloss, config=config, interpret=interpret), None


_softmax_ce.defvjp(_softmax_ce_fwd, _softmax_ce_bwd)


# ----------------------------------------------------------------------------------------------
# The implementation

def softmax_cross_entropy_mosaic_tpu(logits, labels, *,
                                     config: CrossEntropyTpuConfig | None = None):
    """softmax_cross_entropy through the TPU kernels (same arguments); `config` fixes the block
    sizes (else tuned on a TPU, or `default_config`)."""
    vocab = logits.shape[-1]
    if labels.size == 0:
        return jnp.zeros(labels.shape, logits.dtype)
    if vocab == 0:
        raise NotImplementedError("an empty vocabulary (logits [..., 0]): the kernels tile none")
    n_rows = labels.size
    if config is None:
        config = tt.tuned("softmax_cross_entropy/mosaic_tpu", softmax_cross_entropy_mosaic_tpu,
                          (logits, labels), {}, config_space(n_rows, vocab, logits.dtype),
                          default_config(n_rows, vocab, logits.dtype))
    r_pad = tt.round_up(n_rows, config.block_rows)
    logits2d = tt.pad_axis(tt.pad_axis(logits.reshape(n_rows, vocab), 0, r_pad), 1,
                           tt.round_up(vocab, config.block_vocab))
    labels2d = tt.pad_axis(normalize_labels(labels.reshape(-1), vocab), 0, r_pad).reshape(-1, 1)
    loss = _softmax_ce(logits2d, labels2d, vocab, config, current().interpret)
    return loss[:n_rows, 0].reshape(labels.shape)
