"""Checks shared by the kernel tests."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from pallas_kernels._target import KernelChoice

# The platform "pallas" targets in this run: PALLAS_KERNELS_PLATFORM, else the default backend.
# "tpu" runs the Mosaic kernels (on a CPU, in Pallas's TPU interpreter); otherwise the Triton ones
# run (on a CPU, in Pallas's interpreter).
PLATFORM = KernelChoice.of().platform
ON_TPU = PLATFORM == "tpu"

gpu_form_only = pytest.mark.skipif(
    ON_TPU, reason="about the Triton (GPU) form of the kernels: its configs, block sizes or "
                   "lowering; PALLAS_KERNELS_PLATFORM=tpu runs the Mosaic forms instead")


def triton_config(config) -> dict:
    """`{"config": config}` for the Triton kernels; nothing for the Mosaic ones, whose block
    sizes follow TPU tiling and take no config."""
    return {} if ON_TPU else {"config": config}


def forbidden_outside_pallas(jaxpr, forbidden) -> list[str]:
    """`forbidden` primitives anywhere in `jaxpr` (nested too) except inside pallas_call."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            continue
        if eqn.primitive.name in forbidden:
            found.append(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    found += forbidden_outside_pallas(sub.jaxpr, forbidden)
                elif isinstance(sub, jex_core.Jaxpr):
                    found += forbidden_outside_pallas(sub, forbidden)
    return found


def assert_close(name, got, want, dtype, expected_dtype, *, tolerance):
    """`got` has `expected_dtype`, is finite everywhere, and is within `tolerance[dtype]` of the
    float64 `want`, relative to want's largest magnitude."""
    assert got.dtype == expected_dtype, f"{name}: dtype {got.dtype}, expected {expected_dtype}"
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: {np.sum(~np.isfinite(got))} non-finite elements"
    magnitude = max(np.max(np.abs(want)), 1e-3)
    err = np.max(np.abs(got - want)) / magnitude
    assert err <= tolerance[jnp.dtype(dtype)], f"{name}: max error {err:.3g} x {magnitude:.3g}"
