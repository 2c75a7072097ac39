"""The model zoo: registry contract, shapes, float64 references, training, FLOPs, passes."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
from flax import nnx

import models
from models import gpt2_linen
from models.gpt2 import GPT2Config
from models.llama import LlamaConfig
from models.mlp import MLPConfig
from models.resnet import ResNetConfig, block_plan
from models.spec import NNXFunctions
from models.vit import ViTConfig

REGISTRY = ["mlp", "gpt2-tiny", "gpt2-small", "gpt2-medium", "gpt2-tiny-linen",
            "gpt2-small-linen", "llama-tiny", "llama-1b", "vit-tiny", "vit-base", "resnet-tiny",
            "resnet-50"]
TINY = ["mlp", "gpt2-tiny", "gpt2-tiny-linen", "llama-tiny", "vit-tiny", "resnet-tiny"]
BATCH = 2
# The "rbg" generator compiles several times faster on CPU than the default threefry; the
# specs take any typed key.
fast_key = functools.partial(jax.random.key, impl="rbg")


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@functools.cache
def tiny_setup(name: str):
    """Spec, params, a fixed batch and the compiled value-and-grad of the loss (compiled once)."""
    spec = models.get(name)
    params = spec.init(fast_key(0))
    batch = spec.batch(fast_key(1), BATCH)
    value_and_grad = jax.jit(jax.value_and_grad(spec.loss)).lower(params, batch).compile()
    return spec, params, batch, value_and_grad


# ---------------------------------------------------------------- registry and errors

def test_registry_names():
    assert models.names() == REGISTRY


def test_unknown_name_lists_registry():
    with pytest.raises(ValueError, match="unknown model 'gpt3'.*gpt2-small.*resnet-50"):
        models.get("gpt3")


def test_unknown_override_lists_valid_fields():
    with pytest.raises(TypeError, match=r"unknown override\(s\) n_layer.*seq_len, num_layers"):
        models.get("gpt2-tiny", n_layer=3)


def test_override_type_and_value_errors():
    with pytest.raises(TypeError, match="num_layers= takes a int, got str"):
        models.get("gpt2-tiny", num_layers="3")
    with pytest.raises(ValueError, match="dtype='float16' is not supported.*'bfloat16'"):
        models.get("llama-tiny", dtype="float16")
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        models.get("llama-tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="stage_sizes must be a non-empty tuple"):
        models.get("resnet-tiny", stage_sizes=())


class StepCounter(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 2, rngs=rngs)
        self.steps = nnx.Variable(jnp.zeros((), jnp.int32))


def test_nnx_glue_refuses_stray_state_and_partial_params():
    with pytest.raises(TypeError, match="StepCounter holds variables outside the collections"):
        NNXFunctions(lambda rngs: StepCounter(rngs=rngs)).graphdef
    spec = models.get("resnet-tiny")
    params = jax.eval_shape(spec.init, jax.random.key(0))
    with pytest.raises(KeyError, match=r"lack the collection\(s\) \['batch_stats'\]"):
        jax.eval_shape(spec.loss, {"params": params["params"]},
                       jax.eval_shape(lambda k: spec.batch(k, 2), jax.random.key(1)))


def test_overrides_apply():
    spec = models.get("gpt2-small", num_layers=3, seq_len=128, vocab_size=1000,
                      dtype="bfloat16")
    assert spec.config == GPT2Config(num_layers=3, seq_len=128, vocab_size=1000,
                                     dtype="bfloat16")
    assert models.get("resnet-tiny", stage_sizes=[2, 1]).config.stage_sizes == (2, 1)


def test_wrong_input_shapes_raise():
    spec = models.get("gpt2-tiny")
    params = jax.eval_shape(spec.init, jax.random.key(0))
    too_long = {"inputs": jax.ShapeDtypeStruct((1, 65), jnp.int32)}
    with pytest.raises(ValueError, match=r"seq <= seq_len=64, got shape \(1, 65\)"):
        jax.eval_shape(spec.apply, params, too_long)
    spec = models.get("vit-tiny")
    params = jax.eval_shape(spec.init, jax.random.key(0))
    small = {"images": jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)}
    with pytest.raises(ValueError, match=r"shape \(batch, 32, 32, 3\), got shape \(1, 16, 16, 3\)"):
        jax.eval_shape(spec.apply, params, small)


# ---------------------------------------------------------------- shapes, init, batch

# Published parameter counts: GPT-2 (HF, 50257 tokens), TinyLlama-1.1B, ViT-B/16, ResNet-50.
PUBLISHED_PARAMS = {
    ("gpt2-small", 50257): 124_439_808,
    ("gpt2-medium", 50257): 354_823_168,
    ("llama-1b", None): 1_100_048_384,
    ("vit-base", None): 86_567_656,
    ("resnet-50", None): 25_557_032,
}


@pytest.mark.parametrize("name,vocab_size", list(PUBLISHED_PARAMS))
def test_full_size_param_counts(name, vocab_size):
    overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
    assert models.get(name, **overrides).param_count() == PUBLISHED_PARAMS[name, vocab_size]


@pytest.mark.parametrize("name", REGISTRY)
def test_eval_shape_of_init_and_batch(name):
    spec = models.get(name)
    params = jax.eval_shape(spec.init, jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    batch = jax.eval_shape(lambda key: spec.batch(key, 3), jax.random.key(0))
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(batch))
    assert isinstance(spec.flops_per_example, (int, float)) and spec.flops_per_example > 0


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_shapes_and_dtypes(name, dtype):
    spec = models.get(name, dtype=dtype)
    params = jax.eval_shape(spec.init, jax.random.key(0))
    batch = jax.eval_shape(lambda key: spec.batch(key, BATCH), jax.random.key(1))
    out = jax.eval_shape(spec.apply, params, batch)
    c = spec.config
    classes = getattr(c, "num_classes", None)
    expected = (BATCH, c.seq_len, c.vocab_size) if classes is None else (BATCH, classes)
    assert out.shape == expected and out.dtype == jnp.dtype(dtype)
    loss = jax.eval_shape(spec.loss, params, batch)
    assert loss.shape == () and loss.dtype == jnp.float32


def test_batches_are_deterministic_next_token_windows():
    spec = models.get("gpt2-tiny")
    a, b = spec.batch(jax.random.key(5), 3), spec.batch(jax.random.key(5), 3)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
    assert a["inputs"].dtype == jnp.int32 and int(a["inputs"].max()) < spec.config.vocab_size
    c = spec.batch(jax.random.key(6), 3)
    assert not np.array_equal(a["inputs"], c["inputs"])


# ---------------------------------------------------------------- float64 references

def layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def rms_norm(x, p, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * p["scale"]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def attention(q, k, v, causal):
    """(B, T, N, H) inputs; -inf outside the causal triangle."""
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if causal:
        t = q.shape[1]
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    return np.einsum("bnts,bsnh->btnh", softmax(scores), v)


def mean_cross_entropy(logits, labels):
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float((logz - np.take_along_axis(logits, labels[..., None], -1)[..., 0]).mean())


def gpt2_reference(p, tokens, c: GPT2Config):
    b, t = tokens.shape
    n, d = c.num_heads, c.d_model
    x = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][:t]
    for i in range(c.num_layers):
        blk = p["blocks"][i]
        h = layer_norm(x, blk["ln_1"], c.layer_norm_eps)
        qkv = h @ blk["attn"]["c_attn"]["kernel"] + blk["attn"]["c_attn"]["bias"]
        q, k, v = (a.reshape(b, t, n, d // n) for a in np.split(qkv, 3, -1))
        o = attention(q, k, v, causal=True).reshape(b, t, d)
        x = x + o @ blk["attn"]["c_proj"]["kernel"] + blk["attn"]["c_proj"]["bias"]
        h = layer_norm(x, blk["ln_2"], c.layer_norm_eps)
        h = h @ blk["mlp"]["c_fc"]["kernel"] + blk["mlp"]["c_fc"]["bias"]
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        x = x + h @ blk["mlp"]["c_proj"]["kernel"] + blk["mlp"]["c_proj"]["bias"]
    return layer_norm(x, p["ln_f"], c.layer_norm_eps) @ p["wte"]["embedding"].T


def rope(x, theta):
    t, dh = x.shape[1], x.shape[-1]
    angles = np.arange(t)[:, None] * theta ** (-np.arange(0, dh, 2) / dh)
    sin, cos = np.sin(angles)[:, None], np.cos(angles)[:, None]
    x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def llama_reference(p, tokens, c: LlamaConfig):
    x = p["embed"]["embedding"][tokens]
    for i in range(c.num_layers):
        blk = p["layers"][i]
        h = rms_norm(x, blk["input_norm"], c.norm_eps)
        a = blk["attn"]
        q = rope(np.einsum("btd,dnh->btnh", h, a["q_proj"]["kernel"]), c.rope_theta)
        k = rope(np.einsum("btd,dkh->btkh", h, a["k_proj"]["kernel"]), c.rope_theta)
        v = np.einsum("btd,dkh->btkh", h, a["v_proj"]["kernel"])
        groups = c.num_heads // c.num_kv_heads
        o = attention(q, np.repeat(k, groups, 2), np.repeat(v, groups, 2), causal=True)
        x = x + np.einsum("btnh,nhd->btd", o, a["o_proj"]["kernel"])
        h = rms_norm(x, blk["post_attn_norm"], c.norm_eps)
        m = blk["mlp"]
        gate = h @ m["gate_proj"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
    return rms_norm(x, p["norm"], c.norm_eps) @ p["lm_head"]["kernel"]


def vit_reference(p, images, c: ViTConfig):
    b, s, ps = images.shape[0], c.image_size // c.patch_size, c.patch_size
    patches = images.reshape(b, s, ps, s, ps, c.channels).transpose(0, 1, 3, 2, 4, 5)
    kernel = p["patch_embed"]["kernel"].reshape(-1, c.d_model)
    x = patches.reshape(b, s * s, -1) @ kernel + p["patch_embed"]["bias"]
    cls = np.broadcast_to(p["cls_token"], (b, 1, c.d_model))
    x = np.concatenate([cls, x], 1) + p["pos_embed"]
    for i in range(c.num_layers):
        blk = p["blocks"][i]
        h = layer_norm(x, blk["norm1"], c.layer_norm_eps)
        a = blk["attn"]
        q, k, v = (np.einsum("btd,dnh->btnh", h, a[n]["kernel"]) + a[n]["bias"]
                   for n in ("query", "key", "value"))
        o = attention(q, k, v, causal=False)
        x = x + np.einsum("btnh,nhd->btd", o, a["out"]["kernel"]) + a["out"]["bias"]
        h = layer_norm(x, blk["norm2"], c.layer_norm_eps)
        h = h @ blk["mlp_in"]["kernel"] + blk["mlp_in"]["bias"]
        h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
        x = x + h @ blk["mlp_out"]["kernel"] + blk["mlp_out"]["bias"]
    x = layer_norm(x, p["norm"], c.layer_norm_eps)[:, 0]
    return x @ p["head"]["kernel"] + p["head"]["bias"]


def mlp_reference(p, inputs, c: MLPConfig):
    x = inputs
    for i in range(c.num_layers):
        x = np.maximum(x @ p["hidden"][i]["kernel"] + p["hidden"][i]["bias"], 0)
    return x @ p["head"]["kernel"] + p["head"]["bias"]


REFERENCES = {"gpt2-tiny": (gpt2_reference, "inputs", "targets"),
              "llama-tiny": (llama_reference, "inputs", "targets"),
              "vit-tiny": (vit_reference, "images", "labels"),
              "mlp": (mlp_reference, "inputs", "labels")}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_against_float64_reference(name):
    reference, inputs, labels = REFERENCES[name]
    spec = models.get(name)
    # Fresh weights: biases and norm parameters are drawn too, so none of them is trivial.
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                          jax.eval_shape(spec.init, jax.random.key(0)))
    batch = spec.batch(jax.random.key(9), BATCH)
    outputs, loss = jax.jit(lambda p, b: (spec.apply(p, b), spec.loss(p, b)))(params, batch)
    want = reference(f64(params["params"]), np.asarray(batch[inputs]), spec.config)
    np.testing.assert_allclose(outputs, want, rtol=2e-4, atol=2e-4)
    want_loss = mean_cross_entropy(want, np.asarray(batch[labels]))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)


def test_linen_gpt2_matches_nnx_for_the_same_weights():
    nnx_spec, linen_spec = models.get("gpt2-tiny"), models.get("gpt2-tiny-linen")
    nnx_params = nnx_spec.init(jax.random.key(3))
    linen_params = gpt2_linen.params_from_nnx(nnx_params)
    own = jax.eval_shape(linen_spec.init, jax.random.key(0))
    assert jax.tree.structure(own) == jax.tree.structure(linen_params)
    assert jax.tree.map(lambda a: a.shape, own) == jax.tree.map(lambda a: a.shape, linen_params)
    batch = nnx_spec.batch(jax.random.key(4), BATCH)

    @jax.jit
    def both(nnx_params, linen_params, batch):
        return (nnx_spec.apply(nnx_params, batch), nnx_spec.loss(nnx_params, batch),
                linen_spec.apply(linen_params, batch), linen_spec.loss(linen_params, batch))

    nnx_logits, nnx_loss, linen_logits, linen_loss = both(nnx_params, linen_params, batch)
    np.testing.assert_allclose(linen_logits, nnx_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(linen_loss, nnx_loss, rtol=1e-6)


# ---------------------------------------------------------------- BatchNorm statistics

def test_resnet_running_statistics():
    m = 0.9
    spec, params, batch, value_and_grad = tiny_setup("resnet-tiny")
    assert spec.config.bn_momentum == m
    exact_spec = models.get("resnet-tiny", bn_momentum=0.0)

    @jax.jit
    def run(params, batch):
        exact = exact_spec.update_stats(params, batch)
        return (exact, spec.update_stats(params, batch), spec.apply(exact, batch),
                spec.apply(params, batch, train=True), spec.apply(params, batch))

    exact, moved, eval_exact, train_mode, eval_initial = run(params, batch)
    # Momentum 0 stores each layer's batch statistics: eval mode then reproduces train mode.
    np.testing.assert_allclose(eval_exact, train_mode, rtol=1e-4, atol=1e-4)
    assert not np.allclose(eval_initial, train_mode, atol=1e-2)
    for got, initial in zip(jax.tree.leaves(exact["params"]), jax.tree.leaves(params["params"])):
        np.testing.assert_array_equal(got, initial)
    # With momentum m the update is m * old + (1 - m) * batch statistic, in every layer.
    want = jax.tree.map(lambda old, new: m * old + (1 - m) * new,
                        params["batch_stats"], exact["batch_stats"])
    for got, expected in zip(jax.tree.leaves(moved["batch_stats"]), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The training loss reads no running statistic: their gradient is exactly zero.
    _, grads = value_and_grad(params, batch)
    assert all(not np.any(g) for g in jax.tree.leaves(grads["batch_stats"]))
    mask = spec.trainable_mask(params)
    assert all(jax.tree.leaves(mask["params"])) and not any(jax.tree.leaves(mask["batch_stats"]))


# ---------------------------------------------------------------- training and bf16

@pytest.mark.parametrize("name", TINY)
def test_loss_falls_under_adamw(name):
    spec, params, batch, value_and_grad = tiny_setup(name)
    optimizer = optax.adamw(3e-3, mask=spec.trainable_mask)

    @jax.jit
    def update(grads, state, params):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    losses = []
    for _ in range(6):
        loss, grads = value_and_grad(params, batch)
        losses.append(float(loss))
        params, state = update(grads, state, params)
    assert np.all(np.isfinite(losses))
    # Random labels on a fixed batch: the model memorizes them, so the loss must drop.
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", TINY)
def test_bfloat16_variant(name):
    spec32, params, batch, value_and_grad32 = tiny_setup(name)
    spec16 = models.get(name, dtype="bfloat16")
    shapes16 = jax.eval_shape(spec16.init, jax.random.key(0))
    assert shapes16 == jax.eval_shape(spec32.init, jax.random.key(0))  # float32 parameters
    loss16, grads = jax.jit(jax.value_and_grad(spec16.loss))(params, batch)
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    loss32, _ = value_and_grad32(params, batch)
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


# ---------------------------------------------------------------- FLOPs against XLA

def valid_taps(size: int, kernel: int, stride: int, pad: int) -> int:
    """(output position, kernel tap) pairs along one axis that land inside the input."""
    outputs = (size + 2 * pad - kernel) // stride + 1
    return sum(0 <= o * stride - pad + i < size for o in range(outputs) for i in range(kernel))


def resnet_padding_macs(c: ResNetConfig) -> tuple[int, int]:
    """Multiply-adds of ResNet's convolutions that fall on zero padding, and the stem's others.

    Returns (padding MACs of all convolutions, stem MACs on real pixels).
    """
    def padded(size, kernel, stride, pad, c_in, c_out):
        outputs = (size + 2 * pad - kernel) // stride + 1
        full = (kernel * outputs) ** 2
        return c_in * c_out * (full - valid_taps(size, kernel, stride, pad) ** 2)

    stem_valid = c.channels * c.width * valid_taps(c.image_size, 7, 2, 3) ** 2
    padding = padded(c.image_size, 7, 2, 3, c.channels, c.width)
    padding += sum(padded(b.in_size, 3, b.stride, 1, b.width, b.width) for b in block_plan(c))
    return padding, stem_valid


def xla_counted_flops(spec) -> float:
    """What XLA's cost analysis of value-and-grad should count per example, in matmul FLOPs.

    The model count follows MaxText; XLA differs in ways that follow from the config:
    - causal attention: XLA computes the whole (seq x seq) score matrix, forward and backward,
      12 * layers * seq^2 * attention_dim per example, where the model counts half of it;
    - the first layer applied to the data (the MLP's first Linear, ViT's patch embedding,
      ResNet's stem convolution) needs no gradient with respect to its input, so its backward
      costs one forward, not two: XLA does 2x its forward FLOPs, the model counts 3x;
    - convolutions: XLA skips kernel taps that land on zero padding (in the forward pass and
      in both gradients), where the model, like the published ResNet counts, takes
      k^2 * c_in * c_out per output pixel.
    Elementwise work (norms, softmax, activations, BatchNorm, the loss), which XLA also counts
    and the model does not, is what the 10% tolerance leaves room for.
    """
    c = spec.config
    if isinstance(c, GPT2Config):
        return spec.flops_per_example + 6 * c.num_layers * c.seq_len ** 2 * c.d_model
    if isinstance(c, LlamaConfig):
        attention_dim = c.num_heads * c.head_dim
        return spec.flops_per_example + 6 * c.num_layers * c.seq_len ** 2 * attention_dim
    if isinstance(c, MLPConfig):
        return spec.flops_per_example - 2 * c.input_dim * c.hidden_dim
    if isinstance(c, ViTConfig):
        return (spec.flops_per_example
                - 2 * c.num_patches * c.patch_size ** 2 * c.channels * c.d_model)
    padding_macs, stem_valid_macs = resnet_padding_macs(c)
    return spec.flops_per_example - 6 * padding_macs - 2 * stem_valid_macs


@pytest.mark.parametrize("name", TINY)
def test_flops_per_example_matches_xla_cost_analysis(name):
    spec, _, _, value_and_grad = tiny_setup(name)
    analysis = value_and_grad.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # one dict per device on some jax versions
        analysis = analysis[0]
    per_example = analysis["flops"] / BATCH
    assert per_example == pytest.approx(xla_counted_flops(spec), rel=0.10)


def test_flops_formulas_at_full_size():
    # GPT-2 small: 123.6M matmul weights (LM head included) and causal attention, per token.
    small = models.get("gpt2-small")
    per_token = 6 * 123_568_128 + 6 * 12 * 1024 * 768
    assert small.flops_per_example == 1024 * per_token
    # ResNet-50 is 4.09 G multiply-adds per 224 x 224 image.
    assert models.get("resnet-50").flops_per_example == pytest.approx(6 * 4.09e9, rel=0.01)


# ---------------------------------------------------------------- through the compiler

@pytest.mark.parametrize("name", TINY)
def test_runs_through_passes_optimize(name):
    import passes  # imported here: the compiler's state must not affect the other tests
    spec, params, batch, value_and_grad = tiny_setup(name)
    loss, grads = value_and_grad(params, batch)
    optimized = passes.optimize(spec.loss)
    opt_loss, opt_grads = jax.jit(jax.value_and_grad(optimized))(params, batch)
    np.testing.assert_allclose(opt_loss, loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(opt_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


CLEANUP_PASSES = {"canonicalize", "cse", "dce"}
FUSION_PASSES = {"attention", "softmax_cross_entropy", "layer_norm", "rms_norm", "dense_act"}


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_built_in_passes_rewrite_each_idiom_once(name, dtype):
    import passes
    spec = models.get(name, dtype=dtype)
    params = jax.eval_shape(spec.init, jax.random.key(0))
    batch = jax.eval_shape(lambda key: spec.batch(key, BATCH), jax.random.key(1))
    report = passes.explain(spec.loss, params, batch)
    # Every fusion pass of the default pipeline fires exactly once per idiom instance (per
    # block, plus the final norm and the loss) and nowhere else.
    fused = {k: v for k, v in report.counts.items() if k not in CLEANUP_PASSES}
    assert set(fused) == FUSION_PASSES
    assert fused == {k: spec.idioms.get(k, 0) for k in fused}, str(report)
