"""Build model-repo/kvserve-tiny/: the default model the server runs with no arguments.

A byte-level BPE tokenizer and a tiny Qwen3 model, both trained on model-repo/corpus/ in a few minutes on CPU.
Seeds are fixed, so a rerun on the same machine and library versions gives the same files; other machines may
differ in the last bits of the weights (float summation order), which is why the outputs are committed.

    .venv/bin/python model-repo/build_tiny.py [--steps N] [--out DIR]
"""

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
NAME = "kvserve-tiny"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VOCAB_SIZE = 4096
SEED = 0

# Qwen2's pre-tokenizer split: contractions, words, single digits, punctuation runs, newlines, spaces.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML as Qwen writes it, without Qwen's default system prompt. Content may be a string or a list of
# OpenAI-style parts, whose text parts are joined.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def read_corpus():
    """Prose documents, and the conversations file parsed into message lists."""
    docs, chats = [], []
    for path in sorted(CORPUS.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        if path.name == "conversations.txt":
            chats = [parse_chat(block) for block in text.strip().split("\n\n")]
        else:
            docs.append(text.strip())
    return docs, chats


def parse_chat(block):
    messages = []
    for line in block.split("\n"):
        if line.startswith("User: "):
            messages.append({"role": "user", "content": line[len("User: "):]})
        elif line.startswith("Assistant: "):
            messages.append({"role": "assistant", "content": line[len("Assistant: "):]})
        else:  # a continuation line of a multi-line answer
            messages[-1]["content"] += "\n" + line
    return messages


def build_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        # the corpus is small: the last few hundred merges are words seen once, which is harmless
        min_frequency=1,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        # every byte gets a token, so any text encodes and decodes back exactly
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def token_stream(tokenizer, docs, chats):
    """One long id sequence: every document and conversation, each closed by <|endoftext|>, in seeded order.
    Conversations appear several times so the chat format is learnt despite being a small share of the text."""
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    texts = docs + [tokenizer.apply_chat_template(c, tokenize=False) for c in chats] * 4
    pieces = [tokenizer.encode(t) for t in texts]
    random.Random(SEED).shuffle(pieces)
    return torch.tensor([i for p in pieces for i in p + [eot]], dtype=torch.long)


def build_config(tokenizer):
    vocab = math.ceil(len(tokenizer) / 64) * 64
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=384,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        dtype="float32",
    )


def train(model, ids, steps, seq_len=128, batch=16, lr=3e-3):
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    start, loss = time.time(), None
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    model.eval()
    return loss.item()


def write_model_dir(out, tokenizer, model, final_loss):
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # Keep the template inside tokenizer_config.json, where every transformers version and our server look.
    (tmp / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = tmp / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    eos = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    GenerationConfig(eos_token_id=eos, pad_token_id=eos[1]).save_pretrained(tmp)
    settings = {"served_model_name": NAME, "max_model_len": 2048}
    (tmp / "kvserve.json").write_text(json.dumps(settings, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB, vocab {len(tokenizer)}, final loss {final_loss:.3f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--out", type=Path, default=HERE / NAME)
    args = ap.parse_args()

    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)  # fixed thread count keeps reductions, and so the weights, repeatable here

    docs, chats = read_corpus()
    chat_texts = ["\n".join(m["content"] for m in c) for c in chats]
    tokenizer = build_tokenizer(docs + chat_texts)
    ids = token_stream(tokenizer, docs, chats)
    print(f"vocab {len(tokenizer)}, {len(ids)} training tokens")

    model = Qwen3ForCausalLM(build_config(tokenizer))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    final_loss = train(model, ids, args.steps)
    write_model_dir(args.out, tokenizer, model, final_loss)

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is continuous batching?"}], tokenize=False, add_generation_prompt=True)
    x = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        y = model.generate(**x, max_new_tokens=40, do_sample=False)
    print("sample:", tokenizer.decode(y[0, x["input_ids"].shape[1]:]))


if __name__ == "__main__":
    main()
