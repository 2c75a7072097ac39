"""How `attention`'s kernels split across devices (see pallas_kernels/_sharding.py).

Batch and heads split freely (with grouped-query attention, the key/value heads carry the split
and each carries its group of query heads). The kernel's softmax runs over every key and its
logits contract head_dim, so neither splits; with `causal` the query axis does not split either,
since the mask is placed by each query's absolute position. Queries and keys split alike over
the same mesh axes (sequence parallelism) run as ring attention (ring.py) when there is no mask
or bias (and, with `causal`, the lengths are equal); other key splits are gathered, with a
warning.
"""
from __future__ import annotations

from pallas_kernels._sharding import Collective, ShardingRule
from pallas_kernels.attention.ring import ring_backward, ring_forward, ring_saves

_WHOLE = {
    "k": "the kernel's softmax runs over every key (ring attention takes keys split only with "
         "the queries split alike and no mask or bias)",
    "d": "the kernel contracts the logits over head_dim",
}
_CAUSAL_Q = ("the causal mask is placed by absolute query position, which a query block does "
             "not know")


def _broadcast(x, names: str) -> str | None:
    """The factors of a 4-D mask or bias: size-one axes broadcast."""
    if x is None:
        return None
    return " ".join("1" if size == 1 else name for size, name in zip(x.shape, names.split()))


def _ring_saves(q, k, v, **kwargs):
    group = q.shape[2] // k.shape[2]
    heads = "g" if group == 1 else "g*r"
    return tuple((f"b {heads} q", stat) for stat in ring_saves(q, k, v, **kwargs))


_RING = Collective("k", ring_forward, ring_backward, companions=("q",), saves=_ring_saves,
                   reads_results=True)


def attention_sharding(q, k, v, *, causal, mask, bias, scale):
    group = q.shape[2] // k.shape[2]
    heads = "g" if group == 1 else "g*r"
    whole = dict(_WHOLE, **({"q": _CAUSAL_Q} if causal else {}))
    # Ring attention takes queries and keys split alike: no mask or bias, something to attend
    # (an empty call is answered before any kernel), and for causal attention the same positions.
    ring = (mask is None and bias is None and q.size > 0 and k.size > 0
            and (not causal or q.shape[1] == k.shape[1]))
    return ShardingRule(args=(f"b q {heads} d", "b k g d", "b k g d"),
                kwargs=dict(causal=causal, mask=_broadcast(mask, f"b {heads} q k"),
                            bias=_broadcast(bias, f"b {heads} q k"), scale=scale),
                results=(f"b q {heads} d",), whole=whole,
                collectives=(_RING,) if ring else (),
                sizes={"r": group} if group > 1 else {})
