"""The `attention` pass: softmax(Q K^T * scale [+ bias] [masked]) V -> `pallas_kernels.attention`.

The rule anchors at the value product (a `dot_general` with a softmax behind one operand) and
walks back: probabilities (through casts and transposes) -> softmax (plain primitives, with or
without `stop_gradient` on the max, or a `custom_jvp_call` whose body is one) -> the logits
chain (casts, transposes, scaling by constants, additive biases, `where` masks, in any order the
semantics allow) -> the logits `dot_general`. Every axis is given a role on the way (`a<i>`: an
axis shared by q, k and v such as batch or heads; `t<j>`: a query-only axis, the query sequence
or a grouped-query group; `s`: keys; `d`/`dv`: head dims), and every dimension number, softmax
axis and operand shape is checked against those roles, so any rank and layout maps onto the
kernel's (batch, seq, heads, head_dim) and nothing over-matches.

Spellings covered: Flax `nnx.MultiHeadAttention`, Linen `dot_product_attention`,
`jax.nn.dot_product_attention(implementation="xla")` (its grouped-query reshape included), and
hand-written einsums; the scale on q or k, on the logits, or as a division by sqrt(d); bf16
inputs with an f32 softmax; k and v repeated per group (`jnp.repeat`, un-repeated so the kernel
does grouped-query attention) or q reshaped into groups; a missing batch or head axis, or
several; with or without a scale; k and v the same array.

Masks: a `where` mask that evaluates (from iotas and constants) to the causal triangle becomes
`causal=True` (also as one factor of a conjunction with a data-dependent mask); other masks go
to the kernel as boolean inputs. The kernel gives zeros for rows whose keys are all masked; the
original gives NaN there (-inf fill) or the uniform average of v (a finite fill such as
`finfo.min`), so when such rows can occur the replacement reproduces exactly that, gradients
included. Additive biases (including masks spelled as biases) are passed as `bias`.

Declined, with the reason in the report: dropout on the probabilities, segment-id masks, sliding
windows, logit soft caps (tanh), a bias added after masking, a scale that is not a constant, and
a `dot_general` precision or preferred_element_type the kernel cannot honour.

The second half of the file holds matching helpers that `cross_entropy.py` shares (softmax and
log-sum-exp pieces, constant evaluation, the precision check, the kernel lookup).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from passes import _compat as C
from passes.fusion._shared import constant_value, dot_dims, kernel, precision_problem
from passes.pipeline import RulePass
from passes.rewrite import FunctionRule, Match, NoMatch

# A `where` fill counts as masking when it is -inf or at most this: exp(fill - row max) is then
# zero (or far below float rounding) for any realistic logits, as the kernel's masking assumes.
MASK_FILL_THRESHOLD = -1e4

# Largest constant mask evaluated at rewrite time (elements); larger ones stay data masks.


_RANDOM_PRIMITIVES = frozenset({"random_bits", "random_wrap", "random_seed", "random_unwrap",
                                "threefry2x32", "rng_bit_generator", "rng_uniform"})


# =============================================================================================
# The rule


def attention_pass(implementation=None) -> RulePass:
    """The `attention` pass, calling `pallas_kernels.attention(..., implementation=...)`."""
    impl = tuple(implementation) if isinstance(implementation, (list, tuple)) else implementation
    rule = FunctionRule("softmax_attention", (lax.dot_general_p,),
                        functools.partial(match_attention, implementation=impl))
    return RulePass("attention", [rule])


class _Decline(Exception):
    """Raised inside the matcher once the idiom is certain but cannot be rewritten."""


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
class _Softmax:
    out: object  # the probabilities
    x: object  # the softmax input
    axis: int
    positions: frozenset


@dataclasses.dataclass
class _Probabilities:
    softmax: _Softmax
    positions: frozenset  # casts and transposes between the softmax and the value product
    perm: tuple  # operand axis i of the value product is softmax-output axis perm[i]


def _probabilities(region, var):
    """The softmax behind a value-product operand, through casts and transposes.

    Returns `_Probabilities`, a NoMatch, or a decline reason (str) when a softmax is there but
    its probabilities are changed (dropout) before the product.
    """
    positions, perm = set(), None
    while True:
        sm = match_softmax(region, var)
        if sm:
            n = len(var.aval.shape)
            return _Probabilities(sm, frozenset(positions),
                                  tuple(range(n)) if perm is None else perm)
        pos = region.producer(var)
        if pos is None:
            return NoMatch("operand is not computed from a softmax")
        eqn = region.eqns[pos]
        if eqn.primitive is lax.convert_element_type_p and _is_float(eqn.invars[0]):
            var = eqn.invars[0]
        elif eqn.primitive is lax.transpose_p:
            p = tuple(int(i) for i in eqn.params["permutation"])
            perm = p if perm is None else tuple(p[i] for i in perm)
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
    masked_rows: str | None  # None, "nan" or "uniform": what rows without keys give


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
        # Which logits axis the softmax reduces, through the chain's transposes.
        src = list(range(len(dot.outvars[0].aval.shape)))
        for pos, _ in steps:
            eqn = region.eqns[pos]
            if eqn.primitive is lax.transpose_p:
                src = [src[int(p)] for p in eqn.params["permutation"]]
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
        state = _ChainState(self, logit_roles, sizes)
        for pos, operand in steps:
            state.step(pos, operand)
        if state.roles[sm.axis] != "s":
            return NoMatch("softmax axis {} is not the key axis of the logits", sm.axis)
        return self._finish(q, k, q_roles, k_roles, a_roles, t_roles, sizes, state,
                            chain)

    # -- the value product, q/k/v inputs, masks and the plan -----------------------------------
    def _finish(self, q, k, q_roles, k_roles, a_roles, t_roles, sizes, state, chain):
        region, root, probs = self.region, self.root, self.probs
        p_roles = [state.roles[probs.perm[i]] for i in range(len(probs.perm))]
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

        masks = _Masks(region, state, sizes)
        causal, query = masks.analyse(query, t_roles)
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
            masked_rows=masks.masked_rows(state.fill))
        inputs = ((q_in, k_in, v_in) + tuple(a for a, _, _ in masks.terms)
                  + tuple(a for a, _, _ in state.biases))
        return Match(root=self.position, eqns=frozenset(eqns), inputs=inputs,
                     outputs=(out_var,), replacement=_attention_replacement,
                     params={"plan": plan, "implementation": self.implementation})


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
    if prim in (lax.convert_element_type_p, lax.transpose_p, lax.tanh_p):
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
        if not isinstance(a, C.Var) or (prim is not lax.transpose_p and a.aval.shape != out_shape):
            continue
        for rest in _logits_chains(region, a, depth + 1):
            yield [(pos, i)] + rest


class _ChainState:
    """Walks the logits chain forward, tracking roles, scale, biases and masks."""

    def __init__(self, matcher, roles, sizes):
        self.m = matcher
        self.region = matcher.region
        self.roles = list(roles)
        self.sizes = sizes
        self.scale = 1.0
        self.biases = []  # (atom, roles, multiplier)
        self.mask_preds = []  # (atom, roles, invert)
        self.fill = None  # python float of the where fill (after later scaling)

    def step(self, pos, operand):
        eqn = self.region.eqns[pos]
        prim = eqn.primitive
        others = [a for i, a in enumerate(eqn.invars) if i != operand]
        if prim is lax.transpose_p:
            self.roles = [self.roles[int(p)] for p in eqn.params["permutation"]]
        elif prim is lax.convert_element_type_p:
            pass
        elif prim is lax.tanh_p:
            raise _Decline("a logit soft cap (tanh) sits between the logits and the softmax; "
                           "the kernel has no soft cap")
        elif prim in (lax.mul_p, lax.div_p):
            c = scalar_constant(self.region, others[0])
            if c is None:
                raise _Decline(f"the logits are scaled by a value that is not a scalar constant "
                               f"(`{prim}` with {others[0].aval.str_short()}); the kernel's "
                               f"scale is static")
            if c == 0 or not math.isfinite(c):
                raise _Decline(f"the logits are scaled by {c}")
            factor = c if prim is lax.mul_p else 1.0 / c
            if self.fill is not None:
                if factor < 0:
                    raise _Decline("masked logits are scaled by a negative factor")
                self.fill *= factor
            self.scale *= factor
            self.biases = [(a, r, mult * factor) for a, r, mult in self.biases]
        elif prim in (lax.add_p, lax.sub_p):
            if self.fill is not None:
                raise _Decline("a bias is added after the mask; the kernel adds the bias before "
                               "masking")
            atom, roles = trace_broadcast(self.region, others[0], self.roles, self.sizes,
                                          peel_casts=True)
            self.biases.append((atom, tuple(roles), 1.0 if prim is lax.add_p else -1.0))
        elif prim is lax.select_n_p:
            pred = eqn.invars[0]
            if pred.aval.dtype != np.bool_ or pred.aval.shape != eqn.outvars[0].aval.shape:
                raise _Decline("a `where` whose condition is not a boolean array of the "
                               "logits' shape")
            fill_atom = eqn.invars[3 - operand]
            fill = scalar_constant(self.region, fill_atom)
            if fill is None:
                raise _Decline("a `where` on the logits whose other branch is not a constant")
            if not (fill == -math.inf or fill <= MASK_FILL_THRESHOLD):
                raise _Decline(f"a `where` on the logits fills {fill:g}, which is not a mask "
                               f"value (-inf or at most {MASK_FILL_THRESHOLD:g})")
            if self.fill is not None and (self.fill == -math.inf) != (fill == -math.inf):
                raise _Decline("two masks with different fill values (-inf and finite)")
            self.fill = fill if self.fill is None else min(self.fill, fill)
            self.mask_preds.append((pred, tuple(self.roles), operand == 1))
        else:
            raise _Decline(f"`{prim}` between the logits and the softmax")


def _peel_scale(region, var):
    """(operand before multiplications/divisions by constants, the product of the factors)."""
    scale = 1.0
    while True:
        eqn = region.producer_eqn(var)
        if eqn is None or eqn.primitive not in (lax.mul_p, lax.div_p):
            return var, scale
        x, c = eqn.invars
        value = scalar_constant(region, c)
        if value is None and eqn.primitive is lax.mul_p:
            x, c = c, x
            value = scalar_constant(region, c)
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


class _Masks:
    """The `where` masks of a match: causal detection, declines, the kernel's mask inputs."""

    def __init__(self, region, state, sizes):
        self.region, self.state, self.sizes = region, state, sizes
        self.terms = []  # (atom, roles, invert) handed to the kernel as `mask`
        self.rows_may_be_empty = False

    def analyse(self, query, t_roles):
        """(causal, query role). Fills `terms`; raises _Decline for masks the kernel refuses."""
        leaves = []
        for pred, roles, invert in self.state.mask_preds:
            leaves.extend(mask_leaves(self.region, pred, roles, self.sizes, invert))
        if not leaves:
            return False, query
        constant, data = [], []
        for atom, roles, invert in leaves:
            value = constant_value(self.region, atom)
            if value is None:
                self._check_data_mask(atom)
                data.append((atom, roles, invert))
            else:
                constant.append((atom, roles, invert, value))
        causal = False
        if constant:
            combined = self._role_space([(r, ~v if inv else v) for _, r, inv, v in constant])
            if not combined.all():
                found = self._causal_role(combined, t_roles)
                if found is not None:
                    causal, query = True, found
                else:
                    self._check_window(combined, t_roles)
                    data.extend((a, r, inv) for a, r, inv, _ in constant)
                    if not combined.any(axis=-1).all():
                        self.rows_may_be_empty = True
        if data:
            self.rows_may_be_empty = True
        self.terms = data
        return causal, query

    def masked_rows(self, fill):
        if not self.rows_may_be_empty:
            return None
        return "nan" if fill == -math.inf else "uniform"

    def _order(self):
        """The canonical role order of the logits: shared axes, query axes, keys."""
        def numbered(prefix):
            return sorted((r for r in self.sizes if r[0] == prefix and r[1:].isdigit()),
                          key=lambda r: int(r[1:]))
        return numbered("a") + numbered("t") + ["s"]

    def _role_space(self, arrays):
        order = self._order()
        out = np.ones([1] * len(order), dtype=bool)
        for roles, value in arrays:
            out = out & _to_role_space(np.asarray(value, dtype=bool), roles, order)
        return out

    def _causal_role(self, combined, t_roles):
        """The query role along which the constant mask is the causal triangle, if any."""
        order = self._order()
        squeezed = _constant_along(combined, order, keep=[r for r in order
                                                          if r == "s" or r.startswith("t")])
        if squeezed is None:
            return None
        varying = [r for i, r in enumerate(order) if r.startswith("t") and squeezed.shape[i] > 1]
        if len(varying) != 1:
            return None
        role = varying[0]
        T, S = self.sizes[role], self.sizes["s"]
        if T > S:
            return None
        tri = np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)
        return role if np.array_equal(_square(squeezed, order, role, T, S), tri) else None

    def _check_window(self, combined, t_roles):
        """Decline a constant band mask: each query sees a fixed window around its diagonal."""
        order = self._order()
        for role in t_roles:
            T, S = self.sizes[role], self.sizes["s"]
            squeezed = _constant_along(combined, order, keep=[role, "s"])
            if T < 2 or squeezed is None:
                continue
            grid = _square(squeezed, order, role, T, S)
            rows = grid.any(axis=1)
            if not rows.any() or grid.all():
                continue
            rel = np.arange(S)[None, :] - np.arange(T)[:, None] - (S - T)  # key - diagonal
            first = np.argmax(grid, axis=1) - np.arange(T) - (S - T)
            last = S - 1 - np.argmax(grid[:, ::-1], axis=1) - np.arange(T) - (S - T)
            lo, hi = int(first[rows].min()), int(last[rows].max())
            # A window bounds both sides: the last query misses key 0 and the first query
            # misses the last key (a causal or anti-causal triangle bounds only one side).
            if lo > -(S - 1) and hi < T - 1 and np.array_equal(grid, (rel >= lo) & (rel <= hi)):
                raise _Decline(f"a sliding-window mask (keys {lo:+d}..{hi:+d} around the "
                               f"diagonal); the kernel has no sliding window")

    def _check_data_mask(self, atom):
        eqn = self.region.producer_eqn(atom)
        if eqn is None or eqn.primitive not in (lax.eq_p, lax.ne_p):
            return
        a, b = eqn.invars
        if all(isinstance(x, C.Var) and jnp.issubdtype(x.aval.dtype, jnp.integer)
               and constant_value(self.region, x) is None for x in (a, b)):
            raise _Decline("a segment-id mask (equality of two integer arrays); the kernel "
                           "takes no segment ids")


