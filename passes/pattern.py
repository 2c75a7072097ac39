"""The pattern language: composable patterns over a region's equations, compiled to rewrite rules.

A pattern matches one value (an atom) of a region by walking back through the equations that
produce it. Building blocks:

- `Wildcard(name)`: any value; it captures the value under `name`, and a name matched twice must be
  the same value. Constraints: `rank=`, `dtype=`, `shape=` (None entries are free), `where=`.
- `Lit(value)`: a scalar constant, compared with a float tolerance (also seen through
  `broadcast_in_dim`/`reshape`/`convert_element_type` of a literal); `Lit(name="eps")` captures it.
- `Prim(primitive, *operands, params={...}, commutative=True)`: an equation of a primitive and its
  operands; parameters are compared to values or checked by predicates
  `fn(value, eqn) -> True | str`.
- `Alt(a, b)` (or `a | b`), `maybe_cast(p)`, `Capture(name, p)`, `Same(name)`,
  `Product(*factors)` (a product of factors in any order and association, divisions included;
  factors may be `Inverse(p)` (a divisor) or `OptionalFactor(p)`; both are rejected anywhere
  else), `RowVector(name)` (a vector
  broadcast along the last axis), `Keep(p)` (optionally re-shaped to keep a reduced axis).
- `Example(fn, *example_args)`: pattern by example. `fn` is traced on small example arguments,
  canonicalized, and turned into a pattern over primitives; at match time it is traced again on
  the matched values' shapes and dtypes and the matched equations must equal that trace exactly
  (every parameter, shape and literal), so a wildcard never silently over-matches.

Every pattern's `match(state, atom)` returns True or a falsy `NoMatch` naming the failing
sub-pattern, e.g. "reduce_sum axes (1,) != (2,)". The equations a match walked through are the
ones the rewrite consumes; values only *read* (wildcards, broadcast constants, the reshapes
feeding a `RowVector`) are not consumed and stay for DCE.

`PatternRule(name, pattern, replacement, inputs=(...))` turns a pattern into an engine `Rule`:
anchored at the pattern's root primitives, with an optional `check` (accept, reject with a
`NoMatch`, or decline with a reason string) and static `params`.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import math
import threading
from typing import Callable, Sequence

import jax
import numpy as np
from jax import lax

from passes import _compat as C
from passes.ir import OUTPUT
from passes.rewrite import Match, NoMatch, Rule

_names = itertools.count()


def fresh(prefix: str = "t") -> str:
    """A capture name no other pattern uses (for helpers building patterns in a loop)."""
    return f"{prefix}#{next(_names)}"


# -- match state ---------------------------------------------------------------------------------

class State:
    """Captures and consumed equations of one match attempt, plus its deepest failure."""

    __slots__ = ("region", "bindings", "eqns", "best", "best_depth")

    def __init__(self, region):
        self.region = region
        self.bindings: dict = {}
        self.eqns: set = set()
        self.best = None
        self.best_depth = -1

    def save(self):
        return dict(self.bindings), set(self.eqns)

    def restore(self, saved):
        self.bindings, self.eqns = dict(saved[0]), set(saved[1])

    def fail(self, fmt: str, *args) -> NoMatch:
        """A NoMatch, remembered when it is the deepest failure so far (the most telling)."""
        nm = NoMatch(fmt, *args)
        if len(self.eqns) > self.best_depth:
            self.best, self.best_depth = nm, len(self.eqns)
        return nm

    def producer(self, atom):
        """(position, eqn) defining `atom`, or (None, None)."""
        pos = self.region.producer(atom) if isinstance(atom, C.Var) else None
        return (None, None) if pos is None else (pos, self.region.eqns[pos])


def same_atom(a, b) -> bool:
    if isinstance(a, C.Literal) or isinstance(b, C.Literal):
        if not (isinstance(a, C.Literal) and isinstance(b, C.Literal)):
            return False
        va, vb = np.asarray(a.val), np.asarray(b.val)
        return va.shape == vb.shape and va.dtype == vb.dtype and bool(np.all(va == vb))
    return a is b


class _describe:
    """An atom as a failure message shows it, formatted only when the message is read."""

    __slots__ = ("atom",)

    def __init__(self, atom):
        self.atom = atom

    def __format__(self, spec):
        atom = self.atom
        if isinstance(atom, C.Literal):
            return f"literal {np.asarray(atom.val)!r}"
        aval = getattr(atom, "aval", None)
        return f"a {aval.str_short()} value" if aval is not None else repr(atom)

    __str__ = __repr__ = lambda self: format(self)


_CONSTANT_CHAIN = (lax.broadcast_in_dim_p, lax.reshape_p, lax.convert_element_type_p)


def literal_value(region, atom):
    """The Python float of a uniform constant, else None: a literal (a scalar, or an array of one
    repeated value), possibly broadcast, reshaped or cast by equations (which are read, not
    consumed; casts round the value as they would). The one reading of "the constant scalar value
    of this atom" for patterns and the fusion passes alike."""
    casts = []
    while True:
        if isinstance(atom, C.Literal):
            v = atom.val
            if not casts and (isinstance(v, (int, float, np.number, np.bool_))
                              or getattr(v, "shape", None) == ()):
                return float(v)
            v = np.asarray(v)
            if v.size == 0 or not np.all(v == v.flat[0]):
                return None
            v = v.flat[0]
            for dtype in reversed(casts):
                v = np.asarray(v).astype(dtype)
            return float(v)
        pos = region.producer(atom) if isinstance(atom, C.Var) else None
        if pos is None:
            return None
        eqn = region.eqns[pos]
        if eqn.primitive not in _CONSTANT_CHAIN or len(eqn.invars) != 1:
            return None
        if eqn.primitive is lax.convert_element_type_p:
            casts.append(eqn.outvars[0].aval.dtype)
        atom = eqn.invars[0]


def _run_predicate(pred, *args):
    """None when `pred` accepts, else a reason string."""
    r = pred(*args)
    if r is True or r is None:
        return None
    if r is False:
        return f"{getattr(pred, '__name__', 'predicate')} failed"
    return str(r)


