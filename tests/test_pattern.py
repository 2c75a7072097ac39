"""The pattern language: each building block, near-miss reasons, and no over-matching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import passes
from passes.ir import Region
from passes.pattern import (Alt, Capture, Cast, Example, Inverse, Keep, Lit, OptionalFactor,
                            PatternRule, Prim, Product, RowVector, Same, State, Wildcard,
                            maybe_cast, row_values)


def region_of(fn, *args, canonical=True):
    closed = jax.make_jaxpr(fn)(*args)
    if canonical:
        closed, _ = passes.Pipeline(passes.cleanup_passes()).run(closed)
    return Region(closed)


def match_out(pattern, fn, *args, canonical=True):
    """Match `pattern` against fn's (single) output; returns (result, state)."""
    region = region_of(fn, *args, canonical=canonical)
    st = State(region)
    return pattern.match(st, region.outvars[0]), st


def prims_of(st):
    return sorted(st.region.eqns[p].primitive.name for p in st.eqns)


X = jnp.ones((2, 3, 8), jnp.float32)
W = jnp.ones((8,), jnp.float32)


def test_op_params_and_captures():
    def last(axes, eqn):
        want = (eqn.invars[0].aval.ndim - 1,)
        return True if tuple(axes) == want else f"{tuple(axes)} != {want}"

    pattern = Prim(lax.reduce_sum_p, Prim(lax.exp_p, Wildcard("x")), params={"axes": last}, name="s")
    ok, st = match_out(pattern, lambda x: jnp.exp(x).sum(-1), X)
    assert ok and prims_of(st) == ["exp", "reduce_sum"]
    assert st.bindings["x"] is st.region.invars[0]
    bad, st = match_out(pattern, lambda x: jnp.exp(x).sum(1), X)
    assert not bad and bad.reason == "reduce_sum axes (1,) != (2,)"
    fixed = Prim(lax.reduce_sum_p, Wildcard(), params={"axes": (1,)})
    assert match_out(fixed, lambda x: x.sum(1), X)[0]
    assert match_out(fixed, lambda x: x.sum(2), X)[0].reason == "reduce_sum axes (2,) != (1,)"


def test_wildcard_constraints_and_reasons():
    def f(x):
        return jnp.exp(x)

    for pattern, reason in [
        (Prim(lax.exp_p, Wildcard("x", rank=2)), "x rank 3 != 2"),
        (Prim(lax.exp_p, Wildcard("x", dtype=jnp.bfloat16)), "x dtype float32 != bfloat16"),
        (Prim(lax.exp_p, Wildcard("x", shape=(None, 3, 7))), "x shape (2, 3, 8) != (None, 3, 7)"),
        (Prim(lax.exp_p, Wildcard("x", where=lambda a, b: a.aval.shape[0] == 5 or "batch is not 5")),
         "x batch is not 5"),
        (Prim(lax.log_p, Wildcard()), "expected `log`, got `exp`"),
    ]:
        r, _ = match_out(pattern, f, X)
        assert not r and r.reason == reason
    assert match_out(Prim(lax.exp_p, Wildcard("x", rank=3, dtype=jnp.float32, shape=(2, None, 8))), f,
                     X)[0]


def test_same_name_means_same_value():
    both = Prim(lax.sub_p, Wildcard("a"), Wildcard("a"))
    assert match_out(both, lambda x: x - x, X, canonical=False)[0]
    r, _ = match_out(both, lambda x, y: x - y, X, X)
    assert not r and "a is a float32[2,3,8] value here but a float32[2,3,8] value before" in r.reason
    assert match_out(Prim(lax.sub_p, Wildcard("a"), Same("a")), lambda x: x - x, X, canonical=False)[0]


def test_literals_with_tolerance_and_capture():
    f5 = lambda x: x + 1e-5  # noqa: E731  (rounded to float32: 9.99999974e-06)
    assert match_out(Prim(lax.add_p, Wildcard(), Lit(1e-5)), f5, X)[0]
    r, _ = match_out(Prim(lax.add_p, Wildcard(), Lit(1e-6)), f5, X)
    assert not r and r.reason == "constant 1e-05 != 1e-06"
    ok, st = match_out(Prim(lax.add_p, Wildcard(), Lit(name="eps")), f5, X)
    assert ok and st.bindings["eps"] == pytest.approx(1e-5, rel=1e-7)
    # Seen through broadcasts (not consumed): x - zeros.
    ok, st = match_out(Prim(lax.sub_p, Wildcard(), Lit(0.0)), lambda x: x - jnp.zeros_like(x), X)
    assert ok and prims_of(st) == ["sub"]


