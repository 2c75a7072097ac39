"""The layout of a kernel's VJP residuals, so that a sharded backward runs on them (see
pallas_kernels/_sharding.py).

The layout is inferred once per call signature from the kernel's VJP: residuals that are
operands, results or reshaped operands are not saved again; each other residual axis is named
after the factor (or flattened factors) its size follows when the operands' factors are doubled
and halved, and the per-shard forward returns them as extra results.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Residuals:
    """Where the backward finds each residual of the kernel's VJP: ("operand", j), ("result",
    j) or ("saved", i); the saved ones are extra results of the forward call, with factor
    names inferred from how their shapes follow the operands'."""
    kinds: tuple
    dims: tuple[str, ...]  # per saved residual
    shapes: tuple  # global ShapeDtypeStructs of the saved residuals


layouts: dict = {}  # (op, implementation, signature, kernel choice, opaque) -> layout


def vjp(bound, fn, diff, arrays):
    """The call's results, its VJP's residuals and the VJP's tree structure, traced."""
    def of_floats(*floats):
        full = list(arrays)
        for j, x in zip(diff, floats):
            full[j] = x
        return jax.tree_util.tree_leaves(bound.call(fn, full))

    outs, vjp_fn = jax.vjp(of_floats, *[arrays[j] for j in diff])
    leaves, treedef = jax.tree_util.tree_flatten(vjp_fn)
    return outs, leaves, treedef


def classify(bound, fn, diff, shapes):
    """(kind of each residual, saved residuals' shapes) of the VJP at operands of these shapes.

    A residual is ("operand", j), ("result", r), ("view", j, dtype): operand j reshaped and at
    most once converted (remade in the backward), or ("saved", i): saved by the forward.
    """
    closed, (outs, leaves) = jax.make_jaxpr(
        lambda *a: vjp(bound, fn, diff, a)[:2], return_shape=True)(*shapes)
    jaxpr = closed.jaxpr
    is_var = lambda v: isinstance(v, jax.extend.core.Var)  # noqa: E731
    inputs = {v: j for j, v in enumerate(jaxpr.invars)}
    results = {v: r for r, v in enumerate(jaxpr.outvars[:len(outs)]) if is_var(v)}
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    kinds, saved = [], []
    for v, shape in zip(jaxpr.outvars[len(outs):], leaves):
        kind, source, converts = None, v, 0
        while is_var(source) and kind is None:
            if source in inputs:
                kind = (("operand", inputs[v]) if source is v else
                        ("view", inputs[source], jnp.dtype(shape.dtype).name))
            elif source is v and source in results:
                kind = ("result", results[v])
            else:
                eqn = producer.get(source)
                name = eqn.primitive.name if eqn is not None else None
                converts += name == "convert_element_type"
                if name not in ("reshape", "convert_element_type") or converts > 1:
                    break
                source = eqn.invars[0]
        if kind is None:
            kind = ("saved", len(saved))
            saved.append(shape)
        kinds.append(kind)
    return tuple(kinds), tuple(saved)


def infer(bound, fn, diff, operands, rule) -> Residuals | None:
    """The residuals' layout, or None (the backward then recomputes the forward).

    Each operand factor's size is doubled and halved in turn; a residual axis that follows
    one factor exactly is named after it, one that is the product of several (rows flattened)
    after them, the first major ("a0*a1": only a0 splits), one that follows none is never split
    ("1"); anything else (padding) gives None. A layout that does not fit the blocks a plan
    makes is caught again where the blocks are known (see `per_shard`).
    """
    base = bound.abstract()
    if any(a.size == 0 for a in base) or not diff:
        return None
    try:
        kinds, saved = classify(bound, fn, diff, base)
    except Exception:  # noqa: BLE001 - any failure only means: recompute
        return None
    if not saved:
        return Residuals(kinds, (), ())
    # the size of each factor (an axis "g*r" holds g's size times the minor factors' sizes)
    factor_size, axis_of = {}, {}
    for axes, a in zip(operands, base):
        for ax, n in zip(axes, a.shape):
            if ax:
                minor = 1
                for m in ax[1:]:
                    minor *= rule.sizes.get(m, 1)
                factor_size.setdefault(ax[0], n // minor)
                axis_of.setdefault((ax[0], n), "*".join(ax))
    follows = [[[] for _ in r.shape] for r in saved]
    for f, size in factor_size.items():
        for new in {2 * size, size // 2 if size % 2 == 0 else 0} - {0}:
            shapes = [jax.ShapeDtypeStruct(
                tuple(n * new // size if ax and ax[0] == f else n for ax, n in zip(axes, a.shape)),
                a.dtype) for axes, a in zip(operands, base)]
            try:
                kinds2, saved2 = classify(bound, fn, diff, shapes)
            except Exception:  # noqa: BLE001
                return None
            if kinds2 != kinds or [r.ndim for r in saved2] != [r.ndim for r in saved]:
                return None
            for i, (r, r2) in enumerate(zip(saved, saved2)):
                for k, (n, n2) in enumerate(zip(r.shape, r2.shape)):
                    if n == n2:
                        continue
                    if n2 * size != n * new:
                        return None
                    if f not in follows[i][k]:
                        follows[i][k].append(f)
    dims = []
    for r, fs in zip(saved, follows):
        parts = []
        for n, fs_ in zip(r.shape, fs):
            if not fs_:
                parts.append("1")
            elif len(fs_) == 1 and (fs_[0], n) in axis_of:  # like an operand's axis
                parts.append(axis_of[(fs_[0], n)])
            elif n == math.prod(factor_size[f] for f in fs_):
                parts.append("*".join(fs_))
            else:
                return None
        dims.append(" ".join(parts))
    return Residuals(kinds, tuple(dims), saved)
