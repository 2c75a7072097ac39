"""The layer_norm and rms_norm passes: spellings, numerics, kernels in the program, look-alikes."""
import jax
import jax.numpy as jnp
import pytest
from flax import linen, nnx
from jax import lax

import models
import passes
import pallas_kernels
from passes.testing import assert_equivalent, count_primitive

F32, BF16 = jnp.float32, jnp.bfloat16
D = 16


def rand(key, shape, dtype=F32, scale=1.0, offset=0.0):
    return (offset + scale * jax.random.normal(jax.random.key(key), shape)).astype(dtype)


def x_of(dtype=F32):
    # An offset mean makes E[x^2] - E[x]^2 lose digits, as in real activations.
    return rand(0, (2, 5, D), dtype, scale=2.0, offset=3.0)


def counts(fn, *args, **pipeline_options):
    return passes.explain(fn, *args, pipeline=passes.default_pipeline(**pipeline_options)).counts


def bf16_inside(fn):
    """fn on a bf16 x, behind float32 inputs and outputs.

    passes.testing compares bfloat16 arrays exactly (numpy does not count bfloat16 as inexact),
    so bf16 programs are checked through a float32 interface.
    """
    return lambda x, *rest: fn(x.astype(BF16), *rest).astype(F32)


def check(fn, *args, layer_norm=0, rms_norm=0):
    """The rewrite count is as expected and values and gradients hold (default pipeline)."""
    c = counts(fn, *args)
    assert (c["layer_norm"], c["rms_norm"]) == (layer_norm, rms_norm), c
    assert_equivalent(fn, passes.optimize(fn), *args)


# -- LayerNorm -----------------------------------------------------------------------------------

def nnx_layer_norm(dtype=None, **kw):
    module = nnx.LayerNorm(D, dtype=dtype, rngs=nnx.Rngs(0), **kw)
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda p: p + rand(1, p.shape, p.dtype, 0.3), state)
    return (lambda x, s: nnx.merge(graphdef, s)(x)), state


def test_flax_nnx_layer_norm():
    fn, state = nnx_layer_norm()
    check(fn, x_of(), state, layer_norm=1)
    fn, state = nnx_layer_norm(dtype=BF16)
    check(bf16_inside(fn), x_of(), state, layer_norm=1)


def test_flax_nnx_layer_norm_bf16_is_one_kernel_call_on_bf16():
    fn, state = nnx_layer_norm(dtype=BF16)
    report = passes.explain(fn, x_of(BF16), state, pipeline=passes.default_pipeline())
    (rewrite,) = report.rewrites
    assert rewrite.rule == "layer_norm_cast"  # the upcast and the cast back are inside


def test_flax_linen_layer_norm_without_bias():
    module = linen.LayerNorm(use_bias=False, epsilon=1e-3)
    params = module.init(jax.random.key(0), x_of())
    params = jax.tree.map(lambda p: p + rand(2, p.shape, p.dtype, 0.3), params)
    check(lambda x, p: module.apply(p, x), x_of(), params, layer_norm=1)


def test_hand_written_two_pass_divided_by_sqrt():
    def fn(x, w, b):
        mean = x.mean(-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
        return w * (x - mean) / jnp.sqrt(var + 1e-5) + b

    check(fn, x_of(), rand(3, (D,)), rand(4, (D,)), layer_norm=1)


def test_hand_written_var_and_rsqrt_without_scale_or_bias():
    def fn(x):
        mean = jnp.mean(x, axis=-1)[..., None]
        return (x - mean) * lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + 1e-6)

    check(fn, x_of(), layer_norm=1)


def test_hand_written_fast_variance_with_sum_times_reciprocal():
    def fn(x, w):
        n = x.shape[-1]
        mean = x.sum(-1, keepdims=True) * (1 / n)
        var = (x * x).sum(-1, keepdims=True) * (1 / n) - mean ** 2
        return (x - mean) * (1 / jnp.sqrt(var + 1e-5)) * w

    check(fn, x_of(), rand(3, (D,)), layer_norm=1)


