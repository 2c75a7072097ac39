"""Which equations are pure: safe to fold on constants, merge with an identical twin, or drop.

An allow-list, not a deny-list: a primitive the engine does not know (a user's own primitive, a
`pallas_call` with callbacks, a new JAX primitive) is treated as impure until it is listed here.
"""
from __future__ import annotations

from jax.extend.core import primitives as _prims

# Primitives in jax's public list that are NOT functions of their operands alone: draws from a
# hidden generator state, tokens, mutable references, uninitialised buffers, and explicit copies
# (a copy is asked for to get a distinct buffer).
_STATEFUL_NAMES = ("rng_uniform_p", "create_token_p", "after_all_p", "get_p", "swap_p",
                   "empty2_p", "copy_p", "device_put_p")

PURE_PRIMITIVES = frozenset(
    getattr(_prims, name) for name in dir(_prims)
    if name.endswith("_p") and name not in _STATEFUL_NAMES)


def is_pure(eqn) -> bool:
    """True when the equation's outputs depend on its operands alone, and it has no effects."""
    return not eqn.effects and eqn.primitive in PURE_PRIMITIVES