def test_alternatives_and_commutative_operands():
    exp_plus = Prim(lax.add_p, Prim(lax.exp_p, Wildcard("x")), Wildcard("y"), commutative=True)
    # Raw traces keep the operand order as written.
    assert match_out(exp_plus, lambda x, y: jnp.exp(x) + y, X, X, canonical=False)[0]
    assert match_out(exp_plus, lambda x, y: y + jnp.exp(x), X, X, canonical=False)[0]
    ordered = Prim(lax.add_p, Prim(lax.exp_p, Wildcard("x")), Wildcard("y"))
    assert not match_out(ordered, lambda x, y: y + jnp.exp(x), X, X, canonical=False)[0]
    either = Prim(lax.exp_p, Wildcard()) | Prim(lax.log_p, Wildcard())
    assert match_out(either, jnp.log, X)[0] and match_out(either, jnp.exp, X)[0]
    r, _ = match_out(either, jnp.sin, X)
    assert not r and r.reason == "expected `exp|log`, got `sin`"


def test_optional_casts():
    pattern = Prim(lax.exp_p, maybe_cast(Wildcard("x")))
    ok, st = match_out(pattern, lambda x: jnp.exp(x.astype(jnp.float32)), X.astype(jnp.bfloat16))
    assert ok and st.bindings["x"].aval.dtype == jnp.bfloat16
    assert prims_of(st) == ["convert_element_type", "exp"]
    ok, st = match_out(pattern, jnp.exp, X)
    assert ok and prims_of(st) == ["exp"]
    assert not match_out(Cast(Wildcard(), dtype=jnp.float16), lambda x: x.astype(jnp.bfloat16), X)[0]


def test_product_any_order_association_and_division():
    norm = Product(Prim(lax.sub_p, Wildcard("x"), Wildcard("m")), Prim(lax.rsqrt_p, Wildcard("v")),
                   OptionalFactor(RowVector("scale")))
    spellings = [
        lambda x, m, v, w: (x - m) * lax.rsqrt(v) * w,
        lambda x, m, v, w: w * ((x - m) * lax.rsqrt(v)),
        lambda x, m, v, w: (x - m) * (lax.rsqrt(v) * w),
        lambda x, m, v, w: (lax.rsqrt(v) * w) * (x - m),
    ]
    for fn in spellings:
        ok, st = match_out(norm, fn, X, X, X, W)
        assert ok, fn
        assert st.bindings["scale"].aval.shape == (8,)
        assert prims_of(st) == ["mul", "mul", "rsqrt", "sub"]  # the scale's broadcast is read only
    ok, st = match_out(norm, lambda x, m, v: (x - m) * lax.rsqrt(v), X, X, X)
    assert ok and "scale" not in st.bindings
    divided = Product(Prim(lax.sub_p, Wildcard("x"), Wildcard("m")), Inverse(Prim(lax.sqrt_p, Wildcard("v"))),
                      OptionalFactor(RowVector("scale")))
    assert match_out(divided, lambda x, m, v, w: (x - m) / jnp.sqrt(v) * w, X, X, X, W)[0]
    assert match_out(divided, lambda x, m, v, w: w * (x - m) / jnp.sqrt(v), X, X, X, W)[0]
    r, _ = match_out(divided, lambda x, m, v, w: jnp.sqrt(v) / (x - m) * w, X, X, X, W)
    assert not r
    # A factor that is neither: (x - m) * rsqrt(v) * exp(x) has no place for exp(x).
    assert not match_out(norm, lambda x, m, v: (x - m) * lax.rsqrt(v) * jnp.exp(x), X, X, X)[0]


