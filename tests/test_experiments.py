"""The experiment driver: CLI end to end, output files, measured arithmetic, errors."""
import csv
import io
import json
import math
import statistics

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import optax
import pytest
from rich.console import Console

import models
import passes
from experiments import config as config_lib
from experiments import engine_cost, measure, output
from experiments import run as run_lib
from experiments.config import RunConfig, Sweep

# A small MLP: compiles in about a second.
MLP = dict(models=("mlp",), model_overrides=(("input_dim", 64), ("hidden_dim", 128)),
           batch=16)


def _payload(path):
    return json.loads((path / "results.json").read_text())


# -- the CLI end to end: gpt2-tiny at one layer, seq swept -----------------------------------

SWEEP_ARGS = ["--model", "gpt2-tiny", "--sweep", "num_layers=1", "--sweep", "seq=8,16",
              "--batch", "2", "--steps", "2", "--repeats", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "results"
    rc = run_lib.main(SWEEP_ARGS + ["--out", str(out)])
    return rc, out


def test_cli_writes_well_formed_json(sweep_run):
    rc, out = sweep_run
    assert rc == 0
    payload = _payload(out)
    env = payload["environment"]
    assert env["jax_version"] == jax.__version__
    assert env["device_kind"] == jax.devices()[0].device_kind
    assert env["device_count"] == len(jax.devices())
    assert env["flax_version"] and env["jaxlib_version"]
    args = " ".join(SWEEP_ARGS + ["--out", str(out)])
    assert env["command"].endswith(f"-m experiments.run {args}")
    assert len(env["git_commit"]) == 40
    assert payload["config"]["sweeps"] == {"num_layers": [1], "seq": [8, 16]}
    for r in payload["results"]:
        assert r["status"] == "ok" and not r["diverged"] and r["numerics_ok"]
        assert r["speedup"] > 0
        for name in ("baseline", "optimized"):
            v = r[name]
            for key in ("step_time_s", "tokens_per_s", "compile_time_s", "peak_memory_bytes"):
                assert v[key] > 0, (name, key)
            assert v["compile_time_s"] == pytest.approx(v["lower_time_s"] + v["xla_compile_time_s"])
            assert v["mfu"] is None  # no peak for a CPU
        assert r["optimized"]["pass_time_s"] >= 0
        assert r["mfu_peak"] is None


def test_sweep_makes_one_case_per_value_with_its_sizes(sweep_run):
    _, out = sweep_run
    results = _payload(out)["results"]
    assert [r["label"] for r in results] == ["gpt2-tiny num_layers=1 seq=8",
                                             "gpt2-tiny num_layers=1 seq=16"]
    assert [r["seq"] for r in results] == [8, 16]
    assert [r["sweep"] for r in results] == [{"num_layers": 1, "seq": 8},
                                             {"num_layers": 1, "seq": 16}]
    for r in results:
        spec = models.get("gpt2-tiny", num_layers=1, seq_len=r["seq"])
        assert r["flops_per_step"] == spec.flops_per_example * 2


def test_speedup_and_rates_follow_from_the_measured_times(sweep_run):
    _, out = sweep_run
    for r in _payload(out)["results"]:
        b, o = r["baseline"], r["optimized"]
        for v in (b, o):
            assert len(v["step_times_s"]) == 2  # --repeats 2
            assert v["step_time_s"] == pytest.approx(statistics.median(v["step_times_s"]))
            assert v["step_time_min_s"] == min(v["step_times_s"])
            assert v["step_time_max_s"] == max(v["step_times_s"])
            assert v["tokens_per_s"] == pytest.approx(2 * r["seq"] / v["step_time_s"])
            assert v["model_tflops"] == pytest.approx(
                r["flops_per_step"] / v["step_time_s"] / 1e12)
        assert r["speedup"] == pytest.approx(b["step_time_s"] / o["step_time_s"])


def test_losses_are_those_of_an_independent_training_loop(sweep_run):
    """Same seed and data for both variants; the final loss comes after warmup + repeats * steps."""
    _, out = sweep_run
    r = _payload(out)["results"][1]
    spec = models.get("gpt2-tiny", num_layers=1, seq_len=16)
    param_key, batch_key = jax.random.split(jax.random.key(0))
    params, batch = jax.jit(spec.init)(param_key), spec.batch(batch_key, 2)
    tx = optax.adamw(RunConfig().learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(spec.loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(1 + 2 * 2):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    n = r["numerics"]
    assert n["loss_initial_baseline"] == pytest.approx(losses[0], rel=1e-6)
    assert n["loss_final_baseline"] == pytest.approx(losses[-1], rel=1e-5)
    assert losses[-1] < losses[0]  # the steps really trained
    assert n["loss_final_diff"] == pytest.approx(
        abs(n["loss_final_optimized"] - n["loss_final_baseline"]))
    assert n["loss_final_diff"] <= n["loss_rtol"] * max(abs(losses[-1]), 1.0)
    assert 0 <= n["grad_max_rel_diff"] <= n["grad_rtol"]


def test_rewrite_counts_are_those_of_explain(sweep_run):
    _, out = sweep_run
    r = _payload(out)["results"][0]
    spec = models.get("gpt2-tiny", num_layers=1, seq_len=8)
    params = jax.eval_shape(spec.init, jax.random.key(0))
    batch = jax.eval_shape(lambda k: spec.batch(k, 2), jax.random.key(1))
    report = passes.explain(spec.loss, params, batch, pipeline=passes.default_pipeline())
    assert r["optimized"]["rewrites"] == report.counts
    assert r["optimized"]["rewrites_total"] == len(report.rewrites)


def test_csv_matches_json(sweep_run):
    _, out = sweep_run
    results = _payload(out)["results"]
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == output.CSV_COLUMNS
    assert len(rows) == len(results)
    for row, r in zip(rows, results):
        assert row["label"] == r["label"]
        assert float(row["speedup"]) == pytest.approx(r["speedup"])
        assert float(row["baseline_step_time_s"]) == pytest.approx(r["baseline"]["step_time_s"])
        assert float(row["optimized_tokens_per_s"]) == pytest.approx(
            r["optimized"]["tokens_per_s"])
        assert int(row["rewrites_total"]) == r["optimized"]["rewrites_total"]
        assert row["error"] == ""


def test_speedup_interval_in_json_and_csv(sweep_run):
    _, out = sweep_run
    results = _payload(out)["results"]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row, r in zip(rows, results):
        low, high = r["speedup_ci"]
        assert low <= r["speedup"] <= high
        assert r["speedup_within_noise"] == (low <= 1.0 <= high)
        assert float(row["speedup_ci_low"]) == pytest.approx(low)
        assert float(row["speedup_ci_high"]) == pytest.approx(high)
        assert row["speedup_within_noise"] == str(r["speedup_within_noise"])


def test_png_is_an_image(sweep_run):
    _, out = sweep_run
    data = (out / "results.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out / "results.png")
    height, width = image.shape[:2]
    assert width > height > 100


# -- Python API runs on a small MLP ----------------------------------------------------------

def test_pipeline_none_rewrites_nothing_and_runs_at_the_same_speed(tmp_path):
    config = RunConfig(**MLP, pipeline="none", steps=30, repeats=5, warmup=3,
                       profile=str(tmp_path / "trace"))
    (r,) = run_lib.run(config, verbose=False)["results"]
    assert r["status"] == "ok"
    assert r["optimized"]["rewrites"] == {}
    assert r["optimized"]["rewrites_total"] == 0
    # The same program re-evaluated: same results, same memory, no per-call overhead (a
    # retrace on every call would make it many times slower).
    assert r["numerics"]["loss_initial_diff"] <= 1e-6
    assert r["numerics"]["grad_max_rel_diff"] <= 1e-6
    assert r["optimized"]["peak_memory_bytes"] == r["baseline"]["peak_memory_bytes"]
    assert 1 / 3 < r["speedup"] < 3
    assert r["optimized"]["tokens_per_s"] is None  # an MLP has no sequence
    assert r["optimized"]["examples_per_s"] == pytest.approx(16 / r["optimized"]["step_time_s"])
    traces = list((tmp_path / "trace").rglob("*.xplane.pb"))
    assert traces, "the profile folder holds no trace"


def test_interpreted_kernels_report_their_memory_as_opaque_calls(tmp_path):
    # On a CPU Pallas's interpreter copies every kernel operand; the driver also reports the
    # optimized program's memory with each kernel one opaque call (as a GPU compiles it)
    config = RunConfig(**MLP, implementation="pallas", steps=1, repeats=1, warmup=1,
                       out=str(tmp_path))
    payload = run_lib.run(config, verbose=False)
    (r,) = payload["results"]
    assert r["optimized"]["rewrites"], r["optimized"]["rewrites"]
    as_calls = r["optimized"]["kernels_as_calls"]["peak_memory_bytes"]
    assert as_calls < r["optimized"]["peak_memory_bytes"], (as_calls, r["optimized"])
    _, costs = output.results_tables(payload)
    console = Console(file=io.StringIO(), width=200)
    console.print(costs)
    assert f"({as_calls / 2**20:,.1f} as calls)" in console.file.getvalue()
    (row,) = csv.DictReader((tmp_path / "results.csv").open())
    assert int(row["optimized_kernels_as_calls_peak_memory_bytes"]) == as_calls
    # the default implementation runs no interpreted kernel here: nothing to report
    (plain,) = run_lib.run(RunConfig(**MLP, steps=1, repeats=1, warmup=1),
                           verbose=False)["results"]
    assert "kernels_as_calls" not in plain["optimized"]


def _exp_too_large(x):
    return jnp.exp(x) * 1.5


def _wrong_exp(region, position):
    eqn = region.eqns[position]
    return passes.Match(root=position, eqns=frozenset({position}), inputs=tuple(eqn.invars),
                        outputs=tuple(eqn.outvars), replacement=_exp_too_large)


def test_a_wrong_rewrite_is_flagged_red_and_in_the_json(tmp_path):
    wrong = passes.RulePass("wrong_exp", [passes.FunctionRule("exp", [jax.lax.exp_p],
                                                              _wrong_exp)])
    # checking off: translation validation would decline the wrong rewrite before the driver
    # ever ran it, and the driver's own flag is what this test is about
    pipeline = passes.Pipeline(passes.cleanup_passes() + [wrong], check=False)
    config = RunConfig(**MLP, pipeline=pipeline, steps=2, repeats=2, out=str(tmp_path))
    payload = run_lib.run(config, verbose=False)
    (r,) = payload["results"]
    assert r["pipeline"] == "custom:canonicalize,cse,dce,wrong_exp"
    assert r["optimized"]["rewrites"]["wrong_exp"] >= 1
    assert r["diverged"] is True and r["numerics"]["diverged"] is True
    assert r["numerics_ok"] is False
    assert any("initial loss differs" in f for f in r["numerics"]["flags"])
    assert _payload(tmp_path)["results"][0]["diverged"] is True
    timing, costs = output.results_tables(payload)
    assert timing.rows[0].style == "bold red" and costs.rows[0].style == "bold red"
    assert "bold red" in output.case_line(r)


def test_forward_mode_times_the_loss_alone():
    config = RunConfig(**MLP, mode="forward", steps=3, repeats=2)
    (r,) = run_lib.run(config, verbose=False)["results"]
    spec = models.get("mlp", input_dim=64, hidden_dim=128)
    assert r["flops_per_step"] == pytest.approx(spec.flops_per_example * 16 / 3)
    n = r["numerics"]
    assert n["grad_max_rel_diff"] is None and n["loss_final_diff"] is None
    param_key, batch_key = jax.random.split(jax.random.key(0))
    expected = jax.jit(spec.loss)(jax.jit(spec.init)(param_key), spec.batch(batch_key, 16))
    assert n["loss_initial_baseline"] == pytest.approx(float(expected), rel=1e-6)


def test_out_of_memory_is_reported_and_the_run_goes_on(monkeypatch):
    real_compile, calls = run_lib._compile, []

    def compile_or_run_out(*args):
        calls.append(len(calls))
        if len(calls) == 1:  # the first case's baseline
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456 bytes.")
        return real_compile(*args)

    monkeypatch.setattr(run_lib, "_compile", compile_or_run_out)
    config = RunConfig(**MLP, sweeps=(Sweep("batch", (8, 16)),), steps=2, repeats=2,
                       check_numerics=False)
    payload = run_lib.run(config, verbose=False)
    first, second = payload["results"]
    assert first["status"] == "out_of_memory"
    assert "RESOURCE_EXHAUSTED" in first["error"]
    assert first["baseline"]["status"] == "out_of_memory"
    assert first["optimized"]["step_time_s"] > 0  # the other variant is still measured
    assert first["speedup"] is None
    assert second["status"] == "ok" and second["speedup"] > 0
    console = Console(file=io.StringIO(), width=200)
    output.print_summary(payload, console)
    text = console.file.getvalue()
    assert "OOM" in text.splitlines()[4]  # the first case's row: baseline out of memory
    assert "mlp batch=8: out of memory" in text


# -- arithmetic on injected numbers ----------------------------------------------------------

def test_time_interleaved_alternates_and_divides_by_steps():
    now, log = [0.0], []
    per_step = {"baseline": [0.020, 0.030, 0.025], "optimized": [0.010, 0.012, 0.011]}

    def runner(name):
        def run_steps(n):
            log.append(name)
            now[0] += n * per_step[name][sum(1 for x in log if x == name) - 1]
        return run_steps

    seen = []
    times = measure.time_interleaved({n: runner(n) for n in per_step}, steps=4, repeats=3,
                                     clock=lambda: now[0], on_repetition=seen.append)
    assert log == ["baseline", "optimized", "optimized", "baseline", "baseline", "optimized"]
    assert seen == [0, 1, 2]
    for name in per_step:
        assert times[name] == pytest.approx(per_step[name])
    base = measure.timing_metrics(times["baseline"], batch=4, seq=128, flops_per_step=2e12,
                                  peak=measure.Peak(989.0, "H100 SXM bf16 dense"))
    opt = measure.timing_metrics(times["optimized"], batch=4, seq=128, flops_per_step=2e12,
                                 peak=measure.Peak(989.0, "H100 SXM bf16 dense"))
    assert base["step_time_s"] == pytest.approx(0.025)
    assert (base["step_time_min_s"], base["step_time_max_s"]) == pytest.approx((0.020, 0.030))
    assert base["tokens_per_s"] == pytest.approx(4 * 128 / 0.025)
    assert base["examples_per_s"] == pytest.approx(4 / 0.025)
    assert base["model_tflops"] == pytest.approx(80.0)
    assert base["mfu"] == pytest.approx(80.0 / 989.0)
    assert opt["step_time_s"] == pytest.approx(0.011)
    assert measure.speedup(base, opt) == pytest.approx(0.025 / 0.011)
    assert measure.speedup(base, {"status": "out_of_memory"}) is None


def test_speedup_interval_brackets_the_ratio_of_medians():
    base = [0.0300, 0.0310, 0.0295, 0.0305, 0.0302, 0.0298]
    opt = [0.0200, 0.0205, 0.0198, 0.0202, 0.0201, 0.0199]
    low, high = measure.speedup_interval(base, opt)
    ratio = statistics.median(base) / statistics.median(opt)
    assert 1.0 < low <= ratio <= high < 1.6
    assert measure.within_noise((low, high)) is False
    assert measure.speedup_interval([0.03], [0.02]) is None  # one repetition: no interval
    assert measure.within_noise(None) is None


def _noisy_timings():
    """The 2-core machine of the report: the baseline's own steps spread from 15.7 to 25.7 ms."""
    base = [0.0157, 0.0257, 0.0180, 0.0240, 0.0165, 0.0230]
    opt = [0.0240, 0.0170, 0.0235, 0.0160, 0.0250, 0.0175]
    return base, opt


def test_a_ratio_inside_the_noise_is_labelled_within_noise():
    base, opt = _noisy_timings()
    interval = measure.speedup_interval(base, opt)
    assert interval[0] < 1.0 < interval[1] and measure.within_noise(interval)
    result = {"label": "noisy", "status": "ok", "numerics_ok": True, "error": None,
              "speedup": statistics.median(base) / statistics.median(opt),
              "speedup_ci": list(interval), "speedup_within_noise": True,
              "baseline": {"step_time_s": statistics.median(base)},
              "optimized": {"step_time_s": statistics.median(opt)}}
    text = output.speedup_text(result)
    assert text.endswith("within noise") and f"{result['speedup']:.2f}x" in text
    assert "[green]" not in output._speed_text(result) and "[red]" not in output._speed_text(result)
    assert "within noise" in output.case_line(result)
    payload = {"environment": {"device_count": 1, "device_kind": "cpu", "jax_version": "x"},
               "results": [result]}
    console = Console(record=True, width=200)
    for table in output.results_tables(payload):
        console.print(table)
    assert "within noise" in console.export_text()
    assert output.csv_row(result)["speedup_within_noise"] is True


def test_vision_rates_and_missing_peak():
    m = measure.timing_metrics([0.5], batch=10, seq=None, flops_per_step=1e12, peak=None)
    assert m["tokens_per_s"] is None and m["examples_per_s"] == 20.0
    assert m["model_tflops"] == pytest.approx(2.0) and m["mfu"] is None


def test_device_peaks():
    assert measure.device_peak("NVIDIA H100 80GB HBM3", "bfloat16").tflops == 989.0
    assert measure.device_peak("NVIDIA H100 80GB HBM3", "float32").tflops == 67.0
    assert measure.device_peak("NVIDIA H100 PCIe", "bfloat16").tflops == 756.0
    assert measure.device_peak("cpu", "float32") is None


def test_numerics_flags():
    ok = measure.numerics(loss_initial=(2.0, 2.0005), loss_final=(1.5, 1.5009),
                          grad_rel_diff=2e-4, dtype="float32")
    assert not ok["diverged"] and not ok["gradients_differ"] and ok["flags"] == []
    assert ok["ok"]
    assert ok["loss_final_diff"] == pytest.approx(9e-4)
    drift = measure.numerics(loss_initial=(2.0, 2.0), loss_final=(1.5, 1.503),
                             grad_rel_diff=0.0, dtype="float32")
    assert drift["diverged"] and "final loss differs by 0.003" in drift["flags"][0]
    # bf16 tolerates it, and a tolerance can be given
    assert not measure.numerics(loss_initial=(2.0, 2.0), loss_final=(1.5, 1.503),
                                grad_rel_diff=0.0, dtype="bfloat16")["diverged"]
    assert measure.numerics(loss_initial=(2.0, 2.0), loss_final=(1.5, 1.503),
                            grad_rel_diff=0.0, dtype="bfloat16", loss_rtol=1e-4)["diverged"]
    nan = measure.numerics(loss_initial=(2.0, float("nan")), loss_final=None,
                           grad_rel_diff=None, dtype="float32")
    assert nan["diverged"] and "optimized initial loss is nan" in nan["flags"][0]
    grads = measure.numerics(loss_initial=(2.0, 2.0), loss_final=None, grad_rel_diff=0.5,
                             dtype="float32")
    assert grads["gradients_differ"] and not grads["diverged"] and not grads["ok"]
    assert measure.numerics(loss_initial=None, loss_final=None, grad_rel_diff=float("nan"),
                            dtype="float32")["gradients_differ"]


def test_max_relative_difference_scales_each_leaf():
    ref = {"a": np.array([1.0, -4.0]), "b": np.array([0.5])}
    got = {"a": np.array([1.0, -3.9]), "b": np.array([0.501])}
    assert measure.max_relative_difference(ref, got) == pytest.approx(0.1 / 4.0)
    assert measure.max_relative_difference(ref, ref) == 0.0
    # a leaf that is zero up to rounding is scaled by 1e-3 of the largest leaf (4 here)
    tiny = {"a": np.array([1.0, -4.0]), "b": np.array([1e-9])}
    noise = {"a": np.array([1.0, -4.0]), "b": np.array([3e-9])}
    wrong = {"a": np.array([1.0, -4.0]), "b": np.array([0.02])}
    assert measure.max_relative_difference(tiny, noise) == pytest.approx(2e-9 / 4e-3)
    assert measure.max_relative_difference(tiny, wrong) == pytest.approx(0.02 / 4e-3, rel=1e-6)
    zero = {"a": np.zeros(2), "b": np.zeros(1)}
    assert measure.max_relative_difference(zero, {"a": np.array([0.0, 1e-3]),
                                                  "b": np.zeros(1)}) == math.inf
    assert measure.max_relative_difference(ref, {"a": np.array([1.0, np.nan]),
                                                 "b": np.array([0.5])}) == math.inf


def test_out_of_memory_errors_are_recognized():
    assert measure.is_out_of_memory(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
    assert not measure.is_out_of_memory(jax.errors.JaxRuntimeError("INVALID_ARGUMENT: shapes"))
    assert not measure.is_out_of_memory(ValueError("out of memory"))


def test_json_keeps_non_finite_numbers_standard(tmp_path):
    output.write_json({"x": float("inf"), "y": [float("nan"), 1.0]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": "inf", "y": ["nan", 1.0]}


# -- bad input -------------------------------------------------------------------------------

def _cli_error(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        run_lib.main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_model_lists_the_registered_ones(capsys):
    err = _cli_error(capsys, "--model", "gpt2-tiny", "gpt2-tinyy")
    assert "unknown model 'gpt2-tinyy'" in err
    for name in models.names():
        assert name in err
    with pytest.raises(ValueError, match="registered models: .*llama-tiny"):
        RunConfig(models=("nope",))


def test_unknown_pass_lists_the_valid_ones(capsys):
    err = _cli_error(capsys, "--pipeline", "canonicalize,fuse_everything")
    assert "unknown pass name(s) 'fuse_everything'" in err
    for name in config_lib.available_passes():
        assert name in err
    err = _cli_error(capsys, "--sweep", "pipeline=none,cse+bogus")
    assert "'bogus'" in err


def test_bad_settings_say_what_to_do(capsys, tmp_path):
    assert "has no seq_len" in _cli_error(capsys, "--model", "mlp", "--seq", "16")
    assert "KEY=V1,V2" in _cli_error(capsys, "--sweep", "seq")
    err = _cli_error(capsys, "--model", "mlp", "--sweep", "colour=1,2")
    assert "no config field(s) colour" in err and "hidden_dim" in err
    assert "unknown dtype 'float16'" in _cli_error(capsys, "--dtype", "float16")
    assert "batch must be a positive int" in _cli_error(capsys, "--batch", "0")
    (tmp_path / "old.json").write_text("{}")
    assert "is not empty" in _cli_error(capsys, "--out", str(tmp_path))


def test_list_names_models_and_passes(capsys):
    assert run_lib.main(["--list"]) == 0
    text = capsys.readouterr().out
    for name in models.names() + config_lib.available_passes() + list(config_lib.PRESETS):
        assert name in text


def test_list_says_what_each_fusion_pass_matches_and_calls(capsys):
    assert run_lib.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    fusion = [p for p in passes.default_pipeline().passes if isinstance(p, passes.RulePass)]
    assert {p.name for p in fusion} >= {"attention", "softmax_cross_entropy", "layer_norm",
                                        "rms_norm", "dense_act"}
    descriptions = set()
    for p in fusion:
        (line,) = [ln for ln in lines if ln.split()[:1] == [p.name]]
        description = line.split(None, 1)[1]
        assert description == p.description and "-> pallas_kernels." in description
        descriptions.add(description)
    assert len(descriptions) == len(fusion)  # no shared boilerplate


def test_presets_and_sweeps_expand_to_cases():
    preset = config_lib.PRESETS["gpt2-small-h100"]
    (case,) = config_lib.cases(preset)
    assert case.model_overrides() == {"seq_len": 1024, "dtype": "bfloat16"}
    assert case.batch == 8
    grid = config_lib.cases(RunConfig(models=("gpt2-tiny", "llama-tiny"),
                                      sweeps=(config_lib.parse_sweep("batch=1,2"),
                                              config_lib.parse_sweep("dtype=float32,bfloat16"))))
    assert len(grid) == 8
    assert {(c.model, c.batch, c.dtype) for c in grid} == {
        (m, b, d) for m in ("gpt2-tiny", "llama-tiny") for b in (1, 2)
        for d in ("float32", "bfloat16")}
    assert config_lib.parse_sweep("pipeline=none,canonicalize+cse").values == (
        "none", "canonicalize+cse")


# -- engine cost -----------------------------------------------------------------------------

def test_count_equations_includes_nested_bodies():
    def f(x):
        return jnp.sin(jax.jit(lambda y: y * 2.0 + 1.0)(x))

    assert engine_cost.count_equations(jax.make_jaxpr(f)(1.0)) == (2, 4)


def test_engine_cost_end_to_end(tmp_path, capsys):
    path = tmp_path / "cost.json"
    rc = engine_cost.main(["--layers", "2", "1", "--seq", "8", "--vocab", "64", "--batch", "1",
                           "--repeats", "2", "--json", str(path)])
    data = json.loads(path.read_text())
    rows, summ = data["rows"], data["summary"]
    assert [r["num_layers"] for r in rows] == [1, 2]
    assert rows[1]["equations"] > rows[0]["equations"]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["explain_s"] / r["xla_compile_s"])
        assert 0 < r["pass_s"] + r["trace_s"] <= r["explain_s"]
        assert r["pass_s"] <= r["engine_s"] <= r["explain_s"] - r["trace_s"]
    assert summ["explain_growth"] == pytest.approx(rows[1]["explain_s"] / rows[0]["explain_s"])
    assert summ["engine_growth"] == pytest.approx(rows[1]["engine_s"] / rows[0]["engine_s"])
    assert rc == (0 if summ["ratio_ok"] and summ["growth_ok"] else 1)
    assert "growth 2/1 layers" in capsys.readouterr().out


def test_engine_cost_summary_arithmetic():
    rows = [{"num_layers": 12, "explain_s": 0.2, "jax_trace_s": 0.05, "engine_s": 0.15,
             "xla_compile_s": 10.0, "equations": 1000, "ratio": 0.02},
            {"num_layers": 48, "explain_s": 1.0, "jax_trace_s": 0.2, "engine_s": 0.8,
             "xla_compile_s": 20.0, "equations": 4000, "ratio": 0.05}]
    s = engine_cost.summary(rows)
    assert s["explain_growth"] == pytest.approx(5.0)
    assert s["engine_growth"] == pytest.approx(0.8 / 0.15) and not s["growth_ok"]
    assert s["jax_trace_growth"] == pytest.approx(4.0)
    assert s["xla_compile_growth"] == pytest.approx(2.0)
    assert s["equations_growth"] == pytest.approx(4.0)
    assert s["max_ratio"] == pytest.approx(0.05) and s["ratio_ok"]


# -- python -m experiments.kernels for a TPU, on a CPU through the TPU interpreter ------------

def test_kernel_benchmark_runs_for_tpu(capsys):
    from experiments import kernels
    payload = kernels.main(["--small", "--ops", "norms", "--platform", "tpu", "--trials", "1"])
    assert payload["kernel_platform"] == "tpu"
    assert payload["interpret_mode_pallas"] == (jax.default_backend() != "tpu")
    printed = capsys.readouterr().out
    assert [r["op"] for r in payload["results"]] == ["layer_norm", "rms_norm"]
    for r in payload["results"]:
        assert r["implementations"]["pallas"]["forward_backward_s"] > 0, r
        assert f"| {r['op']} | {r['shape']} | pallas |" in printed
    assert "cuDNN" not in printed  # a GPU-only column


# -- the mesh driver: `--mesh` with simulated devices, in a subprocess (the device count is read
# once, when JAX starts) --------------------------------------------------------------------------

def test_mesh_driver_reports_every_placement():
    import os
    import re
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXPASSES_CHECK="0")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--mesh", "data=2,model=2", "--host-devices",
         "4", "--model", "gpt2-tiny", "--implementation", "xla", "--batch", "4"],
        env=env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mesh {'data': 2, 'model': 2}" in out.stdout, out.stdout
    row = re.compile(r"gpt2-tiny\s+xla\s+(\w+)\s+collectives ([\d.]+) -> ([\d.]+) MB "
                     r"\(sent ([\d.]+) -> ([\d.]+) MB, scalar (\d+) -> (\d+)\)\s+"
                     r"temp ([\d.]+) -> ([\d.]+) MB\s+step")
    rows = {m.group(1): [float(x) for x in m.groups()[1:]] for m in row.finditer(out.stdout)}
    assert set(rows) == {"data", "tensor", "fsdp"}, out.stdout
    for placement, (c0, c1, w0, w1, s0, s1, t0, t1) in rows.items():
        assert c0 > 0 and w0 > 0 and t0 > 0, (placement, out.stdout)  # from the compiled HLO
        assert s1 - s0 <= 2 * 2, (placement, out.stdout)  # the guard's predicate, 2 layers
