"""DALI is an extra: a clear ImportError without it, a real CPU pipeline with it, GPU when present."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from dali_pipeline._dali import gpu_count, require_dali


def test_missing_dali_names_the_extras(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"dynaclr-dali\[cu12\].*dynaclr-dali\[cu13\]"):
        require_dali()


def _cast_and_normalize(device: str, device_id: int | None) -> np.ndarray:
    dali = require_dali()
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    data = [np.arange(24, dtype=np.uint16).reshape(2, 3, 4) + i for i in range(2)]

    @dali.pipeline_def(batch_size=2, num_threads=1, device_id=device_id)
    def pipe():
        x = fn.external_source(source=lambda: data, batch=True, dtype=types.UINT16, ndim=3, layout="CHW")
        if device == "gpu":
            x = x.gpu()
        return (fn.cast(x, dtype=types.FLOAT) - 10.0) / 2.0

    (out,) = pipe().run()
    if device == "gpu":
        out = out.as_cpu()
    return np.stack([np.asarray(out[i]) for i in range(2)])


def test_cpu_pipeline_runs_without_a_gpu():
    got = _cast_and_normalize("cpu", None)
    want = (np.stack([np.arange(24).reshape(2, 3, 4) + i for i in range(2)]).astype(np.float32) - 10) / 2
    np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="no CUDA device visible to DALI")
def test_gpu_pipeline_matches_cpu():
    np.testing.assert_array_equal(_cast_and_normalize("gpu", 0), _cast_and_normalize("cpu", None))
