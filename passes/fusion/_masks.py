"""Masks and biases on attention logits: how they broadcast, which fills are masks, and what the
replacement must add so rows without keys give what the original gives.

Axis roles (see `attention.py`): `a<i>` shared by q, k and v, `t<j>` query-only, `s` keys. A role
may be compound, a tuple of roles, where the program merged axes with a reshape (grouped-query
logits reshaped to one head axis around the softmax).

Fills. A `where(m, logits, fill)` is a mask only if the softmax of the filled logits is the
kernel's masked softmax for every row, judged at the softmax input (after any later scaling):
- `-inf`: masked keys weigh exactly zero; a row with no key left is NaN in the original.
- a finite fill at most `MASK_FILL_THRESHOLD`: masked keys weigh exp(fill - row max), zero for
  logits above `MASK_FILL_THRESHOLD + 100` (the numerics policy's assumption about logits); a row
  with no key left is the uniform average of v over the keys the `where` filled.
- two different fills (or a fill of -inf next to a finite one) give rows with no key left a
  mixture the kernel cannot reproduce: declined unless no row can be left without keys.
An additive bias (a padding mask spelled `where(m, 0, finfo.min)` included) goes to the kernel as
its `bias`, which computes s + bias exactly as the original does. The kernel gives zeros for a row
whose every key is masked or -inf, so `guard_rows` in the replacement reproduces the original's
NaN (values and gradients in the same places) or uniform average for those rows.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from passes import _compat as C
from passes.fusion._shared import constant_value
from passes.pattern import literal_value

# A `where` fill counts as masking when it is -inf or at most this at the softmax input:
# exp(fill - row max) is then zero for any logits above MASK_FILL_THRESHOLD + 100.
MASK_FILL_THRESHOLD = -1e4

# The Pallas kernel works in base 2 and multiplies the bias by log2(e); a bias below this would
# overflow to -inf there. Such values absorb every realistic logit (s + bias == bias), so they are
# raised to it, with the gradient kept (straight through).
LOWEST_KERNEL_BIAS = float(np.float32(np.finfo(np.float32).min / math.log2(math.e) * (1 - 1e-6)))


class Decline(Exception):
    """Raised inside the matcher once the idiom is certain but cannot be rewritten."""


# ---------------------------------------------------------------------------------------------
# Roles


def role_size(role, sizes) -> int:
    if isinstance(role, tuple):
        return math.prod(sizes[r] for r in role)
    return sizes.get(role, -1)


def expand_compound(x, roles, sizes):
    """(x, roles) with every compound-role axis split into one axis per role (a unit axis stays
    one unit axis, role None). Works on numpy and jax arrays."""
    shape, new_roles = [], []
    for n, r in zip(x.shape, roles):
        if isinstance(r, tuple) and n != 1:
            shape.extend(sizes[p] for p in r)
            new_roles.extend(r)
        else:
            shape.append(n)
            new_roles.append(None if isinstance(r, tuple) else r)
    return x.reshape(shape), tuple(new_roles)


def reshape_roles(roles, out_shape, sizes):
    """Roles of a reshape's output axes from its input's roles (None where a reshape does not
    just merge or split whole roles). Unit-size roles join the group before them."""
    atoms = [p for r in roles for p in (r if isinstance(r, tuple) else (r,)) if p is not None]
    out, i = [], 0
    for n in out_shape:
        group, prod = [], 1
        while i < len(atoms) and prod < n:
            group.append(atoms[i])
            prod *= sizes[atoms[i]]
            i += 1
        while n != 1 and i < len(atoms) and sizes[atoms[i]] == 1:
            group.append(atoms[i])
            i += 1
        if prod != n:
            return None
        out.append(None if not group else group[0] if len(group) == 1 else tuple(group))
    if i != len(atoms):
        return None
    return out


# ---------------------------------------------------------------------------------------------
# Broadcasts


def _is_float(atom) -> bool:
    return jnp.issubdtype(atom.aval.dtype, jnp.floating)


def trace_broadcast(region, atom, roles, sizes, peel_casts=False):
    """Follow `atom` (an operand of an op whose result axes carry `roles`) back through
    broadcasts, unit-axis reshapes and transposes (and exact widening casts with `peel_casts`).

    Returns (base atom, role of each base axis); None marks a unit axis that broadcasts.
    """
    shape = tuple(atom.aval.shape)
    if len(shape) == 0:
        return atom, ()
    if len(shape) != len(roles):
        raise Decline(f"an operand of rank {len(shape)} on rank-{len(roles)} logits")
    cur = []
    for n, r in zip(shape, roles):
        if n == role_size(r, sizes):
            cur.append(r)
        elif n == 1:
            cur.append(None)
        else:
            raise Decline(f"an operand of shape {shape} does not broadcast to the logits")
    while isinstance(atom, C.Var):
        eqn = region.producer_eqn(atom)
        if eqn is None or not eqn.invars:  # an input, or an iota
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



class Masks:
    """The `where` masks of a match: causal detection, declines, the kernel's mask inputs."""

    def __init__(self, region, state, sizes):
        self.region, self.state, self.sizes = region, state, sizes
        self.terms = []  # (atom, roles, invert) handed to the kernel as `mask`
        self.rows_may_be_empty = False

    def analyse(self, query, t_roles):
        """(causal, query role). Fills `terms`; raises Decline for masks the kernel refuses."""
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
            all_kept, found, rows_empty = self._constant_verdict(constant, t_roles)
            if not all_kept:
                if found is not None:
                    causal, query = True, found
                else:
                    data.extend((a, r, inv) for a, r, inv, _ in constant)
                    if rows_empty:
                        self.rows_may_be_empty = True
        if data:
            self.rows_may_be_empty = True
        self.terms = data
        return causal, query

    def _constant_verdict(self, constant, t_roles):
        """(keeps every key, causal query role or None, may leave a row without keys) for the
        constant mask factors; a sliding window is declined. Cached on the region: after CSE
        every layer's mask is the same variables, so a deep model judges it once."""
        if not all(isinstance(a, C.Var) for a, _, _, _ in constant):  # literals do not hash
            return self._judge_constant(constant, t_roles)
        key = (tuple((a, r, inv) for a, r, inv, _ in constant), frozenset(self.sizes.items()),
               tuple(t_roles))
        memo = self.region.cache.setdefault("constant_mask_verdict", {})
        if key not in memo:
            try:
                memo[key] = self._judge_constant(constant, t_roles)
            except Decline as e:
                memo[key] = str(e)
        verdict = memo[key]
        if isinstance(verdict, str):
            raise Decline(verdict)
        return verdict

    def _judge_constant(self, constant, t_roles):
        combined = self._role_space([(r, ~v if inv else v) for _, r, inv, v in constant])
        if combined.all():
            return True, None, False
        found = self._causal_role(combined)
        if found is not None:
            return False, found, False
        self._check_window(combined, t_roles)
        return False, None, not combined.any(axis=-1).all()

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
            value, roles = expand_compound(np.asarray(value, dtype=bool), roles, self.sizes)
            out = out & _to_role_space(value, roles, order)
        return out

    def _causal_role(self, combined):
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
                raise Decline(f"a sliding-window mask (keys {lo:+d}..{hi:+d} around the "
                               f"diagonal); the kernel has no sliding window")

    def _check_data_mask(self, atom):
        eqn = self.region.producer_eqn(atom)
        if eqn is None or eqn.primitive not in (lax.eq_p, lax.ne_p):
            return
        a, b = eqn.invars
        if all(isinstance(x, C.Var) and jnp.issubdtype(x.aval.dtype, jnp.integer)
               and constant_value(self.region, x) is None for x in (a, b)):
            raise Decline("a segment-id mask (equality of two integer arrays); the kernel "
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
        if eqn.primitive is lax.ne_p and literal_value(region, eqn.invars[1]) == 0:
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
# What a row without keys gives


def rows_without_keys(fills, rows_may_be_empty: bool) -> str:
    """What the original gives for a row whose keys are all masked: "nan" (only -inf fills, or
    no `where` at all) or "uniform" (one finite fill). Raises Decline for fills that are not
    masks at the softmax input, and for mixed fills where such rows can occur.

    `fills`: the value each `where` fill has at the softmax input, after later scaling and casts.
    """
    for fill in fills:
        if not (fill == -math.inf or fill <= MASK_FILL_THRESHOLD):
            raise Decline(f"a `where` on the logits fills {fill:g} at the softmax input (after "
                          f"any later scaling), which is not a mask value (-inf or at most "
                          f"{MASK_FILL_THRESHOLD:g})")
    distinct = set(fills)
    if len(distinct) > 1 and rows_may_be_empty:
        raise Decline(f"masks with different fill values ({', '.join(sorted(map(str, distinct)))})"
                      f": a row whose keys are all masked averages v over the keys of the largest "
                      f"fill, which the kernel cannot reproduce")
    return "uniform" if distinct and distinct != {-math.inf} else "nan"


def may_be_minus_inf(region, atom) -> bool:
    """Whether a bias may hold -inf (a data bias may; a constant one is checked)."""
    value = constant_value(region, atom)
    return value is None or bool(np.any(np.isneginf(np.asarray(value, np.float64))))


# ---------------------------------------------------------------------------------------------
# The replacement's side: a bias the kernel can take, and rows without keys


def kernel_safe_bias(bias):
    """Raise biases below LOWEST_KERNEL_BIAS (finfo.min paddings) to it; -inf stays -inf and the
    gradient passes straight through."""
    low = jnp.asarray(LOWEST_KERNEL_BIAS, bias.dtype)
    raised = bias + lax.stop_gradient(low - bias)
    return jnp.where((bias < low) & (bias > -jnp.inf), raised, bias)


@jax.custom_vjp
def _nan_gradient_where(x, bad):
    """x, whose gradient is NaN where `bad` (as the original's is through a NaN softmax row)."""
    return x


def _nan_gradient_fwd(x, bad):
    return x, bad


def _nan_gradient_bwd(bad, ct):
    return jnp.where(bad, jnp.asarray(jnp.nan, ct.dtype), ct), None


_nan_gradient_where.defvjp(_nan_gradient_fwd, _nan_gradient_bwd)


def _per_kv_head(x, kv_heads):
    """(B, H, ...) -> (B, kv_heads, ...): any over each kv head's group of query heads."""
    b, h = x.shape[:2]
    return jnp.any(x.reshape(b, kv_heads, h // kv_heads, *x.shape[2:]), axis=2)


def _reduce_to(x, shape):
    """Boolean `x` reduced with `any` over the axes where `shape` is 1."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return jnp.any(x, axis=axes, keepdims=True) if axes else x


def guard_rows(attend, q, k, v, keep, bias, kind, scale, empty=None):
    """`attend(q, k, v, bias)` (the kernel, which gives zeros for rows without keys) with the
    original's result for those rows: NaN ("nan"), or the average of v over the keys the `where`
    filled ("uniform"; NaN where it filled none), gradients included.

    q (B, T, H, D), k and v (B, S, Hkv, D); keep: the `where` masks and the causal triangle,
    (b|1, h|1, t|1, S) bool or None; bias: (b|1, h|1, t|1, S) or None; scale: the logits'.
    empty: the rows `keep` leaves without keys when known while tracing ((1, 1, T|1) numpy;
    None: from `keep` at run time).
    """
    B, T, H, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    alive = keep if bias is None else (bias != -jnp.inf) if keep is None else keep & (bias != -jnp.inf)
    # Rows the masks and bias leave without keys. Known while tracing (no bias, no data mask),
    # such rows keep no key by definition, so no device waits on a predicate about them.
    some_kept = None  # whether a row without live keys keeps some key: None, decided at run time
    if bias is None and empty is not None:
        some_kept = False
    else:
        empty = jnp.zeros((1, 1, 1), bool) if alive is None else ~jnp.any(alive, axis=-1)
    known_dead = jnp.broadcast_to(empty, (B, H, T))
    # Infinite q or k can make logits -inf at every kept key: only then are the logits formed,
    # and (one predicate for both) the filled-key average of such rows.
    infinite = ~(jnp.all(jnp.isfinite(q)) & jnp.all(jnp.isfinite(k)))
    by_logits = functools.partial(_dead_by_logits, alive=alive, bias=bias, scale=scale)
    if kind == "uniform":
        def formed(q, k, v):
            rows = by_logits(q, k)
            return rows, _filled_average(v, keep, rows, H, some_kept=True)

        def known(q, k, v):
            return known_dead, _filled_average(v, keep, known_dead, H, some_kept=some_kept)

        # the unguarded v: its gradient is NaN wherever the guarded one's is (NaN + x)
        dead, filled = lax.cond(infinite, formed, known, q, k, v)
    else:
        dead = lax.cond(infinite, by_logits, lambda q, k: known_dead, q, k)
    unfilled = jnp.ones((1, 1, 1), bool) if keep is None else jnp.all(keep, axis=-1)
    nan_rows = dead if kind == "nan" else dead & unfilled
    # The softmax backward of a NaN row is NaN at every key the `where`s let through.
    nan_logits = nan_rows[..., None] if keep is None else nan_rows[..., None] & keep
    bad_q = jnp.any(nan_logits, axis=-1).transpose(0, 2, 1)[..., None]
    bad_k = _per_kv_head(jnp.broadcast_to(jnp.any(nan_logits, axis=2), (B, H, S)), Hkv)
    bad_v = _per_kv_head(jnp.any(nan_rows, axis=2), Hkv)
    q = _nan_gradient_where(q, bad_q)
    k = _nan_gradient_where(k, bad_k.transpose(0, 2, 1)[..., None])
    v = _nan_gradient_where(v, bad_v[:, None, :, None])
    if bias is not None:
        bias = _nan_gradient_where(bias, _reduce_to(nan_logits, bias.shape))
    out = attend(q, k, v, bias)
    rows = lambda x: x.transpose(0, 2, 1)[..., None]  # (B, H, T) -> (B, T, H, 1)
    if kind == "uniform":
        out = jnp.where(rows(dead), filled, out)
    return jnp.where(rows(nan_rows), jnp.asarray(jnp.nan, out.dtype), out)


def _dead_by_logits(q, k, *, alive, bias, scale):
    """(B, H, T): rows whose logits are -inf at every key they keep."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.reshape(B, T, Hkv, H // Hkv, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=acc) * scale
    s = s.reshape(B, H, T, -1)
    if bias is not None:
        s = s + bias.astype(acc)
    live = s != -jnp.inf  # NaN stays live: the kernel propagates it as the original does
    if alive is not None:
        live = live & alive
    return ~jnp.any(live, axis=-1)


def _filled_average(v, keep, dead, heads, some_kept=None):
    """(B, T, H, D): the average of v over the keys the `where`s filled, for dead rows.

    `some_kept`: whether a dead row keeps some key (then the average runs over the filled keys,
    else over all of them); None: decided at run time."""
    acc = jnp.promote_types(v.dtype, jnp.float32)
    group = heads // v.shape[2]
    shape = dead.shape[:1] + dead.shape[2:] + (heads, v.shape[3])
    everything = jnp.repeat(jnp.mean(v.astype(acc), axis=1), group, axis=1)[:, None]
    if keep is None or some_kept is False:  # no `where`, or every dead row keeps no key
        return jnp.broadcast_to(everything, shape).astype(v.dtype)

    def over_filled_keys(v):  # logits or bias -inf on every kept key: average the filled ones
        # `keep` as it is, (b|1, h|1, t|1, S): einsum drops its unit axes, so a causal triangle
        # is one (T, S) matrix, not one per batch row and head (whose buffer would count in the
        # step's memory even when no row is dead)
        filled = (~keep).astype(acc)
        va = v.astype(acc)
        if keep.shape[1] == 1:  # the same keys for every head: per kv head, then repeated
            total = jnp.repeat(jnp.einsum("bxts,bskd->btkd", filled, va), group, axis=2)
        else:
            grouped = filled.reshape(filled.shape[0], v.shape[2], group, *filled.shape[2:])
            total = jnp.einsum("bkgts,bskd->btkgd", grouped, va)
            total = total.reshape(*total.shape[:2], heads, v.shape[3])
        count = jnp.sum(filled, axis=-1).transpose(0, 2, 1)[..., None]
        # rows with no filled key are NaN rows, set apart
        return jnp.broadcast_to(total / jnp.maximum(count, 1.0), shape)

    if some_kept:
        return over_filled_keys(v).astype(v.dtype)
    result = lax.cond(jnp.any(dead & jnp.any(keep, axis=-1)), over_filled_keys,
                      lambda v: jnp.broadcast_to(everything, shape), v)
    return result.astype(v.dtype)
