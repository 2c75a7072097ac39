"""softmax_cross_entropy and linear_cross_entropy against float64 references, "xla" and "pallas".

The references are logsumexp(logits) - take_along_axis(logits, labels) (the optax formulation;
linear_cross_entropy's materialises x @ w), evaluated and differentiated in float64. Values and
gradients for a fresh random cotangent are compared element by element; rows whose label is out
of range must be NaN exactly where the reference is, with the reference's gradient (softmax times
the cotangent). The Pallas subclass uses 16-wide blocks, 32-column backward chunks and few
forward programs, so the odd sizes here span several blocks, chunks and vocabulary splits (in
one case the last split runs past the vocabulary) and end in partial ones; interpret mode fills
unwritten outputs and out-of-bounds reads with NaN, so the finiteness checks catch leaks. With
PALLAS_KERNELS_PLATFORM=tpu "pallas" is the Mosaic kernels, whose blocks follow TPU tiling (no
config); the tests about the Triton form alone are skipped.
"""
from __future__ import annotations

import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import ON_TPU, forbidden_outside_pallas, gpu_form_only, triton_config

from pallas_kernels import _pallas_compat, linear_cross_entropy, softmax_cross_entropy
from pallas_kernels.linear_cross_entropy import (LinearCrossEntropyConfig, linear_cross_entropy_op,
                                                 linear_cross_entropy_pallas,
                                                 linear_cross_entropy_reference)
from pallas_kernels.softmax_cross_entropy import (CrossEntropyConfig, softmax_cross_entropy_op,
                                                  softmax_cross_entropy_pallas,
                                                  softmax_cross_entropy_reference)

# Max error relative to the largest finite reference magnitude of that output.
TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 3e-2}


def reference64(fn, args, ct, **kwargs):
    """fn's output and gradients w.r.t. the float arrays in `args`, in float64."""
    floats = [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]

    @jax.jit
    def value_and_grads(args, ct):
        def f(*float_args):
            full = list(args)
            for i, a in zip(floats, float_args):
                full[i] = a
            return fn(*full, **kwargs)
        out, vjp = jax.vjp(f, *[args[i] for i in floats])
        return out, vjp(ct)

    with jax.enable_x64(True):
        to64 = lambda a: jnp.asarray(np.asarray(a, np.float64) if jnp.issubdtype(
            a.dtype, jnp.floating) else np.asarray(a))
        out, grads = value_and_grads([to64(a) for a in args], to64(ct))
        return np.asarray(out), [np.asarray(g) for g in grads]


def assert_close(name, got, want, dtype, expected_dtype):
    assert got.dtype == expected_dtype, f"{name}: dtype {got.dtype}, expected {expected_dtype}"
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=f"{name}: NaN and inf")
    assert np.all(np.isfinite(got[finite])), f"{name}: non-finite values where finite expected"
    magnitude = max(np.max(np.abs(want[finite])), 1e-3)
    err = np.max(np.abs(got[finite] - want[finite])) / magnitude
    assert err <= TOLERANCE[jnp.dtype(dtype)], f"{name}: max error {err:.3g} x {magnitude:.3g}"


def random_labels(rng, shape, vocab):
    """Labels in [-vocab, vocab) with a few out of range (NaN rows) sprinkled in."""
    labels = rng.integers(-vocab, vocab, size=shape)
    flat = labels.reshape(-1)
    if flat.size >= 6:
        flat[[1, 4, 5]] = [vocab, -vocab - 1, vocab + 7]
    return jnp.asarray(labels, jnp.int32)


FORBIDDEN = {"dot_general", "exp", "log", "tanh", "erf", "logistic", "reduce_max"}

# name -> (batch shape, vocab, dtype)
SOFTMAX_CASES = {
    "f32": ((13,), 50, jnp.float32),
    "f32_batched": ((2, 7), 37, jnp.float32),
    "bf16_batch1": ((1, 9), 50, jnp.bfloat16),
}
# name -> (batch shape, d, vocab, w_layout, dtype)
LINEAR_CASES = {
    "dv_f32": ((13,), 21, 50, "dv", jnp.float32),
    "vd_f32_batched": ((2, 7), 21, 50, "vd", jnp.float32),
    "dv_bf16": ((19,), 40, 70, "dv", jnp.bfloat16),
    "vd_bf16_batch1": ((1, 13), 21, 50, "vd", jnp.bfloat16),
}


