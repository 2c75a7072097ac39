"""The sharded backward runs on the forward's residuals, not on a second forward.

The layout of each kernel's VJP residuals is inferred from how their shapes follow the operands'
(checked here per kernel); on 8 simulated devices the backward that would recompute the forward
is replaced by one returning NaN, so a gradient that is right (against float64) proves the saved
residuals were used, and one that is NaN proves a fallback ran. The same holds for the
collectives that run when a reduced axis is split: they keep what they completed.
"""
import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import numpy as np

import pallas_kernels as pk
from pallas_kernels import _residuals, _sharding, _target


@pytest.fixture
def layouts(monkeypatch):
    monkeypatch.setattr(_sharding, "wanted", lambda: True)
    _residuals.layouts.clear()
    yield lambda: {k[0]: v for k, v in _residuals.layouts.items()}
    _residuals.layouts.clear()


def test_residual_layouts_of_the_gpu_kernels(layouts):
    x, s = jnp.ones((2, 64, 128)), jnp.ones(128)
    q, k = jnp.ones((2, 64, 8, 32)), jnp.ones((2, 64, 2, 32))
    w, labels = jnp.ones((128, 512)), jnp.zeros((2, 64), jnp.int32)
    jax.eval_shape(lambda: (
        pk.layer_norm(x, s, s, implementation="pallas", platform="gpu"),
        pk.attention(q, k, k, causal=True, implementation="pallas", platform="gpu"),
        pk.dense_act(x, w, w[0], activation="gelu_tanh", implementation="pallas", platform="gpu"),
        pk.linear_cross_entropy(x, w, labels, implementation="pallas", platform="gpu")))
    found = layouts()
    # operands are not saved again; x flattened to rows is remade from x in the backward
    assert found["layer_norm"].kinds == (("operand", 1), ("operand", 2), ("view", 0, "float32"),
                                         ("saved", 0), ("saved", 1))
    assert found["layer_norm"].dims == ("a0*a1", "a0*a1")  # mean and rstd per flattened row
    # the output is the op's own result; the statistics follow batch, heads (g*r), queries
    assert found["attention"].kinds[:4] == (("operand", 0), ("operand", 1), ("operand", 2),
                                            ("result", 0))
    assert found["attention"].dims == ("b g*r q", "b g*r q")
    assert found["dense_act"].dims == ("a0*a1 o",)  # the pre-activation
    assert found["linear_cross_entropy"].dims == ("a0*a1", "a0*a1")
    shapes = [r.shape for r in found["attention"].shapes]
    assert shapes == [(2, 8, 64), (2, 8, 64)]


def test_padded_residuals_are_recomputed(layouts):
    # The TPU attention kernels keep statistics padded to whole tiles: no factor describes
    # them, so the sharded backward runs the forward again instead of guessing a layout.
    q = jnp.ones((2, 64, 4, 32))
    jax.eval_shape(lambda: pk.attention(q, q, q, implementation="pallas", platform="tpu"))
    assert layouts()["attention"] is None


