"""Flax model zoo: every model as pure functions over plain pytrees.

``models.get(name, **overrides)`` returns a ``ModelSpec`` (init, apply, loss, batch,
flops_per_example, idioms, name, config, and update_stats for BatchNorm models);
``models.names()`` lists the registry. Overrides are fields of the model's config dataclass
(``num_layers``, ``seq_len``, ``vocab_size``, ``dtype`` and the like); unknown ones are refused
with the list of valid ones.

FLOPs follow MaxText: per example and training step, 6 FLOPs per matmul weight per use (2
forward, 4 backward; embedding lookups excluded, LM heads included), plus attention's scores
and weighted sum, ``12 * layers * seq * attention_dim`` per token, halved for causal models.
Each model's module docstring states its formula.

The models import neither the compiler (``passes``) nor the kernels (``pallas_kernels``): they
are written as a Flax user writes them.
"""
from models.registry import get, names
from models.spec import ModelSpec

__all__ = ["ModelSpec", "get", "names"]
