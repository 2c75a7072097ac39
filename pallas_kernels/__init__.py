"""Kernel library: attention, norms, dense+activation and cross-entropy, each with Pallas forward
and backward kernels, an XLA implementation, and dispatch between them (see _dispatch.py)."""
from pallas_kernels.attention import attention as attention
from pallas_kernels.cross_entropy import linear_cross_entropy as linear_cross_entropy
from pallas_kernels.cross_entropy import softmax_cross_entropy as softmax_cross_entropy
from pallas_kernels.dense_act import dense_act as dense_act
from pallas_kernels.dense_act import gated_dense as gated_dense
from pallas_kernels.layer_norm import layer_norm as layer_norm
from pallas_kernels.rms_norm import rms_norm as rms_norm

__all__ = [
    "attention",
    "layer_norm",
    "rms_norm",
    "dense_act",
    "gated_dense",
    "softmax_cross_entropy",
    "linear_cross_entropy",
]
