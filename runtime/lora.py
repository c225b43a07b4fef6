"""Multi-LoRA serving: PEFT adapters read from local folders, checked against the base model, kept in an LRU
on the host, and copied into a fixed number of device slots that the model indexes per token.

Every fused Linear of the decoder layers gets, per slot, its shards' A matrices stacked ([S*R, in]) and its
B rows ([out, R]), ranks zero-padded to R; an adapter that does not target a module leaves zeros there. The
scale (alpha/r, or alpha/sqrt(r) for rsLoRA) stays a per-slot factor so that fp32 results follow PEFT's
`result + lora_B(lora_A(x)) * scaling` step for step. Slots are shared by all layers and replaced least
recently used first; the scheduler never runs more adapters at once than there are slots.
"""
import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors

from kvserve.runtime.config import EngineConfig
from kvserve.runtime.sequence import Sequence

# PEFT target module -> (its parent in a decoder layer, our fused Linear, shard within it)
TARGETS = {
    "q_proj": ("self_attn", "qkv_proj", 0), "k_proj": ("self_attn", "qkv_proj", 1),
    "v_proj": ("self_attn", "qkv_proj", 2), "o_proj": ("self_attn", "o_proj", 0),
    "gate_proj": ("mlp", "gate_up_proj", 0), "up_proj": ("mlp", "gate_up_proj", 1),
    "down_proj": ("mlp", "down_proj", 0),
}
FUSED = [("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj")]
# adapter_config.json options that change the math beyond x A^T B^T * scale, refused when set
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)", "modules_to_save": "modules_to_save (fully trained copies of base modules)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "lora_bias": "LoRA bias (lora_bias)", "fan_in_fan_out": "fan_in_fan_out", "layer_replication": "layer_replication",
    "target_parameters": "target_parameters", "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)", "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)", "megatron_config": "Megatron layers",
    "use_bdlora": "BD-LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}
_TENSOR = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")

Weights = dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]]  # (layer, fused) -> shard -> (A, B)


@dataclass
class LoRAInfo:
    name: str
    path: str
    rank: int
    alpha: float
    scaling: float
    target_modules: list[str]
    content_id: str  # hash of the adapter's files: cached KV is keyed by it, so new weights never reuse old KV


def allowed_roots(config: EngineConfig) -> list[str]:
    """Folders adapters may be loaded from; default: the model's adapters/ and the download cache."""
    roots = config.lora_allowed_roots
    if roots is None:
        from kvserve.adapters.model_source import cache_root  # the loader's download cache
        roots = [os.path.join(config.model, "adapters"), str(cache_root())]
    return [os.path.realpath(os.path.expanduser(r)) for r in roots]


def _check_config(cfg: dict, where: str, max_rank: int) -> tuple[int, float, float]:
    """(r, alpha, scaling) of a supported LoRA config; ValueError naming the first unsupported part."""
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(f"{where}: {what} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias {cfg['bias']!r} is not supported (only 'none')")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{where}: adapter_config.json needs a positive integer r, got {r!r}")
    if r > max_rank:
        raise ValueError(f"{where}: rank {r} exceeds max_lora_rank {max_rank}")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):  # a string is a regex over module names: the tensors below are checked instead
        bad = sorted(set(targets) - set(TARGETS))
        if bad:
            raise ValueError(f"{where}: target module(s) {', '.join(bad)} not supported "
                             f"(supported: {', '.join(TARGETS)})")
    alpha = cfg.get("lora_alpha", 8)
    scaling = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
    return r, float(alpha), scaling


