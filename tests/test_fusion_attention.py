"""The `attention` pass: spellings matched, values and gradients kept, masks, declines, kernels."""
import math
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import passes
from models.gpt2 import causal_attention
from passes import Pipeline, cleanup_passes
from passes.fusion.attention import attention_pass
from passes.rewrite import is_replacement
from passes.testing import assert_equivalent, count_primitive

PIPELINE = Pipeline(cleanup_passes() + [attention_pass()])
B, T, H, D = 2, 8, 4, 16


def _pallas_calls(jaxpr) -> int:
    return count_primitive(jaxpr, "pallas_call")


def _qkv(seed, shape=(B, T, H, D), kv_heads=H, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    kv_shape = shape[:-2] + (kv_heads, shape[-1])
    return (jax.random.normal(kq, shape, dtype), jax.random.normal(kk, kv_shape, dtype),
            jax.random.normal(kv, kv_shape, dtype))


def _tril(n, m=None, k=0):
    return jnp.tril(jnp.ones((n, n if m is None else m), bool), k=k)


def _replacements(fn, *args, pipeline=PIPELINE):
    """The attention replacement equations of the optimized program (nested bodies included)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if is_replacement(eqn) and "attention" in str(eqn.params["name"]):
                found.append(eqn)
            for v in eqn.params.values():
                for sub in v if isinstance(v, (list, tuple)) else [v]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(passes.optimize(fn, pipeline))(*args).jaxpr)
    return found


def _rewritten(fn, *args, count=1, **tol):
    report = passes.explain(fn, *args, pipeline=PIPELINE)
    assert report.counts["attention"] == count, (report.declined, report.jaxpr_after)
    assert_equivalent(fn, passes.optimize(fn, PIPELINE), *args, **tol)
    return report


# -- spellings -----------------------------------------------------------------------------------

def _einsum_attention(q, k, v, *, scale=D ** -0.5, mask=None, fill=-jnp.inf, bias=None):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = jnp.where(mask, s, fill)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _sqrt_division(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    s = jnp.where(_tril(T), s, -1e9)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)


def _scale_on_q(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q * D ** -0.5, k)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)


def _hand_softmax_heads_first(q, k, v):  # (b, h, t, d) layout, no scale, no stop_gradient
    s = q @ jnp.swapaxes(k, -1, -2)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v


def _llama_style(q, k, v):  # k, v repeated per group, causal from iotas, f32 softmax
    k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    s = jnp.einsum("BTNH,BSNH->BNTS", q, k) * q.shape[-1] ** -0.5
    i = jnp.arange(T)
    s = jnp.where(i[:, None] >= i[None, :], s.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)


def _grouped_q(q, k, v):  # q reshaped into (kv_heads, group)
    qg = q.reshape(B, T, 2, 2, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k) * 0.25
    s = jnp.where(_tril(T), s, -1e9)
    o = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s), v)
    return o.reshape(B, T, H, D)


def _multi_query(q, k, v):  # one k/v head, no head axis on k and v
    s = jnp.einsum("bthd,bsd->bhts", q, k[:, :, 0]) * 0.25
    return jnp.einsum("bhts,bsd->bthd", jax.nn.softmax(s), v[:, :, 0])


def _unbatched(q, k, v):  # no batch axis
    s = jnp.einsum("qhd,khd->hqk", q[0], k[0]) * 0.3
    return jnp.einsum("hqk,khd->qhd", jax.nn.softmax(s), v[0])


def _single_head_matrix(q, k, v):  # neither batch nor head axes
    return jax.nn.softmax(q[0, :, 0] @ k[0, :, 0].T / 4.0) @ v[0, :, 0]


def _two_batch_axes(q, k, v):
    q, k, v = (x.reshape(1, B, T, H, D) for x in (q, k, v))
    s = jnp.einsum("xyqhd,xykhd->xyhqk", q, k) * 0.25
    return jnp.einsum("xyhqk,xykhd->xyqhd", jax.nn.softmax(s), v)


def _output_heads_first(q, k, v):  # no transpose back to (b, t, h, d)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
    return jnp.einsum("bhqk,bkhd->bhqd", jax.nn.softmax(s), v)


def _k_is_v(q, k, v):
    return jax.nn.dot_product_attention(q, k, k)


def _alibi_bias(q, k, v):
    i = jnp.arange(T)
    slopes = 2.0 ** -jnp.arange(1, H + 1)
    bias = slopes[:, None, None] * (i[None, :] - i[:, None])[None]
    return _einsum_attention(q, k, v, bias=bias[None], mask=_tril(T))


def _linen(q, k, v):
    return nn.dot_product_attention(q, k, v, mask=nn.make_causal_mask(jnp.ones((B, T))))


SPELLINGS = {
    "gpt2_model_causal": (causal_attention, H),
    "jax_dpa_causal": (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), H),
    "jax_dpa_gqa": (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), 2),
    "jax_dpa_plain": (jax.nn.dot_product_attention, H),
    "linen_causal_mask": (_linen, H),
    "sqrt_division_large_negative": (_sqrt_division, H),
    "scale_on_q": (_scale_on_q, H),
    "llama_repeat_gqa": (_llama_style, 2),
    "grouped_q_reshape": (_grouped_q, 2),
    "multi_query": (_multi_query, 1),
    "unbatched": (_unbatched, H),
    "single_head_matrix": (_single_head_matrix, H),
    "two_batch_axes": (_two_batch_axes, H),
    "output_heads_first": (_output_heads_first, H),
    "k_is_v": (_k_is_v, H),
    "alibi_bias_causal": (_alibi_bias, H),
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_rewritten_with_same_values_and_gradients(name):
    fn, kv_heads = SPELLINGS[name]
    _rewritten(fn, *_qkv(zlib.crc32(name.encode()) % 1000, kv_heads=kv_heads))


def test_hand_softmax_without_scale_heads_first_layout():
    q, k, v = (x.transpose(0, 2, 1, 3) * 0.5 for x in _qkv(3))
    _rewritten(_hand_softmax_heads_first, q, k, v)


def test_custom_jvp_softmax():
    jax.config.update("jax_softmax_custom_jvp", True)
    try:
        _rewritten(lambda q, k, v: _einsum_attention(q, k, v, mask=_tril(T)), *_qkv(4))
    finally:
        jax.config.update("jax_softmax_custom_jvp", False)


def test_flax_nnx_multi_head_attention():
    module = nnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (B, T, 32))

    def fn(m, x):
        return m(x, mask=nnx.make_causal_mask(jnp.ones(x.shape[:2])))

    report = passes.explain(fn, module, x, pipeline=PIPELINE)
    assert report.counts["attention"] == 1
    optimized = passes.optimize(fn, PIPELINE)
    np.testing.assert_allclose(optimized(module, x), fn(module, x), rtol=1e-5, atol=1e-6)
    assert len(_replacements(fn, module, x)[0].invars) == 3  # causal: no mask input


def test_bfloat16_inputs_with_float32_softmax():
    def fn(q, k, v):
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
        return causal_attention(q, k, v).astype(jnp.float32)

    _rewritten(fn, *_qkv(6), rtol=2e-2, atol=1e-2)
    out = jax.eval_shape(passes.optimize(causal_attention, PIPELINE),
                         *(x.astype(jnp.bfloat16) for x in _qkv(6)))
    assert out.dtype == jnp.bfloat16


def test_bias_input_gets_its_gradient():
    bias = jax.random.normal(jax.random.key(23), (1, H, T, T))

    def fn(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True)

    _rewritten(fn, *_qkv(23), bias)


def test_linen_module_in_bfloat16_as_close_to_float32_as_the_original():
    """Against the float32 module (the float64 reference of a bf16 program rounds as it does)."""
    x = jax.random.normal(jax.random.key(24), (B, T, 32))
    cotangent = jax.random.normal(jax.random.key(25), (B, T, 32))
    bf16 = nn.MultiHeadDotProductAttention(num_heads=4, dtype=jnp.bfloat16)
    f32 = nn.MultiHeadDotProductAttention(num_heads=4, dtype=jnp.float32)
    params = bf16.init(jax.random.key(26), x, x)

    def loss(module):
        def fn(p, x, cotangent):
            out = module.apply(p, x, x, mask=nn.make_causal_mask(x[..., 0]))
            return jnp.sum(out.astype(jnp.float32) * cotangent)
        return fn

    args = (params, x, cotangent)
    assert passes.explain(loss(bf16), *args, pipeline=PIPELINE).counts["attention"] == 1
    truth = jax.grad(loss(f32))(*args)
    original = jax.grad(loss(bf16))(*args)
    optimized = jax.grad(passes.optimize(loss(bf16), PIPELINE))(*args)
    for t, o, g in zip(*(jax.tree.leaves(a) for a in (truth, original, optimized))):
        assert float(jnp.abs(g - t).max()) <= 2 * float(jnp.abs(o - t).max()) + 1e-3


def test_rewritten_inside_scan_over_layers():
    def fn(q, k, v):
        def layer(x, _):
            return causal_attention(x, k, v), None
        return jax.lax.scan(layer, q, None, length=2)[0]

    _rewritten(fn, *_qkv(7))


# -- masks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,args,inputs", [
    (causal_attention, (T, T), 3),
    (lambda q, k, v: _einsum_attention(q, k, v, mask=_tril(4, T, k=T - 4)), (4, T), 3),
    (lambda q, k, v: _einsum_attention(q, k, v, mask=_tril(4, T)), (4, T), 4),
    (lambda q, k, v: _einsum_attention(q, k, v, mask=~_tril(T, k=-1)), (T, T), 4),
    (lambda q, k, v: _einsum_attention(q, k, v, mask=_tril(T, k=-1), fill=-1e30), (T, T), 4),
], ids=["causal", "causal_end_aligned", "tril_start_aligned", "anti_causal", "tril_below"])
def test_causal_only_when_the_mask_is_the_causal_triangle(fn, args, inputs):
    tq, tk = args
    q, k, v = _qkv(8)
    q = q[:, :tq]
    k, v = k[:, :tk], v[:, :tk]
    _rewritten(fn, q, k, v)
    (call,) = _replacements(fn, q, k, v)
    assert len(call.invars) == inputs  # q, k, v (+ the mask when not causal)


def test_padding_mask_with_a_fully_padded_sequence():
    pad = jax.random.bernoulli(jax.random.key(9), 0.7, (B, T)).at[0].set(False)

    def fn(q, k, v, pad):
        return _einsum_attention(q, k, v, mask=pad[:, None, None, :], fill=-1e9)

    _rewritten(fn, *_qkv(10), pad)
    out = passes.optimize(fn, PIPELINE)(*_qkv(10), pad)
    np.testing.assert_allclose(out[0], jnp.broadcast_to(_qkv(10)[2][0].mean(0), out[0].shape),
                               rtol=1e-6, atol=1e-6)  # the original's uniform average


@pytest.mark.parametrize("fill", ["finfo_min", "-inf"])
def test_random_mask_with_fully_masked_rows_keeps_the_original(fill):
    mask = jax.random.bernoulli(jax.random.key(11), 0.5, (B, H, T, T)).at[:, :, 3].set(False)

    def fn(q, k, v, mask):
        f = jnp.finfo(jnp.float32).min if fill == "finfo_min" else -jnp.inf
        return _einsum_attention(q, k, v, mask=mask, fill=f)

    _rewritten(fn, *_qkv(12), mask)  # NaN rows (and gradients) in the same places for -inf
    out = passes.optimize(fn, PIPELINE)(*_qkv(12), mask)
    assert bool(jnp.isnan(out[:, 3]).all()) == (fill == "-inf")


def test_causal_and_padding_masks_combined():
    pad = jnp.array([[1] * T, [1] * 5 + [0] * 3], bool)

    def fn(q, k, v, pad):
        return jax.nn.dot_product_attention(q, k, v, mask=pad[:, None, None, :], is_causal=True)

    _rewritten(fn, *_qkv(13), pad)


# -- declined and not matched ------------------------------------------------------------------

def _declined(fn, *args, reason):
    report = passes.explain(fn, *args, pipeline=PIPELINE)
    assert report.counts["attention"] == 0
    reasons = [d.reason for d in report.declined]
    assert reasons and all(reason in r for r in reasons), reasons
    assert_equivalent(fn, passes.optimize(fn, PIPELINE), *args)


def test_declines_dropout():
    def fn(q, k, v, key):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
        p = jax.nn.softmax(s)
        keep = jax.random.bernoulli(key, 0.9, p.shape)
        return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, p / 0.9, 0), v)

    _declined(fn, *_qkv(14), jax.random.key(0), reason="dropout")


def test_declines_segment_ids():
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 1, 1, 1, 1, 1, 1]])

    def fn(q, k, v, seg):
        return _einsum_attention(q, k, v, mask=seg[:, None, :, None] == seg[:, None, None, :])

    _declined(fn, *_qkv(15), seg, reason="segment-id")


@pytest.mark.parametrize("fn", [
    lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                 local_window_size=(3, 0)),
    lambda q, k, v: _einsum_attention(
        q, k, v, mask=jnp.abs(jnp.arange(T)[:, None] - jnp.arange(T)[None]) <= 2),
], ids=["dpa_local_window", "band"])
def test_declines_sliding_windows(fn):
    _declined(fn, *_qkv(16), reason="sliding-window")


def test_declines_logit_soft_cap():
    def fn(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(30.0 * jnp.tanh(s / 30.0)), v)

    _declined(fn, *_qkv(17), reason="soft cap")


@pytest.mark.parametrize("precision", [jax.lax.Precision.HIGHEST,
                                       jax.lax.DotAlgorithmPreset.F32_F32_F32])
def test_declines_precision_the_kernel_cannot_honour(precision):
    def fn(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision) * 0.25
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)

    _declined(fn, *_qkv(18), reason="TF32")


def test_declines_float64_accumulation():
    with jax.enable_x64(True):
        def fn(q, k, v):
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float64)
            return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s * 0.25).astype(v.dtype), v)

        _declined(fn, *_qkv(18), reason="preferred_element_type=float64")


def test_declines_bias_after_mask_and_traced_scale():
    def bias_after(q, k, v, b):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
        s = jnp.where(_tril(T), s, -1e9) + b
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)

    def traced_scale(q, k, v, c):
        return _einsum_attention(q, k, v, scale=c)

    _declined(bias_after, *_qkv(19), jnp.ones((T, T)), reason="after the mask")
    _declined(traced_scale, *_qkv(19), jnp.float32(0.3), reason="not a scalar constant")


def test_softmax_over_the_wrong_axis_is_not_attention():
    def fn(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-2), v)

    report = passes.explain(fn, *_qkv(20), pipeline=PIPELINE.replace(debug=True))
    assert report.counts["attention"] == 0 and not report.declined
    assert any("does not contract the key axis" in m.reason
               for m in report.near_misses), [m.reason for m in report.near_misses]


def test_probabilities_used_elsewhere_are_declined():
    def fn(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
        p = jax.nn.softmax(s)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v), p

    _declined(fn, *_qkv(21), reason="used outside the match")


# -- kernels, gradients, models ----------------------------------------------------------------

def test_pallas_kernel_in_the_program_and_its_gradient():
    from pallas_kernels import attention

    q, k, v = _qkv(22, shape=(1, 16, 2, 16), kv_heads=2)
    optimized = passes.optimize(causal_attention, passes.default_pipeline(implementation="pallas"))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * jnp.arange(16.0)[None, :, None, None])

    direct = _pallas_calls(jax.make_jaxpr(jax.grad(
        loss(lambda q, k, v: attention(q, k, v, causal=True, implementation="pallas")),
        argnums=(0, 1, 2)))(q, k, v).jaxpr)
    assert _pallas_calls(jax.make_jaxpr(optimized)(q, k, v).jaxpr) == 1
    assert _pallas_calls(jax.make_jaxpr(jax.grad(loss(optimized), argnums=(0, 1, 2)))(
        q, k, v).jaxpr) == direct >= 2
    assert_equivalent(causal_attention, optimized, q, k, v)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_model_zoo_counts(name):
    """One attention per block (Llama's grouped-query included), one fused loss, same loss."""
    spec = models.get(name, seq_len=16)
    params = spec.init(jax.random.key(0))
    batch = spec.batch(jax.random.key(1), 2)
    report = passes.explain(spec.loss, params, batch)
    assert report.counts["attention"] == spec.config.num_layers
    assert report.counts["softmax_cross_entropy"] == 1
    assert not [d for d in report.declined if d.pass_name == "attention"]
    optimized = passes.optimize(spec.loss, passes.default_pipeline())
    got, want = optimized(params, batch), spec.loss(params, batch)
    assert math.isclose(float(got), float(want), rel_tol=1e-5)


def test_causal_rewrite_bakes_no_sequence_sized_constant():
    # the causal triangle stays an iota: a (T, S) constant in the program would be T * S bytes
    # of HLO (16 MB at 4096), read again at every compile
    T = 2048
    a = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)

    def fn(q, k, v):
        return _einsum_attention(q, k, v, mask=_tril(T), fill=-1e9)

    optimized = passes.optimize(fn, PIPELINE)
    assert passes.explain(fn, a, a, a, pipeline=PIPELINE).counts["attention"] == 1
    assert len(jax.jit(optimized).lower(a, a, a).as_text()) < T * T // 16
