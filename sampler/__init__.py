"""Which cells and which positives: registry, lineage index, tau and positive draws, batch plans.

Pure numpy/pandas on metadata and CSVs; never reads pixels and never imports dali_pipeline.
"""

from sampler.augment import AugmentConfig
from sampler.collection import CollectionError
from sampler.epoch import PlanBatchSampler, TripletSampler, step_generator
from sampler.index import IndexConfig, LineageIndex
from sampler.plan import BatchPlan, ReadBoxes, make_plan, read_boxes
from sampler.positives import draw_positives
from sampler.registry import ChannelSource, Experiment, ExperimentRegistry
from sampler.tau import sample_tau, tau_weight_table

__all__ = [
    "AugmentConfig", "BatchPlan", "ChannelSource", "CollectionError", "Experiment", "ExperimentRegistry", "IndexConfig", "LineageIndex",
    "PlanBatchSampler", "ReadBoxes", "TripletSampler", "draw_positives", "make_plan", "read_boxes", "sample_tau",
    "step_generator", "tau_weight_table",
]
