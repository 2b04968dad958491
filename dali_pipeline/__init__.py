"""Pixels: OME-Zarr reads, the DALI graph, loaders, dataset writers and the CLI.

Imports `sampler`; importing DALI-backed parts without DALI raises an ImportError naming the
extras to install (`dynaclr-dali[cu12]` or `[cu13]`). The DDP helpers (`distributed`), the
embedding writers (`embeddings`) and the Lightning DataModule (`lightning`, the `lightning` extra)
load on first use, so `import dali_pipeline` needs neither Lightning nor AnnData.
"""

from importlib import import_module
from typing import Any

from dali_pipeline.cached_reader import ChunkStore
from dali_pipeline.loader import TripletLoader
from dali_pipeline.pipeline import GraphSpec, build_pipeline
from dali_pipeline.reader import PatchReader, PatchReadError, Patches, ReadStats, kvstore_reads
from dali_pipeline.torch_dataset import MultiExperimentTripletDataset, identity_collate

_LAZY = {
    "Topology": "dali_pipeline.distributed",
    "distributed_loader": "dali_pipeline.distributed",
    "init_distributed": "dali_pipeline.distributed",
    "load_index": "dali_pipeline.distributed",
    "split_anchors": "dali_pipeline.distributed",
    "topology": "dali_pipeline.distributed",
    "EmbeddingTable": "dali_pipeline.embeddings",
    "read_embeddings": "dali_pipeline.embeddings",
    "write_embeddings": "dali_pipeline.embeddings",
    "EmbeddingWriter": "dali_pipeline.embeddings",
    "LightningLoader": "dali_pipeline.lightning",
    "TripletDataModule": "dali_pipeline.lightning",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dali_pipeline' has no attribute {name!r}")
    try:
        return getattr(import_module(module), name)
    except AttributeError:  # EmbeddingWriter exists only with Lightning installed
        raise ImportError(f"dali_pipeline.{name} needs Lightning: pip install 'dynaclr-dali[lightning]'") from None


__all__ = [
    "ChunkStore", "GraphSpec", "MultiExperimentTripletDataset", "TripletLoader", "build_pipeline", "PatchReader", "PatchReadError", "Patches", "ReadStats", "identity_collate",
    "kvstore_reads", *_LAZY,
]
