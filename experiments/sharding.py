"""Placements of a model's parameters and batch on a device mesh, and what a compiled program
spends on collectives.

`placement_shardings(kind, mesh, params, batch)` gives NamedShardings for three layouts:

- "data": the batch split over every mesh axis, parameters replicated;
- "tensor": the batch split over "data", every matrix's last axis over "model" (Megatron-style
  column split; the language-model head splits its vocabulary);
- "fsdp": the batch split over every mesh axis, every parameter's first axis too (ZeRO-3 style).

An axis that does not divide by the mesh axes' size stays replicated. `collective_bytes(text)`
sums the result sizes of the collectives in an HLO module's text (`compiled.as_text()`): what
one device sends or receives per step, to within the algorithm's constant.
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments import measure

PLACEMENTS = ("data", "tensor", "fsdp")

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "all-reduce-start", "all-gather-start", "collective-permute-start")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_INSTRUCTION = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(_COLLECTIVES) + r")\(")
_COMMENT = re.compile(r"/\*.*?\*/")  # long tuples carry /*index=5*/ markers
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def parse_mesh(text: str) -> dict[str, int]:
    """"data=4,model=2" -> {"data": 4, "model": 2}."""
    axes = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not name or not size.isdigit():
            raise ValueError(f"--mesh takes NAME=SIZE[,NAME=SIZE...]; got {text!r}")
        axes[name.strip()] = int(size)
    return axes


def make_mesh(axes: dict[str, int]) -> Mesh:
    n = math.prod(axes.values())
    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(f"the mesh {axes} needs {n} devices; {len(devices)} are visible (on a "
                         f"CPU, --host-devices {n} simulates them)")
    return Mesh(np.array(devices[:n]).reshape(tuple(axes.values())), tuple(axes))


def _fits(size: int, mesh: Mesh, axes) -> bool:
    names = axes if isinstance(axes, tuple) else (axes,)
    n = math.prod(mesh.shape[a] for a in names)
    return n > 1 and size % n == 0


def _spec(shape, axis: int, mesh: Mesh, axes) -> P:
    if not shape or not _fits(shape[axis], mesh, axes):
        return P()
    parts = [None] * len(shape)
    parts[axis] = axes
    return P(*parts)


def _all_axes(mesh: Mesh):
    return tuple(mesh.axis_names) if len(mesh.axis_names) > 1 else mesh.axis_names[0]


def param_spec(kind: str, mesh: Mesh, shape) -> P:
    if kind == "tensor" and len(shape) == 2 and "model" in mesh.axis_names:
        return _spec(shape, 1, mesh, "model")
    if kind == "fsdp":
        return _spec(shape, 0, mesh, _all_axes(mesh))
    return P()


def batch_spec(kind: str, mesh: Mesh, shape) -> P:
    axes = "data" if kind == "tensor" and "data" in mesh.axis_names else _all_axes(mesh)
    return _spec(shape, 0, mesh, axes)


def placement_shardings(kind: str, mesh: Mesh, params, batch):
    """(param shardings, batch shardings), trees like `params` and `batch`."""
    if kind not in PLACEMENTS:
        raise ValueError(f"unknown placement {kind!r}; expected one of {PLACEMENTS}")
    ps = jax.tree.map(lambda x: NamedSharding(mesh, param_spec(kind, mesh, x.shape)), params)
    bs = jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(kind, mesh, x.shape)), batch)
    return ps, bs


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]")
_MESH_AXES = re.compile(r"\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_LISTED_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")


def _group_size(line: str, num_devices: int) -> int:
    """How many devices take part in each group of a collective's HLO line: `mesh[a=4,b=2]`
    (optionally `, device_ids=(...)`) then the grouped axes `{'b'}`, or `[groups,size]<=[...]`,
    or listed groups `{{0,1},...}`; all devices when the line names no groups."""
    m = _MESH_GROUPS.search(line)
    if m:
        sizes = {k.strip().strip("'"): int(v) for k, v in
                 (item.split("=") for item in m.group(1).split(",") if "=" in item)}
        rest = line[m.end():]
        if rest.startswith(", device_ids="):  # skip its balanced parentheses
            depth, i = 0, len(", device_ids=")
            for i in range(i, len(rest)):
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                if depth == 0:
                    break
            rest = rest[i + 1:]
        axes = _MESH_AXES.match(rest)
        names = ([a.strip().strip("'") for a in axes.group(1).split(",") if a.strip()]
                 if axes else list(sizes))
        return math.prod(sizes[a] for a in names)
    m = _IOTA_GROUPS.search(line)
    if m:
        return int(m.group(2))
    m = _LISTED_GROUPS.search(line)
    if m:
        return len([d for d in m.group(1).split(",") if d])
    return num_devices


def _collectives(hlo_text: str, num_devices: int):
    """(op, result shapes text, bytes of its results, devices per group) of every collective in
    an HLO module's text. Asynchronous starts return their operands with their results; only
    the results are counted."""
    for line in hlo_text.splitlines():
        line = _COMMENT.sub("", line)
        m = _INSTRUCTION.search(line)
        if not m:
            continue
        op, shapes = m.group(2), _SHAPE.findall(m.group(1))
        if op == "all-gather-start":
            shapes = shapes[len(shapes) // 2:]
        elif op == "collective-permute-start":
            shapes = shapes[1:2]
        nbytes = sum(_DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
                     for dtype, dims in shapes)
        group = 1 if op.startswith("collective-permute") else _group_size(line, num_devices)
        yield op.removesuffix("-start"), shapes, nbytes, group


def collective_bytes(hlo_text: str) -> int:
    """Bytes of the results of every collective in an HLO module's text (per device)."""
    return sum(nbytes for _, _, nbytes, _ in _collectives(hlo_text, 1))