class CrossEntropyTests:
    IMPLEMENTATION: str
    SOFTMAX_KWARGS: dict = {}
    LINEAR_KWARGS: dict = {}

    def check(self, op, reference, args, ct, op_kwargs, **kwargs):
        floats = [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]
        dtype = jnp.dtype(args[0].dtype)

        @jax.jit
        def value_and_grads(args, ct):
            def f(*float_args):
                full = list(args)
                for i, a in zip(floats, float_args):
                    full[i] = a
                return op(*full, implementation=self.IMPLEMENTATION, **op_kwargs, **kwargs)
            out, vjp = jax.vjp(f, *[args[i] for i in floats])
            return out, vjp(ct)

        out, grads = value_and_grads(args, ct)
        want_out, want_grads = reference64(reference, args, ct, **kwargs)
        assert np.isnan(want_out).any() == (args[-1].size >= 6)  # the case has NaN rows
        loss_dtype = ct.dtype  # linear_cross_entropy's losses are at least float32
        assert_close("loss", out, want_out, dtype, loss_dtype)
        for i, got, want in zip(floats, grads, want_grads):
            assert_close(f"d(arg {i})", got, want, dtype, args[i].dtype)

    @pytest.mark.parametrize("case", list(SOFTMAX_CASES))
    def test_softmax_cross_entropy(self, case):
        batch, vocab, dtype = SOFTMAX_CASES[case]
        rng = np.random.default_rng(zlib.crc32(case.encode()))
        logits = jnp.asarray(rng.standard_normal((*batch, vocab)) * 3.0, dtype)
        labels = random_labels(rng, batch, vocab)
        ct = jnp.asarray(rng.standard_normal(batch), dtype)
        self.check(softmax_cross_entropy_op, softmax_cross_entropy_reference, [logits, labels], ct,
                   self.SOFTMAX_KWARGS)

    @pytest.mark.parametrize("case", list(LINEAR_CASES))
    def test_linear_cross_entropy(self, case):
        batch, d, vocab, layout, dtype = LINEAR_CASES[case]
        rng = np.random.default_rng(zlib.crc32(case.encode()))
        x = jnp.asarray(rng.standard_normal((*batch, d)), dtype)
        w_shape = (d, vocab) if layout == "dv" else (vocab, d)
        w = jnp.asarray(rng.standard_normal(w_shape) * (2.0 / np.sqrt(d)), dtype)
        labels = random_labels(rng, batch, vocab)
        ct = jnp.asarray(rng.standard_normal(batch), jnp.promote_types(dtype, jnp.float32))
        self.check(linear_cross_entropy_op, linear_cross_entropy_reference, [x, w, labels], ct,
                   self.LINEAR_KWARGS, w_layout=layout)

    @pytest.mark.parametrize("blocks", ["small", "default"])
    def test_softmax_special_values_match_the_reference(self, blocks):
        """-inf and +inf logits: losses and gradients equal the float64 reference's, NaN and inf
        in the same places, so a masked vocabulary or an overflowed logit spoils nothing else.
        The vocabulary spans more than one default block of 4096, the first all -inf."""
        vocab = 4096 + 37
        rng = np.random.default_rng(11)
        logits = rng.standard_normal((6, vocab)) * 3.0
        labels = rng.integers(4096, vocab, size=6)
        logits[0, :4096] = -np.inf  # a masked vocabulary: finite loss
        logits[1, rng.integers(0, 4096)] = np.inf  # +inf elsewhere: loss +inf, one NaN gradient
        logits[2, labels[2]] = -np.inf  # the label masked: loss +inf
        logits[3, :] = -np.inf  # nothing left: NaN
        logits[5, labels[5]] = np.inf  # the label itself +inf: NaN
        args = [jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.int32)]
        ct = jnp.asarray(rng.standard_normal(6), jnp.float32)
        kwargs = self.SOFTMAX_KWARGS if blocks == "small" else {}
        want_out, want_grads = reference64(softmax_cross_entropy_reference, args, ct)
        assert np.isfinite(want_out[[0, 4]]).all() and np.isnan(want_out[[3, 5]]).all()
        assert np.isposinf(want_out[[1, 2]]).all() and np.isfinite(want_grads[0][0]).all()
        out, vjp = jax.vjp(lambda x: softmax_cross_entropy_op(
            x, args[1], implementation=self.IMPLEMENTATION, **kwargs), args[0])
        assert_close("loss", out, want_out, jnp.float32, jnp.float32)
        assert_close("d(logits)", vjp(ct)[0], want_grads[0], jnp.float32, jnp.float32)

    def test_label_semantics(self):
        rng = np.random.default_rng(7)
        vocab = 24
        # Six copies of one row, so that losses differ only through their labels.
        x = jnp.asarray(np.tile(rng.standard_normal((1, 8)), (6, 1)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((8, vocab)), jnp.float32)
        logits = x @ w
        labels = jnp.asarray([-1, vocab - 1, -vocab, 0, vocab, -vocab - 1], jnp.int32)
        for loss in (
            softmax_cross_entropy_op(logits, labels, implementation=self.IMPLEMENTATION,
                                     **self.SOFTMAX_KWARGS),
            linear_cross_entropy_op(x, w, labels, implementation=self.IMPLEMENTATION,
                                    **self.LINEAR_KWARGS),
        ):
            loss = np.asarray(loss)
            np.testing.assert_allclose(loss[0], loss[1], rtol=1e-6)  # -1 is the last class
            np.testing.assert_allclose(loss[2], loss[3], rtol=1e-6)  # -vocab is class 0
            assert np.isnan(loss[4]) and np.isnan(loss[5])
            assert np.all(np.isfinite(loss[:4]))


class TestXla(CrossEntropyTests):
    IMPLEMENTATION = "xla"


class TestPallas(CrossEntropyTests):
    IMPLEMENTATION = "pallas"
    SOFTMAX_KWARGS = triton_config(CrossEntropyConfig(block_rows=4, block_vocab=16, num_warps=4))
    LINEAR_KWARGS = triton_config(LinearCrossEntropyConfig(block_tokens=16, block_vocab=16,
                                                           block_depth=16, chunk_vocab=32,
                                                           num_warps=4, num_stages=2,
                                                           forward_programs=8))

    def test_all_work_in_pallas(self):
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.standard_normal((5, 16)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((16, 40)), jnp.float32)
        labels = jnp.asarray(rng.integers(0, 40, 5), jnp.int32)
        softmax = lambda x, w: softmax_cross_entropy(x @ w, labels, implementation="pallas")
        linear = lambda x, w: linear_cross_entropy(x, w, labels, implementation="pallas")
        # linear, Triton: forward and merge of its vocabulary splits; then dlogits, dx and dw
        # inside the loop over vocabulary chunks. Mosaic: one forward reducing over the
        # vocabulary; then dx and dw, each recomputing its logits' tiles.
        linear_calls = (1, 3) if ON_TPU else (2, 5)
        # The outer matmul feeding softmax_cross_entropy is the caller's, not the kernel's.
        for fn, (forward_calls, grad_calls), forbidden in (
                (softmax, (1, 2), FORBIDDEN - {"dot_general"}),
                (linear, linear_calls, FORBIDDEN)):
            loss = lambda x, w: jnp.sum(fn(x, w) * jnp.arange(5.0))
            forward = jax.make_jaxpr(fn)(x, w)
            backward = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w)
            assert str(forward).count("pallas_call[") == forward_calls
            assert str(backward).count("pallas_call[") == grad_calls
            assert forbidden_outside_pallas(forward.jaxpr, forbidden) == []
            assert forbidden_outside_pallas(backward.jaxpr, forbidden) == []


