"""Choosing between implementations: pinning, CPU default, fallback, reasons, lowering checks,
measured selection on a (simulated) GPU with its JSON cache, and config tuning."""
from __future__ import annotations

import dataclasses
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import pallas_kernels
from pallas_kernels import _dispatch, _target, layer_norm
from pallas_kernels._dispatch import Op


def _double_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0


def unlowerable_pallas_double(x):
    """A kernel that traces but cannot be lowered here: compiled mode on a CPU."""
    return pl.pallas_call(_double_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          interpret=False, name="unlowerable_double")(x)


def make_op(name, impls, calls=None):
    """An Op whose implementations count their calls (traces) in `calls`."""
    op = Op(name)
    for impl, fn in impls.items():
        def counted(*args, _fn=fn, _impl=impl, **kwargs):
            if calls is not None:
                calls[_impl] = calls.get(_impl, 0) + 1
            return _fn(*args, **kwargs)
        op.register(impl)(counted)
    return op


def refuse(reason):
    def fn(*args, **kwargs):
        raise NotImplementedError(reason)
    return fn


def test_pinned_implementation_never_falls_back():
    calls = {}
    op = make_op("pinned", {"pallas": refuse("blocks too small"), "xla": lambda x: x * 3.0}, calls)
    with pytest.raises(NotImplementedError, match="pallas: blocks too small"):
        op(jnp.ones(4), implementation="pallas")
    assert calls == {"pallas": 1}


def test_none_on_cpu_is_xla():
    calls = {}
    op = make_op("cpu_default", {"pallas": lambda x: x * 2.0, "xla": lambda x: x * 3.0}, calls)
    op.chooser = lambda *_: ["pallas", "xla"]  # a GPU chooser is not consulted on a CPU
    np.testing.assert_array_equal(op(jnp.ones(4)), 3.0)
    assert calls == {"xla": 1}


def test_list_falls_back_in_order_and_error_lists_every_reason():
    op = make_op("all_refuse", {"pallas": refuse("head_dim 512 too large"),
                                "xla": refuse("needs 3 axes")})
    with pytest.raises(NotImplementedError) as info:
        op(jnp.ones(4), implementation=["pallas", "cudnn", "xla"])
    message = str(info.value)
    assert "all_refuse: no implementation could handle this call" in message
    assert "pallas: head_dim 512 too large" in message
    assert "cudnn: all_refuse has no 'cudnn' implementation" in message
    assert "xla: needs 3 axes" in message

    op = make_op("second_works", {"pallas": refuse("no"), "xla": lambda x: x + 1.0})
    np.testing.assert_array_equal(op(jnp.ones(4), implementation=["pallas", "xla"]), 2.0)


def test_unknown_names_are_rejected():
    op = make_op("names", {"xla": lambda x: x})
    with pytest.raises(ValueError, match=r"unknown implementation 'triton'; expected None or one"):
        op(jnp.ones(2), implementation="triton")
    with pytest.raises(ValueError, match=r"implementation=\[\] names nothing"):
        op(jnp.ones(2), implementation=[])
    with pytest.raises(ValueError, match="unknown implementation 'mosaic'"):
        op.register("mosaic")


def _op_docstring_example() -> dict:
    """Run the example in `pallas_kernels.Op`'s docstring; return the names it defines."""
    doc = textwrap.dedent(pallas_kernels.Op.__doc__.split("\n", 1)[1])
    block = doc.split("\n\n", 1)[1].split("\n\nImplementations are named", 1)[0]
    namespace = {}
    exec(textwrap.dedent(block), namespace)
    return namespace


def test_op_is_public_and_its_docstring_example_registers_a_users_kernel():
    assert "Op" in pallas_kernels.__all__ and pallas_kernels.Op is Op
    example = _op_docstring_example()
    scale, x = example["scale"], jnp.arange(4.0)
    np.testing.assert_array_equal(example["y"], 2.0 * x)
    assert list(scale.impls) == ["pallas", "xla"] and "pallas" in scale.checked

    pinned = jax.make_jaxpr(lambda x: scale(x, factor=3.0, implementation="pallas"))(x)
    assert "pallas_call" in str(pinned)
    np.testing.assert_array_equal(scale(x, factor=3.0, implementation="pallas"), 3.0 * x)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: scale(x, factor=3.0))(x))

    matrix = jnp.ones((2, 3))
    with pytest.raises(NotImplementedError, match="pallas: the kernel takes vectors"):
        scale(matrix, factor=2.0, implementation="pallas")
    fallback = jax.make_jaxpr(
        lambda m: scale(m, factor=2.0, implementation=["pallas", "xla"]))(matrix)
    assert "pallas_call" not in str(fallback)
    np.testing.assert_array_equal(scale(matrix, factor=2.0, implementation=["pallas", "xla"]),
                                  2.0 * matrix)
    with pytest.raises(ValueError, match="unknown implementation 'mine'"):
        scale.register("mine")


