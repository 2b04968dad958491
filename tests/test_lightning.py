"""TripletDataModule under a real Lightning Trainer on the DALI CPU pipeline: fit, validate, predict, resume."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from torch import nn  # noqa: E402

from dali_pipeline.lightning import LightningLoader, TripletDataModule  # noqa: E402
from sampler import ExperimentRegistry, IndexConfig, LineageIndex, TripletSampler  # noqa: E402

BATCH = 32
SEED = 4
TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)


def keys(meta) -> list[tuple[str, int]]:
    return list(zip(np.asarray(meta["global_track_id"]).astype(str).tolist(), np.asarray(meta["t"]).tolist()))


def nt_xent(a: torch.Tensor, p: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    z = nn.functional.normalize(torch.cat([a, p]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(sim.device)
    return nn.functional.cross_entropy(sim, target)


class TinyContrastive(pl.LightningModule):
    """A few hundred parameters: Z-mean, a conv, features (8) and projections (4); it records its batches."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8))
        self.projection = nn.Linear(8, 4)
        self.train_seen: list[tuple[int, int, list]] = []
        self.val_seen: list[tuple[bool, int, int, list, list]] = []
        self.untouched: list[bool] = []
        self.batch_devices: set[str] = set()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x.mean(dim=2))
        return features, self.projection(features)

    def training_step(self, batch, batch_idx):
        self.train_seen.append((self.current_epoch, batch_idx, keys(batch["anchor_meta"])))
        dm = self.trainer.datamodule
        self.untouched.append(dm.transfer_batch_to_device(batch, self.device, 0) is batch)
        self.batch_devices.add(str(batch["anchor"].device))
        _, a = self(batch["anchor"])
        _, p = self(batch["positive"])
        loss = nt_xent(a, p)
        self.log("train_loss", loss, batch_size=len(a))
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_seen.append((self.trainer.sanity_checking, self.current_epoch, batch_idx,
                              keys(batch["anchor_meta"]), keys(batch["positive_meta"])))
        _, a = self(batch["anchor"])
        _, p = self(batch["positive"])
        self.log("val_loss", nt_xent(a, p), batch_size=len(a), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        features, projections = self(batch["anchor"])
        return {"features": features, "projections": projections, "index": batch["index"]}

    def configure_optimizers(self):
        # not trainer.estimated_stepping_batches: Lightning issue #20550 (the loader state would not be restored)
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Torch's intra-op threads spin against DALI's on 2 cores: a tiny model's step costs 4x more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from dali_pipeline.datasets.synthetic import demo_spec, write_synthetic

    root = tmp_path_factory.mktemp("lightning")
    yaml_path = write_synthetic(root / "demo", demo_spec())
    index = LineageIndex.build(ExperimentRegistry.from_yaml(yaml_path), IndexConfig(patch_yx=(32, 32)), progress=False)
    index.save(root / "index.npz")
    return dict(root=root, yaml=yaml_path, index_path=root / "index.npz", index=index)


def datamodule(demo, **options) -> TripletDataModule:
    options = {"seed": SEED, **options}
    return TripletDataModule(demo["index_path"], BATCH, z_reduction="max", **options)


@pytest.fixture(scope="module")
def full_run(demo):
    """Two uninterrupted epochs: the reference for what every other run must see."""
    dm = datamodule(demo)
    model = TinyContrastive()
    trainer = pl.Trainer(max_epochs=2, enable_checkpointing=False, num_sanity_val_steps=2, **TRAINER)
    trainer.fit(model, datamodule=dm)
    return dm, model, trainer


def test_fit_two_epochs_follows_the_sampler_and_validates_on_identical_batches(full_run):
    dm, model, trainer = full_run
    train = dm.splits.train
    sampler = TripletSampler(train, BATCH, seed=SEED)
    n = len(sampler)
    assert trainer.current_epoch == 2 and len(model.train_seen) == 2 * n
    for epoch in (0, 1):
        got = [k for e, _, k in model.train_seen if e == epoch]
        want = [keys({"global_track_id": train.values("global_track_id", rows), "t": train.values("t", rows)})
                for rows in (sampler.anchor_rows(s, epoch) for s in range(n))]
        assert got == want
    assert all(model.untouched)  # batches come on the trainer's device: no second transfer
    # validation: the same anchors and positives every epoch; the sanity check saw a prefix of them
    sanity = [(a, p) for s, _, _, a, p in model.val_seen if s]
    per_epoch = {e: [(a, p) for s, ep, _, a, p in model.val_seen if not s and ep == e] for e in (0, 1)}
    assert len(per_epoch[0]) == len(dm.val_dataloader()) > 2
    assert per_epoch[0] == per_epoch[1]
    assert sanity == per_epoch[0][:2]
    val_anchors = {k for a, _ in per_epoch[0] for k in a}
    assert len(val_anchors) == len(dm.splits.val.valid)  # drop_last=False: every validation anchor
    train_fovs = {g.rsplit("_", 1)[0] for _, _, k in model.train_seen for g, _ in k}
    val_fovs = {g.rsplit("_", 1)[0] for g, _ in val_anchors}
    assert not train_fovs & val_fovs  # an FOV-level split


def test_loaders_expose_the_sampler_lightning_calls_set_epoch_on(demo):
    dm = datamodule(demo)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train, LightningLoader) and train.batch_sampler is None
    assert train.sampler.batch_size == BATCH and train.sampler.world_size == 1 and len(train.sampler) == len(train)
    it = iter(train)  # Lightning creates the iterator before it calls set_epoch
    train.sampler.set_epoch(0)  # the epoch already loaded: a no-op
    first = next(it)
    train.sampler.set_epoch(0)
    assert train.loader.step == 1
    it.close()
    train.sampler.set_epoch(3)  # another epoch starts at its step 0
    assert (train.loader.epoch, train.loader.step) == (3, 0)
    want = TripletSampler(dm.splits.train, BATCH, seed=SEED).anchor_rows(0, 3)
    assert keys(next(iter(train))["anchor_meta"]) == list(zip(dm.index.values("global_track_id", want).astype(str).tolist(),
                                                             dm.index.values("t", want).tolist()))
    assert keys(first["anchor_meta"]) != keys(next(iter(train))["anchor_meta"])
    passes = []
    for epoch in (0, 5):
        val.sampler.set_epoch(epoch)  # ignored: validation is always the same pass
        passes.append([keys(b["anchor_meta"]) for b in val])
    assert passes[0] == passes[1]


