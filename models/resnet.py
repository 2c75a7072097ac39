"""ResNet (v1.5, bottleneck blocks) in Flax NNX: convolutions, BatchNorm, ReLU.

Training and evaluation modes differ: ``apply(params, batch, train=False)`` (the default)
normalizes with the running statistics in ``params["batch_stats"]``; ``train=True`` and ``loss``
normalize with the batch's own statistics and leave ``params`` untouched. ``update_stats(params,
batch)`` runs the training-mode forward pass and returns ``params`` with every BatchNorm's running
mean and variance moved to ``momentum * old + (1 - momentum) * batch statistic``.

FLOPs per example (MaxText's convention carried to convolutions: 6 FLOPs per multiply-add of
every convolution and of the classifier, forward and backward)::

    flops_per_example = 6 * (sum over convolutions of k^2 * c_in * c_out * h_out * w_out
                             + 4 * width * 2^(stages - 1) * num_classes)

BatchNorm, ReLU, pooling and the loss are not counted. The ``sum`` walks the same block plan
(``block_plan``) that builds the model.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models import config as config_lib
from models import data
from models.spec import ModelSpec, NNXFunctions, mean_cross_entropy

EXPANSION = 4  # a bottleneck block's output has 4x its inner width
# He initialization over the output fan, as torchvision initializes ResNet convolutions.
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """ResNet hyperparameters; the defaults are ResNet-50 at 224 x 224 with 1000 classes.

    ``stage_sizes`` counts bottleneck blocks per stage; stage ``i`` has inner width
    ``width * 2^i`` and halves the resolution in its first block (except stage 0, which follows
    the stem's stride-2 convolution and max pool).
    """

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    image_size: int = 224
    channels: int = 3
    num_classes: int = 1000
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self):
        config_lib.check_positive(self, "width", "image_size", "channels", "num_classes",
                                  "bn_eps")
        if not self.stage_sizes or min(self.stage_sizes) <= 0:
            raise ValueError(f"ResNetConfig.stage_sizes must be a non-empty tuple of positive "
                             f"block counts, got {self.stage_sizes!r}")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ValueError(f"ResNetConfig.bn_momentum must lie in [0, 1), got {self.bn_momentum}")
        config_lib.check_dtype(self.dtype)


PRESETS = {
    "resnet-tiny": ResNetConfig(stage_sizes=(1, 1), width=32, image_size=32, num_classes=10),
    "resnet-50": ResNetConfig(),
}


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    in_features: int
    width: int
    stride: int
    in_size: int  # input height (= width) of the block

    @property
    def out_size(self) -> int:
        return (self.in_size - 1) // self.stride + 1

    @property
    def has_projection(self) -> bool:
        return self.stride != 1 or self.in_features != EXPANSION * self.width


def stem_sizes(c: ResNetConfig) -> tuple[int, int]:
    """Heights after the stem's 7x7 stride-2 convolution and after its 3x3 stride-2 max pool."""
    conv = (c.image_size - 1) // 2 + 1
    return conv, (conv - 1) // 2 + 1


def block_plan(c: ResNetConfig) -> list[BlockPlan]:
    plan, features, size = [], c.width, stem_sizes(c)[1]
    for stage, blocks in enumerate(c.stage_sizes):
        for i in range(blocks):
            block = BlockPlan(features, c.width * 2 ** stage, 2 if stage > 0 and i == 0 else 1,
                              size)
            plan.append(block)
            features, size = EXPANSION * block.width, block.out_size
    return plan


def flops_per_example(c: ResNetConfig) -> float:
    stem_size, _ = stem_sizes(c)
    macs = 7 * 7 * c.channels * c.width * stem_size ** 2
    for b in block_plan(c):
        out = EXPANSION * b.width
        macs += b.in_features * b.width * b.in_size ** 2          # 1x1 reduce
        macs += 3 * 3 * b.width * b.width * b.out_size ** 2       # 3x3, strided
        macs += b.width * out * b.out_size ** 2                   # 1x1 expand
        if b.has_projection:
            macs += b.in_features * out * b.out_size ** 2         # 1x1 shortcut
    macs += EXPANSION * c.width * 2 ** (len(c.stage_sizes) - 1) * c.num_classes
    return 6 * macs


def idioms(c: ResNetConfig) -> dict[str, int]:
    return {"softmax_cross_entropy": 1}


class Bottleneck(nnx.Module):
    def __init__(self, b: BlockPlan, c: ResNetConfig, *, rngs: nnx.Rngs):
        dtype = config_lib.compute_dtype(c.dtype)
        conv = functools.partial(nnx.Conv, use_bias=False, dtype=dtype,
                                 kernel_init=CONV_INIT, rngs=rngs)
        norm = functools.partial(nnx.BatchNorm, momentum=c.bn_momentum, epsilon=c.bn_eps,
                                 dtype=dtype, rngs=rngs)
        out = EXPANSION * b.width
        self.conv1, self.bn1 = conv(b.in_features, b.width, (1, 1)), norm(b.width)
        self.conv2 = conv(b.width, b.width, (3, 3), strides=b.stride, padding=((1, 1), (1, 1)))
        self.bn2 = norm(b.width)
        self.conv3, self.bn3 = conv(b.width, out, (1, 1)), norm(out)
        if b.has_projection:
            self.proj_conv = conv(b.in_features, out, (1, 1), strides=b.stride, padding="VALID")
            self.proj_bn = norm(out)
        else:
            self.proj_conv = self.proj_bn = None

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        eval_mode = not train
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=eval_mode))
        y = jax.nn.relu(self.bn2(self.conv2(y), use_running_average=eval_mode))
        y = self.bn3(self.conv3(y), use_running_average=eval_mode)
        if self.proj_conv is not None:
            x = self.proj_bn(self.proj_conv(x), use_running_average=eval_mode)
        return jax.nn.relu(x + y)