def _check_aval(atom, rank, dtype, shape):
    aval = getattr(atom, "aval", None)
    if aval is None:
        return None
    if rank is not None and len(aval.shape) != rank:
        return f"rank {len(aval.shape)} != {rank}"
    if dtype is not None:
        if callable(dtype) and not isinstance(dtype, (type, np.dtype)):
            reason = _run_predicate(dtype, aval.dtype)
            if reason:
                return f"dtype {aval.dtype}: {reason}"
        else:
            wanted = tuple(np.dtype(d) for d in (dtype if isinstance(dtype, (tuple, list))
                                                  else (dtype,)))
            if np.dtype(aval.dtype) not in wanted:
                return f"dtype {aval.dtype} != {'|'.join(d.name for d in wanted)}"
    if shape is not None:
        if callable(shape) and not isinstance(shape, (tuple, list)):
            reason = _run_predicate(shape, tuple(aval.shape))
            if reason:
                return f"shape {tuple(aval.shape)}: {reason}"
        elif len(shape) != len(aval.shape) or any(
                s is not None and s != a for s, a in zip(shape, aval.shape)):
            return f"shape {tuple(aval.shape)} != {tuple(shape)}"
    return None


@functools.lru_cache(maxsize=64)
def is_floating(dtype):
    """A `dtype=` predicate: floating-point dtypes (bfloat16 included)."""
    return bool(jax.dtypes.issubdtype(dtype, np.floating)) or "not a floating-point dtype"


# -- patterns ------------------------------------------------------------------------------------

class Pattern:
    """Base class: `match(state, atom) -> True | NoMatch`."""

    def match(self, st: State, atom):
        raise NotImplementedError

    def root_primitives(self):
        """Primitives the matched value may be produced by (None: any value, not anchorable)."""
        return None

    def captures(self):
        """(names of captured values, names of captured constants) this pattern may bind;
        None where unknown (a user-defined pattern), which turns `PatternRule`'s check off."""
        return None

    def __or__(self, other):
        return Alt(self, other)

    def where(self, pred: Callable, what: str | None = None) -> "Pattern":
        """This pattern, plus `pred(atom, bindings) -> True | str` checked after it matched."""
        return Where(self, pred, what)

    def named(self, name: str) -> "Pattern":
        """This pattern, capturing its value under `name`."""
        return Capture(name, self)


class Wildcard(Pattern):
    """Any value (input, literal or intermediate), captured under `name` when given."""

    def __init__(self, name: str | None = None, *, rank=None, dtype=None, shape=None,
                 where: Callable | None = None):
        self.name, self.rank, self.dtype, self.shape, self.pred = name, rank, dtype, shape, where

    def captures(self):
        return frozenset([self.name] if self.name else ()), frozenset()

    def match(self, st, atom):
        label = self.name or "_"
        if self.name is not None and self.name in st.bindings:
            if same_atom(st.bindings[self.name], atom):
                return True
            return st.fail("{} is {} here but {} before", label, _describe(atom),
                           _describe(st.bindings[self.name]))
        reason = _check_aval(atom, self.rank, self.dtype, self.shape)
        if reason is None and self.pred is not None:
            reason = _run_predicate(self.pred, atom, Bindings(st))
        if reason is not None:
            return st.fail("{} {}", label, reason)
        if self.name is not None:
            st.bindings[self.name] = atom
        return True


class Same(Pattern):
    """The value captured earlier under `name` (which must be bound already)."""

    def __init__(self, name: str):
        self.name = name

    def captures(self):
        return frozenset(), frozenset()

    def match(self, st, atom):
        if self.name not in st.bindings:
            return st.fail("{} is not captured yet", self.name)
        if same_atom(st.bindings[self.name], atom):
            return True
        return st.fail("{} is {} here but {} before", self.name, _describe(atom),
                       _describe(st.bindings[self.name]))


class Lit(Pattern):
    """A uniform constant: value within `rtol`/`atol` of `value` (any value when None).

    `name` captures the float value (not an atom); `where(value) -> True | str` adds a check.
    """

    def __init__(self, value: float | None = None, *, name: str | None = None,
                 rtol: float = 1e-6, atol: float = 0.0, where: Callable | None = None):
        self.value, self.name, self.rtol, self.atol, self.pred = value, name, rtol, atol, where

    def captures(self):
        return frozenset(), frozenset([self.name] if self.name else ())

    def match(self, st, atom):
        v = literal_value(st.region, atom)
        if v is None:
            return st.fail("expected a constant{}, got {}",
                           "" if self.value is None else f" {self.value!r}", _describe(atom))
        if self.value is not None and not _close(v, self.value, self.rtol, self.atol):
            return st.fail("constant {:.7g} != {:.7g}", v, self.value)
        if self.pred is not None:
            reason = _run_predicate(self.pred, v)
            if reason:
                return st.fail("constant {!r}: {}", v, reason)
        if self.name is not None:
            if self.name in st.bindings and not _close(st.bindings[self.name], v, self.rtol,
                                                       self.atol):
                return st.fail("{} is {!r} here but {!r} before", self.name, v,
                               st.bindings[self.name])
            st.bindings[self.name] = v
        return True


def _close(a, b, rtol, atol) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * abs(b)


def _prims(primitive) -> tuple:
    return tuple(primitive) if isinstance(primitive, (tuple, list, frozenset, set)) else (primitive,)


def _prim_names(prims) -> str:
    return "|".join(p.name for p in prims)


def _union_captures(patterns, values=(), constants=()):
    """The captures of `patterns` plus the given names; None if any is unknown."""
    values, constants = set(values), set(constants)
    for p in patterns:
        c = p.captures()
        if c is None:
            return None
        values |= c[0]
        constants |= c[1]
    return frozenset(values), frozenset(constants)


def _no_factor_marker(pattern, where: str):
    """`Inverse` and `OptionalFactor` only mean something as factors of a `Product`."""
    for p in pattern.alternatives if isinstance(pattern, Alt) else (pattern,):
        if isinstance(p, (Inverse, OptionalFactor)):
            raise TypeError(f"{type(p).__name__}(...) is only meaningful as a factor of a "
                            f"Product, not as {where}")
        if isinstance(p, Alt):
            _no_factor_marker(p, where)
    return pattern


