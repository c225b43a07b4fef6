"""What the Triton kernel wrappers ask of their surroundings: whether Triton's interpreter runs the kernels
(TRITON_INTERPRET=1: on the CPU, with no half-precision dot or arithmetic, so kernels upcast first), the
precision tl.dot should use for an input dtype (exact fp32 products for fp32 inputs), and whether launches may
use programmatic dependent launch."""
import functools
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _pdl_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper and later): a kernel launched with it starts while the previous
    one finishes, and must call gdc_wait (in every program, before touching anything the previous kernels
    write) -- see the PDL note in kernels/gemv.py. The decode kernels use it so that launch latency and the
    next projection's weight reads overlap the current kernel's tail."""
    if os.environ.get("KVSERVE_PDL", "1") == "0":  # off: each kernel's own duration shows in a profile
        return False
    if device.type != "cuda" or interpreting():
        return False
    return _pdl_device(torch.cuda.current_device() if device.index is None else device.index)
