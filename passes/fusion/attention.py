"""The `attention` pass: softmax(Q K^T * scale [+ bias] [masked]) V -> `pallas_kernels.attention`.

The rule anchors at the value product (a `dot_general` with a softmax behind one operand) and
walks back: probabilities (through casts and transposes) -> softmax (plain primitives, with or
without `stop_gradient` on the max, or a `custom_jvp_call` whose body is one: `_softmax.py`) ->
the logits chain (casts, transposes, scaling by constants, additive biases, `where` masks, in
any order the semantics allow) -> the logits `dot_general`. Every axis is given a role on the
way (`a<i>`: an axis shared by q, k and v such as batch or heads; `t<j>`: a query-only axis, the
query sequence or a grouped-query group; `s`: keys; `d`/`dv`: head dims), and every dimension
number, softmax axis and operand shape is checked against those roles, so any rank and layout
maps onto the kernel's (batch, seq, heads, head_dim) and nothing over-matches.

Spellings covered: Flax `nnx.MultiHeadAttention`, Linen `dot_product_attention`,
`jax.nn.dot_product_attention(implementation="xla")` (its grouped-query reshape included), and
hand-written einsums; the scale on q or k, on the logits, or as a division by sqrt(d); bf16
inputs with an f32 softmax; k and v repeated per group (`jnp.repeat`, un-repeated so the kernel
does grouped-query attention) or q reshaped into groups; a missing batch or head axis, or
several; with or without a scale; k and v the same array.

Masks: a `where` mask that evaluates (from iotas and constants) to the causal triangle becomes
`causal=True` (also as one factor of a conjunction with a data-dependent mask); other masks go
to the kernel as boolean inputs, additive biases (padding masks spelled as biases included) as
`bias`. Which fills are masks, and what rows without keys give, is decided in `_masks.py`: the
kernel gives zeros there, the replacement gives what the original gives (NaN or the uniform
average of v, gradients included).

Declined, with the reason in the report: dropout on the probabilities, segment-id masks, sliding
windows, logit soft caps (tanh), a bias added after masking, a bias or mask computed from the
logits themselves, fills that are not masks at the softmax input, zero-size operands, a scale
that is not a constant, and a `dot_general` precision or preferred_element_type the kernel
cannot honour.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from passes import _compat as C
from passes.fusion._masks import Decline as _Decline
from passes.fusion._masks import (Masks, expand_compound, guard_rows, kernel_safe_bias,
                                  may_be_minus_inf, reshape_roles, rows_without_keys,
                                  trace_broadcast)
from passes.fusion._shared import described, dot_dims, kernel, kernel_choice, precision_problem
from passes.fusion._softmax import Softmax, match_softmax
from passes.pattern import literal_value
from passes.pipeline import RulePass
from passes.rewrite import FunctionRule, Match, NoMatch

_RANDOM_PRIMITIVES = frozenset({"random_bits", "random_wrap", "random_seed", "random_unwrap",
                                "threefry2x32", "rng_bit_generator", "rng_uniform"})


# =============================================================================================
# The rule


def attention_pass(implementation=None, platform=None) -> RulePass:
    """The `attention` pass, calling `pallas_kernels.attention(..., implementation=...)` with
    the `KernelChoice` of `implementation` and `platform`."""
    impl = kernel_choice(implementation, platform)
    rule = FunctionRule("softmax_attention", (lax.dot_general_p,),
                        functools.partial(match_attention, implementation=impl))
    return described(RulePass("attention", [rule]),
                     "softmax(q @ k^T * scale [+ bias] [where-masked]) @ v in any layout, grouped "
                     "queries included -> pallas_kernels.attention (causal masks as causal=True)")


def match_attention(region, position, *, implementation=None):
    """Match attention whose value product is the `dot_general` at `position`."""
    root = region.eqns[position]
    reasons = []
    for p_side in (0, 1):
        probs = _probabilities(region, root.invars[p_side])
        if isinstance(probs, NoMatch):
            reasons.append(probs.reason)
            continue
        if isinstance(probs, str):  # the softmax is there, but something stands in between
            return _declined(region, position, probs)
        try:
            found = _Matcher(region, position, p_side, probs, implementation).run()
        except _Decline as e:
            return _declined(region, position, str(e))
        if found:
            return found
        reasons.append(found.reason)
    return NoMatch("not attention: {}", "; ".join(reasons))


def _declined(region, position, reason):
    root = region.eqns[position]
    return Match(root=position, eqns=frozenset({position}), inputs=tuple(root.invars),
                 outputs=tuple(root.outvars), replacement=_attention_replacement,
                 declined=reason)


@dataclasses.dataclass
class _Probabilities:
    softmax: Softmax
    positions: frozenset  # casts, transposes and reshapes between the softmax and the product
    steps: tuple  # those equations, from the softmax forward

    def operand_roles(self, roles, sizes):
        """Roles of the value-product operand's axes from those of the softmax output."""
        return walk_roles(self.steps, roles, sizes)


