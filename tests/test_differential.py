"""Differential tests: random programs, `optimize(f)` against `f`, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st
from jax import lax

import passes
from passes.testing import assert_equivalent

D = 6  # feature size of every value in the random programs


def _norm(x):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    return (x - mu) / jnp.sqrt(jnp.var(x, axis=-1, keepdims=True) + 1e-5)


UNARY = {
    "sin": jnp.sin, "tanh": jnp.tanh, "neg": lambda x: -x, "mul1": lambda x: x * 1.0,
    "add0": lambda x: x + 0.0, "exp": lambda x: jnp.exp(jnp.clip(x, -3, 3)),
    "softmax": lambda x: jax.nn.softmax(x, axis=-1), "norm": _norm,
    "gelu": jax.nn.gelu, "silu": jax.nn.silu, "relu": jax.nn.relu,
    "mean": lambda x: x - jnp.mean(x, axis=-1, keepdims=True),
    "bf16": lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
    "sqrt_scale": lambda x: x / jnp.sqrt(8.0),
    "jit": jax.jit(lambda x: jnp.cos(x) * 2),
    "remat": jax.checkpoint(lambda x: jnp.sin(x) * x),
    "scan": lambda x: lax.scan(lambda c, r: (c + r, jnp.tanh(r + c)), jnp.zeros(D), x)[1],
    "cond": lambda x: lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x),
    "dense": None,  # uses the weight; see _apply
}
BINARY = {"add": jnp.add, "mul": jnp.multiply, "sub": jnp.subtract, "max": jnp.maximum}


def _apply(op, x, w, b):
    if op == "dense":
        return jnp.tanh(x @ w + b)
    return UNARY[op](x)


program = st.lists(
    st.one_of(st.tuples(st.just("u"), st.sampled_from(sorted(UNARY))),
              st.tuples(st.just("b"), st.sampled_from(sorted(BINARY)), st.integers(0, 7))),
    min_size=1, max_size=8)


def build(ops):
    def f(x, w, b):
        values = [x]
        for op in ops:
            if op[0] == "u":
                values.append(_apply(op[1], values[-1], w, b))
            else:
                other = values[op[2] % len(values)]
                values.append(BINARY[op[1]](values[-1], other))
        return jnp.sum(values[-1] ** 2) + jnp.sum(values[len(values) // 2])
    return f


@settings(max_examples=20, deadline=None)
@given(program, st.integers(0, 2**31 - 1))
def test_random_programs(ops, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((3, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D, D)) / np.sqrt(D), jnp.float32)
    b = jnp.asarray(rng.standard_normal(D), jnp.float32)
    f = build(ops)
    assert_equivalent(f, passes.optimize(f), x, w, b)
    assert_equivalent(f, jax.jit(passes.optimize(f)), x, w, b, grads=False)
