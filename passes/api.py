"""`optimize` and `explain`: trace a function to a jaxpr, rewrite it, run the result."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import time
import warnings

import jax
import numpy as np

from passes import _compat as C
from passes import _nnx
from passes.pipeline import Context, MalformedProgramError, Pipeline, collector_paused
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


def static_positions_and_names(fn, static_argnums, static_argnames):
    """Complete `static_argnums`/`static_argnames` from `fn`'s signature, as `jax.jit` does.

    A parameter marked static by position is static when given by keyword too, and one marked
    by name is static when given by position.
    """
    nums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins and some callables have no signature
        return frozenset(nums), frozenset(names)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    nums = {i % len(positional) if i < 0 and positional else i for i in nums}
    names = set(names)
    names |= {positional[i].name for i in nums
              if i < len(positional) and positional[i].kind is not inspect.Parameter.POSITIONAL_ONLY}
    nums |= {i for i, p in enumerate(positional) if p.name in names}
    return frozenset(nums), frozenset(names)


@dataclasses.dataclass(frozen=True)
class _NodeSlot:
    """Where an NNX graph node sat among the arguments (the index into the distinct nodes)."""
    index: int


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call's arguments, split into what is traced and what is part of the cache key.

    `leaves` starts with the state leaves of every distinct NNX graph node found anywhere in the
    arguments (positional, keyword, inside containers), split together so that shared references
    stay shared, then the other array leaves.
    """
    leaves: tuple
    key: tuple
    rebuild: object  # leaves -> (args, kwargs, nodes) inside the trace
    nodes: tuple  # the distinct NNX graph nodes, in order of first appearance
    n_state: int  # how many leading leaves are node state


def _aval_struct(leaf, where):
    try:
        aval = C.shaped_abstractify(leaf)
    except TypeError:
        raise TypeError(
            f"optimize: {where} is a {type(leaf).__name__}, which cannot be traced. Mark it "
            f"static with `passes.optimize(fn, static_argnums=...)` or `static_argnames=...` "
            f"(static values must be hashable), or pass arrays instead.") from None
    sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) else None
    if sharding is not None and type(sharding).__name__ == "SingleDeviceSharding":
        sharding = None
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type), sharding


def _pull_static(args, kwargs, static_nums, static_names):
    dyn_args = list(args)
    statics = []
    for i in sorted({j % len(args) if j < 0 and args else j for j in static_nums}):
        if 0 <= i < len(args):
            statics.append((i, args[i]))
            dyn_args[i] = None
    dyn_kwargs = {k: v for k, v in kwargs.items() if k not in static_names}
    statics.extend((k, kwargs[k]) for k in sorted(kwargs) if k in static_names)
    try:
        hash(tuple(statics))
    except TypeError as e:
        raise TypeError(f"optimize: static arguments must be hashable: {e}") from None
    return dyn_args, dyn_kwargs, tuple(statics)


def _pull_nodes(flat):
    """Replace each graph node in `flat` by a `_NodeSlot`; return the distinct nodes."""
    nodes, index = [], {}
    for i, leaf in enumerate(flat):
        if _is_graph_node(leaf):
            k = index.setdefault(id(leaf), len(nodes))
            if k == len(nodes):
                nodes.append(leaf)
            flat[i] = _NodeSlot(k)
    return tuple(nodes)


def _split_call(args, kwargs, static_nums, static_names) -> tuple[_Call, list]:
    from flax import nnx

    dyn_args, dyn_kwargs, statics = _pull_static(args, kwargs, static_nums, static_names)
    flat, treedef = jax.tree.flatten((dyn_args, dyn_kwargs), is_leaf=_is_graph_node)
    nodes = _pull_nodes(flat)
    graphdef, state = nnx.split(nodes) if nodes else (None, {})
    state_leaves, state_tree = jax.tree.flatten(state)
    array_pos = [i for i, leaf in enumerate(flat) if not isinstance(leaf, _NodeSlot)]
    leaves = state_leaves + [flat[i] for i in array_pos]
    structs, shardings = [], []
    for n, leaf in enumerate(leaves):
        try:
            s, sh = _aval_struct(leaf, f"argument leaf {n}")
        except TypeError:
            paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
                (dyn_args, dyn_kwargs), is_leaf=_is_graph_node)[0]]
            where = paths[array_pos[n - len(state_leaves)]] if n >= len(state_leaves) else "?"
            _aval_struct(leaf, f"the argument at {where} (positional args first, then kwargs)")
        structs.append(s)
        shardings.append(sh)
    slots = tuple((i, flat[i].index) for i in range(len(flat)) if isinstance(flat[i], _NodeSlot))
    key = (treedef, slots, tuple((s.shape, s.dtype, s.weak_type) for s in structs),
           tuple(shardings), statics, graphdef, state_tree)
    n_state = len(state_leaves)

    def rebuild(values):
        merged = nnx.merge(graphdef, jax.tree.unflatten(state_tree, values[:n_state])) if nodes else ()
        full = list(flat)
        for i, v in zip(array_pos, values[n_state:]):
            full[i] = v
        for i, k in slots:
            full[i] = merged[k]
        a, kw = jax.tree.unflatten(treedef, full)
        a = list(a)
        for i, v in statics:
            if isinstance(i, int):
                a[i] = v
            else:
                kw[i] = v
        return a, kw, merged

    return _Call(tuple(leaves), key, rebuild, nodes, n_state), structs


# -- tracing and rewriting ---------------------------------------------------------------------

