"""Adversarial programs aimed at the engine's edges: constant folding, CSE of stateful ops, NNX
modules however they are passed, static arguments, site selection and the fail-safe.

Each test compares `passes.optimize(f)` with `jax.jit(f)` itself (or the plain function, for NNX
state), on programs written as a user would write them.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import passes
from passes import _compat as C
from passes.pipeline import Pass


def same_as_jit(f, *args):
    got, want = passes.optimize(f)(*args), jax.jit(f)(*args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.asarray(got).dtype == np.asarray(want).dtype
    return got


# -- constant folding is XLA's own arithmetic ---------------------------------------------------

@pytest.mark.parametrize("f, arg", [
    (lambda x: x + (jnp.int32(6) & 3) + 10 * lax.bitwise_or(jnp.int32(4), 2)
     + 100 * lax.bitwise_not(jnp.int32(5)), jnp.int32(1)),
    (lambda x: x + ~jnp.uint8(1), jnp.uint8(0)),
    (lambda x: x ^ (jnp.uint32(0xFFFFFFF0) >> 2), jnp.uint32(7)),
    (lambda x: x + lax.shift_left(jnp.int8(64), jnp.int8(1)), jnp.int8(0)),  # wraps to -128
    (lambda x: x + jnp.int32(2**31 - 1) + jnp.int32(1), jnp.int32(0)),  # integer overflow wraps
    (lambda x: x + lax.convert_element_type(jnp.float32(3e9) + 1.0, jnp.int32), jnp.int32(0)),
    (lambda x: x + lax.convert_element_type(jnp.float32(-1e20), jnp.int16), jnp.int16(0)),
    (lambda x: x + lax.convert_element_type(jnp.float32(jnp.nan), jnp.int32), jnp.int32(0)),
    (lambda x: x + lax.convert_element_type(jnp.float32(300.7), jnp.uint8), jnp.uint8(0)),
    (lambda x: x * (jnp.float32(1e38) * 10.0), jnp.float32(2.0)),  # inf
    (lambda x: x + jnp.sqrt(jnp.float32(-1.0)), jnp.float32(1.0)),  # nan
], ids=["bitwise", "uint8-not", "uint32-shift-xor", "int8-shift", "int-overflow",
        "f2i-saturate", "f2i16-saturate", "nan-to-int", "f2u8", "overflow-inf", "sqrt-negative"])
def test_folding_matches_xla(f, arg):
    same_as_jit(f, arg)


def test_complex_literals_fold_and_run():
    f = lambda x: jnp.exp(1j * x) + (2 + 3j) * (1 - 1j)
    x = jnp.linspace(-1, 1, 5, dtype=jnp.float32)
    np.testing.assert_allclose(passes.optimize(f)(x), jax.jit(f)(x), rtol=1e-6)


def test_folded_programs_keep_their_report_counts():
    report = passes.explain(lambda x: x * jnp.sqrt(jnp.float32(8.0)), jnp.ones(3))
    assert report.counts["canonicalize"] >= 1
    assert "sqrt" not in report.jaxpr_after


# -- CSE merges only pure equations ------------------------------------------------------------

def test_cse_never_merges_stateful_draws():
    f = lambda x: x + lax.rng_uniform(0.0, 1.0, (64,)) - lax.rng_uniform(0.0, 1.0, (64,))
    out = passes.optimize(f)(jnp.zeros(64))
    assert np.any(np.asarray(out) != 0.0)
    assert passes.explain(f, jnp.zeros(64)).counts["cse"] == 0


def test_cse_reports_the_equations_it_merged():
    f = lambda x: jnp.sin(x) * jnp.sin(x) + jnp.cos(x) * jnp.cos(x)
    assert passes.explain(f, jnp.ones(3)).counts["cse"] == 2


def test_cse_leaves_primitives_it_does_not_know_alone():
    def host(v):
        return np.asarray(v) * 2

    def f(x):
        spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.pure_callback(host, spec, x) + jax.pure_callback(host, spec, x)

    report = passes.explain(f, jnp.ones(3))
    assert report.counts["cse"] == 0
    assert report.jaxpr_after.count("pure_callback") == 2


# -- NNX modules anywhere among the arguments --------------------------------------------------

X = jax.random.normal(jax.random.key(0), (8, 4))


def batch_norms(n=2):
    return [nnx.BatchNorm(4, rngs=nnx.Rngs(0)) for _ in range(n)]


def assert_same_statistics(a, b):
    np.testing.assert_allclose(a.mean[...], b.mean[...], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.var[...], b.var[...], rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(a.mean[...]).sum()) > 0  # the statistics did move


def test_module_passed_by_keyword_is_updated():
    f = lambda x, model: model(x).sum()
    bn, ref = batch_norms()
    passes.optimize(f)(X, model=bn)
    f(X, model=ref)
    assert_same_statistics(bn, ref)


def test_modules_inside_containers_are_updated_and_shared_references_stay_shared():
    f = lambda x, ms: ms[0](x).sum() + ms[1]["again"](x * 2).sum()
    bn, ref = batch_norms()
    passes.optimize(f)(X, [bn, {"again": bn}])
    f(X, [ref, {"again": ref}])
    assert_same_statistics(bn, ref)


def test_the_same_module_twice_keeps_both_updates():
    f = lambda a, b, x: b(a(x)).sum()
    bn, ref = batch_norms()
    passes.optimize(f)(bn, bn, X)
    f(ref, ref, X)
    assert_same_statistics(bn, ref)


def test_dropout_by_keyword_draws_a_new_mask_each_call():
    drop = nnx.Dropout(0.5, rngs=nnx.Rngs(3))
    opt = passes.optimize(lambda x, d: d(x))
    a, b = opt(jnp.ones(64), d=drop), opt(jnp.ones(64), d=drop)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("outer", ["jit", "vmap", "grad"])
def test_module_closed_over_by_an_outer_transform(outer):
    lin = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    plain = lambda m, x: jnp.tanh(m(x)).sum()
    opt = passes.optimize(plain)
    if outer == "jit":
        got, want = jax.jit(lambda x: opt(lin, x))(X), jax.jit(lambda x: plain(lin, x))(X)
    elif outer == "vmap":
        got, want = jax.vmap(lambda x: opt(lin, x))(X), jax.vmap(lambda x: plain(lin, x))(X)
    else:
        got, want = jax.grad(opt, argnums=1)(lin, X), jax.grad(plain, argnums=1)(lin, X)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# -- static arguments as under jax.jit ---------------------------------------------------------

def scaled(x, n):
    return x * 2 if n > 1 else x  # a Python branch on n: n must be static


@pytest.mark.parametrize("how", [dict(static_argnums=1), dict(static_argnames="n")])
@pytest.mark.parametrize("given", ["positional", "keyword"])
def test_static_arguments_by_position_or_keyword(how, given):
    opt = passes.optimize(scaled, **how)
    x = jnp.arange(3.0)
    got = opt(x, 3) if given == "positional" else opt(x, n=3)
    np.testing.assert_array_equal(got, jax.jit(scaled, **how)(x, 3))


def test_explain_takes_static_arguments():
    report = passes.explain(scaled, jnp.ones(3), 3, static_argnums=1)
    assert "mul" in report.jaxpr_after
    report = passes.explain(scaled, jnp.ones(3), n=1, static_argnames="n")
    assert "mul" not in report.jaxpr_after


# -- site selection and the fail-safe ----------------------------------------------------------

def attention(q, k, v):
    return jax.nn.softmax(jnp.einsum("qd,kd->qk", q, k) / 4.0, axis=-1) @ v


def test_selecting_a_site_that_does_not_exist_is_an_error():
    q = jnp.ones((8, 16))
    pipe = passes.default_pipeline().replace(sites=["attention/7"])
    with pytest.raises(ValueError, match=r"attention/7.*its sites are \['attention/0'\]"):
        passes.explain(attention, q, q, q, pipeline=pipe)


class _BreaksTheProgram(Pass):
    """Deletes the first equation whose result is used: a bug any pass could have."""
    name = "breaks_the_program"

    def run(self, region, ctx):
        if not region.eqns or region.path:
            return 0
        region.set_eqns(region.eqns[1:])
        return 1


def test_a_pass_that_breaks_the_program_falls_back_to_the_original_with_a_warning():
    f = lambda x: jnp.sin(x) * 3.0
    pipe = passes.Pipeline([_BreaksTheProgram()], check=False)
    x = jnp.arange(4.0)
    with pytest.warns(RuntimeWarning, match="breaks_the_program.*used by `mul` before it is defined"):
        got = passes.optimize(f, pipe)(x)
    np.testing.assert_array_equal(got, jax.jit(f)(x))


def test_undefined_use_is_found_inside_nested_bodies():
    from passes.pipeline import undefined_use
    closed = jax.make_jaxpr(lambda x: jax.jit(lambda y: jnp.sin(y) * 2.0)(x))(1.0)
    assert undefined_use(closed) is None
    outer = C.open_jaxpr(closed)
    call = outer.eqns[0]
    inner = call.params["jaxpr"]
    broken_inner = C.with_eqns(inner, C.open_jaxpr(inner).eqns[1:])  # drop `sin`
    broken = C.with_eqns(closed, [call.replace(params={**call.params, "jaxpr": broken_inner})])
    assert "inside `jit`" in undefined_use(broken)
    assert "before it is defined" in undefined_use(broken)


# -- NNX module paths in the report ------------------------------------------------------------

class _Block(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.proj = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.proj(self.norm(x)))


class _Stack(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([_Block(rngs) for _ in range(2)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_nnx_rewrites_name_their_module_path():
    net = _Stack(nnx.Rngs(0))
    f = lambda m, x: m(x).sum()
    x = jax.random.normal(jax.random.key(1), (4, 16))
    report = passes.explain(f, net, x)
    paths = {(r.pass_name, r.module_path) for r in report.rewrites}
    assert {("layer_norm", "blocks/0/norm"), ("layer_norm", "blocks/1/norm"),
            ("dense_act", "blocks/0"), ("dense_act", "blocks/1")} <= paths
    assert all("test_adversarial_engine.py" in r.location for r in report.rewrites)
    assert type(net.blocks[0]) is _Block  # the caller's modules are untouched
    np.testing.assert_allclose(passes.optimize(f)(net, x), f(net, x), rtol=1e-5)


# -- which kernel implementation each rewrite runs ---------------------------------------------

def _layer_norm(x, g, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / jnp.sqrt(v + 1e-5) * g + b


@pytest.mark.parametrize("implementation, expected, why", [
    (None, "xla", "layer_norm: the default where kernels are not timed"),
    ("pallas", "pallas", "layer_norm: forced"),
    (["pallas", "xla"], "pallas", "layer_norm: first of the requested list"),
])
def test_rewrites_say_which_implementation_they_run_and_why(implementation, expected, why):
    x = jax.random.normal(jax.random.key(1), (4, 128))
    report = passes.explain(_layer_norm, x, x[0], x[0],
                            pipeline=passes.default_pipeline(implementation=implementation))
    (rewrite,) = report.rewrites
    assert (rewrite.implementation, rewrite.implementation_reason) == (expected, why)


def test_a_fallback_after_a_decline_is_reported_with_the_reason():
    x = jax.random.normal(jax.random.key(1), (4, 0))  # nothing to tile: the kernel declines
    w = jnp.ones((0, 8))
    f = lambda x, w, b: jax.nn.relu(x @ w + b)
    report = passes.explain(f, x, w, jnp.ones(8),
                            pipeline=passes.default_pipeline(implementation=["pallas", "xla"]))
    (rewrite,) = report.rewrites
    assert rewrite.implementation == "xla"
    assert rewrite.implementation_reason.startswith("dense_act: fallback after pallas: d_in = 0")


@pytest.mark.parametrize("implementation", [None, "pallas"])
@pytest.mark.parametrize("x_shape, w_shape", [((3, 0), (0, 8)), ((0, 4), (4, 8)), ((3, 4), (4, 0))])
def test_dense_with_zero_size_operands(implementation, x_shape, w_shape):
    f = lambda x, w, b: jax.nn.relu(x @ w + b)
    x, w = jnp.ones(x_shape), jnp.ones(w_shape)
    b = jnp.arange(w_shape[1], dtype=jnp.float32) - 2
    opt = passes.optimize(f, passes.default_pipeline(implementation=implementation))
    np.testing.assert_array_equal(opt(x, w, b), jax.jit(f)(x, w, b))


# -- forward mode falls back to the original wherever it reaches an optimized call --------------

def _norm_sum(x, g):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (((x - m) / jnp.sqrt(v + 1e-5)) * g).sum()


def _in_a_scan(fn, g):
    return lambda x: lax.scan(lambda c, _: (c + fn(x * c, g), None), 1.0, None, length=2)[0]


@pytest.mark.parametrize("mode", ["linearize", "jvp_of_scan", "jvp_of_jit", "jacfwd", "hessian"])
def test_forward_mode_reaching_a_replacement_runs_the_original(mode):
    opt = passes.optimize(_norm_sum, passes.default_pipeline(implementation="pallas"))
    x = jax.random.normal(jax.random.key(0), (4, 128))
    g = 1 + 0.1 * jax.random.normal(jax.random.key(1), (128,))
    if mode == "linearize":
        got, want = (jax.linearize(fn, x, g)[1](x, g) for fn in (opt, _norm_sum))
    elif mode == "jvp_of_scan":
        got, want = (jax.jvp(_in_a_scan(fn, g), (x,), (x,))[1] for fn in (opt, _norm_sum))
    elif mode == "jvp_of_jit":
        got, want = (jax.jvp(jax.jit(fn), (x, g), (x, g))[1] for fn in (opt, _norm_sum))
    elif mode == "jacfwd":
        got, want = (jax.jacfwd(fn, argnums=1)(x, g) for fn in (opt, _norm_sum))
    else:
        got, want = (jax.hessian(lambda g: fn(x[:2, :16], g))(g[:16]) for fn in (opt, _norm_sum))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_reverse_mode_still_runs_the_kernels():
    opt = passes.optimize(_norm_sum, passes.default_pipeline(implementation="pallas"))
    x, g = jnp.ones((4, 128)), jnp.ones(128)
    from passes.testing import count_primitive
    assert count_primitive(jax.make_jaxpr(jax.grad(opt))(x, g), "pallas_call") >= 2
