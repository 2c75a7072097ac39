"""Flax model zoo: every model as pure functions over plain pytrees.

``models.get(name, **overrides)`` returns a ``ModelSpec`` (init, apply, loss, batch,
flops_per_example, name, config); ``models.names()`` lists the registry. The models import
neither the compiler (``passes``) nor the kernels (``pallas_kernels``): they are written as a
Flax user writes them.
"""
from models.registry import get, names
from models.spec import ModelSpec

__all__ = ["ModelSpec", "get", "names"]
