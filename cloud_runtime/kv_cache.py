"""Deep-layer KV memory: one preallocated pool of fixed-size blocks, a block table per session.

Why a pool: a per-session tensor grown with F.pad copies the whole cache at every
growth and scatters sessions over the heap, so attention over many sessions needs
one kernel call per session. Here every session's keys and values live in the same
two tensors (one per K and V), a position p of a session is the slot
`table[p // B] * B + p % B`, and one pass can write the new rows of all its
sessions with one `index_copy_` and read any set of sessions back with one
`index_select` per layer (`DeepModel.forward_ragged`).

    k, v: [n_layers, n_blocks * block_size, n_kv_heads, head_dim]

The pool grows by doubling when a standalone user (tests, `quantize.verify`) runs
out; the cloud server sizes it to its KV budget up front (`reserve_bytes`; on CPU
`torch.empty` only maps the pages, they are touched when used). Block allocation
and release take a lock: sessions are released from the event loop while the model
thread allocates.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

BLOCK_SIZE = 16  # positions per block: small enough that a short session wastes little


class PoolExhausted(RuntimeError):
    """A fixed-size pool has no free block (the session store's budget should prevent this)."""


class KVPool:
    def __init__(self, n_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 *, block_size: int = BLOCK_SIZE, n_blocks: int = 16, growable: bool = True) -> None:
        if block_size < 1 or n_blocks < 0:
            raise ValueError(f"block_size must be >= 1 and n_blocks >= 0, got {block_size}, {n_blocks}")
        self.n_layers, self.n_kv, self.head_dim = n_layers, n_kv, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.block_size = block_size
        self.growable = growable
        self.k = torch.empty(n_layers, n_blocks * block_size, n_kv, head_dim, dtype=dtype, device=self.device)
        self.v = torch.empty_like(self.k)
        self._free: list[int] = list(range(n_blocks - 1, -1, -1))  # pop() hands out the lowest first
        self._lock = threading.Lock()

    @property
    def n_blocks(self) -> int:
        return self.k.shape[1] // self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def block_bytes(self) -> int:
        """K and V of one block, all layers."""
        return 2 * self.n_layers * self.block_size * self.n_kv * self.head_dim * self.k.element_size()

    def reserve_bytes(self, nbytes: int) -> None:
        """Grow the pool (once, up front) to hold `nbytes` of blocks."""
        self._grow_to(nbytes // self.block_bytes)

    def _grow_to(self, n_blocks: int) -> None:
        old = self.n_blocks
        if n_blocks <= old:
            return
        shape = (self.n_layers, n_blocks * self.block_size, self.n_kv, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        if old:
            k[:, :old * self.block_size] = self.k
            v[:, :old * self.block_size] = self.v
        self.k, self.v = k, v
        self._free = list(range(n_blocks - 1, old - 1, -1)) + self._free

    def allocate(self, n: int) -> list[int]:
        with self._lock:
            if n > len(self._free):
                if not self.growable:
                    raise PoolExhausted(f"KV pool has {len(self._free)} free blocks, {n} needed")
                self._grow_to(max(2 * self.n_blocks, self.n_blocks + n - len(self._free)))
            return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        with self._lock:
            self._free.extend(reversed(blocks))

    def new_cache(self) -> KVCache:
        return KVCache(self)


class KVCache:
    """One session's view of the pool: its block table and how many positions are valid.

    Positions [0, length) are valid; blocks stay with the session after a truncate
    (a rolled-back draft is usually re-extended at once) until `release`.
    """

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def nbytes(self) -> int:
        return len(self.blocks) * self.pool.block_bytes

    def bytes_for(self, needed: int) -> int:
        """nbytes() after reserve(needed)."""
        return max(len(self.blocks), -(-needed // self.pool.block_size)) * self.pool.block_bytes

    def reserve(self, needed: int) -> None:
        """Make room for positions [0, needed) (model thread)."""
        short = -(-needed // self.pool.block_size) - len(self.blocks)
        if short > 0:
            self.blocks.extend(self.pool.allocate(short))

    def truncate(self, length: int) -> None:
        self.length = min(self.length, max(0, length))

    def release(self) -> None:
        """Give the blocks back to the pool (the session is gone)."""
        blocks, self.blocks, self.length = self.blocks, [], 0
        if blocks:
            self.pool.release(blocks)

    def slots(self, start: int, end: int) -> Tensor:
        """Pool slot of each position in [start, end) (int64, on the CPU)."""
        bs = self.pool.block_size
        pos = torch.arange(start, end)
        table = torch.tensor(self.blocks, dtype=torch.long)
        return table[pos // bs] * bs + pos % bs

    def contiguous_from(self, end: int) -> int | None:
        """The first slot if positions [0, end) sit in consecutive slots (attention can then read
        them as one slice of the pool, no gather), else None."""
        nb = -(-end // self.pool.block_size)
        first = self.blocks[0] if self.blocks else 0
        if all(b == first + i for i, b in enumerate(self.blocks[:nb])):
            return first * self.pool.block_size
        return None
