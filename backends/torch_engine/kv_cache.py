"""Paged KV-cache block accounting (plain Python, no torch).

The cache is a pool of `num_blocks` blocks of `block_size` token slots, shared by every layer
(each layer has its own tensor of the same shape in the runner). A sequence owns an ordered
`block_table`; token position p lives in slot `block_table[p // block_size] * block_size +
p % block_size`. Blocks are handed out on demand, one step ahead of use, so memory follows the
real lengths of the sequences instead of reserving the whole context for each of them; when the
pool runs dry the scheduler preempts a sequence (frees its blocks, recomputes it later).

Sliding-window layers keep every position too (the runner masks what falls outside the window):
global layers need the full history anyway, and one block table for all layers keeps the
bookkeeping and the gather in the runner simple.
"""

from __future__ import annotations

from collections import deque

from backends.torch_engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Hands out and takes back cache blocks for sequences."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_token_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free_block_ids) / self.num_blocks

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_new_tokens` more computed tokens."""
        num_tokens_after = seq.num_computed_tokens + num_new_tokens
        return max(0, cdiv(num_tokens_after, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= len(self._free_block_ids)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_new_tokens` more tokens."""
        needed = self.num_blocks_needed(seq, num_new_tokens)
        if needed > len(self._free_block_ids):
            raise RuntimeError(f"KV cache exhausted: need {needed} blocks, {self.num_free_blocks} free")
        seq.block_table.extend(self._free_block_ids.popleft() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks to the pool."""
        self._free_block_ids.extend(seq.block_table)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        """The flat cache slot of token `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