def test_lowering_failure_falls_back_with_the_compilers_message():
    calls = {}
    op = make_op("injected", {"pallas": unlowerable_pallas_double, "xla": lambda x: x * 2.0},
                 calls)
    x = jnp.arange(8.0)
    # Inside the caller's jit the failure would only surface when the whole program is compiled;
    # the lowering check turns it into a fallback at trace time.
    out = jax.jit(lambda x: op(x, implementation=["pallas", "xla"]))(x)
    np.testing.assert_array_equal(out, x * 2.0)
    traced_for_check = calls["pallas"]
    with pytest.raises(NotImplementedError, match="Only interpret mode is supported on CPU"):
        op(x, implementation="pallas")
    # The verdict is cached per signature: the failing kernel is not traced again.
    np.testing.assert_array_equal(op(x, implementation=["pallas", "xla"]), x * 2.0)
    assert calls["pallas"] == traced_for_check
    # A new shape is checked afresh.
    op(jnp.ones(3), implementation=["pallas", "xla"])
    assert calls["pallas"] > traced_for_check


def test_real_kernel_that_fails_to_lower_falls_back(monkeypatch):
    # Make the (Triton) LayerNorm kernels build for compiled mode on this CPU: they trace, then
    # fail to lower, as a kernel broken by a JAX upgrade would. platform="cpu" picks them whatever
    # PALLAS_KERNELS_PLATFORM says (Mosaic kernels built for compiled mode lower from a CPU).
    import sys
    monkeypatch.setattr(sys.modules["pallas_kernels.layer_norm.triton"], "interpret_mode",
                        lambda: False)
    _dispatch.clear_caches()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 11)), jnp.float32)
    try:
        out = layer_norm(x, implementation=["pallas", "xla"], platform="cpu")
        np.testing.assert_allclose(out, layer_norm(x, implementation="xla"), rtol=1e-6)
        with pytest.raises(NotImplementedError, match="pallas: failed to lower"):
            layer_norm(x, implementation="pallas", platform="cpu")
    finally:
        _dispatch.clear_caches()


def test_lowering_check_covers_the_backward():
    @jax.custom_vjp
    def broken_backward(x):
        return x * 2.0

    broken_backward.defvjp(lambda x: (x * 2.0, None),
                           lambda _, ct: (unlowerable_pallas_double(ct),))
    op = make_op("bwd_injected", {"pallas": broken_backward, "xla": lambda x: x * 2.0})
    grad = jax.grad(lambda x: jnp.sum(op(x, implementation=["pallas", "xla"]) ** 2))(jnp.ones(4))
    np.testing.assert_array_equal(grad, 8.0)
    with pytest.raises(NotImplementedError, match="Only interpret mode"):
        op(jnp.ones(4), implementation="pallas")


def slow_double(x):
    """2x, the long way: enough matmul work to be measurably slower than `x * 2`."""
    m = jnp.eye(128) + 1e-3
    start = jnp.ones((128, 128)) * jnp.mean(x)  # depends on x: no constant folding
    acc = jax.lax.fori_loop(0, 10, lambda i, a: jnp.tanh(a @ m), start)
    return x * 2.0 + 0.0 * jnp.sum(acc)


@pytest.fixture
def simulated_gpu(monkeypatch, tmp_path):
    """Pretend the backend is a GPU (selection by timing), with the JSON cache in tmp_path."""
    path = tmp_path / "timings.json"
    monkeypatch.setenv("PALLAS_KERNELS_CACHE", str(path))
    monkeypatch.setattr(_dispatch, "_platform", lambda: "gpu")
    monkeypatch.setattr(_target, "host_platform", lambda: "gpu")
    monkeypatch.delenv("PALLAS_KERNELS_PLATFORM", raising=False)
    timed = []  # one entry per completed timing
    real_time_call = _dispatch.time_call

    def counted_time_call(fn, arrays, **kwargs):
        seconds = real_time_call(fn, arrays, **kwargs)
        timed.append(seconds)
        return seconds

    monkeypatch.setattr(_dispatch, "time_call", counted_time_call)
    yield path, timed
    _dispatch.clear_caches()