def test_row_vector_does_not_take_other_broadcasts():
    mul_row = Prim(lax.mul_p, Wildcard("x"), RowVector("w"), commutative=True)
    ok, st = match_out(mul_row, lambda x, w: x * w, X, W)
    assert ok and st.bindings["w"] is st.region.invars[1]
    ok, st = match_out(mul_row, lambda x, w: x * w.reshape(1, 1, 8), X, W)
    assert ok and st.bindings["w"].aval.shape == (8,)
    # A vector along axis 1 (size 3) broadcast over the others is not a row.
    col = jnp.ones((3,), jnp.float32)
    r, _ = match_out(mul_row, lambda x, c: x * c[None, :, None], X, col)
    assert not r
    # Square x (8, 8): a column vector of the right length must still not pass for a row.
    sq = jnp.ones((8, 8), jnp.float32)
    r, _ = match_out(mul_row, lambda x, w: x * w[:, None], sq, W)
    assert not r and r.reason == "w: broadcast_in_dim (8,) -> (8, 1) maps a non-trailing axis"
    assert match_out(mul_row, lambda x, w: x * w[None, :], sq, W)[0]
    # A size-1 vector broadcast everywhere is uniform, hence a row; a scalar is no vector.
    ok, st = match_out(mul_row, lambda x, s: x * s, X, jnp.ones((1,)))
    assert ok and st.bindings["w"].aval.shape == (1,)
    np.testing.assert_array_equal(row_values(jnp.array([3.0]), 4), [3.0] * 4)
    assert not match_out(mul_row, lambda x, s: x * s, X, jnp.float32(2))[0]
    # A narrowing cast ends the walk: the source is the rounded vector.
    ok, st = match_out(mul_row, lambda x, w: x * w.astype(jnp.bfloat16).astype(jnp.float32), X, W)
    assert ok and st.bindings["w"].aval.dtype == jnp.bfloat16


def test_keep_accepts_only_trailing_keepdims():
    stat = Keep(Prim(lax.reduce_sum_p, Wildcard("x")))
    for fn in (lambda x: x.sum(-1, keepdims=True), lambda x: x.sum(-1)[..., None],
               lambda x: x.sum(-1)):
        assert match_out(stat, fn, X)[0]
    r, _ = match_out(stat, lambda x: x.sum(-1)[:, None, :], X)
    assert not r and "does not keep the reduced trailing axis" in r.reason


def _times_two(x):
    return x * 2


def test_rule_reports_consumed_equations_and_declines():
    # y = exp(x) + 1; the rule covers add and exp, reads x.
    pattern = Prim(lax.add_p, Prim(lax.exp_p, Wildcard("x"), name="e"), Lit(1.0))
    rule = PatternRule("exp_plus_one", pattern, lambda x: jnp.exp(x) + 1, inputs=("x",))
    region = region_of(lambda x: jnp.exp(x) + 1.0, X)
    m = rule.match(region, len(region.eqns) - 1)
    assert m and {region.eqns[p].primitive.name for p in m.eqns} == {"exp", "add"}
    assert m.inputs == (region.invars[0],) and m.outputs == (region.outvars[0],)
    assert rule.roots == (lax.add_p,)
    declining = PatternRule("r", pattern, _times_two, inputs=("x",),
                            check=lambda b: "too small to pay off")
    assert declining.match(region, len(region.eqns) - 1).declined == "too small to pay off"
    rejecting = PatternRule("r", pattern, _times_two, inputs=("x",),
                            check=lambda b: passes.NoMatch("not today"))
    assert rejecting.match(region, len(region.eqns) - 1).reason == "not today"
    with pytest.raises(ValueError, match="rooted at an operation"):
        PatternRule("r", Wildcard("x"), _times_two, inputs=("x",))


def _exp_plus_one(x):
    return jnp.exp(x) + 1


def test_engine_declines_when_an_intermediate_is_used_elsewhere():
    rule = PatternRule("exp_plus_one", Prim(lax.add_p, Prim(lax.exp_p, Wildcard("x")), Lit(1.0)),
                       _exp_plus_one, inputs=("x",))
    pipe = passes.Pipeline(passes.cleanup_passes() + [passes.RulePass("fuse", [rule])])
    report = passes.explain(lambda x: jnp.exp(x) + 1.0, X, pipeline=pipe)
    assert report.counts["fuse"] == 1
    report = passes.explain(lambda x: (jnp.exp(x) + 1.0, jnp.exp(x)), X, pipeline=pipe)
    assert report.counts["fuse"] == 0
    (d,) = report.declined
    assert "from `exp`) is also used outside the match" in d.reason


