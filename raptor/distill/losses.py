"""Losses: token-group MSE, teacher forcing, autoregressive rollouts, the stage-1/2 objectives.

Every objective takes (student, trajectory ``[B, L+1, N, D]``, config, step or lambda) and returns
``(loss, metrics)``: ``loss`` a scalar with grad, ``metrics`` a dict of DETACHED 0-d tensors (no
host sync; call ``float()`` when logging). The caller owns backward and the optimizer step (a torch
optimizer in :func:`raptor.distill.fit`, a DeepSpeed engine in the distributed runner).
Pass the ``Raptor`` module itself (``engine.module`` under DeepSpeed).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from raptor.distill.config import StageConfig
from raptor.distill.schedules import stage_lambda
from raptor.models.student import Raptor
from raptor.models.teacher import TokenGeometry

Weights = tuple[float, float, float] | None


def token_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    geometry: TokenGeometry,
    weights: Weights = None,
    kind: str = "mse",
) -> torch.Tensor:
    """Per-state loss over ``[..., N, D]`` -> ``[...]`` (leading dims kept, e.g. batch and step).

    ``weights=None``: plain mean over tokens and features. ``(w_cls, w_reg, w_patch)``:
    ``w_cls MSE(cls) + w_reg MSE(registers) + w_patch MSE(patches)``, each MSE a mean over its
    tokens and D; a group the geometry lacks (no registers) contributes nothing.
    ``kind="cosine"``: 1 - cosine per token instead of the squared error (same weighting).
    """
    pred = pred.float()
    target = target.float()
    if kind == "mse":
        err = (pred - target).pow(2).mean(dim=-1)  # [..., N]
    elif kind == "cosine":
        err = 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"unknown loss kind {kind!r}")
    if weights is None:
        return err.mean(dim=-1)
    total = err.new_zeros(err.shape[:-1])
    for w, (_, sl) in zip(weights, _group_slices(geometry)):
        if w and sl is not None:
            total = total + w * err[..., sl].mean(dim=-1)
    return total


def _group_slices(geometry: TokenGeometry) -> list[tuple[str, slice | None]]:
    g = geometry.groups()
    return [(name, g.get(name)) for name in ("cls", "registers", "patches")]


def _noisy(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x + sigma * torch.randn_like(x) if sigma > 0 else x


def tf_loss(
    student: Raptor,
    trajectory: torch.Tensor,
    start: int,
    end: int,
    *,
    weights: Weights = None,
    kind: str = "mse",
    sigma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing over layers start+1..end, all steps in one batched forward.

    Returns (loss = mean over steps, per-layer loss ``[end-start]``).
    """
    inputs = _noisy(trajectory[:, start:end], sigma)
    pred = student.teacher_forcing(inputs, start)
    per = token_loss(pred, trajectory[:, start + 1 : end + 1], student.geometry, weights, kind)  # [B, n]
    per_layer = per.mean(dim=0)
    return per_layer.mean(), per_layer


