"""Softmax, log-softmax and log-sum-exp recognisers, shared by the `attention` and
`softmax_cross_entropy` passes.

Both reach a per-row value (a max or a sum along one axis) through the re-shapes that keep the
reduced axis (`keepdims=True`, broadcasts back to the full shape, stop_gradient, and for the
attention's softmax transposes and casts). One walker follows such a chain back to the value it
starts from (`_walk_back`), and one check (`_carries_rows`) labels the axes forward through it and
says whether the value is the root laid out against the full array, constant along the reduced
axis. On top of it:

- `match_softmax`: exp(x - max) / sum(exp(x - max)) as primitives or a `custom_jvp_call`
  (`jax.nn.softmax`), for attention;
- `logsumexp`, `log_softmax` and `shift_kind` (which row value the log-sum-exp subtracts), for
  cross-entropy.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from jax import lax

from passes import _compat as C
from passes.fusion._shared import constant_value
from passes.pattern import literal_value
from passes.rewrite import NoMatch

# Re-shapes that keep a per-row value what it is: the keep-dims steps.
_ROW_STEPS = (lax.broadcast_in_dim_p, lax.reshape_p, lax.squeeze_p, lax.stop_gradient_p)
# ... and, where the axes are followed by label, transposes and casts too (JAX moves reductions
# before transposes; bf16 sums accumulate in float32 and are cast back).
_LAYOUT_STEPS = _ROW_STEPS + (lax.transpose_p, lax.convert_element_type_p)


# ---------------------------------------------------------------------------------------------
# The keep-dims walker


def _walk_back(region, var, through, *, is_floor=None, stop=None):
    """From `var` back through equations of `through` (and `max(., floor)` where `is_floor` says
    the other operand is -inf) to the value the chain starts from.

    Stops before an equation for which `stop(eqn)` holds. Returns (root, chain, positions):
    `chain` holds the re-shaping equations from `var` backwards, `positions` those and the maxes.
    """
    chain, positions = [], set()
    while isinstance(var, C.Var):
        pos = region.producer(var)
        if pos is None:
            break
        eqn = region.eqns[pos]
        if is_floor is not None and eqn.primitive is lax.max_p:
            a, b = eqn.invars
            if is_floor(a):
                a, b = b, a
            elif not is_floor(b):
                break
            positions.add(pos)
            var = a
            continue
        if eqn.primitive not in through or (stop is not None and stop(eqn)):
            break
        chain.append(eqn)
        positions.add(pos)
        var = eqn.invars[0]
    return var, chain, positions


def _carries_rows(chain, root_labels, target, full, shape) -> bool:
    """Whether the chain (as `_walk_back` gives it) lays its root out as `target`.

    `root_labels` names each root axis by an axis of the full array (None: the reduced axis, kept
    as a unit); `target` names each axis of the chain's result (of `shape`) the same way, for the
    full array's shape `full`. Axes are labelled forward through the chain; a new or broadcast
    axis is constant (None). Unit axes of the full array may carry anything.
    """
    labels = list(root_labels)
    for eqn in reversed(chain):
        src, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        if eqn.primitive is lax.transpose_p:
            labels = [labels[int(p)] for p in eqn.params["permutation"]]
        elif eqn.primitive is lax.broadcast_in_dim_p:
            new = [None] * len(out)
            for i, d in enumerate(eqn.params["broadcast_dimensions"]):
                new[int(d)] = labels[i] if src[i] == out[int(d)] else None
            labels = new
        elif eqn.primitive is lax.reshape_p:  # only unit axes inserted or removed
            if eqn.params.get("dimensions") or [n for n in src if n != 1] != [
                    n for n in out if n != 1]:
                return False
            data = iter([lab for lab, n in zip(labels, src) if n != 1])
            labels = [next(data) if n != 1 else None for n in out]
        elif eqn.primitive is lax.squeeze_p:
            gone = {int(d) for d in eqn.params["dimensions"]}
            labels = [lab for i, lab in enumerate(labels) if i not in gone]
    if len(labels) != len(target) or len(shape) != len(target):
        return False
    return all(n in (1, f) and (lab == want or f == 1)
               for lab, want, n, f in zip(labels, target, shape, full))


def keep_root(region, var, full, axis, *, is_floor=None):
    """Follow keep-dims re-shapes (and stop_gradient) of a per-row value of `full`-shaped arrays
    back to its root, a value of the reduced or kept shape; the chain must keep the value constant
    along `axis`. Returns the root atom or None."""
    reduced = full[:axis] + full[axis + 1:]
    kept = full[:axis] + (1,) + full[axis + 1:]
    shapes = (reduced, kept, full)
    if tuple(var.aval.shape) not in shapes:
        return None
    root, chain, _ = _walk_back(region, var, _ROW_STEPS, is_floor=is_floor,
                                stop=lambda e: tuple(e.invars[0].aval.shape) not in shapes)
    rshape = tuple(root.aval.shape)
    if rshape == full or rshape not in shapes:
        return None
    others = [a for a in range(len(full)) if a != axis]
    labels = others if rshape == reduced else [None if a == axis else a for a in range(len(full))]
    shape = tuple(var.aval.shape)
    target = others if len(shape) == len(reduced) else [None if a == axis else a
                                                        for a in range(len(full))]
    along = reduced if len(shape) == len(reduced) else full
    return root if _carries_rows(chain, labels, target, along, shape) else None


def keepdims_reduction(region, var, reduce_prim, operand, literal, axis=None):
    """`var` = reduce(operand, axes=(axis,)) with the axis kept (unit or broadcast), maybe
    through stop_gradient, transposes, casts and (for max) `max(., -inf)`. The reduction may also
    run over the array that `operand` transposes (JAX moves reductions before transposes).

    Returns (axis of `operand`, positions) or NoMatch.
    """
    is_floor = (lambda a: literal(a) == -math.inf) if reduce_prim is lax.reduce_max_p else None
    root, chain, positions = _walk_back(region, var, _LAYOUT_STEPS, is_floor=is_floor)
    pos = region.producer(root) if isinstance(root, C.Var) else None
    if pos is None:
        return NoMatch("reaches an input")
    eqn = region.eqns[pos]
    if eqn.primitive is not reduce_prim:
        return NoMatch("`{}` where a reduction should be", eqn.primitive)
    positions.add(pos)
    reduced = eqn.invars[0]
    widened = region.producer(reduced)
    if (widened is not None and region.eqns[widened].primitive is lax.convert_element_type_p
            and reduced is not operand):  # bf16 sums accumulate in float32
        positions.add(widened)
        reduced = region.eqns[widened].invars[0]
    axes = tuple(int(d) for d in eqn.params["axes"])
    if len(axes) != 1:
        return NoMatch("reduces axes {}, not one", axes)
    (r_axis,) = axes
    # `operand` axis i is axis source[i] of the reduced array.
    if reduced is operand:
        source = list(range(len(operand.aval.shape)))
    else:
        t = region.producer_eqn(operand)
        if t is None or t.primitive is not lax.transpose_p or t.invars[0] is not reduced:
            return NoMatch("reduces another array")
        source = [int(p) for p in t.params["permutation"]]
    labels = [a for a in range(len(reduced.aval.shape)) if a != r_axis]
    target = [None if s == r_axis else s for s in source]
    if not _carries_rows(chain, labels, target, tuple(operand.aval.shape),
                         tuple(var.aval.shape)):
        return NoMatch("the reduction is not laid out against the input {}", operand.aval.shape)
    k_axis = source.index(r_axis)
    if axis is not None and k_axis != axis:
        return NoMatch("reduces axis {}, not {}", k_axis, axis)
    return k_axis, positions


# ---------------------------------------------------------------------------------------------
# softmax (attention)


@dataclasses.dataclass
class Softmax:
    out: object  # the probabilities
    x: object  # the softmax input
    axis: int
    positions: frozenset


def match_softmax(region, var):
    """`var` = softmax(x, axis) as primitives or a custom_jvp_call: `Softmax` or NoMatch."""
    pos = region.producer(var)
    if pos is None:
        return NoMatch("no producer")
    eqn = region.eqns[pos]
    if eqn.primitive is C.NESTED["custom_jvp_call"]:
        return _custom_jvp_softmax(region, pos, eqn)
    found = _softmax_body(region, var, lambda a: literal_value(region, a))
    if not found:
        return found
    x, axis, positions = found
    return Softmax(var, x, axis, frozenset(positions))


def _custom_jvp_softmax(region, pos, eqn):
    from passes.ir import Region

    if len(eqn.outvars) != 1 or not eqn.invars:
        return NoMatch("custom_jvp_call with {} outputs", len(eqn.outvars))
    body = Region(eqn.params["call_jaxpr"])
    outer = dict(zip(body.invars, eqn.invars))

    def literal(a):
        if a in outer:
            return literal_value(region, outer[a])
        inner = body.producer_eqn(a)
        if inner is not None and inner.primitive is lax.convert_element_type_p and \
                inner.invars[0] in outer:
            return literal_value(region, outer[inner.invars[0]])
        return literal_value(body, a)

    found = _softmax_body(body, body.outvars[0], literal)
    if not found:
        return NoMatch("custom_jvp_call is not a softmax: {}", found.reason)
    x, axis, _ = found
    if x not in outer or outer[x] is not eqn.invars[0]:
        return NoMatch("custom_jvp_call's softmax is not over its first operand")
    return Softmax(eqn.outvars[0], eqn.invars[0], axis, frozenset({pos}))


def _softmax_body(region, var, literal):
    """exp(x - max) / sum(exp(x - max)) along one axis: (x, axis, positions) or NoMatch."""
    pos = region.producer(var)
    if pos is None:
        return NoMatch("no producer")
    div = region.eqns[pos]
    if div.primitive is not lax.div_p:
        return NoMatch("`{}` is not the softmax's division", div.primitive)
    e, den = div.invars
    e_pos = region.producer(e)
    if e_pos is None or region.eqns[e_pos].primitive is not lax.exp_p:
        return NoMatch("the numerator is not an exp")
    sub_pos = region.producer(region.eqns[e_pos].invars[0])
    if sub_pos is None or region.eqns[sub_pos].primitive is not lax.sub_p:
        return NoMatch("the exp's operand is not x - max")
    x, mx = region.eqns[sub_pos].invars
    if not isinstance(x, C.Var):
        return NoMatch("softmax of a literal")
    positions = {pos, e_pos, sub_pos}
    red = keepdims_reduction(region, den, lax.reduce_sum_p, e, literal)
    if not red:
        return NoMatch("the denominator is not the sum of the numerator: {}", red.reason)
    axis, ps = red
    positions |= ps
    red = keepdims_reduction(region, mx, lax.reduce_max_p, x, literal, axis)
    if not red:
        return NoMatch("the subtracted value is not the max of the input: {}", red.reason)
    positions |= red[1]
    return x, axis, positions


# ---------------------------------------------------------------------------------------------
# logsumexp and log_softmax (cross-entropy)


def logsumexp(region, var):
    """`var` = m + log(sum(exp(x - m), axis)) with the same row value m (reduced or kept axis):
    (x, axis, m's root) or NoMatch."""
    eqn = region.producer_eqn(var)
    if eqn is None or eqn.primitive is not lax.add_p:
        return NoMatch("not m + log(sum(exp(x - m)))")
    for m, lg in (eqn.invars, eqn.invars[::-1]):
        found = _log_sum_exp_of(region, lg)
        if not found:
            continue
        d, axis = found
        shifted = _shifted(region, d, axis)
        if not shifted:
            continue
        x, root = shifted
        full = tuple(x.aval.shape)
        if tuple(var.aval.shape) not in (full[:axis] + full[axis + 1:],
                                         full[:axis] + (1,) + full[axis + 1:]):
            continue
        if keep_root(region, m, full, axis) is root:
            return x, axis, root
    return NoMatch("not m + log(sum(exp(x - m)))")


def log_softmax(region, var):
    """`var` = log_softmax(x, axis): (x, axis, the shift's root) or NoMatch.

    Spellings: (x - m) - log(sum(exp(x - m))) with the log before or after the keepdims
    broadcast (JAX's), and x - logsumexp(x, keepdims=True).
    """
    eqn = region.producer_eqn(var)
    if eqn is None or eqn.primitive is not lax.sub_p:
        return NoMatch("not a subtraction")
    a, b = eqn.invars
    if not isinstance(a, C.Var):
        return NoMatch("log_softmax of a literal")
    full = tuple(a.aval.shape)
    # (x - m) - log(sum(exp(x - m)))
    found = _log_sum_exp_of(region, b)
    if found and found[0] is a:
        shifted = _shifted(region, a, found[1])
        if shifted:
            return shifted[0], found[1], shifted[1]
    # x - logsumexp(x, keepdims=True)
    for axis in range(len(full)):
        root = keep_root(region, b, full, axis)
        lse = logsumexp(region, root) if root is not None else None
        if lse and lse[:2] == (a, axis):
            return lse
    return NoMatch("not a log_softmax")


def shift_kind(region, m, x, axis):
    """What the log-sum-exp subtracts: "guarded_max" (jax.nn.logsumexp: the row max of `x`, 0
    where it is not finite), "row_max" (the plain row max, maybe floored at -inf: JAX's
    log_softmax, `x.max(-1)`), or None (another row value)."""
    eqn = region.producer_eqn(m)
    if eqn is not None and eqn.primitive is lax.select_n_p and len(eqn.invars) == 3:
        pred, when_false, when_true = eqn.invars
        test = region.producer_eqn(pred)
        zero = constant_value(region, when_false)
        if (test is not None and test.primitive is lax.is_finite_p
                and test.invars[0] is when_true and zero is not None and not np.any(zero)
                and _is_row_max(region, when_true, x, axis)):
            return "guarded_max"
        return None
    return "row_max" if _is_row_max(region, m, x, axis) else None


def _is_row_max(region, v, x, axis) -> bool:
    """`v` = max(x, axis), maybe as max(-inf, max(x, axis)) (jnp.max's initial value), either
    possibly re-shaped to keep the axis."""
    def is_floor(a):
        value = constant_value(region, a)
        return value is not None and bool(np.all(value == -np.inf))

    v = keep_root(region, v, tuple(x.aval.shape), axis, is_floor=is_floor)
    eqn = region.producer_eqn(v) if v is not None else None
    return (eqn is not None and eqn.primitive is lax.reduce_max_p and eqn.invars[0] is x
            and tuple(int(d) for d in eqn.params["axes"]) == (axis,))


def _shifted(region, d, axis):
    """`d` = x - m with m constant along `axis`: (x, root of m) or NoMatch."""
    eqn = region.producer_eqn(d)
    if eqn is None or eqn.primitive is not lax.sub_p:
        return NoMatch("not x - m")
    x, m = eqn.invars
    if not isinstance(x, C.Var) or tuple(x.aval.shape) != tuple(d.aval.shape):
        return NoMatch("not x - m")
    root = keep_root(region, m, tuple(x.aval.shape), axis)
    if root is None:
        return NoMatch("the subtracted value varies along the class axis")
    return x, root


def _log_sum_exp_of(region, r):
    """`r` = log(sum(exp(d), axis)), possibly kept along the axis (the log before or after the
    keepdims re-shape): (d, axis) or None."""
    # the reduction's axis first
    var, _, _ = _walk_back(region, r, _ROW_STEPS + (lax.log_p, lax.abs_p,
                                                    lax.convert_element_type_p))
    eqn = region.producer_eqn(var) if isinstance(var, C.Var) else None
    if eqn is None or eqn.primitive is not lax.reduce_sum_p or len(eqn.params["axes"]) != 1:
        return None
    axis = int(eqn.params["axes"][0])
    full = tuple(eqn.invars[0].aval.shape)
    outer = keep_root(region, r, full, axis)
    log = region.producer_eqn(outer) if outer is not None else None
    if log is None or log.primitive is not lax.log_p:
        return None
    inner = log.invars[0]
    for _ in range(2):  # |sum| (JAX's logsumexp) and casts before or after the keepdims
        e = region.producer_eqn(inner)
        while e is not None and e.primitive in (lax.abs_p, lax.convert_element_type_p):
            inner = e.invars[0]
            e = region.producer_eqn(inner)
        inner = keep_root(region, inner, full, axis)
        if inner is None:
            return None
    return _sum_exp(region, inner, axis) or None


def _sum_exp(region, var, axis=None):
    """`var` = sum(exp(d), axis), maybe through abs and float casts (bf16 sums accumulate in
    float32): (d, axis) or NoMatch."""
    eqn = region.producer_eqn(var)
    while eqn is not None and eqn.primitive in (lax.abs_p, lax.convert_element_type_p):
        eqn = region.producer_eqn(eqn.invars[0])
    if eqn is None or eqn.primitive is not lax.reduce_sum_p:
        return NoMatch("not a sum")
    axes = tuple(int(d) for d in eqn.params["axes"])
    if len(axes) != 1 or (axis is not None and axes[0] != axis):
        return NoMatch("sums axes {}", axes)
    e = region.producer_eqn(eqn.invars[0])
    if e is not None and e.primitive is lax.convert_element_type_p:
        e = region.producer_eqn(e.invars[0])
    if e is None or e.primitive is not lax.exp_p:
        return NoMatch("not a sum of exp")
    return e.invars[0], axes[0]
