"""The multi-LoRA shrink / expand kernels against their torch references, and both against plain per-token math.

On CPU the kernels run in Triton's interpreter at tiny sizes; with a GPU the same tests run compiled, plus a
CUDA-graph replay that reads new slot indices from the captured buffer.
"""
import importlib
import sys

import pytest
import torch

# kernel_checks first: it switches Triton to its interpreter without CUDA, before any kernel is defined.
from kernel_checks import DEVICE, DTYPES, HAS_CUDA, assert_close
from kvserve.kernels import ops
from kvserve.kernels import reference as ref

if not HAS_CUDA and "kvserve.kernels.lora" in sys.modules:
    importlib.reload(sys.modules["kvserve.kernels.lora"])  # defined before the interpreter was switched on

from kvserve.kernels import lora  # noqa: E402

SHARDS = {"qkv": [48, 16, 16], "gate_up": [40, 40], "single": [24]}
# 37 tokens: two full tiles and a ragged one; runs of one adapter (prefill), alternation (decode), base tokens
SLOTS = [0] * 9 + [-1] * 4 + [2, 1, 0, 1, 2, -1, 1] * 3 + [1] * 3


def _adapters(shards, k=80, num_slots=3, rank=16, used_ranks=(16, 8, 4), dtype=torch.float32, seed=0):
    """Stacked slot tensors as the LoRA manager fills them: ranks below `rank` are zero-padded."""
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(num_slots, len(shards) * rank, k)
    b = torch.zeros(num_slots, sum(shards), rank)
    for slot, r in zip(range(num_slots), used_ranks):
        start = 0
        for s, size in enumerate(shards):
            a[slot, s * rank:s * rank + r] = torch.randn(r, k, generator=g) / k ** 0.5
            b[slot, start:start + size, :r] = torch.randn(size, r, generator=g) / r ** 0.5
            start += size
    scale = torch.tensor([2.0, 0.5, 1.25][:num_slots], dtype=torch.float32)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype), scale.to(DEVICE)


def _inputs(k=80, n_out=80, dtype=torch.float32, seed=1, slots=SLOTS):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(slots), k, generator=g).to(DEVICE, dtype)
    y = torch.randn(len(slots), n_out, generator=g).to(DEVICE, dtype)
    return x, y, torch.tensor(slots, dtype=torch.int32, device=DEVICE)


def _per_token(x, y, a, b, scale, slots, shards):
    """The definition, one token and one shard at a time, in fp32."""
    out = y.float().clone()
    rank = b.shape[2]
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        start = 0
        for s, size in enumerate(shards):
            h = x[t].float() @ a[slot, s * rank:(s + 1) * rank].float().T
            out[t, start:start + size] += (h @ b[slot, start:start + size].float().T) * scale[slot]
            start += size
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(SHARDS))
@pytest.mark.parametrize("k", [80, 600])  # 600: three splits of the input features, the last one partial
def test_shrink_matches_reference(k, kind, dtype):
    shards = SHARDS[kind]
    a, _, _ = _adapters(shards, k=k, dtype=dtype)
    x, _, slots = _inputs(k=k, dtype=dtype)
    h = lora.lora_shrink(x, a, slots)
    expected = ref.lora_shrink_ref(x, a, slots)
    assert h.dtype == torch.float32 and h.shape == (-(-k // lora.K_PER_SPLIT), len(SLOTS), len(shards) * 16)
    h, expected = h.sum(0), expected.sum(0)
    used = slots >= 0  # rows of base tokens are undefined in the kernel's output
    assert_close(h[used], expected[used], dtype)
    assert torch.equal(expected[~used], torch.zeros_like(expected[~used]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(SHARDS))
def test_expand_matches_reference_and_leaves_base_rows(kind, dtype):
    shards = SHARDS[kind]
    a, b, scale = _adapters(shards, dtype=dtype)
    x, y, slots = _inputs(n_out=sum(shards), dtype=dtype)
    h = ref.lora_shrink_ref(x, a, slots)
    before = y.clone()
    out = lora.lora_expand(y, h, b, scale, slots, shards)
    assert out is y
    expected = ref.lora_expand_ref(before.clone(), h, b, scale, slots, shards)
    assert_close(y, expected, dtype)
    base = slots < 0
    assert torch.equal(y[base], before[base])  # base-model rows untouched, bit for bit
    assert not torch.allclose(y[~base].float(), before[~base].float())  # and the others really changed


@pytest.mark.parametrize("kind", list(SHARDS))
def test_references_match_per_token_math(kind):
    shards = SHARDS[kind]
    a, b, scale = _adapters(shards)
    x, y, slots = _inputs(n_out=sum(shards))
    expected = _per_token(x, y, a, b, scale, slots, shards)
    got = ref.lora_expand_ref(y.clone(), ref.lora_shrink_ref(x, a, slots), b, scale, slots, shards)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_ops_dispatch_round_trip(name, backend):
    shards = SHARDS["qkv"]
    a, b, scale = _adapters(shards, k=300)
    x, y, slots = _inputs(k=300, n_out=sum(shards))
    expected = _per_token(x, y, a, b, scale, slots, shards)
    backend(name)
    ops.lora_expand(y, ops.lora_shrink(x, a, slots), b, scale, slots, shards)
    assert_close(y, expected, torch.float32)


def test_slot_buffer_is_read_at_call_time_and_empty_batch():
    # The decode graphs capture one launch that reads a static slot buffer: changing the buffer's contents
    # (not the tensor) must change which adapter each token gets.
    shards = SHARDS["single"]
    a, b, scale = _adapters(shards)
    x, y, _ = _inputs(n_out=24, slots=[0, 1, 2, -1])
    slots = torch.tensor([0, 1, 2, -1], dtype=torch.int32, device=DEVICE)
    first = lora.lora_expand(y.clone(), lora.lora_shrink(x, a, slots), b, scale, slots, shards)
    slots.copy_(torch.tensor([2, -1, 0, 1], dtype=torch.int32))
    second = lora.lora_expand(y.clone(), lora.lora_shrink(x, a, slots), b, scale, slots, shards)
    assert_close(second, _per_token(x, y, a, b, scale, slots, shards), torch.float32)
    assert not torch.allclose(first, second)
    empty = torch.empty(0, 80, device=DEVICE)
    h = lora.lora_shrink(empty, a, slots[:0])
    assert h.shape[1:] == (0, 16)
    assert lora.lora_expand(torch.empty(0, 24, device=DEVICE), h, b, scale, slots[:0], shards).shape == (0, 24)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_replay_reads_new_slots():
    shards = SHARDS["qkv"]
    a, b, scale = _adapters(shards, dtype=torch.bfloat16)
    x, y0, _ = _inputs(n_out=sum(shards), dtype=torch.bfloat16)
    slots = torch.full((len(SLOTS),), -1, dtype=torch.int32, device=DEVICE)
    y = y0.clone()

    def step():
        y.copy_(y0)
        lora.lora_expand(y, lora.lora_shrink(x, a, slots), b, scale, slots, shards)
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    slots.copy_(torch.tensor(SLOTS, dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, _per_token(x, y0, a, b, scale, slots, shards), torch.bfloat16)
