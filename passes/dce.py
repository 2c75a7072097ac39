"""Dead-code elimination, by JAX's own `dce_jaxpr` (which recurses into nested bodies and keeps
effectful equations); the program's inputs are kept even when unused."""
from __future__ import annotations

from jax.interpreters import partial_eval as pe

from passes import _compat as C
from passes.ir import nested_regions
from passes.pipeline import Pass


def count_eqns(jaxpr) -> int:
    """Equations in a jaxpr, nested bodies included."""
    total = 0
    for i, eqn in enumerate(C.open_jaxpr(jaxpr).eqns):
        total += 1
        for _, _, sub, _, _ in nested_regions(eqn, "", False):
            total += count_eqns(sub)
    return total


class DeadCodeElimination(Pass):
    name = "dce"
    description = "removes equations whose results are unused (effects kept), via jax's dce_jaxpr"

    def run_program(self, jaxpr, ctx):
        body = C.open_jaxpr(jaxpr)
        new, _ = pe.dce_jaxpr(body, [True] * len(body.outvars), instantiate=True)
        removed = count_eqns(body) - count_eqns(new)
        if removed <= 0:
            return jaxpr, 0
        new = new.replace(invars=body.invars)  # the program's signature stays
        if C.CLOSED_IS_JAXPR:  # consts travel with their constvars
            return new, removed
        return C.ClosedJaxpr(new.replace(constvars=body.constvars), jaxpr.consts), removed
