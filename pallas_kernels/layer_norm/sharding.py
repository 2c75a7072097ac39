"""How the norm kernels split across devices (see pallas_kernels/_sharding.py): rows split
freely; the features do not, since every row's statistics run over all of them."""
from __future__ import annotations

from pallas_kernels._sharding import Rule, batch_dims

_WHOLE = {"f": "each row's statistics run over all its features"}


def _param(p):
    return None if p is None else "f"


def _eps(eps):
    return "" if hasattr(eps, "shape") else eps  # a traced eps is a scalar operand


def layer_norm_sharding(x, scale=None, bias=None, *, eps):
    rows = batch_dims(x.ndim - 1)
    return Rule(args=(f"{rows} f", _param(scale), _param(bias)), kwargs=dict(eps=_eps(eps)),
                results=(f"{rows} f",), whole=_WHOLE)


def rms_norm_sharding(x, scale=None, *, eps):
    rows = batch_dims(x.ndim - 1)
    return Rule(args=(f"{rows} f", _param(scale)), kwargs=dict(eps=_eps(eps)),
                results=(f"{rows} f",), whole=_WHOLE)
