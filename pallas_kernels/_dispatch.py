"""One op, several implementations: choose one, fall back on NotImplementedError, explain.

Each op file creates an `Op` and registers its implementations in order of preference:

    attention_op = Op("attention")

    @attention_op.register("xla")
    def _attention_xla(q, k, v, *, causal, ...): ...

and the public function calls `attention_op(q, k, v, causal=causal, implementation=implementation)`.

An implementation that cannot handle a call raises `NotImplementedError(reason)`; the next
candidate is tried. A pinned implementation (a single name) never runs anything else: its refusal
is the error. `None` picks "xla" on CPU; on a GPU it tries the registered implementations in the
order `Op.choose` gives (measured fastest first, the XLA reference always among them).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax

IMPLEMENTATIONS = ("pallas", "cudnn", "xla")


def _platform() -> str:
    return jax.default_backend()


@dataclasses.dataclass
class Op:
    name: str
    impls: dict[str, Callable] = dataclasses.field(default_factory=dict)
    # Hook for GPU selection: (op, args, kwargs) -> ordered implementation names.
    chooser: Callable | None = None

    def register(self, impl: str):
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLEMENTATIONS}")

        def deco(fn):
            self.impls[impl] = fn
            return fn

        return deco

    def candidates(self, implementation, args, kwargs) -> list[str]:
        if implementation is None:
            if _platform() == "cpu":
                return ["xla"]
            if self.chooser is not None:
                return list(self.chooser(self, args, kwargs))
            return [n for n in self.impls if n != "xla"] + ["xla"]
        names = [implementation] if isinstance(implementation, str) else list(implementation)
        for n in names:
            if n not in IMPLEMENTATIONS:
                raise ValueError(
                    f"{self.name}: unknown implementation {n!r}; expected None or one of "
                    f"{IMPLEMENTATIONS} (or a list of them)")
        return names

    def __call__(self, *args, implementation: str | Sequence[str] | None = None, **kwargs):
        reasons = []
        for n in self.candidates(implementation, args, kwargs):
            fn = self.impls.get(n)
            if fn is None:
                reasons.append(f"{n}: {self.name} has no {n!r} implementation")
                continue
            try:
                return fn(*args, **kwargs)
            except NotImplementedError as e:
                reasons.append(f"{n}: {e}")
        raise NotImplementedError(
            f"{self.name}: no implementation could handle this call:\n  " + "\n  ".join(reasons))
