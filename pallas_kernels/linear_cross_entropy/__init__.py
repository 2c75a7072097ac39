"""softmax_cross_entropy fused with the output projection, never materialising the logits.

linear_cross_entropy(x, w, labels, w_layout) = softmax_cross_entropy(logits, labels) with
logits = x @ w ("dv": w [d, vocab]) or x @ w.T ("vd": a tied [vocab, d] embedding), labels as in
softmax_cross_entropy.

One file per implementation: `triton.py` (the Pallas kernels for GPUs, "pallas") and `xla.py`
(the same vocabulary chunking with lax loops); `reference.py` materialises the logits, for tests,
and `common.py` holds what the implementations share; `picked.py` is the logit at each label
(`linear_logit`), per shard like the loss. This module registers the
implementations, in order of preference, on `linear_cross_entropy_op`.
"""
from __future__ import annotations

from pallas_kernels._dispatch import Op, by_platform
from pallas_kernels.linear_cross_entropy.common import W_LAYOUTS, linear_loss_dtype
from pallas_kernels.linear_cross_entropy.picked import linear_logit
from pallas_kernels.linear_cross_entropy.mosaic_tpu import linear_cross_entropy_mosaic_tpu
from pallas_kernels.linear_cross_entropy.reference import linear_cross_entropy_reference
from pallas_kernels.linear_cross_entropy.triton import (LinearCrossEntropyConfig,
                                                        linear_cross_entropy_config_heuristic,
                                                        linear_cross_entropy_config_space,
                                                        linear_cross_entropy_pallas)
from pallas_kernels.linear_cross_entropy.xla import linear_cross_entropy_xla
from pallas_kernels.softmax_cross_entropy.common import check_labels
from pallas_kernels.linear_cross_entropy.sharding import linear_cross_entropy_sharding

linear_cross_entropy_op = Op("linear_cross_entropy", sharding=linear_cross_entropy_sharding,
                             shard_xla=True)
linear_cross_entropy_op.register("pallas")(
    by_platform(gpu=linear_cross_entropy_pallas, tpu=linear_cross_entropy_mosaic_tpu))
linear_cross_entropy_op.register("xla")(linear_cross_entropy_xla)


def linear_cross_entropy(x, w, labels, *, w_layout: str = "dv", implementation=None,
                         platform=None):
    """softmax_cross_entropy(x @ w, labels) without materialising the [tokens, vocab] logits.

    Args:
      x: [..., d] activations.
      w: [d, vocab] with w_layout="dv", or [vocab, d] with w_layout="vd" (a tied embedding table,
        used as it is, without a transpose).
      labels: [...] integers, as in `softmax_cross_entropy`.
      implementation: None (choose), "pallas", "xla", or a list tried in order.
      platform: None (the default), "gpu", "tpu" or "cpu": the kernels' target.

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
    check_labels("linear_cross_entropy", labels, x.shape[:-1])
    return linear_cross_entropy_op(x, w, labels, w_layout=w_layout,
                                   implementation=implementation, platform=platform)


__all__ = ["linear_cross_entropy", "linear_cross_entropy_op", "linear_logit",
           "linear_cross_entropy_pallas", "linear_cross_entropy_xla", "linear_cross_entropy_reference", "linear_loss_dtype",
           "LinearCrossEntropyConfig", "linear_cross_entropy_config_heuristic",
           "linear_cross_entropy_config_space", "W_LAYOUTS"]
