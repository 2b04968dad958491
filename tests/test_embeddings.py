"""Embeddings out: the join with the batch index, one row per observation, atomic writes, DDP merging.

The DDP tests run this file as the torchrun worker script (`__main__` below).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dali_pipeline.embeddings import EmbeddingTable, output_format, prediction_table, read_embeddings, write_embeddings

HERE = Path(__file__).resolve().parent


def fake_predictions(rows: np.ndarray, batch: int, form: str = "columns") -> list[dict]:
    """Predictions whose features encode their observation: features = (track_id, t, fov), projections = t."""
    out = []
    for start in range(0, len(rows), batch):
        r = rows[start:start + batch]
        index = {"experiment": np.where(r % 2 == 0, "exp_a", "exp_b").astype(object),
                 "fov_name": np.array([f"/A/1/{i % 3}" for i in r], dtype=object),
                 "track_id": r // 4, "t": r % 4, "lineage_id": np.array([f"L{i // 8}" for i in r], dtype=object)}
        if form == "dicts":
            index = [dict(zip(index, vals)) for vals in zip(*index.values())]
        features = torch.tensor(np.stack([r // 4, r % 4, r % 3], axis=1), dtype=torch.float32)
        out.append({"features": features, "projections": torch.tensor(r % 4, dtype=torch.float32)[:, None],
                    "index": index})
    return out


def check_rows(obs: pd.DataFrame, arrays: dict, rows: np.ndarray) -> None:
    assert len(obs) == len(rows)
    assert obs.fov_name.tolist() == [f"A/1/{i % 3}" for i in rows]  # the reference strips the slashes
    assert obs.track_id.tolist() == (rows // 4).tolist() and obs.t.tolist() == (rows % 4).tolist()
    np.testing.assert_array_equal(arrays["features"], np.stack([rows // 4, rows % 4, rows % 3], axis=1))
    np.testing.assert_array_equal(arrays["projections"][:, 0], rows % 4)


@pytest.mark.parametrize("form", ["columns", "dicts"])
def test_write_and_read_back_one_row_per_observation(tmp_path, form):
    rows = np.arange(37)
    path = write_embeddings(fake_predictions(rows, 10, form), tmp_path / "emb.parquet")
    obs, arrays = read_embeddings(path)
    check_rows(obs, arrays, rows)
    assert arrays["features"].dtype == np.float32 and arrays["features"].shape == (37, 3)
    assert sorted(os.listdir(tmp_path)) == ["emb.parquet"]  # no parts or temporary files left


def test_duplicate_observations_are_written_once(tmp_path):
    rows = np.arange(20)
    predictions = fake_predictions(rows, 8) + fake_predictions(rows[:5], 5)  # padding repeats the first rows
    obs, arrays = read_embeddings(write_embeddings(predictions, tmp_path / "emb.parquet"))
    check_rows(obs, arrays, rows)


def test_refuses_to_overwrite_unless_asked_and_writes_atomically(tmp_path):
    out = tmp_path / "emb.parquet"
    write_embeddings(fake_predictions(np.arange(10), 4), out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_embeddings(fake_predictions(np.arange(5), 4), out)
    with pytest.raises(FileExistsError):
        EmbeddingTable(out)  # checked before any prediction is made
    check_rows(*read_embeddings(out), np.arange(10))
    bad = fake_predictions(np.arange(8), 4)
    bad[1]["projections"] = bad[1]["projections"][:2]  # rows that do not line up with the index
    with pytest.raises(ValueError, match="different numbers of rows"):
        write_embeddings(bad, out, overwrite=True)
    check_rows(*read_embeddings(out), np.arange(10))  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["emb.parquet"]  # and the failed write left nothing behind
    write_embeddings(fake_predictions(np.arange(6), 4), out, overwrite=True)
    check_rows(*read_embeddings(out), np.arange(6))
    assert sorted(os.listdir(tmp_path)) == ["emb.parquet"]


def test_a_foreign_folder_where_the_ranks_put_their_parts_survives(tmp_path):
    out = tmp_path / "emb.parquet"
    foreign = tmp_path / ".emb.parquet.parts"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"\.emb\.parquet\.parts holds \['notes\.txt'\], not prediction parts"):
        write_embeddings(fake_predictions(np.arange(6), 4), out, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine" and not out.exists()
    (foreign / "notes.txt").unlink()
    (foreign / "rank-00003.parquet").write_bytes(b"stale")  # an earlier run's part: ours, cleared by the merge
    check_rows(*read_embeddings(write_embeddings(fake_predictions(np.arange(6), 4), out)), np.arange(6))
    assert not foreign.exists()


def test_prediction_contract_errors():
    with pytest.raises(ValueError, match="no 'index'"):
        prediction_table({"features": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="has shape"):
        prediction_table({"features": torch.zeros(2, 3), "index": {"t": np.arange(3)}})
    table = prediction_table(torch.ones(2, 3), index={"t": np.arange(2)})  # a bare tensor is the features
    assert table.column_names == ["t", "features"]
    assert output_format("x.zarr") == output_format("x.h5ad") == "anndata" and output_format("x.pq") == "parquet"
    with pytest.raises(ValueError, match="suffix"):
        output_format("x.csv")


def test_anndata_output_like_the_reference(tmp_path):
    anndata = pytest.importorskip("anndata")
    rows = np.arange(12)
    path = write_embeddings(fake_predictions(rows, 5), tmp_path / "emb.zarr")
    adata = anndata.read_zarr(path)
    np.testing.assert_array_equal(adata.X, np.stack([rows // 4, rows % 4, rows % 3], axis=1))
    np.testing.assert_array_equal(adata.obsm["X_projections"][:, 0], rows % 4)
    assert adata.obs.fov_name.tolist() == [f"A/1/{i % 3}" for i in rows]
    path = write_embeddings(fake_predictions(rows, 5), tmp_path / "proj.h5ad", embedding_key="projections")
    adata = anndata.read_h5ad(path)
    assert adata.X.shape == (12, 1) and adata.obsm["X_features"].shape == (12, 3)


# ---------------------------------------------------------------------- DDP (torchrun, gloo)
def worker(args: argparse.Namespace) -> None:
    """One rank: the plain writer on its own predictions, then Lightning DDP fit and predict."""
    import lightning.pytorch as pl
    import torch.distributed as dist

    from dali_pipeline.distributed import init_distributed

    out = Path(args.out)
    topo = init_distributed()  # Lightning's DDP strategy reuses this process group
    rank, world = topo.rank, topo.world_size
    report: dict = {"rank": rank}

    batch_starts = np.arange(rank * 8, 40, world * 8)  # rank 0: 0, 16, 32; rank 1: 8, 24
    mine = np.concatenate([np.arange(s, min(s + 8, 40)) for s in batch_starts])
    predictions = fake_predictions(mine, 8) + fake_predictions(np.arange(3), 3)  # every rank repeats rows 0-2
    report["plain"] = str(write_embeddings(predictions, out / "plain.parquet"))
    dist.barrier()

    sys.path.insert(0, str(HERE))
    from test_lightning import TinyContrastive

    from dali_pipeline.embeddings import EmbeddingWriter
    from dali_pipeline.lightning import TripletDataModule

    dm = TripletDataModule(args.index, 16, seed=1, z_reduction="max", predict_batch_size=40)
    model = TinyContrastive()
    common = dict(accelerator="cpu", devices=world, strategy="ddp", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0, **common)
    trainer.fit(model, datamodule=dm)
    train = dm.train_dataloader()
    report.update(sampler_rank=train.sampler.rank, sampler_world=train.sampler.world_size,
                  train_keys=[k for _, _, k in model.train_seen], val_batches=len(model.val_seen))
    writer = EmbeddingWriter(out / "lightning.parquet")
    trainer = pl.Trainer(callbacks=[writer], **common)
    trainer.predict(model, datamodule=dm, return_predictions=False)
    report["lightning"] = str(writer.written)
    (out / f"rank-{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One `torchrun --nproc_per_node=2` of the worker: (output folder, the index, each rank's report)."""
    pytest.importorskip("lightning")
    from test_distributed import torchrun

    from dali_pipeline.datasets.synthetic import demo_spec, write_synthetic
    from sampler import ExperimentRegistry, IndexConfig, LineageIndex

    root = tmp_path_factory.mktemp("ddp-embeddings")
    yaml_path = write_synthetic(root / "demo", demo_spec())
    index = LineageIndex.build(ExperimentRegistry.from_yaml(yaml_path), IndexConfig(patch_yx=(32, 32)), progress=False)
    index.save(root / "index.npz")
    out = root / "out"
    out.mkdir()
    torchrun(2, Path(__file__), ["--out", str(out), "--index", str(root / "index.npz")], timeout=240)
    return out, index, [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def test_plain_writer_under_two_ranks_merges_without_duplicates(ddp_run):
    out, _, reports = ddp_run
    assert all(r["plain"] == str(out / "plain.parquet") for r in reports)  # every rank returns the one output
    obs, arrays = read_embeddings(out / "plain.parquet")
    check_rows(obs, arrays, np.arange(40))  # no duplicates; round-robin by batch restores the global order


def test_lightning_ddp_fit_and_predict_write_one_row_per_observation(ddp_run):
    out, index, reports = ddp_run
    assert [(r["sampler_rank"], r["sampler_world"]) for r in reports] == [(0, 2), (1, 2)]  # ranks from the trainer
    trained = [{tuple(k) for step in r["train_keys"] for k in step} for r in reports]
    assert all(len(t) == 3 * 16 for t in trained) and not trained[0] & trained[1]
    assert all(r["val_batches"] == 2 for r in reports)
    assert all(r["lightning"] == str(out / "lightning.parquet") for r in reports)
    obs, arrays = read_embeddings(out / "lightning.parquet")
    rows = np.arange(len(index))
    want = list(zip(index.values("experiment", rows).astype(str), index.values("fov_name", rows).astype(str),
                    index.values("track_id", rows), index.values("t", rows)))
    assert list(zip(obs.experiment, obs.fov_name, obs.track_id, obs.t)) == want  # every row once, index order
    assert arrays["features"].shape == (len(index), 8)
    assert sorted(p for p in os.listdir(out) if not p.startswith("rank-")) == ["lightning.parquet", "plain.parquet"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--index", required=True)
    worker(parser.parse_args())
