"""`layer_norm` and `rms_norm`: normalisation over the last axis -> `pallas_kernels`.

Spellings covered (after canonicalization), each with or without scale and bias:
- LayerNorm: (x - mean) times rsqrt(var + eps), or divided by sqrt(var + eps), or times
  1/sqrt(...) or (...)**-0.5, the factors in any order and association; var two-pass
  (mean((x - mean)^2), `jnp.var`) or E[x^2] - E[x]^2 (Flax's fast variance, with its max(., 0));
  means as sum/n or sum*(1/n), with keepdims reshapes/broadcasts anywhere on the statistics.
- RMSNorm: x times rsqrt(mean(x^2) + eps) (and the division forms), Flax's `x - 0`, scale as
  `w` or `(1 + w)` (Gemma).
- Casts: x upcast to float32 and the result cast back (Flax `dtype=bfloat16`) becomes one kernel
  call on the bf16 x; scale and bias are handed over in the dtype they were rounded to.
Only reductions over the last axis match; the eps must be a constant.
"""
from __future__ import annotations

import numpy as np
from jax import lax

from passes.fusion._shared import described, kernel_choice
from passes.pattern import (Alt, Capture, Cast, Inverse, Keep, Lit, OptionalFactor, PatternRule,
                            Prim, Product, RowVector, Same, Wildcard, fresh, is_floating,
                            maybe_cast, row_values)
from passes.pipeline import RulePass
from passes.rewrite import NoMatch


def _last_axis(axes, eqn):
    want = (len(eqn.invars[0].aval.shape) - 1,)
    return True if tuple(axes) == want else f"{tuple(axes)} != {want}"


def mean_last(p):
    """The mean of `p` over its last axis: sum/n or sum*(1/n), keepdims and casts allowed."""
    src, n = fresh("summed"), fresh("n")
    total = Keep(Prim(lax.reduce_sum_p, Capture(src, maybe_cast(p)), params={"axes": _last_axis}))

    def count(reciprocal):
        def check(atom, b):
            d, c = b[src].aval.shape[-1], b[n]
            ok = abs(c * d - 1) <= 1e-6 if reciprocal else c == d
            return True if ok else f"divides by {1 / c if reciprocal else c} over an axis of {d}"
        return check

    return maybe_cast(Keep(Alt(
        Prim(lax.div_p, total, Lit(name=n)).where(count(False), "mean"),
        Prim(lax.mul_p, total, Lit(name=n)).where(count(True), "mean"))))


def square(p):
    t = fresh("sq")
    return Alt(Prim(lax.square_p, p), Prim(lax.integer_pow_p, p, params={"y": 2}),
               Prim(lax.mul_p, Capture(t, p), Same(t)), Prim(lax.pow_p, p, Lit(2.0)))


def inverse_root(statistic):
    """1 / sqrt(statistic + eps) in its spellings, as a factor of a `Product`."""
    plus_eps = Keep(Prim(lax.add_p, Keep(statistic),
                         Lit(name="eps", where=lambda v: v >= 0 or "eps is negative")))
    return Alt(Keep(Prim(lax.rsqrt_p, plus_eps)),
               Keep(Prim(lax.div_p, Lit(1.0), Prim(lax.sqrt_p, plus_eps))),
               Keep(Prim(lax.pow_p, plus_eps, Lit(-0.5))),
               Inverse(Keep(Prim(lax.sqrt_p, plus_eps))))


def _scale():
    return OptionalFactor(Alt(Prim(lax.add_p, RowVector("scale"), Lit(name="scale_offset"),
                             name="scale_plus_offset"),
                        RowVector("scale")))


def layer_norm_pattern():
    x = Wildcard("x", dtype=is_floating)
    # The variance usually reuses the centered x and the mean (CSE merged them): the identity
    # check comes first, a separate computation of the same is matched in full.
    mean = Alt(Same("mean"), mean_last(Same("x")))
    centered = Alt(Same("centered"), Prim(lax.sub_p, Same("x"), mean))
    two_pass = mean_last(square(centered))
    fast = Prim(lax.sub_p, mean_last(square(Same("x"))), square(mean))
    variance = Alt(two_pass, Prim(lax.max_p, fast, Lit(0.0)), fast)
    normalized = Product(Prim(lax.sub_p, x, Capture("mean", mean_last(Same("x"))), name="centered"),
                         inverse_root(variance), _scale())
    return Alt(Prim(lax.add_p, normalized, RowVector("bias"), commutative=True), normalized)


