"""pallas_kernels.attention against a float64 reference, for the "xla" and "pallas" implementations.

The reference is a plain jnp attention evaluated and differentiated in float64 (x64 enabled only
inside it); values and gradients of q, k, v and bias are compared on fresh random inputs. The Pallas
tests run the kernels in interpret mode with 16-wide blocks, so sequence lengths of a few dozen
span several blocks, cross the causal diagonal and end in a partial block. Interpret mode fills
unwritten outputs and out-of-bounds reads with NaN, so checking every element for finiteness
catches padding or unwritten tiles leaking. With PALLAS_KERNELS_PLATFORM=tpu "pallas" is the Mosaic
kernels (their blocks follow TPU tiling and take no config); the tests about the Triton form alone
(its configs and lowering) are skipped.
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core
from kernel_checks import ON_TPU, gpu_form_only

from pallas_kernels import _dispatch
from pallas_kernels.attention import AttentionConfig, attention, pallas_attention

# `pallas_kernels.attention` names the function, which shadows the package; import the kernels'
# module by its full name.
attention_module = importlib.import_module("pallas_kernels.attention.triton")
mosaic_module = importlib.import_module("pallas_kernels.attention.mosaic_tpu")

# Blocks of 16 everywhere except where a kernel pair must cope with differing block sizes.
SMALL = AttentionConfig(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16,
                        block_k_dq=16)
MIXED = AttentionConfig(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=16,
                        block_k_dq=32)

# Max error allowed, relative to the largest reference magnitude of that output: a few units of
# the dtype's rounding (bf16 also rounds the probabilities before the p @ v matmul).
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 4e-3}


def pallas_small_blocks(q, k, v, **kwargs):
    """The "pallas" kernels with small blocks: the Triton ones with SMALL; the Mosaic ones (TPU)
    with their own blocks, the smallest TPU tiling allows."""
    if ON_TPU:
        return attention(q, k, v, implementation="pallas", **kwargs)
    return pallas_attention(q, k, v, config=SMALL, **kwargs)


def reference64(q, k, v, bias, ct, *, causal, mask, scale):
    """Output and (dq, dk, dv, dbias) of attention in float64, as numpy arrays."""
    def attend(q, k, v, bias):
        B, q_len, H, D = q.shape
        kv_len, kv_heads = k.shape[1], k.shape[2]
        k = jnp.repeat(k, H // kv_heads, axis=2)
        v = jnp.repeat(v, H // kv_heads, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (D ** -0.5 if scale is None else scale)
        if bias is not None:
            s = s + bias
        keep = jnp.ones(s.shape, bool)
        if mask is not None:
            keep = keep & mask
        if causal:
            keep = keep & (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None] + kv_len - q_len)
        s = jnp.where(keep, s, -jnp.inf)
        has_key = jnp.any(jnp.isfinite(s), axis=-1, keepdims=True)
        p = jax.nn.softmax(jnp.where(has_key, s, 0.0), axis=-1)
        p = jnp.where(has_key, p, 0.0)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    @jax.jit
    def value_and_grads(args, ct):
        out, vjp = jax.vjp(attend, *args)
        return out, vjp(ct)

    with jax.enable_x64(True):
        to64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
        out, grads = value_and_grads([to64(x) for x in (q, k, v, bias)], to64(ct))
        return np.asarray(out), [None if g is None else np.asarray(g) for g in grads]


def assert_close(name, got, want, dtype):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: {np.sum(~np.isfinite(got))} non-finite elements"
    magnitude = max(np.max(np.abs(want)), 1e-3)
    err = np.max(np.abs(got - want)) / magnitude
    assert err <= TOLERANCE[dtype], f"{name}: max error {err:.3g} x {magnitude:.3g} (tol {TOLERANCE[dtype]})"


def random_inputs(seed, *, batch=2, q_len=37, kv_len=None, heads=2, kv_heads=None, head_dim=32,
                  dtype=jnp.float32, mask_shape=None, bias_shape=None, mask_p=0.8):
    kv_len = q_len if kv_len is None else kv_len
    kv_heads = heads if kv_heads is None else kv_heads
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    q = normal(batch, q_len, heads, head_dim)
    k = normal(batch, kv_len, kv_heads, head_dim)
    v = normal(batch, kv_len, kv_heads, head_dim)
    mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) < mask_p)
    bias = None if bias_shape is None else normal(*bias_shape)
    ct = normal(batch, q_len, heads, head_dim)
    return q, k, v, mask, bias, ct


class AttentionCases:
    """Value and gradient tests shared by every implementation."""

    IMPLEMENTATION: str
    CONFIG: AttentionConfig | None = None

    def attend(self, q, k, v, **kwargs):
        return attention(q, k, v, implementation=self.IMPLEMENTATION, **kwargs)

    def run_and_check(self, seed=0, *, causal=False, scale=None, **shapes):
        q, k, v, mask, bias, ct = random_inputs(seed, **shapes)
        dtype = shapes.get("dtype", jnp.float32)

        @jax.jit
        def value_and_grads(q, k, v, bias):
            out, vjp = jax.vjp(
                lambda q, k, v, bias: self.attend(q, k, v, causal=causal, mask=mask, bias=bias,
                                                  scale=scale), q, k, v, bias)
            return out, vjp(ct)

        out, grads = value_and_grads(q, k, v, bias)
        want_out, want_grads = reference64(q, k, v, bias, ct, causal=causal, mask=mask,
                                           scale=scale)
        assert out.dtype == q.dtype
        assert_close("out", out, want_out, dtype)
        for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, want_grads):
            if want is None:
                assert got is None
            else:
                assert got.dtype == (q.dtype if name != "dbias" else bias.dtype)
                assert_close(name, got, want, dtype)
        return out, grads

    def test_sequence_not_a_block_multiple(self):
        self.run_and_check(0, batch=2, q_len=37, heads=2)

    @pytest.mark.parametrize("q_len,kv_len", [(21, 45), (45, 21), (37, 37)])
    def test_causal(self, q_len, kv_len):
        # q_len > kv_len leaves the first q_len - kv_len queries without keys: zeros.
        out, grads = self.run_and_check(1, q_len=q_len, kv_len=kv_len, causal=True)
        if q_len > kv_len:
            assert np.all(np.asarray(out)[:, : q_len - kv_len] == 0)
            assert np.all(np.asarray(grads[0])[:, : q_len - kv_len] == 0)

    def test_gqa_with_mask(self):
        self.run_and_check(2, batch=1, q_len=33, kv_len=40, heads=4, kv_heads=2,
                           mask_shape=(1, 4, 33, 40), causal=True)

    def test_multi_query_with_padding_mask(self):
        self.run_and_check(3, batch=2, q_len=19, kv_len=35, heads=3, kv_heads=1,
                           mask_shape=(2, 1, 1, 35))

    @pytest.mark.parametrize("bias_shape", [(1, 1, 20, 36), (2, 1, 1, 36), (2, 2, 20, 36),
                                            (2, 1, 36)])
    def test_bias_broadcast_and_gradient(self, bias_shape):
        self.run_and_check(4, batch=2, q_len=20, kv_len=36, heads=2, bias_shape=bias_shape,
                           causal=bias_shape[0] == 2)

    def test_mask_bias_gqa_explicit_scale_odd_head_dim(self):
        self.run_and_check(5, batch=1, q_len=26, kv_len=30, heads=4, kv_heads=2, head_dim=40,
                           mask_shape=(1, 1, 26, 30), bias_shape=(4, 26, 30), scale=0.37)

    def test_float32_inputs_with_x64_enabled(self):
        # With jax_enable_x64 Python ints are int64: the kernels' index arithmetic stays int32.
        with jax.enable_x64(True):
            self.run_and_check(9, batch=2, q_len=21, kv_len=30, heads=4, kv_heads=2,
                               mask_shape=(2, 1, 21, 30), bias_shape=(1, 1, 21, 30), causal=True)

    def test_fully_masked_rows_are_zero(self):
        q, k, v, _, _, ct = random_inputs(6, batch=1, q_len=18, kv_len=24, heads=2)
        mask = np.ones((1, 2, 18, 24), bool)
        mask[0, 0, 3] = False    # one query of head 0 sees nothing
        mask[0, 1, 10:] = False  # queries 10.. of head 1 see nothing
        bias = np.zeros((1, 2, 18, 24), np.float32)
        bias[0, 0, 5] = -np.inf  # an additive -inf row masks as well
        mask, bias = jnp.asarray(mask), jnp.asarray(bias)

        def loss(q, k, v, bias):
            return jnp.sum(self.attend(q, k, v, mask=mask, bias=bias) * ct)

        out = np.asarray(self.attend(q, k, v, mask=mask, bias=bias))
        dq, dk, dv, dbias = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(np.asarray(dbias)))
        for row_q, head in ((3, 0), (5, 0), (10, 1), (17, 1)):
            assert np.all(out[0, row_q, head] == 0)
            assert np.all(np.asarray(dq)[0, row_q, head] == 0)
            assert np.all(np.asarray(dbias)[0, head, row_q] == 0)
        want_out, want_grads = reference64(q, k, v, bias, ct, causal=False, mask=mask, scale=None)
        assert_close("out", out, want_out, jnp.float32)
        for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), want_grads):
            assert_close(name, got, want, jnp.float32)

    @pytest.mark.parametrize("max_logit", [2e3, 2e4, 2.7e8])
    def test_large_logits_keep_backward_probabilities_normalised(self, max_logit):
        """Logits near `max_logit` that differ by a few units. dv = P^T do, so with do = 1 the
        sum of dv over keys is the sum of P's rows, q_len up to float32 rounding whatever the
        logits' magnitude, and no dv exceeds q_len. Probabilities recomputed from one saved
        log-sum-exp m + log2(l) round at m's precision: their rows summed to 1.00001 at 2e3 and
        to 209 at 2.7e8. Where float32 logits still resolve units, values and gradients also
        match float64 within what rounding the logits costs."""
        rng = np.random.default_rng(int(max_logit) % 2**32)
        B, T, H, D = 1, 40, 2, 16
        direction = rng.standard_normal(D)
        direction /= np.linalg.norm(direction)
        spread = 3.0 / max_logit  # relative: logits differ by a few units
        noisy = lambda: direction + spread * rng.standard_normal((B, T, H, D))
        q = jnp.asarray(max_logit * np.sqrt(D) * noisy(), jnp.float32)
        k = jnp.asarray(noisy(), jnp.float32)
        v = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
        ct = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)

        def value_and_grads(ct):
            out, vjp = jax.vjp(lambda q, k, v: self.attend(q, k, v, causal=True), q, k, v)
            return out, vjp(ct)

        _, (_, _, dv_ones) = value_and_grads(jnp.ones_like(ct))
        row_sums = np.asarray(dv_ones, np.float64).sum(axis=1) / T  # (B, H, D)
        assert np.max(np.abs(row_sums - 1.0)) <= 1e-5, np.max(np.abs(row_sums - 1.0))
        assert np.max(np.abs(np.asarray(dv_ones))) <= T * (1 + 1e-5)
        if max_logit > 1e5:
            return
        out, grads = value_and_grads(ct)
        want_out, want_grads = reference64(q, k, v, None, ct, causal=True, mask=None, scale=None)
        logit_rounding = 64 * max_logit * 2.0 ** -24
        for name, got, want in zip(("out", "dv"), (out, grads[2]), (want_out, want_grads[2])):
            got = np.asarray(got, np.float64)
            err = np.max(np.abs(got - want)) / np.max(np.abs(want))
            assert err <= logit_rounding, f"{name}: max error {err:.3g}"

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    def test_half_precision(self, dtype):
        self.run_and_check(7, batch=2, q_len=29, kv_len=34, heads=4, kv_heads=2, dtype=dtype,
                           causal=True, mask_shape=(2, 1, 29, 34), bias_shape=(1, 4, 1, 34))

    def test_vmap_over_an_extra_axis(self):
        q, k, v, _, _, _ = random_inputs(8, batch=3, q_len=17, kv_len=20)
        got = jax.vmap(lambda q, k, v: self.attend(q[None], k[None], v[None], causal=True)[0])(
            q, k, v)
        want, _ = reference64(q, k, v, None, q, causal=True, mask=None, scale=None)
        assert_close("out", got, want, jnp.float32)


class TestXla(AttentionCases):
    IMPLEMENTATION = "xla"


class TestPallas(AttentionCases):
    IMPLEMENTATION = "pallas"

    def attend(self, q, k, v, **kwargs):
        return pallas_small_blocks(q, k, v, **kwargs)

    @gpu_form_only
    def test_mixed_block_sizes(self):
        """Forward, dK/dV and dQ with different tiles (and all-padding query blocks in dQ)."""
        self.attend = lambda q, k, v, **kw: pallas_attention(q, k, v, config=MIXED, **kw)
        self.run_and_check(9, batch=1, q_len=40, kv_len=50, heads=4, kv_heads=2, causal=True,
                           mask_shape=(1, 1, 40, 50), bias_shape=(1, 4, 1, 50))

    def test_public_entry_point_heuristic_config(self):
        self.attend = lambda q, k, v, **kw: attention(q, k, v, implementation="pallas", **kw)
        self.run_and_check(10, batch=2, q_len=23, kv_len=23, heads=2, causal=True,
                           bias_shape=(2, 1, 1, 23))


# ---------------------------------------------------------------------------------------------
# The Pallas path does its work in Pallas, forward and backward.

HEAVY = {"dot_general", "exp", "exp2", "log", "log1p", "logistic", "tanh", "erf"}


def _heavy_outside_kernels(jaxpr):
    """(number of pallas_calls, primitives from HEAVY found outside them) in a closed jaxpr."""
    calls, heavy = 0, set()

    def visit(jaxpr):
        nonlocal calls
        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                calls += 1
                continue
            if eqn.primitive.name in HEAVY:
                heavy.add(eqn.primitive.name)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        visit(sub)

    visit(jaxpr)
    return calls, heavy


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_pallas_jaxprs_do_the_work_in_kernels(implementation):
    q, k, v, mask, bias, _ = random_inputs(11, batch=1, q_len=20, kv_len=24, heads=4, kv_heads=2,
                                           mask_shape=(1, 1, 20, 24), bias_shape=(1, 4, 20, 24))

    def f(q, k, v, bias):
        return attention(q, k, v, mask=mask, bias=bias, causal=True,
                         implementation=implementation)

    def loss(q, k, v, bias):
        return jnp.sum(f(q, k, v, bias))

    fwd_calls, fwd_heavy = _heavy_outside_kernels(jax.make_jaxpr(f)(q, k, v, bias))
    bwd_calls, bwd_heavy = _heavy_outside_kernels(
        jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias))
    if implementation == "pallas":
        assert fwd_calls == 1 and fwd_heavy == set()
        # Triton: forward, delta, dK/dV, dQ, dbias. Mosaic: forward, dQ (with the dS tiles the
        # bias gradient sums), dK/dV.
        assert bwd_calls == (3 if ON_TPU else 5) and bwd_heavy == set()
    else:  # the walker would notice work outside kernels
        assert fwd_calls == 0 and {"dot_general", "exp"} <= fwd_heavy
        assert bwd_calls == 0 and {"dot_general", "exp"} <= bwd_heavy


# ---------------------------------------------------------------------------------------------
# The GPU path lowers through Triton. Lowering (not compiling) for "cuda" needs no GPU: the
# Pallas Triton lowering builds each kernel's Triton IR in Python, so unsupported primitives,
# non-power-of-two tiles or ill-typed ops fail here rather than on the H100.


@pytest.fixture
def pretend_h100():
    """Newer JAX asks the (absent) GPU for its compute capability while lowering; answer H100."""
    from pallas_kernels._pallas_compat import pretend_gpu_info

    with pretend_gpu_info("H100"):
        yield


@gpu_form_only
@pytest.mark.parametrize("case", [
    dict(shape=(8, 2048, 2048, 16, 16, 64), dtype=jnp.bfloat16, causal=True),
    dict(shape=(4, 4096, 4096, 16, 16, 128), dtype=jnp.bfloat16, causal=True),
    dict(shape=(2, 100, 77, 8, 2, 80), dtype=jnp.float16, causal=True, mask=(2, 1, 1, 77),
         bias=(1, 8, 100, 77)),
    dict(shape=(1, 33, 47, 4, 1, 32), dtype=jnp.float32, causal=False, mask=(1, 4, 33, 47),
         bias=(1, 1, 33, 1)),
    dict(shape=(2, 64, 64, 2, 2, 256), dtype=jnp.bfloat16, causal=True),
])
def test_kernels_lower_with_triton(case, pretend_h100):
    from jax import export

    B, q_len, kv_len, H, kv_heads, D = case["shape"]
    dtype = case["dtype"]
    config = attention_module.heuristic_config(q_len, kv_len, D, interpret=False)
    q = jax.ShapeDtypeStruct((B, q_len, H, D), dtype)
    kv = jax.ShapeDtypeStruct((B, kv_len, kv_heads, D), dtype)
    mask = jax.ShapeDtypeStruct(case["mask"], jnp.bool_) if "mask" in case else None
    bias = jax.ShapeDtypeStruct(case["bias"], dtype) if "bias" in case else None

    def fwd_bwd(q, k, v, mask, bias, do):
        def f(q, k, v, bias):
            return attention_module._flash_attention(
                q, k, v, mask, bias, causal=case["causal"], scale=D ** -0.5, config=config,
                interpret=False)
        out, vjp = jax.vjp(f, q, k, v, bias)
        return out, vjp(do)

    exported = export.export(
        jax.jit(fwd_bwd), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(q, kv, kv, mask, bias, q)
    text = exported.mlir_module()
    kernels = ["attention_fwd", "attention_bwd_delta", "attention_bwd_dkv", "attention_bwd_dq"]
    kernels += ["attention_bwd_dbias"] if bias is not None else []
    assert text.count("@__gpu$xla.gpu.triton") == len(kernels)
    for name in kernels:
        assert f'name = "{name}"' in text


# ---------------------------------------------------------------------------------------------
# Choosing, pinning and declining implementations.


def test_default_on_cpu_is_xla_and_matches_pallas():
    q, k, v, _, _, _ = random_inputs(12, batch=1, q_len=20, heads=2)
    default = attention(q, k, v, causal=True)
    jaxpr = jax.make_jaxpr(lambda q, k, v: attention(q, k, v, causal=True))(q, k, v)
    assert _heavy_outside_kernels(jaxpr)[0] == 0
    np.testing.assert_allclose(default, pallas_small_blocks(q, k, v, causal=True), atol=2e-6)


def test_pinned_cudnn_on_cpu_raises_with_reason():
    q, k, v, _, _, _ = random_inputs(13, batch=1, q_len=16, heads=2)
    with pytest.raises(NotImplementedError, match="cudnn: .*needs an NVIDIA GPU"):
        attention(q, k, v, implementation="cudnn")
    # a list falls through to the next implementation
    np.testing.assert_allclose(attention(q, k, v, implementation=["cudnn", "xla"]),
                               attention(q, k, v, implementation="xla"))


def test_pinned_pallas_declines_float64():
    with jax.enable_x64(True):
        q = jnp.ones((1, 16, 2, 16), jnp.float64)
        with pytest.raises(NotImplementedError, match="pallas: dtype float64 is not supported"):
            attention(q, q, q, implementation="pallas")
        assert attention(q, q, q, implementation=["pallas", "xla"]).dtype == jnp.float64


def test_bad_arguments_raise_clear_errors():
    q = jnp.ones((1, 8, 4, 16))
    kv = jnp.ones((1, 8, 3, 16))
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        attention(q, kv, kv)
    with pytest.raises(ValueError, match=r"batch, seq, heads, head_dim"):
        attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="mask must be boolean"):
        attention(q, q, q, mask=jnp.ones((8, 8)))
    with pytest.raises(ValueError, match="q_seq axis is 5, expected 1 or 8"):
        attention(q, q, q, bias=jnp.ones((5, 8)))
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, q.astype(jnp.bfloat16), q)
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        attention(q, q, q, implementation="triton")
    with pytest.raises(TypeError, match="scale must be a concrete number"):
        jax.jit(lambda s: attention(q, q, q, scale=s))(0.5)
    with pytest.raises(ValueError, match="power of two >= 16"):
        AttentionConfig(block_q=48)


_UNLOWERABLE = jex_core.Primitive("unlowerable_in_test")
_UNLOWERABLE.def_abstract_eval(lambda x: x)


def test_kernel_that_fails_to_lower_declines_and_falls_back(monkeypatch):
    """A kernel whose body traces but has no lowering: the first use lowers it on its own, the
    failure becomes the pallas implementation's reason, and the next implementation runs."""
    # The forward kernel's output ref: before the statistics' (Triton), or before the
    # statistics' and three scratch buffers (Mosaic).
    module, out_ref = (mosaic_module, -6) if ON_TPU else (attention_module, -2)
    real_kernel = module._fwd_kernel

    def broken_kernel(*refs, plan):
        real_kernel(*refs, plan=plan)
        o_ref = refs[out_ref]
        o_ref[...] = _UNLOWERABLE.bind(o_ref[...])

    monkeypatch.setattr(module, "_fwd_kernel", broken_kernel)
    _dispatch.clear_caches()
    attention_module._flash_attention.clear_cache()
    lowerings = []
    real_failure = _dispatch._lowering_failure
    monkeypatch.setattr(_dispatch, "_lowering_failure",
                        lambda *a: lowerings.append(1) or real_failure(*a))
    q, k, v, _, _, _ = random_inputs(14, batch=1, q_len=20, heads=2)
    try:
        with pytest.raises(NotImplementedError, match="pallas: .*unlowerable_in_test"):
            attention(q, k, v, implementation="pallas")
        got = attention(q, k, v, implementation=["pallas", "xla"])
        np.testing.assert_array_equal(got, attention(q, k, v, implementation="xla"))
        assert len(lowerings) == 1  # the verdict is cached per signature
    finally:
        _dispatch.clear_caches()
        attention_module._flash_attention.clear_cache()


