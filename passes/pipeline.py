"""The pass manager: passes, the region walk, fixpoint iteration, checking, stats and dumps."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import pathlib
import threading
import time
from typing import Iterable, Sequence

from passes import _compat as C
from passes.ir import OUTPUT, Region, location, module_path, nested_regions
from passes.rewrite import Match, Rule, is_replacement, replacement_eqn
from passes.validate import validate

DISABLE_ENV = "JAXPASSES_DISABLE"  # comma-separated pass names, off for the whole run
SITES_ENV = "JAXPASSES_SITES"  # comma-separated site ids: rewrite only these
CHECK_ENV = "JAXPASSES_CHECK"  # "1": check_jaxpr after every pass, validate every rewrite


@functools.lru_cache(maxsize=1)
def builtin_pass_names() -> frozenset:
    """The names of the clean-ups and the built-in fusion passes, read from the passes
    themselves (imported here, not at module level: they import this module)."""
    from passes import cleanup_passes
    from passes.fusion import builtin_passes

    return frozenset(p.name for p in cleanup_passes() + builtin_passes())


class RewriteError(RuntimeError):
    """A rule or pass failed; the message names it and the equation it was looking at."""


class FixpointError(RuntimeError):
    """The pipeline kept changing the program past its iteration cap."""


class MalformedProgramError(RewriteError):
    """A pass left a variable used before (or without) its definition."""


_collector_lock = threading.Lock()
_collector_pauses = 0  # open `collector_paused` blocks, across threads
_collector_was_enabled = False


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off for the block (reentrant, thread safe).

    Tracing and rewriting allocate many objects that live until the pipeline ends, so the
    collector promotes them and then re-walks the whole heap in full collections whose number
    also grows with the program: that cost grows faster than the program. Reference counting
    still frees acyclic garbage meanwhile; the few cycles made are found by the first (young
    generation) collection after the block, a walk over what the block allocated and kept.
    """
    global _collector_pauses, _collector_was_enabled
    with _collector_lock:
        if _collector_pauses == 0:
            _collector_was_enabled = gc.isenabled()
            gc.disable()
        _collector_pauses += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_pauses -= 1
            if _collector_pauses == 0 and _collector_was_enabled:
                gc.enable()


def _nested_jaxprs(eqn):
    for value in eqn.params.values():
        if C.is_jaxpr(value):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (v for v in value if C.is_jaxpr(v))


def undefined_use(jaxpr, checked: dict | None = None) -> str | None:
    """The first variable used before its definition, anywhere in `jaxpr`, or None.

    A cheap linear walk (unlike `check_jaxpr`, no type checking), run after every pass that
    changed the program, so a broken rewrite is caught and named rather than surfacing as a
    `KeyError` deep inside evaluation.

    `checked` (id -> body) remembers bodies found well formed. Jaxprs are immutable, and a pass
    hands back every body it left alone (and every copy of a replacement's body) as the same
    object, so with one `checked` per pipeline run each body is walked once, not once per pass.
    """
    body = C.open_jaxpr(jaxpr)
    if checked is not None and id(body) in checked:
        return None
    defined = set(body.constvars) | set(body.invars)
    for eqn in body.eqns:
        for a in eqn.invars:
            if isinstance(a, C.Var) and a not in defined:
                return f"{a} is used by `{eqn.primitive}` before it is defined"
        for sub in _nested_jaxprs(eqn):
            problem = undefined_use(sub, checked)
            if problem is not None:
                return f"inside `{eqn.primitive}`: {problem}"
        defined.update(eqn.outvars)
    for a in body.outvars:
        if isinstance(a, C.Var) and a not in defined:
            return f"output {a} is never defined"
    if checked is not None:
        checked[id(body)] = body  # holding the body keeps its id unique
    return None


@dataclasses.dataclass(frozen=True)
class Rewrite:
    pass_name: str
    rule: str
    site: str
    location: str
    module_path: str
    region: str
    primal_only: bool
    # The kernel implementation(s) the replacement's op calls resolved to ("pallas", "cudnn",
    # "xla"; empty for a replacement that calls no pallas_kernels op), and why each was chosen.
    implementation: str = ""
    implementation_reason: str = ""


@dataclasses.dataclass(frozen=True)
class Declined:
    pass_name: str
    rule: str
    site: str | None
    location: str
    module_path: str
    reason: str


