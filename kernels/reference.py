"""Plain-torch reference implementations: the CPU path and the oracle every Triton kernel is tested against.

All math runs in fp32 and results are cast back to the input dtype, which matches HF transformers' fp32
reference to the bit for fp32 inputs.
"""
import torch
import torch.nn.functional as F

from kvserve.kernels.metadata import AttentionMetadata


def store_kvcache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] -> caches [num_blocks, block_size, Hkv, D] at flat slots (slot < 0: skipped)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of one sequence's K or V: [length, Hkv, D]."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D]; GQA by repeating each KV head over Hq // Hkv query heads."""
    out = torch.empty_like(q)
    n_rep = q.shape[1] // k_cache.shape[2]
    cu = meta.cu_seqlens_q_cpu
    for s, ctx in enumerate(meta.seq_lens_cpu):
        lo, hi = cu[s], cu[s + 1]
        q_len = hi - lo
        k = gather_kv(k_cache, meta.block_tables[s], ctx).float().repeat_interleave(n_rep, dim=1)
        v = gather_kv(v_cache, meta.block_tables[s], ctx).float().repeat_interleave(n_rep, dim=1)
        qs = q[lo:hi].float()
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF's RMSNorm; with `residual`, adds it first and also returns the sum (the new residual)."""
    dtype = x.dtype
    if residual is not None:
        x = (x.float() + residual.float()).to(dtype)
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if residual is None else (out, residual)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style (rotate-half) rotary. x: [T, H, D]; cos, sin: [T, D // 2] for the tokens' positions."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2].float(), x[..., d2:].float()
    c, s = cos[:, None, :].float(), sin[:, None, :].float()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def qkv_prep_ref(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hkv) * D] -> q [T, Hq, D]: per-head RMSNorm of q and k (when weights are given), rotary at
    `positions` (cos, sin: [max_positions, D // 2] tables), and K/V stored at `slot_mapping`."""
    t, d = qkv.shape[0], cos.shape[1] * 2
    q, k, v = qkv.split([num_q_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q, k, v = q.reshape(t, num_q_heads, d), k.reshape(t, num_kv_heads, d), v.reshape(t, num_kv_heads, d)
    if q_weight is not None:
        q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    c, s = cos[positions], sin[positions]
    q, k = rotary_ref(q, c, s), rotary_ref(k, c, s)
    store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate then up) -> silu(gate) * up: [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x [T, K], a [L, N, K], slots [T] -> h [1, T, N] fp32: x[t] @ a[slots[t]]^T, zero for slot -1 (one split
    of K: the kernel returns partial sums over several). One masked product per slot rather than a gather, so
    nothing depends on the slot values (CUDA-graph safe)."""
    h = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    xf = x.float()
    for slot in range(a.shape[0]):
        h = torch.where((slots == slot)[:, None], xf @ a[slot].float().T, h)
    return h[None]


def lora_expand_ref(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                    slots: torch.Tensor, shards: list[int]) -> torch.Tensor:
    """In place: y[t, shard s] += (h[t, s*R:(s+1)*R] @ b[slots[t], shard s rows]^T) * scale[slots[t]], with h the
    sum of the shrink's splits [S, T, N]; b is [L, sum(shards), R]. In fp32 this is PEFT's
    `result + lora_B(lora_A(x)) * scaling`, operation for operation."""
    rank = b.shape[2]
    h = h.sum(0)
    parts = [h[:, s * rank:(s + 1) * rank].to(b.dtype).float() for s in range(len(shards))]  # as the kernel rounds
    for slot in range(b.shape[0]):
        mine = (slots == slot)[:, None]
        start = 0
        for s, size in enumerate(shards):
            delta = (parts[s] @ b[slot, start:start + size].float().T) * scale[slot]
            ys = y[:, start:start + size]
            ys.copy_(torch.where(mine, (ys.float() + delta).to(y.dtype), ys))
            start += size
    return y