class Prim(Pattern):
    """An equation applying `primitive` (or one of a tuple) whose operands match `operands`.

    Args:
      primitive: a `Primitive` or a tuple of them.
      operands: one pattern per operand.
      name: capture the result; if the name is already bound the value must be that one.
      params: {param name: expected value or predicate `fn(value, eqn) -> True | str`}.
      commutative: a binary operation whose operands may come in either order.
      rank, dtype, shape, where: constraints on the result, as for `Wildcard`.
    """

    def __init__(self, primitive, *operands, name: str | None = None, params: dict | None = None,
                 commutative: bool = False, rank=None, dtype=None, shape=None,
                 where: Callable | None = None):
        self.prims = _prims(primitive)
        self._names = _prim_names(self.prims)
        self.operands = tuple(_no_factor_marker(p, f"an operand of `{self._names}`")
                              for p in operands)
        self._operand_roots = tuple(p.root_primitives() for p in self.operands)
        self.name, self.params, self.commutative = name, dict(params or {}), commutative
        self.rank, self.dtype, self.shape, self.pred = rank, dtype, shape, where
        if commutative and len(operands) != 2:
            raise ValueError("commutative=True needs exactly two operand patterns")

    def root_primitives(self):
        return frozenset(self.prims)

    def captures(self):
        return _union_captures(self.operands, [self.name] if self.name else ())

    def match(self, st, atom):
        if self.name is not None and self.name in st.bindings:
            if same_atom(st.bindings[self.name], atom):
                return True
            return st.fail("{} is {} here but {} before", self.name, _describe(atom),
                           _describe(st.bindings[self.name]))
        pos, eqn = st.producer(atom)
        if eqn is None:
            return st.fail("expected `{}`, got {}", self._names,
                           "an input" if isinstance(atom, C.Var) else _describe(atom))
        if eqn.primitive not in self.prims:
            return st.fail("expected `{}`, got `{}`", self._names, eqn.primitive)
        if len(eqn.invars) != len(self.operands):
            return st.fail("`{}` has {} operands, the pattern {}", eqn.primitive,
                           len(eqn.invars), len(self.operands))
        reason = _check_aval(atom, self.rank, self.dtype, self.shape)
        if reason is not None:
            return st.fail("`{}` result {}", eqn.primitive, reason)
        for key, want in self.params.items():
            have = eqn.params.get(key)
            if callable(want) and not isinstance(want, (np.dtype, type)):
                reason = _run_predicate(want, have, eqn)
                if reason:
                    return st.fail("{} {} {}", eqn.primitive, key, reason)
            elif not _param_equal(have, want):
                return st.fail("{} {} {!r} != {!r}", eqn.primitive, key, have, want)
        # Look one level ahead (operands' producing primitives) before recursing.
        orders = [o for o in ((eqn.invars, eqn.invars[::-1]) if self.commutative
                              else (eqn.invars,)) if self._fits(st, o)]
        if not orders:
            return st.fail("`{}` operands come from {}", eqn.primitive, _Lazy(
                lambda: ", ".join(f"`{e.primitive}`" if e is not None else "inputs/constants"
                                  for e in (st.producer(a)[1] for a in eqn.invars))))
        st.eqns.add(pos)
        r = None
        for atoms in orders:
            attempt = self._operands(st, atoms, self.operands)
            if attempt:
                r = attempt
                break
            r = attempt if r is None else r  # report the first failure
        if not r:
            return r
        if self.pred is not None:
            reason = _run_predicate(self.pred, atom, Bindings(st))
            if reason:
                return st.fail("`{}` {}", eqn.primitive, reason)
        if self.name is not None:
            st.bindings[self.name] = atom
        return True

    def _fits(self, st, atoms) -> bool:
        for a, roots in zip(atoms, self._operand_roots):
            if roots is not None:
                _, e = st.producer(a)
                if e is None or e.primitive not in roots:
                    return False
        return True

    @staticmethod
    def _operands(st, atoms, patterns):
        saved = st.save()
        for a, p in zip(atoms, patterns):
            r = p.match(st, a)
            if not r:
                st.restore(saved)
                return r
        return True


def _param_equal(have, want) -> bool:
    try:
        return bool(have == want)
    except Exception:  # arrays and exotic objects: unequal unless identical
        return have is want


class Alt(Pattern):
    """The first of `alternatives` that matches."""

    def __init__(self, *alternatives: Pattern):
        flat = []
        for a in alternatives:
            flat.extend(a.alternatives if isinstance(a, Alt) else (a,))
        self.alternatives = tuple(flat)
        self._roots = [a.root_primitives() for a in self.alternatives]
        names = [p.name for r in self._roots if r for p in sorted(r, key=lambda p: p.name)]
        self._root_names = "|".join(dict.fromkeys(names))

    def root_primitives(self):
        roots = self._roots
        return None if any(r is None for r in roots) else frozenset().union(*roots)

    def captures(self):
        return _union_captures(self.alternatives)

    def match(self, st, atom):
        _, eqn = st.producer(atom)
        prim = eqn.primitive if eqn is not None else None
        candidates = [a for a, roots in zip(self.alternatives, self._roots)
                      if roots is None or prim in roots]
        if not candidates:
            return st.fail("expected `{}`, got {}", self._root_names,
                           f"`{prim}`" if prim else _describe(atom))
        saved, reasons = st.save(), []
        for alt in candidates:
            r = alt.match(st, atom)
            if r:
                return r
            reasons.append(r)
            st.restore(saved)
        return NoMatch("{}", _Joined(reasons))


class _Joined:
    """Reasons joined lazily (formatted only when a near miss is printed)."""

    def __init__(self, reasons):
        self.reasons = reasons

    def __format__(self, spec):
        return " | ".join(r.reason for r in self.reasons)


class _Lazy:
    """A message part computed only when the message is read."""

    def __init__(self, fn):
        self.fn = fn

    def __format__(self, spec):
        return self.fn()


class Capture(Pattern):
    """`pattern`, with its value captured under `name` (a bound name must be that value)."""

    def __init__(self, name: str, pattern: Pattern):
        self.name, self.pattern = name, _no_factor_marker(pattern, f"the capture {name!r}")

    def root_primitives(self):
        return self.pattern.root_primitives()

    def captures(self):
        return _union_captures([self.pattern], [self.name])

    def match(self, st, atom):
        if self.name in st.bindings:
            if same_atom(st.bindings[self.name], atom):
                return True
            return st.fail("{} is {} here but {} before", self.name, _describe(atom),
                           _describe(st.bindings[self.name]))
        r = self.pattern.match(st, atom)
        if r:
            st.bindings[self.name] = atom
        return r


class Where(Pattern):
    def __init__(self, pattern: Pattern, pred: Callable, what: str | None):
        self.pattern = _no_factor_marker(pattern, "a pattern with a `where` check")
        self.pred, self.what = pred, what

    def root_primitives(self):
        return self.pattern.root_primitives()

    def captures(self):
        return _union_captures([self.pattern])

    def match(self, st, atom):
        r = self.pattern.match(st, atom)
        if not r:
            return r
        reason = _run_predicate(self.pred, atom, Bindings(st))
        if reason:
            return st.fail("{}{}", f"{self.what}: " if self.what else "", reason)
        return True


