"""Adversarial programs for the attention pass: fills that are not masks, rows without keys,
biases made from the logits, iota biases, zero-size operands, dead uses, and real spellings
(a padding bias handed to Flax, grouped-query logits reshaped around the softmax).

Each compares `passes.optimize(f)` with `f` itself, values and gradients, with the default
implementation and with the Pallas kernels (interpret mode on a CPU)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import passes
from passes.testing import assert_equivalent, count_primitive

T, D = 6, 8
IMPLEMENTATIONS = [None, "pallas"]


def _arrays(seed, *shapes):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s) for k, s in zip(keys, shapes)]


def _mask(seed, empty_row, shape=(T, T)):
    return jax.random.bernoulli(jax.random.key(seed), 0.5, shape).at[empty_row].set(False)


def _pipeline(implementation):
    return passes.default_pipeline(implementation=implementation)


def _rewritten(fn, *args, implementation=None):
    report = passes.explain(fn, *args, pipeline=_pipeline(implementation))
    assert report.counts["attention"] == 1, report.declined
    assert_equivalent(fn, passes.optimize(fn, _pipeline(implementation)), *args)
    return report


def _declined(fn, *args, reason, implementation=None):
    report = passes.explain(fn, *args, pipeline=_pipeline(implementation))
    assert report.counts["attention"] == 0
    reasons = [d.reason for d in report.declined if d.pass_name == "attention"]
    assert reasons and all(reason in r for r in reasons), reasons
    assert_equivalent(fn, passes.optimize(fn, _pipeline(implementation)), *args)


# -- fills and rows without keys ------------------------------------------------------------------

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_minus_inf_bias_gives_nan_rows_and_gradients_like_the_original(implementation):
    def fn(q, k, v, m):
        return jax.nn.softmax(q @ k.T + jnp.where(m, 0.0, -jnp.inf)) @ v

    args = (*_arrays(1, (T, D), (T, D), (T, D)), _mask(1, 2))
    _rewritten(fn, *args, implementation=implementation)
    assert bool(jnp.isnan(passes.optimize(fn, _pipeline(implementation))(*args)[2]).all())


def _finfo_min_bias(q, k, v, m):
    return jax.nn.softmax(q @ k.T + jnp.where(m, 0.0, jnp.finfo(jnp.float32).min)) @ v


def test_finfo_min_bias_averages_fully_masked_rows():
    args = (*_arrays(2, (T, D), (T, D), (T, D)), _mask(2, 3))
    _rewritten(_finfo_min_bias, *args)


def test_finfo_min_bias_values_with_the_pallas_kernel():
    args = (*_arrays(2, (T, D), (T, D), (T, D)), _mask(2, 3))
    optimized = passes.optimize(_finfo_min_bias, _pipeline("pallas"))
    assert_equivalent(_finfo_min_bias, optimized, *args, grads=False)
    assert jnp.allclose(optimized(*args)[3], args[2].mean(0), atol=1e-6)  # not zeros


def test_finfo_min_bias_gradients_with_the_pallas_kernel():
    args = (*_arrays(2, (T, D), (T, D), (T, D)), _mask(2, 3))
    assert_equivalent(_finfo_min_bias, passes.optimize(_finfo_min_bias, _pipeline("pallas")),
                      *args)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_two_masks_with_different_finite_fills_are_declined(implementation):
    def fn(q, k, v, m1, m2):
        return jax.nn.softmax(jnp.where(m2, jnp.where(m1, q @ k.T, -1e9), -1e4)) @ v

    args = (*_arrays(3, (T, D), (T, D), (T, D)), _mask(3, 2), _mask(4, 4))
    _declined(fn, *args, reason="different fill values", implementation=implementation)


def test_two_masks_with_different_fills_rewritten_when_no_row_can_be_empty():
    def fn(q, k, v):
        tri = jnp.tril(jnp.ones((T, T), bool))
        return jax.nn.softmax(jnp.where(tri, jnp.where(tri, q @ k.T, -1e30), -1e9)) @ v

    _rewritten(fn, *_arrays(5, (T, D), (T, D), (T, D)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fill_is_judged_after_later_scaling(implementation):
    def fn(q, k, v, m):
        return jax.nn.softmax(jnp.where(m, q @ k.T, -1e4) * 1e-4) @ v

    args = (*_arrays(6, (T, D), (T, D), (T, D)), _mask(6, 1))
    _declined(fn, *args, reason="at the softmax input", implementation=implementation)


def test_fill_scaled_into_minus_inf_gives_nan_rows():
    def fn(q, k, v, m):  # finfo.min * 4 overflows: the masked logits are -inf
        return jax.nn.softmax(jnp.where(m, q @ k.T, jnp.finfo(jnp.float32).min) * 4.0) @ v

    args = (*_arrays(7, (T, D), (T, D), (T, D)), _mask(7, 0))
    _rewritten(fn, *args)
    assert bool(jnp.isnan(passes.optimize(fn)(*args)[0]).all())


def test_data_bias_of_minus_inf_on_every_kept_key():
    def fn(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True)

    q, k, v = _arrays(8, (1, T, 2, D), (1, T, 2, D), (1, T, 2, D))
    bias = jnp.zeros((1, 2, T, T)).at[0, 1, 3, :4].set(-jnp.inf)  # row 3 of head 1: keys 0..3
    _rewritten(fn, q, k, v, bias)


# -- biases that are not plain inputs ---------------------------------------------------------------

@pytest.mark.parametrize("implementation", [None])
def test_logits_added_to_themselves(implementation):
    def fn(q, k, v):
        s = jnp.einsum("qd,kd->qk", q, q)
        return jax.nn.softmax(s + s) @ v

    _rewritten(fn, *_arrays(9, (T, D), (T, D), (T, D)), implementation=implementation)


def test_bias_computed_from_the_logits_is_declined():
    def fn(q, k, v):
        s = q @ k.T
        return jax.nn.softmax(s + jnp.tanh(s)) @ v

    _declined(fn, *_arrays(10, (T, D), (T, D), (T, D)), reason="computed from the logits")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_iota_bias(implementation):
    def fn(q, k, v):
        return jax.nn.softmax(q @ k.T + jnp.arange(6.0)) @ v

    _rewritten(fn, *_arrays(11, (T, D), (T, D), (T, D)), implementation=implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_zero_keys_are_declined(implementation):
    def fn(q, k, v):
        return jax.nn.softmax(q @ k.T) @ v

    q, = _arrays(12, (T, D))
    _declined(fn, q, jnp.zeros((0, D)), jnp.zeros((0, D)), reason="zero-size",
              implementation=implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dead_use_of_the_probabilities(implementation):
    def fn(y, w):
        h = y @ w
        s = jax.nn.softmax(h + h, axis=-1)
        unused = jnp.maximum(s, h)  # noqa: F841  (a dead use)
        return s @ w

    _rewritten(fn, *_arrays(13, (4, 8), (8, 8)), implementation=implementation)


# -- spellings from real code -----------------------------------------------------------------------

class _Encoder(nn.Module):
    """A BERT-style encoder layer's attention: the padding mask becomes an additive bias."""

    @nn.compact
    def __call__(self, x, attention_mask):
        q, k, v = (nn.DenseGeneral((4, D), name=n)(x) for n in ("query", "key", "value"))
        attention_mask = jnp.expand_dims(attention_mask, axis=(-3, -2))
        bias = lax.select(attention_mask > 0, jnp.full(attention_mask.shape, 0.0).astype(x.dtype),
                          jnp.full(attention_mask.shape, jnp.finfo(x.dtype).min).astype(x.dtype))
        weights = nn.dot_product_attention_weights(q, k, bias=bias, deterministic=True)
        return jnp.einsum("...hqk,...khd->...qhd", weights, v)


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_encoder_padding_bias(implementation):
    x = jax.random.normal(jax.random.key(14), (2, T, 32))
    padding = jnp.array([[1] * T, [1] * 3 + [0] * 3], jnp.int32)
    module = _Encoder()
    params = module.init(jax.random.key(15), x, padding)

    def fn(params, x):
        return module.apply(params, x, padding)

    report = _rewritten(fn, params, x, implementation=implementation)
    assert [r.rule for r in report.rewrites if r.pass_name == "attention"] == ["softmax_attention"]


