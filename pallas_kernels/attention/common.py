"""Argument checks every attention implementation shares: shapes, dtypes, the 4-D mask and bias,
and a concrete scale."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _as_4d(x, name: str, target: tuple[int, int, int, int]):
    if x.ndim > 4:
        raise ValueError(f"attention: {name} has {x.ndim} dims; it must broadcast to "
                         f"(batch, heads, q_seq, kv_seq) = {target}")
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    for size, want, axis in zip(x.shape, target, ("batch", "heads", "q_seq", "kv_seq")):
        if size not in (1, want):
            raise ValueError(
                f"attention: {name} of shape {x.shape} does not broadcast to (batch, heads, "
                f"q_seq, kv_seq) = {target}: its {axis} axis is {size}, expected 1 or {want}")
    return x


def canonicalize(q, k, v, mask, bias, scale):
    """Check shapes and dtypes; mask and bias become 4-D, scale a Python float."""
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"attention: {name} must be (batch, seq, heads, head_dim), got shape {x.shape}; "
                "add a batch axis with x[None] for unbatched inputs")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"attention: {name} must be floating point, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}; cast them to one (e.g. the compute dtype)")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v shapes differ: {k.shape} vs {v.shape}")
    B, q_len, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} must agree on batch and head_dim")
    if k.shape[2] == 0 or H % k.shape[2] != 0:
        raise ValueError(f"attention: q heads ({H}) must be a multiple of k/v heads "
                         f"({k.shape[2]}) for grouped-query attention")
    target = (B, H, q_len, k.shape[1])
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"attention: mask must be boolean (True = keep), got {mask.dtype}; "
                            "pass additive masks as bias")
        mask = _as_4d(mask, "mask", target)
    if bias is not None:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"attention: bias must be floating point, got {bias.dtype}")
        bias = _as_4d(bias, "bias", target)
    if scale is None:
        scale = D ** -0.5 if D else 1.0  # without features every logit is 0 whatever the scale
    else:
        try:
            scale = float(scale)
        except (TypeError, jax.errors.ConcretizationTypeError) as e:
            raise TypeError("attention: scale must be a concrete number (it selects the kernel); "
                            "to use a traced scale, multiply q by it and pass scale=1.0") from e
    return q, k, v, mask, bias, scale