def temp_bytes(fn, n_tokens, d, vocab):
    x = jax.ShapeDtypeStruct((n_tokens, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
    labels = jax.ShapeDtypeStruct((n_tokens,), jnp.int32)
    loss = lambda x, w, labels: jnp.sum(fn(x, w, labels))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w, labels).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_linear_cross_entropy_memory_does_not_grow_with_tokens_times_vocab(implementation):
    # Compiled only, never run: 2048 tokens x 2**17 classes would be 1 GiB of float32 logits.
    d, vocab = 16, 2**17
    fn = lambda x, w, labels: linear_cross_entropy(x, w, labels, implementation=implementation)
    small, large = temp_bytes(fn, 512, d, vocab), temp_bytes(fn, 2048, d, vocab)
    logits_bytes = 2048 * vocab * 4
    assert large < 1.1 * small, (small, large)
    assert large < logits_bytes / 4, (large, logits_bytes)


def test_naive_version_does_grow():
    # The check above can fail: the materialising reference's temporaries scale with tokens.
    d, vocab = 16, 2**17
    small = temp_bytes(linear_cross_entropy_reference, 512, d, vocab)
    large = temp_bytes(linear_cross_entropy_reference, 2048, d, vocab)
    assert large > 3.5 * small and large > 2048 * vocab * 4


def test_bad_arguments_are_explained():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 30))
    labels = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="w_layout must be 'dv'"):
        linear_cross_entropy(x, w, labels, w_layout="vocab_first")
    with pytest.raises(ValueError, match=r"with w_layout='vd' w must be \[vocab, d\]"):
        linear_cross_entropy(x, w, labels, w_layout="vd")
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        linear_cross_entropy(x, w, jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="labels must be integers"):
        softmax_cross_entropy(x, jnp.zeros(4))


