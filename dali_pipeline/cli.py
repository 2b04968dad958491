"""`dynaclr-dali`: the command line (index today; demo, preview, convert and bench to come)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import pandas as pd

from sampler import ExperimentRegistry, IndexConfig, LineageIndex


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


def _index_config(args: argparse.Namespace) -> IndexConfig:
    return IndexConfig(
        patch_yx=tuple(args.patch), max_border_shift=args.max_border_shift, tau_range_hours=tuple(args.tau_hours),
        tau_decay=args.tau_decay, positive_policy=args.policy, channel_mode=args.channel_mode,
        norm_level=None if args.norm_level == "none" else args.norm_level,
    )


def cmd_index(args: argparse.Namespace) -> None:
    collection = Path(args.collection) if args.collection else demo_collection()
    if not collection.exists():
        raise UsageError(f"{collection}: no such collection YAML")
    registry = ExperimentRegistry.from_yaml(collection, z_window=args.z_window)
    index = LineageIndex.build(registry, _index_config(args), threads=args.threads)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(f"collection: {collection}")
        print(index.summary().to_string(index=False))
        print(f"observations {len(index)}, valid anchors ({index.config.positive_policy}) {len(index.valid)}, "
              f"channels {index.labels if index.config.channel_mode == 'all' else 'bag of ' + str(index.labels)}, "
              f"read box (Z, Y, X) {index.read_shape}, batch dtype {index.batch_dtype}")
    if args.save:
        index.save(args.save, overwrite=args.overwrite)
        print(f"saved {args.save} ({os.path.getsize(args.save) / 2**20:.1f} MiB)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dynaclr-dali", description=__doc__)
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="build the lineage index of a collection and print its summary")
    p.add_argument("collection", nargs="?", help="collection YAML (default: the built-in demo dataset)")
    p.add_argument("--patch", type=int, nargs=2, default=(64, 64), metavar=("Y", "X"), help="read patch size")
    p.add_argument("--max-border-shift", type=int, default=None, help="default: a quarter patch")
    p.add_argument("--tau-hours", type=float, nargs=2, default=(0.5, 2.0), metavar=("LOW", "HIGH"))
    p.add_argument("--tau-decay", type=float, default=2.0)
    p.add_argument("--policy", choices=["lineage", "ancestry"], default="lineage")
    p.add_argument("--channel-mode", choices=["all", "bag"], default="all")
    p.add_argument("--norm-level", default="timepoint_statistics",
                   choices=["timepoint_statistics", "fov_statistics", "dataset_statistics", "none"])
    p.add_argument("--z-window", type=int, default=None, help="Z slices to read per patch (default: all)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--save", help="write the index to this .npz")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save file")
    p.set_defaults(func=cmd_index)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"dynaclr-dali {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