class Context:
    """What one pipeline run records: rewrites, declines, near misses, timings."""

    def __init__(self, sites=None, debug=False, validate=False):
        self.sites = None if sites is None else frozenset(sites)
        self.debug = debug
        self.validate = validate  # translation-validate every rewrite when it is made
        self.rewrites: list[Rewrite] = []
        self.declined: list[Declined] = []
        self.near_misses: list[Declined] = []
        self.skipped: list[str] = []
        self.times: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._site_counter: dict[str, int] = {}
        self._sites_by_eqn: dict = {}
        self._declined_keys: set = set()
        # site -> (the matched equations, the call that replaced them): the report's
        # before/after view of a rewrite.
        self.replaced: dict[str, tuple] = {}

    def site_for(self, pass_name: str, root_eqn) -> str:
        """A site id for a match rooted at `root_eqn`, stable across fixpoint rounds."""
        key = (pass_name, id(root_eqn))
        known = self._sites_by_eqn.get(key)
        if known is not None:
            return known[0]
        n = self._site_counter.get(pass_name, 0)
        self._site_counter[pass_name] = n + 1
        site = f"{pass_name}/{n}"
        self._sites_by_eqn[key] = (site, root_eqn)  # holding the eqn keeps its id unique
        return site

    def known_sites(self) -> set[str]:
        return {site for site, _ in self._sites_by_eqn.values()}

    def selected(self, site: str) -> bool:
        return self.sites is None or site in self.sites

    def rewrote(self, pass_name, rule, site, eqn, region, resolutions=()):
        implementation = ",".join(dict.fromkeys(r.implementation for r in resolutions))
        why = "; ".join(dict.fromkeys(f"{r.op}: {r.why}" for r in resolutions))
        self.rewrites.append(Rewrite(pass_name, rule, site, location(eqn), module_path(eqn),
                                     region.path, region.primal_only, implementation, why))
        self.counts[pass_name] = self.counts.get(pass_name, 0) + 1

    def decline(self, pass_name, rule, site, eqn, reason):
        key = (pass_name, site, reason)
        if key in self._declined_keys:  # the same match seen again in a later fixpoint round
            return
        self._declined_keys.add(key)
        self.declined.append(Declined(pass_name, rule, site, location(eqn), module_path(eqn), reason))


class Pass:
    """A program transformation with a name.

    Subclasses implement `run(region, ctx) -> number of changes` for one region (the engine walks
    nested bodies first, then the enclosing region), or override `run_program` for a whole-
    program transformation.
    """

    name: str = "pass"
    # Whether the pass records each change as a rewrite with a site (rule passes); otherwise the
    # pipeline counts the changes it reports (clean-ups do not list every folded constant).
    reports_sites: bool = False

    def run(self, region: Region, ctx: Context) -> int:
        raise NotImplementedError

    def run_program(self, jaxpr, ctx: Context):
        """(new top-level jaxpr, number of changes)."""
        return _walk(self, jaxpr, ctx, "", False, {})

    def __repr__(self):
        return f"<pass {self.name}>"


def _walk(pass_, jaxpr, ctx, path, primal_only, memo):
    key = id(jaxpr)
    if key in memo:
        return memo[key]
    region = Region(jaxpr, path, primal_only)
    changes = 0
    for i, eqn in enumerate(region.eqns):
        # Most equations hold no body: skip them before building a path for each.
        if eqn.primitive not in C.NESTED_PRIMITIVES or is_replacement(eqn):
            continue
        new_params = None
        for pkey, j, sub, subpath, sub_primal in nested_regions(eqn, f"{path}/{i}", primal_only):
            new_sub, n = _walk(pass_, sub, ctx, subpath, sub_primal, memo)
            if n:
                changes += n
                new_params = new_params or dict(eqn.params)
                if j is None:
                    new_params[pkey] = new_sub
                else:
                    seq = list(new_params[pkey])
                    seq[j] = new_sub
                    new_params[pkey] = type(eqn.params[pkey])(seq)
        if new_params is not None:
            region.eqns[i] = eqn.replace(params=new_params)
    if changes:
        region.set_eqns(region.eqns)
    try:
        changes += pass_.run(region, ctx)
    except (RewriteError, NotImplementedError):
        raise
    except Exception as e:
        raise RewriteError(f"pass {pass_.name!r} failed in region {path or '<top>'}: "
                           f"{type(e).__name__}: {e}") from e
    result = (region.rebuilt() if changes else jaxpr, changes)
    memo[key] = result
    return result


