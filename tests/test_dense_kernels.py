"""dense_act and gated_dense against float64 references, for the "xla" and "pallas" implementations.

The references are the textbook formulas (erf from jax.scipy, tanh-GELU, x*sigmoid(x) ...)
evaluated and differentiated in float64; values and the gradients of x, the weights and the bias
for a fresh random cotangent are compared element by element. The Pallas subclass uses 16-wide
tiles, so the odd sizes here (19 or 37 rows, d_in 37, d_out 45) span several tiles in every
dimension of every kernel and end in partial tiles; interpret mode fills unwritten outputs and
out-of-bounds reads with NaN, so the finiteness check catches leaks. With
PALLAS_KERNELS_PLATFORM=tpu "pallas" is the Mosaic kernels, whose blocks follow TPU tiling (no
config); the tests about the Triton form alone are skipped.
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
from kernel_checks import ON_TPU, forbidden_outside_pallas, gpu_form_only, triton_config

from pallas_kernels import _pallas_compat, dense_act, gated_dense
from pallas_kernels.dense_act import (ACTIVATIONS, DenseConfig, dense_act_op, dense_act_pallas,
                                      dense_act_reference, gated_dense_op, gated_dense_pallas,
                                      gated_dense_reference)

# Max error relative to the largest reference magnitude of that output. bf16 rounds the inputs of
# every matmul (the pre-activations, and dL/dz before the backward matmuls).
TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 3e-2}


def reference64(fn, args, ct, **kwargs):
    """fn's output and gradients w.r.t. every array in `args` (None kept), in float64."""
    @jax.jit
    def value_and_grads(args, ct):
        out, vjp = jax.vjp(lambda args: fn(*args, **kwargs), args)
        return out, vjp(ct)[0]

    with jax.enable_x64(True):
        to64 = lambda a: None if a is None else jnp.asarray(np.asarray(a, np.float64))
        out, grads = value_and_grads([to64(a) for a in args], to64(ct))
        return np.asarray(out), [None if g is None else np.asarray(g) for g in grads]


assert_close = functools.partial(kernel_checks.assert_close, tolerance=TOLERANCE)


def random_arrays(seed, shapes, dtype):
    rng = np.random.default_rng(seed)
    # Weights scaled so that pre-activations are O(1): every activation's bend is exercised.
    return [None if s is None else
            jnp.asarray(rng.standard_normal(s) / (np.sqrt(s[0]) if len(s) == 2 else 1.0), dtype)
            for s in shapes]


FORBIDDEN = {"dot_general", "exp", "log", "tanh", "erf", "logistic", "max", "select_n"}

# name -> (op, activation, x shape, d_out, with bias, dtype)
DENSE_CASES = {
    "gelu_tanh": ("gelu_tanh", (2, 19, 37), 45, True, jnp.float32),
    "gelu_erf": ("gelu_erf", (2, 19, 37), 45, True, jnp.float32),
    "relu": ("relu", (2, 19, 37), 45, True, jnp.float32),
    "silu_no_bias": ("silu", (37, 37), 45, False, jnp.float32),
    "identity_batch1": ("identity", (1, 37), 45, True, jnp.float32),
    "gelu_tanh_bf16": ("gelu_tanh", (2, 19, 37), 45, True, jnp.bfloat16),
    "silu_bf16_no_bias": ("silu", (19, 48), 32, False, jnp.bfloat16),
}
# name -> (activation, x shape, d_ff, dtype)
GATED_CASES = {
    "swiglu": ("silu", (2, 19, 37), 45, jnp.float32),
    "geglu_erf": ("gelu_erf", (19, 37), 45, jnp.float32),
    "geglu_tanh_bf16": ("gelu_tanh", (1, 19, 37), 45, jnp.bfloat16),
}


class DenseTests:
    IMPLEMENTATION: str
    KWARGS: dict = {}

    def check(self, case, op, reference, args, **kwargs):
        dtype = jnp.dtype(args[0].dtype)
        out_shape = jax.eval_shape(lambda *a: reference(*a, **kwargs), *args).shape
        ct = random_arrays(zlib.crc32(case.encode()) + 1, [out_shape], dtype)[0]

        @jax.jit
        def value_and_grads(args, ct):
            out, vjp = jax.vjp(lambda args: op(*args, implementation=self.IMPLEMENTATION,
                                               **self.KWARGS, **kwargs), args)
            return out, vjp(ct)[0]

        out, grads = value_and_grads(args, ct)
        want_out, want_grads = reference64(reference, args, ct, **kwargs)
        assert_close("y", out, want_out, dtype, dtype)
        for i, (arg, got, want) in enumerate(zip(args, grads, want_grads)):
            if arg is not None:
                assert_close(f"d(arg {i})", got, want, dtype, arg.dtype)

    @pytest.mark.parametrize("case", list(DENSE_CASES))
    def test_dense_act(self, case):
        activation, x_shape, d_out, with_bias, dtype = DENSE_CASES[case]
        d_in = x_shape[-1]
        args = random_arrays(zlib.crc32(case.encode()),
                             [x_shape, (d_in, d_out), (d_out,) if with_bias else None], dtype)
        self.check(case, dense_act_op, dense_act_reference, args, activation=activation)

    @pytest.mark.parametrize("case", list(GATED_CASES))
    def test_gated_dense(self, case):
        activation, x_shape, d_ff, dtype = GATED_CASES[case]
        d_in = x_shape[-1]
        args = random_arrays(zlib.crc32(case.encode()), [x_shape, (d_in, d_ff), (d_in, d_ff)],
                             dtype)
        self.check(case, gated_dense_op, gated_dense_reference, args, activation=activation)


