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

The backward runs on the forward's residuals, whose layout `_residuals.py` infers from the
kernel's VJP; the forward returns those it must save as extra results. Where the blocks of a
plan do not give residuals of that layout (padding, a minor flattened factor split), or where no
layout was found, the backward runs the forward again. A collective keeps what it completed (a
log-sum-exp, a row's statistics) in arrays of its own declared layout (`Collective.saves`), so
that its backward runs neither the forward's kernels nor its collectives again. A code the
forward returns tells the backward what it saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import (ArrayMapping, CompoundFactor, SdyShardingRule,
                                                  custom_partitioning)
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels import _pallas_compat as compat
from pallas_kernels import _residuals
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
    # Factors whose own split, where there is one, is honoured instead: this collective then
    # does not apply (a weight split on d moved onto an unsplit vocabulary).
    unless_split: tuple[str, ...] = ()
    # Other factors the split must divide too (the vocabulary a split d is moved onto).
    divides: tuple[str, ...] = ()
    # What the forward keeps for the backward (statistics its collectives completed), or None
    # (the backward runs the forward again). `saves(*args, **kwargs)`, called like the op on its
    # abstract global operands, gives `(dims, jax.ShapeDtypeStruct)` per kept array: global
    # arrays in the rule's factor names, so a plan places them like the results. With it, the
    # forward returns `(results, kept)` and the backward takes `saved` after the cotangents:
    # `(the op's results if `reads_results` else (), kept)`, or None where the forward did not
    # run this collective.
    saves: Callable | None = None
    reads_results: bool = False  # whether its backward reads the op's results (kept alive)
    # Where several collectives (or gathering) can handle a split, whether this one is the one
    # to run: `applies(sizes, splits, shards)` with every factor's global size, the number of
    # shards each factor the plan has split so far is split into, and this split's own.
    applies: Callable | None = None


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


def row_statistic(rows: tuple) -> tuple[str, jax.ShapeDtypeStruct]:
    """A float32 per row of a `rows`-shaped batch, as a collective declares what it keeps
    (`Collective.saves`): its factor names ("a0 a1 ...", those of `batch_dims`) and shape."""
    return batch_dims(len(rows)), jax.ShapeDtypeStruct(tuple(rows), jnp.float32)


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


class _Handler(NamedTuple):
    """The collective a plan runs, over which mesh axes (`shards` devices), and for a backward
    whether the forward's plan (on the same operands) ran it too."""
    collective: Collective
    axes: tuple[str, ...]
    shards: int
    in_forward: bool


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
                 rule: ShardingRule, *, backward: bool, result_shapes: list,
                 gradient_of: list[int] | None = None, primals: int = 0):
        # `rule.collectives` holds only the implementation's own (see `per_shard`).
        # `local(handler, local_result_shapes, *blocks)`; `result_shapes` are global; `handler`
        # is None or a `_Handler`. `gradient_of[i]`: the operand whose gradient result i is,
        # and `primals` the number of leading operands that are the forward's (a backward's).
        self.name, self.local, self.rule, self.backward = name, local, rule, backward
        self.result_shapes, self.gradient_of, self.primals = result_shapes, gradient_of, primals
        self.operands = [_axes_of(d) for d in operands]
        self.results = [_axes_of(d) for d in results]
        self.fn = custom_partitioning(lambda *arrays: tuple(local(None, result_shapes, *arrays)))
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

    def _plan(self, mesh, arg_shapes, operands=None, report: bool = True) -> _Plan:
        factor_axes: dict[str, tuple[str, ...]] = {}
        used: set[str] = set()
        collective = None
        # Free factors first: a mesh axis that both a free factor (a weight's output columns)
        # and a reduced one (the activations' features) claim goes to the free factor, so
        # parameters and their gradients stay where they were placed and the activations are
        # gathered instead (what XLA does for a column-split matmul).
        placed = [(a, size, mesh_axes)
                  for axes, shape in zip(self.operands if operands is None else operands,
                                         arg_shapes)
                  for a, size, mesh_axes in zip(axes, shape.shape,
                                                _named_spec(shape.sharding, len(axes)))]
        placed.sort(key=lambda p: _major(p[0]) in self.rule.whole)
        first = {}  # factor -> (size, mesh axes) of its first split occurrence
        sizes = {_major(a): size for a, size, _ in placed if _major(a) is not None}
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
            if (not mesh_axes or f is None or f in factor_axes or used & set(mesh_axes)
                    or size == 0):  # an empty axis has nothing to split or combine
                continue
            n = _size(mesh, mesh_axes)
            if f in self.rule.whole:
                splits = {g: _size(mesh, ms) for g, ms in factor_axes.items()}
                handler = next((
                    c for c in self.rule.collectives
                    if c.factor == f and not any(u in first for u in c.unless_split)
                    and not any(sizes.get(g, 0) % n for g in c.divides)
                    and (c.applies is None or c.applies(sizes, splits, n))), None)
                if handler is None or collective is not None or size % n:
                    if report:
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
        return self._result_shardings(mesh, plan, self._kept_splits(mesh, plan, arg_shapes))

    def _kept_splits(self, mesh, plan: _Plan, arg_shapes) -> list[dict[int, tuple[str, ...]]]:
        """Per gradient result: {axis: mesh axes} of its operand's splits the plan gathered.

        The blocks are the same on every device along mesh axes the plan leaves unused, so each
        keeps its own slice of such a gradient: the operand's placement, and a sum over the
        other mesh axes of that slice alone (a gathered weight's gradient is reduced in pieces,
        not whole).
        """
        if self.gradient_of is None:
            return [{} for _ in self.results]
        used = {m for ms in plan.factor_axes.values() for m in ms}
        out = []
        for axes, j in zip(self.results, self.gradient_of):
            shape = arg_shapes[j]
            keep = {}
            for k, (a, size, mesh_axes) in enumerate(zip(
                    axes, shape.shape, _named_spec(shape.sharding, len(axes)))):
                if (len(a) == 1 and a[0] not in plan.factor_axes and mesh_axes
                        and not used & set(mesh_axes) and size % _size(mesh, mesh_axes) == 0):
                    keep[k] = mesh_axes
            out.append(keep)
        return out

    def _result_shardings(self, mesh, plan: _Plan, kept) -> tuple:
        out = []
        for a, keep in zip(self.results, kept):
            # A forward result lacking a split factor would be a partial sum we cannot complete
            # (the kernel is not linear in it); rules name every free factor in the results.
            spec = list(plan.spec(a))
            for k, mesh_axes in keep.items():
                spec[k] = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
            out.append(NamedSharding(mesh, P(*spec)))
        return tuple(out)

    def _partition(self, mesh, arg_shapes, result_shape):
        plan = self._plan(mesh, arg_shapes)
        arg_shardings = self._shardings(mesh, plan, self.operands)
        kept = self._kept_splits(mesh, plan, arg_shapes)
        result_shardings = self._result_shardings(mesh, plan, kept)
        sums = [plan.missing(a) for a in self.results] if self.backward else None
        collective, factor_axes = plan.collective, plan.factor_axes

        axes = None if collective is None else factor_axes[collective.factor]
        handler = None
        if collective is not None:
            # whether the forward, planning on the same operands, ran this collective too
            ran = True
            if self.backward:
                before = self._plan(mesh, arg_shapes[:self.primals],
                                    self.operands[:self.primals], report=False)
                ran = (before.collective is collective
                       and before.factor_axes.get(collective.factor) == axes)
            handler = _Handler(collective, axes, _size(mesh, axes), ran)
        # the blocks `local` returns: before a kept split's own slice is taken
        local_shapes = [jax.ShapeDtypeStruct(NamedSharding(mesh, plan.spec(a)).shard_shape(
            r.shape), r.dtype) for a, r in zip(self.results, self.result_shapes)]

        def lower(*arrays):
            results = list(self.local(handler, local_shapes, *arrays))
            for i, keep in enumerate(kept):
                for k, mesh_axes in keep.items():
                    results[i] = _own_slice(results[i], k, mesh, mesh_axes)
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