class RulePass(Pass):
    """A pass made of rewrite rules: anchored matching, non-overlapping, priority then order."""

    reports_sites = True

    def __init__(self, name: str, rules: Sequence[Rule]):
        self.name = name
        self.rules = list(rules)

    def _match_all(self, region, ctx):
        found = []
        for rule in self.rules:
            for root in rule.roots:
                for pos in region.positions(root):
                    if region.eqns[pos].effects:
                        continue
                    try:
                        m = rule.match(region, pos)
                    except Exception as e:
                        raise RewriteError(
                            f"rule {self.name}.{rule.name} raised while matching "
                            f"`{region.eqns[pos].primitive}` at {location(region.eqns[pos])}: "
                            f"{type(e).__name__}: {e}") from e
                    if m:
                        found.append((-rule.priority, pos, rule, m))
                    elif ctx.debug:
                        eqn = region.eqns[pos]
                        ctx.near_misses.append(Declined(self.name, rule.name, None, location(eqn),
                                                        module_path(eqn), m.reason))
        found.sort(key=lambda t: (t[0], t[1]))
        return found

    def _placement(self, region, m: Match):
        """Where the replacement goes (an original position), or a reason it cannot."""
        outputs = set(m.outputs)
        for p in m.eqns:
            eqn = region.eqns[p]
            if eqn.effects:
                return None, f"the match contains an effectful `{eqn.primitive}`"
            for v in eqn.outvars:
                if v in outputs or C.is_dropvar(v):
                    continue
                outside = [u for u in region.users(v) if u == OUTPUT or u not in m.eqns]
                if outside:
                    return None, (f"intermediate {v} (from `{eqn.primitive}`) is also used "
                                  f"outside the match")
        lo = max((region.producer(a) + 1 for a in m.inputs
                  if region.producer(a) is not None), default=0)
        hi = min((u for v in m.outputs for u in region.users(v)
                  if u != OUTPUT and u not in m.eqns), default=len(region.eqns))
        if lo <= m.root <= hi:
            return m.root, None
        if lo > hi:
            return None, "an output is needed before all inputs are available"
        return hi, None

    def run(self, region, ctx):
        taken, inserts = set(), {}
        for _, pos, rule, m in self._match_all(region, ctx):
            if m.eqns & taken:
                continue
            root_eqn = region.eqns[m.root]
            site = ctx.site_for(self.name, root_eqn)
            at, reason = (None, m.declined) if m.declined else self._placement(region, m)
            if reason is None and not ctx.selected(site):
                if site not in ctx.skipped:
                    ctx.skipped.append(site)
                continue
            if reason is None:
                try:
                    new_eqn, resolutions = replacement_eqn(m, root_eqn, f"{self.name}.{rule.name}")
                except NotImplementedError as e:
                    reason = str(e) or "the replacement declined"
                except Exception as e:
                    raise RewriteError(
                        f"rule {self.name}.{rule.name}: building the replacement for "
                        f"`{root_eqn.primitive}` at {location(root_eqn)} failed: "
                        f"{type(e).__name__}: {e}") from e
                else:
                    reason = validate(region, m, new_eqn) if ctx.validate else None
            if reason is not None:
                ctx.decline(self.name, rule.name, site, root_eqn, reason)
                continue
            taken |= m.eqns
            inserts.setdefault(at, []).append(new_eqn)
            ctx.rewrote(self.name, rule.name, site, root_eqn, region, resolutions)
            ctx.replaced[site] = (tuple(region.eqns[p] for p in sorted(m.eqns)), new_eqn)
        if not inserts:
            return 0
        new_eqns = []
        for i, eqn in enumerate(region.eqns):
            new_eqns.extend(inserts.get(i, ()))
            if i not in taken:
                new_eqns.append(eqn)
        new_eqns.extend(inserts.get(len(region.eqns), ()))
        region.set_eqns(new_eqns)
        return sum(len(v) for v in inserts.values())


def _env_list(name) -> list[str]:
    return [s.strip() for s in os.environ.get(name, "").split(",") if s.strip()]


