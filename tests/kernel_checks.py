"""Checks shared by the kernel tests."""
from __future__ import annotations

from jax.extend import core as jex_core


def forbidden_outside_pallas(jaxpr, forbidden) -> list[str]:
    """`forbidden` primitives anywhere in `jaxpr` (nested too) except inside pallas_call."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            continue
        if eqn.primitive.name in forbidden:
            found.append(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    found += forbidden_outside_pallas(sub.jaxpr, forbidden)
                elif isinstance(sub, jex_core.Jaxpr):
                    found += forbidden_outside_pallas(sub, forbidden)
    return found
