"""What the Triton kernel wrappers ask of their surroundings: whether Triton's interpreter runs the kernels
(TRITON_INTERPRET=1: on the CPU, with no half-precision dot or arithmetic, so kernels upcast first), and the
precision tl.dot should use for an input dtype (exact fp32 products for fp32 inputs)."""
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"