def ar_loss(
    student: Raptor,
    trajectory: torch.Tensor,
    block: int,
    *,
    horizon: int | None = None,
    weights: Weights = None,
    kind: str = "mse",
    sigma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Autoregressive loss of ``block`` on its segment (s, e], n = e - s.

    H = horizon (default n): every teacher state a_u with u in s..e-H starts a rollout of exactly H
    steps of the block (all starts stacked along the batch, per-sample t); loss = mean over starts
    and steps. H = n is the paper: one rollout from a_s through the whole segment, loss summed over
    its layers / n. Returns (loss, per-layer loss ``[n]``: mean over the predictions of each layer).
    """
    s, e = student.segments[block]
    n = e - s
    H = n if horizon is None else min(int(horizon), n)
    starts = list(range(s, e - H + 1))
    S = len(starts)
    B = trajectory.shape[0]
    x0 = _noisy(trajectory[:, s : s + S], sigma)  # [B, S, N, D] = a_u for u in starts
    x0 = x0.reshape(B * S, *trajectory.shape[2:])
    t0 = torch.tensor(starts, device=trajectory.device).repeat(B)
    pred = student.rollout_from(x0, t0, H, block).reshape(B, S, H, *trajectory.shape[2:])
    # target of (start u, step h) is a_{u+h+1}
    idx = torch.arange(S, device=trajectory.device)[:, None] + torch.arange(H, device=trajectory.device)[None] + s + 1
    target = trajectory[:, idx]  # [B, S, H, N, D]
    per = token_loss(pred, target, student.geometry, weights, kind).mean(dim=0)  # [S, H]
    layer_idx = (idx - s - 1).reshape(-1)
    sums = per.new_zeros(n).index_add(0, layer_idx, per.reshape(-1))
    counts = per.new_zeros(n).index_add(0, layer_idx, torch.ones_like(per).reshape(-1))
    return per.mean(), sums / counts


def block_loss(
    student: Raptor,
    trajectory: torch.Tensor,
    block: int,
    lam: float | torch.Tensor,
    cfg: StageConfig,
    *,
    terms: tuple[bool, bool] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-1 hybrid loss of one block: ``lam * TF + (1 - lam) * AR`` on its segment.

    ``terms`` = (TF, AR): which terms to compute; default ``(lam > 0, lam < 1)``, so a term whose
    weight is 0 is not computed. Pass it with a tensor ``lam`` (under ``torch.compile`` lambda
    changes every step of the anneal, the terms only twice). Metrics: ``block{j}/tf``,
    ``block{j}/ar``, ``block{j}/loss`` and ``layer{l}/loss`` (AR per layer when AR is on, else TF).
    """
    s, e = student.segments[block]
    w = cfg.weights_for_block(block, student.k)
    use_tf, use_ar = _terms(lam, terms)
    metrics: dict[str, torch.Tensor] = {}
    loss = trajectory.new_zeros((), dtype=torch.float32)
    per_layer = None
    if use_tf:
        tf, tf_layers = tf_loss(student, trajectory, s, e, weights=w, kind=cfg.loss, sigma=cfg.sigma)
        loss = loss + lam * tf
        metrics[f"block{block}/tf"] = tf.detach()
        per_layer = tf_layers
    if use_ar:
        ar, ar_layers = ar_loss(student, trajectory, block, horizon=cfg.horizon, weights=w,
                                kind=cfg.loss, sigma=cfg.sigma)
        loss = loss + (1.0 - lam) * ar
        metrics[f"block{block}/ar"] = ar.detach()
        per_layer = ar_layers
    metrics[f"block{block}/loss"] = loss.detach()
    assert per_layer is not None
    for i, v in enumerate(per_layer.detach()):
        metrics[f"layer{s + i + 1}/loss"] = v
    return loss, metrics


def _terms(lam: float | torch.Tensor, terms: tuple[bool, bool] | None) -> tuple[bool, bool]:
    if terms is not None:
        if not any(terms):
            raise ValueError("terms must switch on teacher forcing, AR or both")
        return terms
    if isinstance(lam, torch.Tensor):
        raise ValueError("a tensor lam needs terms=(tf, ar)")
    return lam > 0, lam < 1


def stage1_loss(
    student: Raptor,
    trajectory: torch.Tensor,
    cfg: StageConfig,
    *,
    step: int | None = None,
    lam: float | torch.Tensor | None = None,
    blocks: Sequence[int] | None = None,
    terms: tuple[bool, bool] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the independent per-block hybrid losses over ``blocks`` (default ``cfg.blocks`` or
    all k). The blocks share no parameters, so each block's gradient is that of its own loss: one
    backward trains all of them at once. ``lam`` overrides the schedule value at ``step``;
    ``terms`` as in :func:`block_loss`."""
    if lam is None:
        if step is None:
            raise ValueError("stage1_loss needs step= or lam=")
        lam = stage_lambda(step, cfg)
    _check_traj(student, trajectory)
    chosen = blocks if blocks is not None else cfg.blocks
    idx = list(range(student.k)) if chosen is None else [int(j) for j in chosen]
    for j in idx:
        if not 0 <= j < student.k:
            raise ValueError(f"block {j} out of range for k = {student.k}")
    total = trajectory.new_zeros((), dtype=torch.float32)
    metrics: dict[str, torch.Tensor] = {}
    for j in idx:
        loss, m = block_loss(student, trajectory, j, lam, cfg, terms=terms)
        total = total + loss
        metrics.update(m)
    metrics["loss"] = total.detach()
    metrics["lambda"] = torch.as_tensor(lam, dtype=torch.float32).detach()
    return total, metrics


def stage2_loss(
    student: Raptor,
    trajectory: torch.Tensor,
    cfg: StageConfig,
    *,
    step: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage 2: the chained student rolls a_0 -> a_L (pure AR); loss = mean over the L layers of
    the token-weighted loss (``cfg.token_weights``, paper 0.45/0.10/0.45)."""
    _check_traj(student, trajectory)
    a0 = _noisy(trajectory[:, 0], cfg.sigma)
    states = student.rollout(a0)
    per = token_loss(states, trajectory[:, 1:], student.geometry, cfg.token_weights, cfg.loss)
    per_layer = per.mean(dim=0)
    loss = per_layer.mean()
    metrics = {f"layer{l + 1}/loss": v for l, v in enumerate(per_layer.detach())}
    metrics["loss"] = loss.detach()
    metrics["lambda"] = torch.tensor(0.0)
    return loss, metrics


def distill_loss(
    student: Raptor,
    trajectory: torch.Tensor,
    cfg: StageConfig,
    step: int,
    *,
    blocks: Sequence[int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``cfg.stage`` at ``step``: what one training step differentiates."""
    if cfg.stage == 1:
        return stage1_loss(student, trajectory, cfg, step=step, blocks=blocks)
    return stage2_loss(student, trajectory, cfg, step=step)


def _check_traj(student: Raptor, trajectory: torch.Tensor) -> None:
    lay = student.geometry
    want = (lay.depth + 1, lay.num_tokens, lay.width)
    if trajectory.ndim != 4 or tuple(trajectory.shape[1:]) != want:
        raise ValueError(
            f"trajectory must be [B, {want[0]}, {want[1]}, {want[2]}] (L+1, N, D), "
            f"got {tuple(trajectory.shape)}"
        )
