"""The built-in fusion passes, one file each."""
from __future__ import annotations


def builtin_passes(implementation=None, platform=None) -> list:
    """The fusion passes in pipeline order, each calling kernels with one `KernelChoice` made
    from `implementation` and `platform` (see `pallas_kernels.KernelChoice`)."""
    from passes.fusion._shared import kernel_choice
    from passes.fusion.attention import attention_pass
    from passes.fusion.cross_entropy import cross_entropy_pass
    from passes.fusion.dense_act import dense_act_pass
    from passes.fusion.norms import layer_norm_pass, rms_norm_pass
    choice = kernel_choice(implementation, platform)
    return [
        attention_pass(choice),
        cross_entropy_pass(choice),
        layer_norm_pass(choice),
        rms_norm_pass(choice),
        dense_act_pass(choice),
    ]