def rms_norm_pattern():
    mean_square = mean_last(square(Wildcard("x", dtype=is_floating)))
    return Product(inverse_root(mean_square),
                   Alt(Prim(lax.sub_p, Same("x"), Lit(0.0)), Same("x")), _scale())


def _check(b):
    """Shapes agree with a last-axis norm; absorb an upcast of x that the result undoes."""
    x, out = b["x"], b.root
    if tuple(out.aval.shape) != tuple(x.aval.shape):
        return NoMatch("the result {} is broadcast beyond x {}", out.aval.shape, x.aval.shape)
    d = x.aval.shape[-1]
    for name in ("scale", "bias"):
        v = b.get(name)
        if v is not None and v.aval.shape[-1] not in (1, d):
            return NoMatch("{} has {} entries for {} features", name, v.aval.shape[-1], d)
    if np.dtype(x.aval.dtype).itemsize > 4:
        return f"the kernel computes in float32; this norm runs in {x.aval.dtype}"
    cast = b.producer(x)
    if (cast is not None and cast.primitive is lax.convert_element_type_p
            and cast.invars[0].aval.dtype == out.aval.dtype and b.used_only_inside(x)):
        b.consume(x)
        b["x"] = cast.invars[0]
    return None


def _params(implementation, platform):
    impl = kernel_choice(implementation, platform)

    def params(b):
        offset = b.get("scale_offset")
        offset_dtype = None
        if offset is not None:
            offset_dtype = np.dtype(b["scale_plus_offset"].aval.dtype).name
        return {"eps": float(b["eps"]), "out_dtype": np.dtype(b.root.aval.dtype).name,
                "scale_offset": offset, "offset_dtype": offset_dtype, "implementation": impl}
    return params


def _scale_values(scale, d, scale_offset, offset_dtype):
    scale = row_values(scale, d)
    if scale is not None and scale_offset is not None:
        scale = scale.astype(offset_dtype) + np.asarray(scale_offset, offset_dtype)
    return scale


def layer_norm_replacement(x, scale=None, bias=None, *, eps, out_dtype, scale_offset,
                           offset_dtype, implementation):
    import pallas_kernels
    d = x.shape[-1]
    y = pallas_kernels.layer_norm(x, _scale_values(scale, d, scale_offset, offset_dtype),
                                  row_values(bias, d), eps=eps, implementation=implementation)
    return y.astype(out_dtype)


def rms_norm_replacement(x, scale=None, *, eps, out_dtype, scale_offset, offset_dtype,
                         implementation):
    import pallas_kernels
    d = x.shape[-1]
    y = pallas_kernels.rms_norm(x, _scale_values(scale, d, scale_offset, offset_dtype), eps=eps,
                                implementation=implementation)
    return y.astype(out_dtype)


def _norm_pass(name, pattern, replacement, inputs, implementation, platform):
    params = _params(implementation, platform)
    return RulePass(name, [
        # Rooted at the cast back to x's dtype, so one kernel call reads and writes bf16.
        PatternRule(f"{name}_cast", Cast(pattern), replacement, inputs=inputs, params=params,
                    check=_check, priority=1),
        PatternRule(name, pattern, replacement, inputs=inputs, params=params, check=_check),
    ])


def layer_norm_pass(implementation=None, platform=None) -> RulePass:
    """The `layer_norm` pass: LayerNorm spellings -> `pallas_kernels.layer_norm`."""
    return described(_norm_pass("layer_norm", layer_norm_pattern(), layer_norm_replacement,
                                ("x", "scale", "bias"), implementation, platform),
                     "(x - mean) * rsqrt(var + eps) [* scale] [+ bias] over the last axis "
                     "(Flax/NNX LayerNorm, hand-written) -> pallas_kernels.layer_norm")


def rms_norm_pass(implementation=None, platform=None) -> RulePass:
    """The `rms_norm` pass: RMSNorm spellings -> `pallas_kernels.rms_norm`."""
    return described(_norm_pass("rms_norm", rms_norm_pattern(), rms_norm_replacement,
                                ("x", "scale"), implementation, platform),
                     "x * rsqrt(mean(x**2) + eps) [* scale] over the last axis (RMSNorm) -> "
                     "pallas_kernels.rms_norm")
