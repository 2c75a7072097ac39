"""Canonicalization: bring equivalent spellings to one form so that idioms match.

One forward sweep per region. Each equation's operands are first renamed through the
substitutions made so far, then the rule registered for its primitive (if any) may keep it,
replace it with other equations, or forward one of its operands in place of its result:

- pure `jit` equations are inlined (idioms straddle them: `jnp.var`, `log_softmax`, `silu`);
- pure equations whose operands are all scalar literals are folded by binding the primitive on
  them, so the value is XLA's own (`sqrt 8.0` becomes a literal);
- `x * 1`, `x + 0`, `x - 0`, `x / 1` and casts to the same type forward `x` (for floats only
  the zero whose sign keeps `-0.0` intact);
- cast chains that round-trip exactly (`bf16 -> f32 -> bf16`) forward the source;
- a `transpose` feeding a `dot_general` folds into its dimension numbers when that keeps the
  output layout;
- commutative operands are ordered: literals last, otherwise by definition order;
- `sum(x) * (1/n)` becomes `sum(x) / n`, the form `jnp.mean` produces.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax import lax

from passes import _compat as C
from passes.pipeline import Pass
from passes.purity import is_pure
from passes.rewrite import is_replacement

# Per primitive: rule(eqn, state) -> None (keep eqn) | list of equations (emit these instead) |
# an atom (the eqn's only output is that atom).
rules: dict[object, Callable] = {}


def register(*primitives):
    def deco(fn):
        for p in primitives:
            rules[p] = fn
        return fn
    return deco


class _State:
    """The sweep's view: substitutions so far and producers of the equations emitted so far."""

    def __init__(self, region):
        self.env = {}
        self.producer = {}
        self.rank = {v: -1 - i for i, v in enumerate(region.invars)}

    def resolve(self, a):
        return self.env.get(a, a) if isinstance(a, C.Var) else a

    def source(self, a):
        """The emitted equation defining atom `a`, if any."""
        return self.producer.get(a) if isinstance(a, C.Var) else None

    def emit(self, eqn, out):
        out.append(eqn)
        for v in eqn.outvars:
            self.producer[v] = eqn
            self.rank[v] = len(out)


def _is_literal(a, value=None):
    """`a` is a scalar literal (equal to `value`, when given; complex values compare too)."""
    if not isinstance(a, C.Literal) or np.shape(a.val) != ():
        return False
    return value is None or np.asarray(a.val).item() == value


def _same_type(a, b):
    return (tuple(a.aval.shape) == tuple(b.aval.shape) and a.aval.dtype == b.aval.dtype
            and bool(getattr(a.aval, "weak_type", False)) == bool(getattr(b.aval, "weak_type", False)))


# -- jit inlining ------------------------------------------------------------------------------

def _unspecified(s) -> bool:
    return type(s).__name__ == "UnspecifiedValue"


def _inlinable(eqn) -> bool:
    p = eqn.params
    return (not eqn.effects and not is_replacement(eqn)
            and not C.closed_consts(p["jaxpr"])
            and all(_unspecified(s) for s in p.get("in_shardings", ()))
            and all(_unspecified(s) for s in p.get("out_shardings", ()))
            and not any(p.get("donated_invars", ()))
            and not p.get("compiler_options_kvs"))


@register(C.JIT_PRIMITIVE)
def _inline_jit(eqn, state):
    if not _inlinable(eqn):
        return None
    body = C.open_jaxpr(eqn.params["jaxpr"])
    env = dict(zip(body.invars, eqn.invars))
    stack = eqn.source_info.name_stack
    new_eqns = []
    for inner in body.eqns:
        outvars = [C.new_dropvar(v.aval) if C.is_dropvar(v) else C.new_var(v.aval)
                   for v in inner.outvars]
        env.update(zip(inner.outvars, outvars))
        invars = [env.get(a, a) if isinstance(a, C.Var) else a for a in inner.invars]
        si = inner.source_info.replace(name_stack=stack + inner.source_info.name_stack)
        new_eqns.append(inner.replace(invars=invars, outvars=outvars, source_info=si))
    for outer, inner in zip(eqn.outvars, body.outvars):
        state.env[outer] = env.get(inner, inner) if isinstance(inner, C.Var) else inner
    return new_eqns


