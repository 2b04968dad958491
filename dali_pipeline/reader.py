"""PatchReader: a BatchPlan's read boxes into contiguous native-dtype (B, C, Z, Y, X) buffers.

All reads of a step (anchors and positives) are issued together through tensorstore, so a chunk
shared by several boxes is decoded once; the next plans can be kept in flight under a byte budget.
Stores are opened lazily, read-only, once per process (the reader pickles without them, for
spawned workers: tensorstore must never be touched before a fork).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import tensorstore as ts

from sampler import BatchPlan, LineageIndex, ReadBoxes
from sampler.augment import AugmentConfig
from sampler.kvstore import RemoteLimits, is_local, local_path

log = logging.getLogger(__name__)

#: default bounds checked before any read (bytes): one patch (C x Z x Y x X of a box) and one chunk
MAX_PATCH_BYTES = 256 << 20
MAX_CHUNK_BYTES = 1 << 30


def kvstore_reads() -> int:
    """Reads tensorstore's key-value stores have served in this process (all drivers).

    A process-wide counter from tensorstore's own metrics; take differences around a run. On an
    unsharded store each read is one chunk file; on a sharded store a read may fetch several inner
    chunks (batched byte ranges), so it is not a chunk count there (see `ReadStats` for that).
    """
    total = 0
    for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/"):
        if metric["name"].endswith("/read"):
            total += sum(int(v.get("value", 0)) for v in metric["values"])
    return total


class PatchReadError(RuntimeError):
    """A read box could not be read (corrupt, truncated, not a regular file, a remote store that does
    not answer within its limits or, in strict mode, a missing chunk)."""


@dataclass
class ReadStats:
    """Counters for read amplification: bytes delivered vs chunks decoded (from the chunk grid)."""

    steps: int = 0
    patches: int = 0
    bytes_delivered: int = 0
    chunks_decoded: int = 0
    bytes_decoded: int = 0
    #: samples (anchor and positive together) replaced because a box read failed (on_read_error="skip")
    skipped: int = 0
    #: skipped samples per reason ("Experiment 'a', FOV A/1/0: <first line of the tensorstore error>")
    skip_reasons: Counter = field(default_factory=Counter)

    @property
    def amplification(self) -> float:
        """Decoded chunk bytes per delivered byte (1.0 = nothing wasted)."""
        return self.bytes_decoded / self.bytes_delivered if self.bytes_delivered else float("nan")

    def as_dict(self) -> dict[str, float]:
        out = {k: v for k, v in self.__dict__.items() if k != "skip_reasons"}
        return {**out, "amplification": self.amplification}


@dataclass
class Patches:
    """Native-dtype pixels of one plan: `anchor` and (fit) `positive`, each (B, C, Z, Y, X)."""

    plan: BatchPlan
    anchor: np.ndarray | list[np.ndarray]
    positive: np.ndarray | list[np.ndarray] | None = None


@dataclass
class PendingRead:
    """Reads of one plan in flight; `result()` waits and returns the Patches.

    One future per box shape: a single contiguous (2B, C, Z, Y, X) read when every experiment has
    the same box, else one stack per shape and a list of per-sample arrays in plan order.
    """

    reader: "PatchReader"
    plan: BatchPlan
    groups: list[tuple[np.ndarray, ts.Future]]
    nbytes: int
    _views: list = field(repr=False, default_factory=list)
    #: read through stores that fill missing chunks (after the chunk files were checked)
    lenient: bool = False

    def result(self) -> Patches:
        reader = self.reader
        deadline = reader._deadline(self.plan)
        try:
            parts = [(members, reader._wait(future, deadline)) for members, future in self.groups]
        except TimeoutError:
            for _, future in self.groups:
                future.cancel()
            raise reader._timeout_error(self.plan) from None
        except Exception as err:  # tensorstore raises ValueError/OSError subclasses
            if not self.lenient and not reader.strict and reader._reads_local(self.plan):
                # local stores are read without filling missing chunks first: a missing chunk reads as
                # the fill value only once its path is checked (a folder there is an error); then read
                # again, filling, so that skip or raise below see real failures only
                reader._check_chunk_files(self.plan)
                return reader._issue(self.plan, lenient=True).result()
            if self.reader.on_read_error == "skip":
                return self.reader._skip_failed(self.plan, self._views, err)
            self.reader._raise_for_box(self.plan, self._views, err)
            raise
        n = len(self.plan)
        if len(parts) == 1:
            data = parts[0][1]
        else:
            data = [None] * len(self._views)
            for members, stack in parts:
                for i, sample in zip(members.tolist(), stack):
                    data[i] = sample
        return Patches(self.plan, data[:n], data[n:] if self.plan.fit else None)


class PatchReader:
    """Reads BatchPlans of `index` with one shared tensorstore Context.

    `cache_pool_bytes` bounds tensorstore's chunk cache (0 = no caching, as production uses for
    random access); `concurrency` bounds its file I/O and decode threads; `strict` makes a missing
    chunk an error instead of the fill value. A chunk or shard path that exists but is not a regular
    file (a folder) is always a PatchReadError naming the FOV, the box and the path.

    `remote` bounds reads of remote stores (http, gcs, s3): retries, backoff and the deadline of each
    wait (opening a store, one plan's pixels); None takes each experiment's limits from the index
    (the collection YAML's `remote:`; defaults: `RemoteLimits()`). A store that does not answer in
    time raises PatchReadError naming the experiment, FOV and URL. Local reads are not timed out.

    `on_read_error="raise"` (default) raises a PatchReadError naming the experiment, FOV, t and box
    of the first failing read. `"skip"` replaces each sample whose anchor or positive box fails by
    the next sample of the same plan (cyclically) whose boxes both read, rows, boxes, statistics
    and augmentation parameters included, so pairs stay pairs and the batch size is kept; skipped
    samples are counted in `stats.skipped` / `stats.skip_reasons` and logged (logger
    `dali_pipeline.reader`), and a plan with more than `max_skip_fraction` of its samples skipped
    (or none left) raises PatchReadError. Stores that cannot be opened always raise.

    `max_patch_bytes` bounds one patch (C x Z x Y x X x itemsize of an experiment's box) and
    `max_chunk_bytes` one stored chunk (tensorstore decodes whole chunks): both are checked from
    the index's metadata when the reader is made, before any pixel buffer is allocated (None: no
    bound). `crop_yx` reads only the centre (Y, X) of every box, for plans shifted by `CentreCrops`.
    """

    def __init__(
        self,
        index: LineageIndex,
        *,
        cache_pool_bytes: int = 0,
        concurrency: int | None = None,
        strict: bool = False,
        on_read_error: Literal["raise", "skip"] = "raise",
        max_skip_fraction: float = 0.1,
        max_patch_bytes: int | None = MAX_PATCH_BYTES,
        max_chunk_bytes: int | None = MAX_CHUNK_BYTES,
        crop_yx: tuple[int, int] | None = None,
        remote: RemoteLimits | None = None,
    ) -> None:
        if on_read_error not in ("raise", "skip"):
            raise ValueError(f"on_read_error must be 'raise' or 'skip', got {on_read_error!r}")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must lie in [0, 1], got {max_skip_fraction}")
        self.index = index
        self.cache_pool_bytes = cache_pool_bytes
        self.concurrency = concurrency or max(2, os.cpu_count() or 2)
        self.strict = strict
        self.on_read_error = on_read_error
        self.max_skip_fraction = float(max_skip_fraction)
        self.max_patch_bytes = max_patch_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.dtype = index.batch_dtype
        self.stats = ReadStats()
        self._fovs = index.fovs
        self._chunks = index.fovs[[f"chunk_{a}" for a in "tczyx"]].to_numpy().astype(np.int64)
        self._itemsize = np.array([np.dtype(index.experiments.storage_dtype[e]).itemsize for e in index.fovs.exp])
        self._fov_box = index.exp_box[index.fovs.exp.to_numpy()].copy()
        exp_limits = [remote if remote is not None else _index_limits(index, e) for e in range(len(index.experiments))]
        #: per FOV: its remote limits (None for a local store)
        self._limits: list[RemoteLimits | None] = [
            None if is_local(url) else exp_limits[e] for url, e in zip(index.fovs.url, index.fovs.exp.tolist())
        ]
        self.crop_yx = None if crop_yx is None else _check_crop(index, crop_yx)
        if self.crop_yx is not None:
            self._fov_box[:, 1:] = self.crop_yx
        self._check_bounds()
        self._reset()

    def _check_bounds(self) -> None:
        """Refuse experiments whose patches or chunks exceed the byte bounds, before reading anything."""
        itemsize = self.dtype.itemsize
        if self.max_patch_bytes is not None:
            for e, name in enumerate(self.index.experiments.name.tolist()):
                box = [int(v) for v in self.index.exp_box[e]]
                nbytes = self.index.n_channels * int(np.prod(box)) * itemsize
                if nbytes > self.max_patch_bytes:
                    raise ValueError(
                        f"Experiment '{name}': a patch of {self.index.n_channels} channels x "
                        f"{box[0]}x{box[1]}x{box[2]} (ZYX) x {itemsize} B is {nbytes:,} bytes, "
                        f"over max_patch_bytes={self.max_patch_bytes:,}"
                    )
        if self.max_chunk_bytes is not None:
            chunk_bytes = np.prod(self._chunks, axis=1) * self._itemsize
            over = np.flatnonzero(chunk_bytes > self.max_chunk_bytes)
            if len(over):
                row = self._fovs.iloc[int(over[0])]
                shape = "x".join(str(int(v)) for v in self._chunks[over[0]])
                raise ValueError(
                    f"Experiment '{row.experiment}', FOV {row.fov_name}: chunk shape {shape} (TCZYX) is "
                    f"{int(chunk_bytes[over[0]]):,} bytes, over max_chunk_bytes={self.max_chunk_bytes:,} "
                    f"({len(over)} FOV(s) affected)"
                )

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._contexts: dict[RemoteLimits | None, ts.Context] = {}
        self._raw: dict[tuple[int, bool], ts.TensorStore] = {}  # by (fov, fills missing chunks)
        self._stores: dict[int, ts.TensorStore] = {}  # by fov, in the batch dtype
        self._lenient_stores: dict[int, ts.TensorStore] = {}  # the same, filling missing chunks
        self._key_formats: dict[int, tuple[str, str, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_contexts"] = {}
        state["_raw"] = {}
        state["_stores"] = {}
        state["_lenient_stores"] = {}
        state["_key_formats"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------------ stores
    def _context(self, limits: RemoteLimits | None) -> ts.Context:
        """The shared Context (chunk cache, thread pools), with `limits`' retry policy for remote stores."""
        context = self._contexts.get(limits)
        if context is None:
            spec = {
                "cache_pool": {"total_bytes_limit": int(self.cache_pool_bytes)},
                "data_copy_concurrency": {"limit": self.concurrency},
                "file_io_concurrency": {"limit": max(4, 4 * self.concurrency)},
            }
            context = self._contexts[limits] = ts.Context({**spec, **(limits.context_spec() if limits else {})})
        return context

    def _raw_store(self, fov: int, lenient: bool = False) -> ts.TensorStore:
        """The FOV's array as stored (native dtype), opened read-only once per process.

        A local store is opened without filling missing chunks unless `lenient` (or `strict`): a
        missing chunk then fails the read, and the reader checks the chunk files before reading
        again leniently, so a folder at a chunk path cannot read as the fill value.
        """
        if self._pid != os.getpid():
            self._reset()
        limits = self._limits[fov]
        fill = not self.strict and (lenient or limits is not None)
        store = self._raw.get((fov, fill))
        if store is None:
            row = self._fovs.iloc[fov]
            spec = {"driver": "zarr" if int(row.zarr_format) == 2 else "zarr3", "kvstore": row.url}
            if not fill:
                spec["fill_missing_data_reads"] = False
            future = ts.open(spec, read=True, open=True, context=self._context(limits))
            try:
                store = future.result(timeout=None if limits is None else limits.timeout_s)
            except TimeoutError:
                future.cancel()
                raise PatchReadError(
                    f"Experiment '{row.experiment}', FOV {row.fov_name}: cannot open {row.url}: no answer within "
                    f"remote timeout_s={limits.timeout_s:g} s; check that the server is reachable, or raise "
                    "'remote: {timeout_s: ...}' in the collection YAML (reader option remote=)"
                ) from None
            except Exception as err:
                raise PatchReadError(
                    f"Experiment '{row.experiment}', FOV {row.fov_name}: cannot open {row.url}: {err}"
                ) from None
            self._raw[(fov, fill)] = store
        return store

    def _store(self, fov: int, lenient: bool = False) -> ts.TensorStore:
        """The FOV's array in the batch dtype (promoted on read when the experiment stores another)."""
        if self._pid != os.getpid():
            self._reset()
        stores = self._lenient_stores if lenient else self._stores
        store = stores.get(fov)
        if store is None:
            store = self._raw_store(fov, lenient)
            if store.dtype.numpy_dtype != self.dtype:
                store = ts.cast(store, self.dtype)
            stores[fov] = store
        return store

    @property
    def largest_box(self) -> int:
        """Voxels (Z x Y x X) of the largest box this reader reads."""
        return int(np.prod(self._fov_box.astype(np.int64), axis=1).max())

    def box_shapes(self, boxes: ReadBoxes) -> np.ndarray:
        """(B, 3) read box (Z, Y, X) of each sample: its experiment's (`index.exp_box`), or the crop."""
        return self._fov_box[boxes.fov]

    def _views(self, boxes: ReadBoxes, lenient: bool = False) -> list[ts.TensorStore]:
        return [
            self._store(f, lenient)[t, list(c), z0 : z0 + z, y0 : y0 + y, x0 : x0 + x].translate_to[0]
            for f, t, z0, y0, x0, c, (z, y, x) in zip(
                boxes.fov.tolist(), boxes.t.tolist(), boxes.z.tolist(), boxes.y.tolist(), boxes.x.tolist(),
                boxes.channels.tolist(), self.box_shapes(boxes).tolist(),
            )
        ]

    # ------------------------------------------------------------------ reading
    def plan_bytes(self, plan: BatchPlan) -> int:
        """Bytes of the buffers a plan fills."""
        boxes = [plan.anchor_boxes] + ([plan.positive_boxes] if plan.fit else [])
        voxels = sum(int(np.prod(self.box_shapes(b), axis=1).sum()) for b in boxes)
        return voxels * self.index.n_channels * self.dtype.itemsize

    def submit(self, plan: BatchPlan) -> PendingRead:
        """Issue every read of a plan (anchors and positives together) and return at once."""
        pending = self._issue(plan)
        self._count(plan)
        return pending

    def _issue(self, plan: BatchPlan, lenient: bool = False) -> PendingRead:
        views = self._views(plan.anchor_boxes, lenient)
        shapes = self.box_shapes(plan.anchor_boxes)
        if plan.fit:
            views += self._views(plan.positive_boxes, lenient)
            shapes = np.concatenate([shapes, self.box_shapes(plan.positive_boxes)])
        unique, which = np.unique(shapes, axis=0, return_inverse=True)
        groups = [np.flatnonzero(which.ravel() == g) for g in range(len(unique))]
        with ts.Batch() as batch:
            futures = [ts.stack([views[i] for i in members.tolist()]).read(batch=batch) for members in groups]
        return PendingRead(self, plan, list(zip(groups, futures)), self.plan_bytes(plan), views, lenient)

    def read(self, plan: BatchPlan) -> Patches:
        """The plan's patches, read now."""
        return self.submit(plan).result()

    def prefetch(self, plans: Iterable[BatchPlan], depth: int = 2, budget_bytes: int | None = None) -> Iterator[Patches]:
        """Patches of `plans` in order, keeping up to `depth` further plans in flight.

        In-flight bytes stay within `budget_bytes` (one plan is always allowed, so a budget smaller
        than a plan degrades to no read-ahead instead of stalling).
        """
        pending: deque[PendingRead] = deque()
        source = iter(plans)
        exhausted = False
        while True:
            while not exhausted and len(pending) <= depth:
                nxt = next(source, None)
                if nxt is None:
                    exhausted = True
                    break
                in_flight = sum(p.nbytes for p in pending)
                if pending and budget_bytes is not None and in_flight + self.plan_bytes(nxt) > budget_bytes:
                    # wait for the oldest before issuing this one
                    yield pending.popleft().result()
                pending.append(self.submit(nxt))
            if not pending:
                return
            yield pending.popleft().result()

    # ------------------------------------------------------------------ bounded waits
    def _deadline(self, plan: BatchPlan) -> float | None:
        """When waiting for a plan's reads must end (time.monotonic()): its remote FOVs' largest
        timeout from now; None when it reads local stores only."""
        fovs = np.unique(np.concatenate([b.fov for b in self._box_sets(plan)])).tolist()
        timeouts = [limits.timeout_s for f in fovs if (limits := self._limits[f]) is not None]
        return time.monotonic() + max(timeouts) if timeouts else None

    def _reads_local(self, plan: BatchPlan) -> bool:
        """Whether a plan reads any local store."""
        return any(self._limits[f] is None for f in np.unique(np.concatenate([b.fov for b in self._box_sets(plan)])).tolist())

    @staticmethod
    def _wait(future: ts.Future, deadline: float | None) -> np.ndarray:
        """The future's result, waiting until `deadline` at most (TimeoutError after it)."""
        return future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _timeout_error(self, plan: BatchPlan) -> PatchReadError:
        """The error of a plan whose remote reads outlived their deadline, naming its remote stores."""
        fovs = np.unique(np.concatenate([b.fov for b in self._box_sets(plan)])).tolist()
        remote = [f for f in fovs if self._limits[f] is not None]
        names = "; ".join(
            f"Experiment '{row.experiment}', FOV {row.fov_name} ({row.url})"
            for row in (self._fovs.iloc[f] for f in remote[:3])
        ) + (f" and {len(remote) - 3} more FOVs" if len(remote) > 3 else "")
        timeout = max(self._limits[f].timeout_s for f in remote)
        return PatchReadError(
            f"{names}: the step's reads got no complete answer within remote timeout_s={timeout:g} s; check that "
            "the server is reachable, or raise 'remote: {timeout_s: ...}' in the collection YAML (reader option "
            "remote=)"
        )

    @staticmethod
    def _box_sets(plan: BatchPlan) -> list[ReadBoxes]:
        return [plan.anchor_boxes] + ([plan.positive_boxes] if plan.fit else [])

    # ------------------------------------------------------------------ chunk files
    def _chunk_path(self, fov: int, chunk: np.ndarray) -> str:
        """The file holding chunk `chunk` (grid index, TCZYX) of a local FOV: the chunk's, or its shard's."""
        fmt = self._key_formats.get(fov)
        if fmt is None:
            meta = self._raw_store(fov, lenient=True).spec(retain_context=False).to_json()["metadata"]
            if int(meta.get("zarr_format", 2)) == 2:
                prefix, sep, grid = "", meta.get("dimension_separator", "."), self._chunks[fov]
            else:
                encoding = meta.get("chunk_key_encoding", {"name": "default"})
                default = encoding.get("name") == "default"
                sep = encoding.get("configuration", {}).get("separator", "/" if default else ".")
                prefix = "c" + sep if default else ""
                grid = np.asarray(meta["chunk_grid"]["configuration"]["chunk_shape"], np.int64)
            fmt = self._key_formats[fov] = (prefix, sep, grid)
        prefix, sep, grid = fmt
        key = prefix + sep.join(str(int(i)) for i in (chunk * self._chunks[fov]) // grid)
        return os.path.join(local_path(self._fovs.url.iloc[fov]), key)

    def _chunk_file_problem(self, fov: int, chunk: np.ndarray) -> str | None:
        """What is wrong with the file of a chunk of a local FOV ("a folder", ...), or None (a file, or missing)."""
        if self._limits[fov] is not None:
            return None
        path = self._chunk_path(fov, chunk)
        if os.path.lexists(path) and not os.path.isfile(path):
            return "a folder" if os.path.isdir(path) else "not a regular file"
        return None

    def _check_chunk_files(self, plan: BatchPlan) -> None:
        """Raise a PatchReadError naming the box when a chunk (or shard) path the plan reads in a local
        store exists but is not a regular file (a folder): tensorstore would read it as missing."""
        seen: set[tuple[int, ...]] = set()
        for role, boxes in zip(("anchor", "positive"), self._box_sets(plan)):
            touched = chunk_overlaps(boxes, self.box_shapes(boxes), self._chunks)
            n_c = boxes.channels.shape[1]
            for owner, index in zip(touched.owner.tolist(), touched.index):
                fov = int(touched.fov[owner])
                key = (fov, *index.tolist())
                if key in seen:
                    continue
                seen.add(key)
                if what := self._chunk_file_problem(fov, index):
                    where, box = self._box_label(role, boxes, owner // n_c)
                    path = self._chunk_path(fov, index)
                    raise PatchReadError(
                        f"{where}: {box}: chunk file {path} is {what}, so it cannot be read (not even as the fill "
                        "value); restore the chunk file from the original store, or delete it to mean 'fill value'"
                    )

    # ------------------------------------------------------------------ accounting and errors
    def _count(self, plan: BatchPlan) -> None:
        boxes = [plan.anchor_boxes] + ([plan.positive_boxes] if plan.fit else [])
        chunks = np.unique(np.concatenate([self._chunks_touched(b) for b in boxes]), axis=0)
        fov = chunks[:, 0]
        self.stats.steps += 1
        self.stats.patches += sum(len(b) for b in boxes)
        self.stats.bytes_delivered += self.plan_bytes(plan)
        self.stats.chunks_decoded += len(chunks)
        self.stats.bytes_decoded += int((np.prod(self._chunks[fov], axis=1) * self._itemsize[fov]).sum())

    def _chunks_touched(self, boxes: ReadBoxes) -> np.ndarray:
        """(n, 6) int64 rows (fov, t, c, z, y, x chunk indices) of every chunk the boxes touch."""
        touched = chunk_overlaps(boxes, self.box_shapes(boxes), self._chunks)
        return np.column_stack([touched.fov[touched.owner], touched.index])

    def _box_label(self, role: str, b: ReadBoxes, j: int) -> tuple[str, str]:
        """(where, box) descriptions of sample j of `b`: experiment, FOV and t; the box itself."""
        z, y, x = self.box_shapes(b)[j].tolist()
        row = self._fovs.iloc[int(b.fov[j])]
        where = f"Experiment '{row.experiment}', FOV {row.fov_name}, t={int(b.t[j])}"
        box = (f"{role} box z[{b.z[j]}:{b.z[j] + z}] y[{b.y[j]}:{b.y[j] + y}] x[{b.x[j]}:{b.x[j] + x}] "
               f"channels {b.channels[j].tolist()}")
        return where, box

    def _skip_failed(self, plan: BatchPlan, views: list, err: Exception) -> Patches:
        """on_read_error="skip": read every box on its own, replace failed samples by the next good one."""
        n = len(plan)
        boxes = [("anchor", plan.anchor_boxes)] + ([("positive", plan.positive_boxes)] if plan.fit else [])
        with ts.Batch() as batch:
            futures = [view.read(batch=batch) for view in views]
        deadline = self._deadline(plan)
        data: list[np.ndarray | None] = [None] * len(views)
        bad = np.zeros(n, dtype=bool)
        reasons: list[tuple[int, str]] = []
        for k, future in enumerate(futures):
            try:
                data[k] = self._wait(future, deadline)
            except TimeoutError:
                for f in futures:
                    f.cancel()
                raise self._timeout_error(plan) from None
            except Exception as box_err:
                role, b = boxes[k // n]
                j = k % n
                if not bad[j]:
                    where, box = self._box_label(role, b, j)
                    row = self._fovs.iloc[int(b.fov[j])]
                    cause = str(box_err).splitlines()[0] if str(box_err) else type(box_err).__name__
                    reasons.append((j, f"Experiment '{row.experiment}', FOV {row.fov_name}: {cause}"))
                    log.warning("skipping sample %d of a plan of %d: %s: %s failed: %s", j, n, where, box, cause)
                bad[j] = True
        if not bad.any():  # the batched read failed but every box reads alone: use them
            return self._assemble(plan, data)
        good = np.flatnonzero(~bad)
        n_bad = int(bad.sum())
        self.stats.skipped += n_bad
        for _, reason in reasons:
            self.stats.skip_reasons[reason] += 1
        if not len(good) or n_bad > self.max_skip_fraction * n:
            where = "; ".join(r for _, r in reasons[:3])
            raise PatchReadError(
                f"{n_bad} of {len(plan)} samples of a step failed to read, over max_skip_fraction="
                f"{self.max_skip_fraction:g}: {where}"
            ) from None
        # each failed sample takes the next good one of the plan (cyclically): deterministic, pairs kept
        pos = np.searchsorted(good, np.arange(n), side="left")
        source = np.where(bad, good[pos % len(good)], np.arange(n))
        new_plan = take_plan(plan, source)
        new_data = [data[(k // n) * n + int(source[k % n])] for k in range(len(views))]
        return self._assemble(new_plan, new_data)

    def _assemble(self, plan: BatchPlan, data: list) -> Patches:
        n = len(plan)
        shapes = {d.shape for d in data}
        if len(shapes) == 1:  # one box shape: contiguous stacks, as the batched read gives
            anchor = np.stack(data[:n])
            positive = np.stack(data[n:]) if plan.fit else None
        else:
            anchor, positive = list(data[:n]), (list(data[n:]) if plan.fit else None)
        return Patches(plan, anchor, positive)

    def _raise_for_box(self, plan: BatchPlan, views: list, err: Exception) -> None:
        """Find the first box whose read fails and raise a PatchReadError naming it."""
        boxes = [("anchor", plan.anchor_boxes)] + ([("positive", plan.positive_boxes)] if plan.fit else [])
        deadline = self._deadline(plan)
        i = 0
        for role, b in boxes:
            for j, (z, y, x) in enumerate(self.box_shapes(b).tolist()):
                future = views[i].read()
                try:
                    self._wait(future, deadline)
                except TimeoutError:
                    future.cancel()
                    raise self._timeout_error(plan) from None
                except Exception as box_err:
                    row = self._fovs.iloc[int(b.fov[j])]
                    raise PatchReadError(
                        f"Experiment '{row.experiment}', FOV {row.fov_name}, t={int(b.t[j])}: {role} box "
                        f"z[{b.z[j]}:{b.z[j] + z}] y[{b.y[j]}:{b.y[j] + y}] x[{b.x[j]}:{b.x[j] + x}] "
                        f"channels {b.channels[j].tolist()} failed: {box_err}"
                    ) from None
                i += 1
        raise PatchReadError(f"reading a plan of {len(plan)} anchors failed: {err}") from None


def _index_limits(index: LineageIndex, exp: int) -> RemoteLimits:
    """Experiment `exp`'s remote limits as the index recorded them (defaults for an index without them)."""
    row = index.experiments.iloc[exp]
    kwargs = {f.name: getattr(row, f"remote_{f.name}") for f in dataclasses.fields(RemoteLimits)
              if f"remote_{f.name}" in index.experiments}
    return RemoteLimits(**{k: int(v) if k == "retries" else float(v) for k, v in kwargs.items()})


@dataclass
class ChunkOverlaps:
    """Every (patch, chunk) overlap of some boxes; patch p is sample p // C, channel p % C.

    Per patch: `fov`, `start` and `size` (T, C, Z, Y, X of its box, t and c of size 1) and `grid`
    (its FOV's chunk shape). Per overlap: `owner` (the patch) and `index` (the chunk's grid index).
    """

    fov: np.ndarray
    start: np.ndarray
    size: np.ndarray
    grid: np.ndarray
    owner: np.ndarray
    index: np.ndarray


def chunk_overlaps(boxes: ReadBoxes, box_shapes: np.ndarray, chunks_by_fov: np.ndarray) -> ChunkOverlaps:
    """The chunks each channel of each box touches, vectorised (`box_shapes`: (B, 3) ZYX, `chunks_by_fov`: TCZYX)."""
    n, n_c = len(boxes), boxes.channels.shape[1]
    fov = np.repeat(boxes.fov.astype(np.int64), n_c)
    size = np.ones((n * n_c, 5), np.int64)
    size[:, 2:] = np.repeat(box_shapes, n_c, axis=0)
    start = np.stack(np.broadcast_arrays(
        boxes.t[:, None], boxes.channels, boxes.z[:, None], boxes.y[:, None], boxes.x[:, None]), axis=-1
    ).reshape(-1, 5).astype(np.int64)
    grid = chunks_by_fov[fov]
    first = start // grid
    count = (start + size - 1) // grid - first + 1
    total = np.prod(count, axis=1)
    owner = np.repeat(np.arange(len(first)), total)
    rest = np.arange(len(owner)) - np.repeat(np.cumsum(total) - total, total)
    index = np.empty((len(owner), 5), np.int64)
    for axis in range(4, -1, -1):
        k = count[owner, axis]
        index[:, axis] = first[owner, axis] + rest % k
        rest //= k
    return ChunkOverlaps(fov, start, size, grid, owner, index)


def _crop_problem(index: LineageIndex, crop_yx: tuple[int, int]) -> str | None:
    """Why `crop_yx` cannot be read as the centre of every box, or None."""
    fy, fx = crop_yx
    _, y, x = index.read_shape
    if index.resampled:
        return ("crop_yx reads the centre of boxes of one size, but pixel sizes differ between experiments "
                "here (each box is resampled): crop after resampling instead")
    if not (0 < fy <= y and 0 < fx <= x):
        return f"crop_yx {(fy, fx)} must fit inside the read patch {(y, x)}"
    return None


def _check_crop(index: LineageIndex, crop_yx: tuple[int, int]) -> tuple[int, int]:
    crop = (int(crop_yx[0]), int(crop_yx[1]))
    if problem := _crop_problem(index, crop):
        raise ValueError(problem)
    return crop


def read_crop(index: LineageIndex, augment: AugmentConfig | None, final_patch: tuple[int, int] | None) -> tuple[int, int] | None:
    """The centre crop to read instead of whole boxes: `final_patch` when nothing needs a box's margin
    (no augmentations, one box size for every experiment) and it fits; else None (read whole boxes)."""
    if final_patch is None or augment is not None:
        return None
    crop = (int(final_patch[0]), int(final_patch[1]))
    return None if _crop_problem(index, crop) else crop


@dataclass(frozen=True)
class CentreCrops:
    """Plans whose read boxes are shrunk to their centre (Y, X): pair it with `PatchReader(crop_yx=)`.

    When nothing needs the margin of a read box (no augmentation; a centre crop the model sees),
    reading only the crop decodes fewer chunks and skips the crop copy. The shifted boxes start
    where the graph's centre crop would start: (read - crop) // 2. Picklable (spawned workers).
    """

    plan_for: Callable[[int, int], BatchPlan]
    read_yx: tuple[int, int]
    crop_yx: tuple[int, int]

    def __call__(self, step: int, epoch: int) -> BatchPlan:
        return centre_crop(self.plan_for(step, epoch), self.read_yx, self.crop_yx)


def centre_crop(plan: BatchPlan, read_yx: tuple[int, int], crop_yx: tuple[int, int]) -> BatchPlan:
    """The plan with every read box moved to the start of its centre (Y, X) crop."""
    dy, dx = ((r - c) // 2 for r, c in zip(read_yx, crop_yx))
    shift = {name: dataclasses.replace(boxes, y=boxes.y + dy, x=boxes.x + dx)
             for name in ("anchor_boxes", "positive_boxes") if (boxes := getattr(plan, name)) is not None}
    return dataclasses.replace(plan, **shift)


def take_plan(plan: BatchPlan, rows: np.ndarray) -> BatchPlan:
    """The plan with its samples taken at `rows` (every per-sample field: rows, boxes, norm, aug...)."""

    def take(value):
        if value is None:
            return None
        if isinstance(value, ReadBoxes):
            return ReadBoxes(**{f.name: getattr(value, f.name)[rows] for f in dataclasses.fields(value)})
        if isinstance(value, dict):
            return {k: take(v) for k, v in value.items()}
        return np.asarray(value)[rows]

    return dataclasses.replace(plan, **{f.name: take(getattr(plan, f.name)) for f in dataclasses.fields(plan)})
