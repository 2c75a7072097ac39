"""Kernel library: attention, norms, dense+activation and cross-entropy, each with Pallas forward
and backward kernels, an XLA implementation, and dispatch between them (see _dispatch.py).

One package per op (`attention/`, `layer_norm/`, `rms_norm/`, `dense_act/` with `gated_dense`,
`softmax_cross_entropy/`, `linear_cross_entropy/`), one file per implementation inside it; the
tile helpers the Triton kernels share are in `_tiles.py`. `Op` gives a kernel of your own the
same dispatch: several implementations, chosen per call, with fallback, and with a
`ShardingRule` (and `Collective`s for split reduced axes) runs per device shard. `opaque_kernels()`
traces every Pallas kernel as an opaque call, for reading a program's memory and communication
as a GPU or TPU compiles it on a host that can only interpret the kernels.
"""
from pallas_kernels._dispatch import Op as Op
from pallas_kernels._pallas_compat import opaque_kernels as opaque_kernels
from pallas_kernels._sharding import Collective as Collective
from pallas_kernels._sharding import ShardingRule as ShardingRule
from pallas_kernels._target import KernelChoice as KernelChoice
from pallas_kernels.attention import attention as attention
from pallas_kernels.dense_act import dense_act as dense_act
from pallas_kernels.dense_act import gated_dense as gated_dense
from pallas_kernels.layer_norm import layer_norm as layer_norm
from pallas_kernels.linear_cross_entropy import linear_cross_entropy as linear_cross_entropy
from pallas_kernels.rms_norm import rms_norm as rms_norm
from pallas_kernels.softmax_cross_entropy import softmax_cross_entropy as softmax_cross_entropy

__all__ = [
    "Op",
    "KernelChoice",
    "opaque_kernels",
    "ShardingRule",
    "Collective",
    "attention",
    "layer_norm",
    "rms_norm",
    "dense_act",
    "gated_dense",
    "softmax_cross_entropy",
    "linear_cross_entropy",
]
