"""Pixels: OME-Zarr reads, the DALI graph, loaders, dataset writers and the CLI.

Imports `sampler`; importing DALI-backed parts without DALI raises an ImportError naming the
extras to install (`dynaclr-dali[cu12]` or `[cu13]`).
"""

from dali_pipeline.loader import TripletLoader
from dali_pipeline.pipeline import GraphSpec, build_pipeline
from dali_pipeline.reader import PatchReader, PatchReadError, Patches, ReadStats, kvstore_reads
from dali_pipeline.torch_dataset import MultiExperimentTripletDataset, identity_collate

__all__ = [
    "GraphSpec", "MultiExperimentTripletDataset", "TripletLoader", "build_pipeline", "PatchReader", "PatchReadError", "Patches", "ReadStats", "identity_collate",
    "kvstore_reads",
]
