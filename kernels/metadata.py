"""Per-step attention metadata, set once per step and read by every layer (nano-vllm's context object)."""
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # Flattened batch: the scheduled tokens of all sequences back to back, sequence s owning query rows
    # cu_seqlens_q[s]:cu_seqlens_q[s+1]. Those rows are the *last* q_len positions of a context of
    # seq_lens[s] tokens (the rest come from the KV cache), so the query at row i of sequence s sits at
    # position seq_lens[s] - q_len + i and attends causally to cache positions 0..that position.
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset where new K/V go
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_seqlen_q: int
    max_seqlen_k: int
    # host copies, so reference code and launch grids never read back from the device
    cu_seqlens_q_cpu: list[int]
    seq_lens_cpu: list[int]
    # True when every sequence contributes exactly one query (pure decode): kernels may take a faster path
    decode_only: bool = False
