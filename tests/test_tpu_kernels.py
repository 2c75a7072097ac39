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
from pallas_kernels import _target
from pallas_kernels import _tpu_tiles as tt
from pallas_kernels.attention import mosaic_tpu as attention
from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.dense_act import mosaic_tpu as dense
from pallas_kernels.dense_act.reference import dense_act_reference, gated_dense_reference
from pallas_kernels.layer_norm import mosaic_tpu as norm
from pallas_kernels.layer_norm.reference import layer_norm_reference
from pallas_kernels.linear_cross_entropy import mosaic_tpu as linear_ce
from pallas_kernels.linear_cross_entropy.reference import linear_cross_entropy_reference
from pallas_kernels.rms_norm.reference import rms_norm_reference
from pallas_kernels.softmax_cross_entropy import mosaic_tpu as softmax_ce
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
    # One jitted program: the TPU interpreter's kernels compile once instead of op by op.
    out, grads = jax.jit(lambda ct, *a: (lambda o, vjp: (o, vjp(ct)))(*jax.vjp(fn, *a)))(
        jnp.asarray(cotangent, out_shape.dtype), *inputs)
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


# ---------------------------------------------------------------------------------- block configs

def _config_cases():
    """Per TPU kernel: (its config space at a small ragged shape, the function of a config, the
    float64 reference, the inputs). Each shape is just large enough for two distinct tilings:
    the TPU interpreter costs seconds per call."""
    rng = np.random.default_rng(9)
    f32 = jnp.float32
    B, Lq, Lk, H, D = 1, 20, 140, 2, 32
    ce_labels = jnp.asarray(rng.integers(0, 1100, (3, 7)))
    lce_labels = jnp.asarray(rng.integers(0, 300, (3, 7)))
    return {
        "attention": (
            attention.config_space(Lq, Lk, D, f32),
            lambda c: lambda q, k, v: attention.attention_mosaic_tpu(q, k, v, causal=True,
                                                                     config=c),
            lambda q, k, v: attention_reference(q, k, v, causal=True, scale=D ** -0.5),
            [normal(rng, B, Lq, H, D), normal(rng, B, Lk, 1, D), normal(rng, B, Lk, 1, D)]),
        "layer_norm": (
            norm.config_space(72, 128, f32, [f32, f32]),
            lambda c: lambda x, s, b: norm.layer_norm_mosaic_tpu(x, s, b, eps=1e-5, config=c),
            lambda x, s, b: layer_norm_reference(x, s, b, eps=1e-5),
            [normal(rng, 8, 9, 128), 1 + normal(rng, 128, scale=0.1), normal(rng, 128)]),
        "dense_act": (
            dense.config_space(21, 264, 40, f32),
            lambda c: lambda x, w, b: dense.dense_act_mosaic_tpu(x, w, b, activation="gelu_tanh",
                                                                 config=c),
            lambda x, w, b: dense_act_reference(x, w, b, activation="gelu_tanh"),
            [normal(rng, 3, 7, 40), normal(rng, 40, 264, scale=0.2), normal(rng, 264)]),
        "gated_dense": (
            dense.config_space(21, 264, 40, f32, n_weights=2),
            lambda c: lambda x, g, u: dense.gated_dense_mosaic_tpu(x, g, u, activation="silu",
                                                                   config=c),
            lambda x, g, u: gated_dense_reference(x, g, u, activation="silu"),
            [normal(rng, 21, 40), normal(rng, 40, 264, scale=0.2),
             normal(rng, 40, 264, scale=0.2)]),
        "softmax_cross_entropy": (
            softmax_ce.config_space(21, 1100, f32),
            lambda c: lambda x: softmax_ce.softmax_cross_entropy_mosaic_tpu(x, ce_labels,
                                                                            config=c),
            lambda x: softmax_cross_entropy_reference(x, ce_labels),
            [normal(rng, 3, 7, 1100, scale=3.0)]),
        "linear_cross_entropy": (
            linear_ce.config_space(21, 40, 300, f32),
            lambda c: lambda x, w: linear_ce.linear_cross_entropy_mosaic_tpu(x, w, lce_labels,
                                                                             config=c),
            lambda x, w: linear_cross_entropy_reference(x, w, lce_labels),
            [normal(rng, 3, 7, 40), normal(rng, 40, 300, scale=0.3)]),
    }


@pytest.mark.parametrize("kernel", ["attention", "layer_norm", "dense_act", "gated_dense",
                                    "softmax_cross_entropy", "linear_cross_entropy"])
def test_every_config_in_the_space_is_correct(kernel):
    space, with_config, reference, arrays = _config_cases()[kernel]
    assert len(space) == 2, space  # the shapes are chosen to give two tilings
    with _target.using(TPU):
        for config in space:
            check(with_config(config), reference, arrays, jnp.float32)


