"""Random programs for differential testing: a chain of steps drawn from the idioms the fusion
passes rewrite (attention with masks, norms, dense + activation, gated dense, cross-entropy) and
the edges the engine must survive (integer and bitwise constants, overflowing casts, complex
values, stateful random draws, control flow, NaN/inf inputs, fully masked rows, zero-size
arrays).

`Program(seed)` draws one program; `program.fn(*program.args)` returns a float32 array.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

D = 16  # feature size
F32 = jnp.float32


def _layer_norm(x, p):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + 1e-5) * p["g"] + p["b"]


def _layer_norm_fast_var(x, p):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(x * x, axis=-1, keepdims=True) - mu * mu
    return (x - mu) / jnp.sqrt(var + 1e-6) * p["g"]


def _rms_norm(x, p):
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * p["g"]


_ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "silu": jax.nn.silu,
                "none": lambda h: h, "gelu_erf": lambda h: jax.nn.gelu(h, approximate=False)}


def _dense(act):
    return lambda x, p: _ACTIVATIONS[act](x @ p["w"] + p["b"])


def _gated(x, p):
    return jax.nn.silu(x @ p["w"]) * (x @ p["w2"])


def _logits(x, p):
    q, k = x @ p["w"], x @ p["w2"]
    return jnp.einsum("...qd,...kd->...qk", q, k) / jnp.sqrt(float(D))


def _attention(mask_kind):
    def step(x, p):
        s = _logits(x, p)
        t = s.shape[-1]
        if mask_kind == "causal_inf":
            s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
        elif mask_kind == "causal_min":
            s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(F32).min)
        elif mask_kind == "padding":  # may mask every key of a row
            s = jnp.where(p["mask"], s, -1e9)
        elif mask_kind == "padding_inf":
            s = s + jnp.where(p["mask"], 0.0, -jnp.inf)
        elif mask_kind == "bias":
            s = s + p["bias"]
        return jax.nn.softmax(s, axis=-1) @ (x @ p["w"])
    return step


def _cross_entropy(kind):
    def step(x, p):
        if kind == "optax":
            loss = optax.softmax_cross_entropy_with_integer_labels(x, p["labels"])
        else:
            logp = jax.nn.log_softmax(x, axis=-1)
            loss = -jnp.take_along_axis(logp, p["labels"][..., None], axis=-1)[..., 0]
        return x + loss[..., None]
    return step


def _integer_constants(rng):
    a, b, c = (int(v) for v in rng.integers(-2**31, 2**31 - 1, 3))
    kind = rng.integers(4)

    def step(x, p):
        if kind == 0:
            i = (jnp.int32(a) & jnp.int32(b)) ^ lax.bitwise_not(jnp.int32(c))
        elif kind == 1:
            i = lax.shift_right_logical(jnp.uint32(abs(a)), jnp.uint32(3)) + ~jnp.uint8(b % 256)
        elif kind == 2:  # float -> int casts saturate in XLA
            i = lax.convert_element_type(jnp.float32(float(a) * 1e3) + 1.0, jnp.int32)
        else:  # integer overflow wraps
            i = jnp.int32(a) + jnp.int32(2**31 - 1) * jnp.int32(3)
        return x + (i % 7).astype(F32)
    return step


def _complex(x, p):
    z = jnp.exp(1j * x) * (0.5 - 2j)
    return jnp.real(z) + jnp.imag(z * jnp.conj(z))


def _stateful_draws(x, p):
    """Two draws from the hidden generator state: equal only if a pass wrongly merged them."""
    a, b = lax.rng_uniform(0.0, 1.0, (8,)), lax.rng_uniform(0.0, 1.0, (8,))
    return x + jnp.any(a != b).astype(x.dtype)


def _scan(x, p):
    def body(c, row):
        c = jnp.tanh(c + row)
        return c, c * 2
    return lax.scan(body, jnp.zeros(x.shape[-1], x.dtype), x.reshape(-1, x.shape[-1]))[1].reshape(x.shape)


def _cond(x, p):
    return lax.cond(jnp.sum(x) > 0, lambda v: _layer_norm(v, p), jnp.sin, x)


STEPS = {
    "sin": lambda x, p: jnp.sin(x), "tanh": lambda x, p: jnp.tanh(x),
    "exp": lambda x, p: jnp.exp(jnp.clip(x, -4, 4)), "neg_add0": lambda x, p: -(x + 0.0),
    "sqrt_scale": lambda x, p: x / jnp.sqrt(8.0),
    "softmax": lambda x, p: jax.nn.softmax(x, axis=-1),
    "layer_norm": _layer_norm, "layer_norm_fast": _layer_norm_fast_var, "rms_norm": _rms_norm,
    **{f"dense_{a}": _dense(a) for a in _ACTIVATIONS}, "gated": _gated,
    **{f"attention_{m}": _attention(m) for m in
       ("none", "causal_inf", "causal_min", "padding", "padding_inf", "bias")},
    "ce_optax": _cross_entropy("optax"), "ce_gather": _cross_entropy("gather"),
    "complex": _complex, "rng": _stateful_draws, "scan": _scan, "cond": _cond,
    "jit": jax.jit(lambda x, p: jnp.cos(x) * 2),
    "remat": jax.checkpoint(lambda x, p: jnp.sin(x) * x),
}
BINARY = {"add": jnp.add, "mul": jnp.multiply, "sub": jnp.subtract, "max": jnp.maximum}
FUSED_STEPS = {"attention": [s for s in STEPS if s.startswith("attention")],
               "layer_norm": ["layer_norm", "layer_norm_fast"], "rms_norm": ["rms_norm"],
               "dense_act": [s for s in STEPS if s.startswith("dense") or s == "gated"],
               "softmax_cross_entropy": ["ce_optax", "ce_gather"]}


class Program:
    """One random program and its arguments, drawn from `seed`."""

    def __init__(self, seed: int, max_steps: int = 6, include: str | None = None):
        """`include`: a step name the program must contain (at a random place, on non-empty
        inputs), so that a run can be sure to exercise a given pass."""
        rng = np.random.default_rng(seed)
        self.seed = seed
        names = sorted(STEPS)
        self.steps = []
        for _ in range(int(rng.integers(1, max_steps + 1))):
            if rng.random() < 0.2:
                self.steps.append(("binary", str(rng.choice(sorted(BINARY))), int(rng.integers(8))))
            elif rng.random() < 0.1:
                self.steps.append(("step", "integer", _integer_constants(rng)))
            else:
                name = str(rng.choice(names))
                self.steps.append(("step", name, STEPS[name]))
        if include is not None:
            at = int(rng.integers(len(self.steps) + 1))
            self.steps.insert(at, ("step", include, STEPS[include]))
        batch = () if rng.random() < 0.5 else (2,)
        t = int(rng.choice([1, 4, 8]))
        if include is None and rng.random() < 0.03:
            t = 0  # zero-size now and then
        self.args = (self._x(rng, batch + (t, D)), self._params(rng, batch, t))

    def _x(self, rng, shape):
        x = rng.standard_normal(shape).astype(np.float32)
        if x.size and rng.random() < 0.1:  # NaN and infinities among the inputs
            flat = x.reshape(-1)
            flat[rng.integers(flat.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return jnp.asarray(x)

    def _params(self, rng, batch, t):
        mask = rng.random(batch + (t, t)) < 0.7
        if mask.size and rng.random() < 0.5:
            mask[..., 0, :] = False  # a row with every key masked
        return {
            "w": jnp.asarray(rng.standard_normal((D, D)) / np.sqrt(D), F32),
            "w2": jnp.asarray(rng.standard_normal((D, D)) / np.sqrt(D), F32),
            "b": jnp.asarray(rng.standard_normal(D), F32),
            "g": jnp.asarray(1 + 0.1 * rng.standard_normal(D), F32),
            "mask": jnp.asarray(mask),
            "bias": jnp.asarray(rng.standard_normal(batch + (t, t)), F32),
            "labels": jnp.asarray(rng.integers(0, D, batch + (t,)), jnp.int32),
        }

    def fn(self, x, p):
        values = [x]
        for kind, name, op in self.steps:
            if kind == "binary":
                values.append(BINARY[name](values[-1], values[op % len(values)]))
            else:
                values.append(op(values[-1], p))
        return values[-1] + 0.5 * values[len(values) // 2]

    def __repr__(self):
        return f"Program(seed={self.seed}): " + " -> ".join(name for _, name, _ in self.steps)
