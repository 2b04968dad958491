"""ChunkCache: decoded chunks kept where the crops happen, least recently used out, under a byte budget.

The cache only keeps and evicts: the arrays come from `device_arrays` (cupy arrays in GPU memory on
a GPU, numpy arrays in host memory otherwise), so the CPU tests run the logic the GPU runs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class CacheStats:
    """What the cache served: hits and misses count chunk lookups, bytes are decoded chunk bytes."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_inserted: int = 0
    peak_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {**self.__dict__, "hit_rate": self.hit_rate}


class ChunkCache:
    """Decoded chunks by key, evicted least recently used first so that `nbytes <= budget_bytes`.

    A chunk larger than the whole budget is not kept (the caller still uses it for its step).
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.nbytes = 0
        self.stats = CacheStats()
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> Any | None:
        """The chunk, marked most recently used, or None (a hit or a miss is counted)."""
        chunk = self._items.get(key)
        if chunk is None:
            self.stats.misses += 1
            return None
        self._items.move_to_end(key)
        self.stats.hits += 1
        return chunk

    def put(self, key: Hashable, chunk: Any) -> list[tuple[Hashable, Any]]:
        """Keep `chunk`, evicting the least recently used ones until it fits; returns the evicted (key, chunk)s."""
        size = int(chunk.nbytes)
        if size > self.budget_bytes or key in self._items:
            return []
        evicted = []
        while self.nbytes + size > self.budget_bytes:
            old_key, old = self._items.popitem(last=False)
            self.nbytes -= int(old.nbytes)
            self.stats.evictions += 1
            evicted.append((old_key, old))
        self._items[key] = chunk
        self.nbytes += size
        self.stats.bytes_inserted += size
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.nbytes)
        return evicted
