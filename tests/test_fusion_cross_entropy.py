"""The `softmax_cross_entropy` pass: spellings, label semantics, the fused matmul, kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import models
import passes
from passes import Pipeline, cleanup_passes
from passes.fusion.cross_entropy import cross_entropy_pass
from passes.testing import assert_equivalent, count_primitive

PIPELINE = Pipeline(cleanup_passes() + [cross_entropy_pass()])
N, T, V, DM = 3, 4, 16, 8


def _pallas_calls(jaxpr) -> int:
    return count_primitive(jaxpr, "pallas_call")


def _logits(seed, shape=(N, T, V)):
    return 2.0 * jax.random.normal(jax.random.key(seed), shape)


def _labels(seed, out_of_range=False):
    labels = jax.random.randint(jax.random.key(seed + 100), (N, T), 0, V)
    if out_of_range:  # >= vocab, in [-vocab, 0) (counts from the end), and below -vocab
        labels = labels.at[0, 0].set(V).at[0, 1].set(-1).at[1, 2].set(-V - 1).at[2, 3].set(V + 5)
    return labels


def _rules(fn, *args, pipeline=PIPELINE):
    report = passes.explain(fn, *args, pipeline=pipeline)
    return report, [r.rule for r in report.rewrites if r.pass_name == "softmax_cross_entropy"]


def _rewritten(fn, *args, rule="softmax_cross_entropy", **tol):
    report, rules = _rules(fn, *args)
    assert report.counts["softmax_cross_entropy"] == 1, (report.declined, report.jaxpr_after)
    assert rules == [rule]
    assert_equivalent(fn, passes.optimize(fn, PIPELINE), *args, **tol)


SPELLINGS = {
    "optax_integer_labels": optax.softmax_cross_entropy_with_integer_labels,
    "optax_one_hot": lambda x, l: optax.softmax_cross_entropy(x, jax.nn.one_hot(l, V)),
    "log_softmax_take_along_axis": lambda x, l: -jnp.take_along_axis(
        jax.nn.log_softmax(x), l[..., None], axis=-1)[..., 0],
    "logsumexp_minus_one_hot": lambda x, l: (
        jax.nn.logsumexp(x, -1) - jnp.sum(jax.nn.one_hot(l, V) * x, -1)),
    "x_minus_logsumexp_keepdims": lambda x, l: -jnp.take_along_axis(
        x - jax.nn.logsumexp(x, -1, keepdims=True), l[..., None], axis=-1)[..., 0],
    # jit: an eager float64 reference would reject out-of-range indices before tracing
    "logsumexp_minus_indexing": jax.jit(lambda x, l: jax.nn.logsumexp(x, -1) - x[
        jnp.arange(N)[:, None], jnp.arange(T)[None], l]),
    "hand_written_logsumexp": lambda x, l: (
        jnp.log(jnp.sum(jnp.exp(x - x.max(-1, keepdims=True)), -1)) + x.max(-1)
        - jnp.take_along_axis(x, l[..., None], axis=-1)[..., 0]),
}


@pytest.mark.parametrize("out_of_range", [False, True], ids=["labels", "out_of_range_labels"])
@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_rewritten_with_same_values_and_gradients(name, out_of_range):
    _rewritten(SPELLINGS[name], _logits(len(name)), _labels(len(name), out_of_range))


def test_out_of_range_labels_keep_the_originals_special_values():
    x, labels = _logits(1), _labels(1, out_of_range=True)
    for name, want_nan in (("optax_integer_labels", True), ("log_softmax_take_along_axis", True),
                           ("optax_one_hot", False)):
        loss = passes.optimize(SPELLINGS[name], PIPELINE)(x, labels)
        assert bool(jnp.isnan(loss[0, 0])) == want_nan and bool(jnp.isnan(loss[2, 3])) == want_nan
        assert not bool(jnp.isnan(loss[0, 1]))  # -1 counts from the end (or is one-hot zero)


# -- shapes and spellings a user writes ---------------------------------------------------------

def _log_softmax_mean(x, l):  # the (N, 1) pick reduced directly, negated after the mean
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x), l[..., None], axis=-1))


def _log_softmax_sum_2d(x, l):
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(x, axis=1), l[:, None], axis=1))


UNIT_BATCH_SPELLINGS = {
    "optax_integer_labels": optax.softmax_cross_entropy_with_integer_labels,
    "log_softmax_take_along_axis": SPELLINGS["log_softmax_take_along_axis"],
    "optax_one_hot": lambda x, l: optax.softmax_cross_entropy(x, jax.nn.one_hot(l, V)),
    "log_softmax_mean": _log_softmax_mean,
}


@pytest.mark.parametrize("shape", [(1, T, V), (1, V), (N, 1, V), (1, 1, V)],
                         ids=["1xTxV", "1xV", "Nx1xV", "1x1xV"])
@pytest.mark.parametrize("name", sorted(UNIT_BATCH_SPELLINGS))
def test_unit_batch_axes_rewritten(name, shape):
    """take_along_axis slices unit axes instead of batching them; the labels stay in order."""
    labels = jax.random.randint(jax.random.key(20), shape[:-1], 0, V)
    _rewritten(UNIT_BATCH_SPELLINGS[name], _logits(20, shape), labels)


@pytest.mark.parametrize("fn", [_log_softmax_mean, _log_softmax_sum_2d],
                         ids=["mean_of_pick", "sum_of_pick_axis_1"])
@pytest.mark.parametrize("rows", [N, 1])
def test_2d_log_softmax_pick_reduced_without_squeeze(fn, rows):
    labels = jax.random.randint(jax.random.key(21), (rows,), 0, V)
    _rewritten(fn, _logits(21, (rows, V)), labels)


def test_float64_declined_and_verified():
    """The kernels compute in float32: a float64 loss keeps its precision by staying as it is."""
    with jax.enable_x64(True):
        x = _logits(22).astype(jnp.float64)
        h, w = (a.astype(jnp.float64) for a in _hidden(22))
        labels = _labels(22)
        fused = lambda h, w, l: optax.softmax_cross_entropy_with_integer_labels(h @ w, l)  # noqa: E731
        for fn, args in ((optax.softmax_cross_entropy_with_integer_labels, (x, labels)),
                         (SPELLINGS["log_softmax_take_along_axis"], (x, labels)),
                         (fused, (h, w, labels))):
            report = passes.explain(fn, *args, pipeline=PIPELINE)
            assert report.counts["softmax_cross_entropy"] == 0
            assert [d.reason for d in report.declined] == [
                "the kernels compute in float32; the logits are float64"]
            got = passes.optimize(fn, PIPELINE, verify=True)(*args)
            np.testing.assert_allclose(got, jax.jit(fn)(*args), rtol=1e-12, atol=1e-12)


# -- special values: each spelling's own, the kernel's where they agree --------------------------

def _special_rows():
    """Logits and labels with one special case per row (3 x 4 rows of V logits)."""
    x = np.array(_logits(23))
    labels = np.array(_labels(23))
    inf, nan = np.inf, np.nan
    other = (labels + 1) % V
    for (i, j), (where, value) in {
            (0, 0): ("label", inf), (0, 1): ("other", inf), (0, 2): ("label", -inf),
            (0, 3): ("other", -inf), (1, 0): ("row", -inf), (1, 1): ("label", nan),
            (1, 2): ("other", nan), (2, 0): ("other", inf), (2, 1): ("label", -inf),
            (2, 2): ("row", -inf)}.items():
        if where == "row":
            x[i, j] = value
        else:
            x[i, j, labels[i, j] if where == "label" else other[i, j]] = value
    x[1, 3, labels[1, 3]], x[1, 3, other[1, 3]] = -inf, inf  # a -inf label, +inf elsewhere
    labels[2, 0], labels[2, 1], labels[2, 2] = V + 3, -V - 1, V  # out of range
    return jnp.asarray(x), jnp.asarray(labels)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_special_values_match_each_spelling(name):
    """+inf, -inf and NaN logits, all -inf rows and out-of-range labels: values and gradients are
    the compiled original's (JAX's log_softmax is NaN for a row holding +inf, its logsumexp is
    inf; a one-hot row of an out-of-range label is 0 with the row's gradient)."""
    fn = SPELLINGS[name]
    _rewritten(jax.jit(fn), *_special_rows())