SCRIPT = textwrap.dedent("""
    import functools, json, sys, warnings
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import pallas_kernels as pk
    from pallas_kernels import _sharding
    from pallas_kernels.attention.reference import attention_reference
    from pallas_kernels.layer_norm.reference import layer_norm_reference
    from pallas_kernels.dense_act.reference import dense_act_reference
    from pallas_kernels.linear_cross_entropy import linear_cross_entropy_reference
    from experiments import sharding as sh
    warnings.simplefilter("ignore")
    mesh = sh.make_mesh({"data": 4, "model": 2})
    rng = np.random.default_rng(0)
    arr = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)
    labels = rng.integers(0, 64, (8, 16)).astype(np.int32)

    def poisoned(bound, fn, diff, primals, cotangents):  # a second forward would give NaN
        return [jnp.full_like(primals[j], jnp.nan) for j in diff]

    def poisoned_collective(bound, backward, primals):  # so would a collective's
        return [jnp.full_like(primals[j], jnp.nan) for j in bound.differentiable()]

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))

    cases = {
        "layer_norm": (lambda x, s, b, impl: (pk.layer_norm(x, s, b, implementation=impl) if impl
                       else layer_norm_reference(x, s, b)),
                       [arr(8, 16, 32), arr(32), arr(32)], [P("data"), P(), P()]),
        "attention_heads_split": (
            lambda q, k, v, impl: (pk.attention(q, k, v, causal=True, implementation=impl) if impl
                                   else attention_reference(q, k, v, causal=True)),
            [arr(4, 32, 4, 32), arr(4, 32, 2, 32), arr(4, 32, 2, 32)], [P("data", None, "model")] * 3),
        "dense_columns": (lambda x, w, b, impl: (
            pk.dense_act(x, w, b, activation="gelu_tanh", implementation=impl) if impl
            else dense_act_reference(x, w, b, activation="gelu_tanh")),
            [arr(8, 16, 32), arr(32, 64), arr(64)], [P("data"), P(None, "model"), P("model")]),
        "linear_cross_entropy": (lambda x, w, impl: (
            pk.linear_cross_entropy(x, w, labels, implementation=impl) if impl
            else linear_cross_entropy_reference(x, w, labels)),
            [arr(8, 16, 32), arr(32, 64)], [P("data"), P()]),
        # split reduced axes: the collectives keep what they completed
        "layer_norm_features_split": (lambda x, s, b, impl: (
            pk.layer_norm(x, s, b, implementation=impl) if impl else layer_norm_reference(x, s, b)),
            [arr(8, 16, 32), arr(32), arr(32)], [P("data", None, "model"), P("model"), P("model")]),
        "linear_cross_entropy_vocab_split": (lambda x, w, impl: (
            pk.linear_cross_entropy(x, w, labels, implementation=impl) if impl
            else linear_cross_entropy_reference(x, w, labels)),
            [arr(8, 16, 32), arr(32, 64)], [P("data"), P(None, "model")]),
        "linear_cross_entropy_d_split": (lambda x, w, impl: (
            pk.linear_cross_entropy(x, w, labels, implementation=impl) if impl
            else linear_cross_entropy_reference(x, w, labels)),
            [arr(8, 16, 32), arr(32, 64)], [P("data"), P("model")]),
        "softmax_cross_entropy_vocab_split": (lambda z, impl: (
            pk.softmax_cross_entropy(z, labels, implementation=impl) if impl
            else jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, labels[..., None], -1)[..., 0]),
            [arr(8, 16, 64)], [P("data", None, "model")]),
        "dense_rows_split": (lambda x, w, b, impl: (
            pk.dense_act(x, w, b, activation="gelu_tanh", implementation=impl) if impl
            else dense_act_reference(x, w, b, activation="gelu_tanh")),
            [arr(8, 16, 32), arr(32, 64), arr(64)], [P("data", None, "model"), P("model"), P()]),
        "attention_sequence_split": (
            lambda q, k, v, impl: (pk.attention(q, k, v, causal=True, implementation=impl) if impl
                                   else attention_reference(q, k, v, causal=True)),
            [arr(2, 32, 4, 16), arr(2, 32, 2, 16), arr(2, 32, 2, 16)], [P(None, "model")] * 3),
        # rows flattened from (batch, sequence) with the sequence split: the saved statistics'
        # layout does not fit these blocks, so the backward runs the forward again
        "layer_norm_sequence_split": (lambda x, s, b, impl: (
            pk.layer_norm(x, s, b, implementation=impl) if impl else layer_norm_reference(x, s, b)),
            [arr(8, 16, 32), arr(32), arr(32)], [P("data", "model"), P(), P()]),
    }
    out = {}
    recompute, rerun = _sharding._recomputed_vjp, _sharding._rerun_collective
    for name, (f, args, specs) in cases.items():
        argnums = tuple(range(len(args)))
        def loss(*a, impl, f=f, absolute=False):
            y = f(*a, impl)
            terms = jnp.sin(y) * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / 5)
            return jnp.sum(jnp.abs(terms) if absolute else terms)
        jax.config.update("jax_enable_x64", True)
        l64, g64 = jax.value_and_grad(functools.partial(loss, impl=None), argnums=argnums)(
            *[a.astype(np.float64) for a in args])
        size64 = loss(*[a.astype(np.float64) for a in args], impl=None, absolute=True)
        jax.config.update("jax_enable_x64", False)
        for variant, fn, again in (("poisoned", poisoned, poisoned_collective),
                                   ("plain", recompute, rerun)):
            _sharding._recomputed_vjp, _sharding._rerun_collective = fn, again
            step = jax.jit(jax.value_and_grad(functools.partial(loss, impl="pallas"), argnums=argnums),
                           in_shardings=tuple(NamedSharding(mesh, s) for s in specs))
            l, g = step(*args)
            out[f"{name}_{variant}"] = dict(
                loss_rel=float(abs(l - l64) / size64), grad_rel=max(rel(a, b) for a, b in zip(g, g64)),
                nan=bool(any(np.isnan(np.asarray(a)).any() for a in g)))
    print("RESULT" + json.dumps(out))
""")