def test_gpu_choice_is_measured_and_cached(simulated_gpu):
    path, timed = simulated_gpu
    fast_pallas = make_op("fast_pallas", {"pallas": lambda x: x * 2.0, "xla": slow_double,
                                          "cudnn": refuse("no cuDNN here")})
    slow_pallas = make_op("slow_pallas", {"pallas": slow_double, "xla": lambda x: x * 2.0})
    x = jnp.ones((4, 8))

    assert _dispatch.measured_order(fast_pallas, (x,), {}) == ["pallas", "xla"]
    assert _dispatch.measured_order(slow_pallas, (x,), {}) == ["xla", "pallas"]
    assert len(timed) == 4  # each op's two implementations that run; cudnn declined

    cache = json.loads(path.read_text())
    (key,) = [k for k in cache if "| fast_pallas |" in k]
    assert jax.devices()[0].device_kind in key and "float32[4, 8]" in key
    entry = cache[key]
    assert entry["order"] == ["pallas", "xla"]
    assert entry["ms"]["pallas"] < entry["ms"]["xla"]
    assert "no cuDNN here" in entry["declined"]["cudnn"]

    # Later calls, even inside a jit, read the cache instead of timing again.
    out = jax.jit(lambda x: fast_pallas(x) + slow_pallas(x))(x)
    np.testing.assert_allclose(out, 4.0)
    assert len(timed) == 4


def test_gpu_choice_can_be_made_under_a_trace(simulated_gpu):
    _, timed = simulated_gpu
    op = make_op("traced_choice", {"pallas": slow_double, "xla": lambda x: x * 2.0})
    out = jax.jit(lambda x: op(x) * 1.0)(jnp.ones(5))
    np.testing.assert_allclose(out, 2.0)
    assert len(timed) == 2


def test_xla_is_always_a_candidate(simulated_gpu):
    path, _ = simulated_gpu
    op = make_op("xla_kept", {"pallas": lambda x: x * 2.0, "xla": lambda x: x * 2.0})
    x = jnp.ones(3)
    key = _dispatch._cache_key("xla_kept", _dispatch._BoundCall.of((x,), {}))
    path.write_text(json.dumps({key: {"order": ["pallas"], "ms": {"pallas": 1.0},
                                      "declined": {"xla": "stale"}}}))
    assert _dispatch.measured_order(op, (x,), {}) == ["pallas", "xla"]


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    rounds: int


def toy_run(x, *, config):
    if config.rounds < 0:
        raise NotImplementedError("a negative number of rounds")
    m = jnp.eye(128) + 1e-3
    start = jnp.ones((128, 128)) * jnp.mean(x)  # depends on x: no constant folding
    acc = jax.lax.fori_loop(0, config.rounds, lambda i, a: jnp.tanh(a @ m), start)
    return x + 0.0 * jnp.sum(acc)


def test_tuned_config_times_the_space_and_caches_the_winner(simulated_gpu):
    path, timed = simulated_gpu
    x = jnp.ones(6)
    space = [ToyConfig(20), ToyConfig(-1), ToyConfig(1), ToyConfig(10)]
    best = _dispatch.tuned_config("toy/pallas", toy_run, (x,), {}, space, ToyConfig(99))
    assert best == ToyConfig(1)
    assert len(timed) == 3  # the failing config is skipped
    assert _dispatch.tuned_config("toy/pallas", toy_run, (x,), {}, space, ToyConfig(99)) == best
    assert len(timed) == 3
    (entry,) = [v for k, v in json.loads(path.read_text()).items() if "toy/pallas config" in k]
    assert entry["config"] == {"rounds": 1} and len(entry["ms"]) == 3
    assert "a negative number of rounds" in entry["failed"]["ToyConfig(rounds=-1)"]


def test_tuned_config_is_the_heuristic_on_cpu():
    assert _dispatch.tuned_config("toy/pallas", toy_run, (jnp.ones(2),), {},
                                  [ToyConfig(1)], ToyConfig(7)) == ToyConfig(7)


