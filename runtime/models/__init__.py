"""Model registry: the HF architectures we serve and how their config.json maps onto our one decoder."""
from kvserve.runtime.models.decoder import DecoderForCausalLM

# HF class name -> whether it carries q/k/v bias and per-head q/k norm
_ARCHS = {
    "LlamaForCausalLM": dict(qkv_bias=False, qk_norm=False),
    "MistralForCausalLM": dict(qkv_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": dict(qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": dict(qkv_bias=False, qk_norm=True),
}
SUPPORTED_ARCHITECTURES = frozenset(_ARCHS)


def model_config(hf: dict) -> dict:
    """Normalise an HF config.json dict into the fields the decoder reads (raises ValueError if unsupported)."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in _ARCHS:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(sorted(_ARCHS))}")
    cfg = dict(hf)
    if "text_config" in cfg:  # nested configs keep the decoder fields one level down
        cfg.update(cfg["text_config"])
    cfg.update(_ARCHS[arch])
    if arch == "LlamaForCausalLM":
        cfg["qkv_bias"] = bool(hf.get("attention_bias", False))
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    if not cfg.get("head_dim"):
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    # transformers 5 moved rope settings into rope_parameters; older configs keep rope_theta/rope_scaling
    rope = cfg.get("rope_parameters") or {}
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    cfg["rope_scaling"] = scaling
    cfg.setdefault("tie_word_embeddings", False)
    cfg["architecture"] = arch
    return cfg


def build_model(cfg: dict, max_positions: int) -> DecoderForCausalLM:
    return DecoderForCausalLM(cfg, max_positions)