def Cast(pattern: Pattern, dtype=None, name: str | None = None) -> Prim:
    """A `convert_element_type` (to `dtype`, when given) of `pattern`."""
    return Prim(lax.convert_element_type_p, pattern, name=name, dtype=dtype)


def maybe_cast(pattern: Pattern) -> Pattern:
    """`pattern`, possibly behind a `convert_element_type` (the cast, if there, is consumed)."""
    return Alt(Cast(pattern), pattern)


# -- products ------------------------------------------------------------------------------------

class Inverse(Pattern):
    """Inside a `Product`: a factor that divides (the `b` of `a / b`). Rejected anywhere else."""

    def __init__(self, pattern: Pattern):
        if isinstance(pattern, OptionalFactor):
            raise TypeError("write OptionalFactor(Inverse(p)) for a divisor that may be absent, "
                            "not Inverse(OptionalFactor(p))")
        self.pattern = _no_factor_marker(pattern, "the pattern of an Inverse")

    def captures(self):
        return _union_captures([self.pattern])

    def match(self, st, atom):
        return st.fail("Inverse() is only meaningful as a factor of a Product")


class OptionalFactor(Pattern):
    """Inside a `Product`: a factor that may be absent. Rejected anywhere else."""

    def __init__(self, pattern: Pattern):
        if isinstance(pattern, OptionalFactor):
            raise TypeError("OptionalFactor(OptionalFactor(p)): one is enough")
        self.pattern = pattern if isinstance(pattern, Inverse) else _no_factor_marker(
            pattern, "the pattern of an OptionalFactor")

    def captures(self):
        return _union_captures([self.pattern])

    def match(self, st, atom):
        return st.fail("OptionalFactor() is only meaningful as a factor of a Product")


def _factor_match(p, st, atom, inverted):
    if isinstance(p, OptionalFactor):
        return _factor_match(p.pattern, st, atom, inverted)
    if isinstance(p, Inverse):
        return p.pattern.match(st, atom) if inverted else st.fail("expected a divisor")
    if isinstance(p, Alt):
        saved, reasons = st.save(), []
        for alt in p.alternatives:
            r = _factor_match(alt, st, atom, inverted)
            if r:
                return r
            reasons.append(r)
            st.restore(saved)
        return NoMatch("{}", _Joined(reasons))
    if inverted:
        return st.fail("{} divides where a factor was expected", _describe(atom))
    return p.match(st, atom)


def _factor_prims(p, inverted):
    """Primitives a leaf may come from to possibly match factor `p` (None: anything)."""
    if isinstance(p, OptionalFactor):
        return _factor_prims(p.pattern, inverted)
    if isinstance(p, Inverse):
        return p.pattern.root_primitives() if inverted else frozenset()
    if isinstance(p, Alt):
        parts = [_factor_prims(a, inverted) for a in p.alternatives]
        return None if any(x is None for x in parts) else frozenset().union(*parts)
    return frozenset() if inverted else p.root_primitives()


class Product(Pattern):
    """A product of `factors` in any order and association: `mul` chains and divisions
    (`a / b` contributes `a`'s factors and `b` as an `Inverse` factor). Factors wrapped in
    `OptionalFactor` may be missing. Factors are matched in the order given, so put the one that
    captures shared values first."""

    def __init__(self, *factors: Pattern):
        self.factors = tuple(factors)
        self.required = sum(not isinstance(f, OptionalFactor) for f in factors)
        if len(self.factors) < 2:
            raise ValueError("Product needs at least two factors")

        self._prims = {inv: [_factor_prims(f, inv) for f in self.factors] for inv in (False, True)}
        self._required_ids = [j for j, f in enumerate(self.factors) if not isinstance(f, OptionalFactor)]

    def root_primitives(self):
        return frozenset({lax.mul_p, lax.div_p})

    def captures(self):
        return _union_captures(self.factors)

    def match(self, st, atom):
        pos, eqn = st.producer(atom)
        if eqn is None or eqn.primitive not in (lax.mul_p, lax.div_p):
            return st.fail("expected a product (`mul` or `div`), got {}",
                           f"`{eqn.primitive}`" if eqn is not None else _describe(atom))
        last = None
        for leaves, consumed in self._frontiers(st, atom, len(self.factors), root=True):
            if len(leaves) < self.required:
                continue
            r = self._assign(st, leaves, consumed)
            if r:
                return r
            last = r
        if last is None:
            return st.fail("the product has fewer than {} factors", self.required)
        return last

    def _frontiers(self, st, atom, budget, root=False, inverted=False):
        """(leaves [(atom, inverted)], consumed positions) for each way to split the product."""
        if not root:
            yield [(atom, inverted)], ()
        if budget < 2 or inverted:
            return
        pos, eqn = st.producer(atom)
        if eqn is None or eqn.primitive not in (lax.mul_p, lax.div_p):
            return
        a, b = eqn.invars
        for la, ca in self._frontiers(st, a, budget - 1):
            if eqn.primitive is lax.mul_p:
                for lb, cb in self._frontiers(st, b, budget - len(la)):
                    yield la + lb, ca + cb + (pos,)
            else:
                yield la + [(b, True)], ca + (pos,)

    def _assign(self, st, leaves, consumed):
        """Try each injective assignment of leaves to factors covering the required ones."""
        n, m = len(leaves), len(self.factors)
        allowed = []
        for leaf_atom, inv in leaves:
            _, leq = st.producer(leaf_atom)
            allowed.append({j for j, prims in enumerate(self._prims[inv])
                            if prims is None or (leq is not None and leq.primitive in prims)})
        last = None
        if any(all(j not in a for a in allowed) for j in self._required_ids):
            return st.fail("the product's factors ({}) fit none of the factor patterns",
                           _Lazy(lambda: ", ".join(format(_describe(a)) for a, _ in leaves)))
        # The first factor matched sees no captures of the others: a failure there holds for
        # every assignment pairing the same leaf and factor.
        first_failed = set()
        for perm in itertools.permutations(range(m), n):
            if any(j not in allowed[i] for i, j in enumerate(perm)):
                continue
            if sum(not isinstance(self.factors[j], OptionalFactor) for j in perm) != self.required:
                continue
            order = sorted(enumerate(perm), key=lambda t: t[1])
            if order[0] in first_failed:
                continue
            saved = st.save()
            st.eqns.update(consumed)
            r = True
            for k, (i, j) in enumerate(order):
                r = _factor_match(self.factors[j], st, leaves[i][0], leaves[i][1])
                if not r:
                    if k == 0:
                        first_failed.add((i, j))
                    break
            if r:
                return True
            st.restore(saved)
            last = r
        if last is None:
            return st.fail("the product's factors ({}) fit none of the factor patterns",
                           _Lazy(lambda: ", ".join(format(_describe(a)) for a, _ in leaves)))
        return last


