"""Common-subexpression elimination within each region.

Identical pure equations (same primitive, operands and parameters) are merged into the first.
Only primitives known to be pure are merged (`passes.purity`): stateful draws such as
`rng_uniform`, effectful equations, unknown primitives and `remat` equations asking for
`prevent_cse` never are, and nothing is merged across region boundaries.
"""
from __future__ import annotations

import numpy as np

from passes import _compat as C
from passes.pipeline import Pass
from passes.purity import is_pure


def atom_key(a):
    if isinstance(a, C.Literal):
        v = np.asarray(a.val)
        return ("lit", v.dtype.str, v.shape, v.tobytes(), bool(getattr(a.aval, "weak_type", False)))
    return a


def _params_key(params):
    try:
        key = tuple(sorted(params.items()))
        hash(key)
        return key
    except TypeError:
        return None


class CommonSubexpressionElimination(Pass):
    name = "cse"
    description = "merges identical equations of known-pure primitives within each region"

    def run(self, region, ctx):
        seen, env, kept = {}, {}, []
        for eqn in region.eqns:
            if env and any(isinstance(a, C.Var) and a in env for a in eqn.invars):
                eqn = eqn.replace(invars=[env.get(a, a) if isinstance(a, C.Var) else a
                                          for a in eqn.invars])
            pkey = None
            if is_pure(eqn) and not (eqn.primitive is C.NESTED["remat"]
                                     and eqn.params.get("prevent_cse", False)):
                pkey = _params_key(eqn.params)
            if pkey is not None:
                key = (eqn.primitive, tuple(atom_key(a) for a in eqn.invars), pkey)
                first = seen.get(key)
                if first is not None and not any(C.is_dropvar(n) and not C.is_dropvar(o)
                                                 for o, n in zip(eqn.outvars, first.outvars)):
                    for old, new in zip(eqn.outvars, first.outvars):
                        if not C.is_dropvar(old):
                            env[old] = new
                    continue
                seen[key] = eqn
            kept.append(eqn)
        merged = len(region.eqns) - len(kept)
        if merged:
            region.outvars = [env.get(a, a) if isinstance(a, C.Var) else a for a in region.outvars]
            region.set_eqns(kept)
        return merged