def _grouped_query(q, k, v):
    """GQA: queries reshaped into (kv_heads, groups), logits and probabilities reshaped back to
    one head axis around the softmax."""
    B, S, H, _ = q.shape
    kv = k.shape[2]
    qg = q.reshape(B, S, kv, H // kv, D)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k) / jnp.sqrt(D)
    p = jax.nn.softmax(s.reshape(B, H, S, S), axis=-1).reshape(B, kv, H // kv, S, S)
    return jnp.einsum("bkgqs,bskd->bqkgd", p, v).reshape(B, S, H, D)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_grouped_query_logits_reshaped_around_the_softmax(implementation):
    q, k, v = _arrays(16, (2, T, 4, D), (2, T, 2, D), (2, T, 2, D))
    _rewritten(_grouped_query, q, k, v, implementation=implementation)
    if implementation == "pallas":
        optimized = passes.optimize(_grouped_query, _pipeline("pallas"))
        assert count_primitive(jax.make_jaxpr(optimized)(q, k, v), "pallas_call") == 1



def _grouped_query_masked(q, k, v, mask, bias):
    """GQA with an additive bias, then a `where` mask filled with finfo.min."""
    B, S, H, _ = q.shape
    kv = k.shape[2]
    qg = q.reshape(B, S, kv, H // kv, D)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k).reshape(B, H, S, S) / jnp.sqrt(D) + bias
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).reshape(B, kv, H // kv, S, S)
    return jnp.einsum("bkgqs,bskd->bqkgd", p, v).reshape(B, S, H, D)


@pytest.mark.parametrize("per_head", [False, True], ids=["padding", "per_head"])
def test_grouped_query_rows_with_minus_inf_at_every_kept_key(per_head):
    """A row whose kept keys all have a -inf bias: the original's softmax puts all its weight on
    the finfo.min-filled keys, averaging v over them (of the row's kv head)."""
    q, k, v = _arrays(17, (2, T, 6, D), (2, T, 2, D), (2, T, 2, D))  # groups of 3
    b, t, h = 0, 2, 1  # query head 1 reads kv head 0
    if per_head:
        mask = jax.random.bernoulli(jax.random.key(18), 0.6, (2, 6, T, T)).at[b, h, t, 0].set(False)
        kept = mask[b, h, t]
    else:  # the last two keys of batch row 0 are padding
        mask = jnp.ones((2, 1, 1, T), bool).at[b, ..., T - 2:].set(False)
        kept = mask[b, 0, 0]
    bias = jnp.zeros((2, 6, T, T)).at[b, h, t].set(-jnp.inf)
    _rewritten(_grouped_query_masked, q, k, v, mask, bias)
    out = passes.optimize(_grouped_query_masked, _pipeline(None))(q, k, v, mask, bias)
    filled = ~kept
    want = (filled[:, None] * v[b, :, h // 3]).sum(0) / filled.sum()
    np.testing.assert_allclose(out[b, t, h], want, rtol=1e-5, atol=1e-6)
