"""linear_cross_entropy in Pallas for TPUs (Mosaic): the kernels, their wrappers, the custom_vjp
wiring and the TPU "pallas" implementation. The logits x @ w never exist outside VMEM.

Forward: grid (token blocks, vocabulary blocks), the vocabulary a reduction: each step computes
a [block_tokens, block_vocab] logit tile on the MXU and folds it into a running log-sum-exp and
label logit in VMEM scratch; only the per-token log-sum-exp is saved. Backward, two kernels that
recompute the logit tiles: dx (grid tokens x vocabulary, the vocabulary a reduction into a
[block_tokens, d] accumulator) and dw (grid vocabulary x tokens, the tokens a reduction into a
[d, block_vocab] accumulator). Blocks hold the whole feature axis d. Tokens and the vocabulary are
padded to whole blocks: padded vocabulary columns are masked to -inf, padded tokens get a zero
cotangent.

Block sizes: `LinearCrossEntropyTpuConfig` (tokens and vocabulary columns per block, all three
kernels); `config_space` lists the tilings `tuned_config` times on a TPU, `vmem_bytes` estimates a
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
from pallas_kernels.linear_cross_entropy.common import linear_loss_dtype
from pallas_kernels.softmax_cross_entropy.common import normalize_labels
from pallas_kernels.softmax_cross_entropy.mosaic_tpu import column_ids, loss_block

_F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyTpuConfig:
    """Block sizes of the TPU linear cross-entropy kernels (blocks hold the whole d)."""
    block_tokens: int  # a multiple of the dtype's sublane granule
    block_vocab: int  # a multiple of 128


def vmem_bytes(config: LinearCrossEntropyTpuConfig, d: int, dtype) -> int:
    """VMEM estimate of the largest of the three kernels."""
    bt, bv = config.block_tokens, config.block_vocab
    return (tt.block_bytes(((bt, d), dtype), ((d, bv), dtype), ((bt, bv), dtype))
            + tt.scratch_bytes(((max(bt, bv), d), _F32)) + 4 * bt * bv * 4)


def default_config(n_tokens: int, d: int, vocab: int, dtype) -> LinearCrossEntropyTpuConfig:
    """As large as 256 x 512, halved until VMEM_BUDGET holds."""
    granule = tt.sublanes(dtype)
    bt, bv = tt.fit(n_tokens, 256, granule), tt.fit(vocab, 512, tt.LANES)
    while (vmem_bytes(LinearCrossEntropyTpuConfig(bt, bv), d, dtype) > tt.VMEM_BUDGET
           and (bt > granule or bv > tt.LANES)):
        if bv >= bt and bv > tt.LANES:
            bv //= 2
        else:
            bt = max(granule, bt // 2 // granule * granule)
    return LinearCrossEntropyTpuConfig(bt, bv)


def config_space(n_tokens: int, d: int, vocab: int, dtype) -> list[LinearCrossEntropyTpuConfig]:
    """The default and (128 | 256 | 512) tokens x (256 | 512 | 1024 | 2048) columns, fitted to
    the operands, within VMEM."""
    return tt.within_budget(
        default_config(n_tokens, d, vocab, dtype),
        [LinearCrossEntropyTpuConfig(bt, bv)
         for bt in tt.block_options(n_tokens, (128, 256, 512), tt.sublanes(dtype))
         for bv in tt.block_options(vocab, (256, 512, 1024, 2048), tt.LANES)],
        lambda c: vmem_bytes(c, d, dtype))


def _logits(x, w, layout):
    return lax.dot_general(x, w, _NN if layout == "dv" else _NT, preferred_element_type=_F32)


# ----------------------------------------------------------------------------------------------
# Forward kernel

def _forward_kernel(x_ref, w_ref, labels_ref, loss_ref, lse_ref, m_ref, l_ref, picked_ref, *,
                    layout, vocab):
    t = _logits(x_ref[...], w_ref[...], layout)
    loss_block(t, column_ids(t.shape, t.shape[1]), labels_ref, loss_ref, lse_ref, m_ref, l_ref,
               picked_ref, vocab=vocab)


def _w_spec(layout, bv, d, vocab_axis_of_grid):
    if layout == "dv":
        return pl.BlockSpec((d, bv), lambda *g: (0, g[vocab_axis_of_grid]))
    return pl.BlockSpec((bv, d), lambda *g: (g[vocab_axis_of_grid], 0))


# Forward wrapper

def forward(x, w, labels, *, layout, vocab, config, interpret):
    """Padded x [tokens, d], w, labels [tokens, 1] -> (loss [tokens, 1], lse [tokens, 1])."""
    n_tokens, d = x.shape
    bt, bv = config.block_tokens, config.block_vocab
    v_pad = w.shape[1] if layout == "dv" else w.shape[0]
    row = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    return tt.pallas_call(
        functools.partial(_forward_kernel, layout=layout, vocab=vocab),
        out_shape=(jax.ShapeDtypeStruct((n_tokens, 1), linear_loss_dtype(x, w)),
                   jax.ShapeDtypeStruct((n_tokens, 1), _F32)),
        grid=(n_tokens // bt, v_pad // bv),
        in_specs=[pl.BlockSpec((bt, d), lambda i, j: (i, 0)), _w_spec(layout, bv, d, 1), row],
        out_specs=(row, row),
        scratch_shapes=[tt.compat.tpu_vmem((bt, 1), _F32) for _ in range(3)],
        name="linear_cross_entropy_fwd",
        semantics=("parallel", "arbitrary"), interpret=interpret,
        vmem=tt.check_vmem("linear_cross_entropy", vmem_bytes(config, d, x.dtype)),
    )(x, w, labels)


# ----------------------------------------------------------------------------------------------
# Backward kernels

def _dlogits(x, w, labels, lse, dloss, layout, vocab, vocab_block):
    """(softmax - onehot) * dloss for one logit tile, zero in padded columns (x's dtype)."""
    t = _logits(x, w, layout)
    cols = vocab_block * t.shape[1] + lax.broadcasted_iota(jnp.int32, t.shape, 1)
    p = jnp.where(cols < vocab, jnp.exp(t - lse), 0.0)
    return ((p - jnp.where(cols == labels, 1.0, 0.0)) * dloss).astype(x.dtype)


def _dx_kernel(x_ref, w_ref, labels_ref, lse_ref, dloss_ref, dx_ref, acc_ref, *, layout, vocab):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    w = w_ref[...]
    dl = _dlogits(x_ref[...], w, labels_ref[...], lse_ref[...], dloss_ref[...], layout, vocab, j)
    acc_ref[...] += lax.dot_general(dl, w, _NT if layout == "dv" else _NN,
                                    preferred_element_type=_F32)

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)


