"""`dense_act`: matmul (+ bias) + activation, and the gated forms, -> `pallas_kernels`.

The matmul is a `dot_general` contracting x's last axis with the first axis of a 2-D weight
(x may have leading batch axes): `x @ w`, `jnp.einsum("...d,df->...f")`, Flax `nnx.Linear` and
`linen.Dense`. The bias is any vector broadcast along the last axis. Activations are given by
example, so each spelling below is a plain function; a match is re-checked against the example
traced at the program's shapes and dtypes. A matmul with only a bias, or a bare matmul, is left
to XLA (cuBLAS fuses the bias itself; a rewrite would save nothing).

Declined, with the reason in the report (`_shared.precision_problem` at the operands' dtype): a
`dot_general` with a `precision` other than the default, a `preferred_element_type` or result
dtype other than its operands', mixed operand dtypes, and float64.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from passes.fusion._shared import described, kernel_choice, precision_problem
from passes.pattern import (Alt, Capture, Example, PatternRule, Prim, RowVector, Wildcard,
                            is_floating, row_values)
from passes.pipeline import RulePass
from passes.rewrite import NoMatch

# Spellings per activation; each traced on a small example and matched at any shape and dtype.
ACTIVATION_SPELLINGS = {
    "gelu_tanh": (
        lambda h: jax.nn.gelu(h, approximate=True),
        lambda h: 0.5 * h * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (h + 0.044715 * h ** 3))),
        lambda h: h * 0.5 * (1.0 + jnp.tanh(0.7978845608 * (h + 0.044715 * h * h * h))),
    ),
    "gelu_erf": (
        lambda h: jax.nn.gelu(h, approximate=False),
        lambda h: 0.5 * h * (1 + jax.lax.erf(h / jnp.sqrt(2.0))),
        lambda h: h * 0.5 * (1.0 + jax.scipy.special.erf(h * 0.7071067811865476)),
    ),
    "relu": (
        lambda h: jax.nn.relu(h),
        lambda h: jnp.maximum(h, 0.0),
    ),
    "silu": (
        lambda h: jax.nn.silu(h),
        lambda h: h * jax.nn.sigmoid(h),
        lambda h: h / (1 + jnp.exp(-h)),
    ),
}
_EXAMPLE = jax.ShapeDtypeStruct((2, 8), jnp.float32)


def _contracts_last_with_first(dimension_numbers, eqn):
    (lc, rc), (lb, rb) = dimension_numbers
    x_last = len(eqn.invars[0].aval.shape) - 1
    if (tuple(lc), tuple(rc), tuple(lb), tuple(rb)) == ((x_last,), (0,), (), ()):
        return True
    return (f"{dimension_numbers} is not x's last axis ({x_last}) against the weight's first "
            f"without batch axes")


def matmul(x: str, w: str, name: str):
    """`x @ w`: x (..., d_in) floating, w (d_in, d_out); captures the product as `name`."""
    return Prim(lax.dot_general_p, Wildcard(x, dtype=is_floating), Wildcard(w, rank=2), name=name,
                params={"dimension_numbers": _contracts_last_with_first})


def activation(h):
    """Every activation spelling applied to the value matched by `h` (captured as "h"); the
    matched kind is captured too (see `_kind`)."""
    alternatives = []
    for kind, spellings in ACTIVATION_SPELLINGS.items():
        seen = set()
        for fn in spellings:
            example = Example(fn, _EXAMPLE, h=h)
            key = str(example.jaxpr)
            if key not in seen:  # spellings that trace alike need one pattern
                seen.add(key)
                alternatives.append(Capture(f"activation={kind}", example))
    return Alt(*alternatives)


def _kind(b) -> str:
    return next(k for k in ACTIVATION_SPELLINGS if f"activation={k}" in b)


def _check_dense(b):
    dot = b["dot"]
    if tuple(b.root.aval.shape) != tuple(dot.aval.shape):
        return NoMatch("the result {} is broadcast beyond the matmul's {}", b.root.aval.shape,
                       dot.aval.shape)
    bias = b.get("b")
    if bias is not None and bias.aval.shape[-1] not in (1, dot.aval.shape[-1]):
        return NoMatch("the bias has {} entries for {} outputs", bias.aval.shape[-1],
                       dot.aval.shape[-1])
    return precision_problem(b.producer(dot), operand_dtype=True)


def _check_gated(b):
    gate, up = b["gate"], b["up"]
    if b["w_gate"].aval.shape != b["w_up"].aval.shape:
        return NoMatch("gate and up weights differ in shape: {} vs {}", b["w_gate"].aval.shape,
                       b["w_up"].aval.shape)
    if tuple(b.root.aval.shape) != tuple(gate.aval.shape):
        return NoMatch("the result {} is broadcast beyond the matmul's {}", b.root.aval.shape,
                       gate.aval.shape)
    return (precision_problem(b.producer(gate), operand_dtype=True)
            or precision_problem(b.producer(up), operand_dtype=True))


def dense_act_replacement(x, w, b=None, *, activation, out_dtype, implementation):
    import pallas_kernels
    y = pallas_kernels.dense_act(x, w, row_values(b, w.shape[1]), activation=activation,
                                 implementation=implementation)
    return y.astype(out_dtype)


def gated_dense_replacement(x, w_gate, w_up, *, activation, out_dtype, implementation):
    import pallas_kernels
    y = pallas_kernels.gated_dense(x, w_gate, w_up, activation=activation,
                                   implementation=implementation)
    return y.astype(out_dtype)


def dense_act_pass(implementation=None, platform=None) -> RulePass:
    """The `dense_act` pass: act(x @ w [+ b]) -> `pallas_kernels.dense_act`, and
    act(x @ w_gate) * (x @ w_up) -> `pallas_kernels.gated_dense`, with the `KernelChoice` of
    `implementation` and `platform`."""
    impl = kernel_choice(implementation, platform)
    dense = matmul("x", "w", "dot")
    dense = Alt(Prim(lax.add_p, dense, RowVector("b"), commutative=True), dense)
    gated = Prim(lax.mul_p, activation(matmul("x", "w_gate", "gate")), matmul("x", "w_up", "up"),
                 commutative=True)

    def params(b):
        return {"activation": _kind(b), "implementation": impl,
                "out_dtype": np.dtype(b.root.aval.dtype).name}

    rules = [
        # Above the plain rule: act(x @ w_gate) alone would match it first.
        PatternRule("gated_dense", gated, gated_dense_replacement,
                    inputs=("x", "w_gate", "w_up"), check=_check_gated, params=params,
                    priority=1),
        PatternRule("dense_act", activation(dense), dense_act_replacement,
                    inputs=("x", "w", "b"), check=_check_dense, params=params),
    ]
    return described(RulePass("dense_act", rules),
                     "act(x @ w [+ b]) for gelu (tanh or erf), relu or silu -> "
                     "pallas_kernels.dense_act; act(x @ w_gate) * (x @ w_up) -> gated_dense")
