"""The embedded default model in model-repo/kvserve-tiny/ loads with stock transformers and behaves as a chat model."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL_DIR = Path(__file__).resolve().parents[1] / "model-repo" / "kvserve-tiny"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()


def test_folder_is_small_and_complete():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "kvserve.json"} <= names
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert size < 20 * 1024 * 1024, f"{MODEL_DIR} is {size / 2**20:.1f} MiB"


def test_tokenizer_is_fast_byte_level_with_chat_specials(tokenizer):
    assert tokenizer.is_fast
    assert 3000 <= len(tokenizer) <= 4096
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    # each special token is one id, never split into bytes
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1


@pytest.mark.parametrize("text", [
    "The scheduler frees blocks when a request finishes.",
    "  leading spaces, tabs\tand\nnew lines\r\n",
    "naïve café, Straße, Zoë and José",
    "你好世界, 東京, 한국어",
    "launch 🚀, party 🎉, family 👨‍👩‍👧 and flags 🇯🇵",
    "<|im_start|>user\nhi<|im_end|>",
])
def test_encode_decode_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids, text
    assert tokenizer.decode(ids) == text


def test_unseen_text_falls_back_to_bytes_not_unknown(tokenizer):
    ids = tokenizer.encode("🦩", add_special_tokens=False)
    assert len(ids) > 1  # a four-byte character the corpus never contains is spelled byte by byte
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_chat_template_is_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is paged attention?"},
        {"role": "assistant", "content": "Blocks."},
        {"role": "user", "content": [{"type": "text", "text": "More"}, {"type": "text", "text": " detail?"}]},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is paged attention?<|im_end|>\n"
        "<|im_start|>assistant\nBlocks.<|im_end|>\n"
        "<|im_start|>user\nMore detail?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")
    with pytest.raises(Exception, match="role must be"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_config_and_generation_config_agree_with_tokenizer(tokenizer):
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]) == (128, 4, 4, 2, 32, 384)
    assert cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] >= len(tokenizer) and cfg["vocab_size"] % 64 == 0
    assert cfg["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}


def test_kvserve_settings():
    settings = json.loads((MODEL_DIR / "kvserve.json").read_text())
    assert settings["served_model_name"] == "kvserve-tiny"
    assert isinstance(settings["max_model_len"], int) and 0 < settings["max_model_len"] <= 4096


def test_model_loads_and_generates_text(tokenizer, model):
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does the KV cache store?"}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert len(new) == 8 or new[-1].item() in model.generation_config.eos_token_id
    # briefly trained: the answer is words, not a run of one token or stray bytes
    text = tokenizer.decode(new, skip_special_tokens=True)
    assert sum(c.isalpha() for c in text) >= 10, repr(text)
    assert len(set(new.tolist())) > 2, repr(text)


def test_model_was_trained(tokenizer, model):
    # a random model scores about ln(vocab) ≈ 8.3 nats per token; the trained one knows the corpus' prose
    text = "The cache is cut into small blocks of equal size, and a request takes blocks only as it needs them."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.0, loss
