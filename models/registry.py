"""The registry: model names, their preset configs and builders."""
from __future__ import annotations

from typing import Callable

from models import config as config_lib
from models import gpt2, gpt2_linen, llama, mlp, resnet, vit
from models.spec import ModelSpec

_BUILDERS: dict[str, tuple[Callable[[str, object], ModelSpec], object]] = {
    name: (module.build, preset)
    for module in (mlp, gpt2, gpt2_linen, llama, vit, resnet)
    for name, preset in module.PRESETS.items()
}


def names() -> list[str]:
    """The registered model names, in registration order."""
    return list(_BUILDERS)


def get(name: str, **overrides) -> ModelSpec:
    """The spec of model ``name``, with config fields replaced by ``overrides``.

    For example ``get("gpt2-small", num_layers=4, seq_len=256, dtype="bfloat16")``. The valid
    overrides are the fields of the model's config dataclass (``get(name).config``).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(names())}")
    build, preset = _BUILDERS[name]
    return build(name, config_lib.with_overrides(name, preset, overrides))
