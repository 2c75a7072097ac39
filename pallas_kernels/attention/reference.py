"""Plain jnp attention: the semantics every implementation follows, and the "xla" one."""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax


def _grouped(x, kv_heads: int, group: int):
    """(b, heads|1, q, k) -> (b, kv_heads|1, group|1, q, k), matching q's (kv_head, group) split."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], kv_heads, group, *x.shape[2:])


def attention_reference(q, k, v, *, causal=False, mask=None, bias=None, scale=None):
    """Plain jnp attention with the semantics of `attention` (mask and bias already 4-D).

    Logits and softmax in float32 (float64 for float64 inputs); rows without keys give zeros.
    """
    B, q_len, H, D = q.shape
    kv_len, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    acc = jnp.promote_types(q.dtype, jnp.float32)
    if group == 1:  # (b, h, q, k) throughout: XLA adds no layout copies for a unit group axis
        grouped = lambda x: x  # noqa: E731
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
    else:
        grouped = functools.partial(_grouped, kv_heads=Hkv, group=group)
        qg = q.reshape(B, q_len, Hkv, group, D)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=acc) * scale
    if bias is not None:
        s = s + grouped(bias).astype(acc)
    keep = None if mask is None else grouped(mask)
    if causal:
        rows = jnp.arange(q_len)[:, None]
        cols = jnp.arange(kv_len)[None, :]
        tri = cols <= rows + (kv_len - q_len)
        keep = tri if keep is None else keep & tri
    if keep is not None:
        s = jnp.where(keep, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True, initial=-jnp.inf))
    p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m))
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0.0, 1.0, l)
    out = jnp.einsum("bhqk,bkhd->bqhd" if group == 1 else "bhgqk,bkhd->bqhgd", p.astype(v.dtype),
                     v, preferred_element_type=acc)
    return out.reshape(B, q_len, H, D).astype(q.dtype)
