"""Incremental detokenization and stop strings.

Each step decodes a short window of recent tokens twice (with and without the new token) and emits the
difference, so multi-byte characters split across tokens are emitted whole, and a word-initial space
(SentencePiece '▁') decodes as it would inside the full text. Text that could be the start of a stop string
is held back until it is known not to be one.
"""
from kvserve.runtime.sequence import Sequence

_CONTEXT = 5  # prompt tokens decoded before the output, for the first token's leading-space rules


def init_offsets(seq: Sequence) -> None:
    n = seq.num_prompt_tokens
    seq.prefix_offset = max(n - _CONTEXT, 0)
    seq.read_offset = n


def _decode(tokenizer, ids, skip_special: bool) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)


def detokenize(tokenizer, seq: Sequence, flush: bool = False, exclude_last: bool = False) -> None:
    """Append the text of seq's newest tokens to seq.text (all pending text when `flush`; without the
    newest token's own text when `exclude_last`, for a stop token)."""
    ids, skip = seq.token_ids[:-1] if exclude_last else seq.token_ids, seq.params.skip_special_tokens
    prefix = _decode(tokenizer, ids[seq.prefix_offset:seq.read_offset], skip)
    full = _decode(tokenizer, ids[seq.prefix_offset:], skip)
    if len(full) > len(prefix) and (flush or not full.endswith("\ufffd")):
        # compare only the part that can change: the window minus what was already read
        seq.text += full[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)


def check_stop_strings(seq: Sequence, new_chars: int) -> bool:
    """Finish seq if its text now contains a stop string; truncates the text at the match."""
    stops = seq.params.stop
    if not stops or not new_chars:
        return False
    text = seq.text
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        at = text.find(stop, start)
        if at >= 0:
            seq.text = text[:at + len(stop)] if seq.params.include_stop_str_in_output else text[:at]
            seq.finish_reason, seq.stop_reason = "stop", stop
            return True
    return False


def take_text_delta(seq: Sequence) -> str:
    """The text not yet emitted, holding back a tail that might begin a stop string."""
    hold = 0 if seq.finish_reason else max((len(s) for s in seq.params.stop), default=1) - 1
    end = max(seq.sent_text_len, len(seq.text) - hold)
    delta = seq.text[seq.sent_text_len:end]
    seq.sent_text_len = end
    return delta