@dataclasses.dataclass
class _Program:
    before: object  # closed jaxpr as traced
    after: object  # closed jaxpr as rewritten: fn's outputs, then NNX node state leaves
    out_tree: object  # treedef of fn's outputs
    state_tree: object  # treedef of the NNX node state after the call
    n_state: int  # how many trailing outputs are node state leaves
    changed_state: tuple | None  # which state leaves fn changed (None: the structure changed)
    report: Report
    _jitted: object = None

    def run(self, leaves):
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return C.jaxpr_as_fun(self.after)(*leaves)
        if self._jitted is None:
            self._jitted = jax.jit(C.jaxpr_as_fun(self.after))
        return self._jitted(*leaves)


def _trace(fn, call: _Call, structs):
    from flax import nnx

    out_info = {}

    def flat_fn(*flat):
        a, kw, merged = call.rebuild(list(flat))
        _nnx.scope_module_calls(merged)
        try:
            out = fn(*a, **kw)
        finally:
            _nnx.forget(merged)
        state = nnx.split(merged)[1] if call.nodes else {}
        out_leaves, out_tree = jax.tree.flatten(out)
        state_leaves, state_tree = jax.tree.flatten(state)
        out_info.update(tree=out_tree, state_tree=state_tree, n_state=len(state_leaves))
        return out_leaves + state_leaves

    closed = jax.make_jaxpr(flat_fn)(*structs)
    return closed, out_info


def _changed_state(closed, call: _Call, n_state: int):
    """Indices of the node state leaves `fn` changed: those not passed straight through.

    Unchanged state is never written back, so a module created outside an enclosing `jit`,
    `vmap` or `grad` can be used inside it exactly as the plain function could.
    """
    if n_state != call.n_state:
        return None
    body = C.open_jaxpr(closed)
    outs = body.outvars[len(body.outvars) - n_state:]
    return tuple(j for j, (o, i) in enumerate(zip(outs, body.invars)) if o is not i)


@collector_paused()  # what tracing allocates lives through the pipeline: no collector walks
def _build(fn, pipeline: Pipeline, call: _Call, structs) -> _Program:
    t0 = time.perf_counter()
    closed, out_info = _trace(fn, call, structs)
    trace_time = time.perf_counter() - t0
    ctx = Context(pipeline.sites, pipeline.debug, pipeline.validate)
    try:
        after, ctx = pipeline.run(closed, ctx)
    except MalformedProgramError as e:
        warnings.warn(f"optimize: {e}. Running the original program instead; please report "
                      f"this with the program that triggered it.", RuntimeWarning, stacklevel=4)
        after = closed
    report = Report(pipeline.names, ctx, closed, after, trace_time)
    n_state = out_info["n_state"]
    return _Program(closed, after, out_info["tree"], out_info["state_tree"], n_state,
                    _changed_state(closed, call, n_state), report)


def _apply_node_states(call: _Call, program: _Program, state_leaves):
    from flax import nnx

    if not call.nodes or not state_leaves:
        return
    new_state = jax.tree.unflatten(program.state_tree, state_leaves)
    if program.changed_state is not None:
        changed = set(program.changed_state)
        if not changed:
            return
        flat = list(nnx.to_flat_state(new_state))
        in_order = [leaf for _, var in flat for leaf in jax.tree.leaves(var)]
        if len(in_order) == len(state_leaves) and all(
                a is b for a, b in zip(in_order, state_leaves)):  # one leaf per variable
            new_state = nnx.from_flat_state([flat[j] for j in sorted(changed)])
    nnx.update(call.nodes, new_state)


# -- public ------------------------------------------------------------------------------------

def optimize(fn, pipeline: Pipeline | None = None, *, static_argnums=(), static_argnames=(),
             verify: bool = False):
    """`fn`, rewritten by `pipeline` (default: `passes.default_pipeline()`).

    The result has `fn`'s signature and outputs and composes with `jax.jit`, `jax.grad`,
    `jax.vmap` and sharded `jit`: the rewritten program is evaluated inside the caller's trace.
    The program is traced and rewritten once per input signature (tree structure, shapes, dtypes,
    weak types, explicit shardings, static arguments). Python scalars are traced weak-typed, as
    under `jax.jit`. NNX graph nodes anywhere among the arguments (positional, keyword, inside
    lists and dicts) behave as under `nnx.jit`: the same module given twice is one module, and
    the state `fn` changes (BatchNorm statistics, RNG counts) is written back; state it leaves
    alone is never touched, so a module may be closed over by an enclosing `jit` or `vmap`.

    Forward-mode differentiation (`jvp`, `linearize`, `jacfwd`, `hessian`) cannot pass through
    the kernels' custom_vjp rules; wherever it reaches this call (inside a scan body or a jit
    traced under it too), the original `fn` runs instead.

    Args:
      fn: the function to rewrite.
      pipeline: the passes to run.
      static_argnums, static_argnames: arguments that are not traced (hashable; part of the
        key). As under `jax.jit`, an argument named by either is static whether it is given by
        position or by keyword.
      verify: on concrete arguments, also run the original and raise `VerificationError` when
        results differ beyond the tolerance for their dtype.
    """
    static_argnums, static_argnames = static_positions_and_names(fn, static_argnums,
                                                                 static_argnames)
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
        _apply_node_states(call, program, flat[n_out:])
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
    if any(isinstance(x, jax.core.Tracer) for x in call.leaves):
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


def explain(fn, *args, pipeline: Pipeline | None = None, static_argnums=(), static_argnames=(),
            **kwargs) -> Report:
    """Run `pipeline` on `fn`'s program for these arguments and report what fired where.

    Arguments may be arrays or `jax.ShapeDtypeStruct`s; keyword arguments go to `fn`.
    `static_argnums`/`static_argnames` mark arguments that are not traced, as in `optimize`.
    """
    pipeline = pipeline or _default_pipeline()
    nums, names = static_positions_and_names(fn, static_argnums, static_argnames)
    call, structs = _split_call(args, kwargs, nums, names)
    return _build(fn, pipeline, call, structs).report
