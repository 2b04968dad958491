"""Augmentation configuration and per-sample parameter draws (the graph applies them on the device).

Every parameter (whether a transform fires, angles, scales, gamma, sigmas, crop offsets, noise
std, channel masks) is drawn here from the step's generator, so a batch is identical after a
resume and differs between ranks; only per-pixel noise fields come from DALI's own generator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np


def _pair(value: Any, name: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in (value if isinstance(value, (list, tuple)) else (-value, value)))
    if lo > hi:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value}")
    return lo, hi


def _prob(value: float, name: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}.prob must lie in [0, 1], got {value}")
    return float(value)


@dataclass(frozen=True)
class Affine:
    """Random 3-D affine about the patch centre: rotation about Z, scale, shear (YX), translation."""

    prob: float = 0.0
    rotate_z: tuple[float, float] = (-math.pi, math.pi)  # radians
    scale: tuple[tuple[float, float], ...] = ((1.0, 1.0), (0.8, 1.3), (0.8, 1.3))  # (z, y, x) ranges
    isotropic_yx: bool = False  # one scale for y and x
    shear: float = 0.0  # max |shear| of x along y and y along x
    translate: tuple[float, float, float] = (0.0, 0.0, 0.0)  # max |shift| in pixels (z, y, x)

    def __post_init__(self) -> None:
        _prob(self.prob, "affine")
        object.__setattr__(self, "rotate_z", _pair(self.rotate_z, "affine.rotate_z"))
        scale = tuple(_pair(s, "affine.scale") for s in self.scale)
        if len(scale) != 3 or min(lo for lo, _ in scale) <= 0:
            raise ValueError(f"affine.scale needs three positive (low, high) ranges (z, y, x), got {self.scale}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "translate", tuple(float(t) for t in self.translate))


@dataclass(frozen=True)
class Flip:
    """Independent flips of Y and X, each with probability `prob`."""

    prob: float = 0.0

    def __post_init__(self) -> None:
        _prob(self.prob, "flip")


@dataclass(frozen=True)
class Gamma:
    """Gamma contrast on normalized data: rescale the sample to [0, 1], power, rescale back."""

    prob: float = 0.0
    gamma: tuple[float, float] = (0.6, 1.6)

    def __post_init__(self) -> None:
        _prob(self.prob, "gamma")
        lo, hi = _pair(self.gamma, "gamma.gamma")
        if lo <= 0:
            raise ValueError(f"gamma.gamma must be positive, got {self.gamma}")
        object.__setattr__(self, "gamma", (lo, hi))


@dataclass(frozen=True)
class IntensityScale:
    """x * (1 + f), f uniform in [-factors, factors]."""

    prob: float = 0.0
    factors: float = 0.5

    def __post_init__(self) -> None:
        _prob(self.prob, "intensity")


@dataclass(frozen=True)
class Smooth:
    """Gaussian smoothing with per-sample sigmas: one for Z, one shared by Y and X."""

    prob: float = 0.0
    sigma_yx: tuple[float, float] = (0.25, 0.5)
    sigma_z: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        _prob(self.prob, "smooth")
        object.__setattr__(self, "sigma_yx", _pair(self.sigma_yx, "smooth.sigma_yx"))
        object.__setattr__(self, "sigma_z", _pair(self.sigma_z, "smooth.sigma_z"))
        if min(self.sigma_yx[0], self.sigma_z[0]) < 0:
            raise ValueError("smooth sigmas must be >= 0")


@dataclass(frozen=True)
class Noise:
    """Additive Gaussian noise, a different field per sample; std uniform in [0, std]."""

    prob: float = 0.0
    std: float = 0.1

    def __post_init__(self) -> None:
        _prob(self.prob, "noise")


@dataclass(frozen=True)
class ChannelDropout:
    """Zero each (sample, channel) with probability `prob` (training only)."""

    prob: float = 0.0

    def __post_init__(self) -> None:
        _prob(self.prob, "channel_dropout")


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentations of anchor and positive (drawn independently), in the reference's order:
    affine, flip, gamma, intensity, smooth, noise, random crop (to `crop`, (Z, Y, X)), channel dropout.
    """

    affine: Affine = field(default_factory=Affine)
    flip: Flip = field(default_factory=Flip)
    gamma: Gamma = field(default_factory=Gamma)
    intensity: IntensityScale = field(default_factory=IntensityScale)
    smooth: Smooth = field(default_factory=Smooth)
    noise: Noise = field(default_factory=Noise)
    crop: tuple[int, int, int] | None = None
    channel_dropout: ChannelDropout = field(default_factory=ChannelDropout)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "AugmentConfig":
        """From a YAML mapping {transform: {parameter: value}, crop: [z, y, x]}; unknown keys are errors."""
        kinds = {f.name: f.type for f in fields(cls)}
        unknown = set(raw) - set(kinds)
        if unknown:
            raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; known: {sorted(kinds)}")
        built: dict[str, Any] = {}
        for name, value in raw.items():
            if name == "crop":
                built[name] = None if value is None else tuple(int(v) for v in value)
                continue
            factory = {f.name: f.default_factory for f in fields(cls)}[name]  # type: ignore[misc]
            try:
                built[name] = type(factory())(**(value or {}))
            except TypeError as err:
                raise ValueError(f"augmentation '{name}': {err}") from None
        return cls(**built)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def preset(cls, name: str) -> "AugmentConfig":
        """The reference's production presets: "2d" (2-D MIP, bag of channels) and "3d"."""
        if name == "2d":
            return cls(
                affine=Affine(prob=0.8, rotate_z=(-math.pi, math.pi), scale=((0.8, 1.3),) * 3, shear=0.05),
                flip=Flip(0.5), gamma=Gamma(0.5, (0.6, 1.6)), intensity=IntensityScale(0.5, 0.5),
                smooth=Smooth(0.5, (0.25, 0.5), (0.0, 0.0)), noise=Noise(0.5, 0.1), crop=(10, 192, 192),
            )
        if name == "3d":
            return cls(
                affine=Affine(prob=0.8, rotate_z=(-math.pi, math.pi), scale=((0.9, 1.1),) * 3, shear=0.05),
                flip=Flip(0.5), gamma=Gamma(0.5, (0.6, 1.6)), intensity=IntensityScale(0.5, 0.5),
                smooth=Smooth(0.5, (0.25, 0.5), (0.0, 0.2)), noise=Noise(0.5, 0.1), crop=(40, 228, 228),
            )
        raise ValueError(f"unknown preset {name!r}: use '2d' or '3d'")


