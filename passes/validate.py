"""Translation validation: each rewrite is checked in isolation when it is made.

With checking on (`JAXPASSES_CHECK=1`, `Pipeline(check=True)`), the equations a rule matched and
the call that replaces them are evaluated on the same random inputs of the matched shapes and
dtypes, in several trials aimed at the contract's edges: ordinary values, masks with fully masked
rows, NaN and infinities, and large magnitudes. Each result is compared with the float64
evaluation of the matched equations under the numerics policy (`passes.testing`): at least about
as close to float64 as the original, NaN and infinities where the original has them (a finite,
more accurate value is allowed where only the original overflowed). A rewrite that fails is
declined with the evidence, so a wrong rewrite is caught by the engine before a user sees it.

Operands that are constants of the program (masks built from iotas, literals) keep their real
values, since replacements may rely on them. Matches too large to evaluate cheaply, with operand
types that have no random values (PRNG keys), or whose replacement cannot be compiled on this
host (kernels lowered for another platform, for export) are not validated.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from passes import _compat as C

MAX_ELEMENTS = 1 << 18  # larger matches are not validated: evaluating them would cost too much
_MAX_UPSTREAM = 256  # equations added to a match to recompute its operands
TRIALS = ("normal", "masked rows", "special values", "large magnitudes")

_verdicts: dict = {}


def _free_atoms(region, positions):
    defined, free = set(), []
    for p in positions:
        eqn = region.eqns[p]
        for a in eqn.invars:
            if isinstance(a, C.Var) and a not in defined and a not in free:
                free.append(a)
        defined.update(eqn.outvars)
    return free


def _with_upstream(region, match, constant_value):
    """Positions to evaluate: the match, plus the equations computing any operand of the match
    that is neither handed to the replacement nor a constant (the replacement recomputes such
    values from its inputs, so random values there would be inconsistent). None if too many.
    """
    given = {a for a in match.inputs if isinstance(a, C.Var)}
    positions = set(match.eqns)
    stack = [a for a in _free_atoms(region, sorted(positions)) if a not in given]
    while stack:
        a = stack.pop()
        if a in given or constant_value(region, a) is not None:
            continue
        p = region.producer(a)
        if p is None or p in positions:
            continue
        if len(positions) > _MAX_UPSTREAM or region.eqns[p].effects:
            return None
        positions.add(p)
        stack.extend(v for v in region.eqns[p].invars if isinstance(v, C.Var))
    return sorted(positions)


def _structure_key(region, match, positions, new_eqn):
    """A key equal for matches of the same shape and wiring (repeated layers validate once)."""
    names: dict = {}

    def ref(a):
        if isinstance(a, C.Literal):
            return ("lit", str(a.aval.dtype), repr(np.asarray(a.val).tolist()))
        return names.setdefault(a, (len(names), str(a.aval)))

    eqns = tuple((e.primitive.name, tuple(ref(a) for a in e.invars), repr(sorted(e.params.items())),
                  tuple(ref(v) for v in e.outvars)) for e in (region.eqns[p] for p in positions))
    return (eqns, tuple(ref(a) for a in match.inputs), tuple(ref(v) for v in match.outputs),
            new_eqn.params.get("name"), repr(new_eqn.params.get("jaxpr")))


def _random_value(aval, trial: str, rng):
    shape, dtype = tuple(aval.shape), np.dtype(aval.dtype)
    if dtype == np.bool_:
        value = rng.random(shape) < 0.6
        if trial == "masked rows" and value.ndim >= 1 and value.size:
            value.reshape(-1, shape[-1])[0] = False  # one row with every key masked
            if value.reshape(-1, shape[-1]).shape[0] > 1:
                value.reshape(-1, shape[-1])[-1] = True
        return value
    if jnp.issubdtype(dtype, jnp.integer):
        return rng.integers(0, 2, shape).astype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"no random values for {dtype}")
    value = rng.standard_normal(shape)
    if trial == "large magnitudes":
        value = value * (1e3 if jnp.finfo(dtype).bits > 16 else 30.0)
    elif trial == "special values" and value.size:
        flat = value.reshape(-1)
        picks = rng.choice(flat.size, size=min(3, flat.size), replace=False)
        flat[picks] = [np.inf, -np.inf, np.nan][:len(picks)]
    return value.astype(dtype)


def _compile(eqns, inputs, outputs):
    """The equations as a compiled function of `inputs` (concrete values in, numpy arrays out).

    Compiled ahead of time and called directly, so that it runs here even when the pipeline was
    started inside a caller's trace, and kernels run as they will in the program.
    """
    def fn(*args):
        env = dict(zip(inputs, args))
        for eqn in eqns:
            invals = [env[a] if isinstance(a, C.Var) else np.asarray(a.val, a.aval.dtype)
                      for a in eqn.invars]
            env.update(zip(eqn.outvars, C.eqn_bind(eqn, invals)))
        return [env[v] for v in outputs]

    structs = [jax.ShapeDtypeStruct(a.aval.shape, a.aval.dtype) for a in inputs]
    compiled = jax.jit(fn).lower(*structs).compile()
    return lambda values: [np.asarray(o) for o in compiled(*values)]


def _to_float64(value):
    return np.asarray(value, np.float64) if jnp.issubdtype(np.asarray(value).dtype,
                                                           jnp.floating) else value


def _float64_params(params):
    out = {}
    for k, v in params.items():
        if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
            v = np.dtype(np.float64) if jnp.issubdtype(v, jnp.floating) else v
        out[k] = v
    return out


def _float64_program(eqns, inputs, outputs):
    """The matched equations compiled in float64, or None if they cannot be (nested bodies)."""
    if any(C.is_jaxpr(v) or (isinstance(v, (tuple, list)) and any(C.is_jaxpr(x) for x in v))
           for e in eqns for v in e.params.values()):
        return None
    promote = {a: C.new_var(_float64_aval(a.aval)) for a in inputs}
    promoted = []
    for e in eqns:
        invars = [promote.get(a, a) if isinstance(a, C.Var) else
                  C.literal(_to_float64(np.asarray(a.val, a.aval.dtype)), _float64_aval(a.aval))
                  for a in e.invars]
        promoted.append(e.replace(invars=invars, params=_float64_params(e.params)))
    try:
        with jax.enable_x64(True):
            run = _compile(promoted, [promote[a] for a in inputs], outputs)
    except Exception:  # a primitive with dtype rules float64 cannot satisfy: compare directly
        return None

    def run64(values):
        with jax.enable_x64(True):
            return run([_to_float64(v) for v in values])
    return run64


def _float64_aval(aval):
    return aval.update(dtype=np.float64) if jnp.issubdtype(aval.dtype, jnp.floating) else aval


def _disagreement(got, want, ref, dtype, finite_inputs=True) -> str | None:
    """Why `got` is not acceptable next to the original `want` and the float64 `ref`.

    Complex results are compared as (real, imaginary) pairs.
    """
    from passes.testing import default_tolerance

    if got.shape != want.shape:
        return f"shape {got.shape} vs {want.shape}"
    if not jnp.issubdtype(want.dtype, jnp.inexact):
        return None if np.array_equal(got, want) else "integer results differ"
    rtol, atol = default_tolerance(dtype)
    g, w, r = (None if a is None else _as_real(a) for a in (got, want, ref))
    with np.errstate(all="ignore"):
        return _float_disagreement(g, w, r, rtol, atol, finite_inputs)


def _as_real(a):
    a = np.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
        return np.stack([a.real, a.imag], axis=-1).astype(np.float64)
    return a.astype(np.float64)


def _float_disagreement(g, w, r, rtol, atol, finite_inputs) -> str | None:
    r = w if r is None else r
    special_w = ~np.isfinite(w)
    # Where the original is NaN/inf, the rewrite must be too, unless the original merely
    # overflowed: float64 agrees with the rewrite, or (finite inputs) the original is infinite
    # where the rewrite is finite, the more accurate answer the numerics policy allows.
    same_special = (np.isnan(g) & np.isnan(w)) | (g == w)
    accurate = np.isfinite(g) & np.isfinite(r) & (np.abs(g - r) <= atol + rtol * np.abs(r))
    overflowed = np.isinf(w) & np.isfinite(g) & finite_inputs
    bad_special = special_w & ~same_special & ~accurate & ~overflowed
    if np.any(bad_special):
        k = np.argwhere(bad_special)[0]
        return f"at {tuple(int(i) for i in k)} the original gives {w[tuple(k)]}, the rewrite {g[tuple(k)]}"
    fin = ~special_w
    # Normwise: a result that cancels large terms carries their rounding, whoever computes it.
    scale = np.max(np.abs(r[np.isfinite(r)]), initial=0.0)
    bound = 2 * np.abs(w - r) + atol + rtol * np.maximum(np.abs(r), scale)
    err = np.where(fin, np.abs(g - r), 0.0)
    bad = fin & ~(err <= bound)  # NaN in the rewrite where the original is finite counts
    if np.any(bad):
        k = tuple(int(i) for i in np.argwhere(bad)[0])
        return (f"{int(bad.sum())} elements too far from float64; at {k}: rewrite {g[k]:.6g}, "
                f"original {w[k]:.6g}, float64 {r[k]:.6g} (rtol {rtol}, atol {atol})")
    return None


def _compute_dtype(region, positions, outputs):
    floats = [np.dtype(v.aval.dtype) for p in positions for v in region.eqns[p].outvars
              if jnp.issubdtype(v.aval.dtype, jnp.floating)]
    floats += [np.dtype(v.aval.dtype) for v in outputs if jnp.issubdtype(v.aval.dtype, jnp.floating)]
    return min(floats, key=lambda d: jnp.finfo(d).bits) if floats else np.dtype(np.float32)


def validate(region, match, new_eqn) -> str | None:
    """None if the rewrite agrees with the matched equations on every trial, else the evidence."""
    from passes.fusion._shared import constant_value

    positions = _with_upstream(region, match, constant_value)
    if positions is None:
        return None
    free = _free_atoms(region, positions)
    produced = {v for p in positions for v in region.eqns[p].outvars}
    free += [a for a in match.inputs
             if isinstance(a, C.Var) and a not in free and a not in produced]
    # The replacement runs after the same upstream equations, on the operands they compute.
    upstream = [region.eqns[p] for p in positions if p not in match.eqns]
    if sum(math.prod(a.aval.shape) for a in free) > MAX_ELEMENTS:
        return None
    key = _structure_key(region, match, positions, new_eqn)
    if key in _verdicts:
        return _verdicts[key]
    constants = {a: constant_value(region, a) for a in free}
    eqns = [region.eqns[p] for p in positions]
    dtype = _compute_dtype(region, positions, match.outputs)
    try:
        original = _compile(eqns, free, match.outputs)
    except Exception:  # the matched equations cannot be compiled on their own: no verdict
        return None
    try:
        replacement = _compile(upstream + [new_eqn], free, new_eqn.outvars)
    except Exception:  # e.g. kernels lowered for a platform this host lacks (export): no verdict
        return None
    verdict = None
    reference = _float64_program(eqns, free, match.outputs)
    rng = np.random.default_rng(0)
    for trial in TRIALS:
        try:
            values = [constants[a] if constants[a] is not None
                      else _random_value(a.aval, trial, rng) for a in free]
        except TypeError:
            break
        want = original(values)
        try:
            got = replacement(values)
        except Exception as e:
            verdict = f"the replacement failed on concrete {trial}: {type(e).__name__}: {e}"
            break
        ref = reference(values) if reference is not None else None
        for i, (g, w) in enumerate(zip(got, want)):
            problem = _disagreement(g, w, None if ref is None else ref[i], dtype,
                                    finite_inputs=trial != "special values")
            if problem:
                verdict = f"translation validation failed ({trial} inputs, output {i}): {problem}"
                break
        if verdict:
            break
    _verdicts[key] = verdict
    return verdict
