"""`demo`, `preview`, `index --plot-lineage`, `bench` and `make-synthetic` end to end on the small synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dali_pipeline.cli import main
from dali_pipeline.demo import SmallEncoder, nt_xent
from dali_pipeline.plots import bench_size, loss_size, montage_size, tree_size


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache folder holding the built-in demo, written by `make-synthetic --size small`."""
    root = tmp_path_factory.mktemp("cache")
    assert main(["make-synthetic", str(root / "demo"), "--size", "small"]) == 0
    return root


@pytest.fixture
def demo_env(cache, monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("DYNACLR_DALI_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return cache / "demo" / "collection.yml"


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_make_synthetic_small_is_the_demo(cache, tmp_path, capsys):
    doc = yaml.safe_load((cache / "demo" / "collection.yml").read_text())
    assert [e["name"] for e in doc["experiments"]] == ["demo_30min", "demo_15min"]
    assert [e["interval_minutes"] for e in doc["experiments"]] == [30.0, 15.0]
    manifest = json.loads((cache / "demo" / "manifest.json").read_text())
    assert manifest["divisions"] > 0 and manifest["fovs"] == 8
    # refuses an existing folder without --overwrite, before writing anything
    rc = main(["make-synthetic", str(cache / "demo"), "--size", "small"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "demo exists; pass --overwrite to replace it" in err


def test_demo_trains_and_the_loss_falls(demo_env, tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert main(["demo", "--steps", "50", "--batch-size", "32", "--seed", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for key in ("data ", "index ", "throughput ", "loss ", "outputs "):
        assert any(line.startswith(key) for line in text.splitlines()), (key, text)
    report = json.loads((out / "summary.json").read_text())
    losses = np.array(report["losses"])
    assert len(losses) == 50 and np.isfinite(losses).all()
    assert losses[-10:].mean() < 0.8 * losses[:10].mean(), losses
    assert report["loss_start"] == pytest.approx(losses[:10].mean())
    assert report["device"] == "cpu" and report["valid_anchors"] > 0 and report["pairs_per_s"] > 0
    assert png_size(out / "pairs.png") == montage_size(8, 2)
    assert png_size(out / "loss.png") == loss_size()
    # outputs exist: refused without --overwrite (before any training)
    rc = main(["demo", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pairs.png exists; pass --overwrite to replace it" in err


def test_demo_with_a_chunk_cache_trains_on_the_same_batches(demo_env, tmp_path, capsys):
    losses = {}
    for cache in ("0", "64"):
        out = tmp_path / f"cache{cache}"
        assert main(["demo", "--steps", "12", "--batch-size", "16", "--out", str(out), "--cache-mb", cache]) == 0
        report = json.loads((out / "summary.json").read_text())
        losses[cache] = report["losses"]
    text = capsys.readouterr().out
    assert "chunk cache " in text and report["chunk_cache"]["hits"] > 0
    np.testing.assert_allclose(losses["64"], losses["0"], rtol=1e-5)


def test_demo_options_reach_the_sampler_and_the_graph(demo_env, tmp_path, capsys):
    out = tmp_path / "options"
    argv = ["demo", "--steps", "3", "--batch-size", "16", "--out", str(out), "--z-reduction", "channelwise",
            "--locality-frames", "2"]
    assert main(argv) == 0
    report = json.loads((out / "summary.json").read_text())
    assert report["z_reduction"] == "channelwise" and report["locality_frames"] == 2
    assert len(report["losses"]) == 3 and np.isfinite(report["losses"]).all()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the flag's type refuses it while parsing
        main(["demo", "--out", str(tmp_path / "bad"), "--locality-frames", "0"])
    assert exit_info.value.code == 2
    assert "argument --locality-frames: must be >= 1, got 0" in capsys.readouterr().err


def test_nt_xent_matches_a_direct_formula():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    z = torch.nn.functional.normalize(torch.cat([a, p]), dim=1)
    sim = (z @ z.T / 0.2).numpy()
    expected = []
    for i in range(10):
        partner = (i + 5) % 10
        others = [j for j in range(10) if j != i]
        expected.append(-sim[i, partner] + np.log(np.exp(sim[i, others]).sum()))
    assert float(nt_xent(a, p, 0.2)) == pytest.approx(np.mean(expected), rel=1e-5)
    # identical views give a lower loss than unrelated ones
    assert float(nt_xent(a, a)) < float(nt_xent(a, p))
    assert SmallEncoder(2)(torch.zeros(3, 2, 32, 32)).shape == (3, 64)


def test_preview_montage(demo_env, tmp_path, capsys):
    out = tmp_path / "pairs.png"
    assert main(["preview", "--out", str(out), "--n", "4", "--patch", "32", "32", "--seed", "3"]) == 0
    assert "4 anchor/positive pairs" in capsys.readouterr().out
    assert png_size(out) == montage_size(4, 2)
    rc = main(["preview", "--out", str(out)])
    assert rc == 2 and "pairs.png exists; pass --overwrite" in capsys.readouterr().err
    bag = tmp_path / "bag.png"
    assert main(["preview", str(demo_env), "--out", str(bag), "--n", "3", "--patch", "32", "32",
                 "--channel-mode", "bag"]) == 0
    assert png_size(bag) == montage_size(3, 1)


def test_index_plot_lineage(demo_env, tmp_path, capsys):
    out = tmp_path / "tree.png"
    assert main(["index", "--patch", "32", "32", "--plot-lineage", "demo_15min/B/2/1", "--out", str(out)]) == 0
    assert "lineage trees of demo_15min B/2/1" in capsys.readouterr().out
    assert png_size(out) == tree_size()
    # an FOV name alone is enough when one experiment has it
    assert main(["index", "--patch", "32", "32", "--plot-lineage", "A/1/0", "--out", str(out), "--overwrite"]) == 0


def test_bench_table_json_png(demo_env, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--steps", "3", "--batch-size", "8", "--patch", "32", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DALI TripletLoader" in text and "raw read ceiling" in text and "vs torch" in text
    report = json.loads((out / "bench.json").read_text())
    assert set(report["results"]) == {"raw", "dali", "torch"}
    for r in report["results"].values():
        assert r["pairs_per_s"] > 0 and r["first_batch_s"] >= 0
    assert report["results"]["torch"]["vs_torch"] == pytest.approx(1.0)
    assert report["results"]["raw"]["read_amplification"] >= 1.0
    assert png_size(out / "bench.png") == bench_size()
    rc = main(["bench", "--steps", "3", "--out", str(out)])
    assert rc == 2 and "bench.json exists; pass --overwrite" in capsys.readouterr().err
