"""Tiny random-weight HF models (Llama, Qwen2, Qwen3, Mistral shapes) saved as HF folders, for token-exact
comparisons with transformers. Weights are drawn wide enough that logits are well separated: a greedy
divergence then means a real bug, not a near-tie."""
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

_TEXT = ("the quick brown fox jumps over the lazy dog. a paged kv cache holds keys and values in blocks. "
         "schedulers hand out a token budget; prefill and decode share a step. café naïve 東京 🙂 ") * 20

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