def _constant_along(arr, order, keep):
    """`arr` with every role outside `keep` collapsed to one entry, or None if it varies there."""
    for i, r in enumerate(order):
        if r not in keep and arr.shape[i] > 1:
            first = np.take(arr, [0], axis=i)
            if not (arr == first).all():
                return None
            arr = first
    return arr


def _square(arr, order, role, T, S):
    """The (T, S) grid of a role-space mask that varies at most along `role` and keys."""
    idx = tuple(slice(None) if r in (role, "s") else 0 for r in order)
    return np.broadcast_to(arr[idx], (T, S))


def _to_role_space(value, roles, order):
    """A mask with axes labelled `roles` (None: unit) as an array over `order` (unit where absent)."""
    keep = [i for i, r in enumerate(roles) if r is not None]
    value = value.reshape([value.shape[i] for i in keep]) if len(keep) != value.ndim else value
    labels = [roles[i] for i in keep]
    present = [r for r in order if r in labels]
    value = np.transpose(value, [labels.index(r) for r in present])
    return value.reshape([value.shape[present.index(r)] if r in present else 1 for r in order])


def mask_leaves(region, pred, roles, sizes, invert=False):
    """The conjunction factors of a boolean mask: [(atom, roles, invert)], broadcasts peeled."""
    atom, base_roles = trace_broadcast(region, pred, roles, sizes)
    eqn = region.producer_eqn(atom)
    if eqn is not None:
        if eqn.primitive is lax.not_p:
            return mask_leaves(region, eqn.invars[0], base_roles, sizes, not invert)
        if (eqn.primitive is lax.and_p and not invert) or (eqn.primitive is lax.or_p and invert):
            return [leaf for a in eqn.invars
                    for leaf in mask_leaves(region, a, base_roles, sizes, invert)]
        if eqn.primitive is lax.ne_p and scalar_constant(region, eqn.invars[1]) == 0:
            inner = region.producer_eqn(eqn.invars[0])
            if (inner is not None and inner.primitive is lax.convert_element_type_p
                    and inner.invars[0].aval.dtype == np.bool_):
                return mask_leaves(region, inner.invars[0], base_roles, sizes, invert)
        if (eqn.primitive is lax.convert_element_type_p and eqn.invars[0].aval.dtype != np.bool_
                and isinstance(eqn.invars[0], C.Var)):
            # bool(x) of a float 0/1 mask (flax's masks are float): x != 0
            src = region.producer_eqn(eqn.invars[0])
            if (src is not None and src.primitive is lax.convert_element_type_p
                    and src.invars[0].aval.dtype == np.bool_):
                return mask_leaves(region, src.invars[0], base_roles, sizes, invert)
    return [(atom, tuple(base_roles), invert)]


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
    mask = None
    for x, (roles, invert) in zip(extras[:len(plan.masks)], plan.masks):
        m = _merge(x, roles, logit_groups, sizes)
        m = ~m if invert else m
        mask = m if mask is None else mask & m
    bias = None
    for x, (roles, mult) in zip(extras[len(plan.masks):], plan.biases):
        b = jnp.asarray(x)
        b = b.astype(jnp.promote_types(b.dtype, jnp.float32))
        b = _merge(b, roles, logit_groups, sizes) * mult if mult != 1.0 else \
            _merge(b, roles, logit_groups, sizes)
        bias = b if bias is None else bias + b
    attention = kernel("attention")
    out = attention(q4, k4, v4, causal=plan.causal, mask=mask, bias=bias, scale=plan.scale,
                    implementation=list(implementation) if isinstance(implementation, tuple)
                    else implementation)
    if plan.masked_rows is not None:
        out = _masked_rows(out, v4, mask, plan)
    heads_sizes = [sizes[r] for r in plan.heads + plan.groups]
    expanded = ([sizes[r] for r in plan.batch] + [sizes[r] for r in query] + heads_sizes
                + [sizes["dv"]])
    labels = list(plan.batch) + list(query) + list(plan.heads + plan.groups) + ["dv"]
    out = out.reshape(expanded)
    out = jnp.transpose(out, [labels.index(r) for r in plan.out_roles])
    return out.astype(plan.out_dtype)


