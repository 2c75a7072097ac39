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
(`x - m - log(sum(exp(x - m)))`) or `x - logsumexp(x, keepdims=True)`.

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

import jax.numpy as jnp
import numpy as np
from jax import lax

from passes import _compat as C
from passes.fusion._shared import constant_value, dot_dims, kernel, precision_problem
from passes.pipeline import RulePass
from passes.rewrite import FunctionRule, Match, NoMatch


def cross_entropy_pass(implementation=None) -> RulePass:
    """The `softmax_cross_entropy` pass, calling the kernels with `implementation`.

    Two rules share the matcher: `linear_cross_entropy` (matmul + loss, tried first) and
    `softmax_cross_entropy` (the loss on materialised logits).
    """
    impl = tuple(implementation) if isinstance(implementation, (list, tuple)) else implementation
    fused = FunctionRule("linear_cross_entropy", (lax.sub_p, lax.neg_p),
                         functools.partial(match_cross_entropy, implementation=impl, fused=True),
                         priority=1)
    plain = FunctionRule("softmax_cross_entropy", (lax.sub_p, lax.neg_p),
                         functools.partial(match_cross_entropy, implementation=impl, fused=False))
    return RulePass("softmax_cross_entropy", [fused, plain])


@dataclasses.dataclass(frozen=True)
class CrossEntropyPlan:
    """How the matched loss maps onto the kernels.

    form: "logsumexp" (lse - picked), "log_softmax" (-picked log-probability), "one_hot"
      (-sum(onehot * log_softmax)), "logsumexp_one_hot" (lse - sum(onehot * x)).
    labels: "fill" (gather mode fill: out of range is NaN), "clip" (clamped), "promise"
      (clamped value, softmax-only gradient, as XLA runs promise_in_bounds), "one_hot".
    label_shape: "flat" (the label input holds exactly the batch's labels) or "kept" (it has a
      unit class axis at `axis` and may broadcast over the batch).
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


def match_cross_entropy(region, position, *, implementation=None, fused=False):
    """The loss whose last equation is at `position`; with `fused`, only matmul + loss."""
    eqn = region.eqns[position]
    if eqn.primitive is lax.sub_p:
        found = _logsumexp_form(region, eqn)
    else:
        found = _negated_form(region, eqn)
    if isinstance(found, str):
        if fused:
            return NoMatch("declined by the softmax_cross_entropy rule")
        return Match(root=position, eqns=frozenset({position}), inputs=tuple(eqn.invars),
                     outputs=tuple(eqn.outvars), replacement=_cross_entropy_replacement,
                     declined=found)
    if not found:
        return found
    form, x, axis, label_atom, labels, label_shape = found
    batch_shape = tuple(x.aval.shape[:axis] + x.aval.shape[axis + 1:])
    out = eqn.outvars[0]
    if tuple(out.aval.shape) != batch_shape:
        return NoMatch("the loss has shape {}, not the batch shape {}", out.aval.shape, batch_shape)
    if not jnp.issubdtype(label_atom.aval.dtype, jnp.integer):
        return NoMatch("labels of dtype {}", label_atom.aval.dtype)
    eqns = _between(region, x, position)
    plan = dict(form=form, labels=labels, label_shape=label_shape, axis=axis,
                batch_shape=batch_shape, vocab=int(x.aval.shape[axis]),
                out_dtype=jnp.dtype(out.aval.dtype).name, w_layout=None)
    matmul = _fused_matmul(region, x, axis, eqns)
    if fused:
        if matmul is None:
            return NoMatch("the logits are not a matmul used only by the loss")
        h, w, layout, h_axis, extra = matmul
        plan.update(w_layout=layout, x_axis=h_axis)
        return Match(root=position, eqns=frozenset(eqns | extra), inputs=(h, w, label_atom),
                     outputs=(out,), replacement=_cross_entropy_replacement,
                     params={"plan": CrossEntropyPlan(**plan),
                             "implementation": implementation})
    return Match(root=position, eqns=frozenset(eqns), inputs=(x, label_atom), outputs=(out,),
                 replacement=_cross_entropy_replacement,
                 params={"plan": CrossEntropyPlan(**plan), "implementation": implementation})


# ---------------------------------------------------------------------------------------------
# The two loss shapes: lse - picked, and -(picked log-probability)


def _logsumexp_form(region, eqn):
    a, b = eqn.invars
    lse = logsumexp(region, a)
    if not lse:
        return NoMatch("not logsumexp - picked logit: {}", lse.reason)
    x, axis = lse
    picked = _picked(region, b, x, axis)
    if picked:
        return ("logsumexp",) + picked
    onehot = _one_hot_sum(region, b, x, axis)
    if isinstance(onehot, str) or not onehot:
        return onehot if isinstance(onehot, str) else NoMatch(
            "logsumexp minus something else: {}; {}", picked.reason, onehot.reason)
    return ("logsumexp_one_hot",) + onehot


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
                x, axis = found
                hot = _one_hot(region, oh, x, axis)
                if isinstance(hot, str):
                    return hot
                if hot:
                    return ("one_hot",) + hot
        return NoMatch("not a sum of one-hot labels * log_softmax")
    for ls in _picked_sources(region, a):
        found = log_softmax(region, ls)
        if found:
            x, axis = found
            picked = _picked(region, a, ls, axis)
            if picked:
                return ("log_softmax", x, axis) + picked[2:]
    return NoMatch("not -log_softmax[label]")


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
    dn = g.params["dimension_numbers"]
    others = tuple(d for d in range(len(full)) if d != axis)
    idx = g.invars[1]
    if (tuple(dn.offset_dims) != () or tuple(dn.collapsed_slice_dims) != (axis,)
            or tuple(dn.start_index_map) != (axis,)
            or tuple(getattr(dn, "operand_batching_dims", ())) != others
            or tuple(getattr(dn, "start_indices_batching_dims", ())) != others
            or tuple(g.params["slice_sizes"]) != (1,) * len(full)
            or tuple(idx.aval.shape) != kept + (1,)):
        return NoMatch("a gather that is not take_along_axis on axis {}", axis)
    return x, axis, idx, _label_mode(g), "flat"


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
# logsumexp and log_softmax (shared helpers)


_KEEP = (lax.broadcast_in_dim_p, lax.reshape_p, lax.stop_gradient_p, lax.squeeze_p)


def _keep_root(region, var, full, axis):
    """Follow keepdims re-shapes (and stop_gradient) of a per-row value back to its root.

    Checks each step keeps the value constant along `axis` of `full`-shaped arrays. Returns the
    root atom or None.
    """
    reduced = full[:axis] + full[axis + 1:]
    kept = full[:axis] + (1,) + full[axis + 1:]
    shapes = (reduced, kept, full)
    if tuple(var.aval.shape) not in shapes:
        return None
    while isinstance(var, C.Var):
        eqn = region.producer_eqn(var)
        if eqn is None or eqn.primitive not in _KEEP:
            break
        src = eqn.invars[0]
        sshape, oshape = tuple(src.aval.shape), tuple(var.aval.shape)
        if sshape not in shapes:
            break
        if oshape == full and sshape != full and eqn.primitive is not lax.broadcast_in_dim_p:
            return None
        if eqn.primitive is lax.broadcast_in_dim_p:
            dims = tuple(int(d) for d in eqn.params["broadcast_dimensions"])
            want = (tuple(d for d in range(len(full)) if d != axis)
                    if len(sshape) == len(reduced) and len(sshape) != len(full)
                    else tuple(range(len(sshape))))
            if dims != want:
                return None
        elif eqn.primitive is lax.reshape_p and eqn.params.get("dimensions"):
            return None
        elif eqn.primitive is lax.squeeze_p and tuple(
                int(d) for d in eqn.params["dimensions"]) != (axis,):
            return None
        var = src
    if tuple(var.aval.shape) == full:
        return None
    return var


def _sum_exp(region, var, axis=None):
    """`var` = sum(exp(d), axis), maybe through abs and float casts (bf16 sums accumulate in
    float32): (d, axis) or NoMatch."""
    eqn = region.producer_eqn(var)
    while eqn is not None and eqn.primitive in (lax.abs_p, lax.convert_element_type_p):
        eqn = region.producer_eqn(eqn.invars[0])
    if eqn is None or eqn.primitive is not lax.reduce_sum_p:
        return NoMatch("not a sum")
    axes = tuple(int(d) for d in eqn.params["axes"])
    if len(axes) != 1 or (axis is not None and axes[0] != axis):
        return NoMatch("sums axes {}", axes)
    e = region.producer_eqn(eqn.invars[0])
    if e is not None and e.primitive is lax.convert_element_type_p:
        e = region.producer_eqn(e.invars[0])
    if e is None or e.primitive is not lax.exp_p:
        return NoMatch("not a sum of exp")
    return e.invars[0], axes[0]


def _shifted(region, d, axis):
    """`d` = x - m with m constant along `axis`: (x, root of m) or NoMatch."""
    eqn = region.producer_eqn(d)
    if eqn is None or eqn.primitive is not lax.sub_p:
        return NoMatch("not x - m")
    x, m = eqn.invars
    if not isinstance(x, C.Var) or tuple(x.aval.shape) != tuple(d.aval.shape):
        return NoMatch("not x - m")
    root = _keep_root(region, m, tuple(x.aval.shape), axis)
    if root is None:
        return NoMatch("the subtracted value varies along the class axis")
    return x, root


def logsumexp(region, var):
    """`var` = m + log(sum(exp(x - m), axis)) with the same row value m (reduced or kept axis):
    (x, axis) or NoMatch."""
    eqn = region.producer_eqn(var)
    if eqn is None or eqn.primitive is not lax.add_p:
        return NoMatch("not m + log(sum(exp(x - m)))")
    for m, lg in (eqn.invars, eqn.invars[::-1]):
        found = _log_sum_exp_of(region, lg)
        if not found:
            continue
        d, axis = found
        shifted = _shifted(region, d, axis)
        if not shifted:
            continue
        x, root = shifted
        full = tuple(x.aval.shape)
        if tuple(var.aval.shape) not in (full[:axis] + full[axis + 1:],
                                         full[:axis] + (1,) + full[axis + 1:]):
            continue
        if _keep_root(region, m, full, axis) is root:
            return x, axis
    return NoMatch("not m + log(sum(exp(x - m)))")


def log_softmax(region, var):
    """`var` = log_softmax(x, axis): (x, axis) or NoMatch.

    Spellings: (x - m) - log(sum(exp(x - m))) with the log before or after the keepdims
    broadcast (JAX's), and x - logsumexp(x, keepdims=True).
    """
    eqn = region.producer_eqn(var)
    if eqn is None or eqn.primitive is not lax.sub_p:
        return NoMatch("not a subtraction")
    a, b = eqn.invars
    if not isinstance(a, C.Var):
        return NoMatch("log_softmax of a literal")
    full = tuple(a.aval.shape)
    # (x - m) - log(sum(exp(x - m)))
    found = _log_sum_exp_of(region, b)
    if found and found[0] is a:
        shifted = _shifted(region, a, found[1])
        if shifted:
            return shifted[0], found[1]
    # x - logsumexp(x, keepdims=True)
    for axis in range(len(full)):
        root = _keep_root(region, b, full, axis)
        if root is not None and logsumexp(region, root) == (a, axis):
            return a, axis
    return NoMatch("not a log_softmax")


def _log_sum_exp_of(region, r):
    """`r` = log(sum(exp(d), axis)), possibly kept along the axis (the log before or after the
    keepdims re-shape): (d, axis) or None."""
    var = r
    while True:  # find the reduction's axis first
        eqn = region.producer_eqn(var)
        if eqn is None or eqn.primitive not in _KEEP + (lax.log_p, lax.abs_p,
                                                         lax.convert_element_type_p):
            break
        var = eqn.invars[0]
    if eqn is None or eqn.primitive is not lax.reduce_sum_p or len(eqn.params["axes"]) != 1:
        return None
    axis = int(eqn.params["axes"][0])
    full = tuple(eqn.invars[0].aval.shape)
    outer = _keep_root(region, r, full, axis)
    log = region.producer_eqn(outer) if outer is not None else None
    if log is None or log.primitive is not lax.log_p:
        return None
    inner = log.invars[0]
    for _ in range(2):  # |sum| (JAX's logsumexp) and casts before or after the keepdims
        e = region.producer_eqn(inner)
        while e is not None and e.primitive in (lax.abs_p, lax.convert_element_type_p):
            inner = e.invars[0]
            e = region.producer_eqn(inner)
        inner = _keep_root(region, inner, full, axis)
        if inner is None:
            return None
    return _sum_exp(region, inner, axis) or None


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
    impl = list(implementation) if isinstance(implementation, tuple) else implementation
    labels = args[-1]
    if plan.label_shape == "kept":
        labels = jnp.broadcast_to(jnp.squeeze(labels, plan.axis), plan.batch_shape)
    else:
        labels = labels.reshape(plan.batch_shape)
    labels = labels.astype(jnp.int32)
    vocab = plan.vocab
    if plan.w_layout is None:
        logits = jnp.moveaxis(args[0], plan.axis, -1)

        def loss_of(lab):
            return kernel("softmax_cross_entropy")(
                logits, lab, implementation=impl)

        def logit_at(lab):
            return jnp.take_along_axis(logits, lab[..., None], axis=-1)[..., 0]
    else:
        h, w = args[0], args[1]
        h = jnp.moveaxis(h, plan.x_axis, -1)

        def loss_of(lab):
            return kernel("linear_cross_entropy")(
                h, w, lab, w_layout=plan.w_layout, implementation=impl)

        def logit_at(lab):
            rows = jnp.take(w, lab, axis=0) if plan.w_layout == "vd" else jnp.moveaxis(
                jnp.take(w, lab, axis=1), 0, -1)
            return jnp.sum(h.astype(jnp.float32) * rows.astype(jnp.float32), axis=-1)

    valid = (labels >= 0) & (labels < vocab)
    safe = jnp.where(valid, labels, 0)
    if plan.labels == "clip":
        loss = loss_of(jnp.clip(labels, 0, vocab - 1))
    elif plan.labels == "promise":
        # XLA clamps the gather and drops the out-of-range update of its transpose: the clamped
        # label's loss, with the softmax alone as the gradient
        clamped = jnp.clip(labels, 0, vocab - 1)
        loss = loss_of(clamped)
        picked = logit_at(clamped)
        loss = loss + jnp.where(valid, 0, picked - lax.stop_gradient(picked)).astype(loss.dtype)
    elif plan.form == "logsumexp":
        # the kernel's own out-of-range behaviour is take_along_axis's: NaN, softmax gradient
        loss = loss_of(jnp.where(valid, labels, vocab))
    elif plan.form == "log_softmax":
        loss = jnp.where(valid, loss_of(safe), jnp.nan)
    elif plan.form == "one_hot":
        loss = jnp.where(valid, loss_of(safe), 0)
    else:  # logsumexp - sum(onehot * x): an all-zero row leaves logsumexp(x)
        loss = loss_of(safe)
        loss = loss + jnp.where(valid, 0, logit_at(safe)).astype(loss.dtype)
    return loss.astype(plan.out_dtype)
