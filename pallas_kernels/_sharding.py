"""Kernels that run on local shards: one wrapper for every op, under any sharding of its operands.

A `pallas_call` is opaque to XLA's partitioners: left alone, GSPMD and Shardy all-gather every
operand and run the whole kernel on every device. `per_shard` instead wraps an implementation in
`jax.experimental.custom_partitioning` (a Shardy sharding rule plus the GSPMD callbacks), forward
and backward, so that each device runs the kernel on its own block.

What the wrapper needs from an op is a `ShardingRule`: a factor name per axis of every array
operand and result, as in an einsum ("b q h d"), and which factors the kernel reduces over
(`whole`, with the reason). A factor that is not `whole` splits freely: the kernel treats its
blocks independently.
In the backward, an operand's cotangent sums over the factors its operand lacks (a weight's
gradient over the batch), so the wrapper adds the shards' partial cotangents with one `psum`.
A `whole` factor that is split is either handled by a `Collective` the op supplies (vocabulary-
parallel cross-entropy, ring attention) or gathered for the kernel, with a warning naming the op
and the reason; `gathers()` lists those events, so tests and experiments can see them. When a
free and a `whole` factor claim the same mesh axes, the free one gets them (a column-split
weight stays split; the activations' features are gathered).

Inside `shard_map` (every mesh axis manual) custom_partitioning inlines the kernel on the local
block, as it does on one device; `per_shard` adds nothing there. Under explicit sharding (mesh
axes of type `AxisType.Explicit`, shardings in the operands' types) no partitioner runs: the same
plan is carried out at trace time, the operands resharded to it and the local function run in a
`shard_map`; cotangents come back placed like their primals.

The backward recomputes the forward from the operands (residuals would need sharding rules of
their own): one more forward kernel per op in a sharded backward.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import warnings
from typing import Any, Callable

import jax
from jax.experimental.custom_partitioning import (ArrayMapping, CompoundFactor, SdyShardingRule,
                                                  custom_partitioning)
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels import _target


@dataclasses.dataclass(frozen=True)
class Collective:
    """A local forward and backward for when a `whole` factor is split over mesh axes.

    `forward(axes, shards, *args, **kwargs) -> results` and `backward(axes, shards,
    cotangents, *args, **kwargs) -> cotangents of the float operands`, called like the op, on local blocks, combining shards with
    collectives over `axes` (the mesh axis names the factor is split over, `shards` their
    total size). Their results are complete: nothing is added after them for this factor.
    """
    factor: str
    forward: Callable
    backward: Callable
    implementation: str = "pallas"  # the implementation whose kernels these run
    # Factors that must be split over the same mesh axes as `factor` for this collective to
    # apply (ring attention: the queries' positions with the keys'); it handles them too.
    companions: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    """Factor names of an op's array operands and results.

    `args` and `kwargs` mirror the call's own, each array replaced by its axes' factor names, a
    space-separated string ("b q h d"); "g*r" is one axis made of g (major) and r, of which
    only g may be split; "1" an axis of size one. Non-array arguments are left as they are.
    `results` gives the flattened results' factors. `whole` maps each factor the kernel reduces
    over to the reason it cannot be split.
    """
    args: tuple
    kwargs: dict
    results: tuple[str, ...]
    whole: dict[str, str] = dataclasses.field(default_factory=dict)
    collectives: tuple[Collective, ...] = ()
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # of minor compound factors


def batch_dims(n: int, prefix: str = "a") -> str:
    """Factor names for n leading axes a kernel treats as independent rows: "a0 a1 ..."."""
    return " ".join(f"{prefix}{i}" for i in range(n))


# -- what was gathered ---------------------------------------------------------------------------

_gathers: list[str] = []
_gathers_lock = threading.Lock()


def gathers() -> list[str]:
    """Messages of every split `whole` factor gathered for a kernel so far, oldest first."""
    with _gathers_lock:
        return list(_gathers)


def _report_gather(message: str) -> None:
    with _gathers_lock:
        new = message not in _gathers
        _gathers.append(message)
    if new:
        warnings.warn(message, stacklevel=2)


# -- factors ---------------------------------------------------------------------------------------

def _axes_of(dims: str) -> list[tuple[str, ...]]:
    """"b g*r 1" -> [("b",), ("g", "r"), ()]."""
    return [() if d == "1" else tuple(d.split("*")) for d in dims.split()]


def _major(axis: tuple[str, ...]) -> str | None:
    return axis[0] if axis else None


def _mapping(axes: list[tuple[str, ...]], ones: list[int]) -> ArrayMapping:
    out = []
    for a in axes:
        if not a:  # each size-one axis its own factor, so sizes never conflict
            ones[0] += 1
            out.append(f"one{ones[0]}")
        elif len(a) == 1:
            out.append(a[0])
        else:
            out.append(CompoundFactor(*a))
    return ArrayMapping(*out)


def _spec_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _named_spec(sharding, ndim: int) -> list[tuple[str, ...]]:
    spec = getattr(sharding, "spec", None)
    if spec is None:  # a sharding that names no mesh axes: treat as replicated
        return [()] * ndim
    spec = list(spec) + [None] * (ndim - len(spec))
    return [_spec_axes(e) for e in spec]


def _size(mesh, axes) -> int:
    n = 1
    for m in axes:
        n *= mesh.shape[m]
    return n


@dataclasses.dataclass
class _Plan:
    """Which mesh axes each factor is split over, for one call."""
    factor_axes: dict[str, tuple[str, ...]]
    collective: Collective | None

    def spec(self, axes: list[tuple[str, ...]]) -> P:
        parts = []
        for a in axes:
            mesh_axes = self.factor_axes.get(_major(a), ())
            parts.append(None if not mesh_axes else
                         mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        return P(*parts)

    def missing(self, axes: list[tuple[str, ...]]) -> tuple[str, ...]:
        """Mesh axes of split factors that these axes lack: what a cotangent sums over."""
        present = {_major(a) for a in axes}
        return tuple(m for f, ms in self.factor_axes.items() if f not in present for m in ms)


class _Partitioned:
    """One function of local blocks, wrapped in custom_partitioning for a rule."""

    def __init__(self, name: str, local: Callable, operands: list, results: list,
                 rule: ShardingRule, *, backward: bool):
        # `rule.collectives` holds only the implementation's own (see `per_shard`)
        self.name, self.local, self.rule, self.backward = name, local, rule, backward
        self.operands = [_axes_of(d) for d in operands]
        self.results = [_axes_of(d) for d in results]
        self.fn = custom_partitioning(lambda *arrays: tuple(local(None, *arrays)))
        ones = [0]
        sdy = SdyShardingRule(
            tuple(_mapping(a, ones) for a in self.operands),
            tuple(_mapping(a, ones) for a in self.results),
            need_replication_factors=tuple(
                f for f in self._factors() if f in rule.whole and not self._collective(f)
                and not any(f in c.companions for c in rule.collectives)),
            **{f: s for f, s in rule.sizes.items() if f in self._factors()})
        self.fn.def_partition(partition=self._partition,
                              infer_sharding_from_operands=self._infer,
                              sharding_rule=sdy)

    def _factors(self) -> list[str]:
        """Every factor, in order of first use (Shardy wants special factors in that order)."""
        seen = {f: None for axes in self.operands + self.results for a in axes for f in a}
        return list(seen)

    def _collective(self, factor: str) -> Collective | None:
        return next((c for c in self.rule.collectives if c.factor == factor), None)

    def _plan(self, mesh, arg_shapes) -> _Plan:
        factor_axes: dict[str, tuple[str, ...]] = {}
        used: set[str] = set()
        collective = None
        # Free factors first: a mesh axis that both a free factor (a weight's output columns)
        # and a reduced one (the activations' features) claim goes to the free factor, so
        # parameters and their gradients stay where they were placed and the activations are
        # gathered instead (what XLA does for a column-split matmul).
        placed = [(a, size, mesh_axes)
                  for axes, shape in zip(self.operands, arg_shapes)
                  for a, size, mesh_axes in zip(axes, shape.shape,
                                                _named_spec(shape.sharding, len(axes)))]
        placed.sort(key=lambda p: _major(p[0]) in self.rule.whole)
        first = {}  # factor -> (size, mesh axes) of its first split occurrence
        for a, size, mesh_axes in placed:
            if _major(a) is not None and mesh_axes:
                first.setdefault(_major(a), (size, mesh_axes))
        for c in self.rule.collectives:  # one whose factors are split alike claims them first
            if not c.companions or c.factor not in first:
                continue
            axes = first[c.factor][1]
            n = _size(mesh, axes)
            if all(first.get(f, (0, ()))[1] == axes and first[f][0] % n == 0
                   for f in (c.factor, *c.companions)):
                collective = c
                factor_axes.update({f: axes for f in (c.factor, *c.companions)})
                used |= set(axes)
                break
        for a, size, mesh_axes in placed:
            f = _major(a)
            if not mesh_axes or f is None or f in factor_axes or used & set(mesh_axes):
                continue
            n = _size(mesh, mesh_axes)
            if f in self.rule.whole:
                handler = self._collective(f)
                if handler is None or collective is not None or size % n:
                    _report_gather(
                        f"pallas_kernels: {self.name}: {f!r} is split over mesh axes "
                        f"{mesh_axes}, but {self.rule.whole[f]}; it is gathered for the "
                        f"kernel")
                    continue
                collective = handler
            elif size % n:
                continue
            factor_axes[f] = mesh_axes
            used |= set(mesh_axes)
        return _Plan(factor_axes, collective)

    def _shardings(self, mesh, plan: _Plan, which: list) -> tuple:
        return tuple(NamedSharding(mesh, plan.spec(a)) for a in which)

    def _infer(self, mesh, arg_shapes, result_shape):
        plan = self._plan(mesh, arg_shapes)
        return self._result_shardings(mesh, plan)

    def _result_shardings(self, mesh, plan: _Plan) -> tuple:
        out = []
        for a in self.results:
            # A forward result lacking a split factor would be a partial sum we cannot complete
            # (the kernel is not linear in it); rules name every free factor in the results.
            out.append(NamedSharding(mesh, plan.spec(a)))
        return tuple(out)

    def _partition(self, mesh, arg_shapes, result_shape):
        plan = self._plan(mesh, arg_shapes)
        arg_shardings = self._shardings(mesh, plan, self.operands)
        result_shardings = self._result_shardings(mesh, plan)
        sums = [plan.missing(a) for a in self.results] if self.backward else None
        collective, factor_axes = plan.collective, plan.factor_axes

        axes = None if collective is None else factor_axes[collective.factor]
        handler = None if collective is None else (collective, axes, _size(mesh, axes))

        def lower(*arrays):
            results = list(self.local(handler, *arrays))
            if sums is not None:
                for i, over in enumerate(sums):
                    over = tuple(m for m in over
                                 if collective is None or m not in axes)
                    if over:
                        results[i] = jax.lax.psum(results[i], over)
            return tuple(results)

        return mesh, lower, result_shardings, arg_shardings

    def __call__(self, *arrays):
        mesh = _explicit_mesh(arrays)
        if mesh is None:
            return self.fn(*arrays)
        # Explicit sharding (shardings in the types): no partitioner runs, so the plan is carried
        # out here, with the same local function inside a shard_map over every mesh axis.
        shapes = [jax.typeof(a) for a in arrays]
        _, lower, result_shardings, arg_shardings = self._partition(mesh, shapes, None)
        arrays = [a if _named_spec(t.sharding, t.ndim) == _named_spec(s, t.ndim)
                  else jax.sharding.reshard(a, s.spec)
                  for a, t, s in zip(arrays, shapes, arg_shardings)]
        return jax.shard_map(lower, mesh=mesh, in_specs=tuple(s.spec for s in arg_shardings),
                             out_specs=tuple(s.spec for s in result_shardings),
                             check_vma=False)(*arrays)


@contextlib.contextmanager
def without_explicit_mesh():
    """Trace a kernel on its own (shapes, lowering checks) under an explicit-sharding mesh:
    `pallas_call` takes no explicit mesh axes, so the block traces under an empty one."""
    mesh = jax.sharding.get_abstract_mesh()
    explicit = any(t == jax.sharding.AxisType.Explicit
                   for t in getattr(mesh, "axis_types", ()) or ())
    if not explicit:
        yield
        return
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        yield


def _placed_like(results, operands):
    """Under explicit sharding, each result resharded to its operand's placement (a cotangent
    must have its primal's type; the plan may have split it like another operand's factor)."""
    if _explicit_mesh(operands) is None:
        return results
    out = []
    for r, a in zip(results, operands):
        want = jax.typeof(a).sharding
        same = _named_spec(jax.typeof(r).sharding, r.ndim) == _named_spec(want, a.ndim)
        out.append(r if same else jax.sharding.reshard(r, want.spec))
    return out


def _explicit_mesh(arrays):
    """The mesh of operands whose types carry an explicit sharding, else None."""
    for a in arrays:
        sharding = getattr(jax.typeof(a), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or not getattr(mesh, "axis_names", ()):
            continue
        explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types)
                    if t == jax.sharding.AxisType.Explicit}
        if any(set(_spec_axes(e)) & explicit for e in sharding.spec):
            return mesh
    return None


# -- the wrapper -------------------------------------------------------------------------------

def per_shard(name: str, fn: Callable, rule: ShardingRule, bound,
              implementation: str = "pallas") -> Any:
    """`fn` called on `bound`'s arguments, forward and backward on each device's own block.

    `bound` is the dispatcher's `_BoundCall` of the call; `rule` its factor names;
    `implementation` the name `fn` is registered under (it selects the rule's collectives).
    """
    rule = dataclasses.replace(rule, collectives=tuple(
        c for c in rule.collectives if c.implementation == implementation))
    positions = bound.array_positions
    rule_leaves = jax.tree_util.tree_flatten((rule.args, rule.kwargs))[0]
    operand_dims = [rule_leaves[i] for i in positions]
    arrays = [bound.leaves[i] for i in positions]
    diff = bound.differentiable()
    n = len(arrays)
    with without_explicit_mesh():
        out_tree = jax.tree_util.tree_structure(jax.eval_shape(
            lambda *a: bound.call(fn, a),
            *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]))

    # The partitioners call the local functions when the program is compiled, outside the
    # op's call: they run under the kernel choice (platform, interpret mode) of the call.
    choice = _target.current()

    def forward_local(handler, *local):
        with _target.using(choice):
            return _forward_local(handler, *local)

    def backward_local(handler, *local):
        with _target.using(choice):
            return _backward_local(handler, *local)

    def _forward_local(handler, *local):
        if handler is not None:
            collective, axes, shards = handler
            return jax.tree_util.tree_leaves(
                bound.call(functools.partial(collective.forward, axes, shards), local))
        return jax.tree_util.tree_leaves(bound.call(fn, local))

    def _backward_local(handler, *local):
        primals, cotangents = local[:n], local[n:]
        if handler is not None:
            collective, axes, shards = handler
            backward = functools.partial(collective.backward, axes, shards, cotangents)
            return list(bound.call(backward, primals))

        def of_floats(*floats):
            full = list(primals)
            for j, x in zip(diff, floats):
                full[j] = x
            return jax.tree_util.tree_leaves(bound.call(fn, full))

        _, vjp = jax.vjp(of_floats, *[primals[j] for j in diff])
        return list(vjp(list(cotangents)))

    forward = _Partitioned(name, forward_local, operand_dims, list(rule.results), rule,
                           backward=False)
    backward = _Partitioned(f"{name} (backward)", backward_local,
                            operand_dims + list(rule.results),
                            [operand_dims[j] for j in diff], rule, backward=True)

    @jax.custom_vjp
    def run(*arrays):
        return forward(*arrays)

    def run_fwd(*arrays):
        return forward(*arrays), arrays

    def run_bwd(arrays, cotangents):
        grads = iter(_placed_like(backward(*arrays, *cotangents), [arrays[j] for j in diff]))
        return tuple(next(grads) if j in diff else None for j in range(n))

    run.defvjp(run_fwd, run_bwd)
    return jax.tree_util.tree_unflatten(out_tree, run(*arrays))


def wanted() -> bool:
    """Whether wrapping can matter: more than one device is visible."""
    return jax.device_count() > 1
