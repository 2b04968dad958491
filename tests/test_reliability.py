"""Reliability: read faults (raise / skip), resume after an error, atomic writers, slow storage, hostile input.

Every test that reads a store checks it is byte-identical afterwards (`tree_hash` of all its files).
"""

from __future__ import annotations

import functools
import io
import http.server
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml

from builders import expected_patches, make_experiment, pixels, track_rows, tracks_table, write_collection
from dali_pipeline import PatchReader, PatchReadError
from sampler import CollectionError, ExperimentRegistry, IndexConfig, LineageIndex, TripletSampler, make_plan
from sampler.tracks import parse_tracks
from test_reader import build, collection, tree_hash

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- helpers
def _fov_dir(index: LineageIndex, experiment: str) -> tuple[int, Path]:
    fov = int(np.flatnonzero(index.fovs.experiment == experiment)[0])
    return fov, Path(index.fovs.url[fov][len("file://"):])


def _touches(plan, fov: int, t: int) -> np.ndarray:
    """Samples of a fit plan whose anchor or positive box reads (fov, t)."""
    hit = (plan.anchor_boxes.fov == fov) & (plan.anchor_boxes.t == t)
    return hit | ((plan.positive_boxes.fov == fov) & (plan.positive_boxes.t == t))


def _plan_with_few_bad(index: LineageIndex, fov: int, t: int, n_bad: int = 1, n: int = 24, seed: int = 0):
    """A fit plan of `n` valid anchors where exactly `n_bad` samples read (fov, t)."""
    rng = np.random.default_rng(seed)
    valid = index.valid
    probe = make_plan(index, valid, np.random.default_rng(seed))
    touching = _touches(probe, fov, t)
    bad_rows, ok_rows = valid[touching], valid[~touching]
    anchors = ok_rows[(rng.permutation(len(ok_rows)) % len(ok_rows))[: n - n_bad]]
    # positives are drawn again by make_plan: keep only bad anchors whose anchor box itself is hit
    hot = (index.column("fov")[bad_rows] == fov) & (index.column("t")[bad_rows] == t)
    rows = np.concatenate([anchors[:3], bad_rows[hot][:n_bad], anchors[3:]])
    for s in range(100):  # draw positives until only the chosen anchors touch (fov, t)
        plan = make_plan(index, rows, np.random.default_rng(s))
        if _touches(plan, fov, t).sum() == n_bad:
            return plan
    raise AssertionError("no plan with the wanted number of bad samples")


def _corrupt(path: Path, kind: str) -> None:
    raw = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path.write_bytes(np.random.default_rng(7).integers(0, 256, len(raw), dtype=np.uint8).tobytes())


