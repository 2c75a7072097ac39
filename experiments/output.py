"""What a run shows and writes: progress and a table (rich), results.json, results.csv, a plot."""
from __future__ import annotations

import csv
import datetime
import json
import math
import pathlib
import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)
from rich import box
from rich.table import Table


def default_out_dir() -> str:
    return str(pathlib.Path("results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def check_out_dir(path: str) -> pathlib.Path:
    """The results folder must be new or empty: earlier results are never overwritten."""
    out = pathlib.Path(path)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {path!r} is a file; give a folder")
        if any(out.iterdir()):
            raise ValueError(f"--out {path!r} is not empty; give a new or empty folder so "
                             f"earlier results are not overwritten")
    return out


def prepare_out_dir(path: str) -> pathlib.Path:
    """Checks (`check_out_dir`) and creates the results folder."""
    out = check_out_dir(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_console() -> Console:
    """The terminal's width on a terminal; 120 columns in logs and pipes (rich would take 80)."""
    return Console() if sys.stdout.isatty() else Console(width=120)


# -- progress --------------------------------------------------------------------------------

class Display:
    """Progress bars while a run goes (one for the cases, one for the phases of the current case).

    Disabled, it prints nothing; `run(config, verbose=False)` uses that.
    """

    def __init__(self, enabled: bool, total_cases: int, console: Console | None = None):
        self.enabled = enabled
        self.console = console or make_console()
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=self.console, transient=True, disable=not enabled)
        self._cases = self._progress.add_task("cases", total=total_cases)
        self._phases = None

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def start_case(self, label: str, phases: int) -> None:
        if self._phases is not None:
            self._progress.remove_task(self._phases)
        self._phases = self._progress.add_task(f"  {label}: starting", total=phases)
        self._label = label

    def phase(self, text: str, advance: int = 1) -> None:
        self._progress.update(self._phases, description=f"  {self._label}: {text}",
                              advance=advance)

    def case_done(self, result: dict) -> None:
        self._progress.advance(self._cases)
        if self.enabled:
            self.console.print(case_line(result))

    def print(self, *objects) -> None:
        if self.enabled:
            self.console.print(*objects)


def case_line(result: dict) -> str:
    """One line per finished case, printed above the progress bars."""
    label = result["label"]
    if result["status"] == "error":
        return f"[red]{label}: failed: {result['error']}[/red]"
    parts = []
    for name in ("baseline", "optimized"):
        v = result.get(name) or {}
        if v.get("status") == "out_of_memory":
            parts.append(f"{name} out of memory")
        elif v.get("step_time_s") is not None:
            parts.append(f"{name} {v['step_time_s'] * 1e3:.2f} ms")
    if result.get("speedup") is not None:
        parts.append(f"speedup {speedup_text(result)}")
    if not parts:
        return f"[yellow]{label}: {result['status']}: {result['error']}[/yellow]"
    text = f"{label}: " + ", ".join(parts)
    if result.get("numerics_ok") is False:
        flags = "; ".join(result["numerics"]["flags"])
        return f"[bold red]{text}; NUMERICS: {flags}[/bold red]"
    return text


# -- the table -------------------------------------------------------------------------------

def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _mb(n):
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _pair(a: str, b: str) -> str:
    return f"{a} / {b}"


def _as_calls(memory: dict | None) -> str:
    """The optimized program's peak with Pallas kernels as opaque calls, where measured."""
    return "" if not memory else f" ({_mb(memory.get('peak_memory_bytes'))} as calls)"


def _si(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _rate(v: dict) -> str:
    if v.get("tokens_per_s") is not None:
        return f"{_si(v['tokens_per_s'])} tok/s"
    if v.get("examples_per_s") is not None:
        return f"{_si(v['examples_per_s'])} ex/s"
    return "-"


def _short(x, fmt=".2g"):
    return "-" if x is None else format(x, fmt)


def rewrites_text(counts: dict | None) -> str:
    return " ".join(f"{k}={v}" for k, v in (counts or {}).items() if v) or "0"


def speedup_text(r: dict) -> str:
    """"1.31x [1.22-1.40]", with "within noise" where the interval includes 1.0 and "no CI"
    from a single repetition."""
    speed = r.get("speedup")
    if speed is None:
        return "-"
    ci = r.get("speedup_ci")
    if ci is None:
        return f"{speed:.2f}x (no CI: 1 repetition)"
    text = f"{speed:.2f}x [{ci[0]:.2f}-{ci[1]:.2f}]"
    return f"{text} within noise" if r.get("speedup_within_noise") else text


def _speed_text(r: dict) -> str:
    """The speedup, green or red only where its interval excludes 1.0."""
    text = speedup_text(r)
    if r.get("speedup") is None or r.get("speedup_ci") is None or r.get("speedup_within_noise"):
        return text
    return f"[green]{text}[/green]" if r["speedup"] > 1 else f"[red]{text}[/red]"


def _step_ms(v: dict) -> str:
    return "OOM" if v.get("status") == "out_of_memory" else _ms(v.get("step_time_s"))


def results_tables(payload: dict) -> tuple[Table, Table]:
    """Timing (step times, speedup, rates, numerics); costs (compile, passes, memory, rewrites)."""
    env = payload["environment"]
    peaks = {r["mfu_peak"]["description"] for r in payload["results"] if r.get("mfu_peak")}
    peak_note = (f"MFU against the {', '.join(sorted(peaks))} peak" if peaks else
                 f"no peak known for {env['device_kind']!r}: MFU not computed")
    timing = Table(title=f"baseline (jax.jit) vs optimized (passes.optimize), "
                         f"{env['device_count']} x {env['device_kind']}, jax {env['jax_version']}",
                   caption=f"step times: medians; speedup [{measure_confidence()} interval, "
                           f"bootstrap over the interleaved repetitions]; {peak_note}",
                   box=box.SIMPLE_HEAD)
    for column in ("case", "base ms", "opt ms", "speedup", "opt rate", "opt TFLOP/s",
                   "MFU", "Δloss", "grad rel"):
        timing.add_column(column, justify="left" if column == "case" else "right",
                          no_wrap=column == "case")
    costs = Table(title="costs (baseline / optimized)", box=box.SIMPLE_HEAD)
    for column in ("case", "compile s", "passes ms", "peak MB", "rewrites"):
        costs.add_column(column, justify="left" if column in ("case", "rewrites") else "right",
                         no_wrap=column != "rewrites")
    for r in payload["results"]:
        if r["status"] == "error":
            timing.add_row(r["label"], *["-"] * 8, style="red")
            costs.add_row(r["label"], "-", "-", "-", f"failed: {r['error']}", style="red")
            continue
        b, o = r.get("baseline") or {}, r.get("optimized") or {}
        n = r.get("numerics") or {}
        loss_diff = n.get("loss_final_diff")
        if loss_diff is None:
            loss_diff = n.get("loss_initial_diff")
        style = "bold red" if r.get("numerics_ok") is False else None
        timing.add_row(
            r["label"], _step_ms(b), _step_ms(o), _speed_text(r), _rate(o),
            _short(o.get("model_tflops"), ".3g"),
            "-" if o.get("mfu") is None else f"{o['mfu']:.1%}",
            _short(loss_diff), _short(n.get("grad_max_rel_diff")), style=style)
        costs.add_row(
            r["label"],
            _pair(_short(b.get("compile_time_s"), ".2f"), _short(o.get("compile_time_s"), ".2f")),
            _short(None if o.get("pass_time_s") is None else o["pass_time_s"] * 1e3, ".1f"),
            _pair(_mb(b.get("peak_memory_bytes")), _mb(o.get("peak_memory_bytes")))
            + _as_calls(o.get("kernels_as_calls")),
            rewrites_text(o.get("rewrites")), style=style)
    return timing, costs


def measure_confidence() -> str:
    from experiments.measure import CONFIDENCE
    return f"{CONFIDENCE:.0%}"


def print_summary(payload: dict, console: Console) -> None:
    for table in results_tables(payload):
        console.print(table)
    for r in payload["results"]:
        if r.get("numerics_ok") is False:
            what = "loss diverges from" if r["diverged"] else "gradients differ from"
            console.print(f"[bold red]{r['label']}: the optimized {what} the baseline's: "
                          f"{'; '.join(r['numerics']['flags'])}[/bold red]")
        elif r["status"] == "out_of_memory":
            console.print(f"[yellow]{r['label']}: out of memory: {r['error']}[/yellow]")


# -- files -----------------------------------------------------------------------------------

def _json_safe(value):
    """NaN and infinities become strings, so results.json stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(payload: dict, path: pathlib.Path) -> None:
    path.write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")


CSV_COLUMNS = (
    "label", "model", "batch", "seq", "dtype", "mode", "pipeline", "implementation", "sweep",
    "status", "speedup", "speedup_ci_low", "speedup_ci_high", "speedup_within_noise",
    "diverged", "numerics_ok",
    "baseline_step_time_s", "baseline_step_time_min_s", "baseline_step_time_max_s",
    "optimized_step_time_s", "optimized_step_time_min_s", "optimized_step_time_max_s",
    "baseline_tokens_per_s", "optimized_tokens_per_s",
    "baseline_examples_per_s", "optimized_examples_per_s",
    "baseline_model_tflops", "optimized_model_tflops", "baseline_mfu", "optimized_mfu",
    "baseline_compile_time_s", "optimized_compile_time_s", "pass_time_s",
    "baseline_peak_memory_bytes", "optimized_peak_memory_bytes",
    "baseline_temp_memory_bytes", "optimized_temp_memory_bytes",
    "optimized_kernels_as_calls_peak_memory_bytes",
    "loss_initial_diff", "loss_final_diff", "grad_max_rel_diff", "rewrites_total", "rewrites",
    "error",
)


def csv_row(r: dict) -> dict:
    row = {k: r.get(k) for k in ("label", "model", "batch", "seq", "dtype", "mode", "pipeline",
                                 "implementation", "status", "speedup", "diverged",
                                 "numerics_ok", "error")}
    row["sweep"] = " ".join(f"{k}={v}" for k, v in (r.get("sweep") or {}).items())
    ci = r.get("speedup_ci") or (None, None)
    row["speedup_ci_low"], row["speedup_ci_high"] = ci
    row["speedup_within_noise"] = r.get("speedup_within_noise")
    for name in ("baseline", "optimized"):
        v = r.get(name) or {}
        for key in ("step_time_s", "step_time_min_s", "step_time_max_s", "tokens_per_s",
                    "examples_per_s", "model_tflops", "mfu", "compile_time_s",
                    "peak_memory_bytes", "temp_memory_bytes"):
            row[f"{name}_{key}"] = v.get(key)
    o, n = r.get("optimized") or {}, r.get("numerics") or {}
    row["optimized_kernels_as_calls_peak_memory_bytes"] = (
        o.get("kernels_as_calls") or {}).get("peak_memory_bytes")
    row["pass_time_s"] = o.get("pass_time_s")
    row["rewrites_total"] = o.get("rewrites_total")
    row["rewrites"] = rewrites_text(o.get("rewrites")) if o.get("rewrites") is not None else None
    for key in ("loss_initial_diff", "loss_final_diff", "grad_max_rel_diff"):
        row[key] = n.get(key)
    return row


def write_csv(payload: dict, path: pathlib.Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in payload["results"]:
            writer.writerow({k: ("" if v is None else v) for k, v in csv_row(r).items()})


def write_plot(payload: dict, path: pathlib.Path) -> bool:
    """Speedup and step times per case (model or sweep value); False when nothing was timed."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [r for r in payload["results"] if r["status"] != "error"]
    if not rows:
        return False
    labels = [r["label"].replace(" ", "\n") for r in rows]
    x = range(len(rows))
    fig, (ax_speed, ax_time) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows)), 4.5))
    speeds = [r.get("speedup") or 0.0 for r in rows]
    colors = ["tab:red" if r.get("numerics_ok") is False else
              "tab:gray" if r.get("speedup_within_noise") is not False else
              "tab:green" if s >= 1 else "tab:orange" for r, s in zip(rows, speeds)]
    cis = [r.get("speedup_ci") or (s, s) for r, s in zip(rows, speeds)]
    bars = ax_speed.bar(x, speeds, color=colors,
                        yerr=[[s - lo for s, (lo, _) in zip(speeds, cis)],
                              [hi - s for s, (_, hi) in zip(speeds, cis)]], capsize=4)
    ax_speed.bar_label(bars, labels=[_plot_speed_label(r) for r in rows], fontsize=8)
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_speed.margins(y=0.2)  # room for the labels above the interval
    ax_speed.set_xticks(list(x), labels, fontsize=8)
    ax_speed.set_ylabel(f"speedup (baseline / optimized median), {measure_confidence()} interval")
    ax_speed.set_title("speedup (gray: within noise, red: numerics differ)")
    width = 0.4
    for offset, name, color in ((-width / 2, "baseline", "tab:gray"),
                                (width / 2, "optimized", "tab:blue")):
        med, lo, hi = [], [], []
        for r in rows:
            v = r.get(name) or {}
            m = v.get("step_time_s")
            med.append(m * 1e3 if m is not None else 0.0)
            lo.append((m - v["step_time_min_s"]) * 1e3 if m is not None else 0.0)
            hi.append((v["step_time_max_s"] - m) * 1e3 if m is not None else 0.0)
        ax_time.bar([i + offset for i in x], med, width, yerr=[lo, hi], capsize=3,
                    label=name, color=color)
    ax_time.set_xticks(list(x), labels, fontsize=8)
    ax_time.set_ylabel("step time, ms (median, min-max)")
    ax_time.set_title(payload["environment"]["device_kind"])
    ax_time.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_speed_label(r: dict) -> str:
    if r.get("speedup") is None:
        return "n/a"
    if r.get("speedup_ci") is None:
        return f"{r['speedup']:.2f}x\n(no CI)"
    return f"{r['speedup']:.2f}x\n(within noise)" if r.get("speedup_within_noise") else \
        f"{r['speedup']:.2f}x"


def write_all(payload: dict, out: pathlib.Path, plot: bool = True) -> None:
    write_json(payload, out / "results.json")
    write_csv(payload, out / "results.csv")
    if plot:
        write_plot(payload, out / "results.png")