class Pipeline:
    """Ordered passes, repeated until nothing changes (at most `max_iterations` rounds).

    Args:
      passes: `Pass` objects, run in order.
      max_iterations: cap on rounds; reaching it raises `FixpointError` naming the passes that
        still changed the program.
      check: run `check_jaxpr` after every pass (default: env JAXPASSES_CHECK=1).
      validate: translation-validate every rewrite when it is made (`passes.validate`);
        defaults to `check`.
      dump_dir: write the program before the first pass and after every pass that changed it.
      disable: pass names to skip (also env JAXPASSES_DISABLE, comma-separated).
      sites: rewrite only these site ids (from `report.rewrites`; also env JAXPASSES_SITES),
        to bisect a numerics problem to one site.
      debug: record near misses (why a candidate root did not match) in the report.
    """

    def __init__(self, passes: Iterable[Pass], *, max_iterations: int = 8, check: bool | None = None,
                 dump_dir=None, disable: Iterable[str] = (), sites: Iterable[str] | None = None,
                 debug: bool = False, validate: bool | None = None):
        self.passes = list(passes)
        names = [p.name for p in self.passes]
        for name in disable:
            if name not in names:
                raise ValueError(f"cannot disable unknown pass {name!r}; this pipeline has {names}")
        # The environment switch holds for a whole run, across pipelines that may lack some of
        # the passes it names; only a name no pipeline could have is an error.
        env = _env_list(DISABLE_ENV)
        for name in env:
            if name not in names and name not in builtin_pass_names():
                raise ValueError(f"{DISABLE_ENV} names unknown pass {name!r}; known passes: "
                                 f"{sorted(set(names) | builtin_pass_names())}")
        self.disable = frozenset(disable) | frozenset(env)
        self.max_iterations = max_iterations
        self.check = (os.environ.get(CHECK_ENV) == "1") if check is None else check
        self.validate = self.check if validate is None else validate
        self.dump_dir = None if dump_dir is None else pathlib.Path(dump_dir)
        env_sites = _env_list(SITES_ENV)
        # Sites named here must exist in the program; the environment switch holds for a whole
        # run, across programs that may lack some of them.
        self.named_sites = None if sites is None else frozenset(sites)
        self.sites = None if sites is None and not env_sites else frozenset(sites or ()) | frozenset(env_sites)
        self.debug = debug

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def replace(self, **changes) -> "Pipeline":
        """A copy with some constructor arguments changed."""
        kw = dict(passes=self.passes, max_iterations=self.max_iterations, check=self.check,
                  dump_dir=self.dump_dir, disable=self.disable, sites=self.named_sites,
                  debug=self.debug, validate=self.validate)
        kw.update(changes)
        return Pipeline(kw.pop("passes"), **kw)

    def cache_key(self):
        return (tuple(id(p) for p in self.passes), self.disable, self.sites, self.max_iterations,
                self.check, self.debug, self.validate)

    def _dump(self, jaxpr, tag):
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{tag}.txt").write_text(str(jaxpr))

    def _after_change(self, p, jaxpr, step, checked):
        problem = undefined_use(jaxpr, checked)
        if problem is not None:
            raise MalformedProgramError(f"pass {p.name!r} produced an invalid program: {problem}")
        if self.check:
            try:
                C.check_jaxpr(C.open_jaxpr(jaxpr))
            except Exception as e:
                raise RewriteError(f"pass {p.name!r} produced an invalid program: {e}") from e
        if self.dump_dir is not None:
            self._dump(jaxpr, f"{step:02d}_{p.name}")

    def _check_named_sites(self, ctx):
        if not self.named_sites:
            return
        unknown = self.named_sites - ctx.known_sites()
        if unknown:
            raise ValueError(f"Pipeline(sites=...) names {sorted(unknown)}, which match nothing "
                             f"in this program; its sites are {sorted(ctx.known_sites())} (see "
                             f"passes.explain(...).rewrites and .declined)")

    def run(self, jaxpr, ctx: Context | None = None):
        """Rewrite a (closed) jaxpr. Returns (new jaxpr, Context)."""
        with collector_paused():
            return self._run(jaxpr, ctx)

    def _run(self, jaxpr, ctx):
        ctx = ctx or Context(self.sites, self.debug, self.validate)
        if self.dump_dir is not None:
            self._dump(jaxpr, "00_input")
        active = [p for p in self.passes if p.name not in self.disable]
        step = 0
        last_run = {}  # pass name -> step count when it last ran
        checked = {}  # bodies `undefined_use` found well formed in this run
        for _ in range(self.max_iterations):
            changed_by = []
            for p in active:
                if p.name in last_run and last_run[p.name] == step:
                    continue  # nothing changed since this pass last looked at the program
                t0 = time.perf_counter()
                jaxpr, n = p.run_program(jaxpr, ctx)
                ctx.times[p.name] = ctx.times.get(p.name, 0.0) + time.perf_counter() - t0
                last_run[p.name] = step  # a pass that changed the program runs again
                if n:
                    if not p.reports_sites:  # clean-ups count the equations they changed
                        ctx.counts[p.name] = ctx.counts.get(p.name, 0) + n
                    changed_by.append(p.name)
                    step += 1
                    self._after_change(p, jaxpr, step, checked)
            if not changed_by:
                self._check_named_sites(ctx)
                return jaxpr, ctx
        raise FixpointError(
            f"the pipeline still changed the program after {self.max_iterations} rounds; in the "
            f"last round these passes changed it: {changed_by}. Disable one with "
            f"{DISABLE_ENV}=<name> or Pipeline(disable=[...]) to find the culprit.")

    def __repr__(self):
        return f"Pipeline({self.names})"