#: names and per-sample shapes of the parameters `draw_augment` returns (C = channels)
PARAMS = ("affine", "flip_y", "flip_x", "gamma", "gamma_on", "scale", "sigma", "smooth_on", "noise_std",
          "crop_start", "keep")


def draw_augment(config: AugmentConfig, n: int, n_channels: int, shape: tuple[int, int, int],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-sample parameters for `n` samples of (C, Z, Y, X) = (n_channels, *shape), from `rng`.

    A transform that does not fire gets its identity parameters (identity matrix, gamma 1, scale 1,
    noise std 0, ...), so the graph applies every transform to every sample.
    """
    z, y, x = shape
    out: dict[str, np.ndarray] = {}
    a = config.affine
    fire = rng.random(n) < a.prob
    angle = rng.uniform(*a.rotate_z, n)
    scales = np.stack([rng.uniform(lo, hi, n) for lo, hi in a.scale], axis=1)
    if a.isotropic_yx:
        scales[:, 2] = scales[:, 1]
    shear = rng.uniform(-a.shear, a.shear, (n, 2))
    shift = rng.uniform(-1, 1, (n, 3)) * np.array(a.translate)
    out["affine"] = affine_matrices(np.where(fire, angle, 0.0), np.where(fire[:, None], scales, 1.0),
                                    np.where(fire[:, None], shear, 0.0), np.where(fire[:, None], shift, 0.0),
                                    shape)
    out["flip_y"] = (rng.random(n) < config.flip.prob).astype(np.int32)
    out["flip_x"] = (rng.random(n) < config.flip.prob).astype(np.int32)
    g = config.gamma
    on = rng.random(n) < g.prob
    out["gamma"] = np.where(on, rng.uniform(*g.gamma, n), 1.0).astype(np.float32)
    out["gamma_on"] = on.astype(np.float32)
    s = config.intensity
    on = rng.random(n) < s.prob
    out["scale"] = np.where(on, 1.0 + rng.uniform(-s.factors, s.factors, n), 1.0).astype(np.float32)
    m = config.smooth
    on = rng.random(n) < m.prob
    sigma_z, sigma_yx = rng.uniform(*m.sigma_z, n), rng.uniform(*m.sigma_yx, n)
    out["sigma"] = np.stack([sigma_z, sigma_yx, sigma_yx], axis=1).astype(np.float32)
    out["smooth_on"] = on.astype(np.float32)
    no = config.noise
    on = rng.random(n) < no.prob
    out["noise_std"] = np.where(on, rng.uniform(0.0, no.std, n), 0.0).astype(np.float32)
    crop = config.crop or (z, y, x)
    if any(c > s_ for c, s_ in zip(crop, shape)):
        raise ValueError(f"augmentation crop {crop} is larger than the read box {shape}")
    out["crop_start"] = np.stack([rng.integers(0, s_ - c + 1, n) for c, s_ in zip(crop, shape)], axis=1).astype(np.int32)
    out["keep"] = (rng.random((n, n_channels)) >= config.channel_dropout.prob).astype(np.float32)
    return out


def affine_matrices(angle: np.ndarray, scale: np.ndarray, shear: np.ndarray, shift: np.ndarray,
                    shape: tuple[int, int, int]) -> np.ndarray:
    """(n, 3, 4) float32 output-to-input maps in (x, y, z) order about the volume centre.

    The forward map is x' = c + t + R S H (x - c) (rotation about Z, scale, shear in YX); warping
    samples the input at the inverse of it for every output voxel.
    """
    n = len(angle)
    z, y, x = shape
    centre = np.array([x, y, z], dtype=np.float64) / 2.0  # pixel-centre convention: voxel i spans [i, i+1)
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = cos, -sin, sin, cos, 1.0
    sh = np.repeat(np.eye(3)[None], n, axis=0)
    sh[:, 0, 1], sh[:, 1, 0] = shear[:, 0], shear[:, 1]
    sc = np.zeros((n, 3, 3))
    sc[:, 0, 0], sc[:, 1, 1], sc[:, 2, 2] = scale[:, 2], scale[:, 1], scale[:, 0]  # (x, y, z)
    forward = rot @ sc @ sh
    inverse = np.linalg.inv(forward)
    t = shift[:, ::-1]  # (z, y, x) -> (x, y, z)
    offset = centre - np.einsum("nij,nj->ni", inverse, centre + t)
    return np.concatenate([inverse, offset[:, :, None]], axis=2).astype(np.float32)
