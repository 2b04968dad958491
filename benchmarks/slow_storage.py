"""Slow storage: the CPU TripletLoader over HTTP with 50 ms per response, and a fake 60 ms training step.

    python benchmarks/slow_storage.py                  # results under benchmarks/results/slow_storage/
    python benchmarks/slow_storage.py --read-ahead 4 --steps 30

A ThreadingHTTPServer on 127.0.0.1 serves the synthetic demo collection, sleeping `--delay-ms` before
each response and counting requests. Three runs, each on a fresh loader after one untimed warm-up
epoch: reading alone (R: iterate, no step), the training step alone (S = steps x 60 ms), and both
(T: a 60 ms sleep per batch). With read-ahead the reads of later steps overlap the step, so T should
be close to max(R, S), not R + S. A run with read_ahead=0 and DALI prefetch 1 is the contrast.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import http.server
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = HERE / "results" / "slow_storage"


class _SlowHandler(http.server.SimpleHTTPRequestHandler):
    delay_s = 0.05
    counter: list[int]

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.counter[0] += 1  # approximate under threads; only reported
        time.sleep(self.delay_s)
        spec = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not spec or not path.is_file():
            super().do_GET()
            return
        # byte ranges (sharded zarr reads the shard index as a suffix range): bytes=a-b, a-, -n
        data = path.read_bytes()
        first, _, last = spec.split("=", 1)[1].split(",")[0].strip().partition("-")
        size = len(data)
        start, stop = (size - int(last), size) if not first else (int(first), int(last) + 1 if last else size)
        start, stop = max(0, start), min(size, stop)
        if start >= stop:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        self.wfile.write(data[start:stop])


def serve(root: Path, delay_s: float):
    counter = [0]
    handler = type("Handler", (_SlowHandler,), dict(delay_s=delay_s, counter=counter))
    server_class = type("Server", (http.server.ThreadingHTTPServer,), {"request_queue_size": 256})  # no dropped SYNs
    server = server_class(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, counter


def remote_yaml(local_yaml: Path, base: str, out: Path) -> Path:
    """The collection with each data_path served over HTTP (tracks stay local)."""
    doc = yaml.safe_load(local_yaml.read_text())
    for exp in doc["experiments"]:
        exp["data_path"] = f"{base}/{exp['data_path']}"
        exp["tracks_path"] = str((local_yaml.parent / exp["tracks_path"]).resolve())
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def spec():
    """The demo collection stored as NGFF 0.4 with one chunk per (t, c) volume: one request per chunk."""
    import dataclasses

    from dali_pipeline.datasets.synthetic import demo_spec

    demo = demo_spec()
    exps = tuple(dataclasses.replace(e, version="0.4", chunks=(1, 1, *e.zyx), shards=None) for e in demo.experiments)
    return dataclasses.replace(demo, experiments=exps)


def run_epoch(loader, epoch: int, steps: int, step_s: float) -> float:
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        float(batch["anchor"][0, 0, 0, 0, 0])  # the batch is there
        if step_s:
            time.sleep(step_s)  # the fake training step
        if i + 1 == steps:
            break
    return time.perf_counter() - t0


def measure(index, steps: int, step_s: float, read_ahead: int, prefetch: int, batch: int) -> float:
    from dali_pipeline.loader import TripletLoader
    from sampler import TripletSampler

    loader = TripletLoader(index, TripletSampler(index, batch, seed=0), device="cpu", read_ahead=read_ahead,
                           prefetch=prefetch)
    run_epoch(loader, 0, steps, 0.0)  # warm-up: opens the stores (metadata requests), builds the pipeline
    return run_epoch(loader, 1, steps, step_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--step-ms", type=float, default=60.0)
    parser.add_argument("--read-ahead", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="steps per timed epoch (at most an epoch)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from dali_pipeline.datasets.synthetic import write_synthetic
    from sampler import ExperimentRegistry, IndexConfig, LineageIndex

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data" / "demo-whole-volume-chunks"
    local_yaml = data / "collection.yml"
    if not local_yaml.exists():
        local_yaml = write_synthetic(data, spec(), progress=False)
    server, counter = serve(data, args.delay_ms / 1000)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        remote = remote_yaml(local_yaml, base, args.out / "remote.yml")
        index = LineageIndex.build(ExperimentRegistry.from_yaml(remote), IndexConfig(patch_yx=(32, 32)),
                                   progress=False)
        step_s = args.step_ms / 1000
        from sampler import TripletSampler

        steps = min(args.steps, len(TripletSampler(index, args.batch, seed=0)))
        before = counter[0]
        read = measure(index, steps, 0.0, args.read_ahead, 2, args.batch)
        requests = counter[0] - before
        step_only = steps * step_s
        both = measure(index, steps, step_s, args.read_ahead, 2, args.batch)
        serial = measure(index, steps, step_s, 0, 1, args.batch)
    finally:
        server.shutdown()
    result: dict[str, Any] = dict(
        delay_ms=args.delay_ms, step_ms=args.step_ms, steps=steps, batch=args.batch, read_ahead=args.read_ahead,
        requests_per_step=requests / (2 * steps), read_s=read, step_s=step_only, epoch_s=both,
        max_read_step_s=max(read, step_only), sum_read_step_s=read + step_only, epoch_no_read_ahead_s=serial,
        overlap=(read + step_only - both) / min(read, step_only),
    )
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"slow_storage-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"{steps} steps of batch {args.batch}, {args.delay_ms:g} ms per HTTP response, "
          f"~{result['requests_per_step']:.0f} requests per step, fake step {args.step_ms:g} ms")
    print(f"  read alone (R)                      {read:6.2f} s")
    print(f"  step alone (S)                      {step_only:6.2f} s")
    print(f"  loader + step, read_ahead={args.read_ahead}         {both:6.2f} s   "
          f"(max(R, S) = {result['max_read_step_s']:.2f} s, R + S = {result['sum_read_step_s']:.2f} s)")
    print(f"  loader + step, read_ahead=0, prefetch=1  {serial:6.2f} s")
    print(f"  overlap (R + S - T) / min(R, S) = {result['overlap']:.2f}  (1 = fully hidden, 0 = serial)")
    print(f"saved {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