def _moments(x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    return mean, x - mean


def test_multi_output_rule():
    """One replacement defines two values the program uses: the mean and the centered x."""
    mean = Prim(lax.div_p, Keep(Prim(lax.reduce_sum_p, Same("x"))), Lit(8.0), name="mean")
    rule = PatternRule("moments", Prim(lax.sub_p, Wildcard("x"), mean, name="centered"), _moments,
                       inputs=("x",), outputs=("mean", "centered"))

    def f(x):
        m = jnp.mean(x, axis=-1, keepdims=True)
        return m * 3.0, jnp.exp(x - m)

    pipe = passes.Pipeline(passes.cleanup_passes() + [passes.RulePass("moments", [rule])])
    report = passes.explain(f, X, pipeline=pipe)
    assert report.counts["moments"] == 1 and not report.declined
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    passes.testing.assert_equivalent(f, passes.optimize(f, pipe), x)
    # Without declaring the mean an output, its use outside blocks the rewrite.
    single = PatternRule("centered", rule.pattern, lambda x: _moments(x)[1], inputs=("x",))
    pipe = passes.Pipeline(passes.cleanup_passes() + [passes.RulePass("centered", [single])])
    report = passes.explain(f, X, pipeline=pipe)
    assert report.counts["centered"] == 0 and "also used outside" in report.declined[0].reason


def test_near_misses_name_the_failing_subpattern():
    def last(axes, eqn):
        want = (eqn.invars[0].aval.ndim - 1,)
        return True if tuple(axes) == want else f"{tuple(axes)} != {want}"

    rule = PatternRule("exp_sum", Prim(lax.reduce_sum_p, Prim(lax.exp_p, Wildcard("x")),
                                       params={"axes": last}), lambda x: jnp.exp(x).sum(-1),
                       inputs=("x",))
    pipe = passes.Pipeline(passes.cleanup_passes() + [passes.RulePass("p", [rule])], debug=True)
    report = passes.explain(lambda x: jnp.exp(x).sum(1), X, pipeline=pipe)
    assert [(n.rule, n.reason) for n in report.near_misses] == [
        ("exp_sum", "reduce_sum axes (1,) != (2,)")]


# -- pattern by example --------------------------------------------------------------------------

SPEC = jax.ShapeDtypeStruct((4, 8), jnp.float32)


def test_example_generalises_shapes_and_dtypes():
    pattern = Example(lambda x: x.mean(-1), SPEC)
    assert match_out(pattern, lambda x: jnp.mean(x, -1), jnp.ones((3, 16)))[0]
    assert match_out(pattern, lambda x: jnp.mean(x, -1), X)[0]
    silu = Example(lambda h: h * jax.nn.sigmoid(h), SPEC)
    assert match_out(silu, jax.nn.silu, X.astype(jnp.bfloat16))[0]
    # jnp.mean computes float16 in float32: the casts make it another computation.
    assert not match_out(pattern, lambda x: jnp.mean(x, -1), X.astype(jnp.float16))[0]
    assert match_out(Example(lambda x: x.mean(-1), jax.ShapeDtypeStruct((2, 4), jnp.float16)),
                     lambda x: jnp.mean(x, -1), X.astype(jnp.float16))[0]


def test_example_rechecks_literals_and_shape_relations():
    mean = Example(lambda x: x.mean(-1), SPEC)
    # Same primitives as a mean, but divides by 8 over an axis of 16: not a mean.
    r, _ = match_out(mean, lambda x: x.sum(-1) / 8.0, jnp.ones((3, 16)))
    assert not r and r.reason == "the example has constant 16 where the program has 8"
    # The reduction axis comes from the example traced at the program's shapes.
    r, _ = match_out(mean, lambda x: x.sum(0) / 3.0, jnp.ones((3, 16)))
    assert not r and r.reason == "`reduce_sum` axes (0,) != (1,)"
    eps5 = Example(lambda v: lax.rsqrt(v + 1e-5), SPEC)
    assert match_out(eps5, lambda v: lax.rsqrt(v + 1e-5), X)[0]
    r, _ = match_out(eps5, lambda v: lax.rsqrt(v + 1e-6), X)
    assert not r and r.reason == "the example has constant 1e-05 where the program has 1e-06"


def test_example_shared_values_and_input_patterns():
    silu = Example(lambda h: h * jax.nn.sigmoid(h), SPEC)
    assert match_out(silu, jax.nn.silu, X)[0]
    r, _ = match_out(silu, lambda a, b: a * jax.nn.sigmoid(b), X, X)
    assert not r
    on_exp = Example(lambda h: h * jax.nn.sigmoid(h), SPEC, h=Prim(lax.exp_p, Wildcard("z")))
    ok, st = match_out(on_exp, lambda z: jax.nn.silu(jnp.exp(z)), X)
    assert ok and st.bindings["z"] is st.region.invars[0]
    assert prims_of(st) == ["exp", "logistic", "mul"]
    assert not match_out(on_exp, jax.nn.silu, X)[0]


def test_example_custom_jvp_equations_match_whole():
    relu = Example(lambda h: jax.nn.relu(h), SPEC)
    ok, st = match_out(relu, jax.nn.relu, X)
    assert ok and len(st.eqns) == 1
    assert not match_out(relu, lambda h: jnp.maximum(h, 0.0), X)[0]


def test_example_errors_say_what_to_do():
    c = jnp.arange(8.0)
    with pytest.raises(ValueError, match="closes over arrays; pass them as arguments"):
        Example(lambda x: x * c, SPEC)
    with pytest.raises(TypeError, match="takes 2 positional parameters, 1 example"):
        Example(lambda x, y: x * y, SPEC)
    with pytest.raises(ValueError, match=r"parameters \['y'\] are not used"):
        Example(lambda x, y: jnp.exp(x), SPEC, SPEC)
    with pytest.raises(TypeError, match=r"no parameter named \['z'\]"):
        Example(lambda x: jnp.exp(x), SPEC, z=Wildcard())


def test_alt_of_examples_and_example_rule_rewrite():
    """The README's 'writing a pass' example, in short: softplus by example -> jax.nn.softplus."""
    softplus = Alt(Example(lambda x: jnp.log(1 + jnp.exp(x)), SPEC),
                   Example(lambda x: jnp.log1p(jnp.exp(x)), SPEC))
    rule = PatternRule("softplus", softplus, _stable_softplus, inputs=("x",))
    pipe = passes.Pipeline(passes.cleanup_passes() + [passes.RulePass("softplus", [rule])])
    f = lambda x: jnp.log1p(jnp.exp(x)) * 2.0  # noqa: E731
    assert passes.explain(f, X, pipeline=pipe).counts["softplus"] == 1
    x = jnp.array([-30.0, -1.0, 0.0, 1.0, 30.0, 100.0])
    out = passes.optimize(f, pipe)(x)
    assert np.isfinite(out).all()  # the original overflows at 100
    np.testing.assert_allclose(out[:5], f(x)[:5], rtol=1e-6)


def _stable_softplus(x):
    return jax.nn.softplus(x)


# -- authoring mistakes are caught when the rule is built ------------------------------------------

def test_rule_input_never_captured_raises_naming_the_captures():
    pattern = Prim(lax.add_p, Prim(lax.exp_p, Wildcard("x")), Lit(1.0, name="one"))
    with pytest.raises(ValueError, match=r"inputs name 'xx' is never captured by the pattern; "
                                         r"it captures \['x'\]"):
        PatternRule("typo", pattern, _times_two, inputs=("xx",))
    with pytest.raises(ValueError, match="'one' captures a constant"):
        PatternRule("constant", pattern, _times_two, inputs=("x", "one"))
    with pytest.raises(ValueError, match="outputs name 'e' is never captured"):
        PatternRule("outputs", pattern, _times_two, inputs=("x",), outputs=("e",))
    softplus = Example(lambda x: jnp.log1p(jnp.exp(x)), SPEC)
    with pytest.raises(ValueError, match=r"it captures \['x'\]"):
        PatternRule("softplus", softplus, _stable_softplus, inputs=("h",))
    # an absent OptionalFactor's capture is a legitimate input (it may be left out)
    norm = Product(Prim(lax.sub_p, Wildcard("x"), Wildcard("m")), OptionalFactor(RowVector("s")))
    PatternRule("scaled", norm, _times_two, inputs=("x", "m", "s"))


@pytest.mark.parametrize("build", [
    lambda: Prim(lax.exp_p, Inverse(Wildcard("x"))),
    lambda: Prim(lax.exp_p, OptionalFactor(Wildcard("x"))),
    lambda: Prim(lax.exp_p, Alt(Inverse(Wildcard("x")), Wildcard("x"))),
    lambda: Capture("c", OptionalFactor(Wildcard("x"))),
    lambda: Keep(Inverse(Wildcard("x"))),
    lambda: Inverse(Wildcard("x")).where(lambda a, b: True),
    lambda: Example(lambda h: jnp.exp(h), SPEC, h=Inverse(Wildcard("x"))),
    lambda: PatternRule("r", Inverse(Prim(lax.exp_p, Wildcard("x"))), _times_two, inputs=("x",)),
    lambda: Inverse(OptionalFactor(Wildcard("x"))),
], ids=["op_operand", "optional_operand", "alt_operand", "capture", "keep", "where", "example",
        "rule_root", "inverse_of_optional"])
def test_factor_markers_outside_a_product_rejected_at_construction(build):
    with pytest.raises(TypeError, match="Product|OptionalFactor"):
        build()


def test_factor_markers_inside_a_product_still_work():
    divided = Product(Prim(lax.sub_p, Wildcard("x"), Wildcard("m")),
                      Alt(Inverse(Prim(lax.sqrt_p, Wildcard("v"))), Prim(lax.rsqrt_p, Wildcard("v"))),
                      OptionalFactor(Inverse(RowVector("s"))))
    assert match_out(divided, lambda x, m, v: (x - m) / jnp.sqrt(v), X, X, X)[0]
    assert match_out(divided, lambda x, m, v: (x - m) * lax.rsqrt(v), X, X, X)[0]


# -- Example: rank and literals ----------------------------------------------------------------------

def test_example_generalises_across_rank_unless_pinned():
    spec2 = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    any_rank = Example(lambda x: jnp.exp(x).sum(-1), spec2)
    pinned = Example(lambda x: jnp.exp(x).sum(-1), spec2, rank_polymorphic=False)
    three_d = lambda x: jnp.exp(x).sum(-1)  # noqa: E731
    assert match_out(any_rank, three_d, X)[0]
    r, _ = match_out(pinned, three_d, X)
    assert not r and r.reason == "x has rank 3, the example's has rank 2 (rank_polymorphic=False)"
    assert match_out(pinned, three_d, X[0])[0]


def test_example_literals_as_wildcards():
    """`x * 0.5` as an example matches `x * 0.70710678` only when literals are wildcards."""
    def gelu_like(x):
        return x * jax.nn.sigmoid(x * 1.702)

    exact = Example(gelu_like, SPEC)
    wild = Example(gelu_like, SPEC, literals="any")
    named = Example(gelu_like, SPEC, literals=("k",))
    other = lambda x: x * jax.nn.sigmoid(x * 1.5)  # noqa: E731
    r, _ = match_out(exact, other, X)
    assert not r and "constant 1.702 where the program has 1.5" in r.reason
    assert match_out(wild, other, X)[0]
    ok, st = match_out(named, other, X)
    assert ok and st.bindings["k"] == 1.5
    assert not match_out(wild, lambda x: x * jax.nn.sigmoid(x * x), X)[0]  # a value, no constant
    scaled = Example(lambda x: x * 0.5, SPEC, literals="any")
    assert match_out(scaled, lambda x: x * 0.70710678, X)[0]
    divided = Example(lambda x: x / 2.0, SPEC, literals=("d",))
    ok, st = match_out(divided, lambda x: x / jnp.sqrt(2.0), X)
    assert ok and st.bindings["d"] == pytest.approx(2 ** 0.5)
    with pytest.raises(ValueError, match=r"2 literal names for 1 constants \[1.702"):
        Example(gelu_like, SPEC, literals=("a", "b"))
    rule = PatternRule("gelu_like", named, _times_two, inputs=("x",), params=lambda b: {})
    assert rule.inputs == ("x",)


def test_example_scaling_matches_division_by_the_reciprocal():
    spec = jax.ShapeDtypeStruct((4, 8), jnp.float32)

    def gelu_erf(x):
        return 0.5 * x * (1 + jax.lax.erf(x * 0.70710678))

    rule = PatternRule("gelu", Example(gelu_erf, spec), lambda x: jax.nn.gelu(x, approximate=False),
                       inputs=("x",))
    pipe = passes.Pipeline(passes.cleanup_passes() + [passes.RulePass("gelu", [rule])])
    by_division = lambda x: 0.5 * x * (1 + jax.lax.erf(x / jnp.sqrt(2.0)))
    other_divisor = lambda x: 0.5 * x * (1 + jax.lax.erf(x / 3.0))
    x = jax.random.normal(jax.random.key(0), (3, 5))
    assert passes.explain(by_division, x, pipeline=pipe).counts["gelu"] == 1
    assert passes.explain(other_divisor, x, pipeline=pipe).counts["gelu"] == 0
    np.testing.assert_allclose(passes.optimize(by_division, pipe)(x), by_division(x),
                               rtol=1e-5, atol=1e-6)
