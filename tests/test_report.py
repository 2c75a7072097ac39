"""The report as a notebook shows it: rewrites and declines grouped by module path, and a
before/after view of a rewritten region."""
import re

import jax
import jax.numpy as jnp
import pytest

import passes
from passes.pattern import Example, PatternRule

SPEC = jax.ShapeDtypeStruct((4, 8), jnp.float32)


def _layer_norm(x, scale, bias):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias  # as flax.nnx.LayerNorm


def _swish(x):
    return x * jax.nn.sigmoid(x)


def _swish_replacement(x):
    return jax.nn.silu(x)


def _declining_pass():
    rule = PatternRule("swish", Example(_swish, SPEC), _swish_replacement, inputs=("x",),
                       check=lambda b: "the kernel wants a width of 128")
    return passes.RulePass("swish", [rule])


def _program(x, scale, bias):
    with jax.named_scope("encoder"):
        with jax.named_scope("ln_a"):
            h = _layer_norm(x, scale, bias)
        with jax.named_scope("act"):
            h = _swish(h)
    with jax.named_scope("decoder"):
        with jax.named_scope("ln_b"):
            h = _layer_norm(h, scale, bias)
    return h


@pytest.fixture(scope="module")
def report():
    pipeline = passes.Pipeline(passes.default_pipeline(implementation="xla").passes
                               + [_declining_pass()])
    x = jax.random.normal(jax.random.key(0), (4, 8))
    return passes.explain(_program, x, jnp.ones(8), jnp.zeros(8), pipeline=pipeline)


def test_rewrites_and_declines_are_grouped_by_module_path(report):
    assert [r.module_path for r in report.rewrites if r.pass_name == "layer_norm"] == [
        "encoder/ln_a", "decoder/ln_b"]
    assert [(d.pass_name, d.module_path) for d in report.declined] == [("swish", "encoder/act")]
    groups = report.by_module()
    assert list(groups) == ["encoder/ln_a", "encoder/act", "decoder/ln_b"]  # program order
    assert [r.site for r in groups["decoder/ln_b"]] == ["layer_norm/1"]

    page = report._repr_html_()
    assert "<table>" in page
    headers = [page.index(f"<code>{m}</code>") for m in groups]
    assert headers == sorted(headers)
    # each record sits under its module's header, before the next header
    assert headers[0] < page.index("layer_norm/0") < headers[1]
    assert headers[1] < page.index("the kernel wants a width of 128") < headers[2]
    assert headers[2] < page.index("layer_norm/1")
    assert re.search(r"<code>encoder/act</code>\s*(&nbsp;)?<small>1 declined</small>", page)


def test_html_shows_the_matched_equations_and_the_call_replacing_them(report):
    view = report.view("layer_norm/0")
    assert any("rsqrt" in line for line in view.before)
    assert any("reduce_sum" in line for line in view.before)
    assert view.after.startswith(view.before[-1].split(" = ")[0])  # the same output variable
    assert "= passes.layer_norm.layer_norm(" in view.after
    assert len(view.inputs) == 3  # x, scale, bias

    page = report._repr_html_()  # shows the first rewrite: layer_norm/0
    before = re.search(r'<pre class="before">(.*?)</pre>', page, re.S).group(1)
    after = re.search(r'<pre class="after">(.*?)</pre>', page, re.S).group(1)
    assert "rsqrt" in before and "reduce_sum" in before
    assert "passes.layer_norm.layer_norm(" in after and "rsqrt" not in after
    assert f"before: {len(view.before)} equations" in page

    text = str(view)
    assert "before (" in text and "passes.layer_norm.layer_norm(" in text


def test_text_report_and_unknown_sites(report):
    text = str(report)
    assert "layer_norm/0" in text and "the kernel wants a width of 128" in text
    with pytest.raises(KeyError, match="layer_norm/0"):
        report.view("attention/7")


def test_a_report_with_nothing_rewritten_still_renders():
    report = passes.explain(lambda x: x + 1.0, jnp.ones(3))
    assert "<table>" in report._repr_html_() and "Nothing fired" in report._repr_html_()
    with pytest.raises(ValueError):
        report.view()
