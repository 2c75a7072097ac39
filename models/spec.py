"""The spec every registry entry returns, and the glue that turns an NNX module into pure functions.

Parameters are plain nested dicts of arrays, grouped by collection as Flax Linen groups them:
``{"params": weights}``, plus ``{"batch_stats": running statistics}`` for models with BatchNorm.
``jax.grad(spec.loss)`` gives a gradient of the same structure (zero for running statistics,
which the training-mode loss does not read), and ``optax`` transforms apply directly.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# NNX variable types stored in params, by collection name.
_COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model as pure functions over plain pytrees.

    Attributes:
      name: the registry name.
      config: the model's typed config dataclass, overrides applied.
      init: ``init(rng) -> params``, a pure function of the key (``jax.eval_shape`` traces it).
      apply: ``apply(params, batch) -> outputs``: logits in the compute dtype (models with
        BatchNorm also take ``train=``; the default ``False`` uses the running statistics).
      loss: ``loss(params, batch) -> scalar``: mean float32 cross-entropy, in training mode.
      batch: ``batch(rng, batch_size) -> dict`` of synthetic arrays, deterministic in the key,
        each with ``batch_size`` as its leading axis.
      flops_per_example: model FLOPs of one training step (forward and backward) per example;
        the model's module docstring gives the formula.
      idioms: how often each idiom the built-in passes target occurs in ``loss``, keyed by pass
        name (``attention``, ``layer_norm``, ``rms_norm``, ``dense_act``,
        ``softmax_cross_entropy``).
      update_stats: for models with BatchNorm, ``update_stats(params, batch) -> params``: runs the
        training-mode forward pass and returns ``params`` with ``batch_stats`` moved towards the
        batch's statistics (``new = momentum * old + (1 - momentum) * batch``). Call it beside the
        optimizer step; ``loss`` itself never touches running statistics. ``None`` for models
        without running statistics.
    """

    name: str
    config: Any
    init: Callable[[jax.Array], dict]
    apply: Callable[..., jax.Array]
    loss: Callable[[dict, dict], jax.Array]
    batch: Callable[[jax.Array, int], dict]
    flops_per_example: float
    idioms: Mapping[str, int]
    update_stats: Callable[[dict, dict], dict] | None = None

    def trainable_mask(self, params: dict) -> dict:
        """True for trained weights, False for running statistics: ``optax.adamw(mask=...)``."""
        return {collection: jax.tree.map(lambda _: collection == "params", tree)
                for collection, tree in params.items()}

    def param_count(self) -> int:
        """Number of trained weights, from shapes only (nothing is allocated)."""
        shapes = jax.eval_shape(self.init, jax.random.key(0))
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


def mean_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()


class NNXFunctions:
    """Pure ``init`` and ``merge`` for an NNX module built by ``make_module(rngs)``.

    ``init`` builds a real module from the key and returns its variables as plain dicts, one per
    collection; ``merge`` rebuilds the module from such dicts inside ``apply`` and ``loss``. The
    module's structure (its graphdef) comes from an abstract instance, built on first use so
    that ``models.get`` stays cheap.
    """

    def __init__(self, make_module: Callable[[nnx.Rngs], nnx.Module],
                 collections: tuple[str, ...] = ("params",)):
        self._make_module = make_module
        self.collections = collections
        self._filters = tuple(_COLLECTIONS[c] for c in collections)

    @functools.cached_property
    def graphdef(self):
        abstract = nnx.eval_shape(lambda: self._make_module(nnx.Rngs(params=0)))
        graphdef, *_, rest = nnx.split(abstract, *self._filters, ...)
        if jax.tree.leaves(rest):
            raise TypeError(
                f"{type(abstract).__name__} holds variables outside the collections "
                f"{self.collections}: {rest}. Store only nnx.Param (and nnx.BatchStat) in models "
                "of the zoo, e.g. build nnx.MultiHeadAttention with keep_rngs=False.")
        return graphdef

    def init(self, rng: jax.Array) -> dict:
        return self.state(self._make_module(nnx.Rngs(params=rng)))

    def state(self, module: nnx.Module) -> dict:
        """The module's variables as plain dicts by collection."""
        _, *states, _ = nnx.split(module, *self._filters, ...)
        return {c: nnx.to_pure_dict(s) for c, s in zip(self.collections, states)}

    def merge(self, params: dict) -> nnx.Module:
        missing = [c for c in self.collections if c not in params]
        if missing:
            raise KeyError(f"params lack the collection(s) {missing}; expected the dict that "
                           f"init returns, with keys {list(self.collections)}")
        return nnx.merge(self.graphdef, *(params[c] for c in self.collections))


def nnx_language_model(name: str, c, make_model: Callable, flops_per_example: float,
                       idioms: Mapping[str, int]) -> ModelSpec:
    """The spec of an NNX language model mapping `batch["inputs"]` tokens to logits; the loss is
    the mean next-token cross-entropy against `batch["targets"]`."""
    from models import data

    fns = NNXFunctions(make_model)

    def apply(params, batch):
        data.check_tokens(batch["inputs"], c.seq_len)
        return fns.merge(params)(batch["inputs"])

    def loss(params, batch):
        return mean_cross_entropy(apply(params, batch), batch["targets"])

    return ModelSpec(
        name=name, config=c, init=fns.init, apply=apply, loss=loss,
        batch=functools.partial(data.token_batch, seq_len=c.seq_len, vocab_size=c.vocab_size),
        flops_per_example=flops_per_example, idioms=idioms)

