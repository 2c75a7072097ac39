"""The `softmax_cross_entropy` pass: per-example softmax cross-entropy -> `pallas_kernels`.

Spellings covered (after canonicalize), the class axis anywhere:
- `logsumexp(x) - take_along_axis(x, labels)` (optax's `softmax_cross_entropy_with_integer_labels`);
- `-take_along_axis(log_softmax(x), labels)`;
- `-sum(one_hot(labels) * log_softmax(x))` (optax's `softmax_cross_entropy` on `jax.nn.one_hot`);
- `logsumexp(x) - sum(one_hot(labels) * x)`;
- `logsumexp(x) - x[i, j, labels]` and `-log_softmax(x)[i, j, labels]` (advanced indexing with
  aranges on the other axes).
`logsumexp` is any `m + log(sum(exp(x - m)))` with `m` constant along the class axis (JAX's
spelling with its max / is_finite guard, or a hand-written max), `log_softmax` JAX's
(`x - m - log(sum(exp(x - m)))`) or `x - logsumexp(x, keepdims=True)`; both are recognised in
`_softmax.py`.

Labels keep the original's semantics for every label value, gradients included: with
`take_along_axis` (gather mode "fill") an out-of-range label gives NaN, with the softmax as the
gradient in the logsumexp form and a zero gradient in the log_softmax form; clamping gather modes
clamp; a one-hot row of an out-of-range label is all zeros (loss 0, or logsumexp(x) in the
logsumexp - sum form).

When the logits come from a `dot_general` contracting the hidden axis (w as [d, vocab], or a tied
[vocab, d] embedding used as `x @ wte.T`, which canonicalize folds into the dot) and nothing else
uses them, matmul and loss become one `pallas_kernels.linear_cross_entropy` call, so the
[tokens, vocab] logits never exist. Soft (not one-hot) labels are reported as declined.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from passes import _compat as C
from passes.fusion._shared import (constant_value, described, dot_dims, kernel, kernel_choice,
                                   precision_problem)
from passes.fusion._softmax import log_softmax, logsumexp, shift_kind
from passes.pipeline import RulePass
from passes.rewrite import FunctionRule, Match, NoMatch


def cross_entropy_pass(implementation=None, platform=None) -> RulePass:
    """The `softmax_cross_entropy` pass, calling the kernels with the `KernelChoice` of
    `implementation` and `platform`.

    Two rules share the matcher: `linear_cross_entropy` (matmul + loss, tried first) and
    `softmax_cross_entropy` (the loss on materialised logits).
    """
    impl = kernel_choice(implementation, platform)
    fused = FunctionRule("linear_cross_entropy", _ROOTS,
                         functools.partial(match_cross_entropy, implementation=impl, fused=True),
                         priority=1)
    plain = FunctionRule("softmax_cross_entropy", _ROOTS,
                         functools.partial(match_cross_entropy, implementation=impl, fused=False))
    return described(RulePass("softmax_cross_entropy", [fused, plain]), DESCRIPTION)


DESCRIPTION = ("per-example softmax cross-entropy (optax's integer-label and one-hot losses, "
               "-log_softmax[label], logsumexp - logit[label]) -> "
               "pallas_kernels.softmax_cross_entropy, or linear_cross_entropy when the logits "
               "are a matmul used only by the loss")

# The loss ends in a subtraction (logsumexp - picked logit) or a negation (-picked
# log-probability); a picked log-probability that is not negated right away (its mean negated
# later, say) is matched at the pick.
_PICKS = (lax.gather_p, lax.squeeze_p, lax.reshape_p)
_ROOTS = (lax.sub_p, lax.neg_p) + _PICKS


@dataclasses.dataclass(frozen=True)
class CrossEntropyPlan:
    """How the matched loss maps onto the kernels.

    form: "logsumexp" (lse - picked), "log_softmax" (-picked log-probability), "one_hot"
      (-sum(onehot * log_softmax)), "logsumexp_one_hot" (lse - sum(onehot * x)).
    labels: "fill" (gather mode fill: out of range is NaN), "clip" (clamped), "promise"
      (clamped value, softmax-only gradient, as XLA runs promise_in_bounds), "one_hot".
    label_shape: "flat" (the label input holds exactly the batch's labels) or "kept" (it has a
      unit class axis at `axis` and may broadcast over the batch).
    shift: "guarded_max" (jax.nn.logsumexp's shift: the row max, 0 where it is not finite,
      the kernel's own semantics) or "row_max" (the plain row max: JAX's log_softmax, x.max();
      a row whose max is not finite is NaN throughout, values and gradients).
    sign: 1 for the loss, -1 for the picked log-probability (matched at the pick).
    out_shape: the matched result's shape (the batch shape, or with the unit class axis kept).
    """

    form: str
    labels: str
    label_shape: str
    axis: int
    batch_shape: tuple
    vocab: int
    out_dtype: str
    w_layout: str | None  # None: logits are an input; "dv"/"vd": fused with the matmul
    x_axis: int = -1  # the contracted (hidden) axis of x in the fused form
    shift: str = "guarded_max"
    sign: int = 1
    out_shape: tuple | None = None


@dataclasses.dataclass(frozen=True)
class _Found:
    """A matched loss: its spelling, logits and class axis, shift and labels."""

    form: str
    x: object
    axis: int
    shift_root: object
    label: object
    labels: str
    label_shape: str
    sign: int = 1


def match_cross_entropy(region, position, *, implementation=None, fused=False):
    """The loss whose last equation is at `position`; with `fused`, only matmul + loss."""
    eqn = region.eqns[position]
    found = _form_at(region, position)
    if isinstance(found, str):
        if fused:
            return NoMatch("declined by the softmax_cross_entropy rule")
        return _declined(position, eqn, found)
    if not found:
        return found
    x, axis = found.x, found.axis
    full = tuple(x.aval.shape)
    batch_shape = full[:axis] + full[axis + 1:]
    out = eqn.outvars[0]
    problem = _unsupported(region, found, out, batch_shape)
    if problem:
        return NoMatch("declined by the softmax_cross_entropy rule") if fused else _declined(
            position, eqn, problem)
    eqns = _between(region, x, position)
    plan = dict(form=found.form, labels=found.labels, label_shape=found.label_shape, axis=axis,
                batch_shape=batch_shape, vocab=int(full[axis]),
                out_dtype=jnp.dtype(out.aval.dtype).name, w_layout=None,
                shift=shift_kind(region, found.shift_root, x, axis), sign=found.sign,
                out_shape=tuple(out.aval.shape))
    matmul = _fused_matmul(region, x, axis, eqns)
    if fused:
        if matmul is None:
            return NoMatch("the logits are not a matmul used only by the loss")
        h, w, layout, h_axis, extra = matmul
        plan.update(w_layout=layout, x_axis=h_axis)
        return Match(root=position, eqns=frozenset(eqns | extra), inputs=(h, w, found.label),
                     outputs=(out,), replacement=_cross_entropy_replacement,
                     params={"plan": CrossEntropyPlan(**plan),
                             "implementation": implementation})
    return Match(root=position, eqns=frozenset(eqns), inputs=(x, found.label), outputs=(out,),
                 replacement=_cross_entropy_replacement,
                 params={"plan": CrossEntropyPlan(**plan), "implementation": implementation})


def _declined(position, eqn, reason):
    return Match(root=position, eqns=frozenset({position}), inputs=tuple(eqn.invars),
                 outputs=tuple(eqn.outvars), replacement=_cross_entropy_replacement,
                 declined=reason)


def _unsupported(region, found, out, batch_shape):
    """Why a matched loss cannot be handed to the kernels (None when it can)."""
    x, axis = found.x, found.axis
    kept = batch_shape[:axis] + (1,) + batch_shape[axis:]
    shapes = (batch_shape,) if found.sign == 1 else (batch_shape, kept)
    if tuple(out.aval.shape) not in shapes:
        return f"the loss has shape {tuple(out.aval.shape)}, not the batch shape {batch_shape}"
    if not jnp.issubdtype(found.label.aval.dtype, jnp.integer):
        return f"labels of dtype {found.label.aval.dtype}, not integers"
    for what, dtype in (("logits", x.aval.dtype), ("loss", out.aval.dtype)):
        if jnp.dtype(dtype).itemsize > 4:
            return f"the kernels compute in float32; the {what} are {jnp.dtype(dtype).name}"
    if shift_kind(region, found.shift_root, x, axis) is None:
        return ("the log-sum-exp subtracts a row value other than the row max, so its "
                "overflow and infinities are not the kernel's")
    return None


def _form_at(region, position):
    """The loss ending at `position`: a `_Found`, a NoMatch, or a decline reason string."""
    eqn = region.eqns[position]
    if eqn.primitive is lax.sub_p:
        return _logsumexp_form(region, eqn)
    if eqn.primitive is lax.neg_p:
        return _negated_form(region, eqn)
    return _pick_form(region, position)


# ---------------------------------------------------------------------------------------------
# The loss shapes: lse - picked, -(picked log-probability), and the picked log-probability


def _logsumexp_form(region, eqn):
    a, b = eqn.invars
    lse = logsumexp(region, a)
    if not lse:
        return NoMatch("not logsumexp - picked logit: {}", lse.reason)
    x, axis, shift = lse
    picked = _picked(region, b, x, axis)
    if picked:
        return _Found("logsumexp", x, axis, shift, *picked[2:])
    onehot = _one_hot_sum(region, b, x, axis)
    if isinstance(onehot, str) or not onehot:
        return onehot if isinstance(onehot, str) else NoMatch(
            "logsumexp minus something else: {}; {}", picked.reason, onehot.reason)
    return _Found("logsumexp_one_hot", x, axis, shift, *onehot[2:])


def _negated_form(region, eqn):
    (a,) = eqn.invars
    inner = region.producer_eqn(a)
    if inner is None:
        return NoMatch("negates an input")
    if inner.primitive is lax.reduce_sum_p:
        axes = tuple(int(d) for d in inner.params["axes"])
        prod = region.producer_eqn(inner.invars[0])
        if len(axes) != 1 or prod is None or prod.primitive is not lax.mul_p:
            return NoMatch("not a sum of labels * log-probabilities")
        for ls, oh in (prod.invars, prod.invars[::-1]):
            found = log_softmax(region, ls)
            if found and found[1] == axes[0]:
                x, axis, shift = found
                hot = _one_hot(region, oh, x, axis)
                if isinstance(hot, str):
                    return hot
                if hot:
                    return _Found("one_hot", x, axis, shift, *hot[2:])
        return NoMatch("not a sum of one-hot labels * log_softmax")
    return _picked_log_probability(region, a)


def _picked_log_probability(region, var):
    """`var` = log_softmax(x)[..., label, ...]: a `_Found` of the log_softmax form, or NoMatch."""
    for ls in _picked_sources(region, var):
        found = log_softmax(region, ls)
        if found:
            x, axis, shift = found
            picked = _picked(region, var, ls, axis)
            if picked:
                return _Found("log_softmax", x, axis, shift, *picked[2:])
    return NoMatch("not -log_softmax[label]")


def _pick_form(region, position):
    """A picked log-probability not negated right away (`-mean(take_along_axis(...))`); left
    to the larger match where the pick feeds one (the negation, or a take_along_axis's squeeze).
    """
    if _feeds_larger_loss(region, position):
        return NoMatch("part of the loss matched at a later equation")
    found = _picked_log_probability(region, region.eqns[position].outvars[0])
    return dataclasses.replace(found, sign=-1) if found else found


def _feeds_larger_loss(region, position) -> bool:
    users = region.users(region.eqns[position].outvars[0])
    if len(users) != 1 or users[0] < 0:
        return False
    user = region.eqns[users[0]]
    if user.primitive is lax.neg_p:
        found = _negated_form(region, user)
        return isinstance(found, str) or bool(found)
    if user.primitive not in _PICKS:
        return False
    return _feeds_larger_loss(region, users[0]) or bool(
        _picked_log_probability(region, user.outvars[0]))


def _picked_sources(region, var):
    """Arrays that `var` may pick elements from: the operands behind a squeeze and a gather."""
    sources = []
    for _ in range(2):
        eqn = region.producer_eqn(var)
        if eqn is None or eqn.primitive not in (lax.squeeze_p, lax.reshape_p, lax.gather_p):
            break
        var = eqn.invars[0]
        sources.append(var)
    return sources


# ---------------------------------------------------------------------------------------------
# Picking the label's logit


def _picked(region, var, x, axis):
    """`var` = x[..., label, ...] along `axis`: (x, axis, label atom, label mode, label shape)."""
    eqn = region.producer_eqn(var)
    if eqn is None:
        return NoMatch("picks from an input")
    full = tuple(x.aval.shape)
    batch = full[:axis] + full[axis + 1:]
    kept = full[:axis] + (1,) + full[axis + 1:]
    if eqn.primitive is lax.gather_p and eqn.invars[0] is x and tuple(
            eqn.outvars[0].aval.shape) == batch:
        return _indexing(region, eqn, x, axis)
    if eqn.primitive is lax.gather_p and eqn.invars[0] is x and tuple(
            eqn.outvars[0].aval.shape) == kept and _is_take_along_axis(eqn, full, axis):
        return x, axis, eqn.invars[1], _label_mode(eqn), "flat"
    # take_along_axis gives the kept shape; then a squeeze of the class axis
    if eqn.primitive is lax.squeeze_p:
        if tuple(int(d) for d in eqn.params["dimensions"]) != (axis,):
            return NoMatch("squeezes another axis")
    elif eqn.primitive is lax.reshape_p:
        if eqn.params.get("dimensions"):
            return NoMatch("reshape with a transpose")
    elif eqn.primitive is lax.gather_p:
        if not _takes_index_zero(region, eqn, axis):
            return NoMatch("a gather that does not drop the class axis")
    else:
        return NoMatch("`{}` where a take_along_axis should be", eqn.primitive)
    g = region.producer_eqn(eqn.invars[0])
    if g is None or g.primitive is not lax.gather_p or tuple(eqn.invars[0].aval.shape) != kept:
        return NoMatch("not a take_along_axis")
    if g.invars[0] is not x:
        return NoMatch("takes from another array")
    if not _is_take_along_axis(g, full, axis):
        return NoMatch("a gather that is not take_along_axis on axis {}", axis)
    return x, axis, g.invars[1], _label_mode(g), "flat"


def _is_take_along_axis(g, full, axis) -> bool:
    """Whether gather `g` picks one element along `axis` per position of the other axes, its
    indices (with a trailing index-vector axis of 1) holding the batch's labels in order.

    JAX batches each axis of size > 1 and slices unit axes whole (a leading batch of 1), so the
    check allows both: the indices then reshape to the batch shape without reordering.
    """
    dn = g.params["dimension_numbers"]
    idx_shape = tuple(g.invars[1].aval.shape)
    operand_batch = tuple(getattr(dn, "operand_batching_dims", ()))
    index_batch = tuple(getattr(dn, "start_indices_batching_dims", ()))
    others = [d for d in range(len(full)) if d != axis]
    if (tuple(dn.collapsed_slice_dims) != (axis,) or tuple(dn.start_index_map) != (axis,)
            or tuple(g.params["slice_sizes"]) != (1,) * len(full)
            or not idx_shape or idx_shape[-1] != 1
            or list(operand_batch) != sorted(operand_batch)
            or list(index_batch) != sorted(index_batch)
            or not set(operand_batch) <= set(others)):
        return False
    if any(full[d] != 1 for d in others if d not in operand_batch):
        return False
    if any(n != 1 for i, n in enumerate(idx_shape[:-1]) if i not in index_batch):
        return False
    return all(idx_shape[i] == full[d] for d, i in zip(operand_batch, index_batch))


def _label_mode(gather_eqn):
    """"fill" (NaN out of range), "clip" (clamped both ways) or "promise" (XLA: clamped gather,
    dropped scatter in the gradient)."""
    mode = str(gather_eqn.params.get("mode")).upper()
    return "fill" if "FILL" in mode else "clip" if "CLIP" in mode else "promise"


def _takes_index_zero(region, eqn, axis):
    """`eqn` = operand[..., 0, ...] (a gather dropping a unit axis at `axis`)."""
    operand, idx = eqn.invars
    dn = eqn.params["dimension_numbers"]
    shape = tuple(operand.aval.shape)
    if shape[axis] != 1 or tuple(dn.collapsed_slice_dims) != (axis,) or \
            tuple(dn.start_index_map) != (axis,) or tuple(eqn.params["slice_sizes"]) != shape:
        return False
    if tuple(getattr(dn, "operand_batching_dims", ())):
        return False
    value = constant_value(region, idx)
    return value is not None and value.size == 1 and int(value.reshape(())) == 0


def _indexing(region, eqn, x, axis):
    """x[arange, ..., labels, ...]: a gather with one index per axis, aranges elsewhere."""
    dn = eqn.params["dimension_numbers"]
    rank = len(x.aval.shape)
    idx = eqn.invars[1]
    if (tuple(dn.offset_dims) != () or sorted(dn.collapsed_slice_dims) != list(range(rank))
            or sorted(dn.start_index_map) != list(range(rank))
            or tuple(getattr(dn, "operand_batching_dims", ()))
            or tuple(eqn.params["slice_sizes"]) != (1,) * rank):
        return NoMatch("a gather that is not per-element indexing")
    cat = region.producer_eqn(idx)
    if (cat is None or cat.primitive is not lax.concatenate_p
            or int(cat.params["dimension"]) != len(idx.aval.shape) - 1
            or len(cat.invars) != rank or any(p.aval.shape[-1] != 1 for p in cat.invars)):
        return NoMatch("indices are not one column per axis")
    batch = tuple(eqn.outvars[0].aval.shape)
    label = None
    for piece, target in zip(cat.invars, dn.start_index_map):
        if target == axis:
            label = piece
            continue
        value = constant_value(region, piece)
        out_axis = target if target < axis else target - 1
        want = np.broadcast_to(np.arange(batch[out_axis]).reshape(
            [-1 if i == out_axis else 1 for i in range(len(batch))]), batch)
        if value is None or value.shape[:-1] != batch or not np.array_equal(value[..., 0], want):
            return NoMatch("index column for axis {} is not an arange", target)
    return x, axis, label, _label_mode(eqn), "flat"


def _one_hot_sum(region, var, x, axis):
    """`var` = sum(onehot(labels) * x, axis): (x, axis, label, "one_hot", "kept")."""
    eqn = region.producer_eqn(var)
    if eqn is None or eqn.primitive is not lax.reduce_sum_p or tuple(
            int(d) for d in eqn.params["axes"]) != (axis,):
        return NoMatch("not a sum over the class axis")
    prod = region.producer_eqn(eqn.invars[0])
    if prod is None or prod.primitive is not lax.mul_p:
        return NoMatch("not a sum of a product")
    for a, b in (prod.invars, prod.invars[::-1]):
        if a is x:
            return _one_hot(region, b, x, axis)
    return NoMatch("the product does not use the logits")


def _one_hot(region, var, x, axis):
    """`var` = one_hot(labels) along `axis` (as jax.nn.one_hot): (x, axis, label, ...) or a
    decline reason for other (soft) label distributions."""
    soft = ("soft labels (not a one-hot of integer labels); the kernels take integer labels, "
            "so the original stays")
    eqn = region.producer_eqn(var)
    if eqn is None or eqn.primitive is not lax.convert_element_type_p:
        return soft
    cmp = region.producer_eqn(eqn.invars[0])
    if cmp is None or cmp.primitive is not lax.eq_p:
        return soft
    full = tuple(x.aval.shape)
    for lab, io in (cmp.invars, cmp.invars[::-1]):
        iota = region.producer_eqn(io)
        if iota is None or iota.primitive is not lax.iota_p:
            continue
        ishape = tuple(iota.params["shape"])
        if (int(iota.params["dimension"]) != axis or len(ishape) != len(full)
                or ishape[axis] != full[axis]
                or any(n != 1 for i, n in enumerate(ishape) if i != axis)):
            continue
        lshape = tuple(lab.aval.shape)
        if len(lshape) != len(full) or lshape[axis] != 1 or any(
                n not in (1, full[i]) for i, n in enumerate(lshape)):
            continue
        return x, axis, lab, "one_hot", "kept"
    return soft


# ---------------------------------------------------------------------------------------------
# The matched equations and the fused matmul


def _between(region, source, root):
    """Positions of the equations on paths from `source` to the output of equation `root`."""
    start = region.producer(source)
    start = -1 if start is None else start
    memo = {}

    def depends(pos):
        if pos in memo:
            return memo[pos]
        memo[pos] = False
        hit = False
        for a in region.eqns[pos].invars:
            if a is source:
                hit = True
            elif isinstance(a, C.Var):
                p = region.producer(a)
                if p is not None and p > start and depends(p):
                    hit = True
        memo[pos] = hit
        return hit

    depends(root)
    return {p for p, hit in memo.items() if hit}


def _fused_matmul(region, x, axis, eqns):
    """(h, w, w_layout, h's hidden axis, extra positions) when the logits `x` are h @ w used only
    by the loss; None otherwise."""
    if axis != len(x.aval.shape) - 1:
        return None
    extra = set()
    logits = x
    pos = region.producer(x)
    if pos is None:
        return None
    eqn = region.eqns[pos]
    if eqn.primitive is lax.convert_element_type_p:
        if not jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating):
            return None
        extra.add(pos)
        logits = eqn.invars[0]
        pos = region.producer(logits)
        if pos is None:
            return None
        eqn = region.eqns[pos]
    if eqn.primitive is not lax.dot_general_p or precision_problem(eqn):
        return None
    lc, rc, lb, rb = dot_dims(eqn)
    h, w = eqn.invars
    if lb or rb or len(lc) != 1 or len(w.aval.shape) != 2:
        return None
    layout = "dv" if rc == (0,) else "vd"
    extra.add(pos)
    inside = eqns | extra
    for v in {x, logits}:
        if any(u < 0 or u not in inside for u in region.users(v)):
            return None
    return h, w, layout, lc[0], extra


# ---------------------------------------------------------------------------------------------
# The replacement


def _cross_entropy_replacement(*args, plan: CrossEntropyPlan, implementation=None):
    labels = args[-1]
    if plan.label_shape == "kept":
        labels = jnp.broadcast_to(jnp.squeeze(labels, plan.axis), plan.batch_shape)
    else:
        labels = labels.reshape(plan.batch_shape)
    labels = labels.astype(jnp.int32)
    if plan.w_layout is None:
        source = _Logits(jnp.moveaxis(args[0], plan.axis, -1), implementation)
    else:
        source = _Projected(jnp.moveaxis(args[0], plan.x_axis, -1), args[1], plan.w_layout,
                            implementation)
    loss = _loss(plan, source, labels)
    return (plan.sign * loss).astype(plan.out_dtype).reshape(plan.out_shape)


class _Logits:
    """Materialised logits, class axis last."""

    def __init__(self, logits, implementation):
        self.logits, self.implementation = logits, implementation

    def loss(self, labels):
        return kernel("softmax_cross_entropy")(self.logits, labels,
                                               implementation=self.implementation)

    def logit_at(self, labels, columns):
        return jnp.take_along_axis(self.logits, labels[..., None], axis=-1)[..., 0]

    def row_max_finite(self, loss, picked):
        return jnp.isfinite(jnp.max(self.logits, axis=-1))

    def logsumexp(self, loss, picked):
        return jax.nn.logsumexp(self.logits, axis=-1)


class _Projected:
    """Logits h @ w that never exist: row facts come from the kernel's loss and the picked
    logit (lse = loss + picked), exact unless the picked logit is infinite."""

    def __init__(self, h, w, layout, implementation):
        self.h, self.w, self.layout, self.implementation = h, w, layout, implementation

    def loss(self, labels):
        return kernel("linear_cross_entropy")(self.h, self.w, labels, w_layout=self.layout,
                                              implementation=self.implementation)

    def logit_at(self, labels, columns):
        """The logit at each row's label. `_loss` differentiates it only on rows whose label
        was out of range and replaced by one of `columns`, so its gradient flows through those
        columns of w alone: a gather's gradient would scatter into a weight-sized array of
        zeros (and under data parallelism be all-reduced on its own)."""
        from pallas_kernels.linear_cross_entropy import linear_logit

        h = self.h.astype(jnp.float32)
        # an op that runs per shard: a vocabulary-split weight adds [tokens] floats, not rows
        value = lax.stop_gradient(linear_logit(self.h, self.w, labels, w_layout=self.layout))
        for c in columns:
            # selected and summed over the vocabulary, not sliced: on a vocabulary-split weight
            # each shard sums its own columns and [d] floats are added up, where a slice of the
            # split axis reshards the whole weight; and its gradient is a select fused into the
            # weight's, where a gather's scatters into a weight-sized array of zeros
            axis = 0 if self.layout == "vd" else 1
            pick = jnp.arange(self.w.shape[axis]) == c
            column = jnp.sum(jnp.where(pick[:, None] if axis == 0 else pick, self.w, 0),
                             axis=axis).astype(jnp.float32)
            hit = jnp.where(labels == c, jnp.sum(h * column, axis=-1), 0)
            value = value + (hit - lax.stop_gradient(hit))
        return value

    def row_max_finite(self, loss, picked):
        return jnp.isfinite(self.logsumexp(loss, picked)) | (picked == -jnp.inf)

    def logsumexp(self, loss, picked):
        return loss + picked


def _loss(plan, source, labels):
    """The original's loss for every label value, from the kernel's lse - logit[safe label].

    Special values follow the original: with the plain row max as the shift (`row_max`), a row
    whose max is not finite (a +inf or NaN logit, or all -inf) is NaN in value and gradient,
    where the kernel's guarded log-sum-exp would give inf.
    """
    vocab = plan.vocab
    valid = (labels >= 0) & (labels < vocab)
    clamped = plan.labels in ("clip", "promise")
    safe = jnp.clip(labels, 0, vocab - 1) if clamped else jnp.where(valid, labels, 0)
    kernel_loss = source.loss(safe)
    # the labels that out-of-range ones become; the picked logit is differentiated only there
    columns = (0, vocab - 1) if clamped else (0,)
    picked = source.logit_at(safe, sorted(set(columns))).astype(kernel_loss.dtype)
    if plan.labels == "clip":
        loss = kernel_loss
    elif plan.labels == "promise":
        # XLA clamps the gather and drops the out-of-range update of its transpose: the clamped
        # label's loss, with the softmax alone as the gradient
        loss = kernel_loss + jnp.where(valid, 0, picked - lax.stop_gradient(picked))
    elif plan.form == "logsumexp":
        # out of range: NaN, with the log-sum-exp's gradient (the softmax)
        loss = kernel_loss + jnp.where(valid, 0, picked + jnp.nan)
    elif plan.form == "log_softmax":
        loss = jnp.where(valid, kernel_loss, jnp.nan)
    elif plan.form == "one_hot":
        loss = jnp.where(valid, kernel_loss, 0)
    else:  # logsumexp - sum(onehot * x): an all-zero row leaves logsumexp(x)
        loss = jnp.where(valid, kernel_loss, source.logsumexp(kernel_loss, picked))
    if plan.shift == "row_max":
        blank = (plan.form == "one_hot") & ~valid  # the one-hot row picks nothing: 0
        loss = _nan_rows(loss, kernel_loss, ~source.row_max_finite(kernel_loss, picked),
                         value=jnp.where(blank, 0, jnp.nan).astype(loss.dtype))
    return loss


def _nan_rows(loss, kernel_loss, rows, value):
    """`value` in `rows` (NaN, or the 0 of a one-hot row that picks nothing), with a NaN
    gradient for each of their logits (through the kernel's, whose gradient is linear in its
    cotangent)."""
    nan_factor = jnp.where(rows, jnp.nan, 0).astype(kernel_loss.dtype)
    return jnp.where(rows, value, loss) + _zero_with_gradient(kernel_loss, nan_factor)


@jax.custom_jvp
def _zero_with_gradient(value, factor):
    """Zeros, whose derivative is `value`'s times `factor` (a constant)."""
    return jnp.zeros_like(value)


@_zero_with_gradient.defjvp
def _zero_with_gradient_jvp(primals, tangents):
    value, factor = primals
    return jnp.zeros_like(value), tangents[0] * lax.stop_gradient(factor)
