"""PlanFeed: DALI's batch external source, keyed by the loader's own (epoch, step), with read-ahead.

DALI calls the source ahead of the consumer (its prefetch queue) and resets its iteration count
per epoch; the loader positions the feed at (epoch, first step) before each epoch, so step =
first step + BatchInfo.iteration whatever DALI prefetched before. While step s is assembled, the
reads of steps s+1..s+depth are already in flight in tensorstore, within a byte budget.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dali_pipeline.reader import PatchReader, PendingRead
from sampler import BatchPlan


class PlanFeed:
    """Callable external source: BatchInfo -> the arrays of one plan (see `outputs`)."""

    def __init__(
        self,
        reader: PatchReader,
        plan_for: Callable[[int, int], BatchPlan],
        fit: bool,
        depth: int = 2,
        budget_bytes: int | None = None,
    ) -> None:
        self.reader = reader
        self.plan_for = plan_for
        self.fit = fit
        self.depth = depth
        self.budget_bytes = budget_bytes
        self.epoch = 0
        self.first_step = 0
        self.n_steps = 0
        self.stopped = False
        self._pending: dict[int, PendingRead] = {}

    @property
    def names(self) -> list[str]:
        """Output names, in the order `__call__` returns them."""
        keys = ["anchor", "anchor_sub", "anchor_div", "ids"]
        return keys + ["positive", "positive_sub", "positive_div"] if self.fit else keys

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
        self._pending[step] = self.reader.submit(self.plan_for(self.epoch, step))

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        step = self.first_step + info.iteration
        if self.stopped or step >= self.n_steps:
            self._pending.clear()
            raise StopIteration
        self._issue(step, ahead=False)
        for later in range(step + 1, step + 1 + self.depth):
            self._issue(later, ahead=True)
        patches = self._pending.pop(step).result()
        plan = patches.plan
        out = [patches.anchor, *_norm_terms(plan.anchor_norm), plan.ids]
        if self.fit:
            out += [patches.positive, *_norm_terms(plan.positive_norm)]
        return tuple(out)


def _norm_terms(norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, C, 1, 1, 1) subtrahend and divisor, shaped to broadcast over (C, Z, Y, X) samples."""
    shape = (norm.shape[0], norm.shape[1], 1, 1, 1)
    return (np.ascontiguousarray(norm[:, :, 0]).reshape(shape), np.ascontiguousarray(norm[:, :, 1]).reshape(shape))
