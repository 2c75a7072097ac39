"""`Report`: what the pipeline did to one program, readable as text or HTML.

In a notebook a report renders as HTML: the passes and their times, then every rewrite and every
declined match grouped by the module path it came from, then a before/after view of one
rewritten region (the equations the rule matched, and the single call that replaced them).
`report.view(site)` shows that view for any other rewrite.
"""
from __future__ import annotations

import html
import re
from collections import Counter

_E = html.escape
_STYLE = ("<style>.jaxpasses-report th, .jaxpasses-report td {text-align: left; "
          "vertical-align: top} .jaxpasses-report pre {margin: 0; font-size: 90%}</style>")
_MAX_LINES = 40  # equations shown per side of a before/after view
_NO_MODULE = "(no module path)"


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
        # site -> (matched equations, replacement equation), recorded by rule passes.
        self._replaced = dict(getattr(ctx, "replaced", {}))

    @property
    def jaxpr_before(self) -> str:
        return str(self._before)

    @property
    def jaxpr_after(self) -> str:
        return str(self._after)

    @property
    def total_pass_time(self) -> float:
        return sum(self.pass_times.values())

    def view(self, site: str | None = None) -> "RewriteView":
        """The before/after view of the rewrite at `site` (a site id from `rewrites`, e.g.
        "layer_norm/0"; default: the first rewrite). Renders as HTML in a notebook, as text
        with `print`."""
        known = [r for r in self.rewrites if r.site in self._replaced]
        if site is None:
            if not known:
                raise ValueError("this report has no rewrite to show")
            rewrite = known[0]
        else:
            rewrite = next((r for r in known if r.site == site), None)
            if rewrite is None:
                raise KeyError(f"no rewrite at site {site!r}; sites: {[r.site for r in known]}")
        eqns, call = self._replaced[rewrite.site]
        return RewriteView(rewrite, eqns, call)

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

    # -- HTML ----------------------------------------------------------------------------------

    def by_module(self) -> dict[str, list]:
        """Module path -> the rewrites and declined matches made there.

        Modules come in the order the program first reaches them, then (for equations outside
        any module, as in a function over plain parameter dicts) `[file: function]` groups.
        """
        groups: dict[str, list] = {}
        for record in [*self.rewrites, *self.declined]:
            groups.setdefault(_module_key(record.module_path, record.location), []).append(record)
        first = _first_appearance(self._before)
        return dict(sorted(groups.items(), key=lambda kv: (
            kv[0].startswith("["), first.get(kv[0], len(first)), _natural(kv[0]))))

    def _summary_html(self) -> str:
        fired = ", ".join(f"{_E(k)}&nbsp;{v}" for k, v in self.counts.items() if v) or "nothing"
        return (f"<p><b>Rewrites:</b> {fired} &nbsp; <small>(passes "
                f"{self.total_pass_time * 1e3:.1f} ms, trace {self.trace_time * 1e3:.1f} ms; "
                f"{len(self.declined)} declined)</small></p>")

    def _passes_html(self) -> str:
        rows = "".join(f"<tr><td>{_E(k)}</td><td>{v}</td>"
                       f"<td>{self.pass_times.get(k, 0) * 1e3:.2f} ms</td></tr>"
                       for k, v in self.counts.items())
        return (f"<details><summary>Passes</summary><table><tr><th>pass</th><th>rewrites</th>"
                f"<th>time</th></tr>{rows}</table></details>")

    def _modules_html(self) -> str:
        groups = self.by_module()
        if not groups:
            return "<p>Nothing fired and nothing was declined.</p>"
        head = (f"<tr><th>module</th><th></th><th>site</th>"
                f"<th>rule</th><th>where / why</th></tr>")
        body = []
        for module, records in groups.items():
            n_fired = sum(1 for r in records if not hasattr(r, "reason"))
            n_declined = len(records) - n_fired
            tally = ", ".join(s for s in (f"{n_fired} fired" if n_fired else "",
                                           f"{n_declined} declined" if n_declined else "") if s)
            body.append(f'<tr class="module"><th colspan="5"><code>{_E(module)}</code>'
                        f" &nbsp;<small>{tally}</small></th></tr>")
            for r in records:
                where = _short_location(r.location, r.module_path)
                if hasattr(r, "reason"):  # a declined match
                    mark, detail = "&#10007; declined", f"{_E(r.reason)}<br><small>{_E(where)}</small>"
                else:
                    notes = [where]
                    if r.primal_only:
                        notes.append("primal only: derivatives keep the original equations")
                    implementation = getattr(r, "implementation", "")
                    if implementation:
                        why = getattr(r, "implementation_reason", "")
                        notes.append(f"implementation: {implementation}"
                                     + (f" ({why})" if why else ""))
                    mark, detail = "&#10003; fired", "<br>".join(_E(n) for n in notes)
                body.append(f"<tr><td></td><td>{mark}</td><td><code>"
                            f"{_E(r.site or '-')}</code></td><td>{_E(r.pass_name)}."
                            f"{_E(r.rule)}</td><td>{detail}</td></tr>")
        return f"<b>By module path</b><table>{head}{''.join(body)}</table>"

    def _near_misses_html(self) -> str:
        if not self.near_misses:
            return ""
        rows = "".join(f"<tr><td>{_E(d.pass_name)}.{_E(d.rule)}</td><td>"
                       f"{_E(_short_location(d.location, d.module_path))}</td>"
                       f"<td>{_E(d.reason)}</td></tr>" for d in self.near_misses)
        return (f"<details><summary>Near misses ({len(self.near_misses)})</summary><table>"
                f"<tr><th>rule</th><th>where</th><th>why it did not match</th></tr>{rows}"
                f"</table></details>")

    def _repr_html_(self):
        parts = [self._summary_html(), self._modules_html()]
        if any(r.site in self._replaced for r in self.rewrites):
            parts.append(self.view()._html_body())
        parts.append(self._near_misses_html())
        parts.append(self._passes_html())
        if self.skipped:
            parts.append(f"<p>Skipped by site selection: {_E(', '.join(self.skipped))}</p>")
        return f'<div class="jaxpasses-report">{_STYLE}' + "".join(parts) + "</div>"

    def __repr__(self):
        return f"<Report {self.counts}>"