@functools.lru_cache(maxsize=None)
def _results() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-5000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("case", ["layer_norm", "attention_heads_split", "dense_columns",
                                  "linear_cross_entropy", "layer_norm_features_split",
                                  "linear_cross_entropy_vocab_split",
                                  "linear_cross_entropy_d_split",
                                  "softmax_cross_entropy_vocab_split", "dense_rows_split",
                                  "attention_sequence_split"])
def test_sharded_backward_uses_saved_residuals(case):
    for variant in ("poisoned", "plain"):
        r = _results()[f"{case}_{variant}"]
        assert not r["nan"] and r["loss_rel"] < 1e-5 and r["grad_rel"] < 1e-4, (variant, r)


def test_residuals_that_do_not_fit_the_blocks_are_recomputed():
    assert _results()["layer_norm_sequence_split_poisoned"]["nan"]
    r = _results()["layer_norm_sequence_split_plain"]
    assert not r["nan"] and r["loss_rel"] < 1e-5 and r["grad_rel"] < 1e-4, r


# Each collective's backward, given what its forward kept and given nothing (it then runs the
# forward again: the path taken should a backward ever plan differently from its forward), on
# two shards held as a named vmap axis, against float64.

_LAST = (lambda a: jnp.moveaxis(a.reshape(*a.shape[:-1], 2, -1), -2, 0),
         lambda a, shape: jnp.moveaxis(a, 0, -2).reshape(shape))
_FIRST = (lambda a: a.reshape(2, -1, *a.shape[1:]), lambda a, shape: a.reshape(shape))
def _same_on_both(a, shape):
    np.testing.assert_allclose(a[0], a[1], rtol=1e-6, atol=1e-7)  # replicated: shards agree
    return a[0]


_WHOLE = (lambda a: jnp.stack([a, a]), _same_on_both)


def _collective_cases():
    from pallas_kernels.dense_act import sharding as dense
    from pallas_kernels.layer_norm import sharding as norm
    from pallas_kernels.linear_cross_entropy import sharding as lce
    from pallas_kernels.softmax_cross_entropy import sharding as sce
    rng = np.random.default_rng(3)
    arr = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    labels = rng.integers(0, 64, (4, 8)).astype(np.int32)
    x, s, b, w = arr(4, 8, 32), arr(32), arr(32), arr(32, 64)

    def nll(z, y):
        return jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[..., None], -1)[..., 0]

    def layer_norm(x, s, b):
        return (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5) * s + b

    def rms_norm(x, s):
        return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * s

    # name: (collective, operands, their splits, the output's split, reference, kwargs)
    return {
        "layer_norm": (norm.LAYER_NORM_FEATURE_PARALLEL, [x, s, b], [_LAST] * 3, _LAST,
                       layer_norm, dict(eps=1e-5)),
        "rms_norm": (norm.RMS_NORM_FEATURE_PARALLEL, [x, s], [_LAST] * 2, _LAST, rms_norm,
                     dict(eps=1e-6)),
        "softmax_cross_entropy": (sce.VOCAB_PARALLEL, [arr(4, 8, 64), labels], [_LAST, _WHOLE],
                                  _WHOLE, nll, {}),
        "linear_cross_entropy_vocab": (lce.VOCAB_PARALLEL[0], [x, w, labels],
                                       [_WHOLE, _LAST, _WHOLE], _WHOLE,
                                       lambda x, w, y: nll(x @ w, y), dict(w_layout="dv")),
        "linear_cross_entropy_d": (lce.FEATURE_EXCHANGE[0], [x, w, labels],
                                   [_LAST, _FIRST, _WHOLE], _WHOLE,
                                   lambda x, w, y: nll(x @ w, y), dict(w_layout="dv")),
        "linear_cross_entropy_logits": (lce.PARTIAL_LOGITS[0], [x, w, labels],
                                        [_LAST, _FIRST, _WHOLE], _WHOLE,
                                        lambda x, w, y: nll(x @ w, y), dict(w_layout="dv")),
        "dense_act": (dense.DENSE_ROW_PARALLEL, [x, w, arr(64)], [_LAST, _FIRST, _WHOLE], _WHOLE,
                      lambda x, w, b: jax.nn.gelu(x @ w + b, approximate=True),
                      dict(activation="gelu_tanh")),
        "gated_dense": (dense.GATED_ROW_PARALLEL, [x, w, arr(32, 64)], [_LAST, _FIRST, _FIRST],
                        _WHOLE, lambda x, wg, wu: jax.nn.silu(x @ wg) * (x @ wu),
                        dict(activation="silu")),
    }


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "softmax_cross_entropy",
                                  "linear_cross_entropy_vocab", "linear_cross_entropy_d",
                                  "linear_cross_entropy_logits", "dense_act", "gated_dense"])
