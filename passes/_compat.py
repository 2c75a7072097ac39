"""Every difference between the supported jax versions (0.10.2 through 0.12.x) lives here."""
from __future__ import annotations

import inspect
import itertools
import os
import sys

import jax
from jax._src import core as _core
from jax._src.interpreters import ad as _ad
from jax._src.interpreters import batching as _batching
from jax.extend import core as xc

Jaxpr = xc.Jaxpr
ClosedJaxpr = xc.ClosedJaxpr
JaxprEqn = xc.JaxprEqn
Literal = xc.Literal
Var = xc.Var
DropVar = _core.DropVar
new_jaxpr_eqn = xc.new_jaxpr_eqn
check_jaxpr = xc.check_jaxpr
jaxpr_as_fun = xc.jaxpr_as_fun

# From 0.11 on, a closed jaxpr is a `Jaxpr` that carries its own `.consts`.
CLOSED_IS_JAXPR = ClosedJaxpr is Jaxpr


def is_jaxpr(value) -> bool:
    return isinstance(value, (Jaxpr, ClosedJaxpr))


def open_jaxpr(j) -> Jaxpr:
    """The equations-and-variables part of a (closed or open) jaxpr."""
    if not CLOSED_IS_JAXPR and isinstance(j, ClosedJaxpr):
        return j.jaxpr
    return j


def closed_consts(j) -> list:
    if CLOSED_IS_JAXPR:
        return list(getattr(j, "consts", None) or [])
    return list(j.consts) if isinstance(j, ClosedJaxpr) else []


def with_eqns(j, eqns, outvars=None):
    """`j` (closed or open) with new equations (and outputs); inputs, consts and effects kept."""
    kw = {"eqns": list(eqns)}
    if outvars is not None:
        kw["outvars"] = list(outvars)
    if not CLOSED_IS_JAXPR and isinstance(j, ClosedJaxpr):
        return ClosedJaxpr(j.jaxpr.replace(**kw), j.consts)
    return j.replace(**kw)


def literal(value, aval):
    return Literal(value, aval)


def shaped_abstractify(value):
    """The abstract value (shape, dtype, weak type) JAX would trace `value` as."""
    return _core.shaped_abstractify(value)


def new_var(aval) -> Var:
    return Var(aval)


def new_dropvar(aval):
    return DropVar(aval)


def is_dropvar(v) -> bool:
    return isinstance(v, DropVar)


def eqn_bind(eqn, invals):
    """Evaluate one equation on values (arrays or tracers)."""
    out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return out if eqn.primitive.multiple_results else [out]


JIT_PRIMITIVE = jax.make_jaxpr(jax.jit(lambda x: x, inline=False))(0.0).jaxpr.eqns[0].primitive


def _tracer_children(t):
    if isinstance(t, (_ad.JVPTracer, _ad.LinearizeTracer)):
        return (t.primal, t.tangent)
    if isinstance(t, _batching.BatchTracer):
        return (t.val,)
    return ()


def _forward_mode_entry_points():
    """Code objects of JAX's forward-mode entry points (`jvp` and its helper, `linearize`)."""
    from jax._src import api

    return frozenset(inspect.unwrap(getattr(api, name)).__code__
                     for name in ("jvp", "_jvp", "linearize") if hasattr(api, name))


_FORWARD_MODE_CODES = _forward_mode_entry_points()


def _forward_mode_on_stack() -> bool:
    """True when the caller runs inside `jax.jvp`, `jax.linearize`, `jacfwd` or `hessian`.

    Tracers cannot tell everything: `linearize` traces with the same tracers as `grad`, and a
    `lax.scan` body is traced with plain tracers before the scan is differentiated. JAX's own
    forward-mode entry points are on the Python stack in every one of these cases.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _FORWARD_MODE_CODES:
            return True
        frame = frame.f_back
    return False


def under_forward_mode(leaves) -> bool:
    """True when forward-mode differentiation (jvp, linearize, jacfwd, hessian) may reach a
    call with these arguments: a leaf carries a forward-mode (jvp) tangent at any nesting
    depth, or a forward-mode entry point of JAX's is running.

    Reverse mode (`grad`, `vjp`) traces with LinearizeTracers (direct linearize is the default
    in every supported version); `jvp`, `jacfwd` and `hessian` use JVPTracers.
    """
    stack = [x for x in leaves if isinstance(x, _core.Tracer)]
    seen = set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, _ad.JVPTracer):
            return True
        stack.extend(c for c in _tracer_children(t) if isinstance(c, _core.Tracer))
    return _forward_mode_on_stack()


def var_namer():
    """A function naming atoms as JAX's jaxpr printer does (`a`, `b`, ...), consistently across
    calls; None where the printer's API differs."""
    try:
        ctx, pp_var = _core.JaxprPpContext(), _core.pp_var
    except AttributeError:
        return None

    def name(atom) -> str:
        return str(pp_var(atom, ctx, print_literal_dtype=False))
    return name


# Frames in installed libraries, or in this package itself (its NNX scoping wrapper sits between
# a module's caller and its math), are not the user's own code.
_LIBRARY_MARKERS = ("site-packages", "dist-packages", os.path.dirname(os.path.abspath(__file__)))


def source_location(source_info, library_markers=_LIBRARY_MARKERS) -> str:
    """`file:line:col (function)` of the innermost frame of the user's own code.

    JAX's summary skips JAX's frames only; a Flax module's math would point into Flax.
    """
    from jax._src import source_info_util as siu

    frames = list(itertools.islice(siu.user_frames(source_info.traceback), 16))
    if not frames:
        return "unknown"
    own = next((f for f in frames if not any(m in f.file_name for m in library_markers)),
               frames[0])
    return siu._summarize_frame(own)


def _primitive_of(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return jaxpr.eqns[-1].primitive


def _nested_primitives():
    import jax.numpy as jnp

    relu_like = jax.custom_jvp(lambda x: x)
    relu_like.defjvp(lambda p, t: (p[0], t[0]))
    vjp_like = jax.custom_vjp(lambda x: x)
    vjp_like.defvjp(lambda x: (x, None), lambda _, g: (g,))
    x = jnp.float32(0)
    return {
        "jit": JIT_PRIMITIVE,
        "custom_jvp_call": _primitive_of(relu_like, x),
        "custom_vjp_call": _primitive_of(vjp_like, x),
        "remat": _primitive_of(jax.checkpoint(lambda v: v * 2), x),
        "scan": _primitive_of(lambda v: jax.lax.scan(lambda c, _: (c, None), v, None, length=2)[0], x),
        "cond": _primitive_of(lambda v: jax.lax.cond(v > 0, lambda: v, lambda: -v), x),
        "while": _primitive_of(lambda v: jax.lax.while_loop(lambda c: c < 1, lambda c: c + 1, v), x),
    }


NESTED = _nested_primitives()
CUSTOM_DERIVATIVE_PRIMITIVES = frozenset({NESTED["custom_jvp_call"], NESTED["custom_vjp_call"]})
# Regions the engine descends into. Anything else that holds a jaxpr (pallas_call's kernel body,
# our own replacements) is opaque.
NESTED_PRIMITIVES = frozenset(NESTED.values())