def test_special_values_fused_with_the_matmul():
    """Logits that overflow to +-inf in one row of h @ w (the label's on some rows), for the
    spellings whose special values differ from the kernel's (the plain row max as the shift):
    the pass reproduces them from the kernel's loss and the picked logit."""
    h, w = _hidden(24)
    h = h.at[0].multiply(1e20)
    w = w.at[:, 3].multiply(1e20)
    labels = _labels(24).at[0, 0].set(3).at[0, 2].set(V).at[1, 1].set(V)
    for name in ("log_softmax_take_along_axis", "optax_one_hot", "hand_written_logsumexp"):
        loss = SPELLINGS[name]
        fn = jax.jit(lambda h, w, l, loss=loss: loss(h @ w, l))
        _rewritten(fn, h, w, labels, rule="linear_cross_entropy")


def test_class_axis_not_last():
    fn = lambda x, l: optax.softmax_cross_entropy_with_integer_labels(x, l, axis=1)  # noqa: E731
    _rewritten(fn, jnp.swapaxes(_logits(2), 1, 2), _labels(2))


def test_bfloat16_logits():
    def fn(x, l):  # float32 out: passes.testing compares bfloat16 outputs exactly
        return optax.softmax_cross_entropy_with_integer_labels(
            x.astype(jnp.bfloat16), l).astype(jnp.float32)

    _rewritten(fn, _logits(3), _labels(3), rtol=2e-2, atol=1e-2)