def _dw_kernel(x_ref, w_ref, labels_ref, lse_ref, dloss_ref, dw_ref, acc_ref, *, layout, vocab):
    i = pl.program_id(1)  # the token block: this kernel's reduction

    @pl.when(i == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...]
    dl = _dlogits(x, w_ref[...], labels_ref[...], lse_ref[...], dloss_ref[...], layout, vocab,
                  pl.program_id(0))
    acc_ref[...] += (lax.dot_general(x, dl, _TN, preferred_element_type=_F32) if layout == "dv"
                     else lax.dot_general(dl, x, _TN, preferred_element_type=_F32))

    @pl.when(i == pl.num_programs(1) - 1)
    def _():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


# Backward wrapper

def backward(x, w, labels, lse, dloss, *, layout, vocab, config, interpret):
    n_tokens, d = x.shape
    bt, bv = config.block_tokens, config.block_vocab
    v_pad = w.shape[1] if layout == "dv" else w.shape[0]
    nt, nv = n_tokens // bt, v_pad // bv
    vmem = tt.check_vmem("linear_cross_entropy", vmem_bytes(config, d, x.dtype))
    kwargs = dict(layout=layout, vocab=vocab)
    operands = (x, w, labels, lse, dloss.astype(_F32))
    row = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    dx = tt.pallas_call(
        functools.partial(_dx_kernel, **kwargs),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(nt, nv),
        in_specs=[pl.BlockSpec((bt, d), lambda i, j: (i, 0)), _w_spec(layout, bv, d, 1),
                  row, row, row],
        out_specs=pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
        scratch_shapes=[tt.compat.tpu_vmem((bt, d), _F32)],
        name="linear_cross_entropy_bwd_dx",
        semantics=("parallel", "arbitrary"), interpret=interpret, vmem=vmem,
    )(*operands)
    token_row = pl.BlockSpec((bt, 1), lambda j, i: (i, 0))
    w_block = (d, bv) if layout == "dv" else (bv, d)
    dw = tt.pallas_call(
        functools.partial(_dw_kernel, **kwargs),
        out_shape=jax.ShapeDtypeStruct(w.shape, w.dtype),
        grid=(nv, nt),
        in_specs=[pl.BlockSpec((bt, d), lambda j, i: (i, 0)), _w_spec(layout, bv, d, 0),
                  token_row, token_row, token_row],
        out_specs=_w_spec(layout, bv, d, 0),
        scratch_shapes=[tt.compat.tpu_vmem(w_block, _F32)],
        name="linear_cross_entropy_bwd_dw",
        semantics=("parallel", "arbitrary"), interpret=interpret, vmem=vmem,
    )(*operands)
    return dx, dw