class TestXla(DenseTests):
    IMPLEMENTATION = "xla"


class TestPallas(DenseTests):
    IMPLEMENTATION = "pallas"
    KWARGS = triton_config(DenseConfig(block_m=16, block_n=16, block_k=16, num_warps=4,
                                       num_stages=2))

    @pytest.mark.parametrize("activation", ["gelu_erf", "silu"])
    def test_all_work_in_pallas(self, activation):
        x, w, b, w_up = random_arrays(3, [(3, 5, 16), (16, 32), (32,), (16, 32)], jnp.float32)
        dense = lambda x, w, b: dense_act(x, w, b, activation=activation,
                                          implementation="pallas")
        gated = lambda x, w, b: gated_dense(x, w, w_up + b[None, :], activation=activation,
                                            implementation="pallas")
        # Backward: forward, dL/d(pre-activations), dx, dw (and db); the Mosaic kernels compute
        # each of the gated form's two weight gradients in a kernel of its own.
        for fn, grad_calls in ((dense, 4), (gated, 5 if ON_TPU else 4)):
            loss = lambda x, w, b: jnp.sum(fn(x, w, b) ** 2)
            forward = jax.make_jaxpr(fn)(x, w, b)
            backward = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b)
            assert str(forward).count("pallas_call[") == 1
            assert str(backward).count("pallas_call[") == grad_calls
            assert forbidden_outside_pallas(forward.jaxpr, FORBIDDEN) == []
            assert forbidden_outside_pallas(backward.jaxpr, FORBIDDEN) == []


def test_bad_arguments_are_explained():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    with pytest.raises(ValueError, match="activation must be one of"):
        dense_act(x, w, activation="gelu")
    expected = r"w must be \[d_in, d_out\] with d_in = x.shape\[-1\] = 8"
    with pytest.raises(ValueError, match=expected):
        dense_act(x, jnp.ones((7, 16)), activation="relu")
    with pytest.raises(ValueError, match=r"b must have shape \(16,\)"):
        dense_act(x, w, jnp.ones(8), activation="relu")
    with pytest.raises(ValueError, match="w_gate and w_up must have the same shape"):
        gated_dense(x, w, jnp.ones((8, 12)), activation="silu")


@gpu_form_only
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernels_lower_through_triton(monkeypatch, activation):
    """The GPU path: forward and backward go through Pallas's Triton lowering (no GPU needed)."""
    monkeypatch.setattr(sys.modules["pallas_kernels.dense_act.triton"], "interpret_mode",
                        lambda: False)
    S = jax.ShapeDtypeStruct
    x, w, b = S((2, 500, 768), jnp.bfloat16), S((768, 3072), jnp.bfloat16), S((3072,), jnp.bfloat16)
    w_odd = S((768, 1000), jnp.bfloat16)
    for fn, args in ((lambda x, w, b: dense_act_pallas(x, w, b, activation=activation), (x, w, b)),
                     (lambda x, wg, wu: gated_dense_pallas(x, wg, wu, activation=activation),
                      (x, w_odd, w_odd))):
        loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
        with _pallas_compat.gpu_lowering_target():
            lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
                lowering_platforms=("cuda",))
        assert lowered.as_text().count("triton") >= 3  # forward, dx and dw kernels


@pytest.mark.parametrize("op", ["dense_act", "gated_dense"])
@pytest.mark.parametrize("rows,d_in,d_out", [(0, 8, 4), (3, 8, 0), (3, 0, 4)])
def test_zero_size_operands_work_or_decline(op, rows, d_in, d_out):
    """An empty output needs no kernel: "pallas" returns it, with zero gradients, as the float64
    reference does. d_in = 0 leaves a non-empty output (act(b) for dense_act): "pallas"
    declines with its reason and ["pallas", "xla"] falls back to the reference's answer."""
    if op == "dense_act":
        fn, reference = dense_act, dense_act_reference
        shapes = [(rows, d_in), (d_in, d_out), (d_out,)]
    else:
        fn, reference = gated_dense, gated_dense_reference
        shapes = [(rows, d_in), (d_in, d_out), (d_in, d_out)]
    rng = np.random.default_rng(rows * 100 + d_in * 10 + d_out)
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    ct = jnp.asarray(rng.standard_normal((rows, d_out)), jnp.float32)
    want_out, want_grads = reference64(reference, args, ct, activation="gelu_tanh")
    declines = d_in == 0
    if declines:
        with pytest.raises(NotImplementedError, match="pallas: d_in = 0"):
            fn(*args, activation="gelu_tanh", implementation="pallas")
    for implementation in [["pallas", "xla"]] + ([] if declines else ["pallas"]):
        out, vjp = jax.vjp(lambda *a: fn(*a, activation="gelu_tanh",
                                         implementation=implementation), *args)
        np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
        for got, want in zip(vjp(ct), want_grads):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if declines and op == "dense_act":
        assert np.abs(want_out).max() > 0.1 and np.abs(want_grads[2]).max() > 0.1
