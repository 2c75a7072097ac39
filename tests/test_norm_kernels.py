"""layer_norm and rms_norm against float64 references, for the "xla" and "pallas" implementations.

The references are the textbook formulas evaluated and differentiated in float64 (x64 enabled only
inside them); values and the gradients of x, scale and bias for a fresh random cotangent are
compared element by element. The Pallas subclass uses small blocks (4 rows forward, 2-row steps
and at most 3 programs backward), so a few dozen rows span several programs and end in a partial
block; interpret mode fills unwritten outputs and out-of-bounds reads with NaN, so the finiteness
check catches leaks. With PALLAS_KERNELS_PLATFORM=tpu "pallas" is the Mosaic kernels, whose blocks
follow TPU tiling (no config); the tests about the Triton form alone are skipped.
"""
from __future__ import annotations

import functools
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import kernel_checks
from kernel_checks import forbidden_outside_pallas, gpu_form_only, triton_config

from pallas_kernels import _pallas_compat, layer_norm, rms_norm
from pallas_kernels.layer_norm import (NormConfig, layer_norm_op, layer_norm_pallas,
                                       layer_norm_reference)
from pallas_kernels.rms_norm import rms_norm_op, rms_norm_pallas, rms_norm_reference

# Max error relative to the largest reference magnitude of that output.
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def reference64(fn, x, params, ct, **kwargs):
    """fn's output and gradients (x, *params) in float64, as numpy arrays."""
    @jax.jit
    def value_and_grads(x, params, ct):
        out, vjp = jax.vjp(lambda x, params: fn(x, *params, **kwargs), x, params)
        return out, vjp(ct)

    with jax.enable_x64(True):
        to64 = lambda a: None if a is None else jnp.asarray(np.asarray(a, np.float64))
        out, (dx, dparams) = value_and_grads(to64(x), [to64(p) for p in params], to64(ct))
        return np.asarray(out), [np.asarray(dx)] + [None if g is None else np.asarray(g)
                                                     for g in dparams]


assert_close = functools.partial(kernel_checks.assert_close, tolerance=TOLERANCE)


def random_case(seed, shape, dtype, param_dtype, n_params):
    rng = np.random.default_rng(seed)
    # An offset and a spread, so that subtracting the mean and dividing by the spread matter.
    x = jnp.asarray(rng.standard_normal(shape) * 2.5 + 1.5, dtype)
    params = [jnp.asarray(rng.standard_normal(shape[-1]), param_dtype) for _ in range(n_params)]
    ct = jnp.asarray(rng.standard_normal(shape), dtype)
    return x, params, ct


def count_pallas_calls(jaxpr) -> int:
    return str(jaxpr).count("pallas_call[")


# (op, reference, shape, dtype, param dtype, number of params, eps)
CASES = {
    "ln_f32_large_eps": ("layer_norm", (3, 7, 13), jnp.float32, jnp.float32, 2, 0.7),
    "ln_bf16_f32_params_batch1": ("layer_norm", (1, 5, 40), jnp.bfloat16, jnp.float32, 2, 1e-5),
    "ln_bf16_bf16_params": ("layer_norm", (9, 24), jnp.bfloat16, jnp.bfloat16, 2, 1e-5),
    "ln_scale_only": ("layer_norm", (2, 33), jnp.float32, jnp.float32, 1, 1e-5),
    "ln_no_params": ("layer_norm", (21, 8), jnp.float32, None, 0, 0.3),
    "rms_f32_large_eps": ("rms_norm", (3, 7, 13), jnp.float32, jnp.float32, 1, 0.7),
    "rms_bf16_f32_scale_batch1": ("rms_norm", (1, 5, 40), jnp.bfloat16, jnp.float32, 1, 1e-6),
    "rms_no_scale": ("rms_norm", (21, 8), jnp.float32, None, 0, 0.3),
}
OPS = {"layer_norm": (layer_norm_op, layer_norm_reference),
       "rms_norm": (rms_norm_op, rms_norm_reference)}


