"""`dynaclr-dali`: the command line.

  demo               train a small encoder with NT-Xent on the built-in dataset (the main job)
  index              build a collection's lineage index, print its summary, plot lineage trees
  preview            a labelled montage of anchor/positive pairs of a collection
  convert-ctc        a Cell Tracking Challenge sequence into a collection
  import-cell-index  the reference's cell-index parquet into a collection (lineages verified)
  make-synthetic     write a seeded synthetic collection (small, medium, large)
  bench              DALI loader vs raw read ceiling vs torch DataLoader on the same plans

Exit codes: 0 on success, 2 on bad input (one line on stderr naming the file, FOV, row or
experiment and how to fix it; `--debug` shows the traceback), 1 when the environment lacks
something (DALI).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import yaml

from sampler.atomic import JSON_REPORT, PNG, INDEX_NPZ, FileKind, atomic_output, check_target
from sampler import CollectionError, ExperimentRegistry, IndexConfig, LineageIndex

PROG = "dynaclr-dali"


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def cache_dir() -> Path:
    """Where built-in datasets are written once: $DYNACLR_DALI_CACHE or ~/.cache/dynaclr-dali."""
    return Path(os.environ.get("DYNACLR_DALI_CACHE", Path.home() / ".cache" / "dynaclr-dali"))


def demo_collection() -> Path:
    """The built-in demo collection's YAML, written on first use."""
    from dali_pipeline.datasets.synthetic import demo_spec, write_synthetic

    folder = cache_dir() / "demo"
    yaml_path = folder / "collection.yml"
    if not yaml_path.exists():
        print(f"writing the built-in demo dataset to {folder} (once)", file=sys.stderr)
        return Path(write_synthetic(folder, demo_spec(), overwrite=folder.exists()))
    return yaml_path


# ---------------------------------------------------------------------- input checks
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_registry(path: Path, z_window: int | None = None) -> ExperimentRegistry:
    """The registry of a collection YAML. The library's errors name the YAML, the experiment and the field and
    say how to fix them; errors of the Z settings, which name no file, get the YAML's path in front."""
    if not path.is_file():
        raise UsageError(f"{path}: no such collection YAML; pass the path of a collection YAML, or omit it for the "
                         "built-in demo dataset")
    try:
        return ExperimentRegistry.from_yaml(path, z_window=z_window)
    except CollectionError:
        raise
    except ValueError as err:
        raise UsageError(f"{path}: {_one_line(err)}") from None


def check_outputs(outputs: Sequence[tuple[Path | str, FileKind | None]], overwrite: bool) -> None:
    """Refuse existing outputs before any work: unless --overwrite, and even then what this tool did not write.

    Each output is (path, kind): a file of `kind`, or a folder (None) that must carry the marker.
    """
    for path, kind in outputs:
        check_target(path, overwrite, kind, flag="--overwrite")


def _atomic_text(path: Path, text: str, overwrite: bool) -> None:
    with atomic_output(path, overwrite, kind=JSON_REPORT) as tmp, open(tmp, "w") as f:
        f.write(text)


def _index_config(args: argparse.Namespace) -> IndexConfig:
    return IndexConfig(
        patch_yx=tuple(args.patch), max_border_shift=args.max_border_shift, tau_range_hours=tuple(args.tau_hours),
        tau_decay=args.tau_decay, positive_policy=args.policy, channel_mode=args.channel_mode,
        norm_level=None if args.norm_level == "none" else args.norm_level,
    )


def _collection(args: argparse.Namespace) -> Path:
    return Path(args.collection) if args.collection else demo_collection()


def build_index(args: argparse.Namespace) -> tuple[Path, ExperimentRegistry, LineageIndex]:
    collection = _collection(args)
    registry = load_registry(collection, z_window=args.z_window)
    return collection, registry, LineageIndex.build(registry, _index_config(args), threads=args.threads,
                                                    progress=sys.stderr.isatty())


