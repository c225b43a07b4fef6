"""Paged KV blocks: allocation, ref counts, and prefix caching by a hash chain over full blocks.

A full block's hash covers its parent's hash, its token ids and the request's cache key (LoRA adapter), so
equal hashes mean equal prefixes. Freed blocks keep their hash and sit in an LRU free list: they can be
revived by a later prefix hit until the allocator reuses (evicts) them.
"""
from collections import OrderedDict
from dataclasses import dataclass
import hashlib

import numpy as np

from kvserve.runtime.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


def block_hash(parent: bytes | None, token_ids: list[int], extra: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    h.update(extra)
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.cached: dict[bytes, int] = {}  # hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    def _hashes(self, seq: Sequence, num_full: int) -> list[bytes]:
        """Extend seq.block_hashes to cover its first num_full full blocks."""
        bs, extra = self.block_size, seq.request.cache_key
        while len(seq.block_hashes) < num_full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            seq.block_hashes.append(block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs], extra))
        return seq.block_hashes

    def match_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks that hold seq's longest cached prefix; returns the tokens covered.
        At least one token is left to compute, since the step that computes it produces the logits."""
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for i, h in enumerate(self._hashes(seq, max_blocks)[:max_blocks]):
            bid = self.cached.get(h)
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            if bid is None or self.blocks[bid].token_ids != tuple(tokens):
                break
            hits.append(bid)
        for bid in hits:
            self._take(bid)
        seq.block_table = hits
        seq.num_cached_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        return seq.num_computed_tokens

    def _take(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self.free[bid]
        block.ref_count += 1

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for seq's next num_new_tokens; False (nothing changed) if there are not enough blocks."""
        needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(seq.block_table)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            bid, _ = self.free.popitem(last=False)  # least recently freed
            block = self.blocks[bid]
            if block.hash is not None:  # evict its cached content
                if self.cached.get(block.hash) == bid:
                    del self.cached[block.hash]
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            seq.block_table.append(bid)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that the last step filled, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_cached_blocks:
            return
        hashes = self._hashes(seq, num_full)
        bs = self.block_size
        for i in range(seq.num_cached_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if hashes[i] not in self.cached:  # an identical block computed concurrently keeps the entry
                block.hash, block.token_ids = hashes[i], tuple(seq.token_ids[i * bs:(i + 1) * bs])
                self.cached[hashes[i]] = block.block_id
        seq.num_cached_blocks = num_full

    def free_seq(self, seq: Sequence) -> None:
        # Tail blocks first, so the LRU evicts a sequence's tail before its (more shareable) prefix.
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.num_cached_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence holds (for tests and benchmarks)."""
        for bid in self.free:
            block = self.blocks[bid]
            if block.hash is not None and self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
