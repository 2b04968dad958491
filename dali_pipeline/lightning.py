"""Lightning: `TripletDataModule`, the DALI loaders as Lightning expects them (optional extra).

    pip install 'dynaclr-dali[lightning]'

    dm = TripletDataModule("collection.yml", batch_size=64, index_path="index.npz", split="fov",
                           split_ratio=0.8, seed=0, final_patch=(160, 160), z_reduction="max")
    trainer = Trainer(strategy="ddp", devices=4, use_distributed_sampler=False)  # the flag is optional
    trainer.fit(model, datamodule=dm)
    trainer.predict(model, datamodule=dm, callbacks=[EmbeddingWriter("emb.parquet")], return_predictions=False)

Ranks and devices come from the trainer (`global_rank`, `world_size`, the strategy's root device:
the pipeline runs on that GPU, `device_id` = its index, and batches arrive already there). The
loaders are not torch DataLoaders, so Lightning injects no distributed sampler; each exposes
`.sampler`, where Lightning calls `set_epoch`:

* train: `set_epoch(e)` starts epoch e at step 0, and is a no-op for the epoch already loaded (so a
  restored mid-epoch position survives Lightning's call, which may come after the loader's
  iterator was created for that epoch);
* validation and predict: ignored. Every validation pass yields the same batches (epoch 0 of a
  sampler with `drop_last=False`, positives keyed by (seed, 0, step, rank)), unaugmented; every
  predict pass covers every observation of the index once over all ranks.

Resume: the train loader has `state_dict`/`load_state_dict`, and Lightning's fit loop saves and
restores it with the checkpoint (the one restore path; the DataModule keeps no second copy). A
run resumed from a mid-epoch checkpoint yields exactly the batches it had not seen. Known
Lightning limitation (Lightning issue #20550): the loader state is not restored when
`configure_optimizers` reads `trainer.estimated_stepping_batches` (that builds the train loader
before the checkpoint is loaded); compute the schedule length from `len(dm.train_dataloader())`
or the sampler instead.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

try:
    import lightning.pytorch as pl
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("dali_pipeline.lightning needs Lightning: pip install 'dynaclr-dali[lightning]'") from err

from dali_pipeline.distributed import (
    Split,
    load_index,
    load_loader_state,
    loader_state,
    resolve_device,
    split_anchors,
    topology,
)
from sampler import ExperimentRegistry, IndexConfig, LineageIndex, TripletSampler

Role = Literal["train", "val", "predict"]

#: sampler options that shape training steps only; validation keeps plain, unaugmented epochs
_TRAIN_ONLY = ("group_by", "group_weights", "leaky", "stratify_by", "temporal_enrichment", "temporal_window_hours",
               "temporal_global_fraction", "augment", "locality_frames", "fov_shards", "reshard_every")


class EpochSampler:
    """The `.sampler` Lightning sees: `set_epoch` moves the loader (train) or is ignored (val, predict).

    Every other attribute is the TripletSampler's (batch_size, rank, world_size, plan, ...).
    """

    def __init__(self, loader: Any, follows_epochs: bool) -> None:
        self._loader = loader
        self.follows_epochs = follows_epochs

    def set_epoch(self, epoch: int) -> None:
        if self.follows_epochs:
            self._loader.set_epoch(int(epoch))

    def __len__(self) -> int:
        return len(self._loader.sampler)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_loader", "follows_epochs"):
            raise AttributeError(name)
        return getattr(self._loader.sampler, name)

    def __repr__(self) -> str:
        return f"EpochSampler({'follows set_epoch' if self.follows_epochs else 'fixed epoch'}, {self._loader.sampler!r})"


class LightningLoader:
    """A TripletLoader as a Lightning dataloader: len, iter, `.sampler`, `state_dict`/`load_state_dict`.

    role "train": epochs follow `set_epoch` (or advance after a completed epoch), and the state is
    the position of the batches the training loop received. "val" and "predict": every `iter()`
    is one whole pass from step 0 of epoch `fixed_epoch`, unless `load_state_dict` set a position
    inside the pass (then that pass resumes there).
    """

    def __init__(self, loader: Any, role: Role, fixed_epoch: int = 0) -> None:
        if role not in ("train", "val", "predict"):
            raise ValueError(f"role must be 'train', 'val' or 'predict', got {role!r}")
        self.loader = loader
        self.role = role
        self.fixed_epoch = int(fixed_epoch)
        self.sampler = EpochSampler(loader, follows_epochs=role == "train")
        self.batch_sampler = None  # Lightning looks for one; the sampler plans whole batches
        self._resume: dict[str, Any] | None = None

    @property
    def device(self) -> torch.device:
        """Where the batch tensors are."""
        return torch.device("cpu") if self.loader.spec.device == "cpu" else torch.device("cuda", self.loader.device_id)

    @property
    def index(self) -> LineageIndex:
        return self.loader.index

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.role == "train":
            return iter(self.loader)
        return self._one_pass()

    def _one_pass(self) -> Iterator[dict[str, Any]]:
        # positioned at the first next(), like the loader itself: Lightning creates iterators early
        state, self._resume = self._resume, None
        loader = self.loader
        if state is None and not getattr(loader, "_checkpointing", False):
            # back to step 0 of the fixed epoch, keeping the pipeline (an abandoned pass is drained)
            if loader.epoch == self.fixed_epoch:
                loader.set_epoch(self.fixed_epoch + 1)
            loader.set_epoch(self.fixed_epoch)
        else:  # noise fields: a fresh DALI generator, so every pass draws the same fields
            sampler: TripletSampler = loader.sampler
            loader.load_state_dict(state or sampler.state_dict(steps_consumed=0, epoch=self.fixed_epoch))
        yield from loader

    def state_dict(self) -> dict[str, Any]:
        """The position of the batches received; with noise fields under DDP, every rank's DALI stream.

        That case is a collective (see `distributed.loader_state`): Lightning calls it on every rank
        when it saves a checkpoint.
        """
        return loader_state(self.loader)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.role == "train":
            load_loader_state(self.loader, state)
        else:
            if int(state["epoch"]) != self.fixed_epoch:
                raise ValueError(f"a {self.role} loader always runs epoch {self.fixed_epoch}, the state is of "
                                 f"epoch {state['epoch']}")
            self._resume = dict(state)

    def __repr__(self) -> str:
        return f"LightningLoader({self.role}, {len(self)} steps, device={self.device}, {self.loader.sampler!r})"


class TripletDataModule(pl.LightningDataModule):
    """Train, validation and predict loaders over one lineage index, sharded over the trainer's ranks.

    Args:
        collection: a collection YAML, a saved index (.npz), an ExperimentRegistry or a LineageIndex.
        batch_size: anchors per step and rank.
        index_path: with a YAML or a registry, where `prepare_data` saves the built index (once per
            node, if the file is missing) and where every rank loads it from; without it each rank
            builds the index itself (a warning under DDP).
        index_config, registry_options: IndexConfig and ExperimentRegistry settings (z_window, ...)
            for building the index.
        split: "fov" or "experiment" (see `distributed.split_anchors`); split_ratio: train share
            (1.0: no validation); val_experiments: held-out experiments (split="experiment").
        seed: the sampler seed and the split seed.
        drop_last: for training (validation always keeps every anchor).
        val_batch_size, predict_batch_size: default batch_size.
        sampler_options: TripletSampler options for training (augment, group_by, stratify_by,
            leaky, temporal_enrichment, label_columns, locality_frames, fov_shards, reshard_every, ...);
            label_columns applies to validation too, the others to training only. `fov_shards=True`
            gives each rank its own FOVs for training (see docs/sharding.md): a per-rank `cache_bytes`
            of about 1.1x `train_dataloader().sampler.shards().chunk_bytes[rank]` then holds the rank's
            working set; validation and predict are not sharded.
        val_augment: an AugmentConfig for validation (default None: unaugmented; its draws are
            keyed by (seed, 0, step, rank), so validation stays the same every epoch).
        device: "auto" (the trainer's device), "cpu" or "gpu".
        loader_options: TripletLoader options for every loader (final_patch, z_reduction,
            normalize, norm_meta, meta, prefetch, read_ahead, budget_bytes, num_threads, workers,
            reader options). `cache_bytes` makes one chunk store of that budget which the train,
            validation and predict loaders share (each reserves its batches in flight from it).
    """

    def __init__(
        self,
        collection: str | os.PathLike[str] | ExperimentRegistry | LineageIndex,
        batch_size: int,
        *,
        index_path: str | os.PathLike[str] | None = None,
        index_config: IndexConfig | None = None,
        registry_options: Mapping[str, Any] | None = None,
        split: Literal["fov", "experiment"] = "fov",
        split_ratio: float = 0.8,
        val_experiments: Sequence[str] | None = None,
        seed: int = 0,
        drop_last: bool = True,
        val_batch_size: int | None = None,
        predict_batch_size: int | None = None,
        sampler_options: Mapping[str, Any] | None = None,
        val_augment: Any = None,
        device: Literal["auto", "cpu", "gpu"] = "auto",
        **loader_options: Any,
    ) -> None:
        super().__init__()
        if split not in ("fov", "experiment"):
            raise ValueError(f"split must be 'fov' or 'experiment', got {split!r}")
        if not 0.0 < split_ratio <= 1.0:
            raise ValueError(f"split_ratio must lie in (0, 1], got {split_ratio!r}")
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        self.collection = collection
        self.batch_size = int(batch_size)
        self.index_path = None if index_path is None else Path(index_path)
        self.index_config = index_config
        self.registry_options = dict(registry_options or {})
        self.split = split
        self.split_ratio = float(split_ratio)
        self.val_experiments = None if val_experiments is None else list(val_experiments)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.predict_batch_size = int(predict_batch_size or batch_size)
        self.sampler_options = dict(sampler_options or {})
        self.val_augment = val_augment
        self.device = device
        self.loader_options = loader_options
        self._index: LineageIndex | None = None
        self._split: Split | None = None
        self._loaders: dict[Role, LightningLoader | None] = {}
        self._chunks = None  # the ChunkStore shared by the loaders (loader option cache_bytes)
        self._batch_device: torch.device | None = None
        # predict over few rows and many ranks may leave a rank without a step (the writer copes)
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (strategy="ddp_spawn"): without the loaders (DALI pipelines), rebuilt by setup."""
        state = dict(self.__dict__)
        state["_loaders"] = {}
        state["_chunks"] = None
        state["_batch_device"] = None
        return state

    # ------------------------------------------------------------------ the index
    def _source_kind(self) -> str:
        c = self.collection
        if isinstance(c, LineageIndex):
            return "index"
        if isinstance(c, ExperimentRegistry):
            return "registry"
        return "saved" if Path(c).suffix == ".npz" else "yaml"

    def _build(self) -> LineageIndex:
        registry = (self.collection if isinstance(self.collection, ExperimentRegistry)
                    else ExperimentRegistry.from_yaml(self.collection, **self.registry_options))
        return LineageIndex.build(registry, self.index_config, progress=False)

    def prepare_data(self) -> None:
        """Build and save the index once per node when `index_path` is given and missing."""
        if self._source_kind() in ("yaml", "registry") and self.index_path is not None and not self.index_path.exists():
            self.index_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._build().save(self.index_path)
            except FileExistsError:  # another node's rank 0 saved it first (shared file system)
                pass

    @property
    def index(self) -> LineageIndex:
        """The full index (every rank loads the same file)."""
        if self._index is None:
            kind = self._source_kind()
            if kind == "index":
                index = self.collection
            elif kind == "saved":
                index = load_index(self.collection)
            elif self.index_path is not None:
                if not self.index_path.exists():  # setup without prepare_data (e.g. the DataModule used alone)
                    self.prepare_data()
                index = load_index(self.index_path)
            else:
                if self._topology()[1] > 1:
                    warnings.warn("every rank builds the lineage index itself: pass index_path so that one process "
                                  "builds it and every rank loads the saved file", stacklevel=2)
                index = self._build()
            if self.index_config is not None and kind in ("saved", "yaml", "registry") and index.config != self.index_config:
                raise ValueError(f"the saved index was built with {index.config}, not the index_config given "
                                 f"({self.index_config}); delete {self.index_path or self.collection} to rebuild it")
            self._index = index
        return self._index

    @property
    def splits(self) -> Split:
        """The train/validation split of the valid anchors (the same on every rank)."""
        if self._split is None:
            self._split = split_anchors(self.index, by=self.split, ratio=self.split_ratio, seed=self.seed,
                                        val_experiments=self.val_experiments)
        return self._split

    # ------------------------------------------------------------------ ranks and devices
    def _topology(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size, trainer.local_rank
        topo = topology()
        return topo.rank, topo.world_size, topo.local_rank

    def _device(self) -> tuple[str, int | None]:
        trainer = self.trainer
        if trainer is not None:
            root = trainer.strategy.root_device
            if self.device == "cpu" or (self.device == "auto" and root.type != "cuda"):
                return "cpu", None
            if root.type == "cuda":
                return "gpu", root.index if root.index is not None else torch.cuda.current_device()
            raise RuntimeError(f"device='gpu' but the trainer runs on {root}; use a GPU accelerator or device='cpu'")
        return resolve_device(self.device, self._topology()[2])

    def _make(self, role: Role, index: LineageIndex) -> LightningLoader:
        from dali_pipeline.loader import TripletLoader

        rank, world_size, _ = self._topology()
        kind, device_id = self._device()
        options = dict(self.sampler_options)
        if role == "train":
            sampler = TripletSampler(index, self.batch_size, seed=self.seed, rank=rank, world_size=world_size,
                                     drop_last=self.drop_last, **options)
        elif role == "val":
            options = {k: v for k, v in options.items() if k not in _TRAIN_ONLY}
            sampler = TripletSampler(index, self.val_batch_size, seed=self.seed, rank=rank, world_size=world_size,
                                     drop_last=False, augment=self.val_augment, **options)
        else:
            sampler = TripletSampler(index, self.predict_batch_size, seed=self.seed, rank=rank,
                                     world_size=world_size, predict=True)
        options = dict(self.loader_options)
        if options.get("cache_bytes"):  # one chunk store, one budget for every loader of this module
            store = self._chunks
            if store is None or (store.device, store.device_id) != (kind, device_id):
                from dali_pipeline.cached_reader import ChunkStore

                store = self._chunks = ChunkStore(options["cache_bytes"], kind, device_id)
            options["cache_bytes"] = store
        loader = TripletLoader(index, sampler, device=kind, device_id=device_id, **options)
        old = self._loaders.get(role)
        if old is not None:
            old.loader.close()
        wrapped = LightningLoader(loader, role)
        self._batch_device = wrapped.device
        return wrapped

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._loaders["train"] = self._make("train", self.splits.train)
            self._loaders["val"] = self._make("val", self.splits.val) if self.splits.val is not None else None
        elif stage == "validate":
            if self.splits.val is None:
                raise ValueError("no validation set: split_ratio=1.0 (or no held-out experiment) leaves every "
                                 "anchor to training")
            self._loaders["val"] = self._make("val", self.splits.val)
        elif stage == "predict":
            self._loaders["predict"] = self._make("predict", self.index)
        else:
            raise ValueError(f"TripletDataModule supports the stages fit, validate and predict, not {stage!r}")

    def teardown(self, stage: str) -> None:
        roles = {"fit": ("train", "val"), "validate": ("val",), "predict": ("predict",)}.get(stage, ())
        for role in roles:
            loader = self._loaders.pop(role, None)
            if loader is not None:
                loader.loader.close()

    def _get(self, role: Role) -> LightningLoader | None:
        if role not in self._loaders:
            self.setup({"train": "fit", "val": "validate", "predict": "predict"}[role])
        return self._loaders.get(role)

    def train_dataloader(self) -> LightningLoader:
        return self._get("train")

    def val_dataloader(self) -> LightningLoader | list:
        loader = self._get("val")
        return [] if loader is None else loader

    def predict_dataloader(self) -> LightningLoader:
        return self._get("predict")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Batches come from the pipeline already on the trainer's device: no second transfer."""
        if self._batch_device is not None and torch.device(device) == self._batch_device:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