def walk_roles(eqns, roles, sizes):
    """Axis roles carried forward through transposes and reshapes (None: a reshape that does not
    merge or split whole roles)."""
    roles = list(roles)
    for eqn in eqns:
        if eqn.primitive is lax.transpose_p:
            roles = [roles[int(p)] for p in eqn.params["permutation"]]
        elif eqn.primitive is lax.reshape_p:
            roles = reshape_roles(roles, eqn.outvars[0].aval.shape, sizes)
            if roles is None:
                return None
    return roles


def _probabilities(region, var):
    """The softmax behind a value-product operand, through casts, transposes and reshapes.

    Returns `_Probabilities`, a NoMatch, or a decline reason (str) when a softmax is there but
    its probabilities are changed (dropout) before the product.
    """
    positions, steps = set(), []
    while True:
        sm = match_softmax(region, var)
        if sm:
            return _Probabilities(sm, frozenset(positions), tuple(reversed(steps)))
        pos = region.producer(var)
        if pos is None:
            return NoMatch("operand is not computed from a softmax")
        eqn = region.eqns[pos]
        if eqn.primitive is lax.convert_element_type_p and _is_float(eqn.invars[0]):
            var = eqn.invars[0]
        elif eqn.primitive is lax.transpose_p or (eqn.primitive is lax.reshape_p
                                                   and not eqn.params.get("dimensions")):
            steps.append(eqn)
            var = eqn.invars[0]
        elif eqn.primitive in (lax.mul_p, lax.div_p, lax.select_n_p):
            return _modified_probabilities(region, eqn, sm)
        else:
            return NoMatch("operand comes from `{}`, not a softmax: {}", eqn.primitive, sm.reason)
        positions.add(pos)


def _modified_probabilities(region, eqn, why_not):
    """A softmax a few elementwise steps behind `eqn` means its probabilities are changed."""
    path = _path_to_softmax(region, eqn, 4)
    if path is None:
        return NoMatch("operand comes from `{}`, not a softmax: {}", eqn.primitive, why_not.reason)
    others = [a for e, i in path for j, a in enumerate(e.invars) if j != i]
    if any(_reaches_random(region, a) for a in others):
        return ("dropout on the attention probabilities: the kernel has no dropout, so the "
                "original stays")
    return (f"the attention probabilities are changed by `{eqn.primitive}` before the value "
            f"product; the kernel cannot do that")


_ELEMENTWISE_ON_PROBS = (lax.mul_p, lax.div_p, lax.select_n_p, lax.convert_element_type_p,
                         lax.transpose_p)


def _path_to_softmax(region, eqn, depth):
    """[(equation, operand index)] from `eqn` back to a softmax output, or None."""
    for i, a in enumerate(eqn.invars):
        if not isinstance(a, C.Var) or (eqn.primitive is lax.select_n_p and i == 0):
            continue
        if match_softmax(region, a):
            return [(eqn, i)]
        inner = region.producer_eqn(a)
        if depth > 0 and inner is not None and inner.primitive in _ELEMENTWISE_ON_PROBS:
            rest = _path_to_softmax(region, inner, depth - 1)
            if rest is not None:
                return [(eqn, i)] + rest
    return None


