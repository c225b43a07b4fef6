"""The attention metadata of the step being run, set by the model runner and read by every attention layer
(one object per step instead of threading it through every forward call), and the step's per-token LoRA slots,
read by every Linear that carries adapters."""
import torch

from kvserve.kernels.metadata import AttentionMetadata

_context: AttentionMetadata | None = None
_lora_slots: torch.Tensor | None = None


def set_context(meta: AttentionMetadata | None, lora_slots: torch.Tensor | None = None) -> None:
    """lora_slots: [num_tokens] int32, each token's adapter slot (-1: base model); None skips LoRA entirely."""
    global _context, _lora_slots
    _context, _lora_slots = meta, lora_slots


def get_context() -> AttentionMetadata:
    assert _context is not None, "attention metadata is set by the model runner before each forward"
    return _context


def get_lora_slots() -> torch.Tensor | None:
    return _lora_slots