def test_the_loaders_of_a_module_share_one_chunk_cache_and_budget(demo):
    dm = datamodule(demo, cache_bytes=64 << 20)
    dm.setup("fit")
    train, val = dm.train_dataloader().loader, dm.val_dataloader().loader
    store = train.store
    assert store is val.store and store.reserved == {id(train): train.queue_bytes, id(val): val.queue_bytes}
    assert store.cache.budget_bytes == (64 << 20) - train.queue_bytes - val.queue_bytes
    for _ in train:  # one training epoch fills the cache with the training FOVs' chunks
        pass
    dm.setup("predict")
    predict = dm.predict_dataloader().loader
    assert predict.store is store
    got = [b["anchor"].numpy().copy() for b in predict]
    want = [b["anchor"].numpy() for b in datamodule(demo).predict_dataloader()]
    assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))
    assert 0 < predict.reader.stats.chunks_decoded < len(store.cache)  # the training FOVs' chunks were there
    dm.teardown("fit")
    assert store.reserved == {id(predict): predict.queue_bytes}


def test_validation_is_unaugmented_by_default_and_the_same_every_pass_when_augmented(demo):
    from sampler.augment import AugmentConfig, Flip, Noise

    noisy = AugmentConfig(flip=Flip(0.5), noise=Noise(1.0, 0.5), crop=(4, 28, 28))
    dm = datamodule(demo, sampler_options=dict(augment=noisy))
    dm.setup("fit")
    assert dm.train_dataloader().sampler.augment is noisy and dm.val_dataloader().sampler.augment is None
    assert next(iter(dm.train_dataloader()))["anchor"].shape[-2:] == (28, 28)
    assert next(iter(dm.val_dataloader()))["anchor"].shape[-2:] == (32, 32)
    dm = datamodule(demo, val_augment=noisy)
    dm.setup("validate")
    val = dm.val_dataloader()
    passes = [[b["anchor"].numpy().copy() for b in val] for _ in range(2)]
    assert passes[0][0].shape[-2:] == (28, 28)
    assert all(np.array_equal(a, b) for a, b in zip(*passes))  # noise fields included


