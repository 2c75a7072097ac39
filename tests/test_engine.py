"""The rewrite engine: nested bodies, effects, transformations, caching, errors, switches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import passes
from passes import Match, NoMatch, Pipeline, RulePass
from passes.rewrite import FunctionRule
from passes.testing import assert_equivalent


# -- a rule under test: exp(x) -> a custom_vjp exp, as a kernel replacement would be ------------

@jax.custom_vjp
def kernel_exp(x):
    return jnp.exp(x)


kernel_exp.defvjp(lambda x: (jnp.exp(x), jnp.exp(x)), lambda e, g: (g * e,))


def _match_exp(region, pos):
    eqn = region.eqns[pos]
    return Match(root=pos, eqns=frozenset([pos]), inputs=tuple(eqn.invars),
                 outputs=tuple(eqn.outvars), replacement=kernel_exp)


def exp_pass():
    return RulePass("exp", [FunctionRule("exp", [lax.exp_p], _match_exp)])


def pipeline(*extra, **kw):
    return Pipeline(passes.cleanup_passes() + [exp_pass(), *extra], **kw)


def replacements(fn, *args):
    """Number of exp replacements in fn's jaxpr (nested bodies included)."""
    closed = jax.make_jaxpr(fn)(*args)
    return str(closed).count("name=passes.exp.exp")


def rng(seed=0):
    return np.random.default_rng(seed)


X = jnp.asarray(rng().standard_normal((3, 4)), jnp.float32)


# -- nested constructs -------------------------------------------------------------------------

def f_jit(x):
    return jax.jit(lambda y: jnp.exp(y) * 2)(x).sum()


def f_scan(x):
    def body(c, row):
        return c + jnp.exp(row).sum(), jnp.exp(-row)
    c, ys = lax.scan(body, 0.0, x)
    return c + ys.sum()


def f_cond(x):
    return lax.cond(x.sum() > 0, lambda v: jnp.exp(v).sum(), lambda v: jnp.exp(2 * v).sum(), x)


def f_while(x):
    def body(carry):
        i, v = carry
        return i + 1, v * 0.5 + jnp.exp(v) * 0.1
    return lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1].sum()


def f_remat(x):
    return jax.checkpoint(lambda v: jnp.sin(jnp.exp(v)))(x).sum()


def f_fori_scan(x):
    return lax.fori_loop(0, 2, lambda i, v: v + jnp.exp(v) * 0.01, x).sum()


# (function, rewrites expected, reverse-differentiable)
NESTED = [(f_jit, 1, True), (f_scan, 2, True), (f_cond, 2, True), (f_while, 1, False),
          (f_remat, 1, True), (f_fori_scan, 1, True)]


@pytest.mark.parametrize("fn,expected,differentiable", NESTED, ids=[n[0].__name__ for n in NESTED])
def test_rewrites_inside_nested_bodies(fn, expected, differentiable):
    opt = passes.optimize(fn, pipeline())
    report = passes.explain(fn, X, pipeline=pipeline())
    assert report.counts["exp"] == expected
    assert replacements(opt, X) == expected
    assert_equivalent(fn, opt, X, grads=differentiable)
    if differentiable:  # the replacement's custom_vjp brings the backward
        assert replacements(jax.grad(opt), X) >= expected


def test_custom_jvp_body_rewrite_is_primal_only():
    @jax.custom_jvp
    def f(x):
        return jnp.exp(x)

    f.defjvp(lambda p, t: (jnp.exp(p[0]), jnp.exp(p[0]) * t[0]))
    g = lambda x: f(x).sum()
    report = passes.explain(g, X, pipeline=pipeline())
    assert report.counts["exp"] == 1
    (rw,) = report.rewrites
    assert rw.primal_only and "custom_jvp_call" in rw.region
    assert "primal only" in str(report)
    assert_equivalent(g, passes.optimize(g, pipeline()), X)


def test_custom_vjp_body_rewrite_keeps_user_rule():
    @jax.custom_vjp
    def f(x):
        return jnp.exp(x)

    # a deliberately different backward: the rewritten program must still use it
    f.defvjp(lambda x: (jnp.exp(x), x), lambda x, g: (3.0 * g,))
    g = lambda x: f(x).sum()
    opt = passes.optimize(g, pipeline())
    assert passes.explain(g, X, pipeline=pipeline()).rewrites[0].primal_only
    np.testing.assert_allclose(jax.grad(opt)(X), np.full(X.shape, 3.0))
    np.testing.assert_allclose(opt(X), g(X), rtol=1e-6)


