"""Typed model configs: compute dtypes, value checks and keyword overrides.

Every model's config is a frozen dataclass whose fields are ints, floats, strings or tuples of
ints, plus ``dtype``, the compute dtype by name. Parameters are always float32; ``"bfloat16"``
computes matmuls, convolutions and activations in bfloat16. Norm statistics (Flax's layers) and
the loss stay in float32; GPT-2 and Llama take their softmax in float32, while ViT's
``nnx.MultiHeadAttention`` computes it in the compute dtype, as Flax does.
"""
from __future__ import annotations

import dataclasses
import typing

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16")


def compute_dtype(name: str) -> jnp.dtype:
    """The jnp dtype named by a config's ``dtype`` field."""
    return jnp.dtype(name)


def check_dtype(name: object) -> None:
    if name not in DTYPES:
        raise ValueError(
            f"dtype={name!r} is not supported; use one of {', '.join(map(repr, DTYPES))}")


def check_positive(config: object, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if value <= 0:
            raise ValueError(f"{type(config).__name__}.{field} must be positive, got {value!r}")


def check_divisible(config: object, numerator: str, denominator: str) -> None:
    n, d = getattr(config, numerator), getattr(config, denominator)
    if n % d:
        raise ValueError(
            f"{type(config).__name__}: {numerator}={n} must be a multiple of {denominator}={d}")


def _coerce(model: str, field: str, hint: object, value: object) -> object:
    """Checks an override's type against the field's annotation; lists become tuples."""
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (tuple, list)) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{model}: override {field}= takes a tuple of ints, got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise TypeError(f"{model}: override {field}= takes a {hint.__name__}, "
                        f"got {type(value).__name__} {value!r}")
    return value


def with_overrides(model: str, config, overrides: dict[str, object]):
    """``config`` with fields replaced by ``overrides``, each checked by name and type.

    The config's own ``__post_init__`` then checks the values (positive sizes, divisibility,
    supported dtype), so a bad combination fails here rather than inside a trace.
    """
    hints = typing.get_type_hints(type(config))
    valid = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(f"{model}: unknown override(s) {', '.join(unknown)}; "
                        f"valid overrides for {model} are: {', '.join(valid)}")
    checked = {k: _coerce(model, k, hints[k], v) for k, v in overrides.items()}
    return dataclasses.replace(config, **checked)