# ---------------------------------------------------------------------------- read faults
@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_chunk_raises_naming_the_box_or_is_skipped(tmp_path, kind, caplog):
    index = build(tmp_path, version="0.5", chunks=(1, 1, 3, 64, 64))
    fov, folder = _fov_dir(index, "b")
    _corrupt(folder / "c" / "3" / "0" / "0" / "0" / "0", kind)  # t=3, GFP of experiment b
    before = tree_hash(tmp_path)
    plan = _plan_with_few_bad(index, fov, 3, n_bad=2)
    bad = _touches(plan, fov, 3)

    with pytest.raises(PatchReadError, match=r"Experiment 'b', FOV A/1/0, t=3: (anchor|positive) box z\[\d+:\d+\]"):
        PatchReader(index).read(plan)

    reader = PatchReader(index, on_read_error="skip", max_skip_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="dali_pipeline.reader"):
        got = reader.read(plan)
    # each bad sample became the next good one, anchor and positive together
    good = np.flatnonzero(~bad)
    source = np.array([i if not bad[i] else good[np.searchsorted(good, i) % len(good)] for i in range(len(plan))])
    np.testing.assert_array_equal(got.plan.anchor_rows, plan.anchor_rows[source])
    np.testing.assert_array_equal(got.plan.positive_rows, plan.positive_rows[source])
    np.testing.assert_array_equal(got.plan.ids, plan.ids[source])
    np.testing.assert_array_equal(got.plan.anchor_norm, plan.anchor_norm[source])
    assert got.anchor.shape == (len(plan), 2, 2, 32, 32) and got.anchor.flags.c_contiguous
    np.testing.assert_array_equal(got.anchor, expected_patches(index, got.plan.anchor_boxes))
    np.testing.assert_array_equal(got.positive, expected_patches(index, got.plan.positive_boxes))
    assert reader.stats.skipped == 2
    assert sum(reader.stats.skip_reasons.values()) == 2
    assert all(r.startswith("Experiment 'b', FOV A/1/0: ") for r in reader.stats.skip_reasons)
    assert "skipped" in reader.stats.as_dict() and "skip_reasons" not in reader.stats.as_dict()
    assert sum("Experiment 'b', FOV A/1/0, t=3" in r.getMessage() for r in caplog.records) == 2
    # the torch path replaces the same samples, metadata included
    from dali_pipeline.torch_dataset import MultiExperimentTripletDataset

    torch_batch = MultiExperimentTripletDataset(index, on_read_error="skip").__getitems__(plan)
    np.testing.assert_array_equal(torch_batch["anchor"].numpy(), got.anchor)
    assert [m["t"] for m in torch_batch["positive_meta"]] == index.column("t")[got.plan.positive_rows].tolist()
    # the same plan skips the same samples (deterministic)
    again = PatchReader(index, on_read_error="skip").read(plan)
    np.testing.assert_array_equal(again.plan.ids, got.plan.ids)
    # above the threshold the step raises
    with pytest.raises(PatchReadError, match=r"2 of 24 samples .* max_skip_fraction=0.05"):
        PatchReader(index, on_read_error="skip", max_skip_fraction=0.05).read(plan)
    assert tree_hash(tmp_path) == before


def test_deleted_chunk_reads_fill_value_errors_in_strict_mode_and_skips(tmp_path):
    index = build(tmp_path, version="0.5", chunks=(1, 1, 3, 64, 64))
    fov, folder = _fov_dir(index, "b")
    (folder / "c" / "3" / "0" / "0" / "0" / "0").unlink()
    before = tree_hash(tmp_path)
    plan = _plan_with_few_bad(index, fov, 3, n_bad=1)
    bad = int(np.flatnonzero(_touches(plan, fov, 3))[0])
    role = "anchor" if plan.anchor_boxes.fov[bad] == fov and plan.anchor_boxes.t[bad] == 3 else "positive"
    got = PatchReader(index).read(plan)
    b_gfp = 1  # canonical channel "gfp" is GFP, zarr channel 0 of experiment b
    assert (getattr(got, role)[bad, b_gfp] == 0).all()  # fill value
    assert (getattr(got, role)[bad, 0] != 0).any()
    with pytest.raises(PatchReadError, match=r"Experiment 'b', FOV A/1/0, t=3"):
        PatchReader(index, strict=True).read(plan)
    reader = PatchReader(index, strict=True, on_read_error="skip")
    assert reader.read(plan).plan.anchor_rows[bad] != plan.anchor_rows[bad] and reader.stats.skipped == 1
    assert tree_hash(tmp_path) == before


def check_unreadable_chunk(state: str) -> None:
    """Reads of a pickled (index, plan) whose (b, A/1/0, t=3) chunk cannot be opened: raise, then skip."""
    with open(state, "rb") as f:
        index, plan = pickle.load(f)
    denied = r"Experiment 'b', FOV A/1/0, t=3: .*(Permission denied|PERMISSION_DENIED)"
    with pytest.raises(PatchReadError, match=denied):
        PatchReader(index).read(plan)
    reader = PatchReader(index, on_read_error="skip")
    assert len(reader.read(plan).plan) == len(plan) and reader.stats.skipped == 1