def test_tuned_config_is_the_heuristic_when_lowering_for_an_absent_platform(monkeypatch):
    # Exporting for a GPU from a CPU host (kernels lowered, not interpreted): nothing can be
    # timed, so no config is tried.
    tried = []

    def run(x, *, config):
        tried.append(config)
        return toy_run(x, config=config)

    choice = _target.KernelChoice.of("pallas", "gpu", interpret=False)
    with _target.using(choice):
        assert not choice.on_host and not _dispatch.interpret_mode()
        assert _dispatch.tuned_config("toy/pallas", run, (jnp.ones(2),), {},
                                      [ToyConfig(1), ToyConfig(2)], ToyConfig(7)) == ToyConfig(7)
    assert tried == []


def test_unwritable_cache_warns_and_keeps_the_choice_in_memory(simulated_gpu, monkeypatch,
                                                                tmp_path):
    _, timed = simulated_gpu
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    monkeypatch.setenv("PALLAS_KERNELS_CACHE", str(blocker / "timings.json"))
    op = make_op("unwritable", {"pallas": slow_double, "xla": lambda x: x * 2.0})
    with pytest.warns(UserWarning, match="could not write the timing cache"):
        assert _dispatch.measured_order(op, (jnp.ones(3),), {}) == ["xla", "pallas"]
    assert _dispatch.measured_order(op, (jnp.ones(3),), {}) == ["xla", "pallas"]
    assert len(timed) == 2


# -- opaque kernels: the memory of a program as compiled kernels would have it ------------------

def _interpreted_and_opaque(f, *args):
    """f's program compiled with interpreted kernels, then with kernels as opaque calls."""
    interpreted = jax.jit(f).lower(*args).compile()
    with pallas_kernels.opaque_kernels():
        opaque = jax.jit(f).lower(*args).compile()
    return interpreted, opaque


def test_opaque_kernels_drop_the_interpreters_copies_and_refuse_to_run():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((512, 256)), jnp.float32)
    g, b = jnp.asarray(rng.standard_normal(256), jnp.float32), jnp.zeros(256, jnp.float32)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 64, 4, 32)), jnp.float32) for _ in range(3))

    def loss(x, g, b, q, k, v):
        y = layer_norm(x, g, b, implementation="pallas")
        o = pallas_kernels.attention(q, k, v, causal=True, implementation="pallas")
        return jnp.sum(y ** 2) + jnp.sum(o ** 2)

    f = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))
    args = (x, g, b, q, k, v)
    interpreted, opaque = _interpreted_and_opaque(f, *args)
    # The interpreter runs each kernel as a loop over its grid; the stand-ins have none, and
    # without the loop's copies of every operand the program holds less.
    assert " while(" in interpreted.as_text() and " while(" not in opaque.as_text()
    assert (opaque.memory_analysis().temp_size_in_bytes
            < interpreted.memory_analysis().temp_size_in_bytes)
    with pytest.raises(Exception, match="opaque_kernels"):
        jax.block_until_ready(opaque(*args))

    # Leaving the context, the same function traces the real kernels again (no stand-in kept
    # in any cache): gradients equal the plain-XLA implementations' in float64.
    got = jax.jit(f)(*args)
    with jax.enable_x64(True):
        def reference(x, g, b, q, k, v):
            y = layer_norm(x, g, b, implementation="xla")
            o = pallas_kernels.attention(q, k, v, causal=True, implementation="xla")
            return jnp.sum(y ** 2) + jnp.sum(o ** 2)
        want = jax.grad(reference, argnums=(0, 1, 2, 3, 4, 5))(
            *[np.asarray(a, np.float64) for a in args])
    for a, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-4,
                                   atol=2e-4 * float(np.max(np.abs(w))))


def test_timing_inside_opaque_kernels_runs_the_real_kernels(simulated_gpu):
    path, timed = simulated_gpu

    def double(x):
        return pallas_kernels._pallas_compat.pallas_call(
            _double_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)

    pallas_double = jax.custom_vjp(double)  # timing runs forward and backward
    pallas_double.defvjp(lambda x: (double(x), None), lambda _, g: (double(g),))

    op = make_op("opaque_timed", {"pallas": pallas_double, "xla": slow_double})
    x = jnp.ones((4, 8))
    with pallas_kernels.opaque_kernels():
        jax.jit(lambda x: op(x)).lower(x).compile()
    (entry,) = [e for k, e in json.loads(path.read_text()).items() if "| opaque_timed |" in k]
    assert sorted(entry["order"]) == ["pallas", "xla"] and not entry["declined"], entry
    assert len(timed) == 2