def _reaches_random(region, atom, budget=96) -> bool:
    return any(region.eqns[pos].primitive.name in _RANDOM_PRIMITIVES
               for pos in region.ancestors(atom, limit=budget))


# ---------------------------------------------------------------------------------------------
# The plan handed to the replacement (static, hashable)


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """How the matched program maps onto `pallas_kernels.attention`.

    Axis roles: `a<i>` shared by q, k, v (batch, heads); `t<j>` query-only (the query sequence,
    grouped-query groups); `s` keys; `d` the q/k head dim; `dv` v's head dim. Each operand lists
    the role of each of its axes (None: a size-1 axis that broadcasts).
    """

    q_roles: tuple
    k_roles: tuple
    v_roles: tuple
    batch: tuple  # roles merged into the kernel's batch axis
    heads: tuple  # roles merged into the kernel's kv-head axis
    groups: tuple  # query-only roles merged after `heads` (grouped-query attention)
    query: str | None  # the query-sequence role; None for a single query
    sizes: tuple  # ((role, size), ...) in the logits
    out_roles: tuple  # role of each axis of the value product's output
    out_dtype: str
    dtype: str  # q, k and v are cast to this for the kernel
    scale: float
    causal: bool
    masks: tuple  # ((roles, invert), ...) for the mask inputs, in order
    biases: tuple  # ((roles, multiplier), ...) for the bias inputs, in order
    rows_without_keys: str  # "nan" or "uniform": what rows without keys give in the original


# ---------------------------------------------------------------------------------------------
# The matcher