class ResNet(nnx.Module):
    def __init__(self, c: ResNetConfig, *, rngs: nnx.Rngs):
        dtype = config_lib.compute_dtype(c.dtype)
        self.stem_conv = nnx.Conv(c.channels, c.width, (7, 7), strides=2,
                                  padding=((3, 3), (3, 3)), use_bias=False, dtype=dtype,
                                  kernel_init=CONV_INIT, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(c.width, momentum=c.bn_momentum, epsilon=c.bn_eps,
                                     dtype=dtype, rngs=rngs)
        plan = block_plan(c)
        self.blocks = nnx.List([Bottleneck(b, c, rngs=rngs) for b in plan])
        self.head = nnx.Linear(EXPANSION * plan[-1].width, c.num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """Logits (batch, num_classes) for NHWC images."""
        x = self.stem_bn(self.stem_conv(images), use_running_average=not train)
        x = nnx.max_pool(jax.nn.relu(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            x = block(x, train=train)
        return self.head(jnp.mean(x, axis=(1, 2)))


def build(name: str, c: ResNetConfig) -> ModelSpec:
    fns = NNXFunctions(lambda rngs: ResNet(c, rngs=rngs), collections=("params", "batch_stats"))

    def apply(params, batch, *, train: bool = False):
        data.check_images(batch["images"], c.image_size, c.channels)
        return fns.merge(params)(batch["images"], train=train)

    def loss(params, batch):
        return mean_cross_entropy(apply(params, batch, train=True), batch["labels"])

    def update_stats(params, batch):
        data.check_images(batch["images"], c.image_size, c.channels)
        model = fns.merge(params)
        model(batch["images"], train=True)
        return {"params": params["params"], "batch_stats": fns.state(model)["batch_stats"]}

    return ModelSpec(
        name=name, config=c, init=fns.init, apply=apply, loss=loss,
        batch=functools.partial(data.image_batch, image_size=c.image_size, channels=c.channels,
                                num_classes=c.num_classes),
        flops_per_example=flops_per_example(c), idioms=idioms(c), update_stats=update_stats)