def _masked_rows(out, v4, mask, plan):
    """Rows whose keys are all masked: NaN (-inf fill) or the mean of v (finite fill)."""
    B, T, H, _ = out.shape
    keep = mask
    if plan.causal:
        S = v4.shape[1]
        tri = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T)
        keep = keep & tri[None, None]
    has_key = jnp.any(keep, axis=-1)  # (b|1, h|1, t|1)
    has_key = jnp.transpose(has_key, (0, 2, 1))[..., None]  # (b|1, t|1, h|1, 1)
    group = H // v4.shape[2]
    if plan.masked_rows == "uniform":
        mean = jnp.mean(v4.astype(jnp.promote_types(v4.dtype, jnp.float32)), axis=1)
        mean = jnp.repeat(mean, group, axis=1)[:, None]
        return jnp.where(has_key, out, mean.astype(out.dtype))
    # -inf fill: the original's softmax gives NaN for these rows, in the output and in dv.
    total = jnp.repeat(jnp.sum(v4, axis=1), group, axis=1)[:, None]
    nan_rows = jnp.where(has_key, jnp.zeros((), out.dtype), jnp.full((), jnp.nan, out.dtype))
    return out + nan_rows * total


# =============================================================================================
# Matching helpers


def free_axes(rank, contract, batch):
    return [d for d in range(rank) if d not in contract and d not in batch]


