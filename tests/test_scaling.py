"""The engine's cost grows with the program, not faster: its work is counted, not timed.

A model four times as deep has about four times the equations; every count of engine work below
(index entries built, graph look-ups by matchers, match attempts, equations walked by passes and
by the well-formedness check) must grow by no more than that, per equation. Work redone after
every edit, or a walk over the whole region per match, would grow about four times faster.
"""
import gc
from collections import Counter

import jax
import pytest

import models
import passes
from passes import ir, pattern, pipeline, rewrite

SLACK = 1.15  # per-equation work may grow this much from the shallow model to the deep one


def _count_calls(monkeypatch, counts, owner, name, weight=lambda *a: 1):
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        counts[name] += weight(*args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


def _engine_work(monkeypatch, model, num_layers) -> tuple[int, Counter]:
    """(top-level equations, work counts) of one explain with the default pipeline."""
    spec = models.get(model, num_layers=num_layers)
    params = jax.eval_shape(spec.init, jax.random.key(0))
    data = jax.eval_shape(lambda k: spec.batch(k, 2), jax.random.key(1))
    counts = Counter()
    with monkeypatch.context() as m:
        _count_calls(m, counts, ir.Region, "__init__", lambda self, jaxpr, *a, **k:
                     len(passes._compat.open_jaxpr(jaxpr).eqns))
        _count_calls(m, counts, ir.Region, "_index", lambda self: len(self.eqns))
        _count_calls(m, counts, ir.Region, "producer")
        _count_calls(m, counts, ir.Region, "users")
        _count_calls(m, counts, ir.Region, "positions")
        _count_calls(m, counts, pipeline, "_nested_jaxprs")
        _count_calls(m, counts, rewrite.FunctionRule, "match")
        _count_calls(m, counts, pattern.PatternRule, "_match")
        report = passes.explain(spec.loss, params, data,
                                pipeline=passes.default_pipeline(check=False))
    assert sum(report.counts.values()) > 0
    return len(passes._compat.open_jaxpr(report._before).eqns), counts


@pytest.mark.parametrize("model", ["gpt2-tiny", "llama-tiny"])
def test_engine_work_grows_linearly_with_depth(monkeypatch, model):
    eqns_2, work_2 = _engine_work(monkeypatch, model, 2)
    eqns_8, work_8 = _engine_work(monkeypatch, model, 8)
    assert eqns_8 > 3 * eqns_2
    grown = {name: (work_8[name] / eqns_8) / (work_2[name] / eqns_2) for name in work_2}
    assert {"__init__", "_index", "producer", "_nested_jaxprs"} <= set(grown)
    too_fast = {name: round(g, 2) for name, g in grown.items() if g > SLACK}
    assert not too_fast, f"work per equation grew {too_fast} from 2 to 8 layers"


def test_well_formedness_check_walks_each_body_once_per_run():
    body = jax.make_jaxpr(jax.jit(lambda y: y * 2.0))(1.0)
    checked = {}
    assert pipeline.undefined_use(body, checked) is None
    inner = passes._compat.open_jaxpr(body).eqns[0].params["jaxpr"]
    assert id(passes._compat.open_jaxpr(inner)) in checked
    walked = []
    original = pipeline._nested_jaxprs
    try:
        pipeline._nested_jaxprs = lambda eqn: walked.append(eqn) or original(eqn)
        assert pipeline.undefined_use(body, checked) is None
    finally:
        pipeline._nested_jaxprs = original
    assert walked == []


def test_collector_is_paused_while_passes_run_and_restored_after():
    seen = []

    class Probe(passes.Pass):
        name = "probe"

        def run(self, region, ctx):
            seen.append(gc.isenabled())
            return 0

    probe = passes.Pipeline([Probe()])
    closed = jax.make_jaxpr(lambda x: x + 1.0)(1.0)
    assert gc.isenabled()
    probe.run(closed)
    passes.explain(lambda x: x + 1.0, 1.0, pipeline=probe)
    assert seen == [False, False] and gc.isenabled()
    gc.disable()  # a caller's own choice is left alone
    try:
        probe.run(closed)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_collector_pauses_nest():
    with pipeline.collector_paused():
        with pipeline.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
