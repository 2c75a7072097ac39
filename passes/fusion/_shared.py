"""Matching helpers the fusion passes share: kernel lookup, dot_general dimension numbers and
precision, and constant evaluation of mask-like subgraphs."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from passes import _compat as C

# Bounds on evaluating a constant subgraph at rewrite time.
_MAX_CONSTANT_ELEMENTS = 1 << 27
_MAX_CONSTANT_EQNS = 256


def kernel(name: str):
    """`pallas_kernels.<name>`, imported when a replacement is traced (the kernels never import
    the compiler, and the compiler loads them only when it needs them)."""
    import pallas_kernels

    return getattr(pallas_kernels, name)


def kernel_choice(implementation=None, platform=None):
    """The one `pallas_kernels.KernelChoice` (implementation, platform, interpret) a pass hands
    every kernel it calls, normalised here once; a KernelChoice passes through."""
    from pallas_kernels._target import KernelChoice

    return KernelChoice.of(implementation, platform)


def described(rule_pass, text: str):
    """`rule_pass` with a one-line `description` (what it matches, what it calls), for listings."""
    rule_pass.description = text
    return rule_pass


def dot_dims(eqn):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    return (tuple(int(d) for d in lc), tuple(int(d) for d in rc),
            tuple(int(d) for d in lb), tuple(int(d) for d in rb))


# dot algorithm presets / precisions that ask for more than TF32 from float32 operands; the
# kernels multiply float32 in TF32 on GPUs.
_EXACT_F32 = frozenset({"HIGH", "HIGHEST", "F32_F32_F32", "BF16_BF16_F32_X3", "BF16_BF16_F32_X6",
                        "BF16_BF16_F32_X9", "TF32_TF32_F32_X3", "F64_F64_F64"})
_KNOWN_PRECISIONS = frozenset({"DEFAULT", "F16_F16_F16", "F16_F16_F32", "BF16_BF16_BF16",
                               "BF16_BF16_F32", "TF32_TF32_F32"}) | _EXACT_F32


def _precision_names(precision):
    if precision is None:
        return []
    if isinstance(precision, (tuple, list)):
        return [n for p in precision for n in _precision_names(p)]
    name = getattr(precision, "name", None)
    return [name if name is not None else str(precision)]


def precision_problem(eqn, *, operand_dtype=False) -> str | None:
    """Why the kernels cannot honour this dot_general's precision settings (None if they can):
    the one precision policy of the fusion passes.

    The kernels accumulate in float32 and multiply float32 in TF32 on GPUs, so a wider
    accumulation, a precision above TF32 on float32 operands, or one they do not implement is
    declined. With `operand_dtype` (dense_act's kernels, which multiply and return the operands'
    own dtype at the default precision), so are mixed operand dtypes, operands wider than float32,
    any precision but the default, and a preferred_element_type or result of another dtype.
    """
    x, w = eqn.invars[:2]
    in_dtype = jnp.dtype(x.aval.dtype)
    pet = eqn.params.get("preferred_element_type")
    names = _precision_names(eqn.params.get("precision"))
    if operand_dtype:
        out_dtype = jnp.dtype(eqn.outvars[0].aval.dtype)
        if in_dtype != jnp.dtype(w.aval.dtype):
            return f"the matmul mixes {x.aval.dtype} and {w.aval.dtype} operands"
        if in_dtype.itemsize > 4:
            return f"the kernel accumulates in float32; this matmul runs in {in_dtype}"
        if any(name != "DEFAULT" for name in names):
            return (f"dot_general precision={eqn.params['precision']} asks for more than the "
                    f"kernel's default")
        if pet is not None and jnp.dtype(pet) != out_dtype:
            return f"dot_general preferred_element_type={jnp.dtype(pet)} differs from its result"
        if out_dtype != in_dtype:
            return f"the matmul returns {out_dtype} from {in_dtype} operands"
    if pet is not None and (not jnp.issubdtype(pet, jnp.floating) or jnp.dtype(pet).itemsize > 4):
        return (f"preferred_element_type={jnp.dtype(pet).name} on {in_dtype.name} operands; the "
                f"kernel accumulates in float32")
    wide = in_dtype.itemsize >= 4
    for name in names:
        if name not in _KNOWN_PRECISIONS:
            return f"precision {name}, which the kernel does not implement"
        if wide and name in _EXACT_F32:
            return (f"precision {name} on {in_dtype.name} operands; the kernel multiplies "
                    f"float32 in TF32 on GPUs")
    return None


def constant_value(region, atom):
    """The value of `atom` if it is computable from literals, iotas and known constants.

    Values (and the verdict "not constant") are cached on the region: after CSE every layer's
    mask is the same variable, so a deep model evaluates its mask once.
    """
    if isinstance(atom, C.Literal):
        return np.asarray(atom.val, dtype=atom.aval.dtype)
    memo = region.cache.setdefault("constant_value", {})
    if atom not in memo:
        try:
            with jax.ensure_compile_time_eval():
                _constant(region, atom, memo, [0])
        except _NotConstant:
            memo[atom] = None
    return memo[atom]


class _NotConstant(Exception):
    pass


def _constant(region, atom, memo, count):
    if isinstance(atom, C.Literal):
        return np.asarray(atom.val, dtype=atom.aval.dtype)
    if atom in memo:
        if memo[atom] is None:
            raise _NotConstant
        return memo[atom]
    pos = region.producer(atom)
    if pos is None:
        consts = C.closed_consts(region.container)
        if atom in region.constvars and len(consts) == len(region.constvars):
            value = np.asarray(consts[region.constvars.index(atom)])
            memo[atom] = value
            return value
        raise _NotConstant
    eqn = region.eqns[pos]
    count[0] += 1
    if (eqn.effects or count[0] > _MAX_CONSTANT_EQNS or eqn.primitive in C.NESTED_PRIMITIVES
            or any(math.prod(v.aval.shape) > _MAX_CONSTANT_ELEMENTS for v in eqn.outvars)):
        raise _NotConstant
    args = [_constant(region, a, memo, count) for a in eqn.invars]
    outs = C.eqn_bind(eqn, [jnp.asarray(a) for a in args])
    for v, val in zip(eqn.outvars, outs):
        memo[v] = np.asarray(val)
    return memo[atom]