def _is_float(atom) -> bool:
    return jnp.issubdtype(atom.aval.dtype, jnp.floating)


def scalar_constant(region, atom):
    """The Python float of a scalar constant (a literal, possibly broadcast or cast), else None."""
    casts = []
    while True:
        if isinstance(atom, C.Literal):
            value = np.asarray(atom.val)
            if value.size != 1:
                return None
            value = value.reshape(())
            for dtype in reversed(casts):
                value = np.asarray(value, dtype=dtype)
            return float(value)
        eqn = region.producer_eqn(atom)
        if eqn is None:
            return None
        if eqn.primitive in (lax.broadcast_in_dim_p, lax.reshape_p):
            atom = eqn.invars[0]  # a broadcast of a scalar stays uniform
        elif eqn.primitive is lax.convert_element_type_p:
            casts.append(jnp.dtype(eqn.params["new_dtype"]))
            atom = eqn.invars[0]
        else:
            return None


def trace_broadcast(region, atom, roles, sizes, peel_casts=False):
    """Follow `atom` (an operand of an op whose result axes carry `roles`) back through
    broadcasts, unit-axis reshapes and transposes (and exact widening casts with `peel_casts`).

    Returns (base atom, role of each base axis); None marks a unit axis that broadcasts.
    """
    shape = tuple(atom.aval.shape)
    if len(shape) == 0:
        return atom, ()
    if len(shape) != len(roles):
        raise _Decline(f"an operand of rank {len(shape)} on rank-{len(roles)} logits")
    cur = []
    for n, r in zip(shape, roles):
        if n == sizes.get(r, -1):
            cur.append(r)
        elif n == 1:
            cur.append(None)
        else:
            raise _Decline(f"an operand of shape {shape} does not broadcast to the logits")
    while isinstance(atom, C.Var):
        eqn = region.producer_eqn(atom)
        if eqn is None:
            break
        src = eqn.invars[0]
        sshape = tuple(src.aval.shape)
        if eqn.primitive is lax.broadcast_in_dim_p:
            dims = [int(d) for d in eqn.params["broadcast_dimensions"]]
            cur = [cur[d] if sshape[i] == atom.aval.shape[d] else None for i, d in enumerate(dims)]
        elif eqn.primitive is lax.reshape_p and not eqn.params.get("dimensions"):
            if [n for n in sshape if n != 1] != [n for n in atom.aval.shape if n != 1]:
                break
            full = [r for r, n in zip(cur, atom.aval.shape) if n != 1]
            it = iter(full)
            cur = [next(it) if n != 1 else None for n in sshape]
        elif eqn.primitive is lax.transpose_p:
            perm = [int(p) for p in eqn.params["permutation"]]
            new = [None] * len(perm)
            for i, p in enumerate(perm):
                new[p] = cur[i]
            cur = new
        elif (peel_casts and eqn.primitive is lax.convert_element_type_p and _is_float(src)
              and _is_float(atom)
              and jnp.promote_types(src.aval.dtype, atom.aval.dtype) == atom.aval.dtype):
            pass
        else:
            break
        atom = src
    return atom, tuple(cur)