#: as root, permissions apply only without the capabilities that bypass them
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_unreadable_chunk_is_skipped_or_raises(tmp_path):
    index = build(tmp_path, version="0.5", chunks=(1, 1, 3, 64, 64))
    fov, folder = _fov_dir(index, "b")
    victim = folder / "c" / "3" / "0" / "0" / "0" / "0"
    before = tree_hash(tmp_path)
    state = tmp_path.parent / f"{tmp_path.name}-state.pkl"
    state.write_bytes(pickle.dumps((index, _plan_with_few_bad(index, fov, 3, n_bad=1))))
    victim.chmod(0)
    try:
        if os.geteuid() != 0:
            check_unreadable_chunk(str(state))
        else:  # root reads a chmod-000 file: run the reads in a process without CAP_DAC_OVERRIDE
            probe = subprocess.run([*NO_DAC, "cat", str(victim)], capture_output=True) if shutil.which("setpriv") \
                else subprocess.CompletedProcess([], 0, b"", b"no setpriv on PATH")
            if probe.returncode == 0 or b"Permission denied" not in probe.stderr:
                pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (setpriv missing or not permitted): "
                            f"a chmod-000 chunk stays readable ({probe.stderr.decode().strip()[:200]})")
            code = ("import sys; sys.path[:0] = sys.argv[1:3]; import test_reliability as t; "
                    "t.check_unreadable_chunk(sys.argv[3])")
            run = subprocess.run([*NO_DAC, sys.executable, "-c", code, str(REPO / "tests"), str(REPO), str(state)],
                                 capture_output=True, text=True, cwd=REPO, timeout=120)
            assert run.returncode == 0, run.stderr[-3000:]
    finally:
        victim.chmod(0o644)
    assert tree_hash(tmp_path) == before


def test_store_option_validation(tmp_path):
    index = build(tmp_path, version="0.5")
    with pytest.raises(ValueError, match="on_read_error"):
        PatchReader(index, on_read_error="ignore")
    with pytest.raises(ValueError, match="max_skip_fraction"):
        PatchReader(index, max_skip_fraction=1.5)


# ---------------------------------------------------------------------------- loader: raise, rebuild, resume
def _loader(index, **options):
    from dali_pipeline.loader import TripletLoader

    return TripletLoader(index, TripletSampler(index, 8, seed=3), device="cpu", **options)


def _ids(batch) -> list[tuple[int, int]]:
    return list(zip(batch["anchor_meta"]["global_track_id"], batch["anchor_meta"]["t"],
                    batch["positive_meta"]["global_track_id"], batch["positive_meta"]["t"]))


def test_loader_rebuilt_after_a_read_error_resumes_from_its_state(tmp_path):
    pytest.importorskip("nvidia.dali")
    index = build(tmp_path, version="0.5", chunks=(1, 1, 3, 64, 64))
    clean = [(_ids(b), b["anchor"].numpy().copy()) for b in _loader(index)]
    assert len(clean) >= 3
    # corrupt a chunk first read at step >= 1
    sampler = TripletSampler(index, 8, seed=3)
    seen: set[tuple[int, int]] = set()
    target = None
    for step in range(len(sampler)):
        plan = sampler.plan(step, 0)
        keys = set(zip(np.r_[plan.anchor_boxes.fov, plan.positive_boxes.fov].tolist(),
                       np.r_[plan.anchor_boxes.t, plan.positive_boxes.t].tolist()))
        fresh = [k for k in sorted(keys - seen) if index.fovs.experiment.iloc[k[0]] == "b"]
        if step >= 1 and fresh:
            target = (step, *fresh[0])
            break
        seen |= keys
    assert target is not None
    _, fov, t = target
    folder = Path(index.fovs.url[fov][len("file://"):])
    victim = folder / "c" / str(t) / "0" / "0" / "0" / "0"
    good = victim.read_bytes()
    _corrupt(victim, "garbage")
    before = tree_hash(tmp_path)

    received = []
    loader = _loader(index)
    with pytest.raises(Exception, match=rf"Experiment 'b', FOV A/1/0, t={t}"):
        for batch in loader:
            received.append(_ids(batch))
    assert tree_hash(tmp_path) == before
    assert received == [c[0] for c in clean[: len(received)]]
    state = loader.state_dict()
    assert state["step"] == len(received)
    del loader

    # with "skip" the same epoch completes, with the bad samples replaced and counted
    skipping = _loader(index, on_read_error="skip", max_skip_fraction=0.5)
    assert len(list(skipping)) == len(clean) and skipping.reader.stats.skipped > 0
    assert tree_hash(tmp_path) == before

    victim.write_bytes(good)  # the storage is repaired: a new loader resumes where the old one stopped
    resumed = _loader(index)
    resumed.load_state_dict(state)
    rest = [(_ids(b), b["anchor"].numpy()) for b in resumed]
    assert [r[0] for r in rest] == [c[0] for c in clean[len(received):]]
    for (_, got), (_, want) in zip(rest, clean[len(received):]):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------- atomic writers