# -- broadcast shapes ----------------------------------------------------------------------------

def _is_row_shaped(shape) -> bool:
    return all(d == 1 for d in shape[:-1])


def _widening(eqn) -> bool:
    """A cast that keeps every value exactly (bfloat16 -> float32, not the reverse)."""
    return bool(np.can_cast(np.dtype(eqn.invars[0].aval.dtype),
                            np.dtype(eqn.outvars[0].aval.dtype), "safe"))


class RowVector(Pattern):
    """A value that varies only along the last axis: a vector (or a (1, ..., 1, n) array)
    broadcast, reshaped or exactly cast (`convert_element_type` widening) up to the use.

    Captures the source under `name`: rank >= 1, all but the last dimension 1. The
    broadcasting equations are read, not consumed; a narrowing cast ends the walk, so the
    source holds exactly the values used.
    """

    def __init__(self, name: str):
        self.name = name

    def captures(self):
        return frozenset([self.name]), frozenset()

    def match(self, st, atom):
        if not isinstance(atom, C.Var):
            return st.fail("{}: expected an array, got {}", self.name, _describe(atom))
        src = atom
        for _ in range(16):
            _, eqn = st.producer(src)
            if eqn is None:
                break
            p = eqn.primitive
            if p is lax.convert_element_type_p and _widening(eqn):
                src = eqn.invars[0]
            elif p is lax.reshape_p and _is_row_shaped(eqn.invars[0].aval.shape) and \
                    len(eqn.invars[0].aval.shape) >= 1 and \
                    eqn.invars[0].aval.shape[-1] == eqn.outvars[0].aval.shape[-1]:
                src = eqn.invars[0]
            elif p is lax.broadcast_in_dim_p:
                op_shape, dims = eqn.invars[0].aval.shape, eqn.params["broadcast_dimensions"]
                last = len(eqn.outvars[0].aval.shape) - 1
                if any(d != 1 and bd != last for d, bd in zip(op_shape, dims)):
                    return st.fail("{}: broadcast_in_dim {} -> {} maps a non-trailing axis",
                                   self.name, tuple(op_shape), tuple(eqn.outvars[0].aval.shape))
                if not op_shape:
                    break  # a broadcast scalar is no vector
                src = eqn.invars[0]
            else:
                break
        shape = tuple(getattr(src.aval, "shape", ()))
        if not shape or not _is_row_shaped(shape):
            return st.fail("{}: {} does not vary only along the last axis", self.name,
                           _describe(src))
        if self.name in st.bindings and not same_atom(st.bindings[self.name], src):
            return st.fail("{} is {} here but {} before", self.name, _describe(src),
                           _describe(st.bindings[self.name]))
        st.bindings[self.name] = src
        return True


def row_values(source, n: int):
    """The (n,) vector a `RowVector` source stands for (inside a replacement)."""
    if source is None:
        return None
    import jax.numpy as jnp
    return jnp.broadcast_to(jnp.reshape(source, (-1,)), (n,))


class Keep(Pattern):
    """`pattern` (a reduced statistic), optionally re-shaped to keep the reduced trailing axis:
    `reshape` s -> s + (1,), or `broadcast_in_dim` s -> s + (1,) or s + (n,) on leading axes.
    The re-shaping equation is consumed."""

    def __init__(self, pattern: Pattern):
        self.pattern = _no_factor_marker(pattern, "the pattern of a Keep")
        self._inner_roots = pattern.root_primitives()

    def captures(self):
        return _union_captures([self.pattern])

    def root_primitives(self):
        inner = self._inner_roots
        return None if inner is None else inner | {lax.reshape_p, lax.broadcast_in_dim_p}

    def match(self, st, atom):
        pos, eqn = st.producer(atom)
        if eqn is None or eqn.primitive not in (lax.reshape_p, lax.broadcast_in_dim_p):
            return self.pattern.match(st, atom)
        s_in, s_out = tuple(eqn.invars[0].aval.shape), tuple(eqn.outvars[0].aval.shape)
        keeps = len(s_out) == len(s_in) + 1 and s_out[:-1] == s_in and (
            (eqn.primitive is lax.reshape_p and s_out[-1] == 1 and
             eqn.params.get("dimensions") is None) or
            (eqn.primitive is lax.broadcast_in_dim_p and
             tuple(eqn.params["broadcast_dimensions"]) == tuple(range(len(s_in)))))
        saved = st.save()
        st.eqns.add(pos)
        r = self.pattern.match(st, eqn.invars[0])
        if r and keeps:
            return r
        if r:  # the statistic is right but re-shaped some other way
            r = st.fail("`{}` {} -> {} does not keep the reduced trailing axis", eqn.primitive,
                        s_in, s_out)
        st.restore(saved)
        inner_roots = self._inner_roots
        if inner_roots is None or eqn.primitive in inner_roots:
            return self.pattern.match(st, atom)
        return r


# -- bindings view and rules ---------------------------------------------------------------------

class Bindings:
    """What a match captured, for predicates, checks and params.

    `b["x"]` is the captured atom (or float, for `Lit` captures); `b.root` the matched value;
    `b.eqns` the consumed positions (a check may add to it with `b.consume`).
    """

    def __init__(self, st: State, root=None):
        self._st, self.root = st, root

    @property
    def region(self):
        return self._st.region

    @property
    def eqns(self) -> set:
        return self._st.eqns

    def __getitem__(self, name):
        try:
            return self._st.bindings[name]
        except KeyError:
            raise KeyError(f"nothing captured under {name!r}; captured: "
                           f"{sorted(k for k in self._st.bindings if '#' not in k)}") from None

    def __setitem__(self, name, value):
        self._st.bindings[name] = value

    def __contains__(self, name):
        return name in self._st.bindings

    def get(self, name, default=None):
        return self._st.bindings.get(name, default)

    def producer(self, atom):
        """The equation defining `atom` (None for inputs and literals)."""
        return self._st.producer(atom)[1]

    def used_only_inside(self, atom) -> bool:
        """Whether every use of `atom` is by a consumed equation (and it is not an output)."""
        users = self.region.users(atom)
        return all(u in self._st.eqns for u in users)

    def consume(self, atom):
        pos, _ = self._st.producer(atom)
        if pos is not None:
            self._st.eqns.add(pos)


