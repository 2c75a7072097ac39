"""A small MLP classifier in Flax NNX: ``num_layers`` hidden Linear + ReLU layers, then a head.

FLOPs per example (6 per matmul weight, MaxText's convention)::

    flops_per_example = 6 * (input_dim * hidden_dim + (num_layers - 1) * hidden_dim^2
                             + hidden_dim * num_classes)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx

from models import config as config_lib
from models import data
from models.spec import ModelSpec, NNXFunctions, mean_cross_entropy


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """MLP hyperparameters; the defaults classify flattened 28 x 28 images into 10 classes."""

    input_dim: int = 784
    hidden_dim: int = 512
    num_layers: int = 2
    num_classes: int = 10
    dtype: str = "float32"

    def __post_init__(self):
        config_lib.check_positive(self, "input_dim", "hidden_dim", "num_layers", "num_classes")
        config_lib.check_dtype(self.dtype)


PRESETS = {"mlp": MLPConfig()}


def flops_per_example(c: MLPConfig) -> float:
    h = c.hidden_dim
    return 6 * (c.input_dim * h + (c.num_layers - 1) * h * h + h * c.num_classes)


def idioms(c: MLPConfig) -> dict[str, int]:
    return {"dense_act": c.num_layers, "softmax_cross_entropy": 1}


class MLP(nnx.Module):
    def __init__(self, c: MLPConfig, *, rngs: nnx.Rngs):
        linear = functools.partial(nnx.Linear, dtype=config_lib.compute_dtype(c.dtype), rngs=rngs)
        sizes = [c.input_dim] + [c.hidden_dim] * c.num_layers
        self.hidden = nnx.List([linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
        self.head = linear(c.hidden_dim, c.num_classes)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (batch, num_classes) for features (batch, input_dim)."""
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.head(x)


def build(name: str, c: MLPConfig) -> ModelSpec:
    fns = NNXFunctions(lambda rngs: MLP(c, rngs=rngs))

    def apply(params, batch):
        inputs = batch["inputs"]
        if inputs.ndim != 2 or inputs.shape[1] != c.input_dim:
            raise ValueError(f"expected inputs of shape (batch, {c.input_dim}), "
                             f"got shape {inputs.shape}")
        return fns.merge(params)(inputs)

    def loss(params, batch):
        return mean_cross_entropy(apply(params, batch), batch["labels"])

    return ModelSpec(
        name=name, config=c, init=fns.init, apply=apply, loss=loss,
        batch=functools.partial(data.feature_batch, input_dim=c.input_dim,
                                num_classes=c.num_classes),
        flops_per_example=flops_per_example(c), idioms=idioms(c))