def test_a_writer_killed_halfway_leaves_nothing_at_the_destination(tmp_path):
    dest = tmp_path / "out" / "demo"
    code = (
        "import sys; from dali_pipeline.datasets.synthetic import write_synthetic, benchmark_spec;"
        "write_synthetic(sys.argv[1], benchmark_spec(n_fovs=64, t=16, z=4, yx=256, dtype='uint16'), progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(dest)], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until chunks are being written
            temps = list(dest.parent.glob(".demo.*.tmp")) if dest.parent.exists() else []
            if temps and any(p.is_file() for p in temps[0].rglob("*")) and len(list(temps[0].rglob("*"))) > 50:
                break
            assert proc.poll() is None, "the writer finished before it could be killed: make the spec larger"
            time.sleep(0.01)
        else:
            raise AssertionError("the writer never started writing")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not dest.exists()
    # what remains is the hidden temporary folder beside the destination (documented in the README)
    assert all(p.name.startswith(".demo.") and p.name.endswith(".tmp") for p in dest.parent.iterdir())


# ---------------------------------------------------------------------------- slow storage
class _SlowCountingHandler(http.server.SimpleHTTPRequestHandler):
    delay_s = 0.05
    requests: list[str]  # set per server
    lock: threading.Lock

    def log_message(self, *args):
        pass

    def _record(self) -> None:
        with self.lock:
            self.requests.append(self.path)
        time.sleep(self.delay_s)

    def do_GET(self):
        self._record()
        super().do_GET()

    def do_HEAD(self):
        self._record()
        super().do_HEAD()


def slow_server(root: Path, delay_s: float = 0.05):
    """A ThreadingHTTPServer on 127.0.0.1 serving `root`, delaying each response; (server, requests)."""
    requests: list[str] = []
    handler = type("Handler", (_SlowCountingHandler,), dict(delay_s=delay_s, requests=requests,
                                                           lock=threading.Lock()))
    server_class = type("Server", (http.server.ThreadingHTTPServer,), {"request_queue_size": 256})  # no dropped SYNs
    server = server_class(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, requests


def _chunk_paths(reader: PatchReader, plan, base: str) -> list[str]:
    """URL paths of the (zarr v2, '/'-separated) chunks a plan reads, each once."""
    chunks = np.unique(np.concatenate([reader._chunks_touched(plan.anchor_boxes),
                                       reader._chunks_touched(plan.positive_boxes)]), axis=0)
    out = []
    for fov, *key in chunks.tolist():
        url = reader.index.fovs.url.iloc[fov].rstrip("/")
        out.append(url[len(base):] + "/" + "/".join(map(str, key)))
    return out


def test_read_ahead_requests_the_next_steps_while_one_is_consumed(tmp_path):
    pytest.importorskip("nvidia.dali")
    yaml_path = collection(tmp_path, version="0.4", chunks=(1, 1, 1, 32, 32))
    before = tree_hash(tmp_path)
    server, requests = slow_server(tmp_path)
    k = 3
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        remote = tmp_path.parent / f"{tmp_path.name}-remote.yml"
        remote.write_text(yaml_path.read_text().replace(f"data_path: {tmp_path}", f"data_path: {base}"))
        index = LineageIndex.build(ExperimentRegistry.from_yaml(remote, z_window=2), IndexConfig(patch_yx=(32, 32)),
                                   progress=False)
        loader = _loader(index, read_ahead=k, prefetch=1)
        n_steps = len(loader)
        assert n_steps >= k + 2
        per_step = [_chunk_paths(loader.reader, loader.sampler.plan(s, 0), base) for s in range(n_steps)]
        chunk_paths = {p for paths in per_step for p in paths}
        first_seen: list[int] = []
        for i, _ in enumerate(loader):
            # every chunk of steps i+1..i+k has been requested (tensorstore shares one request among
            # concurrent reads of a chunk, so count chunks requested, not repeats)
            want = {p for s in range(i + 1, min(i + k + 1, n_steps)) for p in per_step[s]}
            deadline = time.monotonic() + 10  # a request issued by tensorstore may still be on the wire
            while True:
                made = set(requests) & chunk_paths  # requests: appended by handler threads
                if want <= made or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert want <= made, (f"while step {i} was consumed, chunks of steps {i + 1}..{i + k} were not "
                                  f"requested: {sorted(want - made)[:5]}")
            # and nothing beyond what DALI's queue (prefetch=1) and the read-ahead can hold was read
            beyond = set().union(*per_step[i + k + 3:]) - set().union(*per_step[: i + k + 3]) if i + k + 3 < n_steps \
                else set()
            assert not (beyond & made), f"while step {i} was consumed, steps past {i + k + 2} were already read"
            first_seen.append(len(made))
        assert first_seen == sorted(first_seen) and len(first_seen) == n_steps
    finally:
        server.shutdown()
    assert tree_hash(tmp_path) == before


# ---------------------------------------------------------------------------- bounded memory
def _in_flight(loader) -> tuple[list[tuple[int, int]], list]:
    """Record (plans, bytes) read and not yet handed to DALI at each submit of the loader's feed."""
    record, feed, submit = [], loader.feed, loader.reader.submit

    def counting(plan):
        pending = submit(plan)
        record.append((len(feed._pending) + 1, sum(p.nbytes for p in feed._pending.values()) + pending.nbytes))
        return pending

    loader.reader.submit = counting
    return record, [(_ids(b)) for b in loader]


def test_budget_bytes_counts_dalis_queue_before_the_read_ahead(tmp_path):
    pytest.importorskip("nvidia.dali")
    from dali_pipeline.loader import TripletLoader

    index = build(tmp_path, version="0.5", chunks=(1, 1, 3, 64, 64))
    before = tree_hash(tmp_path)
    batch, prefetch, depth = 4, 2, 4

    def loader(**options):
        return TripletLoader(index, TripletSampler(index, batch, seed=3), device="cpu", prefetch=prefetch,
                             read_ahead=depth, **options)

    # one step: anchors and positives, 2 channels x 2x32x32, read as uint16, delivered as float32
    read, output = 2 * batch * 2 * (2 * 32 * 32) * 2, 2 * batch * 2 * (2 * 32 * 32) * 4
    assert read == PatchReader(index).plan_bytes(TripletSampler(index, batch, seed=3).plan(0, 0))
    free = loader()
    queue = (prefetch + 2) * read + prefetch * output  # the feed keeps prefetch + 2 steps' arrays for DALI
    assert free.queue_bytes == queue and free.feed.budget_bytes is None
    record, clean = _in_flight(free)
    assert len(clean) > depth + 2 and max(n for n, _ in record) == depth + 1  # unbounded: the step + read_ahead

    for plans in (3, 1):  # what is left after DALI's queue holds `plans` steps' reads, the one being read included
        bounded = loader(budget_bytes=queue + plans * read)
        assert bounded.feed.budget_bytes == plans * read
        record, got = _in_flight(bounded)
        assert got == clean
        assert max(n for n, _ in record) == plans
        assert all(nbytes <= plans * read for _, nbytes in record)
    # counted without DALI's queue, queue + read would have let the whole read_ahead through
    assert (queue + read) // read >= depth + 1

    with pytest.raises(ValueError, match=rf"budget_bytes={queue + read - 1:,} cannot hold DALI's queue and one "
                                         rf"step's reads: the minimum is {queue + read:,} bytes = 4 x {read:,} B of "
                                         rf"patches kept for DALI \(prefetch \+ 2, uint16\) \+ 2 x {output:,} B"):
        loader(budget_bytes=queue + read - 1)
    assert tree_hash(tmp_path) == before


# ---------------------------------------------------------------------------- hostile input
PYTHON_TAG = "tag:yaml.org,2002:python/object/apply:os.system"


def test_yaml_is_loaded_safely(tmp_path, capsys):
    from dali_pipeline.cli import main

    marker = tmp_path / "pwned"
    top = tmp_path / "top.yml"
    top.write_text(f'experiments: !!python/object/apply:os.system ["touch {marker}"]\n')
    inner = tmp_path / "inner.yml"  # the tag where a path goes
    inner.write_text("experiments:\n  - name: a\n"
                     f'    data_path: !!python/object/apply:os.system ["touch {marker}"]\n'
                     "    tracks_path: t\n    channels: {p: P}\n    perturbation_wells: {mock: [A/1]}\n"
                     "    interval_minutes: 30\n")
    for evil in (top, inner):
        # the library's error names the file, the line and the tag (the YAML error chained)
        with pytest.raises(CollectionError, match=re.escape(f"{evil}: not valid YAML at line ") + ".*"
                           + re.escape(PYTHON_TAG)) as raised:
            ExperimentRegistry.from_yaml(evil)
        assert isinstance(raised.value.__cause__, yaml.constructor.ConstructorError)
        # the CLI says which file, where, and why, in one line (exit code 2)
        assert main(["index", str(evil)]) == 2
        err = capsys.readouterr().err
        assert f"{evil}: not valid YAML at line" in err and PYTHON_TAG in err
    assert not marker.exists()


# shell syntax, '~' and environment variables: none is run or expanded (only ${datasets_root} is replaced)
SHELL_LIKE = ["$(touch pwned)/a.zarr", "`touch pwned`/a.zarr", "a.zarr; touch pwned", "a.zarr && touch pwned",
              "a.zarr | touch pwned", "~/a.zarr", "$HOME/a.zarr", "${HOME}/a.zarr"]


def _home_experiment(tmp_path: Path, monkeypatch) -> dict:
    """A real plate at $HOME/a.zarr (HOME set to a temporary folder): expanding '~' or $HOME would find it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # a command that ran would leave tmp_path/pwned
    return make_experiment(home, "a", {"A/1/0": tracks_table(track_rows(0, range(6)))}, ["P"], {"p": "P"},
                           shape=(1, 32, 32), n_t=6)


def _no_side_effects(tmp_path: Path, coll: Path) -> None:
    assert not list(tmp_path.rglob("pwned")), "a path in the collection was run as a command"
    assert [p.name for p in coll.iterdir()] == ["collection.yml"], "resolving paths created files"


@pytest.mark.parametrize("key", ["data_path", "tracks_path"])
def test_odd_paths_are_taken_literally_never_expanded_nor_run(tmp_path, monkeypatch, key):
    real = _home_experiment(tmp_path, monkeypatch)
    coll = tmp_path / "coll"
    coll.mkdir()
    shell_like = SHELL_LIKE + [f"{tmp_path}/$(touch pwned)/a.zarr"]  # absolute: kept as given
    if key == "tracks_path":
        shell_like = [p.replace("a.zarr", "a_tracks") for p in shell_like]
    for raw in shell_like:
        resolved = raw if raw.startswith("/") else os.path.normpath(os.path.join(coll, raw))
        path = write_collection(coll, [dict(real, **{key: raw})])
        if key == "data_path":
            with pytest.raises(ValueError, match=re.escape(f"{path}: experiments[0] (name 'a').data_path: does not "
                                                           f"exist: {resolved}")):
                ExperimentRegistry.from_yaml(path)
        else:  # the registry reports the literal folder; the index build says it holds no CSV
            registry = ExperimentRegistry.from_yaml(path)
            assert registry["a"].tracks_path == resolved
            assert registry.describe().tracks_path.tolist() == [resolved]
            with pytest.raises(FileNotFoundError, match=re.escape(f"No tracking CSV in file://{resolved}/A/1/0/")):
                LineageIndex.build(registry, IndexConfig(patch_yx=(16, 16)), progress=False)
    _no_side_effects(tmp_path, coll)
    # the same values are fine once ${datasets_root} (the one documented substitution) names the folder
    path = write_collection(coll, [dict(real, **{key: "${datasets_root}/" + Path(real[key]).name})])
    doc = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**doc, "datasets_root": os.environ["HOME"]}))
    assert getattr(ExperimentRegistry.from_yaml(path)["a"], key) == real[key]


def test_a_folder_named_like_shell_code_is_read_as_that_folder_and_reported(tmp_path, monkeypatch):
    _home_experiment(tmp_path, monkeypatch)
    odd = tmp_path / "coll" / "$(touch pwned) `touch pwned`; touch pwned ~ $HOME ${HOME}"
    odd.mkdir(parents=True)
    e = make_experiment(odd, "b", {"A/1/0": tracks_table(track_rows(0, range(6)), track_rows(1, range(6), y=12.0))},
                        ["P"], {"p": "P"}, shape=(1, 64, 64), n_t=6)
    e.update(data_path=f"{odd.name}/b.zarr", tracks_path=f"{odd.name}/b_tracks")  # relative to the YAML's folder
    path = write_collection(odd.parent, [e])
    before = tree_hash(odd)
    registry = ExperimentRegistry.from_yaml(path)
    report = registry.describe()
    assert report.to_dict("records") == [dict(experiment="b", data_path=str(odd / "b.zarr"),
                                              tracks_path=str(odd / "b_tracks"),
                                              data_url=f"file://{odd}/b.zarr/", fovs=1)]
    index = LineageIndex.build(registry, IndexConfig(patch_yx=(16, 16)), progress=False)
    plan = make_plan(index, index.valid, np.random.default_rng(0))
    got = PatchReader(index).read(plan)
    want = pixels("b", "A/1/0", (6, 1, 1, 64, 64), "uint16")
    for i, (t, y, x) in enumerate(zip(plan.anchor_boxes.t, plan.anchor_boxes.y, plan.anchor_boxes.x)):
        np.testing.assert_array_equal(got.anchor[i], want[t][:, :, y:y + 16, x:x + 16])
    assert tree_hash(odd) == before
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.parametrize("name", ["p%41q", "p?q", "p#q"])
def test_a_local_path_with_url_characters_is_read_from_that_folder(tmp_path, name):
    # "p%41q" must not open as the file:// URL of "pAq", nor "p?q" as "p": each folder holds other pixels
    for folder, exp in ((name, "a"), ("pAq", "b"), ("p", "c")):
        (tmp_path / folder).mkdir()
        e = make_experiment(tmp_path / folder, exp, {"A/1/0": tracks_table(track_rows(0, range(6), y=16, x=16))},
                            ["P"], {"p": "P"}, shape=(1, 32, 32), n_t=6)
        for suffix in (".zarr", "_tracks"):  # the same names in every folder, other pixels
            os.rename(tmp_path / folder / f"{exp}{suffix}", tmp_path / folder / f"a{suffix}")
        if folder == name:
            mine = dict(e, data_path=str(tmp_path / folder / "a.zarr"), tracks_path=str(tmp_path / folder / "a_tracks"))
    index = LineageIndex.build(ExperimentRegistry.from_yaml(write_collection(tmp_path, [mine])),
                               IndexConfig(patch_yx=(16, 16)), progress=False)
    plan = make_plan(index, index.valid, np.random.default_rng(0))
    got = PatchReader(index).read(plan)
    want = pixels("a", "A/1/0", (6, 1, 1, 32, 32), "uint16")
    for i, (t, y, x) in enumerate(zip(plan.anchor_boxes.t, plan.anchor_boxes.y, plan.anchor_boxes.x)):
        np.testing.assert_array_equal(got.anchor[i], want[t][:, :, y:y + 16, x:x + 16])


def test_a_million_row_csv_with_garbage_in_one_column_names_the_row():
    n = 1_000_000
    rng = np.random.default_rng(0)
    y = pa.array(np.round(rng.uniform(0, 512, n), 2)).cast(pa.string()).to_numpy(zero_copy_only=False)
    y[777_777] = "12,5px"
    table = pa.table({"track_id": np.arange(n) // 50, "t": np.arange(n) % 50, "y": y, "x": np.full(n, 100.5),
                      "parent_track_id": np.full(n, -1)})
    sink = io.BytesIO()
    pacsv.write_csv(table, sink)
    raw = sink.getvalue()
    with pytest.raises(ValueError, match=r"big\.csv: column 'y' has .* at data row 777778"):
        parse_tracks("big.csv", raw)


def test_patch_and_chunk_bounds_refuse_before_reading(tmp_path):
    index = build(tmp_path, version="0.5", chunks=(1, 1, 3, 64, 64))
    patch = 2 * 2 * 32 * 32 * 2  # C x Z x Y x X x uint16
    PatchReader(index, max_patch_bytes=patch)
    with pytest.raises(ValueError, match=rf"Experiment 'a': a patch of 2 channels x 2x32x32 \(ZYX\) x 2 B is "
                                         rf"{patch:,} bytes, over max_patch_bytes={patch - 1:,}"):
        PatchReader(index, max_patch_bytes=patch - 1)
    chunk = 3 * 64 * 64 * 2
    with pytest.raises(ValueError, match=rf"Experiment 'a', FOV A/1/0: chunk shape 1x1x3x64x64 \(TCZYX\) is "
                                         rf"{chunk:,} bytes, over max_chunk_bytes=1,000"):
        PatchReader(index, max_chunk_bytes=1000)
    pytest.importorskip("nvidia.dali")
    with pytest.raises(ValueError, match="over max_patch_bytes"):
        _loader(index, max_patch_bytes=1000)


def test_tracks_outside_the_image_are_dropped_and_an_fov_with_none_inside_is_an_error(tmp_path):
    inside = tracks_table(track_rows(1, range(0, 6), y=30.0, x=30.0), track_rows(2, range(0, 6), y=500.0, x=30.0))
    outside = tracks_table(track_rows(1, range(0, 6), y=300.0, x=300.0))
    a = make_experiment(tmp_path, "a", {"A/1/0": inside}, ["GFP"], {"gfp": "GFP"}, shape=(1, 64, 64), n_t=6)
    index = LineageIndex.build(ExperimentRegistry.from_yaml(write_collection(tmp_path, [a], ["gfp"])),
                               IndexConfig(patch_yx=(16, 16)), progress=False)
    assert int(index.fovs.dropped_outside.iloc[0]) == 6 and len(index) == 6
    root = tmp_path / "bad"
    root.mkdir()
    b = make_experiment(root, "b", {"A/1/0": outside}, ["GFP"], {"gfp": "GFP"}, shape=(1, 64, 64), n_t=6)
    with pytest.raises(ValueError, match=r"Experiment 'b', FOV A/1/0: all 6 rows of its tracks CSV lie outside"):
        LineageIndex.build(ExperimentRegistry.from_yaml(write_collection(root, [b], ["gfp"])),
                           IndexConfig(patch_yx=(16, 16)), progress=False)


@pytest.mark.parametrize("value, why", [("9223372036854775808", "beyond int64"), ("-9223372036854775809", "beyond int64"),
                                        ("18446744073709551616", "beyond int64")])
def test_a_track_id_beyond_int64_is_refused_naming_the_csv_row_and_column(value, why):
    raw = f"track_id,t,y,x,parent_track_id\n1,0,1,1,-1\n{value},1,2,2,1\n".encode()
    with pytest.raises(ValueError, match=rf"^tracks\.csv: column 'track_id' has .* at data row 2, {why}"):
        parse_tracks("tracks.csv", raw)
    # the same in parent_track_id; int64's last value still reads exactly
    raw = f"track_id,t,y,x,parent_track_id\n1,0,1,1,-1\n2,1,2,2,{value}\n".encode()
    with pytest.raises(ValueError, match=rf"^tracks\.csv: column 'parent_track_id' has .* at data row 2, {why}"):
        parse_tracks("tracks.csv", raw)
    top = parse_tracks("tracks.csv", b"track_id,t,y,x\n1,0,1,1\n9223372036854775807,1,2,2\n")
    assert top["track_id"].tolist() == [1, 2**63 - 1]


def test_ids_float64_cannot_hold_are_refused_not_merged():
    # a missing entry makes pyarrow read the column as float64: 2^53 + 1 would become 2^53, another track's id
    raw = b"track_id,t,y,x,parent_track_id\n9007199254740992,0,1,1,\n9007199254740994,0,2,2,9007199254740993\n"
    with pytest.raises(ValueError, match=r"column 'parent_track_id' has .* at data row 2, too large to read exactly"):
        parse_tracks("tracks.csv", raw)