def match_softmax(region, var):
    """`var` = softmax(x, axis) as primitives or a custom_jvp_call: `_Softmax` or NoMatch."""
    pos = region.producer(var)
    if pos is None:
        return NoMatch("no producer")
    eqn = region.eqns[pos]
    if eqn.primitive is C.NESTED["custom_jvp_call"]:
        return _custom_jvp_softmax(region, pos, eqn)
    found = _softmax_body(region, var, lambda a: scalar_constant(region, a))
    if not found:
        return found
    x, axis, positions = found
    return _Softmax(var, x, axis, frozenset(positions))


def _custom_jvp_softmax(region, pos, eqn):
    from passes.ir import Region

    if len(eqn.outvars) != 1 or not eqn.invars:
        return NoMatch("custom_jvp_call with {} outputs", len(eqn.outvars))
    body = Region(eqn.params["call_jaxpr"])
    outer = dict(zip(body.invars, eqn.invars))

    def literal(a):
        if a in outer:
            return scalar_constant(region, outer[a])
        inner = body.producer_eqn(a)
        if inner is not None and inner.primitive is lax.convert_element_type_p and \
                inner.invars[0] in outer:
            return scalar_constant(region, outer[inner.invars[0]])
        return scalar_constant(body, a)

    found = _softmax_body(body, body.outvars[0], literal)
    if not found:
        return NoMatch("custom_jvp_call is not a softmax: {}", found.reason)
    x, axis, _ = found
    if x not in outer or outer[x] is not eqn.invars[0]:
        return NoMatch("custom_jvp_call's softmax is not over its first operand")
    return _Softmax(eqn.outvars[0], eqn.invars[0], axis, frozenset({pos}))


