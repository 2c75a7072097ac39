"""Rewrite passes over jaxprs: find idioms in traced programs and swap in fused kernels."""
from passes import testing
from passes.api import VerificationError, explain, optimize
from passes.canonicalize import Canonicalize
from passes.cse import CommonSubexpressionElimination
from passes.dce import DeadCodeElimination
from passes.pipeline import (Context, FixpointError, Pass, Pipeline, RewriteError, RulePass)
from passes.report import Report
from passes.rewrite import FunctionRule, Match, NoMatch, Rule


def cleanup_passes() -> list[Pass]:
    """canonicalize, cse, dce: the clean-ups every pipeline starts with."""
    return [Canonicalize(), CommonSubexpressionElimination(), DeadCodeElimination()]


def default_pipeline(implementation=None, platform=None, **pipeline_options) -> Pipeline:
    """The clean-ups, then every built-in fusion pass.

    Args:
      implementation: handed to every kernel the fusion passes call (None, "pallas", "cudnn",
        "xla"); "pallas" on a CPU gives `pallas_call`s in interpret mode.
      platform: the kernels' target, None (PALLAS_KERNELS_PLATFORM, else the default backend),
        "gpu", "tpu" or "cpu"; on a host without it Pallas kernels run in its interpret mode,
        or lower for it with PALLAS_KERNELS_INTERPRET=0 (for `jax.export`).
      pipeline_options: `Pipeline` keyword arguments (disable, sites, check, validate,
        dump_dir, debug).
    """
    from passes.fusion import builtin_passes
    return Pipeline(cleanup_passes() + builtin_passes(implementation, platform),
                    **pipeline_options)


__all__ = [
    "Canonicalize", "CommonSubexpressionElimination", "Context", "DeadCodeElimination",
    "FixpointError", "FunctionRule", "Match", "NoMatch", "Pass", "Pipeline", "Report",
    "RewriteError", "Rule", "RulePass", "VerificationError", "cleanup_passes",
    "default_pipeline", "explain", "optimize", "testing",
]
