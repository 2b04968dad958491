"""TripletLoader: epochs of batches from the DALI pipeline, as training code expects them.

The index owns what is read, the sampler which steps; the loader decides only where pixels go
(device, read-ahead, normalize on or off, output format). It keys every plan by its own (epoch,
step), counts the steps the user has received (not what DALI prefetched), builds its DALI
iterator lazily (after `load_state_dict`), and positions the feed before each epoch, so a resume
or a `set_epoch` between epochs yields exactly the batches the sampler says.
"""

from __future__ import annotations

import base64
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np

from dali_pipeline._dali import require_dali
from dali_pipeline.augment_graph import used_params
from dali_pipeline.cached_reader import CachedPatchReader, ChunkStore
from dali_pipeline.feed import PlanFeed, StatelessPlanSource, source_names
from dali_pipeline.meta import (
    INDEX_COLUMNS,
    META_COLUMNS,
    reference_norm_meta,
    row_meta,
)
from dali_pipeline.pipeline import GraphSpec, build_pipeline, output_names
from dali_pipeline.reader import CentreCrops, PatchReader, read_crop
from dali_pipeline.z_reduction import CenterSlices, channel_modes
from sampler import LineageIndex, TripletSampler


class TripletLoader:
    """Iterable over one epoch of batches per `iter()`; see the README for the batch contract.

    `device="gpu"` needs `device_id` (the local rank's GPU); "cpu" runs the same graph on the CPU.
    `final_patch` (Y, X) centre-crops, `z_reduction` reduces Z to one slice: "max" (projection),
    "center" (centre slice), "channelwise" (per channel label, as the reference's
    BatchedChannelWiseZReductiond: centre slice for label-free channels such as phase, brightfield,
    retardance or DIC, max for the others; per sample in bag-of-channels mode) or an explicit
    {label: "max" | "center"} for every channel label.
    With `normalize=False` the statistics travel with the batch as (B, C, 2) arrays
    (`norm_meta="arrays"`) or as the reference's per-sample dicts (`"reference"`). `meta` chooses
    columns ({name: array}) or the reference's per-sample dicts. `prefetch` is DALI's queue depth,
    `read_ahead` the plans whose reads are kept in flight.
    `budget_bytes` bounds the bytes in flight, DALI's queue included: `queue_bytes` counts the
    source arrays the feed keeps alive for DALI (it uses them in place, `no_copy`: the last
    `prefetch + 2` steps' patches, storage dtype) plus `prefetch` steps of float32 outputs (upper
    bounds from the largest read box); the read-ahead issues plans only while they fit in what is
    left (`feed.budget_bytes = budget_bytes -
    queue_bytes`). A budget below `queue_bytes` plus one plan's reads is a ValueError naming the
    minimum. Not counted: per-sample statistics, ids and augmentation parameters (bytes per
    sample), DALI's operator scratch space, and with `workers` the workers' shared-memory slots.
    Other keyword options go to the PatchReader (`strict`, `on_read_error="raise" | "skip"`,
    `max_skip_fraction`, `max_patch_bytes`, `max_chunk_bytes`, `remote` limits, cache and concurrency);
    with "skip", `loader.reader.stats.skipped` counts replaced samples (in this process: with `workers`, each
    worker counts its own).

    `cache_bytes` > 0 reads each chunk once and keeps it decoded in a ChunkCache on the pipeline's
    device (GPU `device_id`'s memory with cupy for "gpu", host memory for "cpu"); every patch is
    cropped from the cached chunks and, on a GPU, assembled and fed to DALI on a stream of the
    cache's own. `cache_bytes` is the whole budget there: `queue_bytes` first, the chunks get the
    rest (`memory()` reports both). A `ChunkStore` instead of a number shares one cache and one
    budget between loaders of one device (each reserves its queue; `close()` gives it back).
    Batches equal the uncached loader's; `loader.reader.cache.stats` reports hits and evictions
    and `loader.reader.stats` the chunks actually decoded. 0 (the default) reads every patch
    through tensorstore; the cache needs `workers=0`.
    """

    def __init__(
        self,
        index: LineageIndex,
        sampler: TripletSampler,
        *,
        device: Literal["cpu", "gpu"] = "gpu",
        device_id: int | None = None,
        final_patch: tuple[int, int] | None = None,
        z_reduction: Literal["max", "center", "channelwise"] | Mapping[str, str] | None = None,
        normalize: bool = True,
        norm_meta: Literal["arrays", "reference"] = "arrays",
        meta: Literal["columns", "dicts"] = "columns",
        prefetch: int = 2,
        read_ahead: int = 2,
        budget_bytes: int | None = None,
        num_threads: int = 2,
        workers: int = 0,
        cache_bytes: int | ChunkStore = 0,
        **reader_options: Any,
    ) -> None:
        if sampler.index is not index:
            raise ValueError("the sampler was built on another index: pass the same LineageIndex to both")
        if norm_meta not in ("arrays", "reference"):
            raise ValueError(f"norm_meta must be 'arrays' or 'reference', got {norm_meta!r}")
        if meta not in ("columns", "dicts"):
            raise ValueError(f"meta must be 'columns' or 'dicts', got {meta!r}")
        require_dali()
        if device == "gpu" and device_id is None:
            raise ValueError("device='gpu' needs a device_id (the local rank's GPU; 0 on one GPU)")
        if device == "cpu" and device_id is not None:
            raise ValueError("device='cpu' runs without a GPU: leave device_id=None")
        if cache_bytes and workers:
            raise ValueError("cache_bytes needs workers=0: the chunk cache lives in this process "
                             "(spawned workers would each read and hold their own)")
        self.index = index
        self.sampler = sampler
        self.device_id = device_id
        self.norm_meta = norm_meta
        self.meta = meta
        self.prefetch = prefetch
        self.num_threads = num_threads
        channelwise = z_reduction == "channelwise" or isinstance(z_reduction, Mapping)
        per_channel = channelwise and index.config.channel_mode != "bag"
        crop = read_crop(index, sampler.augment, final_patch)
        self.spec = GraphSpec(
            fit=not sampler.predict, device=device, storage_dtype=index.batch_dtype,
            read_shape=index.read_shape if crop is None else (index.read_shape[0], *crop),
            final_patch=None if final_patch is None or crop is not None else tuple(final_patch),
            z_reduction="channelwise" if channelwise else z_reduction,
            channel_modes=channel_modes(index, z_reduction) if per_channel else None,
            normalize=normalize, augment=sampler.augment, resample=index.resampled,
            pixel_source=device if cache_bytes else None,
        )
        reader_options = dict(reader_options, crop_yx=crop)
        if isinstance(cache_bytes, ChunkStore):
            if (cache_bytes.device, cache_bytes.device_id) != (device, device_id):
                raise ValueError(f"the chunk store lives on {cache_bytes.device} {cache_bytes.device_id}, this loader "
                                 f"on {device} {device_id}: share a store only between loaders of one device")
            store = cache_bytes
        else:
            store = ChunkStore(cache_bytes, device, device_id) if cache_bytes else None
        self.store = store
        self.reader = (CachedPatchReader(index, store=store, **reader_options) if store is not None
                       else PatchReader(index, **reader_options))
        self.plan_for = sampler.plan if crop is None else CentreCrops(sampler.plan, index.read_shape[1:], crop)
        self.workers = workers
        self.params = used_params(sampler.augment)
        self.center = CenterSlices.build(index, z_reduction) if channelwise and not per_channel else None
        read, output = self._step_bytes()
        self.queue_bytes = (prefetch + 2) * read + prefetch * output  # arrays the feed keeps + DALI's outputs
        if store is not None:  # one budget on the cache's device: the chunks get what the queues leave
            store.reserve(self, self.queue_bytes)
        self.feed = PlanFeed(self.reader, self.plan_for, self.params, depth=read_ahead, keep=prefetch + 2,
                             center=self.center,
                             budget_bytes=None if budget_bytes is None else self._read_ahead_budget(budget_bytes, read, output))
        self._epoch = sampler.epoch
        self._step = sampler.step
        self._iterator = None
        self._running = False  # DALI is inside an epoch (not yet past its StopIteration)
        self._next_position: tuple[int, int] | None = None  # what a parallel source serves after reset()
        # noise fields come from DALI's generator: a resume restores it from a pipeline checkpoint
        self._checkpointing = self.spec.augment is not None and self.spec.augment.noise.prob > 0
        self._origin = (self._epoch, self._step)  # (epoch, step) of DALI iteration 0 of the source
        self._restore: dict[str, Any] | None = None

    def _step_bytes(self) -> tuple[int, int]:
        """Upper bounds of one step's patches: (reads in the storage dtype, float32 outputs)."""
        samples = (2 if self.spec.fit else 1) * self.sampler.batch_size * self.index.n_channels
        box = self.reader.largest_box
        return samples * box * self.reader.dtype.itemsize, samples * int(np.prod(self.spec.output_shape)) * 4

    def _read_ahead_budget(self, budget_bytes: int, read: int, output: int) -> int:
        """What `budget_bytes` leaves to the read-ahead once DALI's queue is counted (`_step_bytes`: read, output)."""
        minimum = self.queue_bytes + read
        if budget_bytes < minimum:
            raise ValueError(
                f"budget_bytes={budget_bytes:,} cannot hold DALI's queue and one step's reads: the minimum is "
                f"{minimum:,} bytes = {self.prefetch + 2} x {read:,} B of patches kept for DALI (prefetch + 2, "
                f"{self.reader.dtype}) + {self.prefetch} x {output:,} B of float32 outputs (prefetch) + {read:,} B "
                f"for the step being read (batch {self.sampler.batch_size}); raise budget_bytes or lower prefetch "
                "or the batch size"
            )
        return budget_bytes - self.queue_bytes

    def close(self) -> None:
        """Give this loader's share of its chunk store back and drop its DALI pipeline."""
        if self.store is not None:
            self.store.release(self)
        self._iterator, self._running = None, False

    def memory(self) -> dict[str, Any]:
        """Bytes the loader holds for patches on the cache's device, under `cache_bytes` (0 without a cache).

        `queue`: assembled patches the feed keeps for DALI plus DALI's float32 outputs (upper bounds);
        `other_queues`: those of other loaders sharing the store; `cache_budget` / `cache_used` /
        `cache_peak`: the chunk cache; `staging_host`: pinned host buffers of a GPU cache.
        """
        store = self.store
        if store is None:
            return {"budget": 0, "queue": self.queue_bytes}
        return {"device": store.device, "budget": store.budget_bytes, "queue": self.queue_bytes,
                "other_queues": sum(store.reserved.values()) - self.queue_bytes,
                "cache_budget": store.cache.budget_bytes, "cache_used": store.cache.nbytes,
                "cache_peak": store.cache.stats.peak_bytes, "staging_host": store.arrays.stats().get("pinned_bytes", 0)}

    # ------------------------------------------------------------------ epochs and state
    @property
    def checkpointing(self) -> bool:
        """Whether the state carries DALI's checkpoint (noise fields drawn by DALI's generator)."""
        return self._checkpointing

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        """Steps of the current epoch the user has received."""
        return self._step

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at step 0; a no-op for the epoch already loaded (its position is kept)."""
        if epoch != self._epoch:
            self._epoch, self._step, self._restore = int(epoch), 0, None

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state at the steps the user has received (plus DALI's, for noise fields)."""
        state = self.sampler.state_dict(steps_consumed=self._step, epoch=self._epoch)
        if self._checkpointing and self._iterator is not None:
            checkpoint = self._iterator.checkpoints()[0]
            state["dali"] = dict(checkpoint=base64.b64encode(checkpoint).decode(), origin=list(self._origin),
                                 rank=self.sampler.rank, world_size=self.sampler.world_size)
        elif self._restore is not None:
            state["dali"] = self._restore
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields exactly the batches not yet received."""
        self.sampler.load_state_dict(state)
        self._epoch, self._step = self.sampler.epoch, self.sampler.step
        same_position = (self._epoch, self._step) == (int(state["epoch"]), int(state["step"]))
        restore = state.get("dali") if self._checkpointing and same_position else None
        mine = (self.sampler.rank, self.sampler.world_size)
        if restore is not None and (restore.get("rank"), restore.get("world_size")) != mine:
            warnings.warn(
                f"the state holds the DALI noise stream of rank {restore.get('rank')} of {restore.get('world_size')}, "
                f"this loader is rank {mine[0]} of {mine[1]}: its noise fields restart from (seed, rank) "
                "(save each rank's state, e.g. dali_pipeline.distributed.loader_state)", stacklevel=2)
            restore = None
        self._restore = restore
        self._iterator, self._running = None, False

    # ------------------------------------------------------------------ iteration
    def _dali_iterator(self, source, checkpoint: bytes | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe = build_pipeline(
            source, source_names(self.spec.fit, self.params, self.center is not None), self.spec,
            batch_size=self.sampler.batch_size, device_id=self.device_id, num_threads=self.num_threads,
            prefetch=self.prefetch, workers=self.workers,
            # only spawned workers need it (shared-memory size); it costs a plan, so skip it otherwise
            batch_bytes=self.reader.plan_bytes(self.plan_for(0, self._epoch)) if self.workers else 0,
            seed=(self.sampler.seed * 1_000_003 + self.sampler.rank) % (1 << 31),  # noise fields per (seed, rank)
            checkpointing=self._checkpointing, checkpoint=checkpoint,
            no_copy=source is self.feed,  # the feed keeps its last outputs alive for DALI's queue
            cuda_stream=getattr(self.reader, "stream_ptr", None),
        )
        return DALIGenericIterator(pipe, output_names(self.spec), auto_reset=False)

    def _begin_epoch(self) -> None:
        if self._restore is not None:  # a resume: DALI continues from its checkpoint, source included
            self._resume_from_checkpoint()
            if self._step < len(self):
                return
        if self._step >= len(self):  # the loaded epoch is complete: go on with the next one
            self._epoch, self._step = self._epoch + 1, 0
        if self.workers:
            self._begin_parallel_epoch()
            return
        if self._iterator is None:
            self._position(self._epoch, self._step)
            self._iterator = self._dali_iterator(self.feed)  # DALI schedules its first runs at the first next()
            return
        if self._running:  # an epoch was abandoned: end it at the source and drop what DALI prefetched
            self.feed.stop()
            self._drain()
        self._position(self._epoch, self._step)
        self._iterator.reset()  # schedules the first runs of the new position at once

    def _position(self, epoch: int, step: int) -> None:
        self.feed.position(epoch, step, len(self))
        self._origin = (epoch, step)

    def _drain(self) -> None:
        try:
            while True:
                next(self._iterator)
        except StopIteration:
            self._running = False

    def _resume_from_checkpoint(self) -> None:
        restore, self._restore = self._restore, None
        epoch, step = restore["origin"]
        checkpoint = base64.b64decode(restore["checkpoint"])
        if self.workers:
            source = StatelessPlanSource(self.reader, self.plan_for, self.params, epoch, step, len(self),
                                         self.center)
            self._next_position = (self._epoch + 1, 0)
        else:
            self.feed.position(epoch, step, len(self))
            source = self.feed
        self._origin = (epoch, step)
        self._iterator = self._dali_iterator(source, checkpoint)
        self._running = True
        if self._step >= len(self):  # saved at the end of an epoch: let DALI see the end before the next
            self._drain()

    def _begin_parallel_epoch(self) -> None:
        """Workers serve epochs in sequence from their start: reuse them only for the next epoch."""
        if self._iterator is not None and not self._running and self._next_position == (self._epoch, self._step):
            self._iterator.reset()
        else:
            self._iterator = None  # releases the old pipeline and its workers
            source = StatelessPlanSource(self.reader, self.plan_for, self.params, self._epoch, self._step,
                                         len(self), self.center)
            self._origin = (self._epoch, self._step)
            self._iterator = self._dali_iterator(source)
        self._next_position = (self._epoch + 1, 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._begin_epoch()
        self._running = True
        while True:
            try:
                outputs = next(self._iterator)[0]
            except StopIteration:
                self._running = False
                return
            batch = self._batch(outputs)
            self._step += 1
            yield batch

    def _batch(self, outputs: dict[str, Any]) -> dict[str, Any]:
        ids = outputs["ids"].numpy() if outputs["ids"].device.type == "cpu" else outputs["ids"].cpu().numpy()
        anchors = ids[:, 0]
        batch: dict[str, Any] = {"anchor": outputs["anchor"]}
        if not self.spec.fit:
            batch["index"] = row_meta(self.index, anchors, INDEX_COLUMNS, self.meta)
        else:
            positives = ids[:, 1]
            batch["positive"] = outputs["positive"]
            batch["anchor_meta"] = row_meta(self.index, anchors, META_COLUMNS, self.meta)
            batch["positive_meta"] = row_meta(self.index, positives, META_COLUMNS, self.meta)
            if self.sampler.label_classes:
                batch["labels"] = self.sampler.labels(anchors)
        if not self.spec.normalize:
            for role in ("anchor", "positive") if self.spec.fit else ("anchor",):
                norm = outputs[f"{role}_norm"]
                if self.norm_meta == "arrays":
                    batch[f"{role}_norm"] = norm
                else:
                    batch[f"{role}_norm_meta"] = reference_norm_meta(self.index, norm)
        return batch