def _check_rule_names(rule, pattern, inputs, outputs):
    """Every input and output name must be a value the pattern can capture: a typo would hand
    the replacement nothing for it."""
    captures = pattern.captures()
    if captures is None:
        return
    values, constants = captures
    for kind, names in (("inputs", inputs), ("outputs", outputs)):
        for n in names:
            if n in values:
                continue
            if n in constants:
                raise ValueError(f"rule {rule!r}: {kind} name {n!r} captures a constant (a "
                                 f"`Lit`); hand constants to the replacement through params")
            raise ValueError(f"rule {rule!r}: {kind} name {n!r} is never captured by the "
                             f"pattern; it captures {sorted(v for v in values if '#' not in v)}")


def _call_by_name(*values, _fn, _names, **params):
    """The replacement callable the engine sees: inputs handed to `_fn` as keyword arguments."""
    return _fn(**dict(zip(_names, values)), **params)


class PatternRule(Rule):
    """A rewrite rule from a pattern.

    Args:
      name: the rule's name (reports show `pass.rule`).
      pattern: the pattern, rooted at an operation (anchoring uses its root primitives).
      replacement: a module-level function called as `replacement(**inputs, **params)`.
      inputs: capture names handed to the replacement as keyword arguments; names not captured
        (an absent `OptionalFactor`, say) are left out, so give them defaults. A name the
        pattern can never capture raises `ValueError` here, naming the captures.
      params: static keyword arguments (hashable): a dict, or `fn(bindings) -> dict`.
      check: `fn(bindings) -> None | True | NoMatch | str`; a string declines the match with
        that reason (reported in `report.declined`), a `NoMatch` rejects it.
      outputs: capture names of the values the replacement returns, in order (default: the
        pattern's root). With several, the replacement returns a tuple.
      priority: higher wins where matches overlap.
      maximal: defer to this rule's own match at the root's only user when that match takes
        this root (so `(x - m) * r * scale` is one match, not `(x - m) * r`).
    """

    def __init__(self, name: str, pattern: Pattern, replacement: Callable, *,
                 inputs: Sequence[str], params=None, check: Callable | None = None,
                 outputs: Sequence[str] | None = None, priority: int = 0,
                 maximal: bool = True):
        _no_factor_marker(pattern, f"the pattern of rule {name!r}")
        roots = pattern.root_primitives()
        if not roots:
            raise ValueError(f"rule {name!r}: the pattern must be rooted at an operation (Prim, "
                             f"Product, Example...) so that matching can be anchored")
        self.name, self.pattern, self.replacement = name, pattern, replacement
        self.roots, self.priority = tuple(sorted(roots, key=lambda p: p.name)), priority
        self.inputs, self.params, self.check = tuple(inputs), params, check
        self.outputs = None if outputs is None else tuple(outputs)
        self.maximal = maximal
        _check_rule_names(name, pattern, self.inputs, self.outputs or ())
        self._local = threading.local()  # the memo below, per thread

    def match(self, region, position):
        # Memoized per version of the region's equation list (`Region.set_eqns` replaces it):
        # the maximal-match check below asks again about positions the engine visits next.
        local = self._local
        if getattr(local, "eqns", None) is not region.eqns:
            local.eqns, local.memo = region.eqns, {}
        m = local.memo.get(position)
        if m is None:
            m = local.memo[position] = self._maximal_match(region, position)
        return m

    def _maximal_match(self, region, position):
        # The engine takes the earliest root first; where this rule also matches at the only
        # user of this root and that match takes this root, leave the site to that match.
        user = None
        if self.maximal:
            outvars = region.eqns[position].outvars
            users = region.users(outvars[0]) if len(outvars) == 1 else ()
            if len(users) == 1 and users[0] != OUTPUT and \
                    region.eqns[users[0]].primitive in self.roots:
                user = users[0]
                known = self._local.memo.get(user)
                if known is not None and self._takes(known, position):
                    return self._deferred(region, user)
        m = self._match(region, position)
        if not m or m.declined or user is None:
            return m
        if self._takes(self.match(region, user), position):
            return self._deferred(region, user)
        return m

    @staticmethod
    def _takes(m, position) -> bool:
        return bool(m) and not m.declined and position in m.eqns

    @staticmethod
    def _deferred(region, user):
        return NoMatch("part of a larger match rooted at `{}`", region.eqns[user].primitive)

    def _match(self, region, position):
        eqn = region.eqns[position]
        if len(eqn.outvars) != 1:
            return NoMatch("`{}` has {} results; patterns match one value", eqn.primitive,
                           len(eqn.outvars))
        root = eqn.outvars[0]
        st = State(region)
        r = self.pattern.match(st, root)
        if not r:
            return st.best if st.best is not None else r
        b = Bindings(st, root)
        declined = None
        if self.check is not None:
            c = self.check(b)
            if isinstance(c, NoMatch):
                return c
            if isinstance(c, str):
                declined = c
        names, inputs = [], []
        for n in self.inputs:
            if n in st.bindings:
                atom = st.bindings[n]
                if not isinstance(atom, (C.Var, C.Literal)):
                    raise TypeError(f"rule {self.name!r}: input {n!r} captured {atom!r}, not a "
                                    f"value; hand constants over through params")
                names.append(n)
                inputs.append(atom)
        params = self.params(b) if callable(self.params) else dict(self.params or {})
        outputs = (root,) if self.outputs is None else tuple(b[n] for n in self.outputs)
        st.eqns.add(position)
        return Match(root=position, eqns=frozenset(st.eqns), inputs=tuple(inputs),
                     outputs=outputs, replacement=_call_by_name,
                     params={"_fn": self.replacement, "_names": tuple(names), **params},
                     declined=declined)


# -- pattern by example --------------------------------------------------------------------------

_COMMUTATIVE = frozenset({lax.add_p, lax.mul_p, lax.max_p, lax.min_p, lax.and_p, lax.or_p,
                          lax.eq_p, lax.ne_p})


def _aval_key(atom):
    a = atom.aval
    return (tuple(a.shape), np.dtype(a.dtype).name, bool(getattr(a, "weak_type", False)))