def _softmax_body(region, var, literal):
    """exp(x - max) / sum(exp(x - max)) along one axis: (x, axis, positions) or NoMatch."""
    pos = region.producer(var)
    if pos is None:
        return NoMatch("no producer")
    div = region.eqns[pos]
    if div.primitive is not lax.div_p:
        return NoMatch("`{}` is not the softmax's division", div.primitive)
    e, den = div.invars
    e_pos = region.producer(e)
    if e_pos is None or region.eqns[e_pos].primitive is not lax.exp_p:
        return NoMatch("the numerator is not an exp")
    sub_pos = region.producer(region.eqns[e_pos].invars[0])
    if sub_pos is None or region.eqns[sub_pos].primitive is not lax.sub_p:
        return NoMatch("the exp's operand is not x - max")
    x, mx = region.eqns[sub_pos].invars
    if not isinstance(x, C.Var):
        return NoMatch("softmax of a literal")
    positions = {pos, e_pos, sub_pos}
    red = keepdims_reduction(region, den, lax.reduce_sum_p, e, literal)
    if not red:
        return NoMatch("the denominator is not the sum of the numerator: {}", red.reason)
    axis, ps = red
    positions |= ps
    red = keepdims_reduction(region, mx, lax.reduce_max_p, x, literal, axis)
    if not red:
        return NoMatch("the subtracted value is not the max of the input: {}", red.reason)
    positions |= red[1]
    return x, axis, positions


