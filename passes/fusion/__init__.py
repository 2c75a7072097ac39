"""The built-in fusion passes, one file each."""
from __future__ import annotations


def builtin_passes(implementation=None) -> list:
    """The fusion passes in pipeline order, each calling kernels with `implementation`."""
    from passes.fusion.attention import attention_pass
    from passes.fusion.cross_entropy import cross_entropy_pass
    from passes.fusion.dense_act import dense_act_pass
    from passes.fusion.norms import layer_norm_pass, rms_norm_pass
    return [
        attention_pass(implementation),
        cross_entropy_pass(implementation),
        layer_norm_pass(implementation),
        rms_norm_pass(implementation),
        dense_act_pass(implementation),
    ]
