"""`dynaclr-dali demo`: a small contrastive encoder trained with NT-Xent on the TripletLoader.

The point is the input pipeline, so the model is deliberately small: three strided 3x3
convolutions with batch norm, global average pooling and a two-layer projection head. Anchor and
positive (the same cell, or its daughter, tau frames later) of each pair are the positives of
NT-Xent; the other 2B - 2 views of the batch are the negatives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from sampler.progress import tqdm

#: inputs are normalized per channel; saturated pixels beyond this many standard deviations are clipped
INPUT_CLIP = 10.0


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class SmallEncoder(nn.Module):
    """(B, C, Y, X) -> (B, proj_dim): conv backbone (width, 2 width, 4 width) + projection head."""

    def __init__(self, in_channels: int, width: int = 32, proj_dim: int = 64) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            _block(in_channels, width), _block(width, 2 * width), _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(4 * width, 4 * width), nn.ReLU(inplace=True), nn.Linear(4 * width, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def nt_xent(z_anchor: torch.Tensor, z_positive: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent (SimCLR): each of the 2B views must pick its partner among the other 2B - 1 views.

    Cosine similarities divided by `temperature`; the mean cross-entropy over all 2B views.
    """
    if z_anchor.shape != z_positive.shape or z_anchor.ndim != 2:
        raise ValueError(f"nt_xent needs two (B, D) embeddings, got {tuple(z_anchor.shape)} and {tuple(z_positive.shape)}")
    n = z_anchor.shape[0]
    z = F.normalize(torch.cat([z_anchor, z_positive]).float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


def to_images(x: torch.Tensor) -> torch.Tensor:
    """A loader batch (B, C, 1, Y, X) -> (B, C, Y, X) float32, clipped to +-INPUT_CLIP."""
    if x.ndim == 5:
        x = x[:, :, 0] if x.shape[2] == 1 else x.amax(dim=2)
    return x.float().clamp(-INPUT_CLIP, INPUT_CLIP)


@dataclass
class TrainResult:
    losses: list[float]
    pairs: int
    seconds: float  # wall time of the training loop
    wait_seconds: float  # time spent waiting for the loader
    last_batch: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else float("nan")

    @property
    def loader_pairs_per_s(self) -> float:
        """Pairs per second of loader wait (what the loader delivers while training competes for CPUs)."""
        return self.pairs / self.wait_seconds if self.wait_seconds > 0 else float("inf")

    def loss_ends(self, k: int = 10) -> tuple[float, float]:
        """Mean loss of the first and of the last k steps."""
        k = max(1, min(k, len(self.losses) // 2 or 1))
        return float(np.mean(self.losses[:k])), float(np.mean(self.losses[-k:]))


def train(
    loader: Any,
    model: nn.Module,
    steps: int,
    *,
    device: torch.device,
    lr: float = 1e-3,
    temperature: float = 0.2,
    progress: bool | None = None,
) -> TrainResult:
    """Train `model` for `steps` batches of `loader` (epoch after epoch) with NT-Xent and AdamW.

    `progress=None` shows the bar on a terminal only.
    """
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    losses: list[float] = []
    pairs, wait = 0, 0.0
    batch = None
    bar = tqdm(total=steps, unit="step", desc="training", disable=(not progress) if progress is not None else None,
               dynamic_ncols=True)
    start = time.perf_counter()
    try:
        while len(losses) < steps:
            batches, got = iter(loader), 0
            while len(losses) < steps:
                t0 = time.perf_counter()
                item = next(batches, None)
                wait += time.perf_counter() - t0
                if item is None:
                    break  # the epoch is over: the next iter() starts the next one
                batch, got = item, got + 1
                anchor = to_images(batch["anchor"]).to(device, non_blocking=True)
                positive = to_images(batch["positive"]).to(device, non_blocking=True)
                loss = nt_xent(model(anchor), model(positive), temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                pairs += len(anchor)
                elapsed = time.perf_counter() - start
                bar.set_postfix({"pairs/s": f"{pairs / elapsed:,.0f}", "loss": f"{np.mean(losses[-10:]):.3f}"})
                bar.update(1)
            if got == 0:
                raise ValueError("the loader yields no batches: an epoch has no step")
    finally:
        bar.close()
    return TrainResult(losses, pairs, time.perf_counter() - start, wait, batch)