@gpu_form_only
def test_heuristic_and_tuning_space_are_valid_configs():
    for interpret in (True, False):
        for head_dim in (64, 128):
            cfg = attention_module.heuristic_config(2048, 2048, head_dim, interpret=interpret)
            assert cfg.block_q >= 64 and cfg.block_k >= 64
    small = attention_module.heuristic_config(20, 3, 64, interpret=False)
    assert small.block_q == 32 and small.block_k == 16 and small.block_k_dkv == 16
    assert len(set(attention_module.config_space(64))) == len(attention_module.config_space(64))


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
@pytest.mark.parametrize("shapes", [
    dict(batch=0), dict(kv_len=0), dict(head_dim=0), dict(q_len=0, causal=True)])
def test_zero_size_operands_give_the_empty_or_zero_result(implementation, shapes):
    """Nothing to write, or no keys to attend over (rows without keys are zeros): the result
    is there without a kernel, its gradients zero, never a ZeroDivisionError or a failed
    lowering."""
    shapes = dict(shapes)
    causal = shapes.pop("causal", False)
    q, k, v, _, bias, ct = random_inputs(15, batch=shapes.get("batch", 1),
                                          q_len=shapes.get("q_len", 5),
                                          kv_len=shapes.get("kv_len", 6),
                                          head_dim=shapes.get("head_dim", 16),
                                          bias_shape=(1, 1, shapes.get("q_len", 5),
                                                      shapes.get("kv_len", 6)))
    out, vjp = jax.vjp(lambda q, k, v, bias: attention(q, k, v, bias=bias, causal=causal,
                                                       implementation=implementation),
                       q, k, v, bias)
    assert out.shape == q.shape and out.dtype == q.dtype and not np.asarray(out).any()
    for grad, arg in zip(vjp(ct), (q, k, v, bias)):
        assert grad.shape == arg.shape and not np.asarray(grad).any()