def test_bf16_upcast_by_hand():
    def fn(x, w, b):
        x32 = x.astype(F32)
        mean = x32.mean(-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(((x32 - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
        return (y * w + b).astype(x.dtype)

    check(bf16_inside(fn), x_of(), rand(3, (D,)), rand(4, (D,)), layer_norm=1)


def test_eps_is_captured():
    def make(eps):
        return lambda x: (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + eps)

    for eps in (1e-2, 1e-12):
        check(make(eps), x_of(), layer_norm=1)


def test_wrong_axis_does_not_match_and_says_why():
    def fn(x):
        mean = x.mean(1, keepdims=True)
        return (x - mean) * lax.rsqrt(((x - mean) ** 2).mean(1, keepdims=True) + 1e-5)

    report = passes.explain(fn, x_of(), pipeline=passes.default_pipeline(debug=True))
    assert report.counts["layer_norm"] == 0 and report.counts["rms_norm"] == 0
    reasons = {n.reason for n in report.near_misses if n.pass_name == "layer_norm"}
    assert "reduce_sum axes (1,) != (2,)" in reasons


def test_mean_dividing_by_the_wrong_count_does_not_match():
    def fn(x):
        mean = x.sum(-1, keepdims=True) / (D - 1)
        return (x - mean) * lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)

    report = passes.explain(fn, x_of(), pipeline=passes.default_pipeline(debug=True))
    assert report.counts["layer_norm"] == 0
    assert any(n.reason == f"mean: divides by {D - 1}.0 over an axis of {D}"
               for n in report.near_misses)


def test_statistic_used_elsewhere_declines():
    def fn(x):
        mean = x.mean(-1, keepdims=True)
        var = (x * x).mean(-1, keepdims=True) - mean * mean
        return (x - mean) * lax.rsqrt(var + 1e-5), var

    report = passes.explain(fn, x_of(), pipeline=passes.default_pipeline())
    assert report.counts["layer_norm"] == 0
    assert any(d.pass_name == "layer_norm" and "is also used outside the match" in d.reason
               for d in report.declined)
    assert_equivalent(fn, passes.optimize(fn), x_of())


def test_float64_declines():
    def fn(x):
        return (x - x.mean(-1, keepdims=True)) * lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)

    with jax.enable_x64(True):
        report = passes.explain(fn, jnp.ones((2, D), jnp.float64),
                                pipeline=passes.default_pipeline())
    assert report.counts["layer_norm"] == 0
    assert [d.reason for d in report.declined if d.pass_name == "layer_norm"] == [
        "the kernel computes in float32; this norm runs in float64"]


# -- RMSNorm -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16])
def test_flax_nnx_rms_norm(dtype):
    module = nnx.RMSNorm(D, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda p: p + rand(1, p.shape, p.dtype, 0.3), state)
    fn = lambda x, s: nnx.merge(graphdef, s)(x)  # noqa: E731
    check(bf16_inside(fn) if dtype == BF16 else fn, x_of(), state, rms_norm=1)


def test_hand_written_rms_norms():
    def rsqrt_form(x, w):
        return x * lax.rsqrt(jnp.mean(x ** 2, -1, keepdims=True) + 1e-6) * w

    def sqrt_form(x):
        return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5)

    def upcast_form(x, w):
        x32 = x.astype(F32)
        y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + 1e-6)
        return (y * w).astype(x.dtype)

    check(rsqrt_form, x_of(), rand(3, (D,)), rms_norm=1)
    check(sqrt_form, x_of(), rms_norm=1)
    check(bf16_inside(upcast_form), x_of(), rand(3, (D,)), rms_norm=1)


def test_gemma_one_plus_scale():
    def before_broadcast(x, w):
        return x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + w)

    def after_broadcast(x, w):
        normed = x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
        return normed * (jnp.broadcast_to(w, x.shape) + 1.0)

    w = rand(3, (D,), scale=0.1)
    check(before_broadcast, x_of(), w, rms_norm=1)
    check(after_broadcast, x_of(), w, rms_norm=1)
    report = passes.explain(after_broadcast, x_of(), w, pipeline=passes.default_pipeline())
    assert "add" not in report.jaxpr_after.rsplit("in {", 1)[-1].split("jit[")[0]