def load_adapter(name: str, path: str, layers, max_rank: int, dtype: torch.dtype,
                 pin: bool = False) -> tuple[LoRAInfo, Weights]:
    """Read and check a PEFT LoRA folder against the model's decoder layers (ValueError names the problem)."""
    where = f"LoRA adapter {name!r} ({path})"
    cfg_file, weights_file = os.path.join(path, "adapter_config.json"), os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"{where}: no adapter_config.json (not a PEFT adapter folder)")
    if not os.path.isfile(weights_file):
        pickle = os.path.exists(os.path.join(path, "adapter_model.bin"))
        raise ValueError(f"{where}: no adapter_model.safetensors"
                         + (" (pickle adapter_model.bin files are not loaded)" if pickle else ""))
    with open(cfg_file, "rb") as f:
        cfg_bytes = f.read()
    with open(weights_file, "rb") as f:
        data = f.read()
    try:
        cfg = json.loads(cfg_bytes)
    except ValueError as e:
        raise ValueError(f"{where}: adapter_config.json is not valid JSON ({e})") from None
    r, alpha, scaling = _check_config(cfg, where, max_rank)
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{where}: unreadable adapter_model.safetensors ({e})") from None
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _TENSOR.fullmatch(key)
        if m is None or m[3] not in TARGETS or TARGETS[m[3]][0] != m[2]:
            raise ValueError(f"{where}: tensor {key!r} is not the LoRA A or B of a supported module "
                             f"({', '.join(TARGETS)}) of a decoder layer")
        layer = int(m[1])
        if layer >= len(layers):
            raise ValueError(f"{where}: tensor {key!r} is for layer {layer}, but the model has {len(layers)} layers")
        pairs.setdefault((layer, m[3]), {})[m[4]] = t
    if not pairs:
        raise ValueError(f"{where}: adapter_model.safetensors holds no LoRA weights")
    weights: Weights = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: layer {layer} {module} has lora_{'A' if 'B' in ab else 'B'} missing")
        a, b = ab["A"], ab["B"]
        parent, fused, shard = TARGETS[module]
        linear = getattr(getattr(layers[layer], parent), fused)
        need_in, need_out = linear.weight.shape[1], linear.shards[shard]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != need_in or b.shape[0] != need_out or b.shape[1] != a.shape[0]:
            raise ValueError(f"{where}: layer {layer} {module} has lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)}, but the base model needs [r, {need_in}] and [{need_out}, r] "
                             "(an adapter for another model?)")
        if a.shape[0] != r:
            raise ValueError(f"{where}: layer {layer} {module} has rank {a.shape[0]}, but adapter_config.json "
                             f"says r={r}")
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        if pin:
            a, b = a.pin_memory(), b.pin_memory()
        weights.setdefault((layer, fused), {})[shard] = (a, b)
    digest = hashlib.sha256(cfg_bytes)
    digest.update(data)
    info = LoRAInfo(name, path, r, alpha, scaling, sorted({m for _, m in pairs}, key=list(TARGETS).index),
                    digest.hexdigest()[:32])
    return info, weights


