"""The "xla" implementations of `dense_act` and `gated_dense`: the idiom as written, left to XLA
(a cuBLAS matmul on GPUs, with the bias and activation fused after it)."""
from __future__ import annotations

import functools

import jax


_XLA_ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_erf": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "identity": lambda z: z,
}


def dense_act_xla(x, w, b=None, *, activation: str):
    """The idiom as written, left to XLA (cuBLAS matmul, fused bias and activation)."""
    y = x @ w
    return _XLA_ACTIVATIONS[activation](y + b if b is not None else y)


def gated_dense_xla(x, w_gate, w_up, *, activation: str):
    """The idiom as written, left to XLA."""
    return _XLA_ACTIVATIONS[activation](x @ w_gate) * (x @ w_up)
