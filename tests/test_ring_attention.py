"""Ring attention's algorithm on one device: the ring is a named `vmap` axis (`ppermute` and
`axis_index` work on it as on a mesh axis), each of its `shards` members holding one block of the
sequence. Forward and backward against the float64 XLA implementation, with the Triton kernels
(GPU form, interpreted) and the Mosaic kernels (TPU form, in the TPU interpreter). On a mesh the
same functions run per device (tests/test_sharding.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import _target
from pallas_kernels.attention import mosaic_tpu
from pallas_kernels.attention.ring import ring_backward, ring_forward


def _blocks(x, shards):
    """(batch, seq, ...) -> (shards, batch, seq / shards, ...)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, shards, t // shards, *x.shape[2:]), 1, 0)


def _whole(x):
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])


# The TPU interpreter's effects do not pass a vmapped `cond` (the causal ring's skipped blocks):
# its causal blocks are checked on their own below; the ring logic is the same for both forms.
@pytest.mark.parametrize("platform,causal", [("gpu", True), ("gpu", False), ("tpu", False)],
                         ids=["gpu-causal", "gpu-full", "tpu-full"])
@pytest.mark.parametrize("shards,heads,kv_heads", [(4, 4, 2), (3, 2, 2)])
def test_ring_attention_matches_float64(platform, causal, shards, heads, kv_heads):
    rng = np.random.default_rng(shards + 10 * causal)
    t = 8 * shards
    q = rng.standard_normal((2, t, heads, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, t, kv_heads, 16)).astype(np.float32) for _ in range(2))
    do = rng.standard_normal(q.shape).astype(np.float32)
    kw = dict(causal=causal, mask=None, bias=None, scale=None)
    with _target.using(_target.KernelChoice.of("pallas", platform)):
        blocks = [_blocks(a, shards) for a in (q, k, v, do)]
        out, stats = jax.jit(jax.vmap(
            lambda q, k, v: ring_forward("ring", shards, q, k, v, **kw),
            axis_name="ring"))(*blocks[:3])
        # the backward with the statistics the forward kept, and running the forward again
        backward = jax.jit(jax.vmap(
            lambda saved, q, k, v, do: ring_backward("ring", shards, (do,), saved, q, k, v, **kw),
            axis_name="ring"))
        kept, again = backward(((out,), stats), *blocks), backward(None, *blocks)
    with jax.enable_x64(True):
        ref = lambda q, k, v: pk.attention(q, k, v, causal=causal, implementation="xla")
        want, vjp = jax.vjp(ref, *(a.astype(np.float64) for a in (q, k, v)))
        want_grads = vjp(do.astype(np.float64))
    np.testing.assert_allclose(_whole(out), want, rtol=1e-5, atol=1e-5)
    for grads in (kept, again):
        for name, got, w in zip("qkv", grads, want_grads):
            np.testing.assert_allclose(_whole(got), w, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_tpu_block_pair_with_the_global_statistics(causal):
    # One block pair of a ring: the forward's statistics, and the backward given the whole
    # sequence's statistics (here the pair is the whole sequence).
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 24, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 24, 2, 16)).astype(np.float32) for _ in range(2))
    do = rng.standard_normal(q.shape).astype(np.float32)
    scale = 16 ** -0.5
    with _target.using(_target.KernelChoice.of("pallas", "tpu")):
        out, m, l = jax.jit(lambda q, k, v: mosaic_tpu.block_forward(
            q, k, v, causal=causal, scale=scale))(q, k, v)
        grads = jax.jit(lambda *a: mosaic_tpu.block_backward(
            *a, causal=causal, scale=scale))(q, k, v, out, m, 1.0 / l, do)
    with jax.enable_x64(True):
        ref = lambda q, k, v: pk.attention(q, k, v, causal=causal, implementation="xla")
        args64 = [a.astype(np.float64) for a in (q, k, v)]
        want, vjp = jax.vjp(ref, *args64)
        logits = jnp.einsum("bqhd,bkhd->bhqk", args64[0], jnp.repeat(args64[1], 2, axis=2)) * scale
        if causal:
            logits = jnp.where(jnp.tril(jnp.ones((24, 24), bool)), logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=-1)
        want_grads = vjp(do.astype(np.float64))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m + np.log(l), lse, rtol=1e-5, atol=1e-5)  # natural base
    for name, got, w in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")
