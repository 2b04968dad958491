"""Remote reads are bounded: a local HTTP server that refuses, stalls, resets or answers 503 first.

Every failure must come within the configured deadline (small here) with a message naming the URL
and the experiment; transient 503s are retried and the pixels then equal what was written.
"""

from __future__ import annotations

import functools
import http.server
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import yaml

from builders import expected_patches, make_experiment, track_rows, tracks_table, write_collection
from dali_pipeline import PatchReader, PatchReadError
from sampler import CollectionError, ExperimentRegistry, IndexConfig, LineageIndex, make_plan
from sampler.kvstore import RemoteLimits, RemoteReadError

#: small limits so that every failing case ends in about two seconds
FAST = dict(timeout_s=2, retries=3, retry_delay_s=0.05, retry_max_delay_s=0.2)
#: slack on top of the deadline for a loaded test machine (the default deadline is 30 s, 11 min before)
SLACK_S = 3.0


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files, or misbehaves as `server.mode` says: "stall", "reset", or 503 for `server.failures` requests."""

    server: "_Server"

    def log_message(self, *args: Any) -> None:
        pass

    def handle_one_request(self) -> None:
        mode = self.server.mode
        if mode == "reset":
            self.rfile.readline()  # the request line arrived; answer with a TCP reset
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if mode == "stall":
            self.rfile.readline()
            self.server.released.wait(30)  # accepted, never answered (until the test ends)
            self.close_connection = True
            return
        super().handle_one_request()

    def send_head(self):  # type: ignore[no-untyped-def]
        with self.server.lock:
            fail = self.server.failures > 0
            self.server.failures -= fail
        if fail:
            self.server.answered_503 += 1
            self.send_error(503, "busy")
            return None
        return super().send_head()

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:  # the socket was reset on purpose
            pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # tensorstore opens many connections at once (socketserver's 5 drops SYNs: 1 s waits)

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.mode = "serve"
        self.failures = 0
        self.answered_503 = 0
        self.lock = threading.Lock()
        self.released = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    srv = _Server(tmp_path)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.released.set()
        srv.shutdown()
        srv.server_close()


def remote_collection(root: Path, base: str, remote: dict[str, Any] | None = None,
                      experiment_remote: dict[str, Any] | None = None) -> Path:
    """One experiment 'a' whose plate is served at `base` (tracks stay local), with `remote:` limits."""
    cells = tracks_table(track_rows(1, range(0, 6), y=30.0, x=33.0), track_rows(2, range(0, 6), y=40.0, x=20.0))
    entry = make_experiment(root, "a", {"A/1/0": cells}, ["GFP"], {"gfp": "GFP"}, shape=(2, 64, 64), n_t=6,
                            version="0.5", chunks=(1, 1, 1, 32, 32))
    entry["data_path"] = f"{base}/a.zarr"
    if experiment_remote is not None:
        entry["remote"] = experiment_remote
    path = write_collection(root, [entry], labels=["gfp"])
    doc = yaml.safe_load(path.read_text())
    if remote is not None:
        doc["remote"] = remote
    path.write_text(yaml.safe_dump(doc))
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(yaml_path: Path) -> LineageIndex:
    registry = ExperimentRegistry.from_yaml(yaml_path, z_window=2)
    return LineageIndex.build(registry, IndexConfig(patch_yx=(16, 16)), progress=False)


@pytest.mark.parametrize("mode", ["refuse", "stall", "reset"])
def test_a_store_that_refuses_stalls_or_resets_fails_within_the_deadline(tmp_path, server, mode):
    base = f"http://127.0.0.1:{closed_port()}" if mode == "refuse" else server.url
    server.mode = mode
    path = remote_collection(tmp_path, base, remote=FAST)
    start = time.monotonic()
    with pytest.raises(RemoteReadError) as caught:
        ExperimentRegistry.from_yaml(path, z_window=2)
    elapsed = time.monotonic() - start
    message = str(caught.value)
    assert message.startswith("Experiment 'a': ") and f"{base}/a.zarr/zarr.json" in message
    if mode == "stall":  # tensorstore's own stall detection is 10 s: our deadline ends the wait
        assert "no answer within remote timeout_s=2 s" in message and elapsed >= FAST["timeout_s"]
    else:  # refused and reset connections are retried, then reported
        assert "retr" in message and "reachable" in message
    assert elapsed < FAST["timeout_s"] + SLACK_S


def test_503s_are_retried_and_then_the_pixels_are_those_written(tmp_path, server):
    server.failures = 3
    index = build(remote_collection(tmp_path, server.url, remote=FAST))
    assert server.answered_503 == 3
    assert index.fovs.url.str.startswith(server.url).all()
    plan = make_plan(index, index.valid, np.random.default_rng(0))
    server.failures = 2  # the reader's reads are retried too
    got = PatchReader(index).read(plan)
    assert server.answered_503 == 5
    np.testing.assert_array_equal(got.anchor, expected_patches(index, plan.anchor_boxes))
    np.testing.assert_array_equal(got.positive, expected_patches(index, plan.positive_boxes))


def test_the_reader_bounds_a_stall_by_the_collection_limits_or_its_option(tmp_path, server):
    # the experiment's own `remote:` keys win over the collection's
    path = remote_collection(tmp_path, server.url, remote=dict(FAST, timeout_s=60), experiment_remote={"timeout_s": 2})
    index = build(path)
    plan = make_plan(index, index.valid[:4], np.random.default_rng(1))
    opened = PatchReader(index)
    opened.read(plan)  # its store is open: the stall hits the step's pixel reads
    url = f"{server.url}/a.zarr/A/1/0/0/"
    server.mode = "stall"
    cases = (  # (reader, its deadline, where the message names the store)
        (opened, 2, f"Experiment 'a', FOV A/1/0 ({url}): the step's reads got no complete answer"),
        # the reader option wins over the index's limits; the stall hits opening the store
        (PatchReader(index, remote=RemoteLimits(timeout_s=1.5)), 1.5, f"Experiment 'a', FOV A/1/0: cannot open {url}"),
    )
    for reader, timeout, where in cases:
        start = time.monotonic()
        with pytest.raises(PatchReadError) as caught:
            reader.read(plan)
        elapsed = time.monotonic() - start
        assert str(caught.value).startswith(where)
        assert f"remote timeout_s={timeout:g} s" in str(caught.value)
        assert timeout <= elapsed < timeout + SLACK_S


def test_remote_limits_are_validated_naming_the_field():
    assert RemoteLimits().timeout_s == 30 and RemoteLimits().retries == 4
    limits = RemoteLimits(timeout_s=5, retries=0)
    assert limits.context_spec()["http_request_retries"] == {"max_retries": 0, "initial_delay": "0.5s",
                                                             "max_delay": "4.0s"}
    for bad, match in (({"timeout_s": 0}, "timeout_s must be a positive number"),
                       ({"timeout_s": "30"}, "timeout_s must be a positive number"),
                       ({"timeout_s": float("inf")}, "timeout_s must be a positive number"),
                       ({"retries": 1.5}, "retries must be a whole number"),
                       ({"retries": True}, "retries must be a whole number"),
                       ({"retry_delay_s": 5}, r"retry_max_delay_s \(4.0\) must be >= retry_delay_s \(5\)")):
        with pytest.raises(ValueError, match=match):
            RemoteLimits(**bad)


@pytest.mark.parametrize("where, remote, match", [
    ("experiment", {"retries": -1}, r"experiments\[0\] \(name 'a'\)\.remote\.retries: .*>= 0"),
    ("experiment", {"timeout": 5}, r"experiments\[0\] \(name 'a'\)\.remote.*timeout.*did you mean 'timeout_s'"),
    ("collection", {"timeout_s": True}, r"remote\.timeout_s"),
    ("collection", 30, r"remote"),
    ("experiment", {"retry_delay_s": 5}, r"experiments\[0\] \(name 'a'\)\.remote: .*retry_max_delay_s \(4.0\) must be >= "),
])
def test_a_bad_remote_entry_in_the_yaml_names_the_file_and_field(tmp_path, where, remote, match):
    options = {"remote": remote} if where == "collection" else {"experiment_remote": remote}
    path = remote_collection(tmp_path, "http://127.0.0.1:9", **options)
    with pytest.raises(CollectionError, match=match) as caught:
        ExperimentRegistry.from_yaml(path)
    assert str(caught.value).startswith(str(path))


def test_the_chunk_cache_bounds_a_stall_and_forgets_the_reads(tmp_path, server):
    from dali_pipeline.cached_reader import CachedPatchReader, ChunkStore

    index = build(remote_collection(tmp_path, server.url, remote=FAST))
    t = index.column("t")
    first = make_plan(index, np.flatnonzero(t == 0)[:2], None, predict=True)
    # a step with a cached chunk (t=0) and chunks to read (t=3)
    later = make_plan(index, np.concatenate([np.flatnonzero(t == 0)[:1], np.flatnonzero(t == 3)[:2]]), None,
                      predict=True)
    chunks = ChunkStore(1 << 26)
    reader = CachedPatchReader(index, store=chunks)
    np.testing.assert_array_equal(reader.read(first).anchor, expected_patches(index, first.anchor_boxes))
    server.mode = "stall"  # the store is open; the chunks of t=3 are not cached
    hits = chunks.cache.stats.hits
    start = time.monotonic()
    with pytest.raises(PatchReadError, match=r"Experiment 'a', FOV A/1/0 \(http://.*\): the step's reads got no "
                                             r"complete answer within remote timeout_s=2 s"):
        reader.read(later)
    assert time.monotonic() - start < FAST["timeout_s"] + SLACK_S
    assert chunks.cache.stats.hits > hits  # the t=0 chunk came from the cache
    assert chunks.inflight == {} and chunks.pins == {}  # a later plan reads them again
