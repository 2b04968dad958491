"""CachedPatchReader: patches cropped from decoded chunks that are read once and kept in a ChunkCache.

For each plan the chunks its boxes touch (the inner chunks of sharded stores) are listed once,
de-duplicated across the step (anchors and positives together); those neither cached nor already
in flight for an earlier plan are read in one concurrent tensorstore batch, each exactly its grid
cell, in the stored dtype. Every patch is then assembled from its chunks into one contiguous
(B, C, Z, Y, X) buffer (`device_arrays`: cupy in GPU memory on a GPU, numpy otherwise) by one
batched box copy over the step's piece table (`assembly`), channels canonical, so on a GPU no patch
crosses PCIe: only chunks do, once. The patches equal PatchReader's for the same plans.

A plan whose chunk reads fail is read again by the uncached path, which names the failing box or
skips samples as `on_read_error` says; a remote store that outlives its deadline raises at once.
A chunk path in a local store that is not a regular file (a folder) raises before it is read. Chunks a pending plan needs are held by it until its
result is taken, so an eviction in between costs memory for a moment, never a wrong or second read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tensorstore as ts

from dali_pipeline.assembly import piece_table
from dali_pipeline.chunk_cache import ChunkCache
from dali_pipeline.device_arrays import GpuArrays, HostArrays, device_arrays
from dali_pipeline.reader import Patches, PatchReader, chunk_overlaps
from sampler import BatchPlan, LineageIndex, ReadBoxes


class _Fetch:
    """One chunk read in flight, shared by every pending plan that needs it."""

    __slots__ = ("buffer", "chunk", "future", "key", "nbytes")

    def __init__(self, key: tuple[int, ...], future: ts.Future, nbytes: int, buffer: np.ndarray | None) -> None:
        self.key, self.future, self.nbytes, self.buffer, self.chunk = key, future, nbytes, buffer, None


@dataclass
class _Pieces:
    """Where each piece (one patch x one chunk it overlaps) is copied from and to.

    `chunk` indexes the plan's unique chunks; `box` (a row of the plan's anchor+positive boxes)
    and `channel` the destination patch; `src` the (t, c, z0, z1, y0, y1, x0, x1) inside the
    chunk and `dst` the (z0, z1, y0, y1, x0, x1) inside the patch.
    """

    chunk: np.ndarray
    box: np.ndarray
    channel: np.ndarray
    src: np.ndarray
    dst: np.ndarray


class PendingCachedRead:
    """A plan whose missing chunks are in flight; `result()` waits, caches them and assembles the patches."""

    def __init__(self, reader: CachedPatchReader, plan: BatchPlan, keys: list[tuple[int, ...]], held: list,
                 pieces: _Pieces, nbytes: int) -> None:
        self.reader, self.plan, self.keys, self.held, self.pieces, self.nbytes = reader, plan, keys, held, pieces, nbytes

    def result(self) -> Patches:
        reader = self.reader
        deadline = reader._deadline(self.plan)
        try:
            try:  # every read decoded first, so that the uploads then go back to back on the GPU's stream
                for item in self.held:
                    if isinstance(item, _Fetch) and item.chunk is None:
                        reader._wait(item.future, deadline)
            except TimeoutError:  # a remote store that does not answer: not retried by the uncached path
                for item in self.held:
                    if isinstance(item, _Fetch) and item.chunk is None:
                        item.future.cancel()
                reader._forget(self.held)
                raise reader._timeout_error(self.plan) from None
            except Exception:  # tensorstore raises ValueError/OSError subclasses
                reader._forget(self.held)
                return reader._uncached(self.plan)
            reader.arrays.begin_step()
            chunks = [reader._resolve(c) if isinstance(c, _Fetch) else c for c in self.held]
            reader.arrays.end_uploads()
            return reader._assemble_plan(self.plan, chunks, self.pieces)
        finally:
            reader.store.unpin(self.keys)


class ChunkStore:
    """The decoded chunks of one device, shared by every CachedPatchReader on it.

    It holds the ChunkCache, the device's arrays (`device_arrays`), the reads in flight and the
    pins of pending plans, so that readers over different indexes of one collection (a
    DataModule's train, validation and predict loaders) read each chunk once and stay under one
    budget. Keys name an FOV by its array's URL, not by an index row. `budget_bytes` is the whole
    budget on the device: holders (loaders) `reserve` what their batches in flight take, and the
    chunks get the rest; `release` gives a holder's share back.
    """

    def __init__(self, budget_bytes: int, device: Literal["cpu", "gpu"] = "cpu", device_id: int | None = None,
                 copy_threads: int = 4) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"a chunk cache needs a budget > 0 bytes (0 means no cache), got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.device = device
        self.device_id = device_id
        self.arrays = device_arrays(device, device_id, copy_threads)
        self.cache = ChunkCache(self.budget_bytes)
        self.inflight: dict[tuple[int, ...], _Fetch] = {}
        # a chunk evicted while a pending plan still reads it is released when that plan is done
        self.pins: dict[tuple[int, ...], int] = {}
        self.retired: dict[tuple[int, ...], list] = {}
        self.reserved: dict[int, int] = {}  # bytes set aside per holder (id)
        self._fov_ids: dict[str, int] = {}

    def fov_ids(self, urls: list[str]) -> np.ndarray:
        """Store-wide ids of FOV arrays, by URL (the same id for the same array in any index)."""
        return np.array([self._fov_ids.setdefault(url, len(self._fov_ids)) for url in urls], np.int64)

    def reserve(self, holder: object, nbytes: int) -> None:
        """Set aside `nbytes` for `holder` (a loader's batches in flight); the chunks get what is left."""
        others = sum(v for k, v in self.reserved.items() if k != id(holder))
        if others + nbytes >= self.budget_bytes:
            raise ValueError(
                f"cache_bytes={self.budget_bytes:,} cannot hold the batches in flight: {nbytes:,} bytes for this "
                f"loader (prefetch + 2 steps of assembled patches and prefetch steps of DALI's outputs)"
                + (f" + {others:,} reserved by the other loaders on this cache" if others else "")
                + f" come first on the {self.device.upper()} and the chunks get the rest; raise cache_bytes or "
                "lower prefetch or the batch size")
        self.reserved[id(holder)] = int(nbytes)
        self.cache.budget_bytes = self.budget_bytes - others - int(nbytes)

    def release(self, holder: object) -> None:
        """Give `holder`'s share back to the chunks."""
        self.reserved.pop(id(holder), None)
        self.cache.budget_bytes = self.budget_bytes - sum(self.reserved.values())

    def pin(self, keys: list[tuple[int, ...]]) -> None:
        for key in keys:
            self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, keys: list[tuple[int, ...]]) -> None:
        for key in keys:
            left = self.pins[key] - 1
            if left:
                self.pins[key] = left
                continue
            del self.pins[key]
            for chunk in self.retired.pop(key, ()):
                self.arrays.release(chunk)

    def evicted(self, evicted: list) -> None:
        for key, chunk in evicted:
            if self.pins.get(key):  # a pending plan still reads it: released when that plan is done
                self.retired.setdefault(key, []).append(chunk)
            else:
                self.arrays.release(chunk)


class CachedPatchReader(PatchReader):
    """A PatchReader that decodes each chunk once and crops patches from the chunks of a ChunkStore.

    On a GPU store the chunks and the assembled batches live in the memory of its GPU (cupy,
    `GpuArrays`: pinned staging, uploads and one assembly kernel per step on a stream of its own,
    `stream_ptr` for DALI); on a CPU store in host memory (numpy, `HostArrays`: the pieces copied by
    threads). `stats` (ReadStats) counts the chunks this reader actually read (`chunks_decoded`,
    `bytes_decoded`), so its amplification is the amortised decoded/useful ratio; `cache.stats`
    holds the store's hits, misses, evictions and peak of cached bytes; `arrays.stats()` the
    buffers, uploads, launches and GPU times. Other options as PatchReader's.
    """

    def __init__(self, index: LineageIndex, *, store: ChunkStore, **options: Any) -> None:
        super().__init__(index, **options)
        self.store = store
        self._shape = index.fovs[list("TCZYX")].to_numpy().astype(np.int64)
        self._fov_key = store.fov_ids(index.fovs.url.astype(str).tolist())

    @property
    def cache(self) -> ChunkCache:
        return self.store.cache

    @property
    def arrays(self) -> HostArrays | GpuArrays:
        return self.store.arrays

    @property
    def device(self) -> str:
        return self.store.device

    @property
    def stream_ptr(self) -> int | None:
        """The CUDA stream the patches are assembled on (for DALI's GPU external source), or None."""
        return self.arrays.stream.ptr if self.device == "gpu" else None

    def __getstate__(self) -> dict:
        raise TypeError("a CachedPatchReader lives in one process (its cache and reads in flight); "
                        "use TripletLoader(cache_bytes=...) without workers")

    # ------------------------------------------------------------------ planning
    def _pieces(self, boxes: ReadBoxes) -> tuple[np.ndarray, _Pieces]:
        """Unique (fov, t, c, z, y, x) chunk keys the boxes touch, and the copies that assemble them."""
        touched = chunk_overlaps(boxes, self.box_shapes(boxes), self._chunks)
        n_c = boxes.channels.shape[1]
        fov, start, size, grid, owner, idx = (touched.fov, touched.start, touched.size, touched.grid,
                                              touched.owner, touched.index)
        origin = idx * grid[owner]
        lo = np.maximum(start[owner], origin)
        hi = np.minimum(start[owner] + size[owner], origin + grid[owner])
        keys, which = np.unique(np.column_stack([fov[owner], idx]), axis=0, return_inverse=True)
        src_lo, src_hi = lo - origin, hi - origin
        dst_lo, dst_hi = lo - start[owner], hi - start[owner]
        pieces = _Pieces(
            chunk=which.ravel(), box=owner // n_c, channel=owner % n_c,
            src=np.column_stack([src_lo[:, 0], src_lo[:, 1], *[v for a in (2, 3, 4) for v in (src_lo[:, a], src_hi[:, a])]]),
            dst=np.column_stack([v for a in (2, 3, 4) for v in (dst_lo[:, a], dst_hi[:, a])]),
        )
        return keys, pieces

    def _plan_boxes(self, plan: BatchPlan) -> ReadBoxes:
        """Anchor boxes, then positive boxes (fit), as one ReadBoxes."""
        if not plan.fit:
            return plan.anchor_boxes
        a, p = plan.anchor_boxes, plan.positive_boxes
        return ReadBoxes(fov=np.concatenate([a.fov, p.fov]), t=np.concatenate([a.t, p.t]),
                         z=np.concatenate([a.z, p.z]), y=np.concatenate([a.y, p.y]), x=np.concatenate([a.x, p.x]),
                         channels=np.concatenate([a.channels, p.channels]))

    # ------------------------------------------------------------------ reading
    def submit(self, plan: BatchPlan) -> PendingCachedRead:
        """List the plan's chunks, start reading those neither cached nor in flight, and return at once."""
        keys_array, pieces = self._pieces(self._plan_boxes(plan))
        local = keys_array.tolist()  # (fov row of this index, t, c, z, y, x) chunk indices
        keys = [(int(self._fov_key[k[0]]), *k[1:]) for k in local]  # the store's keys
        store = self.store
        store.pin(keys)
        held: list = []
        missing: list[tuple[int, list[int], tuple[int, ...]]] = []
        for key, at in zip(keys, local):
            fetch = store.inflight.get(key)
            if fetch is not None:  # read for an earlier plan, not yet taken: shared, not read again
                store.cache.stats.hits += 1
                held.append(fetch)
                continue
            chunk = store.cache.get(key)
            held.append(chunk)
            if chunk is None:
                missing.append((len(held) - 1, at, key))
        if missing and any(self._chunk_file_problem(at[0], np.asarray(at[1:])) for _, at, _ in missing):
            store.unpin(keys)
            self._check_chunk_files(plan)  # raises, naming the box
        if missing:
            with ts.Batch() as batch:
                for slot, at, key in missing:
                    fov, origin = at[0], np.array(at[1:]) * self._chunks[at[0]]
                    end = np.minimum(origin + self._chunks[fov], self._shape[fov])
                    view = self._raw_store(fov, lenient=True)[tuple(slice(int(a), int(b)) for a, b in zip(origin, end))]
                    buffer = self.arrays.staging(tuple(int(v) for v in end - origin), view.dtype.numpy_dtype)
                    if buffer is not None:  # decoded straight into a recycled or pinned host buffer
                        future = ts.array(buffer, copy=False, write=True).write(view.translate_to[0])
                    else:  # read with the step's batch (tensorstore allocates)
                        future = view.read(batch=batch)
                    fetch = _Fetch(key, future, int(np.prod(end - origin)) * int(self._itemsize[fov]), buffer)
                    store.inflight[key] = fetch
                    held[slot] = fetch
        return PendingCachedRead(self, plan, keys, held, pieces, self.plan_bytes(plan))

    def _resolve(self, fetch: _Fetch) -> Any:
        """The fetched chunk in the cache's array module, cached and counted on first use."""
        if fetch.chunk is None:
            done = fetch.future.result()
            fetch.chunk = self.arrays.adopt(fetch.buffer if fetch.buffer is not None else done, self.dtype)
            if self.store.inflight.get(fetch.key) is fetch:
                del self.store.inflight[fetch.key]
            self.store.evicted(self.cache.put(fetch.key, fetch.chunk))
            self.stats.chunks_decoded += 1
            self.stats.bytes_decoded += fetch.nbytes
        return fetch.chunk

    def _forget(self, held: list) -> None:
        """Drop this plan's failed or unfinished reads from the in-flight table (a later plan retries)."""
        for item in held:
            if isinstance(item, _Fetch) and item.chunk is None and self.store.inflight.get(item.key) is item:
                del self.store.inflight[item.key]

    def _uncached(self, plan: BatchPlan) -> Patches:
        """The plan through PatchReader's path: errors name the box, or samples are skipped."""
        got = PatchReader.submit(self, plan).result()
        move = self.arrays.from_host
        return Patches(got.plan, *[None if a is None else move(a) if isinstance(a, np.ndarray) else [move(s) for s in a]
                                   for a in (got.anchor, got.positive)])

    def _assemble_plan(self, plan: BatchPlan, chunks: list, pieces: _Pieces) -> Patches:
        """Copy every piece from its chunk into (2B, C, Z, Y, X) buffers, one per box shape (one piece table)."""
        n = len(plan)
        shapes = self.box_shapes(self._plan_boxes(plan))
        unique, which = np.unique(shapes, axis=0, return_inverse=True)
        which = which.ravel()
        counts = np.bincount(which, minlength=len(unique))
        row = np.empty(len(which), np.int64)  # each box's row in its shape's buffer
        row[np.argsort(which, kind="stable")] = np.arange(len(which)) - np.repeat(np.cumsum(counts) - counts, counts)
        out_shapes = np.column_stack([counts, np.full(len(unique), self.index.n_channels), unique]).astype(np.int64)
        bufs = [self.arrays.empty(tuple(shape), self.dtype) for shape in out_shapes.tolist()]
        table = piece_table(np.array([c.shape for c in chunks], np.int64).reshape(-1, 5), pieces.chunk, pieces.src,
                            which[pieces.box], row[pieces.box], pieces.channel, pieces.dst, out_shapes)
        self.arrays.assemble(table, chunks, bufs)
        self.stats.steps += 1
        self.stats.patches += len(shapes)
        self.stats.bytes_delivered += self.plan_bytes(plan)
        if len(bufs) == 1:
            data = bufs[0]
        else:
            data = [bufs[g][r] for g, r in zip(which.tolist(), row.tolist())]
        return Patches(plan, data[:n], data[n:] if plan.fit else None)