class RewriteView:
    """One rewrite, before and after: the matched equations and the call replacing them.

    Attributes:
      rewrite: the `Rewrite` record.
      before: the matched equations, one line each (nested programs elided as `{...}`).
      after: the replacing call, as one line.
      inputs: the values handed to the replacement, with their types.
      body: the kernel implementation the call resolved to, and the size of its body (how
        many equations, how many of them `pallas_call`s).
    """

    def __init__(self, rewrite, eqns, call):
        self.rewrite = rewrite
        names = _Names()
        self.inputs = [f"{names(a)}:{_type(a)}" for a in call.invars]
        self.before = [_eqn_line(e, names) for e in eqns]
        outs = " ".join(f"{names(v)}:{_type(v)}" for v in call.outvars)
        args = ", ".join(names(a) for a in call.invars)
        self.after = f"{outs} = {call.params.get('name', call.primitive)}({args})"
        self.body = _body_summary(call, rewrite)

    def __str__(self):
        r = self.rewrite
        lines = [f"{r.site}  {r.pass_name}.{r.rule}  at {r.location}",
                 f"inputs: {', '.join(self.inputs)}",
                 f"before ({len(self.before)} equations):"]
        lines += [f"  {line}" for line in _capped(self.before)]
        lines += ["after (1 call):", f"  {self.after}", f"  # {self.body}"]
        return "\n".join(lines)

    def _repr_html_(self):
        return f'<div class="jaxpasses-report">{_STYLE}{self._html_body()}</div>'

    def _html_body(self):
        r = self.rewrite
        before = "\n".join(_capped(self.before))
        key = _module_key(r.module_path)
        module = f", module <code>{_E(key)}</code>" if key != _NO_MODULE else ""
        return (f"<b>Before and after: <code>{_E(r.site)}</code></b> ({_E(r.pass_name)}."
                f"{_E(r.rule)} at <code>{_E(_short_location(r.location, r.module_path))}</code>"
                f"{module})<br><small>inputs: <code>{_E(', '.join(self.inputs))}</code></small>"
                f'<table class="before-after"><tr><th>before: {len(self.before)} '
                f"equations</th><th>after: 1 call</th></tr><tr>"
                f'<td><pre class="before">{_E(before)}</pre></td>'
                f'<td><pre class="after">{_E(self.after)}\n\n# {_E(self.body)}'
                f"</pre></td></tr></table>")

    def __repr__(self):
        return str(self)


# -- formatting helpers ------------------------------------------------------------------------

