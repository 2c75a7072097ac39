"""Rewrite rules: a match over a region, and the equation that replaces it.

A rule finds a `Match` anchored at one equation (its root). The engine replaces the matched
equations with a single call equation whose body is the traced replacement function, so a
replacement is any plain JAX callable: a Pallas kernel with a custom_vjp, a jnp expression, a
library call. The traced body is cached per (replacement, static params, input types).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Sequence

import jax

from passes import _compat as C


class NoMatch:
    """A failed match: falsy, carrying its reason, formatted only when read."""

    __slots__ = ("_fmt", "_args")

    def __init__(self, fmt: str, *args):
        self._fmt, self._args = fmt, args

    def __bool__(self):
        return False

    @property
    def reason(self) -> str:
        return self._fmt.format(*self._args) if self._args else self._fmt

    def __repr__(self):
        return f"NoMatch({self.reason!r})"


@dataclasses.dataclass(frozen=True)
class Match:
    """What a rule found.

    Attributes:
      root: position of the anchoring equation.
      eqns: positions of every equation the replacement takes over (root included). Their
        outputs may only be used outside the match if they are among `outputs`.
      inputs: atoms (variables or literals) handed to the replacement, in order.
      outputs: variables the replacement defines, in order of its results.
      params: static keyword arguments of the replacement (hashable values).
      replacement: the callable; `replacement(*input_values, **params)` returns one array or a
        tuple matching `outputs`.
      declined: when set, the match is reported as declined with this reason and not rewritten.
    """

    root: int
    eqns: frozenset
    inputs: tuple
    outputs: tuple
    replacement: Callable
    params: dict = dataclasses.field(default_factory=dict)
    declined: str | None = None


class Rule:
    """A rewrite rule: `match(region, position) -> Match | NoMatch` for equations of `roots`.

    Subclasses (or the pattern language) implement `match`. `priority` breaks overlaps: higher
    first, then program order.
    """

    name: str = "rule"
    roots: tuple = ()
    priority: int = 0

    def match(self, region, position: int):
        raise NotImplementedError


class FunctionRule(Rule):
    """A rule from a plain matching function: `fn(region, position) -> Match | NoMatch`."""

    def __init__(self, name: str, roots: Sequence, fn: Callable, priority: int = 0):
        self.name, self.roots, self._fn, self.priority = name, tuple(roots), fn, priority

    def match(self, region, position):
        return self._fn(region, position)


def _aval_key(atom):
    a = atom.aval
    return (tuple(a.shape), str(a.dtype), bool(getattr(a, "weak_type", False)))


# Replacement calls are `jit` equations whose name starts with this prefix: canonicalize does not
# inline them and the engine does not descend into them. The name survives JAX's own
# transformations of the equation (DCE, partial evaluation), an object identity would not.
REPLACEMENT_PREFIX = "passes."


@functools.lru_cache(maxsize=4096)
def _traced_call(fn, params_items, in_avals, name, kernel_mode):
    """(call primitive, params, effects, output types, kernel resolutions) of `jit(fn)` traced
    on `in_avals`, built once per key (`kernel_mode`: `_kernel_mode()` when traced)."""
    del kernel_mode
    params = dict(params_items)

    def body(*args):
        return fn(*args, **params)

    structs = [jax.ShapeDtypeStruct(s, d, weak_type=w) for s, d, w in in_avals]
    body.__name__ = REPLACEMENT_PREFIX + name
    with _recording_resolutions() as resolutions:
        traced = jax.make_jaxpr(jax.jit(body, inline=False))(*structs)
    (eqn,) = C.open_jaxpr(traced).eqns
    out_avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.outvars)
    return eqn.primitive, dict(eqn.params), eqn.effects, out_avals, tuple(resolutions)


def _kernel_mode():
    """What of the kernel library's state changes how a replacement traces: whether its Pallas
    kernels trace as opaque stand-ins (`pallas_kernels.opaque_kernels`)."""
    try:
        from pallas_kernels._pallas_compat import opaque
    except ImportError:  # the compiler works without the kernel library
        return None
    return opaque()


def _recording_resolutions():
    """Which kernel implementation each op call in a replacement resolved to, and why."""
    try:
        from pallas_kernels._dispatch import recording_resolutions
    except ImportError:  # the compiler works without the kernel library
        return contextlib.nullcontext([])
    return recording_resolutions()


def is_replacement(eqn) -> bool:
    return (eqn.primitive is C.JIT_PRIMITIVE
            and str(eqn.params.get("name", "")).startswith(REPLACEMENT_PREFIX))


def replacement_eqn(match: Match, root_eqn, name: str):
    """The single equation computing `match.outputs` from `match.inputs` via the replacement,
    and the kernel resolutions (`pallas_kernels` op calls: implementation and why) inside it."""
    in_avals = tuple(_aval_key(a) for a in match.inputs)
    params_items = tuple(sorted(match.params.items()))
    prim, params, effects, out_avals, resolutions = _traced_call(
        match.replacement, params_items, in_avals, name, _kernel_mode())
    want = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in match.outputs)
    if out_avals != want:
        raise TypeError(f"replacement returned {out_avals} where the program has {want}")
    eqn = C.new_jaxpr_eqn(list(match.inputs), list(match.outputs), prim, params, effects,
                          root_eqn.source_info, root_eqn.ctx)
    return eqn, resolutions