@gpu_form_only
@pytest.mark.parametrize("case", ["softmax", "linear_dv", "linear_vd", "linear_odd_f32"])
def test_kernels_lower_through_triton(monkeypatch, case):
    """The GPU path: forward and backward go through Pallas's Triton lowering (no GPU needed)."""
    for op in ("softmax_cross_entropy", "linear_cross_entropy"):
        monkeypatch.setattr(sys.modules[f"pallas_kernels.{op}.triton"], "interpret_mode",
                            lambda: False)
    S, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    labels = S((8192,), jnp.int32)
    fn, args = {
        "softmax": (softmax_cross_entropy_pallas, (S((8192, 50304), bf16), labels)),
        "linear_dv": (lambda x, w, y: linear_cross_entropy_pallas(x, w, y, w_layout="dv"),
                      (S((8192, 768), bf16), S((768, 50304), bf16), labels)),
        "linear_vd": (lambda x, w, y: linear_cross_entropy_pallas(x, w, y, w_layout="vd"),
                      (S((8192, 768), bf16), S((50304, 768), bf16), labels)),
        "linear_odd_f32": (lambda x, w, y: linear_cross_entropy_pallas(x, w, y, w_layout="vd"),
                           (S((13, 21), jnp.float32), S((50, 21), jnp.float32),
                            S((13,), jnp.int32))),
    }[case]
    floats = tuple(range(len(args) - 1))
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
    with _pallas_compat.gpu_lowering_target():
        lowered = jax.jit(jax.value_and_grad(loss, argnums=floats)).trace(*args).lower(
            lowering_platforms=("cuda",))
    assert lowered.as_text().count("triton") >= 2


@pytest.mark.parametrize("case", ["softmax_vocab_0", "linear_vocab_0", "linear_d_0",
                                  "softmax_rows_0", "linear_rows_0"])
def test_zero_size_operands_work_or_decline(case):
    """Empty logits' factors leave the kernels nothing to tile: "pallas" declines with its
    reason and ["pallas", "xla"] falls back (never a ZeroDivisionError). No rows at all is an
    empty result "pallas" returns itself. d = 0 gives logits of 0, a loss of log(vocab) and
    zero gradients, as the float64 reference; an empty vocabulary leaves every label out of
    range: NaN losses, as documented."""
    kind, _, size = case.partition("_")
    rows, d, vocab = {"vocab_0": (3, 4, 0), "d_0": (3, 0, 6), "rows_0": (0, 4, 6)}[size]
    rng = np.random.default_rng(len(case))
    labels = jnp.asarray(rng.integers(0, max(vocab, 1), rows), jnp.int32)
    if kind == "softmax":
        fn, reference = softmax_cross_entropy, softmax_cross_entropy_reference
        args = [jnp.asarray(rng.standard_normal((rows, vocab)), jnp.float32)]
    else:
        fn, reference = linear_cross_entropy, linear_cross_entropy_reference
        args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((rows, d), (d, vocab))]
    ct = jnp.asarray(rng.standard_normal(rows), jnp.float32)
    declines = rows > 0
    if declines:
        with pytest.raises(NotImplementedError, match="pallas: .*(empty vocabulary|zero-size)"):
            fn(*args, labels, implementation="pallas")
    want_out, want_grads = reference64(reference, [*args, labels], ct)
    for implementation in [["pallas", "xla"]] + ([] if declines else ["pallas"]):
        out, vjp = jax.vjp(lambda *a: fn(*a, labels, implementation=implementation), *args)
        if vocab == 0 and kind == "linear":
            assert np.isnan(np.asarray(out)).all()
        else:
            np.testing.assert_allclose(out, want_out, rtol=1e-6)
        for got, want in zip(vjp(ct), want_grads):
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    if size == "d_0":
        np.testing.assert_allclose(want_out, np.log(vocab))
