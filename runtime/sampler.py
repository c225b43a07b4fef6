"""Sampling from a batch of logits, one row per sequence that reached the end of its known tokens.

Random draws come from a counter-based hash of (sequence seed, output position, token id), not from a
stateful generator: a seeded request samples the same tokens whatever else shares its batch, after
preemption, and on CPU or GPU alike. Sampling is an exponential race: argmax(p / E) with E ~ Exp(1) is a
draw from p.
"""
from dataclasses import dataclass

import torch

from kvserve.runtime.outputs import Logprob
from kvserve.runtime.sequence import Sequence

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32  # wraps past 2^63 but the low 32 bits stay exact
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] floats in (0, 1), a pure function of (seed, step, token id)."""
    key = _mix32(_mix32((seeds & _M32) ^ _mix32((seeds >> 32) & _M32)) ^ (steps & _M32))
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _mix32(key[:, None] ^ _mix32(ids + 0x9E3779B9)[None, :])
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # 24 bits: exact in fp32, never 0 or 1


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]


def _penalise(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
            or s.params.presence_penalty or s.params.frequency_penalty]
    for i in rows:  # rare; per row keeps it simple
        p, s = seqs[i].params, seqs[i]
        row = logits[i]
        if p.repetition_penalty != 1.0:  # HF's: every token seen in prompt or output
            seen = torch.tensor(sorted(set(s.token_ids)), device=logits.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:  # OpenAI's: output tokens only
            out = torch.tensor(s.output_token_ids, device=logits.device, dtype=torch.int64)
            if out.numel():
                counts = torch.zeros_like(row).scatter_add_(0, out, torch.ones_like(out, dtype=row.dtype))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _block_stops(logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int]) -> None:
    """min_tokens: the sequence may not end before it has that many output tokens."""
    for i, s in enumerate(seqs):
        if s.num_output_tokens < s.params.min_tokens:
            stops = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else eos_ids)
            if stops:
                logits[i, torch.tensor(sorted(stops), device=logits.device)] = float("-inf")


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p; returns probabilities (zero outside the kept set)."""
    dev = logits.device
    temp = torch.tensor([max(s.params.temperature, 1e-5) for s in seqs], device=dev)
    logits = logits / temp[:, None]
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        vocab = logits.shape[1]
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=dev)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        drop = rank >= k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the better tokens
        drop |= before >= torch.tensor(top_p, device=dev)[:, None]
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    if any(s.params.min_p > 0 for s in seqs):
        min_p = torch.tensor([s.params.min_p for s in seqs], device=dev)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, 0.0)
    return probs


def needs_host(seqs: list[Sequence]) -> bool:
    """Whether sampling these rows needs host-side data (token histories, logprobs): then the tokens must
    be read back before the next step can be launched."""
    return not all(s.request.device_sampling for s in seqs)


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Token ids as a device tensor, without reading anything back: greedy rows take the argmax in the
    model's dtype (the same winner as in fp32); random rows run the filters and the race in fp32."""
    tokens = logits.argmax(-1)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        sub = [seqs[i] for i in random_rows]
        probs = _filter(logits[rows].float(), sub)
        seeds = torch.tensor([s.seed for s in sub], device=logits.device, dtype=torch.int64)
        steps = torch.tensor([s.num_output_tokens for s in sub], device=logits.device, dtype=torch.int64)
        race = probs / -torch.log(uniform_noise(seeds, steps, probs.shape[1]))
        tokens[rows] = race.argmax(-1)
    return tokens


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int]) -> SampleResult:
    """logits: [B, vocab], one row per sequence in `seqs`; the full path with penalties, min_tokens and
    logprobs, for rows that need the host (needs_host). Reads the tokens back."""
    logits = logits.float()
    raw = logits
    if any(s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
           or s.num_output_tokens < s.params.min_tokens for s in seqs):
        logits = logits.clone()
        _penalise(logits, seqs)
        _block_stops(logits, seqs, eos_ids)
    tokens = sample_tokens(logits, seqs)
    token_list = tokens.tolist()
    return SampleResult(token_list, _logprobs(raw, seqs, tokens, token_list))


def _logprobs(raw: torch.Tensor, seqs: list[Sequence], tokens: torch.Tensor,
              token_list: list[int]) -> list[dict[int, Logprob] | None]:
    """Log-probabilities of the model's raw distribution (before penalties and temperature), as vLLM."""
    want = [s.params.logprobs for s in seqs]
    if all(w is None for w in want):
        return [None] * len(seqs)
    lp = raw.float().log_softmax(-1)
    chosen = lp.gather(1, tokens[:, None]).squeeze(1)
    ranks = (lp > chosen[:, None]).sum(-1) + 1
    top_n = max(w or 0 for w in want)
    top_vals, top_ids = lp.topk(top_n, dim=-1) if top_n else (lp[:, :0], lp[:, :0].long())
    chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
    top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
    out: list[dict[int, Logprob] | None] = []
    for i, w in enumerate(want):
        if w is None:
            out.append(None)
            continue
        entry = {token_list[i]: Logprob(chosen_l[i], ranks_l[i])}
        for r in range(w):
            entry.setdefault(top_ids_l[i][r], Logprob(top_vals_l[i][r], r + 1))
        out.append(entry)
    return out
