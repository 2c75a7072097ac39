"""The Mosaic (TPU) kernels on a CPU: values and gradients in Pallas's TPU interpret mode against
float64 references, the heavy math inside pallas_calls, and export of optimized train steps for
platforms=("tpu",) (lowered through Mosaic, PALLAS_KERNELS_INTERPRET=0).

Shapes are small and deliberately ragged (every kernel pads them): the TPU interpreter pays per
grid step.
"""
from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import pallas_kernels as pk
from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.dense_act.reference import dense_act_reference, gated_dense_reference
from pallas_kernels.layer_norm.reference import layer_norm_reference
from pallas_kernels.linear_cross_entropy.reference import linear_cross_entropy_reference
from pallas_kernels.rms_norm.reference import rms_norm_reference
from pallas_kernels.softmax_cross_entropy.reference import softmax_cross_entropy_reference
from tests.kernel_checks import assert_close, forbidden_outside_pallas

TPU = pk.KernelChoice.of("pallas", platform="tpu", interpret=True)
TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 4e-2}
HEAVY = {"dot_general", "exp", "exp2", "log", "tanh", "erf", "logistic"}


def _f64(fn, arrays, cotangent):
    """fn's output and its gradients w.r.t. every array, in float64."""
    with jax.enable_x64(True):
        to64 = [jnp.asarray(np.asarray(a, np.float64)) for a in arrays]
        out, vjp = jax.vjp(fn, *to64)
        grads = vjp(jnp.asarray(np.asarray(cotangent, np.float64)))
        return np.asarray(out), [np.asarray(g) for g in grads]


def check(fn, reference, arrays, dtype, *, out_dtype=None, nan_rows=None):
    """fn (on the TPU kernels) against reference in float64: output and every gradient; and no
    heavy primitive outside a pallas_call, forward or backward."""
    arrays = [np.asarray(a, np.float32) for a in arrays]
    inputs = [jnp.asarray(a, dtype) for a in arrays]
    out_shape = jax.eval_shape(fn, *inputs)
    cotangent = np.random.default_rng(7).standard_normal(out_shape.shape).astype(np.float32)
    want, want_grads = _f64(reference, arrays, cotangent)
    out, vjp = jax.vjp(fn, *inputs)
    grads = vjp(jnp.asarray(cotangent, out.dtype))
    if nan_rows is not None:  # out-of-range labels: NaN in both, compared elsewhere
        assert np.all(np.isnan(np.asarray(out, np.float32)[nan_rows]))
        assert np.all(np.isnan(want[nan_rows]))
        out, want = jnp.where(nan_rows, 0, out), np.where(nan_rows, 0, want)
    assert_close("out", out, want, dtype, out_dtype or jnp.dtype(dtype), tolerance=TOL)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert_close(f"grad {i}", g, w, dtype, jnp.dtype(dtype), tolerance=TOL)
    jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(fn, *a)[1](jnp.ones(out_shape.shape,
                                                                  out_shape.dtype)))(*inputs)
    assert forbidden_outside_pallas(jaxpr.jaxpr, HEAVY) == []
    assert "pallas_call" in str(jaxpr)


