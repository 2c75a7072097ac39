"""Per-example softmax cross-entropy from logits: logsumexp(logits) - logits[label].

Labels behave as in `jnp.take_along_axis`: a negative label counts from the end, and a label
outside [-vocab, vocab) gives a NaN loss (its gradient is then softmax * dloss, as the
reference's).

One file per implementation: `triton.py` (the Pallas kernels for GPUs, "pallas") and `xla.py`;
`reference.py` holds the formula the tests compare against, `common.py` the label handling
linear_cross_entropy shares. This module registers the implementations, in order of
preference, on `softmax_cross_entropy_op`.
"""
from __future__ import annotations

from pallas_kernels._dispatch import Op, by_platform
from pallas_kernels.softmax_cross_entropy.common import check_labels
from pallas_kernels.softmax_cross_entropy.mosaic_tpu import softmax_cross_entropy_mosaic_tpu
from pallas_kernels.softmax_cross_entropy.reference import softmax_cross_entropy_reference
from pallas_kernels.softmax_cross_entropy.triton import (CrossEntropyConfig,
                                                         cross_entropy_config_heuristic,
                                                         cross_entropy_config_space,
                                                         softmax_cross_entropy_pallas)
from pallas_kernels.softmax_cross_entropy.xla import softmax_cross_entropy_xla
from pallas_kernels.softmax_cross_entropy.sharding import softmax_cross_entropy_sharding

softmax_cross_entropy_op = Op("softmax_cross_entropy",
                              sharding=softmax_cross_entropy_sharding)
softmax_cross_entropy_op.register("pallas")(
    by_platform(gpu=softmax_cross_entropy_pallas, tpu=softmax_cross_entropy_mosaic_tpu))
softmax_cross_entropy_op.register("xla")(softmax_cross_entropy_xla)


def softmax_cross_entropy(logits, labels, implementation=None, platform=None):
    """Per-example cross-entropy: logsumexp(logits) - logits[label], over the last axis.

    Args:
      logits: [..., vocab] floats.
      labels: [...] integers; negative ones count from the end, ones outside [-vocab, vocab)
        give NaN (as with `jnp.take_along_axis`).
      implementation: None (choose), "pallas", "xla", or a list tried in order.
      platform: None (the default), "gpu", "tpu" or "cpu": the kernels' target.

    Returns:
      [...] losses in logits' dtype (computed in float32).
    """
    if logits.ndim < 1:
        raise ValueError("softmax_cross_entropy: logits must have a vocabulary axis; got a scalar")
    check_labels("softmax_cross_entropy", labels, logits.shape[:-1])
    return softmax_cross_entropy_op(logits, labels, implementation=implementation,
                                    platform=platform)


__all__ = ["softmax_cross_entropy", "softmax_cross_entropy_op", "softmax_cross_entropy_pallas",
           "softmax_cross_entropy_xla", "softmax_cross_entropy_reference", "CrossEntropyConfig",
           "cross_entropy_config_heuristic", "cross_entropy_config_space"]
