"""`optimize` and `explain`: trace a function to a jaxpr, rewrite it, run the result."""
from __future__ import annotations

import dataclasses
import functools
import time
import warnings

import jax
import numpy as np
from jax._src import core as _core

from passes import _compat as C
from passes.pipeline import Context, Pipeline
from passes.report import Report


class VerificationError(AssertionError):
    """`optimize(..., verify=True)` found the rewritten program disagreeing with the original."""


def _default_pipeline():
    from passes import default_pipeline
    return default_pipeline()


# -- arguments ---------------------------------------------------------------------------------

def _is_graph_node(x) -> bool:
    from flax import nnx
    return nnx.graph.is_graph_node(x)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call's arguments, split into what is traced and what is part of the cache key."""
    leaves: tuple  # dynamic array leaves, NNX module state included
    key: tuple
    rebuild: object  # leaves -> (args, kwargs, modules) inside the trace
    modules: tuple  # (position, module) of NNX modules among the arguments


def _aval_struct(leaf, where):
    try:
        aval = _core.shaped_abstractify(leaf)
    except TypeError:
        raise TypeError(
            f"optimize: {where} is a {type(leaf).__name__}, which cannot be traced. Mark it "
            f"static with `passes.optimize(fn, static_argnums=...)` or `static_argnames=...` "
            f"(static values must be hashable), or pass arrays instead.") from None
    sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) else None
    if sharding is not None and type(sharding).__name__ == "SingleDeviceSharding":
        sharding = None
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type), sharding


def _split_call(args, kwargs, static_argnums, static_argnames) -> tuple[_Call, list]:
    from flax import nnx

    static_pos = {i % len(args) if args else i for i in static_argnums}
    dyn_args = list(args)
    statics = []
    for i in sorted(static_pos):
        if i < len(args):
            statics.append((i, args[i]))
            dyn_args[i] = None
    dyn_kwargs = {k: v for k, v in kwargs.items() if k not in static_argnames}
    statics.extend((k, kwargs[k]) for k in sorted(kwargs) if k in static_argnames)
    modules = []
    for i, a in enumerate(dyn_args):
        if a is not None and _is_graph_node(a):
            graphdef, state = nnx.split(a)
            modules.append((i, a, graphdef))
            dyn_args[i] = state
    leaves, treedef = jax.tree.flatten((dyn_args, dyn_kwargs))
    structs, shardings = [], []
    paths = None
    for n, leaf in enumerate(leaves):
        try:
            s, sh = _aval_struct(leaf, f"argument leaf {n}")
        except TypeError:
            paths = paths or [jax.tree_util.keystr(p) for p, _ in
                              jax.tree_util.tree_flatten_with_path((dyn_args, dyn_kwargs))[0]]
            _aval_struct(leaf, f"the argument at {paths[n]} (positional args first, then kwargs)")
        structs.append(s)
        shardings.append(sh)
    try:
        static_key = tuple(statics)
        hash(static_key)
    except TypeError as e:
        raise TypeError(f"optimize: static arguments must be hashable: {e}") from None
    key = (treedef, tuple((s.shape, s.dtype, s.weak_type) for s in structs), tuple(shardings),
           static_key, tuple(g for _, _, g in modules))

    def rebuild(flat):
        a, kw = jax.tree.unflatten(treedef, flat)
        a = list(a)
        for i, v in statics:
            if isinstance(i, int):
                a[i] = v
            else:
                kw[i] = v
        merged = []
        for i, _, graphdef in modules:
            a[i] = nnx.merge(graphdef, a[i])
            merged.append(a[i])
        return a, kw, merged

    return _Call(tuple(leaves), key, rebuild, tuple((i, m) for i, m, _ in modules)), structs


# -- tracing and rewriting ---------------------------------------------------------------------

@dataclasses.dataclass
class _Program:
    before: object  # closed jaxpr as traced
    after: object  # closed jaxpr as rewritten: fn's outputs, then NNX module state leaves
    out_tree: object  # treedef of fn's outputs
    state_tree: object  # treedef of the NNX module states written back
    n_state: int  # how many trailing outputs are module state leaves
    report: Report
    _jitted: object = None

    def run(self, leaves):
        if any(isinstance(x, _core.Tracer) for x in leaves):
            return C.jaxpr_as_fun(self.after)(*leaves)
        if self._jitted is None:
            self._jitted = jax.jit(C.jaxpr_as_fun(self.after))
        return self._jitted(*leaves)


def _trace(fn, call: _Call, structs):
    from flax import nnx

    out_info = {}

    def flat_fn(*flat):
        a, kw, merged = call.rebuild(list(flat))
        out = fn(*a, **kw)
        states = [nnx.split(m)[1] for m in merged]
        out_leaves, out_tree = jax.tree.flatten(out)
        state_leaves = jax.tree.leaves(states)
        out_info["tree"] = out_tree
        out_info["states"] = jax.tree.structure(states)
        out_info["n_state"] = len(state_leaves)
        return out_leaves + state_leaves

    closed = jax.make_jaxpr(flat_fn)(*structs)
    return closed, out_info


def _build(fn, pipeline: Pipeline, call: _Call, structs) -> _Program:
    t0 = time.perf_counter()
    closed, out_info = _trace(fn, call, structs)
    trace_time = time.perf_counter() - t0
    after, ctx = pipeline.run(closed, Context(pipeline.sites, pipeline.debug))
    report = Report(pipeline.names, ctx, closed, after, trace_time)
    return _Program(closed, after, out_info["tree"], out_info["states"], out_info["n_state"],
                    report)