# The zoo's largest shapes: GPT-2 small (batch 8 x seq 1024 tokens, d 768, 12 heads of 64, MLP
# 3072, vocab 50257) in float32 and bfloat16; a Llama-style model (d 4096, 32 heads of 128, FFN
# 11008, vocab 32000) in bfloat16.
ZOO = [dict(tokens=8 * 1024, seq=1024, d=768, head_dim=64, ffn=3072, vocab=50257, dtype=dt)
       for dt in (jnp.float32, jnp.bfloat16)] + [
    dict(tokens=8 * 1024, seq=1024, d=4096, head_dim=128, ffn=11008, vocab=32000,
         dtype=jnp.bfloat16)]


def zoo_spaces(shape):
    """(kernel, config space, VMEM estimate of a config, {block field: tiling granule})."""
    t, s, d, dt = shape["tokens"], shape["seq"], shape["d"], shape["dtype"]
    hd, ffn, vocab = shape["head_dim"], shape["ffn"], shape["vocab"]
    sub, lanes = tt.sublanes(dt), tt.LANES
    extras = [jnp.int32, jnp.float32]
    return [
        ("attention", attention.config_space(s, s, hd, dt, extras),
         lambda c: attention.vmem_bytes(c, hd, dt, extras), dict(block_q=sub, block_k=lanes)),
        ("norm", norm.config_space(t, d, dt, [dt, dt]),
         lambda c: norm.vmem_bytes(c, d, dt, [dt, dt]), dict(block_rows=sub)),
        ("dense_act", dense.config_space(t, ffn, d, dt),
         lambda c: dense.vmem_bytes(c, dt), dict(block_m=sub, block_n=lanes, block_k=lanes)),
        ("gated_dense", dense.config_space(t, ffn, d, dt, n_weights=2),
         lambda c: dense.vmem_bytes(c, dt, n_weights=2),
         dict(block_m=sub, block_n=lanes, block_k=lanes)),
        ("dense_down", dense.config_space(t, d, ffn, dt),
         lambda c: dense.vmem_bytes(c, dt), dict(block_m=sub, block_n=lanes, block_k=lanes)),
        ("softmax_cross_entropy", softmax_ce.config_space(t, vocab, dt),
         lambda c: softmax_ce.vmem_bytes(c, dt), dict(block_rows=sub, block_vocab=lanes)),
        ("linear_cross_entropy", linear_ce.config_space(t, d, vocab, dt),
         lambda c: linear_ce.vmem_bytes(c, d, dt), dict(block_tokens=sub, block_vocab=lanes)),
    ]


@pytest.mark.parametrize("shape", ZOO, ids=lambda s: f"d{s['d']}-{jnp.dtype(s['dtype']).name}")
def test_config_spaces_tile_and_fit_vmem_at_the_zoos_largest_shapes(shape):
    for kernel, space, vmem, granules in zoo_spaces(shape):
        assert len(space) >= 2, (kernel, space)
        for config in space:
            assert vmem(config) < tt.VMEM_BUDGET, (kernel, config, vmem(config))
            for field, granule in granules.items():
                assert getattr(config, field) % granule == 0, (kernel, config, field)


# ---------------------------------------------------------------------------------- bias gradient

BIAS_SHAPES = [(1, 1), (2, 1), (1, 3), (2, 3)]  # (batch, heads) of the bias; B = 2, H = 3


@pytest.mark.parametrize("lead", BIAS_SHAPES, ids=lambda s: f"bias{s[0]}x{s[1]}")
def test_attention_bias_gradient(lead):
    rng = np.random.default_rng(10)
    B, Lq, Lk, H, D = 2, 20, 37, 3, 16
    arrays = [normal(rng, B, Lq, H, D), normal(rng, B, Lk, H, D), normal(rng, B, Lk, H, D),
              normal(rng, *lead, Lq, Lk)]
    check(lambda q, k, v, bias: pk.attention(q, k, v, causal=True, bias=bias, implementation=TPU),
          lambda q, k, v, bias: attention_reference(q, k, v, causal=True, bias=bias,
                                                    scale=D ** -0.5),
          arrays, jnp.float32)


def _avals_outside_pallas(jaxpr):
    """Every value an equation outside a pallas_call body produces (nested jaxprs too)."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        if eqn.primitive.name == "pallas_call":
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _avals_outside_pallas(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    yield from _avals_outside_pallas(sub)


def test_broadcast_bias_gradient_makes_no_full_size_float32_ds():
    B, Lq, Lk, H, D = 2, 20, 37, 3, 16
    q = jnp.zeros((B, Lq, H, D))
    kv = jnp.zeros((B, Lk, H, D))

    def grads(bias_shape):
        def loss(q, k, v, bias):
            return pk.attention(q, k, v, bias=bias, implementation=TPU).sum()
        return jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(
            q, kv, kv, jnp.zeros(bias_shape)).jaxpr

    def full_size_f32(jaxpr):
        return [a for a in _avals_outside_pallas(jaxpr)
                if getattr(a, "dtype", None) == jnp.float32 and len(a.shape) == 4
                and a.shape[:2] == (B, H) and a.shape[2] >= Lq and a.shape[3] >= Lk]

    assert full_size_f32(grads((1, 1, Lq, Lk))) == []
    assert full_size_f32(grads((B, H, Lq, Lk)))  # the check sees a full-size gradient