class _Matcher:
    def __init__(self, region, position, p_side, probs: _Probabilities, implementation):
        self.region, self.position, self.p_side = region, position, p_side
        self.probs, self.implementation = probs, implementation
        self.root = region.eqns[position]

    def run(self):
        region, sm = self.region, self.probs.softmax
        last = None
        for chain in _logits_chains(region, sm.x):
            found = self._try_chain(chain)
            if found:
                return found
            last = found
        if last is None:
            return NoMatch("the softmax input is not computed from a dot_general")
        return last

    # -- the logits dot_general and the chain up to the softmax ------------------------------
    def _try_chain(self, chain):
        """chain: [(position, chain operand index)] from the softmax input back to the dot."""
        region, sm = self.region, self.probs.softmax
        dot_pos = chain[-1][0]
        dot = region.eqns[dot_pos]
        steps = list(reversed(chain[:-1]))  # forward order: dot -> softmax input
        # Which logits axis the softmax reduces, through the chain's transposes and reshapes.
        dot_shape = dot.outvars[0].aval.shape
        src = walk_roles([region.eqns[pos] for pos, _ in steps], range(len(dot_shape)),
                         dict(enumerate(int(n) for n in dot_shape)))
        if src is None or not isinstance(src[sm.axis], int):
            return NoMatch("the softmax axis is not one axis of the logits dot_general")
        lc, rc, lb, rb = dot_dims(dot)
        lhs, rhs = dot.invars
        nb = len(lb)
        lfree = free_axes(len(lhs.aval.shape), lc, lb)
        rfree = free_axes(len(rhs.aval.shape), rc, rb)
        key_axis = src[sm.axis]
        if key_axis < nb:
            return NoMatch("softmax axis {} is a batch axis of the logits dot_general", sm.axis)
        k_side = 0 if key_axis < nb + len(lfree) else 1
        q, k = (rhs, lhs) if k_side == 0 else (lhs, rhs)
        qc, kc = (rc, lc) if k_side == 0 else (lc, rc)
        qb, kb = (rb, lb) if k_side == 0 else (lb, rb)
        qfree, kfree = (rfree, lfree) if k_side == 0 else (lfree, rfree)
        if len(qc) != 1:
            return NoMatch("the logits contract {} axes, not one head_dim", len(qc))
        if len(kfree) != 1:
            return NoMatch("softmax axis {} is not the only free axis of the key operand "
                           "(it has {})", sm.axis, len(kfree))
        a_roles = [f"a{i}" for i in range(nb)]
        t_roles = [f"t{j}" for j in range(len(qfree))]
        q_roles = [None] * len(q.aval.shape)
        k_roles = [None] * len(k.aval.shape)
        for i in range(nb):
            q_roles[qb[i]], k_roles[kb[i]] = a_roles[i], a_roles[i]
        q_roles[qc[0]], k_roles[kc[0]] = "d", "d"
        for j, ax in enumerate(qfree):
            q_roles[ax] = t_roles[j]
        k_roles[kfree[0]] = "s"
        out_shape = dot.outvars[0].aval.shape
        logit_roles = a_roles + (t_roles + ["s"] if k_side == 1 else ["s"] + t_roles)
        sizes = dict(zip(logit_roles, (int(n) for n in out_shape)))
        sizes["d"] = int(q.aval.shape[qc[0]])

        problem = precision_problem(dot)
        if problem:
            raise _Decline(f"the logits dot_general has {problem}")
        if 0 in sizes.values():
            raise _Decline(f"zero-size attention ({', '.join(f'{r}={n}' for r, n in sizes.items())})")
        state = _ChainState(self, logit_roles, sizes, dot.outvars[0].aval.dtype)
        for pos, operand in steps:
            state.step(pos, operand)
        if state.roles[sm.axis] != "s":
            return NoMatch("softmax axis {} is not the key axis of the logits", sm.axis)
        return self._finish(q, k, q_roles, k_roles, a_roles, t_roles, sizes, state,
                            chain)

    # -- the value product, q/k/v inputs, masks and the plan -----------------------------------
    def _finish(self, q, k, q_roles, k_roles, a_roles, t_roles, sizes, state, chain):
        region, root, probs = self.region, self.root, self.probs
        p_roles = probs.operand_roles(state.roles, sizes)
        if p_roles is None:
            return NoMatch("the probabilities are reshaped across roles before the value product")
        v = root.invars[1 - self.p_side]
        lc, rc, lb, rb = dot_dims(root)
        pc, vc = (lc, rc) if self.p_side == 0 else (rc, lc)
        pb, vb = (lb, rb) if self.p_side == 0 else (rb, lb)
        if len(pc) != 1 or p_roles[pc[0]] != "s":
            return NoMatch("the value product does not contract the key axis of the probabilities")
        if sorted(p_roles[d] for d in pb) != sorted(a_roles):
            return NoMatch("the value product's batch axes {} are not the logits' shared axes {}",
                           [p_roles[d] for d in pb], a_roles)
        pfree = free_axes(len(p_roles), pc, pb)
        vfree = free_axes(len(v.aval.shape), vc, vb)
        if sorted(p_roles[d] for d in pfree) != sorted(t_roles):
            return NoMatch("the value product keeps axes {} of the probabilities, not the query "
                           "axes {}", [p_roles[d] for d in pfree], t_roles)
        if len(vfree) != 1:
            return NoMatch("v has {} free axes in the value product, not one head_dim", len(vfree))
        v_roles = [None] * len(v.aval.shape)
        v_roles[vc[0]] = "s"
        for dp, dv in zip(pb, vb):
            v_roles[dv] = p_roles[dp]
        v_roles[vfree[0]] = "dv"
        sizes["dv"] = int(v.aval.shape[vfree[0]])
        if sizes["dv"] != sizes["d"]:
            raise _Decline(f"v's head_dim {sizes['dv']} differs from q/k's {sizes['d']}; the "
                           f"kernel needs one head_dim")
        problem = precision_problem(root)
        if problem:
            raise _Decline(f"the value dot_general has {problem}")
        batch_out = [p_roles[d] for d in pb]
        free_p = [p_roles[d] for d in pfree]
        out_roles = batch_out + (free_p + ["dv"] if self.p_side == 0 else ["dv"] + free_p)

        # Scales folded into q or k; grouped-query repeats of k and v undone.
        q_in, q_scale = _peel_scale(region, q)
        k_in, k_scale = _peel_scale(region, k)
        v_in = v
        heads = tuple(a_roles[-1:]) if len(a_roles) >= 2 else ()
        query, groups = (t_roles[0], tuple(t_roles[1:])) if t_roles else (None, ())

        masks = Masks(region, state, sizes)
        causal, query = masks.analyse(query, t_roles)
        # Rows without keys: masked entirely, or -inf at every kept key (a bias, infinite q/k).
        rows = rows_without_keys(state.fill_values(), masks.rows_may_be_empty or any(
            may_be_minus_inf(region, a) for a, _, _ in state.biases))
        if query is not None:
            groups = tuple(r for r in t_roles if r != query)
        if heads and all(sizes[g] == 1 for g in groups):
            k0 = _unrepeat(region, k_in, k_roles.index(heads[0]))
            v0 = _unrepeat(region, v_in, v_roles.index(heads[0]))
            if k0 is not None and v0 is not None and k0[1] == v0[1]:
                k_in, v_in = k0[0], v0[0]

        # Dtypes: the kernel takes one dtype; keep the original's output precision.
        dtype = jnp.result_type(q_in.aval.dtype, k_in.aval.dtype, v_in.aval.dtype)
        out_var = root.outvars[0]
        eqns = set(probs.positions | probs.softmax.positions) | {p for p, _ in chain}
        eqns.add(self.position)
        if jnp.dtype(out_var.aval.dtype).itemsize > jnp.dtype(dtype).itemsize:
            users = region.users(out_var)
            cast = region.eqns[users[0]] if len(users) == 1 and users[0] >= 0 else None
            if (cast is not None and cast.primitive is lax.convert_element_type_p
                    and jnp.dtype(cast.outvars[0].aval.dtype).itemsize
                    <= jnp.dtype(dtype).itemsize):
                eqns.add(users[0])
                out_var = cast.outvars[0]
            else:
                dtype = jnp.dtype(out_var.aval.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            return NoMatch("attention on {} values", dtype)

        plan = AttentionPlan(
            q_roles=tuple(q_roles), k_roles=tuple(k_roles), v_roles=tuple(v_roles),
            batch=tuple(a_roles[:-1]) if heads else tuple(a_roles), heads=heads, groups=groups,
            query=query, sizes=tuple(sorted(sizes.items())), out_roles=tuple(out_roles),
            out_dtype=jnp.dtype(out_var.aval.dtype).name, dtype=jnp.dtype(dtype).name,
            scale=float(state.scale * q_scale * k_scale), causal=causal,
            masks=tuple((roles, inv) for _, roles, inv in masks.terms),
            biases=tuple((roles, mult) for _, roles, mult in state.biases),
            rows_without_keys=rows)
        inputs = ((q_in, k_in, v_in) + tuple(a for a, _, _ in masks.terms)
                  + tuple(a for a, _, _ in state.biases))
        _check_inputs_precede(region, inputs, eqns)
        return Match(root=self.position, eqns=frozenset(eqns), inputs=inputs,
                     outputs=(out_var,), replacement=_attention_replacement,
                     params={"plan": plan, "implementation": self.implementation})


def _check_inputs_precede(region, inputs, eqns):
    """Decline when an input is computed from the match itself (a bias or mask made from the
    logits, say): the replacement would read a value it removes."""
    first = min(eqns)
    for atom in inputs:
        stack, seen = [atom], set()
        while stack:
            pos = region.producer(stack.pop())
            if pos is None or pos < first or pos in seen:
                continue
            if pos in eqns:
                raise _Decline(f"{atom.aval.str_short()} handed to the kernel is computed from "
                               f"the logits themselves (by `{region.eqns[pos].primitive}`)")
            seen.add(pos)
            stack.extend(a for a in region.eqns[pos].invars if isinstance(a, C.Var))


def _logits_chains(region, var, depth=0):
    """Every path from the softmax input back to a dot_general through ops the chain allows.

    Yields lists of (position, index of the chain operand) ending at the dot_general.
    """
    if depth > 24:
        return
    pos = region.producer(var)
    if pos is None:
        return
    eqn = region.eqns[pos]
    prim = eqn.primitive
    if prim is lax.dot_general_p:
        yield [(pos, None)]
        return
    if prim in (lax.convert_element_type_p, lax.transpose_p, lax.tanh_p) or (
            prim is lax.reshape_p and not eqn.params.get("dimensions")):
        if prim is lax.convert_element_type_p and not _is_float(eqn.invars[0]):
            return
        candidates = [0]
    elif prim in (lax.mul_p, lax.div_p, lax.add_p):
        candidates = [0, 1] if prim is not lax.div_p else [0]
    elif prim is lax.sub_p:
        candidates = [0]
    elif prim is lax.select_n_p and len(eqn.invars) == 3:
        candidates = [1, 2]
    else:
        return
    out_shape = eqn.outvars[0].aval.shape
    for i in candidates:
        a = eqn.invars[i]
        if not isinstance(a, C.Var) or (prim not in (lax.transpose_p, lax.reshape_p)
                                        and a.aval.shape != out_shape):
            continue
        for rest in _logits_chains(region, a, depth + 1):
            yield [(pos, i)] + rest


class _ChainState:
    """Walks the logits chain forward, tracking roles, scale, biases and masks."""

    def __init__(self, matcher, roles, sizes, dtype):
        self.region = matcher.region
        self.roles = list(roles)
        self.sizes = sizes
        self.dtype = np.dtype(dtype)
        self.scale = 1.0
        self.biases = []  # (atom, roles, multiplier)
        self.mask_preds = []  # (atom, roles, invert)
        self.fills = []  # each `where` fill as the logits' dtype holds it after later steps

    def step(self, pos, operand):
        eqn = self.region.eqns[pos]
        prim = eqn.primitive
        others = [a for i, a in enumerate(eqn.invars) if i != operand]
        if prim is lax.transpose_p:
            self.roles = [self.roles[int(p)] for p in eqn.params["permutation"]]
        elif prim is lax.reshape_p:
            self.roles = reshape_roles(self.roles, eqn.outvars[0].aval.shape, self.sizes)
            if self.roles is None:
                raise _Decline("the logits are reshaped across axes the kernel keeps apart")
        elif prim is lax.convert_element_type_p:
            self.dtype = np.dtype(eqn.params["new_dtype"])
            self._apply_to_fills(lambda f: f)
        elif prim is lax.tanh_p:
            raise _Decline("a logit soft cap (tanh) sits between the logits and the softmax; "
                           "the kernel has no soft cap")
        elif prim in (lax.mul_p, lax.div_p):
            self._scale(prim, others[0])
        elif prim in (lax.add_p, lax.sub_p) and others[0] is eqn.invars[operand]:
            self._doubled(prim)
        elif prim in (lax.add_p, lax.sub_p):
            if self.fills:
                raise _Decline("a bias is added after the mask; the kernel adds the bias before "
                               "masking")
            atom, roles = trace_broadcast(self.region, others[0], self.roles, self.sizes,
                                          peel_casts=True)
            self.biases.append((atom, tuple(roles), 1.0 if prim is lax.add_p else -1.0))
        elif prim is lax.select_n_p:
            self._where(eqn, operand)
        else:
            raise _Decline(f"`{prim}` between the logits and the softmax")

    def _scale(self, prim, other):
        c = literal_value(self.region, other)
        if c is None:
            raise _Decline(f"the logits are scaled by a value that is not a scalar constant "
                           f"(`{prim}` with {other.aval.str_short()}); the kernel's "
                           f"scale is static")
        if c == 0 or not math.isfinite(c):
            raise _Decline(f"the logits are scaled by {c}")
        factor = c if prim is lax.mul_p else 1.0 / c
        if self.fills and factor < 0:
            raise _Decline("masked logits are scaled by a negative factor")
        c = np.asarray(c, self.dtype)
        self._apply_to_fills(lambda f: f * c if prim is lax.mul_p else f / c)
        self.scale *= factor
        self.biases = [(a, r, mult * factor) for a, r, mult in self.biases]

    def _doubled(self, prim):
        """`x + x` is 2x; `x - x` is not attention."""
        if prim is lax.sub_p:
            raise _Decline("the logits minus themselves")
        self._apply_to_fills(lambda f: f + f)
        self.scale *= 2.0
        self.biases = [(a, r, mult * 2.0) for a, r, mult in self.biases]

    def _where(self, eqn, operand):
        pred = eqn.invars[0]
        if pred.aval.dtype != np.bool_ or pred.aval.shape != eqn.outvars[0].aval.shape:
            raise _Decline("a `where` whose condition is not a boolean array of the "
                           "logits' shape")
        fill = literal_value(self.region, eqn.invars[3 - operand])
        if fill is None:
            raise _Decline("a `where` on the logits whose other branch is not a constant")
        self.fills.append(np.asarray(fill, self.dtype))
        self.mask_preds.append((pred, tuple(self.roles), operand == 1))

    def _apply_to_fills(self, fn):
        """Fills through a later step, rounded (and overflowing) as the program does."""
        with np.errstate(over="ignore", invalid="ignore"):
            self.fills = [np.asarray(fn(f), self.dtype) for f in self.fills]

    def fill_values(self):
        return [float(f) for f in self.fills]


def _peel_scale(region, var):
    """(operand before multiplications/divisions by constants, the product of the factors)."""
    scale = 1.0
    while True:
        eqn = region.producer_eqn(var)
        if eqn is None or eqn.primitive not in (lax.mul_p, lax.div_p):
            return var, scale
        x, c = eqn.invars
        value = literal_value(region, c)
        if value is None and eqn.primitive is lax.mul_p:
            x, c = c, x
            value = literal_value(region, c)
        if value is None or value == 0 or not math.isfinite(value) or not isinstance(x, C.Var):
            return var, scale
        if x.aval.shape != var.aval.shape or x.aval.dtype != var.aval.dtype:
            return var, scale
        scale *= value if eqn.primitive is lax.mul_p else 1.0 / value
        var = x


def _unrepeat(region, var, axis):
    """`var` == jnp.repeat(k, g, axis) (each head repeated g times in place): (k, g) or None."""
    eqn = region.producer_eqn(var)
    if eqn is None or eqn.primitive is not lax.reshape_p or eqn.params.get("dimensions"):
        return None
    b = eqn.invars[0]
    shape, bshape = tuple(var.aval.shape), tuple(b.aval.shape)
    if len(bshape) != len(shape) + 1 or bshape[:axis] != shape[:axis] or \
            bshape[axis + 2:] != shape[axis + 1:] or bshape[axis] * bshape[axis + 1] != shape[axis]:
        return None
    group = bshape[axis + 1]
    bc = region.producer_eqn(b)
    if bc is None or bc.primitive is not lax.broadcast_in_dim_p:
        return None
    k = bc.invars[0]
    dims = tuple(int(d) for d in bc.params["broadcast_dimensions"])
    want = tuple(d for d in range(len(bshape)) if d != axis + 1)
    if dims == want and tuple(k.aval.shape) == bshape[:axis + 1] + bshape[axis + 2:]:
        return k, group
    if dims == tuple(range(len(bshape))) and k.aval.shape[axis + 1] == 1:
        inner = region.producer_eqn(k)
        if (inner is not None and inner.primitive in (lax.reshape_p, lax.broadcast_in_dim_p)
                and tuple(inner.invars[0].aval.shape) == bshape[:axis + 1] + bshape[axis + 2:]):
            if inner.primitive is lax.reshape_p and not inner.params.get("dimensions"):
                return inner.invars[0], group
            if inner.primitive is lax.broadcast_in_dim_p and tuple(
                    int(d) for d in inner.params["broadcast_dimensions"]) == want:
                return inner.invars[0], group
    return None


# ---------------------------------------------------------------------------------------------
# The replacement


def _merge(x, roles, groups, full_sizes=None):
    """x (axes labelled by `roles`, None = unit) -> one axis per group of roles, in order.

    Roles missing from x become unit axes; with `full_sizes`, a group mixing unit and full axes
    is broadcast to full size first (so it can be merged).
    """
    unit = [i for i, r in enumerate(roles) if r is None]
    if unit:
        x = lax.squeeze(x, unit)
    labels = [r for r in roles if r is not None]
    order = [r for g in groups for r in g if r in labels]
    if set(order) != set(labels):
        raise ValueError(f"roles {labels} do not all appear in the kernel layout {groups}")
    x = jnp.transpose(x, [labels.index(r) for r in order])
    expanded = [[x.shape[order.index(r)] if r in labels else 1 for r in g] for g in groups]
    x = x.reshape([n for dims in expanded for n in dims])
    if full_sizes is not None:
        target = []
        for g, dims in zip(groups, expanded):
            target.extend([full_sizes[r] for r in g] if any(n != 1 for n in dims) else dims)
        x = jnp.broadcast_to(x, target)
        expanded = []
        i = 0
        for g in groups:
            expanded.append(target[i:i + len(g)])
            i += len(g)
    return x.reshape([math.prod(dims) for dims in expanded])


def _attention_replacement(q, k, v, *extras, plan: AttentionPlan, implementation=None):
    sizes = dict(plan.sizes)
    dtype = jnp.dtype(plan.dtype)
    query = (plan.query,) if plan.query is not None else ()
    q4 = _merge(q.astype(dtype), plan.q_roles, [plan.batch, query, plan.heads + plan.groups, ("d",)])
    k4 = _merge(k.astype(dtype), plan.k_roles, [plan.batch, ("s",), plan.heads, ("d",)])
    v4 = _merge(v.astype(dtype), plan.v_roles, [plan.batch, ("s",), plan.heads, ("dv",)])
    logit_groups = [plan.batch, plan.heads + plan.groups, query, ("s",)]

    def logits_layout(x, roles):
        return _merge(*expand_compound(x, roles, sizes), logit_groups, sizes)

    mask = None
    for x, (roles, invert) in zip(extras[:len(plan.masks)], plan.masks):
        m = logits_layout(x, roles)
        m = ~m if invert else m
        mask = m if mask is None else mask & m
    bias = None
    for x, (roles, mult) in zip(extras[len(plan.masks):], plan.biases):
        b = jnp.asarray(x)
        b = logits_layout(b.astype(jnp.promote_types(b.dtype, jnp.float32)), roles)
        b = b * mult if mult != 1.0 else b
        bias = b if bias is None else bias + b
    if bias is not None:
        bias = kernel_safe_bias(bias)
    def attend(q4, k4, v4, bias):
        return kernel("attention")(q4, k4, v4, causal=plan.causal, mask=mask, bias=bias,
                                   scale=plan.scale, implementation=implementation)

    T, S = q4.shape[1], k4.shape[1]
    # without a data mask, the rows left without keys are known now: none, or the first T - S
    # causal rows (numpy, (1, 1, T)); the guard then waits on no predicate about them
    empty = None if mask is not None else np.zeros((1, 1, 1), bool) if not plan.causal else (
        np.arange(T) + (S - T) < 0)[None, None]
    out = guard_rows(attend, q4, k4, v4, _kept(mask, plan.causal, T, S), bias,
                     plan.rows_without_keys, plan.scale, empty=empty)
    heads_sizes = [sizes[r] for r in plan.heads + plan.groups]
    expanded = ([sizes[r] for r in plan.batch] + [sizes[r] for r in query] + heads_sizes
                + [sizes["dv"]])
    labels = list(plan.batch) + list(query) + list(plan.heads + plan.groups) + ["dv"]
    out = out.reshape(expanded)
    out = jnp.transpose(out, [labels.index(r) for r in plan.out_roles])
    return out.astype(plan.out_dtype)


def _kept(mask, causal, T, S):
    """The keys each row keeps through the `where` masks, the causal one included (or None)."""
    if not causal:
        return mask
    tri = (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))[None, None]
    return tri if mask is None else mask & tri


# =============================================================================================
# Matching helpers


def free_axes(rank, contract, batch):
    return [d for d in range(rank) if d not in contract and d not in batch]


def _is_float(atom) -> bool:
    return jnp.issubdtype(atom.aval.dtype, jnp.floating)