def _apply_module_states(call: _Call, program: _Program, state_leaves):
    from flax import nnx

    if not call.modules:
        return
    states = jax.tree.unflatten(program.state_tree, state_leaves)
    for (_, module), state in zip(call.modules, states):
        nnx.update(module, state)


# -- public ------------------------------------------------------------------------------------

def optimize(fn, pipeline: Pipeline | None = None, *, static_argnums=(), static_argnames=(),
             verify: bool = False):
    """`fn`, rewritten by `pipeline` (default: `passes.default_pipeline()`).

    The result has `fn`'s signature and outputs and composes with `jax.jit`, `jax.grad`,
    `jax.vmap` and sharded `jit`: the rewritten program is evaluated inside the caller's trace.
    The program is traced and rewritten once per input signature (tree structure, shapes, dtypes,
    weak types, explicit shardings, static arguments). Python scalars are traced weak-typed, as
    under `jax.jit`. NNX modules among the arguments behave as under `nnx.jit`: state updates
    made by `fn` are written back.

    Forward-mode differentiation (`jvp`, `jacfwd`, `hessian`) cannot pass through the kernels'
    custom_vjp rules; under it, the original `fn` runs instead.

    Args:
      fn: the function to rewrite.
      pipeline: the passes to run.
      static_argnums, static_argnames: arguments that are not traced (hashable; part of the key).
      verify: on concrete arguments, also run the original and raise `VerificationError` when
        results differ beyond the tolerance for their dtype.
    """
    static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    static_argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
    cache: dict = {}

    @functools.wraps(fn)
    def optimized(*args, **kwargs):
        nonlocal pipeline
        if pipeline is None:
            pipeline = _default_pipeline()
        call, structs = _split_call(args, kwargs, static_argnums, static_argnames)
        if C.under_forward_mode(call.leaves):
            return fn(*args, **kwargs)
        key = (call.key, pipeline.cache_key())
        program = cache.get(key)
        if program is None:
            program = cache[key] = _build(fn, pipeline, call, structs)
        flat = program.run(list(call.leaves))
        n_out = len(flat) - program.n_state
        outs = flat[:n_out]
        _apply_module_states(call, program, flat[n_out:])
        result = jax.tree.unflatten(program.out_tree, outs)
        if verify:
            _verify(program, call, outs)
        return result

    def report_for(*args, **kwargs) -> Report:
        """The `Report` of the program built for these arguments."""
        call, structs = _split_call(args, kwargs, static_argnums, static_argnames)
        p = pipeline or _default_pipeline()
        program = cache.get((call.key, p.cache_key()))
        if program is None:
            program = cache[(call.key, p.cache_key())] = _build(fn, p, call, structs)
        return program.report

    optimized.report = report_for
    optimized.original = fn
    return optimized


def _verify(program: _Program, call: _Call, outs):
    if any(isinstance(x, _core.Tracer) for x in call.leaves):
        warnings.warn("optimize(verify=True) cannot verify under a trace (jit, grad, vmap): it "
                      "needs concrete arguments. Call the optimized function outside "
                      "transformations to verify it.", stacklevel=3)
        return
    from passes.testing import default_tolerance

    ref = jax.jit(C.jaxpr_as_fun(program.before))(*call.leaves)
    problems = []
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        jax.tree.unflatten(program.out_tree, list(range(len(outs)))))[0]]
    for i, (got, want) in enumerate(zip(outs, ref)):
        got, want = np.asarray(got), np.asarray(want)
        if not jax.numpy.issubdtype(got.dtype, jax.numpy.inexact):
            bad = not np.array_equal(got, want)
            detail = "values differ"
        else:
            rtol, atol = default_tolerance(want.dtype)
            g64, w64 = got.astype(np.float64), want.astype(np.float64)
            bad = not np.allclose(g64, w64, rtol=rtol, atol=atol, equal_nan=True)
            err = np.abs(g64 - w64)
            detail = (f"max abs diff {np.nanmax(err) if err.size else 0:.3g}, max rel diff "
                      f"{np.nanmax(err / np.maximum(np.abs(w64), 1e-30)) if err.size else 0:.3g} "
                      f"(rtol {rtol}, atol {atol})")
        if bad:
            rules = sorted(_rewrites_feeding(program.after, i))
            problems.append(f"output {paths[i] if i < len(paths) else i}: {detail}; rewrites "
                            f"upstream: {', '.join(rules) or 'none'}")
    if problems:
        raise VerificationError("the optimized program disagrees with the original:\n  "
                                + "\n  ".join(problems)
                                + "\nBisect with Pipeline(sites=[...]) or JAXPASSES_SITES, using "
                                  "the site ids from passes.explain(...).rewrites.")


def _rewrites_feeding(closed, out_index) -> set[str]:
    from passes.ir import Region
    from passes.rewrite import is_replacement

    region = Region(closed)
    return {region.eqns[i].params["name"] for i in region.ancestors(region.outvars[out_index])
            if is_replacement(region.eqns[i])}


def explain(fn, *args, pipeline: Pipeline | None = None, **kwargs) -> Report:
    """Run `pipeline` on `fn`'s program for these arguments and report what fired where.

    Arguments may be arrays or `jax.ShapeDtypeStruct`s; keyword arguments go to `fn`.
    """
    pipeline = pipeline or _default_pipeline()
    call, structs = _split_call(args, kwargs, (), ())
    return _build(fn, pipeline, call, structs).report
