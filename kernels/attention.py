"""Triton paged attention over block tables (mixed prefill + decode batches, GQA, causal).

One kernel serves every batch shape, after vLLM's unified Triton attention: a program owns one KV head and a
block of BLOCK_Q query tokens of one sequence, whose GROUP query heads sharing that KV head are stacked into
BLOCK_M = BLOCK_Q * GROUP rows (padded to tl.dot's 16-row minimum), so each K/V tile is read once per group.
Decode batches with few sequences also split the context over NUM_SPLITS programs ("flash decoding") and a
second kernel merges the partial softmaxes. Decode batches may also hand the kernel the raw qkv
projection (`Prep`), and it does qkv_prep's work for its heads first: at batch 1 every kernel boundary costs
microseconds against a layer's ~10 µs of weight reads.

Launch grids depend only on the number of tokens, sequences and heads (never on sequence lengths, which the
kernel reads from `meta.seq_lens`), so a decode step can be captured in a CUDA graph and replayed.
"""
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kvserve.kernels.env import dot_precision, interpreting, pdl
from kvserve.kernels.metadata import AttentionMetadata

# A split must have enough keys to amortise writing and merging its partial result.
MIN_KEYS_PER_SPLIT = 512
MAX_SPLITS = 64


@triton.jit
def _find_seq(cu_q_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    # Sequence s owns the q blocks starting at cu_q[s] // BLOCK_Q + s (the "+ s" leaves room for each
    # sequence's partial last block), a strictly increasing function of s: binary-search the last start <= pid.
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _rotate_half(x_ptr, rows, row_ok, w_ptr, c, s, eps, HAS_NORM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Heads at x_ptr + rows * HEAD_DIM, per-head RMSNorm'd (with weights) and rotated (neox): [R, HEAD_DIM] fp32,
    the same operations in the same order as kernels/qkv_prep.py."""
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    partner = (d + HALF) % HEAD_DIM  # the other half's element that d rotates with
    mask = row_ok[:, None]
    xa = tl.load(x_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    xb = tl.load(x_ptr + rows[:, None] * HEAD_DIM + partner[None, :], mask=mask, other=0.0)
    dtype = xa.dtype
    xa = xa.to(tl.float32)
    xb = xb.to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(xa * xa, 1) / HEAD_DIM + eps)
        wa = tl.load(w_ptr + d).to(tl.float32)[None, :]
        wb = tl.load(w_ptr + partner).to(tl.float32)[None, :]
        xa = (wa * (xa * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        xb = (wb * (xb * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    first = (d < HALF)[None, :]
    return tl.where(first, xa * c - xb * s, xa * c + xb * s)


@triton.jit(do_not_specialize=["num_seqs"])  # one compiled variant whatever the batch
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
        cu_q_ptr, seq_lens_ptr, block_tables_ptr, scale_log2, num_seqs, num_q_heads,
        q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, slot_ptr, stride_cos, eps,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_bt,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
        DECODE: tl.constexpr, PREP: tl.constexpr, HAS_NORM: tl.constexpr, UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # see kernels/gemv.py: nothing to load before the previous kernel is done
        gdc_launch_dependents()
        gdc_wait()
    # KV heads vary fastest, so the programs reading the heads of one cache block run side by side.
    kv_head = tl.program_id(0)
    pid = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:  # one query per sequence: no search, no idle programs
        seq = pid
        q_start = pid
        q_len = 1
        q_block = 0
    else:
        seq = _find_seq(cu_q_ptr, pid, num_seqs, BLOCK_Q)
        q_start = tl.load(cu_q_ptr + seq)
        q_len = tl.load(cu_q_ptr + seq + 1) - q_start
        q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:  # the grid over-counts q blocks by up to one per sequence
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # cache position of the sequence's first query row

    # Row r holds query token q_block * BLOCK_Q + r // GROUP for query head kv_head * GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    q_tok = q_block * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_tok < q_len)
    q_pos = first_pos + q_tok
    q_row = (q_start + q_tok).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    if PREP:
        # q_ptr holds the raw qkv rows: norm and rotate this group's q heads and this KV head's new k here
        # (kernels/qkv_prep.py's work, one kernel fewer a layer); the new K/V join after the KV loop from
        # registers, and split 0 stores them for later steps.
        qkv_row = q_ptr + q_start.to(tl.int64) * stride_qt
        tok_pos = tl.maximum(seq_len - 1, 0)  # a decode row sits at the end of its context (padding: empty)
        dc = tl.arange(0, HEAD_DIM) % (HEAD_DIM // 2)
        cos = tl.load(cos_ptr + tok_pos * stride_cos + dc).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + tok_pos * stride_cos + dc).to(tl.float32)[None, :]
        q = _rotate_half(qkv_row, head, row_ok, q_w_ptr, cos, sin, eps, HAS_NORM, HEAD_DIM)
        q = q.to(k_cache_ptr.dtype.element_ty)
        one = tl.arange(0, 1)
        k_new = _rotate_half(qkv_row + num_q_heads * HEAD_DIM, kv_head + one, one == 0, k_w_ptr, cos, sin, eps,
                             HAS_NORM, HEAD_DIM)
        k_new = tl.sum(k_new, 0).to(k_cache_ptr.dtype.element_ty)  # [HEAD_DIM]: one row
        v_new = tl.load(qkv_row + (num_q_heads + num_q_heads // GROUP + kv_head) * HEAD_DIM + d)
        v_new = v_new.to(v_cache_ptr.dtype.element_ty)
        slot = tl.load(slot_ptr + q_start)
        if (split == 0) & (slot >= 0):
            dst = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_ks + kv_head * stride_kh + d
            tl.store(k_cache_ptr + dst, k_new)
            tl.store(v_cache_ptr + (slot // BLOCK_SIZE) * stride_vb + (slot % BLOCK_SIZE) * stride_vs
                     + kv_head * stride_vh + d, v_new)
        if UPCAST:
            k_new = k_new.to(tl.float32)
            v_new = v_new.to(tl.float32)
    else:
        q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
    if UPCAST:  # the interpreter has no bf16 arithmetic
        q = q.to(tl.float32)

    # Keys visible to this q block: everything up to its last query's position.
    kv_end = tl.minimum(seq_len, first_pos + (q_block + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    if NUM_SPLITS == 1:
        tile_lo = 0
        tile_hi = num_tiles
    else:
        per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        tile_lo = split * per_split
        tile_hi = tl.minimum(tile_lo + per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    # With PREP the new token (the last position) joins after the loop, from registers: the loop stays the
    # plain one (patching it into the tiles cost 45 % at 8 x 32k).
    kv_stop = kv_end - 1 if PREP else kv_end
    for tile in range(tile_lo, tile_hi):
        pos = tile * BLOCK_N + offs_n
        pos_ok = pos < kv_stop
        # Per-position block lookup, so a tile may span blocks (block_size < BLOCK_N) or part of one.
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        in_block = pos % BLOCK_SIZE
        k = tl.load(k_cache_ptr + block[None, :] * stride_kb + in_block[None, :] * stride_ks
                    + kv_head * stride_kh + d[:, None], mask=pos_ok[None, :], other=0.0)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + in_block[:, None] * stride_vs
                    + kv_head * stride_vh + d[None, :], mask=pos_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        if PREP:  # decode: every key before the new one is visible
            s = tl.where(pos_ok[None, :], s, float("-inf"))
        else:  # causal: pos <= q_pos also keeps pos < kv_end for every real row
            s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if PREP:
        if (split == 0) & (seq_len > 0):  # any one split may add it: the merge does not care which
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale_log2
            m_new = tl.maximum(m_i, s_new)
            p_new = tl.exp2(s_new - m_new)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l == 0 only for empty (padding) sequences
        tl.store(out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (q_row * num_q_heads + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, stride_ot, stride_oh, num_q_heads,
                         NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr):
    # A second kernel rather than the last split merging in place (a ticket per group): that version ran 17 %
    # slower at 8 x 32k and no faster at batch 1 (bench/kernels.py, docs/PERF.md).
    if PDL:  # see kernels/gemv.py: nothing to load before the previous kernel is done
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    part = (t * num_q_heads + h) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    m = tl.load(part_m_ptr + part)
    l = tl.load(part_l_ptr + part)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits weigh 0
    l_sum = tl.sum(w * l, 0)
    acc = tl.sum(tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :]) * w[:, None], 0)
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits_for(meta: AttentionMetadata, num_kv_heads: int, block_size: int, device: torch.device) -> int:
    """Split-KV factor for a batch: a function of the batch size and the block-table width only, so it is
    fixed for a captured decode graph. Splits fill the GPU (about four programs per SM) when there are too
    few (sequence, KV head) pairs, but each split keeps at least MIN_KEYS_PER_SPLIT keys of the longest
    context the block table can hold."""
    if not meta.decode_only or device.type != "cuda":
        return 1
    programs = meta.seq_lens.shape[0] * num_kv_heads
    by_occupancy = 4 * _sm_count(device) // max(programs, 1)
    by_context = meta.block_tables.shape[1] * block_size // MIN_KEYS_PER_SPLIT
    limit = min(by_occupancy, by_context, MAX_SPLITS)
    return 1 << (limit.bit_length() - 1) if limit >= 2 else 1


def workspace_numel(num_tokens: int, num_q_heads: int, head_dim: int, num_splits: int) -> int:
    """fp32 elements of scratch the split path needs (partial outputs, maxima and sums)."""
    return num_tokens * num_q_heads * num_splits * (head_dim + 2)


@dataclass(frozen=True)
class Tiles:
    block_m: int  # minimum rows per program (query tokens x GROUP heads); tl.dot needs 16
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int


def tiles_for(head_dim: int, decode: bool, dtype: torch.dtype = torch.bfloat16) -> Tiles:
    """Decode rows are memory-bound: 16 padded rows (Hopper's mma.sync path) with 128-key K/V steps, 8 warps
    and 4 stages: the best of bench/kernels.py --sweep on the H100 at all three shapes (docs/PERF.md), 1-2 %
    ahead of 32-key steps with 4 warps. Prefill rows are compute-bound: 64 rows (wgmma) reuse each K/V step.
    fp32 caches take half the keys a step (the stages must fit in shared memory)."""
    wide = torch.empty((), dtype=dtype).element_size() > 2
    if decode:
        return Tiles(16, 32, 4, 3) if wide else Tiles(16, 128, 8, 4)
    return Tiles(64, 64 if head_dim <= 128 and not wide else 32, 4, 3)


@dataclass(frozen=True)
class Prep:
    """What qkv_prep needs, for the decode kernel that does its work itself."""
    num_q_heads: int
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None
    eps: float
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, out: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
                    num_splits: int | None = None, tiles: Tiles | None = None,
                    prep: Prep | None = None) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D]; same contract as paged_attention_ref.

    out: optional preallocated result. workspace: optional fp32 scratch of at least workspace_numel(...)
    elements for the split path. num_splits, tiles: overrides of num_splits_for and tiles_for (for tuning).
    prep (decode batches only): q is then the raw qkv projection [T, (Hq + 2 Hkv) * D] and the kernel does
    qkv_prep's work (q/k norm, rotary, K/V store) itself.
    """
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_tokens = q.shape[0]
    num_q_heads = prep.num_q_heads if prep else q.shape[1]
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and the KV cache must share a dtype"
    assert head_dim == triton.next_power_of_2(head_dim) and head_dim >= 16, "head_dim must be a power of two"
    assert block_size == triton.next_power_of_2(block_size), "block_size must be a power of two"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if prep:
        assert meta.decode_only and q.shape[1] == (num_q_heads + 2 * num_kv_heads) * head_dim
        assert prep.cos.stride() == prep.sin.stride() and prep.cos.shape[1] * 2 == head_dim
    if out is None:
        out = torch.empty(num_tokens, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    num_seqs = meta.seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    decode = meta.decode_only
    assert not decode or num_tokens == num_seqs, "decode_only batches hold one query per sequence"
    if num_splits is None:
        num_splits = num_splits_for(meta, num_kv_heads, block_size, q.device)
    assert num_splits == triton.next_power_of_2(num_splits)

    tiles = tiles or tiles_for(head_dim, decode, q.dtype)
    block_m = max(tiles.block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    # Upper bound on the q blocks of all sequences without reading their lengths.
    num_q_blocks = num_seqs if decode else num_tokens // block_q + num_seqs
    assert num_q_blocks < 65536, "too many tokens in one batch for the launch grid's second axis"

    if num_splits > 1:
        n = workspace_numel(num_tokens, num_q_heads, head_dim, num_splits)
        if workspace is None:
            workspace = torch.empty(n, dtype=torch.float32, device=q.device)
        assert workspace.dtype == torch.float32 and workspace.numel() >= n, "workspace too small"
        rows = num_tokens * num_q_heads * num_splits
        part_acc, part_m, part_l = workspace[:n].split([rows * head_dim, rows, rows])
    else:
        part_acc = part_m = part_l = out  # never touched
    p = prep or Prep(num_q_heads, None, None, 0.0, out, out, meta.slot_mapping)  # unused when no prep
    use_pdl = pdl(q.device)
    _paged_attention_kernel[(num_kv_heads, num_q_blocks, num_splits)](
        q, k_cache, v_cache, out, part_acc, part_m, part_l,
        meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, scale * math.log2(math.e), num_seqs, num_q_heads,
        p.q_weight if p.q_weight is not None else q, p.k_weight if p.k_weight is not None else q,
        p.cos, p.sin, p.slot_mapping, p.cos.stride(0), p.eps,
        q.stride(0), q.stride(1) if not prep else head_dim, out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=tiles.block_n, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, NUM_SPLITS=num_splits, DECODE=decode, PREP=prep is not None,
        HAS_NORM=p.q_weight is not None, UPCAST=interpreting(), DOT_PRECISION=dot_precision(q.dtype), PDL=use_pdl,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, launch_pdl=use_pdl)
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            out, part_acc, part_m, part_l, out.stride(0), out.stride(1), num_q_heads,
            NUM_SPLITS=num_splits, HEAD_DIM=head_dim, PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return out
