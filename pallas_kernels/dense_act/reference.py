"""The textbook dense_act and gated_dense in the inputs' own precision: the oracles for tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


_REFERENCE_ACTIVATIONS = {
    "gelu_tanh": lambda z: 0.5 * z * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (z + 0.044715 * z**3))),
    "gelu_erf": lambda z: 0.5 * z * (1 + jax.scipy.special.erf(z / jnp.sqrt(2.0))),
    "relu": lambda z: jnp.where(z > 0, z, 0),
    "silu": lambda z: z / (1 + jnp.exp(-z)),
    "identity": lambda z: z,
}


def dense_act_reference(x, w, b=None, *, activation: str):
    """The textbook formula in the inputs' own precision; the oracle for tests."""
    z = jnp.matmul(x, w, precision=lax.Precision.HIGHEST)
    return _REFERENCE_ACTIVATIONS[activation](z + b if b is not None else z)


def gated_dense_reference(x, w_gate, w_up, *, activation: str):
    """The textbook formula in the inputs' own precision; the oracle for tests."""
    gate = jnp.matmul(x, w_gate, precision=lax.Precision.HIGHEST)
    up = jnp.matmul(x, w_up, precision=lax.Precision.HIGHEST)
    return _REFERENCE_ACTIVATIONS[activation](gate) * up
