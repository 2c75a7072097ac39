"""`Report`: what the pipeline did to one program, readable as text or HTML."""
from __future__ import annotations

import html
from collections import Counter


class Report:
    """What fired where.

    Attributes:
      counts: pass name -> rewrites applied (every pass of the pipeline has an entry).
      rewrites: one `Rewrite` record per rewrite (pass_name, rule, site, location, module_path,
        region, primal_only).
      declined: matches that were not rewritten, each with its reason.
      near_misses: candidate roots that did not match and why (only with `Pipeline(debug=True)`).
      skipped: site ids matched but left alone because a site selection excluded them.
      pass_times: pass name -> seconds spent in it.
      trace_time: seconds spent tracing the function to a jaxpr.
      jaxpr_before, jaxpr_after: the program's text before and after, computed when read.
    """

    def __init__(self, pipeline_names, ctx, before, after, trace_time=0.0):
        self.counts = {name: ctx.counts.get(name, 0) for name in pipeline_names}
        self.rewrites = list(ctx.rewrites)
        self.declined = list(ctx.declined)
        self.near_misses = list(ctx.near_misses)
        self.skipped = list(ctx.skipped)
        self.pass_times = dict(ctx.times)
        self.trace_time = trace_time
        self._before, self._after = before, after

    @property
    def jaxpr_before(self) -> str:
        return str(self._before)

    @property
    def jaxpr_after(self) -> str:
        return str(self._after)

    @property
    def total_pass_time(self) -> float:
        return sum(self.pass_times.values())

    def _rows(self):
        for r in self.rewrites:
            note = " (primal only)" if r.primal_only else ""
            yield r.site, f"{r.pass_name}.{r.rule}", r.module_path or "-", r.location + note

    def __str__(self):
        fired = ", ".join(f"{k}={v}" for k, v in self.counts.items() if v) or "nothing"
        lines = [f"Rewrites: {fired}  (passes {self.total_pass_time * 1e3:.1f} ms, "
                 f"trace {self.trace_time * 1e3:.1f} ms)"]
        for site, rule, mod, loc in self._rows():
            lines.append(f"  {site:<24} {rule:<36} {mod:<32} {loc}")
        if self.declined:
            lines.append(f"Declined ({len(self.declined)}):")
            reasons = Counter((d.pass_name, d.rule, d.reason) for d in self.declined)
            for (p, rule, reason), n in reasons.items():
                lines.append(f"  {p}.{rule} x{n}: {reason}")
        if self.near_misses:
            lines.append(f"Near misses ({len(self.near_misses)}):")
            for d in self.near_misses:
                lines.append(f"  {d.pass_name}.{d.rule} at {d.location}: {d.reason}")
        if self.skipped:
            lines.append(f"Skipped by site selection: {', '.join(self.skipped)}")
        return "\n".join(lines)

    def _repr_html_(self):
        e = html.escape
        counts = "".join(f"<tr><td>{e(k)}</td><td>{v}</td><td>{self.pass_times.get(k, 0) * 1e3:.2f} ms</td></tr>"
                         for k, v in self.counts.items())
        rows = "".join(f"<tr><td>{e(s)}</td><td>{e(r)}</td><td>{e(m)}</td><td>{e(l)}</td></tr>"
                       for s, r, m, l in self._rows())
        declined = "".join(f"<li>{e(d.pass_name)}.{e(d.rule)} at {e(d.location)}: {e(d.reason)}</li>"
                           for d in self.declined)
        return (f"<div><b>Passes</b><table><tr><th>pass</th><th>rewrites</th><th>time</th></tr>"
                f"{counts}</table><b>Rewrites</b><table><tr><th>site</th><th>rule</th>"
                f"<th>module</th><th>location</th></tr>{rows}</table>"
                + (f"<b>Declined</b><ul>{declined}</ul>" if declined else "") + "</div>")

    def __repr__(self):
        return f"<Report {self.counts}>"