def test_collective_backward_with_and_without_what_the_forward_kept(name):
    collective, args, splits, out_split, reference, kwargs = _collective_cases()[name]
    floats = [j for j, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]
    blocks = [split(jnp.asarray(a)) for a, (split, _) in zip(args, splits)]
    with jax.enable_x64(True):
        args64 = [a.astype(np.float64) if j in floats else a for j, a in enumerate(args)]

        def of_floats(*f):
            return reference(*[f[floats.index(j)] if j in floats else a
                               for j, a in enumerate(args64)])

        want, vjp = jax.vjp(of_floats, *[args64[j] for j in floats])
        cot = np.cos(np.arange(want.size).reshape(want.shape) / 3)
        want_grads = vjp(cot)
    with _target.using(_target.KernelChoice.of("pallas", "gpu")):
        out, kept = jax.vmap(lambda *a: collective.forward("ring", 2, *a, **kwargs),
                             axis_name="ring")(*blocks)
        backward = jax.vmap(
            lambda saved, c, *a: collective.backward("ring", 2, (c,), saved, *a, **kwargs),
            axis_name="ring", in_axes=(0, 0, *[0] * len(blocks)))
        cots = out_split[0](jnp.asarray(cot, jnp.float32))
        with_kept = backward(((out,), kept), cots, *blocks)
        again = backward(None, cots, *blocks)
    np.testing.assert_allclose(out_split[1](out, want.shape), want, rtol=1e-5, atol=1e-5)
    for grads in (with_kept, again):
        for j, got, w in zip(floats, grads, want_grads):
            np.testing.assert_allclose(splits[j][1](got, w.shape), w, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{name}: gradient of operand {j}")


@pytest.mark.parametrize("vocab,d,want", [
    (512, 128, "logits"),       # gpt2-tiny "tensor": the weight as large as the logits
    (50304, 768, "exchange"),   # GPT-2 small, its vocabulary padded
    (50257, 768, "gather"),     # GPT-2 small's own vocabulary: no split divides it
])
def test_a_split_d_head_takes_the_plan_that_sends_least(vocab, d, want):
    # linear cross-entropy's plan for a tied embedding split on d over "model" (2 shards), 8 x
    # 1024 tokens (512 at gpt2-tiny's size) over "data" (4): what the partitioner would choose
    from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

    from pallas_kernels.linear_cross_entropy import sharding as lce
    mesh = AbstractMesh((4, 2), ("data", "model"))
    seq = 1024 if vocab > 512 else 64
    shapes = [((8, seq, d), jnp.float32, P("data")), ((vocab, d), jnp.float32, P(None, "model")),
              ((8, seq), jnp.int32, P("data"))]
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
            for shape, dtype, spec in shapes]
    rule = lce.linear_cross_entropy_sharding(*args, w_layout="vd")
    rule = dataclasses.replace(rule, collectives=tuple(
        c for c in rule.collectives if c.implementation == "pallas"))
    part = _sharding._Partitioned("linear_cross_entropy", lambda *a: None, list(rule.args),
                                  list(rule.results), rule, backward=False,
                                  result_shapes=[jax.ShapeDtypeStruct((8, seq), jnp.float32)])
    plan = part._plan(mesh, args, report=False)
    got = {lce.FEATURE_EXCHANGE[0]: "exchange", lce.PARTIAL_LOGITS[0]: "logits",
           None: "gather"}[plan.collective]
    assert got == want, (plan, lce._costs({"a0": 8, "a1": seq, "d": d, "v": vocab},
                                          {"a0": 4}, 2))