class LoRAManager:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.max_loras = config.max_loras
        self.max_rank = config.max_lora_rank
        self.max_cpu_loras = config.max_cpu_loras or config.max_loras  # vLLM's default
        self.rank = max(16, 1 << (self.max_rank - 1).bit_length())  # tl.dot wants a power of two >= 16
        self.roots = allowed_roots(config)
        self.layers = model.model.layers
        self.dtype, self.pin = dtype, device.type == "cuda"
        self.scale = torch.zeros(self.max_loras, dtype=torch.float32, device=device)
        for layer in self.layers:
            for parent, fused in FUSED:
                lin = getattr(getattr(layer, parent), fused)
                lin.lora_a = torch.zeros(self.max_loras, len(lin.shards) * self.rank, lin.weight.shape[1],
                                         dtype=dtype, device=device)
                lin.lora_b = torch.zeros(self.max_loras, sum(lin.shards), self.rank, dtype=dtype, device=device)
                lin.lora_scale = self.scale
        self.registry: dict[str, LoRAInfo] = {}
        self.host: OrderedDict[str, Weights] = OrderedDict()  # LRU of loaded weights, up to max_cpu_loras
        self.slots: list[str | None] = [None] * self.max_loras
        self.slot_lru: OrderedDict[str, int] = OrderedDict()  # adapter -> its slot, least recently used first
        self.num_slot_loads = 0
        self._lock = threading.Lock()  # add() runs on callers' threads, prepare() on the engine's

    # -- the registry: any thread ------------------------------------------------------------------------
    def add(self, name: str, path: str) -> LoRAInfo:
        if not isinstance(name, str) or not name or any(c.isspace() or c == "/" for c in name):
            raise ValueError(f"invalid LoRA adapter name {name!r}: use a non-empty name without spaces or '/'")
        if "://" in str(path):
            raise ValueError(f"LoRA adapter {name!r}: {path!r} is a URI; the engine loads local folders "
                             "(the server resolves s3:// and hf:// adapters into its cache first)")
        real = os.path.realpath(os.path.expanduser(str(path)))
        if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots):
            raise ValueError(f"LoRA adapter {name!r}: {path} is outside the allowed adapter roots "
                             f"({', '.join(self.roots)}); add its folder to lora_allowed_roots")
        if not os.path.isdir(real):
            raise ValueError(f"LoRA adapter {name!r}: {path} is not a folder")
        with self._lock:
            if name in self.registry:
                raise ValueError(f"LoRA adapter {name!r} is already loaded; unload it first")
        info, weights = load_adapter(name, real, self.layers, self.max_rank, self.dtype, self.pin)
        with self._lock:
            if name in self.registry:
                raise ValueError(f"LoRA adapter {name!r} is already loaded; unload it first")
            self.registry[name] = info
            self._keep(name, weights)
        return info

    def remove(self, name: str) -> None:
        """Forget an adapter (the engine checks that no request uses it)."""
        with self._lock:
            if self.registry.pop(name, None) is None:
                raise ValueError(f"unknown LoRA adapter {name!r}")
            self.host.pop(name, None)
        slot = self.slot_lru.pop(name, None)
        if slot is not None:
            self.slots[slot] = None

    def get(self, name: str) -> LoRAInfo | None:
        return self.registry.get(name)

    def loaded(self) -> list[LoRAInfo]:
        with self._lock:
            return list(self.registry.values())

    def _keep(self, name: str, weights: Weights) -> None:
        self.host[name] = weights
        self.host.move_to_end(name)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)

    # -- a step: the engine thread -----------------------------------------------------------------------
    def prepare(self, batch: list[tuple[Sequence, int]]) -> list[int] | None:
        """Give every adapter of the step a slot; the per-token slot indices (-1: base model), or None when no
        token uses an adapter."""
        names = {seq.request.lora for seq, _ in batch} - {None}
        if not names:
            return None
        slot_of = {name: self._slot(name, names) for name in names}
        slots: list[int] = []
        for seq, n in batch:
            slots += [slot_of.get(seq.request.lora, -1)] * n
        return slots

    def _slot(self, name: str, needed: set[str]) -> int:
        if name in self.slot_lru:
            self.slot_lru.move_to_end(name)
            return self.slot_lru[name]
        if None in self.slots:
            slot = self.slots.index(None)
        else:
            victim = next((n for n in self.slot_lru if n not in needed), None)
            if victim is None:  # the scheduler admits no more adapters than slots
                raise RuntimeError(f"a step needs {len(needed)} LoRA adapters but there are {self.max_loras} slots")
            slot = self.slot_lru.pop(victim)
            self.slots[slot] = None
        self._load_slot(slot, self._weights(name))
        self.scale[slot] = self.registry[name].scaling
        self.slots[slot] = name
        self.slot_lru[name] = slot
        self.num_slot_loads += 1
        return slot

    def _weights(self, name: str) -> Weights:
        with self._lock:
            info = self.registry[name]
            if name in self.host:
                self.host.move_to_end(name)
                return self.host[name]
        # evicted from the host LRU: read the folder again, which must still hold the same adapter
        fresh, weights = load_adapter(name, info.path, self.layers, self.max_rank, self.dtype, self.pin)
        if fresh.content_id != info.content_id:
            raise RuntimeError(f"LoRA adapter {name!r}: {info.path} changed on disk after it was loaded; "
                               "unload and load it again")
        with self._lock:
            self._keep(name, weights)
        return weights

    @torch.no_grad()
    def _load_slot(self, slot: int, weights: Weights) -> None:
        rank = self.rank
        for i, layer in enumerate(self.layers):
            for parent, fused in FUSED:
                lin = getattr(getattr(layer, parent), fused)
                lin.lora_a[slot].zero_()
                lin.lora_b[slot].zero_()
                start = 0
                for shard, size in enumerate(lin.shards):
                    ab = weights.get((i, fused), {}).get(shard)
                    if ab is not None:
                        a, b = ab
                        lin.lora_a[slot, shard * rank:shard * rank + a.shape[0]].copy_(a)
                        lin.lora_b[slot, start:start + size, :b.shape[1]].copy_(b)
                    start += size
