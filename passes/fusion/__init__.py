"""The built-in fusion passes, one file each."""
from __future__ import annotations


def builtin_passes(implementation=None) -> list:
    """The fusion passes in pipeline order, each calling kernels with `implementation`."""
    return []
