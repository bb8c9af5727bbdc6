"""Schedules as plain functions of the step: the TF/AR mixing weight lambda and the LR factor."""

from __future__ import annotations

import math

import torch


def lambda_at(
    step: int,
    total_steps: int,
    kind: str = "linear",
    *,
    start: float = 1.0,
    minimum: float = 0.0,
    rho: float = 0.25,
) -> float:
    """Teacher-forcing weight at ``step`` (0-based).

    ``linear``: start -> minimum linearly over the first ``rho * total_steps`` steps, then flat
    (the paper: 1 -> 0 over 25%). ``cosine``: the same end points along a half cosine.
    ``constant``: always ``start``. The end point is reached exactly at step ``rho * total_steps``.
    """
    if kind == "constant":
        return float(start)
    span = rho * total_steps
    frac = 1.0 if span <= 0 else min(max(step / span, 0.0), 1.0)
    if kind == "linear":
        return float(start + (minimum - start) * frac)
    if kind == "cosine":
        return float(minimum + (start - minimum) * 0.5 * (1.0 + math.cos(math.pi * frac)))
    raise ValueError(f"unknown lambda schedule {kind!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR: linear warm-up (step+1)/warmup, then cosine down to ``min_ratio``
    at ``total_steps``. Use with ``torch.optim.lr_scheduler.LambdaLR`` (see :func:`lr_scheduler`)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(total_steps - warmup_steps, 1)
    frac = min(max((step - warmup_steps) / decay, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with warm-up + cosine from a :class:`~raptor.distill.StageConfig`."""
    ratio = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, ratio)
    )


def stage_lambda(step: int, cfg) -> float:
    """lambda of a StageConfig at ``step`` (stage 2 is pure AR: 0)."""
    if cfg.stage == 2:
        return 0.0
    return lambda_at(step, cfg.steps, cfg.lambda_schedule, start=cfg.lambda_start,
                     minimum=cfg.lambda_min, rho=cfg.lambda_rho)
