"""How the dense + activation kernels split across devices (see pallas_kernels/_sharding.py).

Rows and output columns split freely (a column-split weight, as in Megatron's column-parallel
layers, runs locally; the input gradient adds the shards' parts). d_in does not: the activation
follows the sum over it, so a row-split weight (FSDP) is gathered first, as XLA does for a
plain matmul.
"""
from __future__ import annotations

from pallas_kernels._sharding import Rule, batch_dims

_WHOLE = {"i": "the activation follows the sum over d_in"}


def dense_act_sharding(x, w, b=None, *, activation):
    rows = batch_dims(x.ndim - 1)
    return Rule(args=(f"{rows} i", "i o", None if b is None else "o"),
                kwargs=dict(activation=activation), results=(f"{rows} o",), whole=_WHOLE)


def gated_dense_sharding(x, w_gate, w_up, *, activation):
    rows = batch_dims(x.ndim - 1)
    return Rule(args=(f"{rows} i", "i o", "i o"), kwargs=dict(activation=activation),
                results=(f"{rows} o",), whole=_WHOLE)
