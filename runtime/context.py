"""The attention metadata of the step being run, set by the model runner and read by every attention layer
(one object per step instead of threading it through every forward call)."""
from kvserve.kernels.metadata import AttentionMetadata

_context: AttentionMetadata | None = None


def set_context(meta: AttentionMetadata | None) -> None:
    global _context
    _context = meta


def get_context() -> AttentionMetadata:
    assert _context is not None, "attention metadata is set by the model runner before each forward"
    return _context