@functools.lru_cache(maxsize=1024)
def _canonical_trace(fn, avals):
    """`fn` traced on `avals` ((shape, dtype, weak_type) per argument) and canonicalized."""
    from passes import cleanup_passes
    from passes.pipeline import Context

    structs = [jax.ShapeDtypeStruct(s, d, weak_type=w) for s, d, w in avals]
    closed = jax.make_jaxpr(fn)(*structs)
    if C.closed_consts(closed):
        raise ValueError(f"the example function {getattr(fn, '__name__', fn)} closes over "
                         f"arrays; pass them as arguments instead")
    # The clean-ups run directly, not as a Pipeline: a pipeline would apply the run's
    # JAXPASSES_DISABLE list, which names passes this one does not have.
    ctx, cleanups = Context(), cleanup_passes()
    for _ in range(8):
        changed = 0
        for p in cleanups:
            closed, n = p.run_program(closed, ctx)
            changed += n
        if not changed:
            break
    return C.open_jaxpr(closed)


def _example_aval(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return (tuple(x.shape), np.dtype(x.dtype).name, bool(getattr(x, "weak_type", False)))
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return (tuple(x.shape), np.dtype(x.dtype).name, False)
    raise TypeError(f"Example arguments must be arrays or jax.ShapeDtypeStructs, got "
                    f"{type(x).__name__}")


class Example(Pattern):
    """Pattern by example: the computation `fn` performs, at any shapes, ranks and dtypes.

    `fn` is traced on `example_args` (arrays or `jax.ShapeDtypeStruct`s, one per positional
    parameter), canonicalized like the program, and turned into a pattern of the same
    primitives. Its parameters become captures named after `fn`'s parameters; a keyword
    argument `param=pattern` matches that input with `pattern` instead of a wildcard.

    At match time `fn` is traced again on the captured inputs' shapes and dtypes and the
    matched equations must equal that trace: same primitives, parameters (reduction axes,
    shapes, dimension numbers, ...), result shapes and dtypes, and literals within `rtol`.

    The example's shapes only pick the computation: an example traced on 2-D arrays also
    matches a 3-D program wherever `fn` traced at 3-D gives the same equations (`x.sum(-1)`
    does, `x.sum(1)` then means another axis). `rank_polymorphic=False` pins each input to its
    example's rank.

    Scaling by a constant matches in either spelling: `x * c` in the example also matches
    `x / d` in the program when c = 1/d (within `rtol`), and the other way round.

    `literals` says how the example's constants match the program's: "exact" (within `rtol`),
    "any" (any uniform constant: `x * 0.5` also matches `x * 0.70710678`), or a tuple of
    names, one per literal in the order the example's equations use them, capturing each
    matched constant's value as `Lit(name=...)` does (for a replacement's params).
    """

    def __init__(self, fn: Callable, *example_args, rtol: float = 1e-6,
                 rank_polymorphic: bool = True, literals="exact", **input_patterns):
        self.fn, self.rtol = fn, rtol
        self.ranks = None if rank_polymorphic else tuple(
            len(_example_aval(x)[0]) for x in example_args)
        avals = tuple(_example_aval(x) for x in example_args)
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(params) != len(avals):
            raise TypeError(f"Example: {getattr(fn, '__name__', 'fn')} takes {len(params)} "
                            f"positional parameters, {len(avals)} example arguments given")
        self.input_names = tuple(p.name for p in params)
        unknown = set(input_patterns) - set(self.input_names)
        if unknown:
            raise TypeError(f"Example: no parameter named {sorted(unknown)}; parameters are "
                            f"{list(self.input_names)}")
        self.jaxpr = jaxpr = _canonical_trace(fn, avals)
        self.literal_names = _literal_names(literals, jaxpr)
        if len(jaxpr.outvars) != 1 or not isinstance(jaxpr.outvars[0], C.Var) or \
                jaxpr.outvars[0] in jaxpr.invars:
            raise ValueError("Example: the function must return one array computed by at least "
                             "one operation")
        used = {a for e in jaxpr.eqns for a in e.invars if isinstance(a, C.Var)}
        missing = [n for n, v in zip(self.input_names, jaxpr.invars) if v not in used]
        if missing:
            raise ValueError(f"Example: parameters {missing} are not used by the function")
        self._scope = f"ex{next(_names)}"
        self._internal: list[str] = []
        inputs = {v: Capture(n, input_patterns.get(n, Wildcard()))
                  for n, v in zip(self.input_names, jaxpr.invars)}
        producers = {v: e for e in jaxpr.eqns for v in e.outvars}
        built: dict = {}

        def build(v):
            if isinstance(v, C.Literal):
                return Lit()
            if v in inputs:
                return inputs[v]
            if v not in built:
                eqn = producers[v]
                name = f"{self._scope}#{len(self._internal)}"
                self._internal.append(name)
                prims = eqn.primitive
                if prims in (lax.mul_p, lax.div_p) and isinstance(eqn.invars[1], C.Literal):
                    prims = (lax.mul_p, lax.div_p)  # x * c also matches x / (1/c): see _Compare
                built[v] = Prim(prims, *[build(a) for a in eqn.invars], name=name,
                                commutative=eqn.primitive in _COMMUTATIVE and len(eqn.invars) == 2)
            return built[v]

        self.structure = build(jaxpr.outvars[0])
        self._input_patterns = [p for p in input_patterns.values()]

    def root_primitives(self):
        return self.structure.root_primitives()

    def captures(self):
        names = self.literal_names if isinstance(self.literal_names, tuple) else ()
        return _union_captures(self._input_patterns, self.input_names, names)

    def match(self, st, atom):
        r = self.structure.match(st, atom)
        if not r:
            return r
        if self.ranks is not None:
            for name, rank in zip(self.input_names, self.ranks):
                have = len(getattr(st.bindings[name].aval, "shape", ()))
                if have != rank:
                    return st.fail("{} has rank {}, the example's has rank {} "
                                   "(rank_polymorphic=False)", name, have, rank)
        avals = tuple(_aval_key(st.bindings[n]) for n in self.input_names)
        try:
            jaxpr = _canonical_trace(self.fn, avals)
        except Exception as e:  # the function does not accept these shapes: not this idiom
            return st.fail("the example does not trace at {}: {}: {}", avals, type(e).__name__, e)
        r = _Compare(st, jaxpr, self).same(jaxpr.outvars[0], atom)
        if not r:
            return r
        for name in self._internal:
            st.bindings.pop(name, None)
        return True

    def __repr__(self):
        return f"Example({getattr(self.fn, '__name__', self.fn)})"


class _Compare:
    """Structural equality of the example's trace and the matched equations."""

    def __init__(self, st, jaxpr, example):
        self.st, self.example = st, example
        self.inputs = dict(zip(jaxpr.invars, example.input_names))
        self.literal_index = {id(a): i for i, a in enumerate(_literals_in_order(jaxpr))}
        self.producers = {v: e for e in jaxpr.eqns for v in e.outvars}
        self.mapping: dict = {}

    def same(self, ref, atom):
        st = self.st
        if isinstance(ref, C.Literal):
            return self._same_literal(ref, literal_value(st.region, atom), atom)
        if ref in self.inputs:
            name = self.inputs[ref]
            return True if same_atom(st.bindings[name], atom) else st.fail(
                "example input {} is {} here but {} elsewhere", name, _describe(atom),
                _describe(st.bindings[name]))
        if ref in self.mapping:
            return True if self.mapping[ref] is atom else st.fail(
                "the example reuses a value where the program has two")
        reqn = self.producers[ref]
        _, eqn = st.producer(atom)
        if eqn is not None and {eqn.primitive, reqn.primitive} == {lax.mul_p, lax.div_p}:
            return self._same_scaling(ref, reqn, atom, eqn)
        if eqn is None or eqn.primitive is not reqn.primitive:
            return st.fail("the example has `{}` where the program has {}", reqn.primitive,
                           f"`{eqn.primitive}`" if eqn is not None else _describe(atom))
        if len(eqn.invars) != len(reqn.invars) or len(eqn.outvars) != len(reqn.outvars):
            return st.fail("`{}` arity differs from the example", eqn.primitive)
        # Operands first, so that a difference is reported where it starts.
        orders = [reqn.invars]
        if reqn.primitive in _COMMUTATIVE and len(reqn.invars) == 2:
            orders.append(reqn.invars[::-1])
        first_failure = None
        for refs in orders:
            saved = dict(self.mapping)
            r = True
            for rv, v in zip(refs, eqn.invars):
                r = self.same(rv, v)
                if not r:
                    break
            if r:
                break
            self.mapping = saved
            first_failure = r if first_failure is None else first_failure
        if not r:
            return first_failure if first_failure is not None else r
        reason = _params_differ(reqn.params, eqn.params, self.example.rtol)
        if reason:
            return st.fail("`{}` {}", eqn.primitive, reason)
        for rv, v in zip(reqn.outvars, eqn.outvars):
            if _aval_key(rv)[:2] != _aval_key(v)[:2]:
                return st.fail("`{}` gives {} where the example gives {}", eqn.primitive,
                               _aval_key(v)[:2], _aval_key(rv)[:2])
        self.mapping[ref] = atom
        return True


    def _same_literal(self, ref, have, atom):
        st = self.st
        want = float(np.asarray(ref.val).flat[0])
        names = self.example.literal_names
        if names != "exact":
            if have is None:
                return st.fail("the example has a constant where the program has {}",
                               _describe(atom))
            return self._bind_literal(names, ref, have)
        if have is None or not _close(have, want, self.example.rtol, 0.0):
            return st.fail("the example has constant {:.7g} where the program has {}", want,
                           f"{have:.7g}" if have is not None else _describe(atom))
        return True

    def _same_scaling(self, ref, reqn, atom, eqn):
        """`x * c` in the example against `x / d` in the program (or the reverse), c = 1/d."""
        st = self.st
        (rx, rc), (px, pc) = reqn.invars, eqn.invars
        have = literal_value(st.region, pc)
        if not isinstance(rc, C.Literal) or have is None or have == 0:
            return st.fail("the example has `{}` where the program has `{}`", reqn.primitive,
                           eqn.primitive)
        r = self._same_literal(rc, 1.0 / have, pc)
        r = r and self.same(rx, px)
        if not r:
            return r
        if _aval_key(reqn.outvars[0])[:2] != _aval_key(eqn.outvars[0])[:2]:
            return st.fail("`{}` gives {} where the example gives {}", eqn.primitive,
                           _aval_key(eqn.outvars[0])[:2], _aval_key(reqn.outvars[0])[:2])
        self.mapping[ref] = atom
        return True

    def _bind_literal(self, names, ref, value):
        if names == "any":
            return True
        i = self.literal_index.get(id(ref))
        if i is None or len(self.literal_index) != len(names):
            return self.st.fail("the example traced at these shapes has {} constants, not the "
                                "{} named", len(self.literal_index), len(names))
        name, bound = names[i], self.st.bindings.get(names[i])
        if bound is not None and not _close(bound, value, self.example.rtol, 0.0):
            return self.st.fail("{} is {!r} here but {!r} before", name, value, bound)
        self.st.bindings[name] = value
        return True


def _literals_in_order(jaxpr):
    return [a for e in jaxpr.eqns for a in e.invars if isinstance(a, C.Literal)]


def _literal_names(literals, jaxpr):
    """"exact", "any", or a tuple of one name per literal of the example."""
    if literals in ("exact", "any"):
        return literals
    if isinstance(literals, str) or not all(isinstance(n, str) for n in literals):
        raise ValueError(f"Example: literals must be 'exact', 'any' or a tuple of names, got "
                         f"{literals!r}")
    names, found = tuple(literals), _literals_in_order(jaxpr)
    if len(names) != len(found):
        values = [float(np.asarray(a.val).flat[0]) for a in found]
        raise ValueError(f"Example: {len(names)} literal names for {len(found)} constants "
                         f"{values} (in the order the example's equations use them)")
    return names


def _is_function(v) -> bool:
    """Derivative rules and thunks in params: plain callables or `linear_util.WrappedFun`s."""
    return (callable(v) and not isinstance(v, (type, np.dtype))) or hasattr(v, "call_wrapped")


def _params_differ(want: dict, have: dict, rtol: float):
    """None when two equations' params agree, else a reason; callables are not compared."""
    for key in set(want) | set(have):
        w, h = want.get(key), have.get(key)
        if C.is_jaxpr(w) or C.is_jaxpr(h):
            if str(w) != str(h):
                return f"{key} body differs from the example"
        elif _is_function(w) and _is_function(h):
            continue
        elif isinstance(w, float) and isinstance(h, float):
            if not _close(h, w, rtol, 0.0):
                return f"{key} {h!r} != {w!r}"
        elif not _param_equal(h, w):
            return f"{key} {h!r} != {w!r}"
    return None


__all__ = [
    "Alt", "Bindings", "Capture", "Cast", "Example", "Inverse", "Keep", "Lit",
    "OptionalFactor", "Pattern", "PatternRule", "Prim", "Product", "RowVector", "Same", "State",
    "Wildcard", "fresh",
    "is_floating", "literal_value", "maybe_cast", "row_values",
]
