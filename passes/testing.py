"""Helpers for tests and users: compare two functions under the project's numerics policy.

The policy: a rewrite is correct when its result is at least about as close to the float64
evaluation of the original as the original itself is. `assert_equivalent(f, g, *args)` computes
the float64 reference from `f`, and checks, element by element, that
    |g - ref| <= 2 |f - ref| + atol + rtol |ref|
with NaN and infinities in the same places, for values and (optionally) gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_TOLERANCES = {  # dtype name -> (rtol, atol)
    "float64": (1e-10, 1e-12),
    "float32": (1e-5, 1e-6),
    "float16": (1e-2, 1e-3),
    "bfloat16": (2e-2, 1e-2),
}


def default_tolerance(dtype) -> tuple[float, float]:
    """(rtol, atol) for results of this dtype."""
    return _TOLERANCES.get(np.dtype(dtype).name, (1e-5, 1e-6))


def _inexact(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def _to64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64) if _inexact(x) else x, tree)


def _grads(fn, args):
    """Gradients of fn w.r.t. every inexact array leaf of args (vjp with a fixed cotangent)."""
    mask = jax.tree.map(_inexact, args)

    def wrt(*diff):
        it = iter(diff)
        full = jax.tree.map(lambda x, m: next(it) if m else x, args, mask)
        return fn(*full)

    diff = [x for x, m in zip(jax.tree.leaves(args), jax.tree.leaves(mask)) if m]
    if not diff:
        return []
    out, vjp = jax.vjp(wrt, *diff)
    rng = np.random.default_rng(0)
    cot = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(np.shape(o)), o.dtype)
                       if _inexact(o) else np.zeros(np.shape(o), jax.dtypes.float0), out)
    return list(vjp(cot))


def _loosest(dtypes) -> tuple[float, float]:
    tols = [default_tolerance(d) for d in dtypes]
    return max(t[0] for t in tols), max(t[1] for t in tols)


def _float_dtypes(fn, args) -> set:
    """Floating dtypes of every intermediate value of fn's program (nested bodies included)."""
    from passes import _compat as C

    found = set()

    def walk(j):
        for eqn in C.open_jaxpr(j).eqns:
            for v in eqn.outvars:
                dt = getattr(v.aval, "dtype", None)
                if dt is not None and jnp.issubdtype(dt, jnp.floating):
                    found.add(np.dtype(dt))
            for value in eqn.params.values():
                for sub in (value if isinstance(value, (tuple, list)) else [value]):
                    if C.is_jaxpr(sub):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args))
    return found


def _compare(name, got, want, ref, rtol, atol, compute_dtypes=()):
    got_l, want_l, ref_l = jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(ref)
    if len(got_l) != len(want_l):
        raise AssertionError(f"{name}: {len(got_l)} leaves vs {len(want_l)}")
    for i, (g, w, r) in enumerate(zip(got_l, want_l, ref_l)):
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape or g.dtype != w.dtype:
            raise AssertionError(f"{name}[{i}]: {g.dtype}{list(g.shape)} vs {w.dtype}{list(w.shape)}")
        if not jnp.issubdtype(w.dtype, jnp.inexact):
            np.testing.assert_array_equal(g, w, err_msg=f"{name}[{i}]")
            continue
        rt, at = _loosest({np.dtype(w.dtype), *compute_dtypes})
        rt, at = rtol if rtol is not None else rt, atol if atol is not None else at
        g64, w64, r64 = (np.asarray(a, np.float64) for a in (g, w, r))
        special = ~np.isfinite(w64)
        if not np.array_equal(np.isnan(g64), np.isnan(w64)) or not np.array_equal(
                g64[special & ~np.isnan(w64)], w64[special & ~np.isnan(w64)]):
            raise AssertionError(f"{name}[{i}]: NaN/inf positions differ")
        fin = ~special
        err_g = np.abs(g64 - r64)[fin]
        bound = (2 * np.abs(w64 - r64) + at + rt * np.abs(r64))[fin]
        if np.any(err_g > bound):
            k = int(np.argmax(err_g - bound))
            raise AssertionError(
                f"{name}[{i}] ({w.dtype}{list(w.shape)}): {int(np.sum(err_g > bound))} elements "
                f"too far from the float64 reference; worst: got {g64[fin][k]:.8g}, original "
                f"{w64[fin][k]:.8g}, float64 {r64[fin][k]:.8g} (rtol {rt}, atol {at})")


def assert_equivalent(f, g, *args, grads: bool = True, rtol=None, atol=None):
    """Assert that `g` computes what `f` computes, under the numerics policy.

    Args:
      f: the original function (also evaluated in float64 as the reference).
      g: the candidate (e.g. `passes.optimize(f)`).
      args: arguments for both.
      grads: also compare gradients w.r.t. every floating-point array argument (a vjp with a
        fixed random cotangent when the output is not a scalar).
      rtol, atol: override the defaults: those of the least precise floating dtype among the
        results and f's intermediate values (see `default_tolerance`), since a result computed
        through bf16 carries bf16 rounding whatever its own dtype.
    """
    compute = _float_dtypes(f, args)
    want, got = f(*args), g(*args)
    with jax.enable_x64(True):
        ref = f(*_to64(args))
        ref_grads = _grads(f, _to64(args)) if grads else None
    _compare("value", got, want, ref, rtol, atol, compute)
    if grads:
        _compare("grad", _grads(g, args), _grads(f, args), ref_grads, rtol, atol, compute)


def count_primitive(jaxpr, name: str) -> int:
    """Equations whose primitive is called `name` in a (closed) jaxpr, nested jaxprs included
    (every parameter holding a jaxpr is searched, kernel bodies and replacements too)."""
    from passes import _compat as C

    def subjaxprs(value):
        if C.is_jaxpr(value):
            yield value
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from subjaxprs(v)

    total = 0
    for eqn in C.open_jaxpr(jaxpr).eqns:
        total += eqn.primitive.name == name
        for value in eqn.params.values():
            for sub in subjaxprs(value):
                total += count_primitive(sub, name)
    return total
