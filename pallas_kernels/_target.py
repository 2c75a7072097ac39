"""Which kernels to run and for which platform: `KernelChoice`, normalised once per call.

A choice is (implementation, platform, interpret):

- implementation: None (choose), a name ("pallas", "cudnn", "xla") or a tuple of names tried in
  order.
- platform: "gpu", "tpu" or "cpu", the platform the kernels are written for. None resolves to
  the environment variable PALLAS_KERNELS_PLATFORM, else the default backend. "pallas" means the
  Triton kernels for "gpu" (and "cpu", through the interpreter) and the Mosaic kernels for "tpu".
- interpret: whether Pallas kernels run in interpret mode. None resolves to the environment
  variable PALLAS_KERNELS_INTERPRET ("1" forces it, "0" lowers for real, which is what
  `jax.export(..., platforms=("tpu",))` from a CPU host needs), else to whether the host lacks
  the platform (a CPU host runs TPU kernels in the TPU interpreter).

The choice in effect while an implementation runs is `current()`; `Op` sets it around each call.
Kernels read their platform and interpret mode from it when they are traced and keep them as
static values, so that a backward pass traced later sees the same choice.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Sequence

import jax

PLATFORMS = ("gpu", "tpu", "cpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}


def host_platform() -> str:
    """The default backend as one of PLATFORMS."""
    backend = jax.default_backend()
    return _ALIASES.get(backend, backend)


def _resolve_platform(platform: str | None) -> str:
    name = platform if platform is not None else os.environ.get("PALLAS_KERNELS_PLATFORM") or None
    if name is None:
        return host_platform()
    if name not in _ALIASES:
        raise ValueError(f"unknown platform {name!r}; expected None or one of {PLATFORMS}")
    return _ALIASES[name]


def _resolve_interpret(platform: str, interpret: bool | None) -> bool:
    if interpret is not None:
        return bool(interpret)
    env = os.environ.get("PALLAS_KERNELS_INTERPRET", "")
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise ValueError(f"PALLAS_KERNELS_INTERPRET must be '0' or '1', got {env!r}")
    return platform == "cpu" or platform != host_platform()


def _normalise_implementation(implementation):
    if implementation is None or isinstance(implementation, str):
        return implementation
    return tuple(implementation)


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """Implementation names, target platform and interpret mode (hashable, resolved)."""
    implementation: str | tuple[str, ...] | None = None
    platform: str = "cpu"
    interpret: bool = True

    @classmethod
    def of(cls, implementation=None, platform: str | None = None,
           interpret: bool | None = None) -> "KernelChoice":
        """Normalise. A KernelChoice passed as `implementation` is returned as it is unless
        `platform` or `interpret` override it."""
        if isinstance(implementation, KernelChoice):
            if platform is None and interpret is None:
                return implementation
            return cls.of(implementation.implementation,
                          implementation.platform if platform is None else platform,
                          implementation.interpret if interpret is None else interpret)
        resolved = _resolve_platform(platform)
        return cls(_normalise_implementation(implementation), resolved,
                   _resolve_interpret(resolved, interpret))

    @property
    def names(self) -> Sequence[str] | None:
        impl = self.implementation
        return None if impl is None else ([impl] if isinstance(impl, str) else list(impl))

    @property
    def on_host(self) -> bool:
        """Whether the kernels run on this host's own backend (so they can be timed here)."""
        return self.platform == host_platform()


_current: contextvars.ContextVar[KernelChoice | None] = contextvars.ContextVar(
    "pallas_kernels_choice", default=None)


def current() -> KernelChoice:
    """The choice an `Op` call set, else the defaults (environment, default backend)."""
    choice = _current.get()
    return choice if choice is not None else KernelChoice.of()


@contextlib.contextmanager
def using(choice: KernelChoice):
    token = _current.set(choice)
    try:
        yield choice
    finally:
        _current.reset(token)