def _no_anchors_message(index: LineageIndex) -> str:
    frames = ", ".join(f"{n} {lo}..{hi}" for n, lo, hi in zip(index.experiments.name, index.exp_tau_min,
                                                                index.exp_tau_max))
    return (f"no valid anchors in {len(index)} observations: no row has a positive under policy "
            f"'{index.config.positive_policy}' at --tau-hours {index.config.tau_range_hours[0]:g} "
            f"{index.config.tau_range_hours[1]:g} (frames per experiment: {frames}; tau = 0 excluded); widen "
            "--tau-hours, or check that tracks last longer than one frame")


def _device(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    from dali_pipeline._dali import gpu_count

    return "gpu" if gpu_count() > 0 and torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    out = Path(args.out)
    outputs = {name: out / name for name in ("pairs.png", "loss.png", "summary.json")}
    check_outputs([(path, JSON_REPORT if name.endswith(".json") else PNG) for name, path in outputs.items()],
                  args.overwrite)
    import torch

    from dali_pipeline.demo import SmallEncoder, to_images, train
    from dali_pipeline.loader import TripletLoader
    from dali_pipeline.plots import loss_figure, pair_labels, pairs_figure, save_png
    from sampler import TripletSampler

    device = _device(args.device)
    t0 = time.perf_counter()
    collection = demo_collection()
    t_data = time.perf_counter() - t0
    registry = load_registry(collection)
    t0 = time.perf_counter()
    index = LineageIndex.build(registry, IndexConfig(patch_yx=(args.patch, args.patch)), progress=False)
    t_index = time.perf_counter() - t0
    sampler = TripletSampler(index, args.batch_size, seed=args.seed, locality_frames=args.locality_frames)
    loader = TripletLoader(index, sampler, device=device, device_id=0 if device == "gpu" else None,
                           z_reduction=args.z_reduction, cache_bytes=args.cache_mb << 20)
    torch.manual_seed(args.seed)
    model = SmallEncoder(index.n_channels, width=args.width)
    torch_device = torch.device("cuda", 0) if device == "gpu" else torch.device("cpu")
    print(f"training a small encoder (NT-Xent, temperature {args.temperature:g}) for {args.steps} steps of "
          f"{args.batch_size} pairs on the DALI {device} pipeline", file=sys.stderr)
    threads = torch.get_num_threads()
    if device == "cpu":  # leave a core to the DALI pipeline's threads: oversubscription costs more than it gives
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    try:
        result = train(loader, model, args.steps, device=torch_device, lr=args.lr, temperature=args.temperature)
    finally:
        torch.set_num_threads(threads)
    start, end = result.loss_ends(10)

    batch = result.last_batch
    meta_a, meta_p = batch["anchor_meta"], batch["positive_meta"]
    labels = pair_labels(meta_a, meta_p)
    crossing = [i for i, lab in enumerate(labels) if lab.division][:3]
    chosen = sorted(crossing + [i for i in range(len(labels)) if i not in crossing][: 8 - len(crossing)])
    anchor = to_images(batch["anchor"]).cpu().numpy()[chosen]
    positive = to_images(batch["positive"]).cpu().numpy()[chosen]
    save_png(pairs_figure(anchor, positive, [labels[i] for i in chosen], index.labels,
                          f"demo: anchor/positive pairs of the last step (batch of {args.batch_size}, "
                          f"Z reduction {loader.spec.z_reduction}, normalized)"), outputs["pairs.png"], args.overwrite)
    save_png(loss_figure(result.losses, f"demo: NT-Xent loss, {args.steps} steps of {args.batch_size} pairs "
                                        f"({start:.2f} -> {end:.2f})"), outputs["loss.png"], args.overwrite)

    manifest_path = collection.parent / "manifest.json"
    on_disk = json.loads(manifest_path.read_text()).get("bytes_on_disk") if manifest_path.exists() else None
    summary = index.summary()
    tau = ", ".join(f"{n} {lo}..{hi}" for n, lo, hi in zip(index.experiments.name, index.exp_tau_min,
                                                            index.exp_tau_max))
    report = dict(
        collection=str(collection), device=device, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
        z_reduction=loader.spec.z_reduction, locality_frames=sampler.options["locality_frames"],
        experiments=len(index.experiments), fovs=len(index.fovs), observations=len(index),
        valid_anchors=len(index.valid), divisions=int(summary.divisions.sum()), bytes_on_disk=on_disk,
        data_seconds=t_data, index_seconds=t_index, train_seconds=result.seconds,
        pairs_per_s=result.pairs_per_s, loader_pairs_per_s=result.loader_pairs_per_s,
        loss_start=start, loss_end=end, losses=result.losses,
        chunk_cache=loader.reader.cache.stats.as_dict() if args.cache_mb else None,
    )
    _atomic_text(outputs["summary.json"], json.dumps(report, indent=1) + "\n", args.overwrite)
    size = f", {on_disk / 1e6:.1f} MB on disk" if on_disk else ""
    print(f"data        {collection}: {len(index.experiments)} experiments, {len(index.fovs)} FOVs, "
          f"{int(summary.tracks.sum())} tracks, {report['divisions']} divisions{size} (ready in {t_data:.1f} s)")
    print(f"index       {len(index)} observations, {len(index.valid)} valid anchors ({index.config.positive_policy}), "
          f"tau frames {tau}, read box (Z, Y, X) {index.read_shape}, built in {t_index:.2f} s")
    print(f"throughput  {result.pairs_per_s:,.0f} pairs/s training end to end; the DALI {device} loader alone "
          f"{result.loader_pairs_per_s:,.0f} pairs/s (pairs per second spent waiting for batches)")
    if args.cache_mb:
        cache = loader.reader.cache
        print(f"chunk cache {cache.nbytes / 1e6:.1f} MB of {args.cache_mb} MiB held, hit rate {cache.stats.hit_rate:.0%}, "
              f"{loader.reader.stats.chunks_decoded} chunks decoded")
    print(f"loss        NT-Xent {start:.3f} (mean of the first 10 steps) -> {end:.3f} (last 10), "
          f"{end / start:.0%} of the start, in {result.seconds:.1f} s")
    print(f"outputs     {outputs['pairs.png']}, {outputs['loss.png']}, {outputs['summary.json']}")


# ---------------------------------------------------------------------- index
def _split_fov(spec: str, index: LineageIndex) -> int:
    """The row of index.fovs named by 'A/1/0' or 'EXPERIMENT/A/1/0'."""
    parts = spec.strip("/").split("/")
    if len(parts) < 3:
        raise UsageError(f"--plot-lineage {spec!r}: name an FOV as ROW/COL/FOV (e.g. A/1/0) or EXPERIMENT/ROW/COL/FOV")
    fov_name, experiment = "/".join(parts[-3:]), "/".join(parts[:-3]) or None
    fovs = index.fovs
    hit = (fovs.fov_name == fov_name) & ((fovs.experiment == experiment) if experiment else True)
    rows = np.flatnonzero(hit.to_numpy())
    known = [f"{e}/{f}" for e, f in zip(fovs.experiment, fovs.fov_name)]
    if len(rows) == 0:
        raise UsageError(f"--plot-lineage {spec!r}: no such FOV in the index; FOVs are {known[:12]}"
                         f"{' ...' if len(known) > 12 else ''}")
    if len(rows) > 1:
        raise UsageError(f"--plot-lineage {spec!r}: FOV {fov_name} is in several experiments "
                         f"{fovs.experiment.to_numpy()[rows].tolist()}; prefix it with one, e.g. "
                         f"{fovs.experiment.iloc[rows[0]]}/{fov_name}")
    return int(rows[0])


def plot_lineage(index: LineageIndex, spec: str, out: Path, overwrite: bool) -> None:
    from dali_pipeline.plots import lineage_figure, save_png
    from sampler.tracks import find_csv, parse_tracks

    f = _split_fov(spec, index)
    row = index.fovs.iloc[f]
    exp = index.experiments[index.experiments.name == row.experiment].iloc[0]
    source, raw = find_csv(exp.tracks_path, row.fov_name)
    cols = parse_tracks(source, raw)
    mine = index.tracks[index.tracks.fov.to_numpy() == f]
    kept_keys = set(zip(mine.track_id.tolist(), mine.t.tolist()))
    kept = np.array([(a, b) in kept_keys for a, b in zip(cols["track_id"].tolist(), cols["t"].tolist())], dtype=bool)
    fig = lineage_figure(cols["track_id"], cols["t"], cols["parent_track_id"], kept,
                         f"{row.experiment} {row.fov_name} ({row.perturbation})")
    save_png(fig, out, overwrite)
    print(f"lineage trees of {row.experiment} {row.fov_name}: {out}")


def cmd_index(args: argparse.Namespace) -> None:
    outputs = ([(args.save, INDEX_NPZ)] if args.save else []) + ([(args.out, PNG)] if args.plot_lineage else [])
    check_outputs(outputs, args.overwrite)
    collection, registry, index = build_index(args)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 120):
        print(f"collection: {collection}")
        print("read from (paths resolved against the YAML's folder; nothing expanded):")
        print(registry.describe().to_string(index=False))
        print(index.summary().to_string(index=False))
        print(f"observations {len(index)}, valid anchors ({index.config.positive_policy}) {len(index.valid)}, "
              f"channels {index.labels if index.config.channel_mode == 'all' else 'bag of ' + str(index.labels)}, "
              f"read box (Z, Y, X) {index.read_shape}, batch dtype {index.batch_dtype}")
    if len(index.valid) == 0:
        raise UsageError(f"{collection}: {_no_anchors_message(index)}")
    if args.save:
        index.save(args.save, overwrite=args.overwrite)
        print(f"saved {args.save} ({os.path.getsize(args.save) / 2**20:.1f} MiB)")
    if args.plot_lineage:
        plot_lineage(index, args.plot_lineage, Path(args.out), args.overwrite)