# -- the fused matmul ---------------------------------------------------------------------------

def _hidden(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (N, T, DM)), jax.random.normal(k2, (DM, V)) * 0.5


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("out_of_range", [False, True], ids=["labels", "out_of_range_labels"])
def test_matmul_and_loss_fused(layout, out_of_range):
    h, w = _hidden(4)
    if layout == "vd":  # a tied embedding table: logits = h @ wte.T
        def fn(h, wte, l):
            return optax.softmax_cross_entropy_with_integer_labels(h @ wte.T, l)
        w = w.T
    else:
        def fn(h, w, l):
            return optax.softmax_cross_entropy_with_integer_labels(h @ w, l)
    _rewritten(fn, h, w, _labels(4, out_of_range), rule="linear_cross_entropy")


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_fused_gradient_scatters_nothing_weight_sized(layout):
    # The replacement reads the label's logit outside the kernel (for the original's special
    # values); its gradient must not scatter into a weight-sized array of zeros.
    h, w = _hidden(6)
    w = w.T if layout == "vd" else w
    def fn(h, w, l):
        logits = h @ w.T if layout == "vd" else h @ w
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, l))
    opt = passes.optimize(fn, Pipeline(cleanup_passes() + [cross_entropy_pass()]))
    labels = _labels(6)
    assert "linear_cross_entropy" in str(jax.make_jaxpr(opt)(h, w, labels))
    assert count_primitive(jax.make_jaxpr(jax.grad(fn, argnums=1))(h, w, labels),
                           "scatter-add") >= 1  # the original scatters into the logits
    assert count_primitive(jax.make_jaxpr(jax.grad(opt, argnums=1))(h, w, labels),
                           "scatter-add") == 0
    assert_equivalent(lambda h, w: fn(h, w, labels), lambda h, w: opt(h, w, labels), h, w)


def test_fused_one_hot_logsumexp_form_with_out_of_range_labels():
    def fn(h, w, l):
        x = h @ w
        return jax.nn.logsumexp(x, -1) - jnp.sum(jax.nn.one_hot(l, V) * x, -1)

    _rewritten(fn, *_hidden(5), _labels(5, out_of_range=True), rule="linear_cross_entropy")


def test_bf16_matmul_with_float32_loss_fused():
    def fn(h, w, l):
        logits = h.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), l).mean()

    _rewritten(fn, *_hidden(6), _labels(6), rule="linear_cross_entropy", rtol=2e-2, atol=1e-2)


def test_logits_used_elsewhere_are_not_fused():
    def fn(h, w, l):
        x = h @ w
        return optax.softmax_cross_entropy_with_integer_labels(x, l), x.sum()

    _rewritten(fn, *_hidden(7), _labels(7), rule="softmax_cross_entropy")


def test_matmul_precision_the_kernel_cannot_honour_is_not_fused():
    def fn(h, w, l):
        x = jnp.matmul(h, w, precision=jax.lax.Precision.HIGHEST)
        return optax.softmax_cross_entropy_with_integer_labels(x, l)

    _rewritten(fn, *_hidden(8), _labels(8), rule="softmax_cross_entropy")


# -- not matched --------------------------------------------------------------------------------

