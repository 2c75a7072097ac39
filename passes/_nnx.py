"""Flax NNX support: module paths in the name stack while a function is traced.

Linen pushes each module's path onto JAX's name stack, so every equation (and `report.rewrites`)
says which module it came from; NNX does not. While `optimize` traces a function, each NNX module
found among its arguments runs its `__call__` inside `jax.named_scope(<its graph path>)`. Only
the copies merged inside the trace are touched (their class is swapped for a subclass that adds
the scope); the caller's modules are left as they are.
"""
from __future__ import annotations

import threading

import jax

_scoped_classes: dict = {}
_paths: dict = {}  # id(module copy) -> its graph path, for copies made by the current trace
_active = threading.local()


def _scoped_call(cls):
    def __call__(self, *args, **kwargs):
        path = _paths.get(id(self))
        if not path:
            return cls.__call__(self, *args, **kwargs)
        stack = getattr(_active, "stack", None)
        if stack is None:
            stack = _active.stack = []
        parent = stack[-1] if stack else ()
        relative = path[len(parent):] if path[:len(parent)] == parent else path
        stack.append(path)
        try:
            with jax.named_scope("/".join(str(p) for p in relative)):
                return cls.__call__(self, *args, **kwargs)
        finally:
            stack.pop()
    return __call__


def _scoped_class(cls):
    sub = _scoped_classes.get(cls)
    if sub is None:
        sub = type(cls)(cls.__name__, (cls,), {"__call__": _scoped_call(cls),
                                              "__module__": cls.__module__,
                                              "__qualname__": cls.__qualname__})
        _scoped_classes[cls] = sub
    return sub


def scope_module_calls(nodes) -> None:
    """Make every module under `nodes` (a tuple of graph nodes merged inside a trace) call
    itself inside a named scope of its path, e.g. `blocks/0/attn`."""
    from flax import nnx

    for path, node in nnx.iter_graph(nodes):
        if isinstance(node, nnx.Module) and callable(getattr(type(node), "__call__", None)):
            _paths[id(node)] = tuple(path[1:])  # path[0] is the argument's index among nodes
            object.__setattr__(node, "__class__", _scoped_class(type(node)))


def forget(nodes) -> None:
    """Drop the paths recorded for `nodes` (the trace that made them is over)."""
    from flax import nnx

    for _, node in nnx.iter_graph(nodes):
        _paths.pop(id(node), None)