def _own_slice(x, axis: int, mesh, mesh_axes):
    """This device's block of `x` (the same on every device along `mesh_axes`) along `axis`."""
    index = 0
    for m in mesh_axes:  # the linear position along the axes, the first one major
        index = index * mesh.shape[m] + jax.lax.axis_index(m)
    size = x.shape[axis] // _size(mesh, mesh_axes)
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


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
    # The partitioners call the local functions when the program is compiled, outside the
    # op's call: they run under the kernel choice (platform, interpret mode) of the call, and
    # trace kernels as opaque stand-ins if the call did.
    choice, opaque = _target.current(), compat.opaque()
    with without_explicit_mesh():
        out_shapes = jax.eval_shape(lambda *a: bound.call(fn, a), *bound.abstract())
        key = (name, implementation, bound.key, choice, opaque)
        if key not in _residuals.layouts:
            _residuals.layouts[key] = _residuals.infer(
                bound, fn, diff, [_axes_of(d) for d in operand_dims], rule)
        residuals = _residuals.layouts[key]
        # what each collective keeps for its backward: slots after the kernel's residuals
        kept = [() if c.saves is None else tuple(bound.call(c.saves, bound.abstract()))
                for c in rule.collectives]
    out_tree = jax.tree_util.tree_structure(out_shapes)
    out_shapes = jax.tree_util.tree_leaves(out_shapes)
    n_out = len(out_shapes)
    # forward results: the op's, then the saved residuals (the kernel's, then each collective's
    # slots) and a code saying which hold: 0 none (the backward runs the forward again), 1 the
    # kernel's, 2 + i those of collective i; slots that do not hold are zeros
    n_kernel = len(residuals.dims) if residuals else 0
    saved_dims = list(residuals.dims) if residuals else []
    saved_shapes = list(residuals.shapes) if residuals else []
    slots = []  # per collective: the range of its slots
    for own in kept:
        slots.append(range(len(saved_dims), len(saved_dims) + len(own)))
        saved_dims += [dims for dims, _ in own]
        saved_shapes += [shape for _, shape in own]
    coded = residuals is not None or any(kept)
    code = [jax.ShapeDtypeStruct((), jnp.int32)] if coded else []
    uses_results = any(c.reads_results for c in rule.collectives) or (
        residuals is not None and any(k[0] == "result" for k in residuals.kinds))

    def index_of(collective):
        return next(i for i, c in enumerate(rule.collectives) if c is collective)

    def forward_local(handler, expected, *local):
        with _target.using(choice), compat.keeping_opaque(opaque):
            want = expected[n_out:n_out + len(saved_shapes)]
            fill, which = [None] * len(want), 0
            if handler is not None:
                collective, axes, shards, _ = handler
                outs = bound.call(functools.partial(collective.forward, axes, shards), local)
                if collective.saves is not None:
                    outs, own = outs
                    i = index_of(collective)
                    if _same_shapes(own, [want[k] for k in slots[i]]):
                        for k, a in zip(slots[i], own):
                            fill[k] = a
                        which = 2 + i
                outs = jax.tree_util.tree_leaves(outs)
            elif residuals is not None:
                outs, leaves, _ = _residuals.vjp(bound, fn, diff, list(local))
                if _fits(local, want[:n_kernel]):
                    saved = [leaves[i] for i, k in enumerate(residuals.kinds) if k[0] == "saved"]
                    fill[:n_kernel], which = saved, 1
            else:
                outs = jax.tree_util.tree_leaves(bound.call(fn, local))
            if not coded:
                return outs
            return list(outs) + [jnp.zeros(w.shape, w.dtype) if a is None else a
                                 for a, w in zip(fill, want)] + [jnp.array(which, jnp.int32)]

    def _fits(local, saved):
        """Whether these blocks' residuals are those of the layout, saved ones of these shapes."""
        kinds, shapes = _residuals.classify(bound, fn, diff, [
            jax.ShapeDtypeStruct(a.shape, a.dtype) for a in local])
        return kinds == residuals.kinds and _same_shapes(shapes, saved)

    def backward_local(handler, expected, *local):
        with _target.using(choice), compat.keeping_opaque(opaque):
            primals, rest = list(local[:n]), list(local[n:])
            results = rest[:n_out] if uses_results else None
            rest = rest[n_out:] if uses_results else rest
            saved, rest = rest[:len(saved_shapes)], rest[len(saved_shapes):]
            which, cotangents = (rest[0], rest[1:]) if coded else (None, rest)
            if handler is not None:
                collective, axes, shards, in_forward = handler
                backward = functools.partial(collective.backward, axes, shards, cotangents)
                if collective.saves is None:
                    return list(bound.call(backward, primals))
                if not in_forward:  # its slots hold zeros: the backward runs the forward again
                    return _rerun_collective(bound, backward, primals)
                # Chosen when tracing (XLA does not drop a conditional holding collectives): the
                # forward planned the same on the same operands. Should it ever not have run it
                # after all, its slots read NaN rather than zeros: loud, never silently wrong.
                i = index_of(collective)
                own = tuple(jnp.where(which == 2 + i, saved[k], jnp.nan)
                            if jnp.issubdtype(saved[k].dtype, jnp.inexact) else saved[k]
                            for k in slots[i])
                mine = tuple(results) if collective.reads_results else ()
                return list(bound.call(functools.partial(backward, (mine, own)), primals))
            recompute = lambda: _recomputed_vjp(bound, fn, diff, primals, cotangents)  # noqa: E731
            if residuals is None or not _fits(primals, saved[:n_kernel]):
                return recompute()
            # traced again only for its structure: the recomputed residuals are dead code
            _, fresh, treedef = _residuals.vjp(bound, fn, diff, primals)

            def from_saved():
                leaves = []
                for kind, leaf in zip(residuals.kinds, fresh):
                    if kind[0] == "operand":
                        leaves.append(primals[kind[1]])
                    elif kind[0] == "result":
                        leaves.append(results[kind[1]])
                    elif kind[0] == "view":
                        leaves.append(primals[kind[1]].reshape(leaf.shape).astype(kind[2]))
                    else:
                        leaves.append(saved[kind[1]])
                return list(jax.tree_util.tree_unflatten(treedef, leaves)(list(cotangents)))

            return jax.lax.cond(which == 1, from_saved, recompute)

    forward = _Partitioned(name, forward_local, operand_dims, list(rule.results) + saved_dims
                           + ([""] if coded else []), rule, backward=False,
                           result_shapes=out_shapes + saved_shapes + code)
    backward = _Partitioned(
        f"{name} (backward)", backward_local,
        operand_dims + (list(rule.results) if uses_results else []) + saved_dims
        + ([""] if coded else []) + list(rule.results),
        [operand_dims[j] for j in diff], rule, backward=True,
        result_shapes=[jax.ShapeDtypeStruct(arrays[j].shape, arrays[j].dtype) for j in diff],
        gradient_of=list(diff), primals=n)

    @jax.custom_vjp
    def run(*arrays):
        return forward(*arrays)[:n_out]

    def run_fwd(*arrays):
        outs = forward(*arrays)
        return outs[:n_out], (arrays, outs[:n_out] if uses_results else (), outs[n_out:])

    def run_bwd(res, cotangents):
        arrays, results, saved = res
        grads = backward(*arrays, *results, *saved, *cotangents)
        grads = iter(_placed_like(grads, [arrays[j] for j in diff]))
        return tuple(next(grads) if j in diff else None for j in range(n))

    run.defvjp(run_fwd, run_bwd)
    return jax.tree_util.tree_unflatten(out_tree, list(run(*arrays)))


def _rerun_collective(bound, backward, primals):
    """A collective's backward that runs its forward again (it was given nothing saved)."""
    return list(bound.call(functools.partial(backward, None), primals))


def _same_shapes(arrays, like) -> bool:
    return [(a.shape, jnp.dtype(a.dtype)) for a in arrays] == [
        (b.shape, jnp.dtype(b.dtype)) for b in like]


def _recomputed_vjp(bound, fn, diff, primals, cotangents):
    """The kernel's VJP with its forward run again on the primals."""
    _, leaves, treedef = _residuals.vjp(bound, fn, diff, primals)
    return list(jax.tree_util.tree_unflatten(treedef, leaves)(list(cotangents)))


def wanted() -> bool:
    """Whether wrapping can matter: more than one device is visible."""
    return jax.device_count() > 1