class Crash(pl.Callback):
    """Stops the run like a killed job, at the start of global step `at` (after its checkpoint)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise KeyboardInterrupt("simulated preemption")


@pytest.mark.parametrize("where", ["epoch0", "epoch1", "epoch_end"])
def test_resume_from_a_checkpoint_sees_exactly_the_unseen_batches(demo, full_run, tmp_path, where):
    """Mid-epoch checkpoints (every_n_train_steps, then the job dies) and the usual end-of-epoch one."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, reference, _ = full_run
    n = len(TripletSampler(datamodule(demo).splits.train, BATCH, seed=SEED))
    first = TinyContrastive()
    if where == "epoch_end":
        at = n
        callbacks = [ModelCheckpoint(dirpath=tmp_path)]  # after validation at the end of each epoch
        trainer = pl.Trainer(max_epochs=1, callbacks=callbacks, num_sanity_val_steps=0, **TRAINER)
        trainer.fit(first, datamodule=datamodule(demo))
    else:
        at = 3 if where == "epoch0" else n + 3
        checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=at, save_top_k=-1, save_last=False)
        trainer = pl.Trainer(max_epochs=2, callbacks=[checkpoint, Crash(at)], num_sanity_val_steps=0, **TRAINER)
        try:
            trainer.fit(first, datamodule=datamodule(demo))
        except (KeyboardInterrupt, SystemExit):
            pass
    assert len(first.train_seen) == at  # the job ended right after step `at`'s checkpoint
    [ckpt] = [p for p in os.listdir(tmp_path) if p.endswith(".ckpt")]
    state = torch.load(tmp_path / ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (state[0]["epoch"], state[0]["step"]) == ((0, n) if where == "epoch_end" else (at // n, at % n))

    resumed = TinyContrastive()
    trainer = pl.Trainer(max_epochs=2, enable_checkpointing=False, num_sanity_val_steps=0, **TRAINER)
    trainer.fit(resumed, datamodule=datamodule(demo), ckpt_path=tmp_path / ckpt)
    seen = [k for _, _, k in first.train_seen] + [k for _, _, k in resumed.train_seen]
    assert seen == [k for _, _, k in reference.train_seen]  # the fit loop restored the loader: nothing repeats
    assert [(e, i) for e, i, _ in resumed.train_seen] == [(e, i) for e, i, _ in reference.train_seen][at:]
    ref_val = [(a, p) for s, _, _, a, p in reference.val_seen if not s]
    got_val = [(a, p) for s, _, _, a, p in resumed.val_seen if not s]
    assert got_val and got_val == ref_val[-len(got_val):]


def test_predict_writes_one_embedding_row_per_observation(demo, full_run, tmp_path):
    from dali_pipeline.embeddings import EmbeddingWriter, read_embeddings

    _, model, _ = full_run
    dm = datamodule(demo, predict_batch_size=50)
    out = tmp_path / "embeddings.parquet"
    trainer = pl.Trainer(callbacks=[EmbeddingWriter(out)], **TRAINER)
    trainer.predict(model, datamodule=dm, return_predictions=False)
    obs, arrays = read_embeddings(out)
    index = demo["index"]
    assert len(obs) == len(index) and arrays["features"].shape == (len(index), 8)
    assert arrays["projections"].shape == (len(index), 4)
    got = list(zip(obs.experiment, obs.fov_name, obs.track_id, obs.t))
    rows = np.arange(len(index))
    want = list(zip(index.values("experiment", rows).astype(str), index.values("fov_name", rows).astype(str),
                    index.values("track_id", rows), index.values("t", rows)))
    assert got == want  # one row per observation, in index order
    assert {"well", "lineage_id", "id", "parent_track_id", "y", "x", "z"} <= set(obs.columns)
    # the joined features are the model's for that observation
    batch = next(iter(dm.predict_dataloader()))
    with torch.no_grad():
        features, _ = model(batch["anchor"])
    np.testing.assert_allclose(arrays["features"][:50], features.numpy(), rtol=1e-5, atol=1e-6)
    trainer = pl.Trainer(callbacks=[EmbeddingWriter(out)], **TRAINER)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trainer.predict(model, datamodule=dm, return_predictions=False)


def test_index_from_a_collection_yaml_is_built_once_and_loaded_by_every_rank(demo, tmp_path):
    index_path = tmp_path / "built" / "index.npz"
    dm = TripletDataModule(demo["yaml"], BATCH, index_path=index_path, index_config=IndexConfig(patch_yx=(32, 32)))
    dm.prepare_data()
    mtime = index_path.stat().st_mtime_ns
    again = TripletDataModule(demo["yaml"], BATCH, index_path=index_path, index_config=IndexConfig(patch_yx=(32, 32)))
    again.prepare_data()  # the file exists: nothing is rebuilt
    assert index_path.stat().st_mtime_ns == mtime
    assert len(again.index) == len(demo["index"]) and again.index is dm.index  # one load per process
    other = TripletDataModule(demo["yaml"], BATCH, index_path=index_path, index_config=IndexConfig(patch_yx=(24, 24)))
    with pytest.raises(ValueError, match="not the index_config given"):
        other.setup("fit")


def test_experiment_split_and_no_validation(demo):
    dm = datamodule(demo, split="experiment", val_experiments=["demo_15min"])
    dm.setup("validate")
    val = dm.val_dataloader()
    assert set(dm.index.values("experiment", dm.splits.val.valid)) == {"demo_15min"}
    assert all(set(b["anchor_meta"]["experiment"]) == {"demo_15min"} for b in val)
    seeded = datamodule(demo, split="experiment", split_ratio=0.5)
    assert len(seeded.splits.train_keys) == len(seeded.splits.val_keys) == 1
    none = datamodule(demo, split_ratio=1.0)
    none.setup("fit")
    assert none.val_dataloader() == [] and len(none.splits.train.valid) == len(demo["index"].valid)
    with pytest.raises(ValueError, match="no validation set"):
        none.setup("validate")
    model = TinyContrastive()
    trainer = pl.Trainer(max_epochs=1, enable_checkpointing=False, limit_train_batches=2, **TRAINER)
    trainer.fit(model, datamodule=none)  # trains without a validation loop
    assert len(model.train_seen) == 2 and not model.val_seen


def _cuda() -> bool:
    from dali_pipeline._dali import gpu_count

    return torch.cuda.is_available() and gpu_count() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="no CUDA device visible to torch and DALI")
def test_gpu_trainer_gets_batches_on_its_gpu_without_a_second_transfer(demo):
    dm = datamodule(demo)
    model = TinyContrastive()
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=2,
                         enable_checkpointing=False, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert model.batch_devices == {"cuda:0"} and all(model.untouched) and len(model.untouched) == 3


def test_fov_shards_apply_to_training_only(demo, monkeypatch):
    """sampler_options={"fov_shards": True}: rank 1 of 2 trains on its own FOVs; validation and predict are unsharded."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = datamodule(demo, sampler_options={"fov_shards": True})
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert (train.sampler.rank, train.sampler.world_size) == (1, 2)
    assert train.sampler.options["fov_shards"] and not val.sampler.options["fov_shards"]
    want = TripletSampler(dm.splits.train, BATCH, seed=SEED, rank=1, world_size=2, fov_shards=True)
    assert len(train) == len(want)
    rows = want.anchor_rows(0, 0)
    got = keys(next(iter(train))["anchor_meta"])
    assert got == list(zip(dm.index.values("global_track_id", rows).astype(str).tolist(),
                           dm.index.values("t", rows).tolist()))
    mine = {(e, n) for e, n in dm.index.fovs.loc[want.shards().fovs(1), ["experiment", "fov_name"]].itertuples(index=False)}
    fovs = set(zip(dm.index.values("experiment", rows).astype(str), dm.index.values("fov_name", rows).astype(str)))
    assert fovs <= mine
    dm.setup("predict")
    assert dm.predict_dataloader().sampler.predict and not dm.predict_dataloader().sampler.options["fov_shards"]