# -- transformations ---------------------------------------------------------------------------

def loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    return jnp.mean(jnp.exp(-h) * batch["y"][:, None])


PARAMS = {"w": jnp.asarray(rng(1).standard_normal((4, 5)), jnp.float32),
          "b": jnp.asarray(rng(2).standard_normal(5), jnp.float32)}
BATCH = {"x": X, "y": jnp.asarray(rng(3).standard_normal(3), jnp.float32)}


def test_call_jit_grad_vmap():
    opt = passes.optimize(loss, pipeline())
    np.testing.assert_allclose(opt(PARAMS, BATCH), loss(PARAMS, BATCH), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(opt)(PARAMS, BATCH), loss(PARAMS, BATCH), rtol=1e-6)
    g1, g2 = jax.grad(opt)(PARAMS, BATCH), jax.grad(loss)(PARAMS, BATCH)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)
    per_example = jax.vmap(opt, in_axes=(None, 0))(PARAMS, jax.tree.map(lambda a: a[:, None], BATCH))
    want = jax.vmap(loss, in_axes=(None, 0))(PARAMS, jax.tree.map(lambda a: a[:, None], BATCH))
    np.testing.assert_allclose(per_example, want, rtol=1e-6)
    assert replacements(jax.jit(jax.grad(opt)), PARAMS, BATCH) >= 1


def test_whole_train_step_through_optimize():
    import optax

    tx = optax.adamw(1e-2)

    def step(params, opt_state, batch):
        l, g = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, l

    opt_step = jax.jit(passes.optimize(step, pipeline()))
    p1, s1 = PARAMS, tx.init(PARAMS)
    p2, s2 = PARAMS, tx.init(PARAMS)
    for _ in range(3):
        p1, s1, l1 = opt_step(p1, s1, BATCH)
        p2, s2, l2 = jax.jit(step)(p2, s2, BATCH)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p2)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "hessian"])
def test_forward_mode_falls_back_to_original(transform):
    f = lambda x: jnp.exp(x).sum() * 0.5
    opt = passes.optimize(f, pipeline())
    x = X[0]
    if transform == "jvp":
        got = jax.jvp(opt, (x,), (jnp.ones_like(x),))
        want = jax.jvp(f, (x,), (jnp.ones_like(x),))
    else:
        got = getattr(jax, transform)(opt)(x)
        want = getattr(jax, transform)(f)(x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_pytrees_keys_ints_bools():
    def f(key, tree, n):
        noise = jax.random.normal(key, tree["a"].shape)
        y = jnp.exp(tree["a"] + noise)
        return {"y": y, "count": jnp.sum(y > 1).astype(jnp.int32) + n, "flags": y > 2}, [noise]

    key = jax.random.key(3)
    tree = {"a": X}
    opt = passes.optimize(f, pipeline())
    got, want = opt(key, tree, 2), f(key, tree, 2)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    assert got[0]["count"].dtype == jnp.int32 and got[0]["flags"].dtype == jnp.bool_


def test_effects_run_exactly_as_often():
    calls = []

    def f(x):
        jax.debug.callback(lambda v: calls.append(float(v)), x.sum())
        y = jnp.exp(x)
        jax.debug.callback(lambda v: calls.append(-float(v)), y.sum())
        return lax.scan(lambda c, r: (c + jnp.exp(r).sum(), None), 0.0, y)[0]

    opt = passes.optimize(f, pipeline())
    f(X)
    jax.effects_barrier()
    want = list(calls)
    calls.clear()
    opt(X)
    jax.effects_barrier()
    assert len(want) == 2 and calls == pytest.approx(want)
    calls.clear()
    jax.jit(opt)(X)
    jax.effects_barrier()
    assert calls == pytest.approx(want)


def test_debug_print_not_merged_or_dropped(capfd):
    def f(x):
        jax.debug.print("value {}", x.sum())
        jax.debug.print("value {}", x.sum())  # identical: CSE must not merge
        jax.debug.print("unused {}", jnp.exp(x).sum())  # feeds nothing: DCE must keep it
        return x * 2

    passes.optimize(f, pipeline())(X)
    jax.effects_barrier()
    out = capfd.readouterr().out
    assert out.count("value") == 2 and out.count("unused") == 1


# -- caching, arguments ------------------------------------------------------------------------

def test_python_scalars_traced_and_cached():
    traces = []

    def f(x, s):
        traces.append(1)
        return jnp.exp(x) * s

    opt = passes.optimize(f, pipeline())
    np.testing.assert_allclose(opt(X, 2.0), f(X, 2.0), rtol=1e-6)
    opt(X, 3.0)
    opt(X + 1, 4.0)
    assert len(traces) == 2  # one trace in optimize, one direct call above
    assert opt(X, 2).dtype == jnp.float32  # weak-typed int stays weak


def test_static_args_and_untraceable_error():
    def f(x, mode):
        return jnp.exp(x) if mode == "exp" else x

    with pytest.raises(TypeError, match="static_argnums"):
        passes.optimize(f, pipeline())(X, "exp")
    opt = passes.optimize(f, pipeline(), static_argnums=1)
    np.testing.assert_allclose(opt(X, "exp"), jnp.exp(X), rtol=1e-6)
    np.testing.assert_allclose(opt(X, "id"), X)
    opt_kw = passes.optimize(f, pipeline(), static_argnames="mode")
    np.testing.assert_allclose(opt_kw(X, mode="exp"), jnp.exp(X), rtol=1e-6)


def test_nnx_module_state_updates_kept():
    from flax import nnx

    bn = nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))
    bn_ref = nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))

    def f(model, x):
        return jnp.exp(model(x)).sum()

    opt = passes.optimize(f, pipeline())
    got, want = opt(bn, X), f(bn_ref, X)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(bn.batch_stats_mean[...] if hasattr(bn, "batch_stats_mean")
                               else bn.mean[...], bn_ref.mean[...], rtol=1e-6)
    assert not np.allclose(bn.mean[...], 0)
    opt(bn, X)
    f(bn_ref, X)
    np.testing.assert_allclose(bn.var[...], bn_ref.var[...], rtol=1e-6)