def wire_bytes(hlo_text: str, num_devices: int) -> int:
    """Bytes each device sends for the collectives of an HLO module's text, by the
    bandwidth-optimal (ring) algorithms, as NCCL's bus bandwidth counts them: an all-reduce of S
    bytes over n devices sends 2 (n-1)/n S, an all-gather to S bytes or an all-to-all of S bytes
    (n-1)/n S, a reduce-scatter to S bytes (n-1) S, a collective permute S.

    Unlike `collective_bytes`, this weighs an all-reduce twice an all-gather of the same size,
    as the network sees them."""
    total = 0.0
    for op, _, nbytes, n in _collectives(hlo_text, num_devices):
        if op == "all-reduce":
            total += 2 * (n - 1) / n * nbytes
        elif op in ("all-gather", "all-to-all"):
            total += (n - 1) / n * nbytes
        elif op == "reduce-scatter":
            total += (n - 1) * nbytes
        else:
            total += nbytes
    return int(round(total))


def scalar_collectives(hlo_text: str) -> int:
    """Collectives whose results are all scalars (a predicate or a loss made the same on every
    device): each is a point where devices wait on each other for a few bytes."""
    return sum(all(dims == "" for _, dims in shapes)
               for _, shapes, _, _ in _collectives(hlo_text, 1))


def compiled_costs(compiled, num_devices: int | None = None) -> dict:
    """Collective bytes (results, and sent over the wire), scalar collectives and temporary
    memory of a compiled executable, per device. `num_devices`: the devices of a collective
    whose line names no groups (default: every device JAX sees)."""
    analysis = compiled.memory_analysis()
    text = compiled.as_text()
    return {"collective_bytes": collective_bytes(text),
            "wire_bytes": wire_bytes(text, num_devices or jax.device_count()),
            "scalar_collectives": scalar_collectives(text),
            "temp_memory_bytes": None if analysis is None else int(analysis.temp_size_in_bytes)}


# -- baseline against optimized on a mesh ----------------------------------------------------------

def _step(loss_fn, param_shardings, batch_shardings):
    """The train gradient under jit, parameters' gradients placed like the parameters."""
    return jax.jit(jax.value_and_grad(loss_fn), in_shardings=(param_shardings, batch_shardings),
                   out_shardings=(None, param_shardings))