_KEEPDIMS_PASS = (lax.broadcast_in_dim_p, lax.reshape_p, lax.stop_gradient_p, lax.transpose_p,
                  lax.convert_element_type_p)


def keepdims_reduction(region, var, reduce_prim, operand, literal, axis=None):
    """`var` = reduce(operand, axes=(axis,)) with the axis kept (unit or broadcast), maybe
    through stop_gradient, transposes and (for max) `max(., -inf)`. The reduction may also run
    over the array that `operand` transposes (JAX moves reductions before transposes).

    Returns (axis of `operand`, positions) or NoMatch.
    """
    positions, chain = set(), []
    while True:
        pos = region.producer(var)
        if pos is None:
            return NoMatch("reaches an input")
        eqn = region.eqns[pos]
        if eqn.primitive is lax.max_p and reduce_prim is lax.reduce_max_p:
            a, b = eqn.invars
            if literal(a) == -math.inf:
                a, b = b, a
            elif literal(b) != -math.inf:
                return NoMatch("`max` with something other than -inf")
            positions.add(pos)
            var = a
            continue
        if eqn.primitive is reduce_prim:
            positions.add(pos)
            break
        if eqn.primitive not in _KEEPDIMS_PASS:
            return NoMatch("`{}` where a reduction should be", eqn.primitive)
        chain.append(eqn)
        positions.add(pos)
        var = eqn.invars[0]
    reduced = eqn.invars[0]
    widened = region.producer(reduced)
    if (widened is not None and region.eqns[widened].primitive is lax.convert_element_type_p
            and reduced is not operand):  # bf16 sums accumulate in float32
        positions.add(widened)
        reduced = region.eqns[widened].invars[0]
    axes = tuple(int(d) for d in eqn.params["axes"])
    if len(axes) != 1:
        return NoMatch("reduces axes {}, not one", axes)
    (r_axis,) = axes
    # `operand` axis i is axis source[i] of the reduced array.
    if reduced is operand:
        source = list(range(len(operand.aval.shape)))
    else:
        t = region.producer_eqn(operand)
        if t is None or t.primitive is not lax.transpose_p or t.invars[0] is not reduced:
            return NoMatch("reduces another array")
        source = [int(p) for p in t.params["permutation"]]
    # Follow the reduced value forward, labelling each axis with its axis of the reduced array.
    labels = [a for a in range(len(reduced.aval.shape)) if a != r_axis]
    for eqn in reversed(chain):
        src, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        if eqn.primitive is lax.transpose_p:
            labels = [labels[int(p)] for p in eqn.params["permutation"]]
        elif eqn.primitive is lax.broadcast_in_dim_p:
            dims = [int(d) for d in eqn.params["broadcast_dimensions"]]
            if len(out) == len(src):
                if dims != list(range(len(src))):
                    return NoMatch("broadcast with dims {}", dims)
            elif len(out) == len(src) + 1 and dims == sorted(dims):
                new = [r_axis] * len(out)
                for i, d in enumerate(dims):
                    new[d] = labels[i]
                labels = new
            else:
                return NoMatch("broadcast of the reduction to {}", out)
        elif eqn.primitive is lax.reshape_p:
            if eqn.params.get("dimensions") or [n for n in src if n != 1] != [
                    n for n in out if n != 1]:
                return NoMatch("reshape of the reduction to {}", out)
            if len(out) == len(src) + 1:  # inserts the kept unit axis
                at = next((i for i in range(len(out))
                           if out[i] == 1 and list(out[:i]) + list(out[i + 1:]) == list(src)),
                          None)
                if at is None:
                    return NoMatch("reshape of the reduction to {}", out)
                labels = labels[:at] + [r_axis] + labels[at:]
            elif tuple(out) != tuple(src):
                return NoMatch("reshape of the reduction to {}", out)
    if labels != source:
        return NoMatch("the reduction is laid out as {} against the input's {}", labels, source)
    k_axis = source.index(r_axis)
    if axis is not None and k_axis != axis:
        return NoMatch("reduces axis {}, not {}", k_axis, axis)
    shape = operand.aval.shape
    if any(n not in (1, shape[i]) for i, n in enumerate(var_shape(chain, eqn))):
        return NoMatch("the reduction does not broadcast against the input")
    return k_axis, positions


def var_shape(chain, reduce_eqn):
    """Shape of the keepdims value (the first chain equation's output, else the reduction's)."""
    return tuple((chain[0] if chain else reduce_eqn).outvars[0].aval.shape)