# -- errors, declines, switches ----------------------------------------------------------------

def test_rule_error_names_rule_and_location():
    def boom(region, pos):
        raise ValueError("bad pattern")

    bad = RulePass("bad", [FunctionRule("explodes", [lax.exp_p], boom)])
    with pytest.raises(passes.RewriteError, match=r"bad\.explodes.*exp.*test_engine\.py"):
        passes.explain(lambda x: jnp.exp(x), X, pipeline=Pipeline([bad]))


def test_kernel_decline_is_reported():
    def refuse(x):
        raise NotImplementedError("shape not supported by this kernel")

    def m(region, pos):
        eqn = region.eqns[pos]
        return Match(pos, frozenset([pos]), tuple(eqn.invars), tuple(eqn.outvars), refuse)

    p = Pipeline([RulePass("picky", [FunctionRule("exp", [lax.exp_p], m)])])
    report = passes.explain(lambda x: jnp.exp(x), X, pipeline=p)
    assert report.counts["picky"] == 0
    (declined,) = report.declined  # once, though every fixpoint round sees the match again
    assert "shape not supported" in declined.reason and declined.site == "picky/0"


def test_intermediate_used_outside_declines():
    def m(region, pos):  # claims sin+exp but only outputs exp
        eqn = region.eqns[pos]
        src = region.producer(eqn.invars[0])
        if src is None:
            return NoMatch("no producer")
        return Match(pos, frozenset([pos, src]), tuple(region.eqns[src].invars),
                     tuple(eqn.outvars), lambda x: jnp.exp(jnp.sin(x)))

    p = Pipeline(passes.cleanup_passes() + [RulePass("pair", [FunctionRule("sin_exp", [lax.exp_p], m)])])
    f = lambda x: (jnp.exp(jnp.sin(x)), jnp.sin(x) * 2)
    report = passes.explain(f, X, pipeline=p)
    assert report.counts["pair"] == 0 and "used outside the match" in report.declined[0].reason
    g = lambda x: jnp.exp(jnp.sin(x))
    assert passes.explain(g, X, pipeline=p).counts["pair"] == 1


def test_fixpoint_cap_names_the_pass():
    class Restless(passes.Pass):
        name = "restless"

        def run(self, region, ctx):
            return 1

    with pytest.raises(passes.FixpointError, match="restless"):
        passes.explain(lambda x: x * 2, X, pipeline=Pipeline([Restless()], max_iterations=3))


