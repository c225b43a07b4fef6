"""Each Triton kernel against its plain-torch reference.

On CPU the kernels run in Triton's interpreter at tiny sizes; with a GPU the same tests run compiled, plus the
`gpu`-marked ones at real sizes (contexts up to 32k, bf16) and a CUDA-graph replay of the decode path.
"""
import math

import pytest
import torch

# kernel_checks first: it switches Triton to its interpreter without CUDA, before any kernel is defined.
from kernel_checks import DEVICE, DTYPES, HAS_CUDA, assert_close
from kvserve.kernels import activation, attention, gemv, norm, ops, qkv_prep
from kvserve.kernels import reference as ref
from kvserve.kernels.metadata import AttentionMetadata

GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


def make_batch(specs, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, spare_blocks=3,
               table_width=None):
    """specs: (context length, query length) per sequence. Blocks are shuffled over the pool, and every cache
    position no sequence owns holds NaN, so any read outside a sequence's context poisons the result."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_blocks = [math.ceil(ctx / block_size) for ctx, _ in specs]
    width = table_width or max(max(n_blocks), 1)
    perm = torch.randperm(sum(n_blocks) + spare_blocks, generator=g)
    tables = torch.zeros(len(specs), width, dtype=torch.int32)
    shape = (sum(n_blocks) + spare_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    start = 0
    for s, ((ctx, _), n) in enumerate(zip(specs, n_blocks)):
        tables[s, :n] = perm[start:start + n]
        start += n
        pos = torch.arange(ctx)
        slots = (tables[s, pos // block_size].long() * block_size + pos % block_size).to(DEVICE)
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(ctx, num_kv_heads, head_dim, generator=g).to(
            DEVICE, dtype)
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(ctx, num_kv_heads, head_dim, generator=g).to(
            DEVICE, dtype)
    cu = [0]
    for _, q_len in specs:
        cu.append(cu[-1] + q_len)
    q = torch.randn(cu[-1], num_q_heads, head_dim, generator=g).to(DEVICE, dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.full((cu[-1],), -1, dtype=torch.int64, device=DEVICE),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([ctx for ctx, _ in specs], dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE), max_seqlen_q=max(q_len for _, q_len in specs),
        max_seqlen_k=max(ctx for ctx, _ in specs), cu_seqlens_q_cpu=cu, seq_lens_cpu=[ctx for ctx, _ in specs],
        decode_only=all(q_len == 1 for _, q_len in specs))
    return q, k_cache, v_cache, meta


def attention_ref(q, k_cache, v_cache, meta, scale):
    return ref.paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, scale)


# decode rows, chunked prefill over a cached prefix (spanning several q blocks), fresh prefills, a 1-token context
MIXED = [(37, 1), (80, 17), (25, 25), (1, 1), (130, 40), (64, 1), (19, 3)]
GQA = [(2, 2), (4, 2), (8, 2)]  # (Hq, Hkv): ratios 1, 2, 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", GQA)
def test_paged_attention_mixed_batch(heads, head_dim, dtype):
    q, k_cache, v_cache, meta = make_batch(MIXED, *heads, head_dim, 16, dtype)
    out = attention.paged_attention(q, k_cache, v_cache, meta, head_dim ** -0.5)
    assert out.dtype == dtype
    assert_close(out, attention_ref(q, k_cache, v_cache, meta, head_dim ** -0.5), dtype)


@pytest.mark.parametrize("block_size", [32, 128])
def test_paged_attention_block_sizes(block_size):
    # 32: one key step spans two blocks; 128: a block spans several key steps
    q, k_cache, v_cache, meta = make_batch(MIXED, 6, 2, 64, block_size, torch.float16, seed=1)
    out = attention.paged_attention(q, k_cache, v_cache, meta, 0.125)
    assert_close(out, attention_ref(q, k_cache, v_cache, meta, 0.125), torch.float16)


@pytest.mark.parametrize("heads,head_dim,num_splits", [
    ((2, 2), 64, 4), ((2, 2), 128, 1), ((4, 2), 128, 4), ((4, 2), 64, 1), ((8, 2), 128, 4), ((8, 2), 64, 2)])
def test_paged_attention_decode(heads, head_dim, num_splits):
    # split 4 ways, the 1- and 9-token contexts leave some splits empty
    specs = [(200, 1), (1, 1), (77, 1), (9, 1), (130, 1)]
    q, k_cache, v_cache, meta = make_batch(specs, *heads, head_dim, 16, torch.float16, seed=2)
    assert meta.decode_only
    out = attention.paged_attention(q, k_cache, v_cache, meta, head_dim ** -0.5, num_splits=num_splits)
    assert_close(out, attention_ref(q, k_cache, v_cache, meta, head_dim ** -0.5), torch.float16)


def test_paged_attention_preallocated_and_padding():
    # A captured batch padded with empty sequences: their rows come out 0, not NaN, and the call writes
    # into the given buffers.
    specs = [(200, 1), (0, 1), (45, 1), (0, 1)]
    q, k_cache, v_cache, meta = make_batch(specs, 4, 2, 64, 16, torch.float32, seed=3)
    out = torch.full_like(q, float("nan"))
    workspace = torch.full((attention.workspace_numel(4, 4, 64, 8),), float("nan"), device=DEVICE)
    result = attention.paged_attention(q, k_cache, v_cache, meta, 0.125, out=out, workspace=workspace,
                                       num_splits=8)
    assert result is out
    expected = attention_ref(q, k_cache, v_cache, meta, 0.125)
    assert torch.equal(expected[1], torch.zeros_like(expected[1]))
    assert_close(out, expected, torch.float32)


def test_num_splits_depends_only_on_static_shapes(monkeypatch):
    monkeypatch.setattr(attention, "_sm_count", lambda device: 132)  # an H100
    cuda = torch.device("cuda")

    def splits(num_seqs, table_width, q_len=1, context=40):
        # the lengths are there to show they play no part
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(num_seqs * q_len, dtype=torch.int64),
            cu_seqlens_q=torch.arange(num_seqs + 1, dtype=torch.int32) * q_len,
            seq_lens=torch.full((num_seqs,), context, dtype=torch.int32),
            block_tables=torch.zeros(num_seqs, table_width, dtype=torch.int32), max_seqlen_q=q_len,
            max_seqlen_k=context, cu_seqlens_q_cpu=[i * q_len for i in range(num_seqs + 1)],
            seq_lens_cpu=[context] * num_seqs, decode_only=q_len == 1)
        return attention.num_splits_for(meta, 8, 16, cuda)

    assert splits(8, 2048) == splits(8, 2048, context=30000) == 8  # 8 x 8 programs -> 512 with 8 splits
    assert splits(1, 2048) == attention.MAX_SPLITS
    assert splits(64, 512) == 1  # 512 programs fill an H100
    assert splits(8, 3) == 1  # the table holds 48 tokens: too few to split
    assert splits(8, 64) == 2  # 1024 tokens at most
    assert splits(8, 2048, q_len=3) == 1  # prefill rows never split
    _, _, _, meta = make_batch([(40, 1)], 2, 1, 64, 16, torch.float32)
    assert attention.num_splits_for(meta, 1, 16, torch.device("cpu")) == 1


def qkv_prep_case(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, norm, seed=0, num_blocks=6,
                  max_positions=4096):
    """A fused qkv output, q/k norm weights, rotary tables, positions, distinct slots (two of them padding)
    and caches full of noise, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    weights = [(1 + 0.3 * torch.randn(head_dim, generator=g)).to(dtype) for _ in range(2)] if norm else [None] * 2
    angles = torch.outer(torch.arange(max_positions).float(), torch.rand(head_dim // 2, generator=g) + 0.01)
    positions = torch.randint(0, max_positions, (num_tokens,), generator=g)
    slots = torch.randperm(num_blocks * 16, generator=g)[:num_tokens]
    slots[[1, num_tokens - 2]] = -1
    caches = torch.randn(2, num_blocks, 16, num_kv_heads, head_dim, generator=g).to(dtype)
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return [to(qkv), num_q_heads, num_kv_heads, to(weights[0]), to(weights[1]), 1e-6, to(angles.cos()),
            to(angles.sin()), to(positions), to(caches[0]), to(caches[1]), to(slots)]


def check_qkv_prep(fn, args, dtype):
    expected_caches = args[9].clone(), args[10].clone()
    expected_q = ref.qkv_prep_ref(*args[:9], *expected_caches, args[11])
    before = args[0].clone()
    q = fn(*args)
    assert torch.equal(args[0], before)  # the qkv output is only read
    assert q.shape == expected_q.shape and q.dtype == expected_q.dtype and q.is_contiguous()
    assert_close(q, expected_q, dtype)
    for got, want in zip(args[9:11], expected_caches):
        assert_close(got, want, dtype)  # written slots within tolerance, the others (padding too) untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("norm", [False, True])
def test_qkv_prep(norm, head_dim, dtype):
    check_qkv_prep(qkv_prep.qkv_prep, qkv_prep_case(9, 4, 2, head_dim, dtype, norm), dtype)


def test_qkv_prep_odd_shapes():
    # 3 query heads per KV head, 5 KV heads (not powers of two), head_dim 48 (a half of 24)
    check_qkv_prep(qkv_prep.qkv_prep, qkv_prep_case(5, 15, 5, 48, torch.float32, True, seed=3), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("heads,head_dim,num_splits", [((4, 2), 64, 1), ((4, 2), 128, 4), ((8, 2), 64, 2)])
def test_decode_attention_with_prep(heads, head_dim, num_splits, norm, dtype):
    # A padding row (empty context, slot -1) writes nothing and comes out 0.
    check_decode_prep([(200, 1), (1, 1), (0, 1), (77, 1), (130, 1)], heads, head_dim, num_splits, norm, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 8])
def test_decode_attention_with_prep_real_sizes(batch):
    specs = [(32768 - 999 * i, 1) for i in range(batch - 1)] + [(700, 1)] + [(0, 1)]
    check_decode_prep(specs, (16, 8), 128, None, True, torch.bfloat16)


def check_decode_prep(specs, heads, head_dim, num_splits, norm, dtype):
    """The decode kernel given the raw qkv rows does qkv_prep's work: the same output and cache writes as
    qkv_prep then attention."""
    _, k_cache, v_cache, meta = make_batch(specs, *heads, head_dim, 16, dtype, seed=8)
    args = qkv_prep_case(len(specs), *heads, head_dim, dtype, norm, seed=8, num_blocks=1,
                         max_positions=max(ctx for ctx, _ in specs) + 1)
    qkv, qw, kw, cos, sin = args[0], args[3], args[4], args[6], args[7]
    positions = (meta.seq_lens - 1).clamp(min=0).long()
    table = meta.block_tables.long()
    last = positions.clamp(min=0)
    meta.slot_mapping = table[torch.arange(len(specs), device=DEVICE), last // 16] * 16 + last % 16
    meta.slot_mapping[meta.seq_lens == 0] = -1
    want_k, want_v = k_cache.clone(), v_cache.clone()
    q = ref.qkv_prep_ref(qkv, *heads, qw, kw, 1e-6, cos, sin, positions, want_k, want_v, meta.slot_mapping)
    want = attention_ref(q, want_k, want_v, meta, head_dim ** -0.5)
    # The new token's K/V come from registers, not from the cache they are stored in: no store, same result.
    before = k_cache.clone(), v_cache.clone()
    no_store = attention.Prep(heads[0], qw, kw, 1e-6, cos, sin, torch.full_like(meta.slot_mapping, -1))
    out = attention.paged_attention(qkv, k_cache, v_cache, meta, head_dim ** -0.5, num_splits=num_splits,
                                    prep=no_store)
    assert_close(out, want, dtype)
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip((k_cache, v_cache), before))
    prep = attention.Prep(heads[0], qw, kw, 1e-6, cos, sin, meta.slot_mapping)
    out = attention.paged_attention(qkv, k_cache, v_cache, meta, head_dim ** -0.5, num_splits=num_splits,
                                    prep=prep)
    empty = meta.seq_lens == 0
    assert out.shape == want.shape and torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert_close(out, want, dtype)
    for got, expected in ((k_cache, want_k), (v_cache, want_v)):  # NaN marks slots no sequence owns
        assert torch.equal(got.isnan(), expected.isnan())
        assert_close(got.nan_to_num(), expected.nan_to_num(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(with_residual, hidden, dtype):
    x = torch.randn(7, hidden, device=DEVICE).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    residual = torch.randn(7, hidden, device=DEVICE).to(dtype) if with_residual else None
    out = norm.rms_norm(x, weight, 1e-6, residual)
    expected = ref.rms_norm_ref(x, weight, 1e-6, residual)
    if with_residual:
        assert torch.equal(out[1], expected[1])  # the new residual is the same rounded sum
        out, expected = out[0], expected[0]
    assert out.dtype == expected.dtype
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [96, 1500])
def test_silu_and_mul(inter, dtype):
    x = (3 * torch.randn(4, 2 * inter, device=DEVICE)).to(dtype)
    out = activation.silu_and_mul(x)
    assert out.shape == (4, inter) and out.dtype == dtype
    assert_close(out, ref.silu_and_mul_ref(x.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(64, 32), (37, 1100)])  # ragged: rows and features past a tile's end
@pytest.mark.parametrize("fused", ["none", "norm", "silu", "norm+residual", "silu+residual"])
def test_gemv(n, k, bias, dtype, fused):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, 2 * k if "silu" in fused else k, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    norm = (torch.randn(k, generator=g).to(DEVICE, dtype), 1e-6) if "norm" in fused else None
    res = torch.randn(1, n, generator=g).to(DEVICE, dtype) if "residual" in fused else None
    y = gemv.gemv(x, w, b, norm, "silu" in fused, res)
    assert y.shape == (1, n) and y.dtype == dtype
    # The unfused steps, each rounded to the activation dtype as the layer rounds them.
    inp = ref.rms_norm_ref(x, *norm) if norm else ref.silu_and_mul_ref(x) if "silu" in fused else x
    expected = torch.nn.functional.linear(inp.float(), w.float(), None if b is None else b.float())
    if res is not None:
        expected = expected.to(dtype).float() + res.float()
    assert_close(y, expected, dtype)


def test_gemv_feature_tiles(monkeypatch):
    # Wider inputs than one tile: the loop over feature tiles, each prefetched during the previous one's sum.
    monkeypatch.setattr(gemv, "MAX_BLOCK_K", 256)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, 2200, generator=g), torch.randn(37, 1100, generator=g)
    nw = torch.randn(1100, generator=g)
    for args in [dict(), dict(norm=(nw, 1e-6)), dict(silu=True)]:
        xi = x if args.get("silu") else x[:, :1100]
        inp = ref.rms_norm_ref(xi, nw, 1e-6) if "norm" in args else ref.silu_and_mul_ref(xi) if args else xi
        assert_close(gemv.gemv(xi.to(DEVICE), w.to(DEVICE), **{a: (v[0].to(DEVICE), v[1]) if a == "norm" else v
                                                               for a, v in args.items()}),
                     (inp @ w.T).to(DEVICE), torch.float32)


def test_ops_dispatch(backend, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return "triton"

    monkeypatch.setattr(activation, "silu_and_mul", spy)
    x = torch.randn(3, 8, device=DEVICE)
    backend("torch")
    assert torch.equal(ops.silu_and_mul(x), ref.silu_and_mul_ref(x))
    backend("triton")
    assert ops.silu_and_mul(x) == "triton"
    backend("auto")
    assert (ops.silu_and_mul(x) == "triton") == HAS_CUDA
    assert len(calls) == 1 + HAS_CUDA
    monkeypatch.setattr(gemv, "gemv", spy)
    backend("triton")
    w = torch.randn(5, 8, device=DEVICE)
    assert ops.linear(x[:1], w) == "triton"  # one row: the GEMV
    assert torch.equal(ops.linear(x, w), torch.nn.functional.linear(x, w))  # more rows: cuBLAS / torch
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        backend("cuda")


@pytest.mark.parametrize("name", ["triton", "torch"])
def test_ops_match_reference(name, backend):
    backend(name)
    q, k_cache, v_cache, meta = make_batch(MIXED, 4, 2, 64, 16, torch.float32, seed=4)
    check_qkv_prep(ops.qkv_prep, qkv_prep_case(6, 4, 2, 64, torch.float32, True, seed=4), torch.float32)
    out = torch.empty_like(q)
    assert ops.paged_attention(q, k_cache, v_cache, meta, 0.125, out=out) is out
    assert_close(out, attention_ref(q, k_cache, v_cache, meta, 0.125), torch.float32)
    x, res, w = torch.randn(3, 4, 64, device=DEVICE).unbind(0)
    for got, want in zip(ops.rms_norm(x, w[0], 1e-6, res), ref.rms_norm_ref(x, w[0], 1e-6, res)):
        assert_close(got, want, torch.float32)
    assert_close(ops.silu_and_mul(x), ref.silu_and_mul_ref(x), torch.float32)
    w2 = torch.randn(6, 64, device=DEVICE)
    for rows in (1, 4):
        assert_close(ops.linear(x[:rows], w2, w[1, :6]), x[:rows] @ w2.T + w[1, :6], torch.float32)


def test_ops_odd_head_dim_falls_back(backend):
    backend("triton")
    q, k_cache, v_cache, meta = make_batch([(20, 4), (9, 1)], 2, 1, 48, 16, torch.float32, seed=5)
    out = ops.paged_attention(q, k_cache, v_cache, meta, 0.2)
    assert_close(out, attention_ref(q, k_cache, v_cache, meta, 0.2), torch.float32)


# Real sizes, on the GPU only. A sharper softmax (scale 2.5 / sqrt(D)) makes the output hinge on a few keys
# anywhere in a 32k context, so a skipped tile or split shows.
REAL_MIXED = [(32768, 1), (1000, 1), (4096, 512), (2048, 2048), (17, 1), (9000, 333)]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(16, 8), (32, 8)])
@pytest.mark.parametrize("specs", [
    pytest.param(REAL_MIXED, id="mixed", marks=GPU),
    pytest.param([(32768, 1)] * 8, id="decode-8x32k", marks=GPU),
    pytest.param([(1024 + 7 * i, 1) for i in range(256)], id="decode-256x1k", marks=GPU),
])
def test_paged_attention_real_sizes(specs, heads, head_dim):
    q, k_cache, v_cache, meta = make_batch(specs, *heads, head_dim, 16, torch.bfloat16, seed=6)
    scale = 2.5 / math.sqrt(head_dim)
    out = ops.paged_attention(q, k_cache, v_cache, meta, scale)
    assert_close(out, attention_ref(q, k_cache, v_cache, meta, scale), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_decode_cuda_graph_replay():
    # Capture once, then replay with other lengths and queries: the kernels read lengths on the device.
    specs = [(5000, 1), (20000, 1), (77, 1), (12000, 1)]
    q, k_cache, v_cache, meta = make_batch(specs, 16, 8, 128, 16, torch.bfloat16, seed=7)
    out = torch.empty_like(q)
    workspace = torch.empty(attention.workspace_numel(4, 16, 128, attention.MAX_SPLITS), device=DEVICE)
    ops.paged_attention(q, k_cache, v_cache, meta, 0.1, out=out, workspace=workspace)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_attention(q, k_cache, v_cache, meta, 0.1, out=out, workspace=workspace)
    for lengths in ([4000, 20000, 1, 12000], [5000, 19000, 77, 100]):
        meta.seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        meta.seq_lens_cpu = lengths
        q.copy_(torch.randn_like(q))
        graph.replay()
        assert_close(out, attention_ref(q, k_cache, v_cache, meta, 0.1), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_small_kernels_real_sizes():
    t, hidden, inter, d = 4096, 1024, 3072, 128
    x, res = torch.randn(2, t, hidden, device=DEVICE, dtype=torch.bfloat16).unbind(0)
    w = torch.randn(hidden, device=DEVICE, dtype=torch.bfloat16)
    out, new_res = norm.rms_norm(x, w, 1e-6, res)
    out_ref, res_ref = ref.rms_norm_ref(x, w, 1e-6, res)
    assert torch.equal(new_res, res_ref)
    assert_close(out, out_ref, torch.bfloat16)
    check_qkv_prep(qkv_prep.qkv_prep, qkv_prep_case(t, 16, 8, d, torch.bfloat16, True, num_blocks=2048),
                   torch.bfloat16)
    # Qwen3-0.6B's projections, plain and with what the batch-1 layer folds into each
    nw = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(torch.bfloat16)
    for n, k, fused in [(4096, hidden, "norm"), (hidden, 2048, "residual"), (2 * inter, hidden, "norm"),
                        (hidden, inter, "silu+residual")]:
        row = torch.randn(1, 2 * k if "silu" in fused else k, device=DEVICE, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
        res = torch.randn(1, n, device=DEVICE, dtype=torch.bfloat16) if "residual" in fused else None
        if "silu" not in fused:
            assert_close(gemv.gemv(row, w), row.float() @ w.float().T, torch.bfloat16)
        inp = ref.rms_norm_ref(row, nw, 1e-6) if fused == "norm" else ref.silu_and_mul_ref(row) if "silu" in fused \
            else row
        want = inp.float() @ w.float().T
        if res is not None:
            want = want.to(torch.bfloat16).float() + res.float()
        got = gemv.gemv(row, w, norm=(nw, 1e-6) if fused == "norm" else None, silu="silu" in fused, residual=res)
        assert_close(got, want, torch.bfloat16)
    gate_up = torch.randn(t, 2 * inter, device=DEVICE, dtype=torch.bfloat16)
    assert_close(activation.silu_and_mul(gate_up), ref.silu_and_mul_ref(gate_up.float()), torch.bfloat16)


