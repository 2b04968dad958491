"""PlanFeed: DALI's batch external source, keyed by the loader's own (epoch, step), with read-ahead.

DALI calls the source ahead of the consumer (its prefetch queue) and resets its iteration count
per epoch; the loader positions the feed at (epoch, first step) before each epoch, so step =
first step + BatchInfo.iteration whatever DALI prefetched before. While step s is assembled, the
reads of steps s+1..s+depth are already in flight in tensorstore, within a byte budget.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from dali_pipeline.augment_graph import param_arrays
from dali_pipeline.reader import Patches, PatchReader, PendingRead
from dali_pipeline.z_reduction import CenterSlices
from sampler import BatchPlan


class PlanFeed:
    """Callable external source: BatchInfo -> the arrays of one plan (`plan_outputs`).

    `plan_for(step, epoch)` gives the plans (a TripletSampler's `plan`). The outputs of the last
    `keep` calls stay referenced, so DALI may use them without copying (`no_copy=True`) while
    they sit in its prefetch queue: keep at least DALI's prefetch depth + 1.
    """

    def __init__(
        self,
        reader: PatchReader,
        plan_for: Callable[[int, int], BatchPlan],
        params: tuple[str, ...] = (),
        depth: int = 2,
        budget_bytes: int | None = None,
        keep: int = 4,
        center: CenterSlices | None = None,
    ) -> None:
        self.reader = reader
        self.center = center
        self.plan_for = plan_for
        self.params = params
        self.depth = depth
        self.budget_bytes = budget_bytes
        self.epoch = 0
        self.first_step = 0
        self.n_steps = 0
        self.stopped = False
        self._pending: dict[int, PendingRead] = {}
        self._kept: deque[tuple] = deque(maxlen=keep)

    def position(self, epoch: int, first_step: int, n_steps: int) -> None:
        """Serve `epoch` from `first_step` to `n_steps` (exclusive) on the next DALI epoch."""
        self._pending.clear()
        self.epoch, self.first_step, self.n_steps, self.stopped = epoch, first_step, n_steps, False

    def stop(self) -> None:
        """End the current DALI epoch at the next call (to drain an abandoned epoch)."""
        self.stopped = True
        self._pending.clear()

    def _issue(self, step: int, ahead: bool) -> None:
        if step in self._pending or step >= self.n_steps:
            return
        if ahead and self.budget_bytes is not None and self._pending:
            sizes = [p.nbytes for p in self._pending.values()]
            if sum(sizes) + max(sizes) > self.budget_bytes:  # steps are the same size but the last
                return
        self._pending[step] = self.reader.submit(self.plan_for(step, self.epoch))

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        step = self.first_step + info.iteration
        if self.stopped or step >= self.n_steps:
            self._pending.clear()
            raise StopIteration
        self._issue(step, ahead=False)
        for later in range(step + 1, step + 1 + self.depth):
            self._issue(later, ahead=True)
        outputs = plan_outputs(self._pending.pop(step).result(), self.params, self.center)
        self._kept.append(outputs)
        return outputs


class StatelessPlanSource:
    """A picklable batch source for DALI's parallel external source (`py_start_method="spawn"`).

    Its output depends only on BatchInfo: DALI epoch k is the loader's epoch `start_epoch + k`,
    starting at `start_step` in the first one and at 0 after. Each worker process opens its own
    stores lazily (the reader pickles without them); DALI's prefetch queue keeps batches in flight
    across workers, so reading overlaps training without in-process read-ahead.
    """

    def __init__(self, reader: PatchReader, plan_for: Callable[[int, int], BatchPlan], params: tuple[str, ...],
                 start_epoch: int, start_step: int, n_steps: int, center: CenterSlices | None = None) -> None:
        self.reader = reader
        self.center = center
        self.plan_for = plan_for
        self.params = params
        self.start_epoch, self.start_step, self.n_steps = start_epoch, start_step, n_steps

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        step = (self.start_step if info.epoch_idx == 0 else 0) + info.iteration
        if step >= self.n_steps:
            raise StopIteration
        plan = self.plan_for(step, self.start_epoch + info.epoch_idx)
        return plan_outputs(self.reader.read(plan), self.params, self.center)


class SplitSource:
    """A batch source's outputs as two DALI sources: the patches (which may live on the GPU) and the rest.

    A DALI external source has one device for all its outputs, while normalization terms, ids and
    augmentation parameters must stay CPU nodes; patches assembled in GPU memory (the chunk cache)
    feed a `device="gpu"` source. Whichever half DALI asks for first computes the step and keeps the
    other half for the second call.
    """

    def __init__(self, source: Callable, names: list[str]) -> None:
        self.source = source
        self.names = names
        self.pixel_names = [n for n in names if n in PIXELS]
        self.term_names = [n for n in names if n not in PIXELS]
        self._held: dict[tuple[int, int, str], tuple] = {}

    def pixels(self, info) -> tuple:
        return self._half(info, "pixels")

    def terms(self, info) -> tuple:
        return self._half(info, "terms")

    def _half(self, info, which: str) -> tuple:
        held = self._held.pop((info.epoch_idx, info.iteration, which), None)
        if held is not None:
            return held
        try:
            outputs = dict(zip(self.names, self.source(info)))
        except StopIteration:
            self._held.clear()
            raise
        halves = {"pixels": tuple(outputs[n] for n in self.pixel_names),
                  "terms": tuple(outputs[n] for n in self.term_names)}
        other = "terms" if which == "pixels" else "pixels"
        self._held[(info.epoch_idx, info.iteration, other)] = halves[other]
        return halves[which]


#: the outputs of a plan source that carry patches
PIXELS = ("anchor", "positive")


def source_names(fit: bool, params: tuple[str, ...], center: bool = False) -> list[str]:
    """Names of a plan source's outputs (augmentation parameters `params`; with `center`, the
    per-sample channelwise Z reduction pick of bag-of-channels mode), in `plan_outputs` order."""
    names = []
    for role in ("anchor", "positive") if fit else ("anchor",):
        names += [role, f"{role}_sub", f"{role}_div", *(f"{role}_{key}" for key in params)]
        names += [f"{role}_zcenter"] if center else []
    return names + ["ids"]


def plan_outputs(patches: Patches, params: tuple[str, ...], center: CenterSlices | None = None) -> tuple[np.ndarray, ...]:
    """The source outputs of one read plan, in the order of `source_names(fit, params, center)`."""
    plan = patches.plan
    out = []
    roles = [("anchor", patches.anchor, plan.anchor_rows, plan.anchor_norm, plan.anchor_aug)]
    if plan.fit:
        roles.append(("positive", patches.positive, plan.positive_rows, plan.positive_norm, plan.positive_aug))
    for _, pixels, rows, norm, aug in roles:
        out += [pixels, *_norm_terms(norm)]
        if params:
            out += param_arrays(aug, params)
        if center is not None:
            out.append(center(rows))
    return (*out, plan.ids)


def _norm_terms(norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, C, 1, 1, 1) subtrahend and divisor, shaped to broadcast over (C, Z, Y, X) samples."""
    shape = (norm.shape[0], norm.shape[1], 1, 1, 1)
    return (np.ascontiguousarray(norm[:, :, 0]).reshape(shape), np.ascontiguousarray(norm[:, :, 1]).reshape(shape))
