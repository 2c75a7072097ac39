"""linear_cross_entropy written plainly (it materialises the logits): the oracle for tests."""
from __future__ import annotations

from pallas_kernels.softmax_cross_entropy.reference import softmax_cross_entropy_reference


def linear_cross_entropy_reference(x, w, labels, *, w_layout: str = "dv"):
    """The naive version (materialises the logits); the oracle for tests."""
    logits = x @ (w if w_layout == "dv" else w.T)
    return softmax_cross_entropy_reference(logits, labels)