# -- constant folding and identities -----------------------------------------------------------

def _fold(eqn):
    """Scalar equations of literals become a literal, computed by the primitive itself.

    Binding the primitive on concrete values (outside any trace the caller is in) gives exactly
    what XLA computes: integer wrap-around, saturating float->int casts, unsigned and complex
    types, bitwise logic on integers. A numpy look-alike gets each of those wrong somewhere.
    """
    if (len(eqn.outvars) != 1 or not eqn.invars or eqn.outvars[0].aval.shape != ()
            or not all(_is_literal(a) for a in eqn.invars)
            or eqn.primitive in C.NESTED_PRIMITIVES or not is_pure(eqn)):
        return None
    out_aval = eqn.outvars[0].aval
    args = [np.asarray(a.val, a.aval.dtype) for a in eqn.invars]
    with jax.ensure_compile_time_eval():
        (value,) = C.eqn_bind(eqn, args)
    return C.literal(np.asarray(value, out_aval.dtype), out_aval)


@register(lax.select_n_p)
def _select_literal(eqn, state):
    pred, *cases = eqn.invars
    if not _is_literal(pred):
        return None
    chosen = cases[int(np.asarray(pred.val))]
    return chosen if isinstance(chosen, C.Var) and _same_type(chosen, eqn.outvars[0]) else None


_IDENTITY = {lax.mul_p: (1.0, (0, 1)), lax.add_p: (0.0, (0, 1)), lax.sub_p: (0.0, (1,)),
             lax.div_p: (1.0, (1,))}
# Which zero leaves a float unchanged, sign included: x + (-0.0) and x - (+0.0) are x for every
# x, while x + 0.0 turns -0.0 into +0.0 (and 1 / x then flips from -inf to +inf).
_NEUTRAL_ZERO_IS_NEGATIVE = {lax.add_p: True, lax.sub_p: False}


def _is_unit(eqn, a, unit) -> bool:
    if not _is_literal(a, unit):
        return False
    wants_negative = _NEUTRAL_ZERO_IS_NEGATIVE.get(eqn.primitive)
    if wants_negative is None or not jax.numpy.issubdtype(a.aval.dtype, jax.numpy.inexact):
        return True
    return bool(np.signbit(np.real(np.asarray(a.val)))) == wants_negative


def _identity_operand(eqn):
    unit, positions = _IDENTITY[eqn.primitive]
    out = eqn.outvars[0]
    for pos in positions:
        other = eqn.invars[1 - pos]
        if _is_unit(eqn, eqn.invars[pos], unit) and isinstance(other, C.Var) and _same_type(other, out):
            return other
    return None


_COMMUTATIVE = (lax.add_p, lax.mul_p, lax.max_p, lax.min_p, lax.and_p, lax.or_p, lax.eq_p,
                lax.ne_p)


def _ordered(eqn, state):
    a, b = eqn.invars
    a_lit, b_lit = isinstance(a, C.Literal), isinstance(b, C.Literal)
    swap = (a_lit and not b_lit) or (not a_lit and not b_lit
                                     and state.rank.get(a, 0) > state.rank.get(b, 0))
    return eqn.replace(invars=[b, a]) if swap else eqn


def _mean_form(eqn, state):
    """sum(x) * c with c == 1/n exactly -> sum(x) / n."""
    if eqn.primitive is not lax.mul_p:
        return eqn
    x, c = eqn.invars
    if not (_is_literal(c) and isinstance(x, C.Var) and c.val != 0
            and jax.numpy.issubdtype(c.aval.dtype, jax.numpy.floating)):
        return eqn
    src = state.source(x)
    if src is None or src.primitive is not lax.reduce_sum_p:
        return eqn
    n = 1.0 / float(np.asarray(c.val))
    if n != round(n) or n < 2 or float(np.asarray(c.val, c.aval.dtype) * n) != 1.0:
        return eqn
    n_lit = C.literal(np.asarray(round(n), dtype=c.aval.dtype), c.aval)
    return eqn.replace(primitive=lax.div_p, invars=[x, n_lit])


