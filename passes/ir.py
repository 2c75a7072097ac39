"""A graph view over one jaxpr body (a region): producers, users, primitive index, nesting.

Passes edit a region's equation list in place and the engine writes it back into the enclosing
jaxpr once per pass. Indexes are built lazily, once per region and pass, and are invalidated by
`Region.set_eqns`.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator

from passes import _compat as C

OUTPUT = -1  # the position `users` reports for the region's own outputs


class Region:
    """One jaxpr body: the top-level program or a body nested in an equation's params.

    Attributes:
      eqns: the equations, in program (topological) order.
      invars, outvars: the body's signature; passes never change it.
      path: where the body sits, e.g. "scan[3]/jit[1]" (parent equation positions).
      primal_only: True inside a custom_jvp/custom_vjp body, whose rewrites do not reach
        derivatives (JAX differentiates such equations with their own rules).
    """

    def __init__(self, jaxpr, path: str = "", primal_only: bool = False):
        body = C.open_jaxpr(jaxpr)
        self.container = jaxpr
        self.eqns: list = list(body.eqns)
        self.invars = list(body.invars)
        self.constvars = list(body.constvars)
        self.outvars = list(body.outvars)
        self.path = path
        self.primal_only = primal_only
        self._producers = None
        self._users = None
        self._by_primitive = None
        # Analyses passes derive from the equations (e.g. constant values), kept until the
        # region is edited.
        self.cache: dict = {}

    # -- indexes -------------------------------------------------------------------------------
    def _index(self):
        producers, users, by_prim = {}, defaultdict(list), defaultdict(list)
        for i, eqn in enumerate(self.eqns):
            by_prim[eqn.primitive].append(i)
            for v in eqn.invars:
                if isinstance(v, C.Var):
                    users[v].append(i)
            for v in eqn.outvars:
                producers[v] = i
        for v in self.outvars:
            if isinstance(v, C.Var):
                users[v].append(OUTPUT)
        self._producers, self._users, self._by_primitive = producers, users, by_prim

    def producer(self, var) -> int | None:
        """Position of the equation that defines `var` (None for inputs, constants, literals)."""
        if self._producers is None:
            self._index()
        return self._producers.get(var) if isinstance(var, C.Var) else None

    def producer_eqn(self, var):
        i = self.producer(var)
        return None if i is None else self.eqns[i]

    def users(self, var) -> list[int]:
        """Positions of the equations reading `var`; OUTPUT (-1) if the region returns it."""
        if self._users is None:
            self._index()
        return self._users.get(var, [])

    def positions(self, primitive) -> list[int]:
        """Positions of the equations applying `primitive`, in program order."""
        if self._by_primitive is None:
            self._index()
        return self._by_primitive.get(primitive, [])

    def ancestors(self, atom, limit: int | None = None):
        """Positions of the equations `atom` depends on in this region, each once (at most
        `limit` of them)."""
        stack, seen = [atom], set()
        while stack and (limit is None or len(seen) < limit):
            pos = self.producer(stack.pop())
            if pos is None or pos in seen:
                continue
            seen.add(pos)
            yield pos
            stack.extend(a for a in self.eqns[pos].invars if isinstance(a, C.Var))

    def set_eqns(self, eqns):
        self.eqns = list(eqns)
        self._producers = self._users = self._by_primitive = None
        self.cache = {}

    def rebuilt(self):
        """The enclosing jaxpr value with this region's equations."""
        return C.with_eqns(self.container, self.eqns, self.outvars)


def nested_regions(eqn, path: str, primal_only: bool) -> Iterator[tuple[str, int | None, object, str, bool]]:
    """(param key, tuple index or None, jaxpr, path, primal_only) for each body of `eqn`.

    Only control-flow and call primitives are entered; kernel bodies (pallas_call) and
    replacements stay opaque.
    """
    if eqn.primitive not in C.NESTED_PRIMITIVES:
        return
    inner_primal_only = primal_only or eqn.primitive in C.CUSTOM_DERIVATIVE_PRIMITIVES
    for key, value in eqn.params.items():
        if C.is_jaxpr(value):
            yield key, None, value, f"{path}/{eqn.primitive.name}.{key}", inner_primal_only
        elif isinstance(value, (tuple, list)) and value and all(C.is_jaxpr(v) for v in value):
            for j, v in enumerate(value):
                yield key, j, v, f"{path}/{eqn.primitive.name}.{key}[{j}]", inner_primal_only


def location(eqn) -> str:
    """`file:line (module/path)` for an equation: the innermost frame of the user's own code
    (not JAX's, not a library's), then the name stack."""
    si = eqn.source_info
    if si is None:
        return "?"
    stack = str(si.name_stack)
    where = C.source_location(si)
    return f"{where} ({stack})" if stack else where


def module_path(eqn) -> str:
    """The Flax module path (name stack) of an equation, e.g. 'Block_0/LayerNorm_0'."""
    si = eqn.source_info
    return str(si.name_stack) if si is not None else ""
