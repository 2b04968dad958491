"""MultiExperimentTripletDataset: the plain PyTorch path (CPU reference for the DALI loader).

It consumes the same BatchPlans as the DALI pipeline, so for one plan both paths return the same
pixels. Batches come whole from `__getitems__` (a DataLoader passes a plan through its
batch_sampler and `identity_collate`); data-level parameters come from the index only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dali_pipeline.meta import INDEX_COLUMNS, META_COLUMNS, reference_norm_meta, row_meta
from dali_pipeline.reader import PatchReader
from sampler import BatchPlan, LineageIndex, make_plan

def identity_collate(batch: Any) -> Any:
    """The batch as `__getitems__` built it (module level, so spawned workers can pickle it)."""
    return batch


class MultiExperimentTripletDataset(Dataset):
    """Anchor/positive patches of BatchPlans as CPU tensors in the stores' (promoted) dtype.

    Where experiments have different pixel sizes, every patch is resampled to `index.read_shape`
    (trilinear) and the tensors are float32.

    `__getitems__` takes a BatchPlan, or a list of anchor rows for which it builds a plan with its
    own generator (seeded by `seed`, advanced per call). `fit=False` gives predict batches over
    every observation. Reader options (cache, concurrency, strict, on_read_error, max_skip_fraction,
    max_patch_bytes, max_chunk_bytes) go to the PatchReader.
    """

    def __init__(self, index: LineageIndex, fit: bool = True, *, seed: int = 0, **reader_options: Any) -> None:
        self.index = index
        self.fit = fit
        self.reader = PatchReader(index, **reader_options)
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.index.valid) if self.fit else len(self.index)

    def __getitem__(self, i: int) -> Any:
        raise TypeError(
            "MultiExperimentTripletDataset reads whole batches: use __getitems__ (a DataLoader with a "
            "batch_sampler that yields plans and collate_fn=identity_collate does this)"
        )

    def plan(self, rows: Any) -> BatchPlan:
        """A plan for a list of anchor rows, drawn with the dataset's own generator."""
        return make_plan(self.index, np.asarray(rows, dtype=np.int64), self._rng, predict=not self.fit)

    def _tensor(self, part: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """A (B, C, Z, Y, X) tensor; boxes read at another pixel size are resampled (trilinear, float32)."""
        if not self.index.resampled:
            return torch.from_numpy(part)
        size = self.index.read_shape
        return torch.stack([
            torch.nn.functional.interpolate(torch.from_numpy(np.asarray(s, np.float32))[None], size=size,
                                            mode="trilinear", align_corners=False)[0]
            for s in part
        ])

    def __getitems__(self, batch: BatchPlan | list[int]) -> dict[str, Any]:
        plan = batch if isinstance(batch, BatchPlan) else self.plan(batch)
        if plan.fit != self.fit:
            raise ValueError(f"a {'training' if plan.fit else 'predict'} plan given to a dataset with fit={self.fit}")
        patches = self.reader.read(plan)
        plan = patches.plan  # with on_read_error="skip", failed samples were replaced by good ones
        out: dict[str, Any] = {
            "anchor": self._tensor(patches.anchor),
            "anchor_norm_meta": reference_norm_meta(self.index, plan.anchor_norm),
        }
        if not plan.fit:
            out["index"] = row_meta(self.index, plan.anchor_rows, INDEX_COLUMNS, "dicts")
            return out
        out["anchor_meta"] = row_meta(self.index, plan.anchor_rows, META_COLUMNS, "dicts")
        out["positive"] = self._tensor(patches.positive)
        out["positive_norm_meta"] = reference_norm_meta(self.index, plan.positive_norm)
        out["positive_meta"] = row_meta(self.index, plan.positive_rows, META_COLUMNS, "dicts")
        return out
