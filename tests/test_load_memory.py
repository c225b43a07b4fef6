"""Loading a checkpoint of more than 1 GB keeps the process's peak resident memory under 1.3x the checkpoint: the
model's own weights plus the interpreter, never a second copy of the file. A fresh process builds the engine's
model through the real loader (ModelRunner on CPU, tokenizer-free, tiny KV pool) from a random-weight
Llama-shaped fp32 checkpoint written here one tensor at a time."""
import json
import platform
import shutil
import struct
import subprocess
import sys
import time

import pytest
import torch

from server import REPO

H, INTER, VOCAB, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2048, 5632, 32000, 5, 16, 4, 128
BOUND = 1.3

CHILD = """
import json, sys, time
from kvserve.runtime.config import EngineConfig
from kvserve.runtime.model_runner import ModelRunner

def peak_rss():
    # VmHWM: this process image's own peak. ru_maxrss would do, but Linux carries the high-water mark of the
    # image before execve into it: in a child of the test process it reads at least the test process's peak.
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024

base = peak_rss()
start = time.monotonic()
runner = ModelRunner(EngineConfig(model=sys.argv[1], device="cpu", dtype="float32", max_model_len=64,
                                  num_gpu_blocks_override=4, skip_tokenizer_init=True))
took = time.monotonic() - start
params = dict(runner.model.named_parameters())
probes = {f"{name}[{row}]": params[name][row, :4].tolist() for name, row in json.loads(sys.argv[2])}
print(json.dumps({"peak": peak_rss(), "base": base, "load_s": took, "probes": probes}))
"""


def tensors():
    """(name, shape) of a Llama checkpoint with untied embeddings, in HF's names and order."""
    yield "model.embed_tokens.weight", (VOCAB, H)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (H,)
        yield p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, H)
        yield p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, H)
        yield p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, H)
        yield p + "self_attn.o_proj.weight", (H, HEADS * HEAD_DIM)
        yield p + "post_attention_layernorm.weight", (H,)
        yield p + "mlp.gate_proj.weight", (INTER, H)
        yield p + "mlp.up_proj.weight", (INTER, H)
        yield p + "mlp.down_proj.weight", (H, INTER)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (VOCAB, H)


def write_checkpoint(folder, probe_rows: dict[str, int]) -> tuple[int, dict[str, list[float]]]:
    """A one-file safetensors checkpoint streamed tensor by tensor (safetensors' writers take every tensor at
    once); returns its size and, for each tensor in `probe_rows`, the first values of that row."""
    folder.mkdir(parents=True)
    header, at = {}, 0
    for name, shape in tensors():
        size = 4 * torch.Size(shape).numel()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    gen = torch.Generator().manual_seed(0)
    probes = {}
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors():
            t = torch.ones(shape) if "norm" in name else torch.empty(shape).uniform_(-0.02, 0.02, generator=gen)
            if name in probe_rows:
                probes[name] = t[probe_rows[name], :4].tolist()
            f.write(t.numpy().data)
            del t
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "vocab_size": VOCAB, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "float32"}))
    return (folder / "model.safetensors").stat().st_size, probes


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux", reason="reads the peak RSS from /proc")
def test_peak_rss_of_loading_a_big_checkpoint(tmp_path):
    # Rows read in place (embedding, lm_head), and through the buffer that fills one shard of a fused weight.
    where = {"model.embed_tokens.weight": ("model.embed_tokens.weight", 5, 5),
             "lm_head.weight": ("lm_head.weight", VOCAB - 1, VOCAB - 1),
             "model.layers.1.mlp.up_proj.weight": ("model.layers.1.mlp.gate_up_proj.weight", 3, INTER + 3),
             "model.layers.4.self_attn.v_proj.weight": ("model.layers.4.self_attn.qkv_proj.weight", 7,
                                                        (HEADS + KV_HEADS) * HEAD_DIM + 7)}
    folder = tmp_path / "big"
    try:
        start = time.monotonic()
        size, written = write_checkpoint(folder, {hf: row for hf, (_, row, _) in where.items()})
        built = time.monotonic() - start
        assert size >= 1 << 30
        run = subprocess.run([sys.executable, "-c", CHILD, str(folder),
                              json.dumps([[ours, row] for ours, _, row in where.values()])],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
        assert run.returncode == 0, run.stderr[-3000:]
        got = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report = (f"checkpoint {size / 2**20:.0f} MiB (written in {built:.1f} s), peak RSS {got['peak'] / 2**20:.0f} MiB "
              f"= {got['peak'] / size:.2f}x (before loading {got['base'] / 2**20:.0f} MiB), "
              f"ModelRunner built in {got['load_s']:.1f} s")
    print(report)
    assert got["peak"] < BOUND * size, report
    for hf, (ours, _, row) in where.items():
        assert got["probes"][f"{ours}[{row}]"] == written[hf], hf
