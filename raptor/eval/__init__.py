"""Evaluation of teachers and students: linear and dense probes, layer-swap, partition and ablation studies.

Pure PyTorch (no Ray, no DeepSpeed). The probes take cached features; the studies
(:mod:`raptor.eval.structure`) take teacher trajectories and train students with :mod:`raptor.distill`.
"""

from raptor.eval.dense import (
    DepthResult,
    SegmentationResult,
    dense_probes,
    depth_rmse,
    mean_iou,
    patch_grid,
    train_depth_probe,
    train_segmentation_probe,
)
from raptor.eval.probe import (
    ProbeConfig,
    ProbeResult,
    collect,
    evaluate_head,
    extract_features,
    student_share,
    topk_accuracy,
    train_linear_probe,
)

__all__ = [
    "DepthResult",
    "ProbeConfig",
    "ProbeResult",
    "SegmentationResult",
    "collect",
    "dense_probes",
    "depth_rmse",
    "evaluate_head",
    "extract_features",
    "mean_iou",
    "patch_grid",
    "student_share",
    "topk_accuracy",
    "train_depth_probe",
    "train_linear_probe",
    "train_segmentation_probe",
]