def test_rms_wrong_axis_or_other_x_does_not_match():
    def wrong_axis(x):
        return x * lax.rsqrt(jnp.mean(x * x, 0, keepdims=True) + 1e-6)

    def other_x(x, y):
        return y * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)

    assert counts(wrong_axis, x_of())["rms_norm"] == 0
    assert counts(other_x, x_of(), x_of())["rms_norm"] == 0


# -- kernels in the program, forward and backward ------------------------------------------------

def _pallas_calls_per_site(kernel, *args):
    """pallas_calls of one kernel call: (forward program, gradient program)."""
    fwd = jax.make_jaxpr(lambda *a: kernel(*a, implementation="pallas"))(*args)
    grad = jax.make_jaxpr(jax.grad(lambda *a: kernel(*a, implementation="pallas").sum(),
                                   argnums=tuple(range(len(args)))))(*args)
    return count_primitive(fwd, "pallas_call"), count_primitive(grad, "pallas_call")


def test_pallas_kernels_replace_both_norms_forward_and_backward():
    def fn(x, w, b, v):
        h = nn_layer_norm(x, w, b)
        return x * lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * v + h

    def nn_layer_norm(x, w, b):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * w + b

    def loss(*args):
        return fn(*args).sum()

    args = (x_of(), rand(3, (D,)), rand(4, (D,)), rand(5, (D,)))
    pipe = passes.default_pipeline(implementation="pallas")
    # h feeds the RMS statistic but x is normalised: not an RMSNorm of one value.
    c = passes.explain(fn, *args, pipeline=pipe).counts
    assert (c["layer_norm"], c["rms_norm"]) == (1, 0)
    ln_fwd, ln_grad = _pallas_calls_per_site(pallas_kernels.layer_norm, *args[:3])
    assert ln_fwd >= 1 and ln_grad > ln_fwd
    optimized = passes.optimize(fn, pipe)
    assert count_primitive(jax.make_jaxpr(optimized)(*args), "pallas_call") == ln_fwd
    grad_jaxpr = jax.make_jaxpr(jax.grad(passes.optimize(loss, pipe), argnums=(0, 1, 2, 3)))(*args)
    assert count_primitive(grad_jaxpr, "pallas_call") == ln_grad
    assert_equivalent(fn, optimized, *args)


def test_pallas_rms_norm_forward_and_backward_bf16():
    module = nnx.RMSNorm(D, dtype=BF16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)

    def loss(x, s):
        return nnx.merge(graphdef, s)(x.astype(BF16)).astype(F32).sum()

    pipe = passes.default_pipeline(implementation="pallas")
    x = x_of()
    rms_fwd, rms_grad = _pallas_calls_per_site(pallas_kernels.rms_norm, x.astype(BF16),
                                               rand(1, (D,), BF16))
    optimized = passes.optimize(loss, pipe)
    assert count_primitive(jax.make_jaxpr(optimized)(x, state), "pallas_call") == rms_fwd
    grad = jax.make_jaxpr(jax.grad(optimized, argnums=(0, 1)))(x, state)
    assert count_primitive(grad, "pallas_call") == rms_grad
    assert_equivalent(loss, optimized, x, state)


# -- the model zoo -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,layers,pass_name", [
    ("gpt2-tiny", 3, "layer_norm"), ("gpt2-tiny-linen", 2, "layer_norm"),
    ("llama-tiny", 3, "rms_norm")])
def test_model_zoo_counts(name, layers, pass_name):
    spec = models.get(name, num_layers=layers)
    params = jax.eval_shape(spec.init, jax.random.key(0))
    batch = jax.eval_shape(lambda k: spec.batch(k, 2), jax.random.key(0))
    c = passes.explain(spec.loss, params, batch, pipeline=passes.default_pipeline()).counts
    assert c[pass_name] == 2 * layers + 1  # two per block and the final norm
    assert c["layer_norm" if pass_name == "rms_norm" else "rms_norm"] == 0