class NormTests:
    IMPLEMENTATION: str
    KWARGS: dict = {}

    def run(self, op, x, params, eps):
        return op(x, *params, eps=eps, implementation=self.IMPLEMENTATION, **self.KWARGS)

    @pytest.mark.parametrize("case", list(CASES))
    def test_values_and_gradients(self, case):
        name, shape, dtype, param_dtype, n_params, eps = CASES[case]
        op, reference = OPS[name]
        x, params, ct = random_case(zlib.crc32(case.encode()), shape, dtype, param_dtype, n_params)

        @jax.jit
        def value_and_grads(x, params, ct):
            out, vjp = jax.vjp(lambda x, params: self.run(op, x, params, eps), x, params)
            return out, vjp(ct)

        out, (dx, dparams) = value_and_grads(x, params, ct)
        want_out, want_grads = reference64(reference, x, params, ct, eps=eps)
        assert_close("y", out, want_out, dtype, x.dtype)
        assert_close("dx", dx, want_grads[0], dtype, x.dtype)
        for i, (got, want) in enumerate(zip(dparams, want_grads[1:])):
            assert_close(f"dparam{i}", got, want, dtype, params[i].dtype)

    @pytest.mark.parametrize("case", ["ln_f32_large_eps", "ln_no_params", "rms_f32_large_eps"])
    def test_traced_eps_values_and_gradients(self, case):
        """eps passed through jit (traced) and differentiated: values and gradients, d(eps)
        included, equal the float64 reference's."""
        name, shape, dtype, param_dtype, n_params, eps = CASES[case]
        op, reference = OPS[name]
        x, params, ct = random_case(zlib.crc32(case.encode()) + 1, shape, dtype, param_dtype,
                                    n_params)

        @jax.jit
        def value_and_grads(x, params, eps, ct):
            out, vjp = jax.vjp(lambda x, params, eps: self.run(op, x, params, eps), x, params,
                               eps)
            return out, vjp(ct)

        out, (dx, dparams, deps) = value_and_grads(x, params, jnp.float32(eps), ct)
        with jax.enable_x64(True):
            to64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
            want_out, vjp = jax.vjp(lambda x, params, eps: reference(x, *params, eps=eps),
                                    to64(x), [to64(p) for p in params], to64(eps))
            want_dx, want_dparams, want_deps = vjp(to64(ct))
        assert abs(float(want_deps)) > 1e-3  # eps matters at these sizes
        assert_close("y", out, np.asarray(want_out), dtype, x.dtype)
        assert_close("dx", dx, np.asarray(want_dx), dtype, x.dtype)
        for i, (got, want) in enumerate(zip(dparams, want_dparams)):
            assert_close(f"dparam{i}", got, np.asarray(want), dtype, params[i].dtype)
        # d(eps) sums terms of both signs over every element: float32 cancels to about 1e-4.
        assert deps.dtype == jnp.float32
        np.testing.assert_allclose(float(deps), float(want_deps), rtol=1e-3)

    def test_eps_is_used(self):
        # Rows of constant value: the centred part is zero, and only eps keeps rms_norm finite.
        x = jnp.full((3, 8), 2.0)
        y = self.run(rms_norm_op, x, [], 1.0)
        np.testing.assert_allclose(np.asarray(y), 2.0 / np.sqrt(4.0 + 1.0), rtol=1e-6)
        y = self.run(layer_norm_op, x, [], 1e-5)
        np.testing.assert_allclose(np.asarray(y), 0.0, atol=1e-6)


class TestXla(NormTests):
    IMPLEMENTATION = "xla"


