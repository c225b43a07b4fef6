"""Decode attention: our paged kernel against torch SDPA on the same shapes with contiguous KV.

    python bench/kernels.py            # from the repository root, with kvserve installed
    python bench/kernels.py --sweep    # also time other tile shapes and split factors

Shapes (batch x context): 256 x 1024, 64 x 8192, 8 x 32768; 16 query heads, 8 KV heads, head_dim 128, bf16,
one query token per sequence. Our KV sits in a paged cache of 16-token blocks in shuffled order; SDPA gets
contiguous [B, Hkv, ctx, D] tensors and enable_gqa=True, so both read the same bytes: K and V of the 8 KV heads.
Bandwidth = those bytes / time. SDPA runs on each of its fused backends (flash, memory-efficient, cuDNN)
that accepts the shapes, and the fastest counts. Both sides are timed as CUDA-graph replays (the engine
replays decode steps from graphs), falling back to plain launches if capture fails.
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvserve.kernels import attention
from kvserve.kernels.metadata import AttentionMetadata

SHAPES = [(256, 1024), (64, 8192), (8, 32768)]
DEVICE = "cuda"
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 16
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}
SWEEP_TILES = [attention.Tiles(16, n, w, s) for n, w, s in
               [(16, 4, 5), (32, 4, 4), (32, 4, 6), (64, 4, 5), (64, 8, 5), (128, 8, 4)]] + [
    attention.Tiles(64, 64, 4, 3)]


def time_ms(fn) -> tuple[float, str]:
    fn()
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"), "cuda-graph"
    except Exception:  # a backend that cannot be captured still gets a number
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"), "launch"


def build(batch: int, context: int):
    """Same K/V twice: contiguous for SDPA and scattered over shuffled cache blocks for us."""
    dev, dt = DEVICE, torch.bfloat16
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device=dev, dtype=dt)
    k = torch.randn(batch, NUM_KV_HEADS, context, HEAD_DIM, device=dev, dtype=dt)
    v = torch.randn_like(k)
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    tables = torch.randperm(batch * blocks_per_seq, device=dev).view(batch, blocks_per_seq).int()
    cache_shape = (batch * blocks_per_seq, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.empty(cache_shape, device=dev, dtype=dt)
    v_cache = torch.empty_like(k_cache)
    pos = torch.arange(context, device=dev)
    slots = (tables[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE).flatten()
    k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = k.transpose(1, 2).flatten(0, 1)
    v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = v.transpose(1, 2).flatten(0, 1)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.int64, device=dev),
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=dev), block_tables=tables,
        max_seqlen_q=1, max_seqlen_k=context, cu_seqlens_q_cpu=list(range(batch + 1)),
        seq_lens_cpu=[context] * batch, decode_only=True)
    return q, k, v, k_cache, v_cache, meta


def bench_shape(batch: int, context: int, sweep: bool) -> dict:
    q, k, v, k_cache, v_cache, meta = build(batch, context)
    scale = HEAD_DIM ** -0.5
    kv_bytes = 2 * k.numel() * k.element_size()
    out = torch.empty_like(q)
    workspace = torch.empty(attention.workspace_numel(batch, NUM_Q_HEADS, HEAD_DIM, attention.MAX_SPLITS),
                            device=DEVICE)

    def ours(tiles=None, num_splits=None):
        return attention.paged_attention(q, k_cache, v_cache, meta, scale, out=out, workspace=workspace,
                                         tiles=tiles, num_splits=num_splits)

    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
    sdpa_times, sdpa_out = {}, None
    for name, backend in SDPA_BACKENDS.items():
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)
        try:
            sdpa_out = sdpa()
        except RuntimeError:  # this backend does not take these shapes
            continue
        sdpa_times[name] = time_ms(sdpa)
    if not sdpa_times:
        raise SystemExit(f"no fused SDPA backend accepts {batch}x{context} with enable_gqa")

    ours()
    expected = sdpa_out.squeeze(2).float()
    err = ((out.float() - expected).abs().max() / expected.abs().max()).item()
    assert err < 2e-2, f"our output differs from SDPA's by {err:.3g} (relative) at {batch}x{context}"
    our_ms, how = time_ms(ours)
    sdpa_name = min(sdpa_times, key=lambda n: sdpa_times[n][0])
    sdpa_ms = sdpa_times[sdpa_name][0]
    splits = attention.num_splits_for(meta, NUM_KV_HEADS, BLOCK_SIZE, q.device)
    row = {"batch": batch, "context": context, "ours_ms": our_ms, "sdpa_ms": sdpa_ms, "sdpa_backend": sdpa_name,
           "ours_tb_s": kv_bytes / our_ms / 1e9, "sdpa_tb_s": kv_bytes / sdpa_ms / 1e9,
           "ratio": sdpa_ms / our_ms, "num_splits": splits, "timing": how, "max_rel_err_vs_sdpa": err,
           "sdpa_all_ms": {n: t for n, (t, _) in sdpa_times.items()}}
    if sweep:
        results = {}
        for tiles in SWEEP_TILES:
            for num_splits in (1, 2, 4, 8, 16, 32, 64):
                if batch * NUM_KV_HEADS * num_splits > 16 * 1024:
                    continue
                key = f"m{tiles.block_m}-n{tiles.block_n}-w{tiles.num_warps}-s{tiles.num_stages}-split{num_splits}"
                results[key] = time_ms(lambda: ours(tiles, num_splits))[0]
        best = min(results, key=results.get)
        row["sweep_best"] = {"config": best, "ms": results[best], "tb_s": kv_bytes / results[best] / 1e9}
        row["sweep"] = results
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time other tile shapes and split factors")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU: none is visible to torch")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    print(f"{device}; torch {torch.__version__}; triton {triton.__version__}; "
          f"Hq={NUM_Q_HEADS} Hkv={NUM_KV_HEADS} D={HEAD_DIM} bf16 block_size={BLOCK_SIZE}")
    print(f"{'batch x ctx':>13} {'ours ms':>9} {'sdpa ms':>9} {'ours TB/s':>10} {'sdpa TB/s':>10} "
          f"{'ratio':>6} {'splits':>6}  sdpa backend")
    rows = []
    for batch, context in SHAPES:
        row = bench_shape(batch, context, args.sweep)
        rows.append(row)
        print(f"{batch:>5} x {context:<5} {row['ours_ms']:9.4f} {row['sdpa_ms']:9.4f} {row['ours_tb_s']:10.3f} "
              f"{row['sdpa_tb_s']:10.3f} {row['ratio']:6.3f} {row['num_splits']:>6}  {row['sdpa_backend']}"
              f" ({row['timing']})")
        if args.sweep:
            best = row["sweep_best"]
            print(f"{'':>15}sweep best {best['config']}: {best['ms']:.4f} ms, {best['tb_s']:.3f} TB/s")
    summary = {"bench": "decode_attention", "device": device, "torch": torch.__version__,
               "triton": triton.__version__, "min_ratio": min(r["ratio"] for r in rows), "shapes": rows}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
