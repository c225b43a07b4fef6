"""Fused RMSNorm with optional residual add: one pass over each row instead of torch's six kernels."""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kvserve.kernels.env import pdl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # see kernels/gemv.py: nothing to load before the previous kernel is done
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the activation dtype first, as the reference (and HF) do.
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n + eps)
    h = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as rms_norm_ref: normalises over the last dim; with `residual`, returns (out, x + residual)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res2 = x2 if residual is None else residual.reshape(-1, n)
    if res2.stride(-1) != 1:
        res2 = res2.contiguous()
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if rows:
        block = triton.next_power_of_2(n)
        use_pdl = pdl(x.device)
        _rms_norm_kernel[(rows,)](
            x2, res2, weight, out, res_out, x2.stride(0), res2.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=use_pdl, num_warps=min(max(block // 256, 1), 16),
            launch_pdl=use_pdl)
    return out if residual is None else (out, res_out)