def normal(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


# ---------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal,extras", [(True, ""), (False, "mask+bias"), (True, "mask")])
def test_attention(dtype, causal, extras):
    # q_len != kv_len, GQA (4 heads over 2), padding in both sequences, a row with no keys.
    rng = np.random.default_rng(0)
    B, Lq, Lk, H, Hkv, D = 2, 20, 37, 4, 2, 32
    q, k, v = normal(rng, B, Lq, H, D), normal(rng, B, Lk, Hkv, D), normal(rng, B, Lk, Hkv, D)
    mask = rng.random((B, 1, Lq, Lk)) > 0.3
    mask[0, 0, 3] = False
    mask = mask if "mask" in extras else None
    arrays = [q, k, v] + ([normal(rng, 1, H, Lq, Lk)] if "bias" in extras else [])

    def run(impl):
        def f(q, k, v, bias=None):
            return impl(q, k, v, causal=causal, mask=mask, bias=bias)
        return f

    def reference(q, k, v, bias=None):
        return attention_reference(q, k, v, causal=causal, scale=D ** -0.5,
                                   mask=None if mask is None else jnp.asarray(mask),
                                   bias=bias)

    check(run(lambda *a, **kw: pk.attention(*a, **kw, implementation=TPU)), reference, arrays,
          dtype)


def test_attention_mqa_broadcast_bias_and_single_query():
    rng = np.random.default_rng(1)
    q, k, v = normal(rng, 1, 1, 4, 16), normal(rng, 1, 9, 1, 16), normal(rng, 1, 9, 1, 16)
    bias = normal(rng, 1, 1, 1, 9)

    def f(q, k, v, bias):
        return pk.attention(q, k, v, causal=True, bias=bias, implementation=TPU)

    def reference(q, k, v, bias):
        return attention_reference(q, k, v, causal=True, bias=bias, scale=0.25)

    check(f, reference, [q, k, v, bias], jnp.float32)


# ---------------------------------------------------------------------------------- norms

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm(dtype):
    rng = np.random.default_rng(2)
    arrays = [normal(rng, 3, 7, 160), 1 + normal(rng, 160, scale=0.1), normal(rng, 160)]
    check(lambda x, s, b: pk.layer_norm(x, s, b, eps=1e-5, implementation=TPU),
          lambda x, s, b: layer_norm_reference(x, s, b, eps=1e-5), arrays, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm(dtype):
    rng = np.random.default_rng(3)
    arrays = [normal(rng, 21, 96), 1 + normal(rng, 96, scale=0.1)]
    check(lambda x, s: pk.rms_norm(x, s, eps=1e-6, implementation=TPU),
          lambda x, s: rms_norm_reference(x, s, eps=1e-6), arrays, dtype)


# ---------------------------------------------------------------------------------- dense

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_act(dtype):
    rng = np.random.default_rng(4)
    arrays = [normal(rng, 3, 7, 40), normal(rng, 40, 72, scale=0.2), normal(rng, 72)]
    check(lambda x, w, b: pk.dense_act(x, w, b, activation="gelu_erf", implementation=TPU),
          lambda x, w, b: dense_act_reference(x, w, b, activation="gelu_erf"), arrays, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_dense(dtype):
    rng = np.random.default_rng(5)
    arrays = [normal(rng, 21, 40), normal(rng, 40, 72, scale=0.2), normal(rng, 40, 72, scale=0.2)]
    check(lambda x, g, u: pk.gated_dense(x, g, u, activation="silu", implementation=TPU),
          lambda x, g, u: gated_dense_reference(x, g, u, activation="silu"), arrays, dtype)


# ---------------------------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_cross_entropy(dtype):
    rng = np.random.default_rng(6)
    labels = rng.integers(-300, 300, (3, 7))
    labels[0, 0] = 400  # out of range: NaN loss, softmax gradient
    check(lambda x: pk.softmax_cross_entropy(x, jnp.asarray(labels), implementation=TPU),
          lambda x: softmax_cross_entropy_reference(x, jnp.asarray(labels)),
          [normal(rng, 3, 7, 300, scale=3.0)], dtype, nan_rows=labels == 400)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_linear_cross_entropy(dtype, layout):
    rng = np.random.default_rng(8)
    labels = jnp.asarray(rng.integers(-600, 600, (3, 7)))
    w = normal(rng, *((40, 600) if layout == "dv" else (600, 40)), scale=0.3)
    check(lambda x, w: pk.linear_cross_entropy(x, w, labels, w_layout=layout,
                                               implementation=TPU),
          lambda x, w: linear_cross_entropy_reference(x, w, labels, w_layout=layout),
          [normal(rng, 3, 7, 40), w], dtype, out_dtype=jnp.float32)


# ---------------------------------------------------------------------------------- choice

def test_platform_choice_resolves_from_the_environment(monkeypatch):
    monkeypatch.setenv("PALLAS_KERNELS_PLATFORM", "tpu")
    monkeypatch.delenv("PALLAS_KERNELS_INTERPRET", raising=False)
    choice = pk.KernelChoice.of("pallas")
    assert (choice.platform, choice.interpret) == ("tpu", jax.default_backend() != "tpu")
    monkeypatch.setenv("PALLAS_KERNELS_INTERPRET", "0")
    assert not pk.KernelChoice.of(["pallas", "xla"]).interpret
    assert pk.KernelChoice.of(["pallas", "xla"]).implementation == ("pallas", "xla")
    with pytest.raises(ValueError, match="unknown platform"):
        pk.KernelChoice.of(platform="npu")


# ---------------------------------------------------------------------------------- export

@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_optimized_train_step_exports_for_tpu(name, dtype, monkeypatch):
    import passes
    monkeypatch.setenv("PALLAS_KERNELS_INTERPRET", "0")
    spec = models.get(name, dtype=dtype)
    params = jax.eval_shape(spec.init, jax.random.key(0))
    batch = jax.eval_shape(lambda key: spec.batch(key, 2), jax.random.key(1))
    # Checking on: translation validation gives no verdict on kernels lowered for a TPU, which
    # this host cannot run, rather than declining them.
    pipeline = passes.default_pipeline(implementation="pallas", platform="tpu", check=True)
    optimized = passes.optimize(spec.loss, pipeline)
    exported = jax.export.export(jax.jit(jax.grad(optimized)), platforms=("tpu",))(params, batch)
    text = exported.mlir_module()
    kernels = collections.Counter(re.findall(r'kernel_name = "([^"]+)"', text))
    norm = "layer_norm" if name == "gpt2-tiny" else "rms_norm"
    dense = "dense" if name == "gpt2-tiny" else "gated"
    for rewrite in ("attention", norm, dense, "linear_cross_entropy"):
        assert kernels[f"{rewrite}_fwd"] >= 1, (rewrite, kernels)
        assert any(n.startswith(f"{rewrite}_bwd") for n in kernels), (rewrite, kernels)
    assert text.count("tpu_custom_call") >= sum(kernels.values())