# ----------------------------------------------------------------------------------------------
# custom_vjp wiring

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _linear_ce(x, w, labels, layout, vocab, config, interpret):
    return forward(x, w, labels, layout=layout, vocab=vocab, config=config,
                   interpret=interpret)[0]


def _linear_ce_fwd(x, w, labels, layout, vocab, config, interpret):
    loss, lse = forward(x, w, labels, layout=layout, vocab=vocab, config=config,
                        interpret=interpret)
    return loss, (x, w, labels, lse)


def _linear_ce_bwd(layout, vocab, config, interpret, residuals, dloss):
    x, w, labels, lse = residuals
    dx, dw = backward(x, w, labels, lse, dloss, layout=layout, vocab=vocab, config=config,
                      interpret=interpret)
    return dx, dw, None


_linear_ce.defvjp(_linear_ce_fwd, _linear_ce_bwd)


# ----------------------------------------------------------------------------------------------
# The implementation

def linear_cross_entropy_mosaic_tpu(x, w, labels, *, w_layout: str = "dv",
                                    config: LinearCrossEntropyTpuConfig | None = None):
    """linear_cross_entropy through the TPU kernels (same arguments); `config` fixes the block
    sizes (else tuned on a TPU, or `default_config`)."""
    d = x.shape[-1]
    vocab = w.shape[1] if w_layout == "dv" else w.shape[0]
    if labels.size == 0:
        return jnp.zeros(labels.shape, linear_loss_dtype(x, w))
    if d == 0 or vocab == 0:
        raise NotImplementedError(f"zero-size logits' factors (d = {d}, vocab = {vocab}): the "
                                  f"kernels tile neither")
    dtype = jnp.result_type(x, w)
    n_tokens = labels.size
    if config is None:
        config = tt.tuned("linear_cross_entropy/mosaic_tpu", linear_cross_entropy_mosaic_tpu,
                          (x, w, labels), {"w_layout": w_layout},
                          config_space(n_tokens, d, vocab, dtype),
                          default_config(n_tokens, d, vocab, dtype))
    t_pad = tt.round_up(n_tokens, config.block_tokens)
    x2d = tt.pad_axis(x.reshape(n_tokens, d).astype(dtype), 0, t_pad)
    w = tt.pad_axis(w.astype(dtype), 1 if w_layout == "dv" else 0,
                    tt.round_up(vocab, config.block_vocab))
    labels2d = tt.pad_axis(normalize_labels(labels.reshape(-1), vocab), 0, t_pad).reshape(-1, 1)
    loss = _linear_ce(x2d, w, labels2d, w_layout, vocab, config, current().interpret)
    return loss[:n_tokens, 0].reshape(labels.shape)
