"""Augmentations inside the DALI graph, per sample, with parameters drawn into the plan.

Every enabled transform runs on every sample; a sample whose transform did not fire gets identity
parameters (identity matrix, no flip, scale 1, noise std 0) or is blended back (`on` = 0), so the
graph has no per-sample branches. Ops run on CDHW, except the affine warp (DHWC, as DALI needs).
"""

from __future__ import annotations

import numpy as np

from dali_pipeline._dali import require_dali
from sampler.augment import PARAMS, AugmentConfig

GAMMA_EPSILON = 1e-7  # as MONAI's AdjustContrast
MIN_SIGMA = 0.01  # DALI rejects sigma 0; at 0.01 the 3-tap kernel is the identity in float32


def param_kinds() -> dict[str, tuple[object, int]]:
    """DALI (dtype, ndim) of each parameter as the source returns it (see `param_arrays`)."""
    types = require_dali().types
    kinds = {name: (types.FLOAT, 4) for name in ("gamma", "gamma_on", "scale", "smooth_on", "keep")}
    kinds.update(affine=(types.FLOAT, 2), flip_y=(types.INT32, 0), flip_x=(types.INT32, 0),
                 sigma=(types.FLOAT, 1), noise_std=(types.FLOAT, 0), crop_start=(types.INT32, 1))
    return kinds


def used_params(config: AugmentConfig | None) -> tuple[str, ...]:
    """The parameters the graph of `config` reads (those of enabled transforms), in PARAMS order."""
    if config is None:
        return ()
    enabled = {
        "affine": config.affine.prob > 0, "flip_y": config.flip.prob > 0, "flip_x": config.flip.prob > 0,
        "gamma": config.gamma.prob > 0, "gamma_on": config.gamma.prob > 0, "scale": config.intensity.prob > 0,
        "sigma": config.smooth.prob > 0, "smooth_on": config.smooth.prob > 0, "noise_std": config.noise.prob > 0,
        "crop_start": config.crop is not None, "keep": config.channel_dropout.prob > 0,
    }
    return tuple(name for name in PARAMS if enabled[name])


def param_arrays(params: dict[str, np.ndarray], names: tuple[str, ...]) -> list[np.ndarray]:
    """The parameters `names` of a plan as source outputs, shaped to broadcast over (C, Z, Y, X)."""
    n = len(params["flip_x"])
    out = []
    for name in names:
        value = params[name]
        if name in ("gamma", "gamma_on", "scale", "smooth_on"):
            value = value.reshape(n, 1, 1, 1, 1)
        elif name == "keep":
            value = value.reshape(n, -1, 1, 1, 1)
        elif name == "sigma":
            value = np.maximum(value, MIN_SIGMA)
        out.append(np.ascontiguousarray(value))
    return out


def augment(x, p: dict, config: AugmentConfig):
    """The augmentation chain on a float32 CDHW node `x` with parameter nodes `p` (CPU)."""
    dali = require_dali()
    fn, types, dmath = dali.fn, dali.types, dali.math
    if config.affine.prob > 0:
        v = fn.transpose(x, perm=[1, 2, 3, 0], output_layout="DHWC")
        v = fn.warp_affine(v, matrix=p["affine"], fill_value=0.0, interp_type=types.INTERP_LINEAR)
        x = fn.transpose(v, perm=[3, 0, 1, 2], output_layout="CDHW")
    if config.flip.prob > 0:
        x = fn.flip(x, horizontal=p["flip_x"], vertical=p["flip_y"])
    if config.gamma.prob > 0:
        lo, hi = fn.reductions.min(x), fn.reductions.max(x)
        span = hi - lo
        contrast = dmath.pow((x - lo) / (span + GAMMA_EPSILON), p["gamma"]) * span + lo
        x = x + p["gamma_on"] * (contrast - x)
    if config.intensity.prob > 0:
        x = x * p["scale"]
    if config.smooth.prob > 0:
        x = x + p["smooth_on"] * (fn.gaussian_blur(x, sigma=p["sigma"]) - x)
    if config.noise.prob > 0:
        x = fn.noise.gaussian(x, stddev=p["noise_std"])
    if config.crop is not None:
        x = fn.slice(x, start=p["crop_start"], shape=list(config.crop), axis_names="DHW")
    if config.channel_dropout.prob > 0:
        x = x * p["keep"]
    return x