def compare(model: str, kind: str, mesh: Mesh, *, implementation=None, batch: int = 8,
            steps: int = 3) -> dict:
    """Compiled costs, step time and results of the original and the optimized train gradient.

    Returns {"baseline": {...}, "optimized": {...}, "results": [(l0, g0), (l1, g1)]}; each
    variant's record holds collective_bytes, wire_bytes, scalar_collectives, temp_memory_bytes
    (per device) and step_time_s. When the optimized program runs Pallas kernels on a CPU (Pallas's
    interpreter), "kernels_as_calls" holds the same costs of the optimized program traced again
    under `pallas_kernels.opaque_kernels()`: each kernel one opaque call, as a GPU or TPU
    compiles it, without the interpreter's loop that copies every operand of a kernel.
    """
    import time

    import models
    import passes

    spec = models.get(model)
    params = spec.init(jax.random.key(0))
    data = spec.batch(jax.random.key(1), batch)
    ps, bs = placement_shardings(kind, mesh, params, data)
    params, data = jax.device_put(params, ps), jax.device_put(data, bs)
    optimized = passes.optimize(spec.loss,
                                passes.default_pipeline(implementation=implementation))
    out = {}
    for name, loss_fn in (("baseline", spec.loss), ("optimized", optimized)):
        compiled = _step(loss_fn, ps, bs).lower(params, data).compile()
        result = jax.block_until_ready(compiled(params, data))
        start = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(compiled(params, data))
        record = compiled_costs(compiled, mesh.size)
        record["step_time_s"] = (time.perf_counter() - start) / steps
        record["output_shardings"] = compiled.output_shardings
        out[name] = record
        out.setdefault("results", []).append(result)
    if measure.interprets_kernels(implementation):
        import pallas_kernels

        with pallas_kernels.opaque_kernels():
            stand_ins = passes.optimize(spec.loss,
                                        passes.default_pipeline(implementation=implementation))
            compiled = _step(stand_ins, ps, bs).lower(params, data).compile()
        out["kernels_as_calls"] = compiled_costs(compiled, mesh.size)
    return out


def mesh_table(models_: tuple[str, ...], mesh: Mesh, implementations=(None, "pallas"),
               placements=PLACEMENTS, batch: int = 8, steps: int = 3) -> list[dict]:
    """One row per model, implementation and placement: baseline and optimized costs."""
    rows = []
    for model in models_:
        for impl in implementations:
            for kind in placements:
                r = compare(model, kind, mesh, implementation=impl, batch=batch, steps=steps)
                row = {"model": model, "implementation": impl or "default", "placement": kind}
                for variant in ("baseline", "optimized"):
                    for key in ("collective_bytes", "wire_bytes", "scalar_collectives",
                                "temp_memory_bytes", "step_time_s"):
                        row[f"{variant}_{key}"] = r[variant][key]
                for key, value in r.get("kernels_as_calls", {}).items():
                    row[f"kernels_as_calls_{key}"] = value
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    mb = lambda b: "n/a" if b is None else f"{b / 1e6:.2f}"  # noqa: E731
    as_calls = (f" (kernels as calls {mb(row['kernels_as_calls_temp_memory_bytes'])} MB)"
                if "kernels_as_calls_temp_memory_bytes" in row else "")
    return (f"{row['model']:<12} {row['implementation']:<8} {row['placement']:<7} "
            f"collectives {mb(row['baseline_collective_bytes'])} -> "
            f"{mb(row['optimized_collective_bytes'])} MB (sent {mb(row['baseline_wire_bytes'])} -> "
            f"{mb(row['optimized_wire_bytes'])} MB, scalar "
            f"{row['baseline_scalar_collectives']} -> {row['optimized_scalar_collectives']})   temp "
            f"{mb(row['baseline_temp_memory_bytes'])} -> {mb(row['optimized_temp_memory_bytes'])} MB"
            f"{as_calls}   step {row['baseline_step_time_s'] * 1e3:.1f} -> "
            f"{row['optimized_step_time_s'] * 1e3:.1f} ms")


def run_mesh(mesh_text: str, models_: tuple[str, ...], implementation=None, batch: int = 8,
             steps: int = 3) -> list[dict]:
    """`python -m experiments.run --mesh data=4,model=2`: every placement on that mesh."""
    mesh = make_mesh(parse_mesh(mesh_text))
    impls = (None, "pallas") if implementation is None else (implementation,)
    print(f"mesh {dict(mesh.shape)}, per-device costs of the train gradient, baseline -> "
          f"optimized", flush=True)
    return mesh_table(models_, mesh, impls, batch=batch, steps=steps)


def simulate_host_devices(n: int, argv) -> None:
    """Simulate `n` CPU devices for `python -m experiments.run argv`: XLA reads the flag once,
    when its backends start (importing the experiments already starts them), so the process
    runs itself again with the flag set, unless it is set already."""
    import os
    import sys

    flag = f"--xla_force_host_platform_device_count={n}"
    flags = os.environ.get("XLA_FLAGS", "")
    if flag in flags.split():
        return
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    env = dict(os.environ, XLA_FLAGS=f"{flags} {flag}".strip())
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "experiments.run", *argv], env)