class TestPallas(NormTests):
    IMPLEMENTATION = "pallas"
    KWARGS = triton_config(NormConfig(block_rows=4, bwd_block_rows=2, bwd_programs=3))

    @pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
    def test_all_work_in_pallas(self, fn):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((4, 6, 32)), jnp.float32)
        scale = jnp.asarray(rng.standard_normal(32), jnp.float32)
        if fn == "layer_norm":
            call = lambda x, scale: layer_norm(x, scale, scale, implementation="pallas")
        else:
            call = lambda x, scale: rms_norm(x, scale, implementation="pallas")
        loss = lambda x, scale: jnp.sum(call(x, scale) * x)
        forbidden = {"dot_general", "exp", "log", "tanh", "erf", "rsqrt", "sqrt", "div"}
        forward = jax.make_jaxpr(call)(x, scale)
        backward = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, scale)
        assert count_pallas_calls(forward) == 1
        assert count_pallas_calls(backward) == 2  # forward with statistics, then backward
        assert forbidden_outside_pallas(forward.jaxpr, forbidden) == []
        assert forbidden_outside_pallas(backward.jaxpr, forbidden) == []

    def test_many_programs_with_heuristic_blocks(self):
        # Enough rows for several forward and backward programs with the default configuration.
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.standard_normal((1100, 3)) * 3.0, jnp.float32)
        scale = jnp.asarray(rng.standard_normal(3), jnp.float32)
        ct = jnp.asarray(rng.standard_normal((1100, 3)), jnp.float32)
        out, vjp = jax.vjp(lambda x, s: rms_norm(x, s, eps=0.1, implementation="pallas"), x,
                           scale)
        dx, dscale = vjp(ct)
        want_out, (want_dx, want_dscale) = reference64(rms_norm_reference, x, [scale], ct,
                                                       eps=0.1)
        assert_close("y", out, want_out, jnp.float32, jnp.float32)
        assert_close("dx", dx, want_dx, jnp.float32, jnp.float32)
        assert_close("dscale", dscale, want_dscale, jnp.float32, jnp.float32)


def test_tpu_kernels_under_nested_vmap():
    """vmap adds grid axes to the Mosaic kernels' pallas_calls, which the TPU interpreter only
    takes with matching dimension semantics: values and gradients under two vmaps (one over an
    argument that the other leaves unbatched) equal the XLA implementation's."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 2, 3, 16)), jnp.float32)
    scale = jnp.asarray(rng.standard_normal(16), jnp.float32)

    def per_example(implementation):
        loss = lambda x, s: jnp.sum(jnp.sin(rms_norm(x, s, implementation=implementation,
                                                     platform="tpu")))
        vg = jax.value_and_grad(loss, argnums=(0, 1))
        return jax.jit(jax.vmap(jax.vmap(vg, in_axes=(0, None)), in_axes=(0, None)))(x, scale)

    for got, want in zip(jax.tree_util.tree_leaves(per_example("pallas")),
                         jax.tree_util.tree_leaves(per_example("xla"))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_parameter_shape_is_explained():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match=r"scale must have shape \(8,\)"):
        layer_norm(x, jnp.ones(7))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        layer_norm(x, None, jnp.ones((1, 8)))
    with pytest.raises(ValueError, match=r"scale must have shape \(8,\)"):
        rms_norm(x, jnp.ones(9))


def test_cpu_default_is_xla():
    x = jnp.ones((2, 8))
    assert count_pallas_calls(jax.make_jaxpr(layer_norm)(x)) == 0
    pinned = lambda x: layer_norm(x, implementation="pallas")
    assert count_pallas_calls(jax.make_jaxpr(pinned)(x)) == 1


@gpu_form_only
@pytest.mark.parametrize("case", ["layer_norm_768_bf16_f32_params", "rms_norm_4096_bf16",
                                  "rms_norm_13_no_scale", "layer_norm_96_traced_eps"])
def test_kernels_lower_through_triton(monkeypatch, case):
    """The GPU path: forward and backward go through Pallas's Triton lowering (no GPU needed)."""
    monkeypatch.setattr(sys.modules["pallas_kernels.layer_norm.triton"], "interpret_mode",
                        lambda: False)
    S = jax.ShapeDtypeStruct
    fn, args = {
        "layer_norm_768_bf16_f32_params": (
            lambda x, s, b: layer_norm_pallas(x, s, b, eps=1e-5),
            (S((1000, 768), jnp.bfloat16), S((768,), jnp.float32), S((768,), jnp.float32))),
        "rms_norm_4096_bf16": (lambda x, s: rms_norm_pallas(x, s, eps=1e-6),
                               (S((8, 256, 4096), jnp.bfloat16), S((4096,), jnp.bfloat16))),
        "rms_norm_13_no_scale": (lambda x: rms_norm_pallas(x, eps=1e-6),
                                 (S((1000, 13), jnp.float32),)),
        "layer_norm_96_traced_eps": (lambda x, s, eps: layer_norm_pallas(x, s, s, eps=eps),
                                     (S((300, 96), jnp.float32), S((96,), jnp.float32),
                                      S((), jnp.float32))),
    }[case]
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
    with _pallas_compat.gpu_lowering_target():
        lowered = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))))).trace(
            *args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("triton") >= 2  # forward and backward kernels