@register(*_COMMUTATIVE, lax.sub_p, lax.div_p)
def _arith(eqn, state):
    if eqn.primitive in _IDENTITY:
        fwd = _identity_operand(eqn)
        if fwd is not None:
            return fwd
    if eqn.primitive in _COMMUTATIVE:
        eqn = _ordered(eqn, state)
        eqn = _mean_form(eqn, state)
    return [eqn]


# -- casts -------------------------------------------------------------------------------------

def _exactly_holds(wide, narrow) -> bool:
    """Every value of dtype `narrow` is representable in dtype `wide`."""
    wide, narrow = np.dtype(wide), np.dtype(narrow)
    if narrow == np.bool_:
        return True
    if jax.dtypes.issubdtype(narrow, np.floating) and jax.dtypes.issubdtype(wide, np.floating):
        fw, fn = jax.numpy.finfo(wide), jax.numpy.finfo(narrow)
        return fw.nmant >= fn.nmant and fw.maxexp >= fn.maxexp and fw.minexp <= fn.minexp
    if jax.dtypes.issubdtype(narrow, np.integer) and jax.dtypes.issubdtype(wide, np.integer):
        iw, i_n = np.iinfo(wide), np.iinfo(narrow)
        return iw.min <= i_n.min and iw.max >= i_n.max
    return False


@register(lax.convert_element_type_p)
def _cast(eqn, state):
    (x,) = eqn.invars
    out = eqn.outvars[0]
    if isinstance(x, C.Var) and _same_type(x, out):
        return x
    src = state.source(x)
    if src is not None and src.primitive is lax.convert_element_type_p:
        (orig,) = src.invars
        if (isinstance(orig, C.Var) and _same_type(orig, out)
                and _exactly_holds(x.aval.dtype, orig.aval.dtype)):
            return orig
    return None


# -- transpose into dot_general ----------------------------------------------------------------

@register(lax.dot_general_p)
def _dot_transpose(eqn, state):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    invars, dims = list(eqn.invars), [[list(lc), list(lb)], [list(rc), list(rb)]]
    changed = False
    for side in (0, 1):
        src = state.source(invars[side])
        if src is None or src.primitive is not lax.transpose_p:
            continue
        perm = src.params["permutation"]
        contract, batch = dims[side]
        free = [d for d in range(len(perm)) if d not in contract and d not in batch]
        if [perm[d] for d in free] != sorted(perm[d] for d in free):
            continue
        dims[side] = [[perm[d] for d in contract], [perm[d] for d in batch]]
        invars[side] = src.invars[0]
        changed = True
    if not changed:
        return None
    dn = ((tuple(dims[0][0]), tuple(dims[1][0])), (tuple(dims[0][1]), tuple(dims[1][1])))
    return [eqn.replace(invars=invars, params={**eqn.params, "dimension_numbers": dn})]


# -- the pass ----------------------------------------------------------------------------------

class Canonicalize(Pass):
    name = "canonicalize"
    description = ("inlines pure jits, folds scalar constants with XLA's own arithmetic, drops "
                   "exact identities and cast round trips, orders commutative operands")

    def run(self, region, ctx):
        state, out, changes = _State(region), [], 0
        for eqn in region.eqns:
            if any(isinstance(a, C.Var) and a in state.env for a in eqn.invars):
                eqn = eqn.replace(invars=[state.resolve(a) for a in eqn.invars])
            result = _fold(eqn)
            if result is None:
                rule = rules.get(eqn.primitive)
                result = rule(eqn, state) if rule is not None else None
            if result is None:
                state.emit(eqn, out)
                continue
            if isinstance(result, list):
                if len(result) == 1 and result[0] is eqn:
                    state.emit(eqn, out)
                    continue
                for new in result:
                    state.emit(new, out)
            else:
                state.env[eqn.outvars[0]] = result
            changes += 1
        if changes:
            region.outvars = [state.resolve(a) for a in region.outvars]
            region.set_eqns(out)
        return changes
