"""The benchmark's reference-style contender computes what the DALI loader delivers.

`benchmarks/loader_throughput.py`'s `torch-norm` contender (the torch dataset followed by the
reference's batch transforms) is compared with the DALI loader: a speed ratio between them only
means something if both hand the training step the same tensors.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from dali_pipeline.datasets.synthetic import demo_spec, write_synthetic
from dali_pipeline.loader import TripletLoader
from dali_pipeline.torch_dataset import MultiExperimentTripletDataset
from sampler import ExperimentRegistry, IndexConfig, LineageIndex, TripletSampler

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "loader_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("loader_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def yaml_path(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("demo") / "demo", demo_spec())


@pytest.mark.parametrize("config", [
    dict(channel_mode="bag", z_reduction="max", final_patch=(20, 24)),
    dict(channel_mode="all", z_reduction=None, final_patch=None),
    dict(channel_mode="all", z_reduction="center", final_patch=(16, 16)),
], ids=["2-D-like", "3-D-like", "center-crop"])
def test_reference_transforms_match_the_dali_loader(bench, yaml_path, config):
    index = LineageIndex.build(ExperimentRegistry.from_yaml(yaml_path),
                               IndexConfig(patch_yx=(32, 32), channel_mode=config["channel_mode"]), progress=False)
    sampler = TripletSampler(index, 8, seed=3)
    dali = TripletLoader(index, sampler, device="cpu", device_id=None, final_patch=config["final_patch"],
                         z_reduction=config["z_reduction"])
    dataset = MultiExperimentTripletDataset(index)
    for step, batch in enumerate(dali):
        got = bench.reference_transforms(dataset.__getitems__(sampler.plan(step, 0)), config)
        for role in ("anchor", "positive"):
            assert got[role].shape == batch[role].shape
            np.testing.assert_allclose(got[role].numpy(), batch[role].numpy(), rtol=1e-5, atol=1e-5)
        if step == 1:
            break