# ---------------------------------------------------------------------- preview
def cmd_preview(args: argparse.Namespace) -> None:
    from dali_pipeline.plots import PairLabel, pairs_figure, save_png
    from dali_pipeline.reader import PatchReader
    from sampler import TripletSampler

    check_outputs([(args.out, PNG)], args.overwrite)
    collection, _, index = build_index(args)
    if len(index.valid) == 0:
        raise UsageError(f"{collection}: {_no_anchors_message(index)}")
    n = min(args.n, len(index.valid))
    sampler = TripletSampler(index, n, seed=args.seed)
    plan = sampler.plan(args.step % len(sampler), args.step // len(sampler))
    patches = PatchReader(index).read(plan)

    def images(x: np.ndarray, norm: np.ndarray) -> np.ndarray:
        x = x.max(axis=2) if args.z == "max" else x[:, :, x.shape[2] // 2]
        x = x.astype(np.float32)
        return (x - norm[..., 0, None, None]) / (norm[..., 1, None, None] + 1e-8)

    anchor, positive = images(patches.anchor, plan.anchor_norm), images(patches.positive, plan.positive_norm)
    a, p = plan.anchor_rows, plan.positive_rows
    v = index.values
    bag = index.config.channel_mode == "bag"
    labels = [
        PairLabel(experiment=str(e), fov_name=str(fv), lineage=str(lin).rsplit("_", 1)[-1], anchor_track=int(ta),
                  positive_track=int(tp), t_anchor=int(t1), t_positive=int(t2), tau_hours=float(h2) - float(h1),
                  perturbation=str(pert) + (f", {mk}" if bag else ""))
        for e, fv, lin, ta, tp, t1, t2, h1, h2, pert, mk in zip(
            v("experiment", a), v("fov_name", a), v("lineage_id", a), v("track_id", a), v("track_id", p), v("t", a),
            v("t", p), v("hours_post_perturbation", a), v("hours_post_perturbation", p), v("perturbation", a),
            v("marker", a) if bag else [None] * len(a))
    ]
    channels = ["bag channel"] if bag else list(index.labels)
    title = (f"{collection.parent.name}/{collection.name}: {n} pairs of step {args.step} (seed {args.seed}, policy "
             f"{index.config.positive_policy}, Z {args.z}, normalized {index.config.norm_level or 'no'})")
    save_png(pairs_figure(anchor, positive, labels, channels, title), args.out, args.overwrite)
    crossing = sum(lab.division for lab in labels)
    print(f"{args.out}: {n} anchor/positive pairs ({crossing} cross a division), {len(channels)} channel(s), "
          f"read box (Z, Y, X) {index.read_shape}")


# ---------------------------------------------------------------------- converters and writers
def cmd_convert_ctc(args: argparse.Namespace) -> None:
    from dali_pipeline.datasets.ctc import import_ctc

    check_outputs([(args.out, None)], args.overwrite)
    yaml_path = import_ctc(args.sequence_dir, args.out, interval_minutes=args.interval_minutes, name=args.name,
                           channel=args.channel, start_hpi=args.start_hpi, version=args.version,
                           overwrite=args.overwrite, progress=sys.stderr.isatty())
    manifest = json.loads((Path(yaml_path).parent / "manifest.json").read_text())
    print(f"{yaml_path}: experiment {manifest['name']}, {manifest['frames']} frames {tuple(manifest['shape'][-2:])} "
          f"{manifest['dtype']}, {manifest['tracks']} tracks, {manifest['lineages']} lineages, "
          f"{manifest['divisions']} divisions, {manifest['observations']} observations "
          f"({manifest['dropped_no_pixels']} without mask pixels dropped), compression "
          f"{manifest['compression_ratio']:.1f}x")
    print(f"next: {PROG} index {yaml_path} --patch 64 64")


def cmd_import_cell_index(args: argparse.Namespace) -> None:
    from dali_pipeline.cell_index import import_cell_index

    report = import_cell_index(args.parquet, args.out_yaml, overwrite=args.overwrite,
                               allow_differences=args.allow_lineage_differences, threads=args.threads)
    for line in report.lines():
        print(line)
    print(f"wrote {report.yaml_path} and {report.tracks_dir}/; next: {PROG} index {report.yaml_path}")


SIZES = {
    "small": "the built-in demo: 2 experiments x 4 FOVs, 12 x 2 x 4 x 128 x 128 uint16, ~13 MB",
    "medium": "2 experiments x 4 FOVs, 16 x 2 x 8 x 256 x 256 float32, ~0.5 GB decoded",
    "large": "the production-like benchmark store: 2 experiments x 16 FOVs, 16 x 2 x 16 x 512 x 512 float32, "
             "~17 GB decoded",
}


def synthetic_spec(size: str, seed: int = 0):
    """The spec of `make-synthetic --size`; seed 0 of "small" is exactly the built-in demo."""
    from dali_pipeline.datasets.synthetic import benchmark_spec, demo_spec

    if size == "small":
        spec = demo_spec()
        if seed:
            spec = dataclasses.replace(spec, experiments=tuple(
                dataclasses.replace(e, seed=e.seed + 1000 * seed) for e in spec.experiments))
        return spec
    if size == "medium":
        return benchmark_spec(n_fovs=8, t=16, z=8, yx=256, chunks=(1, 1, 8, 128, 128), shards=(1, 1, 8, 256, 256),
                              cells_per_fov=24, seed=seed)
    if size == "large":
        return benchmark_spec(seed=seed)
    raise UsageError(f"--size must be one of {sorted(SIZES)}, got {size!r}")


def cmd_make_synthetic(args: argparse.Namespace) -> None:
    from dali_pipeline.datasets.synthetic import write_synthetic

    check_outputs([(args.out, None)], args.overwrite)
    spec = synthetic_spec(args.size, args.seed)
    decoded = sum(len(e.fov_names) * int(np.prod(e.shape)) * np.dtype(e.dtype).itemsize for e in spec.experiments)
    print(f"writing {args.size} ({decoded / 1e9:.2f} GB decoded) to {args.out}", file=sys.stderr)
    yaml_path = write_synthetic(args.out, spec, overwrite=args.overwrite, progress=sys.stderr.isatty())
    manifest = json.loads((Path(yaml_path).parent / "manifest.json").read_text())
    print(f"{yaml_path}: {len(spec.experiments)} experiments, {manifest['fovs']} FOVs, {manifest['tracks']} tracks, "
          f"{manifest['divisions']} divisions, {manifest['observations']} observations; "
          f"{manifest['bytes_on_disk'] / 1e6:.1f} MB on disk (compression {manifest['compression_ratio']:.1f}x), "
          f"written in {manifest['write_seconds']:.1f} s")


# ---------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> None:
    from dali_pipeline import bench
    from dali_pipeline.plots import bench_figure, save_png

    out = Path(args.out)
    json_path, png_path = out / "bench.json", out / "bench.png"
    check_outputs([(json_path, JSON_REPORT), (png_path, PNG)], args.overwrite)
    collection, _, index = build_index(args)
    if len(index.valid) == 0:
        raise UsageError(f"{collection}: {_no_anchors_message(index)}")
    device = _device(args.device)
    report = bench.compare(index, steps=args.steps, batch_size=args.batch_size, seed=args.seed, device=device,
                           rounds=args.rounds, paths=tuple(args.paths))
    report["collection"] = str(collection)
    print(f"{collection}: {len(index.valid)} valid anchors, batch {args.batch_size}, {args.steps} timed steps "
          f"(best of {args.rounds} rounds), "
          f"read box (Z, Y, X) {index.read_shape} {index.batch_dtype}, {device}")
    print(bench.table(report))
    if "raw" in report["results"]:
        print(f"read amplification (decoded chunk bytes / delivered bytes): "
              f"{report['results']['raw']['read_amplification']:.2f}")
    _atomic_text(json_path, json.dumps(report, indent=1) + "\n", args.overwrite)
    results = list(report["results"].values())
    save_png(bench_figure([r["short"] for r in results], [r["pairs_per_s"] for r in results],
                          f"{collection.parent.name}: batch {args.batch_size}, {index.read_shape}, {device}"), png_path,
             args.overwrite)
    print(f"wrote {json_path} and {png_path}")


# ---------------------------------------------------------------------- parser
def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low` (the flag is named by argparse in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def finite_float(low: float | None = None, *, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float, optionally >= `low` (> `low` when `strict`)."""
    bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a finite number{bound}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text}")
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be{bound}, got {value:g}")
        return value
    parse.__name__ = f"finite number{bound}"
    return parse


class OrderedPair(argparse.Action):
    """Stores LOW HIGH (already typed) after checking LOW <= HIGH."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        low, high = values
        if low > high:
            parser.error(f"argument {option_string}: LOW must be <= HIGH, got {low:g} {high:g}")
        setattr(namespace, self.dest, tuple(values))


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit 2), pointing at --help instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)}; see {self.prog} --help\n")


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
FINITE = finite_float()
POSITIVE_FLOAT = finite_float(0.0, strict=True)


def _index_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("index options (what is read and which positives count)")
    g.add_argument("--patch", type=POSITIVE, nargs=2, default=(64, 64), metavar=("Y", "X"), help="read patch size (64 64)")
    g.add_argument("--max-border-shift", type=NON_NEGATIVE, default=None, help="default: a quarter patch")
    g.add_argument("--tau-hours", type=FINITE, nargs=2, action=OrderedPair, default=(0.5, 2.0), metavar=("LOW", "HIGH"),
                   help="positive time offset range in hours (0.5 2.0)")
    g.add_argument("--tau-decay", type=finite_float(0.0), default=2.0, help="tau weight decay, >= 0 (2.0)")
    g.add_argument("--policy", choices=["lineage", "ancestry"], default="lineage",
                   help="lineage: any cell of the lineage; ancestry: own track, ancestors, descendants only")
    g.add_argument("--channel-mode", choices=["all", "bag"], default="all")
    g.add_argument("--norm-level", default="timepoint_statistics",
                   choices=["timepoint_statistics", "fov_statistics", "dataset_statistics", "none"])
    g.add_argument("--z-window", type=POSITIVE, default=None, help="Z slices to read per patch (default: all)")
    g.add_argument("--threads", type=POSITIVE, default=8, help="threads reading metadata and CSVs (8)")
    return p


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # --debug before or after the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    top = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    index_opts = _index_options()

    def add(name: str, help_text: str, description: str, parents=()) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=description, parents=[common, *parents])

    p = add("demo", "train a small encoder with NT-Xent on the built-in dataset (the main job)",
            "Write the built-in demo dataset once (into $DYNACLR_DALI_CACHE or ~/.cache/dynaclr-dali), build its "
            "lineage index, and train a small encoder with an NT-Xent loss on the DALI loader (GPU when present, "
            "else the CPU pipeline). Writes OUT/pairs.png, OUT/loss.png and OUT/summary.json.")
    p.add_argument("--steps", type=POSITIVE, default=300, help="training steps (300)")
    p.add_argument("--batch-size", type=int_at_least(2), default=64, help="pairs per step (64)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="sampler and model seed (0)")
    p.add_argument("--out", default="demo_out", help="output folder (demo_out)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="DALI pipeline device (auto)")
    p.add_argument("--patch", type=POSITIVE, default=32, help="square read patch in pixels (32)")
    p.add_argument("--width", type=POSITIVE, default=16, help="channels of the first conv layer (16; then x2, x4)")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3, help="AdamW learning rate (1e-3)")
    p.add_argument("--temperature", type=POSITIVE_FLOAT, default=0.2, help="NT-Xent temperature (0.2)")
    p.add_argument("--cache-mb", type=NON_NEGATIVE, default=0,
                   help="chunk cache in MiB: decode each chunk once, crop patches from it; the loader's whole "
                        "budget there, its batches in flight first (0: off)")
    p.add_argument("--z-reduction", choices=["max", "center", "channelwise"], default="max",
                   help="Z to one slice: max projection, centre slice, or per channel label (phase-like channels "
                        "the centre slice, the others the max) (max)")
    p.add_argument("--locality-frames", type=POSITIVE, default=None, metavar="K",
                   help="order each epoch in shuffled blocks of (FOV, t // K), so that steps share chunks "
                        "(default: a uniform permutation)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=cmd_demo)

    p = add("index", "build a collection's lineage index, print its summary, plot lineage trees",
            "Build the LineageIndex of a collection and print one row per experiment: FOVs, tracks, lineages, "
            "divisions, observations, valid anchors per policy, rows dropped at borders and outside the image, "
            "tau frames.", [index_opts])
    p.add_argument("collection", nargs="?", help="collection YAML (default: the built-in demo dataset)")
    p.add_argument("--save", help="write the index to this .npz")
    p.add_argument("--plot-lineage", metavar="FOV", help="draw this FOV's lineage trees (A/1/0 or EXPERIMENT/A/1/0)")
    p.add_argument("--out", default="lineage_tree.png", help="PNG of --plot-lineage (lineage_tree.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save or --out file")
    p.set_defaults(func=cmd_index)

    p = add("preview", "a labelled montage of anchor/positive pairs of a collection",
            "Draw one plan's anchor and positive patches (one column per channel), labelled with experiment, "
            "FOV, lineage, t and tau; pairs that cross a division are marked.", [index_opts])
    p.add_argument("collection", nargs="?", help="collection YAML (default: the built-in demo dataset)")
    p.add_argument("--out", default="pairs.png", help="output PNG (pairs.png)")
    p.add_argument("--n", type=POSITIVE, default=8, help="pairs to draw (8)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--step", type=NON_NEGATIVE, default=0, help="which step's plan (0)")
    p.add_argument("--z", choices=["max", "center"], default="max", help="Z projection for display (max)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_preview)

    p = add("convert-ctc", "a Cell Tracking Challenge sequence into a collection",
            "Import SEQUENCE_DIR (raw frames tNNN.tif, with SEQUENCE_DIR_GT/TRA beside it) into OUT: an HCS "
            "plate, a tracks CSV from the mask centroids, statistics and a collection YAML.")
    p.add_argument("sequence_dir")
    p.add_argument("out")
    p.add_argument("--interval-minutes", type=POSITIVE_FLOAT, required=True,
                   help="minutes between frames (CTC files do not record it)")
    p.add_argument("--name", default=None, help="experiment name (default: the sequence folder's name)")
    p.add_argument("--channel", default="nuclei", help="channel label (nuclei)")
    p.add_argument("--start-hpi", type=FINITE, default=0.0, help="hours post perturbation at t = 0")
    p.add_argument("--version", choices=["0.4", "0.5"], default="0.5", help="OME-Zarr version (0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_convert_ctc)

    p = add("import-cell-index", "the reference's cell-index parquet into a collection (lineages verified)",
            "Read a cell-index parquet (the reference's CELL_INDEX_SCHEMA), write per-FOV tracks CSVs into "
            "OUT_tracks/ beside OUT.yml and the collection YAML, rebuild our lineage index from them and check that "
            "every track gets the parquet's lineage_id (differences go to OUT_lineage_differences.csv).")
    p.add_argument("parquet")
    p.add_argument("out_yaml", metavar="OUT.yml")
    p.add_argument("--allow-lineage-differences", action="store_true",
                   help="install the collection even when lineage ids differ")
    p.add_argument("--threads", type=POSITIVE, default=8, help="threads reading the CSVs back (8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.yml and OUT_tracks/")
    p.set_defaults(func=cmd_import_cell_index)

    p = add("make-synthetic", "write a seeded synthetic collection (small, medium, large)",
            "Write a seeded synthetic collection (moving, dividing cells; plates, tracks CSVs, statistics, "
            "collection.yml, manifest.json) into OUT. Sizes: " + "; ".join(f"{k}: {v}" for k, v in SIZES.items()))
    p.add_argument("out")
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_make_synthetic)

    p = add("bench", "DALI loader vs raw read ceiling vs torch DataLoader on the same plans",
            "A short side-by-side comparison on the same plans: PatchReader.prefetch (raw read ceiling), the DALI "
            "TripletLoader, and a torch DataLoader over MultiExperimentTripletDataset. Prints a table and writes "
            "OUT/bench.json and OUT/bench.png. The thorough benchmarks live in benchmarks/.", [index_opts])
    p.add_argument("collection", nargs="?", help="collection YAML (default: the built-in demo dataset)")
    p.add_argument("--steps", type=POSITIVE, default=30, help="timed steps per path (30)")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="pairs per step (32)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--rounds", type=POSITIVE, default=2, help="interleaved rounds; the best counts (2)")
    p.add_argument("--paths", nargs="+", choices=["raw", "dali", "torch"], default=["raw", "dali", "torch"])
    p.add_argument("--out", default="bench_out", help="output folder (bench_out)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=cmd_bench)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure ends in one line on stderr, the traceback only under --debug.

    Exit codes: 2 bad input (and anything unforeseen), 1 a missing package, 130 an interrupt.
    """
    args = parser().parse_args(argv)

    def fail(err: BaseException, code: int, message: str) -> int:
        if args.debug:
            traceback.print_exception(err)
        print(f"{PROG} {args.command}: {_one_line(message)}", file=sys.stderr)
        return code

    try:
        import pyarrow as pa

        from dali_pipeline.reader import PatchReadError

        bad_input = (UsageError, ValueError, OSError, KeyError, yaml.YAMLError, PatchReadError, pa.ArrowException)
        try:
            args.func(args)
        except bad_input as err:
            return fail(err, 2, f"error: {err.args[0] if isinstance(err, KeyError) and err.args else err}")
    except KeyboardInterrupt as err:
        return fail(err, 130, "interrupted")
    except ImportError as err:
        return fail(err, 1, f"error: {err}")
    except Exception as err:  # a bug, or input no check foresaw: still one line, the traceback under --debug
        return fail(err, 2, f"error: unexpected {type(err).__name__}: {err}; rerun with --debug for the traceback")
    return 0


if __name__ == "__main__":
    sys.exit(main())
