"""Tiny random-weight HF models (Llama, Qwen2, Qwen3, Mistral shapes) saved as HF folders, for token-exact
comparisons with transformers. Weights are drawn wide enough that logits are well separated: a greedy
divergence then means a real bug, not a near-tie."""
import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

_TEXT = ("the quick brown fox jumps over the lazy dog. a paged kv cache holds keys and values in blocks. "
         "schedulers hand out a token budget; prefill and decode share a step. café naïve 東京 🙂 ") * 20

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # LoRA targets

SHAPES = {
    # GQA with head_dim != hidden / heads
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128,
                  tie_word_embeddings=False, rope_theta=10000.0),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=32, intermediate_size=128,
                  tie_word_embeddings=True, rope_theta=1000000.0),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                    tie_word_embeddings=False, rope_theta=10000.0, sliding_window=None),
}


def random_prompts(n: int, seed: int, lo: int = 3, hi: int = 30, vocab: int = 384) -> list[list[int]]:
    """`n` prompts of lo..hi random token ids (none is 0), the same for the same seed."""
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def build_tokenizer(folder: str, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def build_model(folder: str, kind: str, seed: int = 0, vocab_size: int = 384, **overrides) -> str:
    os.makedirs(folder, exist_ok=True)
    tok = build_tokenizer(folder, vocab_size)
    cfg = dict(SHAPES[kind], vocab_size=vocab_size, max_position_embeddings=2048, rms_norm_eps=1e-6,
               eos_token_id=tok.eos_token_id, bos_token_id=None, torch_dtype="float32", **overrides)
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    config.architectures = cfg["architectures"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:  # wide weights: logit gaps far above fp32 rounding
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5 * (4.0 if "embed" in name or "lm_head" in name else 1.5))
    model.save_pretrained(folder)
    return folder


def make_adapter(base: str, folder, r=8, alpha=None, targets=ALL, seed=0, rslora=False, **options) -> str:
    """A PEFT adapter saved by peft itself, with A and B drawn wide enough to move the greedy outputs."""
    from peft import LoraConfig, get_peft_model  # not on every machine that builds tiny models

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha or r, target_modules=targets,
                                            use_rslora=rslora, **options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[1] ** 0.5)
    peft.save_pretrained(str(folder))
    return str(folder)


def write_adapter(base: str, folder, r=8, seed=0) -> str:
    """A PEFT-format adapter on all seven projections written without peft (machines without it, the GPU one),
    drawn as make_adapter draws its weights."""
    import json
    from safetensors.torch import save_file

    with open(os.path.join(base, "config.json")) as f:
        c = json.load(f)
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or h // heads
    shapes = {"q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (heads * d, h),
              "gate_proj": (h, c["intermediate_size"]), "up_proj": (h, c["intermediate_size"]),
              "down_proj": (c["intermediate_size"], h)}  # (in, out)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(c["num_hidden_layers"]):
        for m, (fan_in, fan_out) in shapes.items():
            part = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 1.5 / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 1.5 / r ** 0.5
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ALL, "bias": "none",
                   "task_type": "CAUSAL_LM"}, f)
    return str(folder)


def explain_divergence(hf, prompt, ref, got):
    """A divergence is only acceptable at an exact tie of HF's top two fp32 logits."""
    i = next(j for j, (a, b) in enumerate(zip(ref, got)) if a != b)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ref[:i]])).logits[0, -1]
    top = logits.topk(2).values
    assert top[0] == top[1], f"diverged at output {i}: HF {ref[i]} vs ours {got[i]}, logit gap {float(top[0] - top[1])}"
