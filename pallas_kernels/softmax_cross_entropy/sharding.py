"""How the softmax cross-entropy kernels split across devices (see pallas_kernels/_sharding.py):
rows split freely; the vocabulary does not (the log-sum-exp runs over all of it)."""
from __future__ import annotations

from pallas_kernels._sharding import Rule, batch_dims


def softmax_cross_entropy_sharding(logits, labels):
    rows = batch_dims(labels.ndim)
    return Rule(args=(f"{rows} v", rows), kwargs={}, results=(rows,),
                whole={"v": "the log-sum-exp runs over the whole vocabulary"})
