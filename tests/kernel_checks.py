"""What the Triton kernel tests share: where they run, the dtypes they try, and how close a kernel's output must
come to its plain-torch reference.

Import it before kvserve.kernels: without CUDA it switches Triton to its interpreter, which must happen before any
Triton kernel is defined (triton.jit picks interpreter or compiler then; conftest.py sets it too, before any test
module is collected)."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
# bf16 arithmetic is wrong in the interpreter; the kernels upcast, but keep CPU runs to what numpy has.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
# Largest error allowed, relative to the largest reference value, against a reference computed in fp32.
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype] * max(scale, 1e-3),
                               rtol=TOL[dtype])
