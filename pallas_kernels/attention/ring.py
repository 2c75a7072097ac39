"""Ring attention: attention with the sequence split over mesh axes, run by the Pallas kernels
on local blocks (Liu et al., 2023).

Each device holds a block of queries and the key/value block of the same positions. Over
`shards` steps the key/value blocks travel around the ring (`ppermute` to the next device);
each device attends its queries to the block it holds and merges the result into a running
output with the blocks' row max and row sum (the flash-attention merge, in the base the kernels
keep them in: 2 for Triton, e for Mosaic). With `causal` the first step is the diagonal block
(masked causally), and a block from a later position (every block a device receives after it
has passed its own predecessors) is skipped. The forward keeps the rows' statistics; the
backward runs the ring again with them: the key/value blocks travel with their gradient
accumulators, each step adds the block pair's dK/dV (from the global statistics, so no second
merge is needed) and dQ stays local; one last step returns the accumulators to their owners. Nothing of size sequence x sequence, and no whole sequence, is
ever on one device.

The block kernels are the "pallas" implementation's for the target platform (triton.py or
mosaic_tpu.py). Used by `attention`'s sharding rule (sharding.py) when queries and keys are
split over the same mesh axes, with no mask or bias and (for `causal`) equal lengths; the
sequence order is the mesh axes' row-major order, as `PartitionSpec` lays it out.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention import mosaic_tpu, triton
from pallas_kernels.attention.common import canonicalize
from pallas_kernels._dispatch import target_platform

_F32 = jnp.float32


def _kernels():
    """(block forward, block backward, exponential of their statistics' base) for the target:
    the Triton kernels keep their statistics in base 2, the Mosaic ones in base e."""
    if target_platform() == "tpu":
        return mosaic_tpu.block_forward, mosaic_tpu.block_backward, jnp.exp
    return triton.block_forward, triton.block_backward, jnp.exp2


def _rows(stat):
    """(batch, heads, q) statistics broadcast against (batch, q, heads, head_dim)."""
    return jnp.swapaxes(stat, 1, 2)[..., None]


def _pass(axes, shards, *arrays):
    perm = [(j, (j + 1) % shards) for j in range(shards)]
    return tuple(lax.ppermute(a, axes, perm) for a in arrays)


def _later(axes, step):
    """Whether the block held at `step` (from device index - step, wrapped) follows this
    device's own: then a causal query block sees none of it."""
    return lax.axis_index(axes) < step


def _ring_statistics(axes, shards, q, k, v, causal, scale):
    block_forward, _, exp = _kernels()
    out, m, l = block_forward(q, k, v, causal=causal, scale=scale)
    out = out.astype(_F32)
    for step in range(1, shards):
        k, v = _pass(axes, shards, k, v)

        def attend(k=k, v=v):
            o, m_b, l_b = block_forward(q, k, v, causal=False, scale=scale)
            return o.astype(_F32), m_b, l_b

        def skip():
            return jnp.zeros_like(out), jnp.full_like(m, -jnp.inf), jnp.zeros_like(l)

        o, m_b, l_b = lax.cond(_later(axes, step), skip, attend) if causal else attend()
        top = jnp.maximum(m, m_b)
        a, b = l * exp(m - top), l_b * exp(m_b - top)
        l = a + b
        out = (out * _rows(a) + o * _rows(b)) / _rows(l)
        m = top
    return out, m, l


def ring_forward(axes, shards, q, k, v, *, causal, mask, bias, scale):
    """(output, (row max, row sum), kept for the backward)."""
    q, k, v, mask, bias, scale = canonicalize(q, k, v, mask, bias, scale)
    out, m, l = _ring_statistics(axes, shards, q, k, v, causal, scale)
    return out.astype(q.dtype), (m, l)


def ring_saves(q, k, v, *, causal, mask, bias, scale):
    """The row max and row sum ring_forward keeps: float32 (batch, heads, q)."""
    stat = jax.ShapeDtypeStruct((q.shape[0], q.shape[2], q.shape[1]), _F32)
    return stat, stat


def ring_backward(axes, shards, cotangents, saved, q, k, v, *, causal, mask, bias, scale):
    """`saved`: ((output,), (row max, row sum)) of ring_forward, or None to run the ring
    forward again."""
    (do,) = cotangents
    q, k, v, mask, bias, scale = canonicalize(q, k, v, mask, bias, scale)
    if saved is None:
        out, m, l = _ring_statistics(axes, shards, q, k, v, causal, scale)
    else:
        ((out,), (m, l)) = saved
    out, inv_l = out.astype(q.dtype), 1.0 / l
    block_backward = _kernels()[1]
    dq = jnp.zeros(q.shape, _F32)
    dk, dv = jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32)
    for step in range(shards):
        if step:
            k, v, dk, dv = _pass(axes, shards, k, v, dk, dv)

        def grads(k=k, v=v, diagonal=step == 0):
            return tuple(g.astype(_F32) for g in block_backward(
                q, k, v, out, m, inv_l, do, causal=causal and diagonal, scale=scale))

        def skip():
            return jnp.zeros_like(dq), jnp.zeros_like(dk), jnp.zeros_like(dv)

        g_q, g_k, g_v = (lax.cond(_later(axes, step), skip, grads) if causal and step
                         else grads())
        dq, dk, dv = dq + g_q, dk + g_k, dv + g_v
    dk, dv = _pass(axes, shards, dk, dv)  # each accumulator back to its block's owner
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
