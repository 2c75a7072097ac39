"""Translation validation: a wrong rewrite is declined with evidence when it is made."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import passes
from passes.rewrite import FunctionRule, Match


def unary_rule(primitive, replacement):
    def match(region, pos):
        eqn = region.eqns[pos]
        return Match(root=pos, eqns=frozenset({pos}), inputs=tuple(eqn.invars),
                     outputs=tuple(eqn.outvars), replacement=replacement)
    return FunctionRule(f"{primitive.name}_swap", [primitive], match)


def pipeline_with(rule, check=True):
    return passes.Pipeline([passes.RulePass("swap", [rule])], check=check)


def swapped_tanh(x):
    return 2 * jax.nn.sigmoid(2 * x) - 1


def identity(x):
    return x


X = jax.random.normal(jax.random.key(0), (4, 32))


def test_a_correct_rewrite_is_kept():
    f = lambda x: jnp.tanh(x) * 3.0
    report = passes.explain(f, X, pipeline=pipeline_with(unary_rule(lax.tanh_p, swapped_tanh)))
    assert report.counts["swap"] == 1 and not report.declined


def test_a_wrong_rewrite_is_declined_with_evidence():
    f = lambda x: jnp.tanh(x) * 3.0
    pipe = pipeline_with(unary_rule(lax.tanh_p, identity))
    report = passes.explain(f, X, pipeline=pipe)
    assert report.counts["swap"] == 0
    (declined,) = report.declined
    assert "translation validation failed (normal inputs" in declined.reason
    assert "too far from float64" in declined.reason
    np.testing.assert_allclose(passes.optimize(f, pipe)(X), jax.jit(f)(X), rtol=1e-6)


def test_a_rewrite_that_loses_nan_is_declined():
    f = lambda x: jnp.maximum(x, 0.0) + 1.0
    report = passes.explain(f, X, pipeline=pipeline_with(unary_rule(lax.max_p, relu_by_where_2)))
    assert report.counts["swap"] == 0
    assert "special values inputs" in report.declined[0].reason


def relu_by_where_2(x, zero):
    return jnp.where(x > zero, x, zero)  # NaN > 0 is False: NaN becomes 0


def relu_by_maximum_2(x, zero):
    return jnp.maximum(x, zero)


def test_a_rewrite_that_keeps_nan_is_kept():
    f = lambda x: jnp.maximum(x, 0.0) + 1.0
    report = passes.explain(f, X, pipeline=pipeline_with(unary_rule(lax.max_p, relu_by_maximum_2)))
    assert report.counts["swap"] == 1 and not report.declined


def test_validation_is_off_without_checking():
    f = lambda x: jnp.tanh(x) * 3.0
    pipe = pipeline_with(unary_rule(lax.tanh_p, identity), check=False)
    assert passes.explain(f, X, pipeline=pipe).counts["swap"] == 1


def test_validation_runs_inside_a_callers_jit():
    f = lambda x: jnp.tanh(x) * 3.0
    opt = passes.optimize(f, pipeline_with(unary_rule(lax.tanh_p, lambda x: x + 1e-3)))
    np.testing.assert_allclose(jax.jit(opt)(X), jax.jit(f)(X), rtol=1e-6)