def _natural(key: str):
    """Sort key: digit runs compare as numbers (h_2 before h_10)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key)]


def _module_key(path: str, location: str = "") -> str:
    """The module path an equation belongs to: its name stack without the scopes library
    functions add (an einsum's `BNTS,BSNH->BTNH`); outside any module, `[file: function]`."""
    parts = [p for p in (path or "").split("/") if p and "->" not in p]
    if parts:
        return "/".join(parts)
    where = _short_location(location, path)
    match = re.match(r"([^:]+):[\d:]+ \((.+?)\)", where)
    return f"[{match.group(1)}: {match.group(2)}]" if match else _NO_MODULE


def _first_appearance(jaxpr) -> dict[str, int]:
    """Module key -> index of the first equation (in program order, nested bodies included)
    whose name stack lies in that module or below it."""
    from passes import _compat as C

    first: dict[str, int] = {}
    count = 0

    def walk(j):
        nonlocal count
        for eqn in C.open_jaxpr(j).eqns:
            si = eqn.source_info
            stack = str(si.name_stack) if si is not None else ""
            parts = [p for p in stack.split("/") if p and "->" not in p]
            for n in range(1, len(parts) + 1):
                first.setdefault("/".join(parts[:n]), count)
            count += 1
            for value in eqn.params.values():
                for sub in (value if isinstance(value, (tuple, list)) else [value]):
                    if C.is_jaxpr(sub):
                        walk(sub)

    try:
        walk(jaxpr)
    except Exception:  # ordering is cosmetic: fall back to natural order
        return {}
    return first


def _short_location(location: str, module_path: str) -> str:
    """`file:line:col (function)`, without the directories and the repeated name stack."""
    if module_path and location.endswith(f" ({module_path})"):
        location = location[:-len(module_path) - 3]
    head, sep, rest = location.partition(":")
    return head.rsplit("/", 1)[-1] + sep + rest


def _capped(lines, limit=_MAX_LINES):
    if len(lines) <= limit:
        return list(lines)
    return list(lines[:limit]) + [f"... {len(lines) - limit} more"]


class _Names:
    """Short variable names shared by both sides of a view, as the jaxpr printer gives them."""

    def __init__(self):
        from passes import _compat as C

        self._name = C.var_namer()  # None: fall back to the variables' own text

    def __call__(self, atom) -> str:
        if self._name is not None:
            try:
                return self._name(atom)
            except Exception:  # a printer API that changed: the plain text still reads
                pass
        return str(atom)


def _type(atom) -> str:
    aval = atom.aval
    return aval.str_short() if hasattr(aval, "str_short") else str(aval)


def _param_text(value) -> str:
    from passes import _compat as C

    if C.is_jaxpr(value):
        return "{...}"
    if isinstance(value, (tuple, list)) and any(C.is_jaxpr(v) for v in value):
        return "({...})"
    if callable(value) and not isinstance(value, type):
        return getattr(value, "__name__", type(value).__name__)
    text = str(value)
    return text if len(text) <= 48 else text[:45] + "..."


def _eqn_line(eqn, names: _Names) -> str:
    outs = " ".join(f"{names(v)}:{_type(v)}" for v in eqn.outvars)
    params = " ".join(f"{k}={_param_text(v)}" for k, v in eqn.params.items() if v is not None)
    ins = " ".join(names(a) for a in eqn.invars)
    return f"{outs} = {eqn.primitive}{'[' + params + ']' if params else ''} {ins}"


def _body_summary(call, rewrite=None) -> str:
    from passes import _compat as C
    from passes.testing import count_primitive

    implementation = getattr(rewrite, "implementation", "")
    head = f"implementation: {implementation}; " if implementation else ""
    body = call.params.get("jaxpr")
    if body is None:
        return f"{head}a `{call.primitive}` call"
    n = sum(1 for _ in _all_eqns(C.open_jaxpr(body)))
    kernels = count_primitive(body, "pallas_call")
    return (f"{head}its body: {n} equation{'s' if n != 1 else ''}"
            + (f", {kernels} of them pallas_call{'s' if kernels > 1 else ''}" if kernels else ""))


def _all_eqns(jaxpr):
    from passes import _compat as C

    for eqn in C.open_jaxpr(jaxpr).eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else [value]):
                if C.is_jaxpr(sub):
                    yield from _all_eqns(sub)