def test_disable_by_env_and_site_selection(monkeypatch):
    f = lambda x: jnp.exp(x) + jnp.exp(2 * x) + jnp.exp(3 * x)
    full = passes.explain(f, X, pipeline=pipeline())
    assert [r.site for r in full.rewrites] == ["exp/0", "exp/1", "exp/2"]
    only = passes.explain(f, X, pipeline=pipeline(sites=["exp/1"]))
    assert only.counts["exp"] == 1 and only.rewrites[0].site == "exp/1"
    assert only.skipped == ["exp/0", "exp/2"]
    monkeypatch.setenv("JAXPASSES_DISABLE", "exp")
    assert passes.explain(f, X, pipeline=pipeline()).counts["exp"] == 0
    monkeypatch.setenv("JAXPASSES_DISABLE", "exp,attention")  # attention: not in this pipeline
    assert passes.explain(f, X, pipeline=pipeline()).counts["exp"] == 0
    monkeypatch.setenv("JAXPASSES_DISABLE", "nope")
    with pytest.raises(ValueError, match="unknown pass 'nope'"):
        pipeline()
    monkeypatch.delenv("JAXPASSES_DISABLE")
    with pytest.raises(ValueError, match="cannot disable unknown pass 'attention'"):
        pipeline(disable=["attention"])


def test_verify_reports_wrong_rewrite():
    def m(region, pos):
        eqn = region.eqns[pos]
        return Match(pos, frozenset([pos]), tuple(eqn.invars), tuple(eqn.outvars),
                     lambda x: jnp.exp(x) * 1.01)

    # Unchecked, so translation validation does not decline it first (tests/test_validate.py).
    wrong = Pipeline([RulePass("wrong", [FunctionRule("exp", [lax.exp_p], m)])], check=False)
    f = lambda x: {"bad": jnp.exp(x), "fine": x * 2}
    opt = passes.optimize(f, wrong, verify=True)
    with pytest.raises(passes.VerificationError, match=r"\['bad'\].*passes\.wrong\.exp"):
        opt(X)
    good = passes.optimize(f, pipeline(), verify=True)
    good(X)
    with pytest.warns(UserWarning, match="cannot verify under a trace"):
        jax.jit(good)(X)


def test_dumps_and_report_text(tmp_path):
    p = pipeline(dump_dir=tmp_path)
    report = passes.explain(lambda x: jnp.exp(x).sum(), X, pipeline=p)
    files = sorted(f.name for f in tmp_path.iterdir())
    assert files[0] == "00_input.txt" and any(f.endswith("_exp.txt") for f in files)
    assert "exp" in report.jaxpr_before and "passes.exp.exp" in report.jaxpr_after
    assert "exp/0" in str(report) and "<table>" in report._repr_html_()
    assert set(report.pass_times) >= {"canonicalize", "cse", "dce", "exp"}


def test_report_locations_point_at_user_code():
    from flax import linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.LayerNorm()(x)  # the norm's equations are in flax; the report says here

    block = Block()
    variables = block.init(jax.random.key(0), X)
    report = passes.explain(lambda v, x: block.apply(v, x).sum(), variables, X)
    (rw,) = report.rewrites
    assert rw.pass_name == "layer_norm" and rw.module_path.endswith("LayerNorm_0")
    assert "test_engine.py" in rw.location and "site-packages" not in rw.location


def test_replacement_keeps_name_stack_and_checkpoint_names():
    from jax.ad_checkpoint import checkpoint_name

    def f(x):
        with jax.named_scope("block"):
            y = jnp.exp(x)
        return checkpoint_name(y, "act").sum()

    after = jax.make_jaxpr(passes.optimize(f, pipeline()))(X)
    closed = passes.explain(f, X, pipeline=pipeline())._after
    (rep,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "jit"] if hasattr(closed, "jaxpr") \
        else [e for e in closed.eqns if e.primitive.name == "jit"]
    assert "block" in str(rep.source_info.name_stack)
    assert "act" in str(after)


def test_bf16_results_compared_with_tolerance_not_equality():
    from passes.testing import assert_equivalent
    x = jnp.asarray(rng(5).standard_normal(64), jnp.bfloat16)
    f = lambda v: v * v * v
    g = lambda v: (v.astype(jnp.float32) ** 3).astype(jnp.bfloat16)  # rounds once, not twice
    assert not np.array_equal(np.asarray(f(x), np.float32), np.asarray(g(x), np.float32))
    assert_equivalent(f, g, x)
    with pytest.raises(AssertionError, match="too far"):
        assert_equivalent(f, lambda v: f(v) * 1.1, x)