def test_soft_labels_declined():
    x = _logits(9)
    fn = optax.softmax_cross_entropy
    report = passes.explain(fn, x, jax.nn.softmax(0.3 * x), pipeline=PIPELINE)
    assert report.counts["softmax_cross_entropy"] == 0
    assert report.declined and all("soft labels" in d.reason for d in report.declined)


@pytest.mark.parametrize("fn", [
    # log_softmax over one axis, the label picked along another
    lambda x, l: -jnp.take_along_axis(jax.nn.log_softmax(x, axis=1), l[..., None], axis=-1)[..., 0],
    # a shift that varies along the class axis is not a logsumexp
    lambda x, l: (jnp.log(jnp.sum(jnp.exp(x - x), -1)) + x.max(-1)
                  - jnp.take_along_axis(x, l[..., None], axis=-1)[..., 0]),
    # logsumexp of one array minus the logit of another
    lambda x, l: jax.nn.logsumexp(x, -1) - jnp.take_along_axis(
        2 * x, l[..., None], axis=-1)[..., 0],
], ids=["wrong_axis", "varying_shift", "other_array"])
def test_look_alikes_not_matched(fn):
    x = _logits(10, shape=(N, V, V))
    labels = jax.random.randint(jax.random.key(0), (N, V), 0, V)
    report = passes.explain(fn, x, labels, pipeline=PIPELINE)
    assert report.counts["softmax_cross_entropy"] == 0 and not report.declined


def test_intermediate_used_elsewhere_declined():
    def fn(x, l):
        ls = jax.nn.log_softmax(x)
        return -jnp.take_along_axis(ls, l[..., None], axis=-1)[..., 0], ls.sum()

    report = passes.explain(fn, _logits(11), _labels(11), pipeline=PIPELINE)
    assert report.counts["softmax_cross_entropy"] == 0
    assert any("used outside the match" in d.reason for d in report.declined)


# -- kernels and models -------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True], ids=["softmax_ce", "linear_ce"])
def test_pallas_kernels_in_the_program_and_its_gradient(fused):
    import pallas_kernels

    h, w = _hidden(12)
    labels = _labels(12)
    if fused:
        def fn(h, w, l):
            return optax.softmax_cross_entropy_with_integer_labels(h @ w, l).mean()

        def direct(h, w, l):
            return pallas_kernels.linear_cross_entropy(h, w, l, implementation="pallas").mean()
    else:
        def fn(h, w, l):
            return optax.softmax_cross_entropy_with_integer_labels(jnp.tanh(h @ w), l).mean()

        def direct(h, w, l):
            return pallas_kernels.softmax_cross_entropy(jnp.tanh(h @ w), l,
                                                        implementation="pallas").mean()
    optimized = passes.optimize(fn, passes.default_pipeline(implementation="pallas"))
    forward = _pallas_calls(jax.make_jaxpr(direct)(h, w, labels).jaxpr)
    backward = _pallas_calls(jax.make_jaxpr(jax.grad(direct, (0, 1)))(h, w, labels).jaxpr)
    assert _pallas_calls(jax.make_jaxpr(optimized)(h, w, labels).jaxpr) == forward >= 1
    assert _pallas_calls(jax.make_jaxpr(jax.grad(optimized, (0, 1)))(
        h, w, labels).jaxpr) == backward > forward
    assert_equivalent(fn, optimized, h, w, labels)


@pytest.mark.parametrize("batch_size", [2, 1])
@pytest.mark.parametrize("name,rule", [("gpt2-tiny", "linear_cross_entropy"),
                                       ("llama-tiny", "linear_cross_entropy"),
                                       ("vit-tiny", "softmax_cross_entropy")])
def test_model_zoo_counts(name, rule, batch_size):
    """Language models get the fused head (tied in GPT-2); ViT's head has a bias, so not fused.
    A batch of one keeps it. (tests/test_fusion_attention.py checks the optimized GPT-2 and
    Llama losses' values.)"""
    spec = models.get(name, seq_len=16) if "vit" not in name else models.get(name)
    params = jax.eval_shape(spec.init, jax.random.key(0))
    batch = jax.eval_shape(lambda key: spec.batch(key, batch_size), jax.random.key(1))
    report, rules = _rules(spec.loss, params, batch, pipeline=passes.default_pipeline())
    assert report.counts["softmax_cross_entropy"] == 1 and rules == [rule]
