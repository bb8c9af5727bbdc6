"""Dense linear probes on frozen patch tokens: semantic segmentation (mIoU) and depth (RMSE).

The DINOv2 "linear" dense protocol at its simplest: one linear map per patch token (a 1x1
convolution on the patch grid), logits upsampled bilinearly to the label's resolution, trained with
the same AdamW learning-rate grid as the classification probe (:class:`raptor.eval.probe.ProbeConfig`).
Segmentation uses an ignore index for unlabelled pixels; depth ignores pixels whose target is not a
positive finite number (NYUv2 marks missing depth as 0).

Metrics follow the benchmarks: mIoU from the confusion matrix accumulated over the whole split
(classes absent from both prediction and label are left out of the mean, as in mmseg); depth RMSE
per image over valid pixels, then averaged over images (the NYUv2 convention).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from raptor.eval.probe import ProbeConfig, best_head, fit_heads, new_heads
from raptor.models import Raptor, Teacher

log = logging.getLogger(__name__)


@dataclass
class SegmentationResult:
    """Best head of the grid by validation mIoU."""

    miou: float
    pixel_acc: float
    per_class_iou: list[float | None]
    best_lr: float
    weight: Tensor  # [C, D]
    bias: Tensor  # [C]
    per_lr: dict[float, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "miou": self.miou,
            "pixel_acc": self.pixel_acc,
            "per_class_iou": self.per_class_iou,
            "best_lr": self.best_lr,
            "per_lr": [{"lr": lr, **m} for lr, m in sorted(self.per_lr.items())],
        }


@dataclass
class DepthResult:
    """Best head of the grid by validation RMSE."""

    rmse: float
    best_lr: float
    weight: Tensor  # [1, D]
    bias: Tensor  # [1]
    per_lr: dict[float, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rmse": self.rmse, "best_lr": self.best_lr, "per_lr": [{"lr": lr, **m} for lr, m in sorted(self.per_lr.items())]}


def patch_grid(patch_tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
    """``[B, P, D]`` patch tokens -> ``[B, h, w, D]`` (row-major, as ViTs flatten them); square when ``grid`` is None."""
    b, p, d = patch_tokens.shape
    if grid is None:
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"{p} patch tokens do not form a square grid; pass grid=(h, w)")
        grid = (side, side)
    if grid[0] * grid[1] != p:
        raise ValueError(f"grid {grid} does not hold {p} patch tokens")
    return patch_tokens.reshape(b, grid[0], grid[1], d)


def dense_logits(head: torch.nn.Module, tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """Apply a per-token linear head to ``[B, h, w, D]`` and upsample bilinearly to ``size`` -> ``[B, C, H, W]``."""
    logits = head(tokens).permute(0, 3, 1, 2)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """``[C, C]`` counts, rows = label, columns = prediction; pixels labelled ``ignore_index`` are skipped."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"mask labels must lie in 0..{num_classes - 1} or be {ignore_index} (got {int(t.min())}..{int(t.max())})")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf: Tensor) -> tuple[float, list[float | None]]:
    """(mIoU, per-class IoU); a class absent from both labels and predictions has IoU None and is not averaged."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    per_class = [None if u == 0 else float(i / u) for i, u in zip(inter.tolist(), union.tolist())]
    present = [v for v in per_class if v is not None]
    if not present:
        raise ValueError("no labelled pixels: every pixel carries the ignore index")
    return sum(present) / len(present), per_class


def mean_iou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> tuple[float, list[float | None]]:
    """mIoU of predicted class maps against label maps, accumulated over every pixel of the split."""
    return iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


def depth_rmse(pred: Tensor, target: Tensor) -> float:
    """Per-image RMSE over valid pixels (target positive and finite), averaged over images that have any."""
    valid = torch.isfinite(target) & (target > 0)
    sq = torch.where(valid, (pred.double() - target.double().nan_to_num()).square(), torch.zeros((), dtype=torch.float64))
    counts = valid.flatten(1).sum(1)
    if int((counts > 0).sum()) == 0:
        raise ValueError("no valid depth pixels (targets must be positive and finite)")
    per_image = (sq.flatten(1).sum(1)[counts > 0] / counts[counts > 0]).sqrt()
    return per_image.mean().item()


def _check_splits(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], device: torch.device | str | None) -> torch.device:
    """Shape checks of both splits' (tokens, targets); returns the device the heads train on."""
    for name, (tokens, targets) in (("train", train), ("val", val)):
        if tokens.ndim != 4:
            raise ValueError(f"{name} tokens must be [samples, h, w, dim] (got shape {tuple(tokens.shape)}); see patch_grid")
        if targets.ndim != 3 or targets.shape[0] != tokens.shape[0]:
            raise ValueError(f"{name} targets must be [samples, H, W] matching {tokens.shape[0]} samples (got shape {tuple(targets.shape)})")
    return torch.device(device) if device is not None else train[0].device


@torch.no_grad()
def _predict(head: torch.nn.Module, tokens: Tensor, size: tuple[int, int], batch_size: int, device: torch.device, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    outs = [reduce(dense_logits(head, tokens[i : i + batch_size].to(device), size)).cpu() for i in range(0, tokens.shape[0], batch_size)]
    return torch.cat(outs)


DENSE_PROBE = ProbeConfig(lrs=(1e-3, 1e-2), epochs=10, batch_size=32, warmup_steps=20)


def _train_dense(
    out_dim: int, train_tokens: Tensor, train_targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], cfg: ProbeConfig, device: torch.device
) -> torch.nn.ModuleList:
    heads = new_heads(cfg, train_tokens.shape[-1], out_dim, None, device)
    size = tuple(train_targets.shape[-2:])

    def batch_loss(idx: Tensor) -> Tensor:
        x, y = train_tokens[idx].float().to(device), train_targets[idx].to(device)
        return sum(loss_fn(dense_logits(head, x, size), y) for head in heads)

    fit_heads(heads, batch_loss, train_tokens.shape[0], cfg)
    return heads


def train_segmentation_probe(
    train_tokens: Tensor,
    train_masks: Tensor,
    val_tokens: Tensor,
    val_masks: Tensor,
    *,
    num_classes: int,
    ignore_index: int = 255,
    config: ProbeConfig = DENSE_PROBE,
    device: torch.device | str | None = None,
) -> SegmentationResult:
    """Linear segmentation head on ``[n, h, w, D]`` patch tokens against ``[n, H, W]`` label maps; best head by val mIoU."""
    dev = _check_splits((train_tokens, train_masks), (val_tokens, val_masks), device)
    masks = train_masks.long()
    confusion_matrix(masks, masks, num_classes, ignore_index)  # label range check before training

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        labelled = (y != ignore_index).sum().clamp_min(1)
        return F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum") / labelled

    heads = _train_dense(num_classes, train_tokens, masks, loss_fn, config, dev)
    size = tuple(val_masks.shape[-2:])
    scores = []
    for head in heads:
        pred = _predict(head, val_tokens, size, config.batch_size, dev, lambda z: z.argmax(1))
        conf = confusion_matrix(pred, val_masks.long(), num_classes, ignore_index)
        miou, per_class = iou_from_confusion(conf)
        scores.append({"miou": miou, "pixel_acc": float(conf.diag().sum() / conf.sum().clamp_min(1)), "per_class_iou": per_class})
    i, weight, bias = best_head(heads, [m["miou"] for m in scores])
    log.info("segmentation probe: mIoU %.4f at lr %g", scores[i]["miou"], config.lrs[i])
    per_lr = {lr: {"miou": m["miou"], "pixel_acc": m["pixel_acc"]} for lr, m in zip(config.lrs, scores)}
    return SegmentationResult(scores[i]["miou"], scores[i]["pixel_acc"], scores[i]["per_class_iou"], config.lrs[i], weight, bias, per_lr)


def train_depth_probe(
    train_tokens: Tensor,
    train_depth: Tensor,
    val_tokens: Tensor,
    val_depth: Tensor,
    *,
    config: ProbeConfig = DENSE_PROBE,
    device: torch.device | str | None = None,
) -> DepthResult:
    """Linear depth head (regression, MSE on valid pixels) on ``[n, h, w, D]`` patch tokens; best head by val RMSE."""
    dev = _check_splits((train_tokens, train_depth), (val_tokens, val_depth), device)

    def loss_fn(pred: Tensor, y: Tensor) -> Tensor:
        valid = torch.isfinite(y) & (y > 0)
        err = torch.where(valid, pred[:, 0] - y.nan_to_num(), torch.zeros((), device=y.device))
        return err.square().sum() / valid.sum().clamp_min(1)

    heads = _train_dense(1, train_tokens, train_depth.float(), loss_fn, config, dev)
    size = tuple(val_depth.shape[-2:])
    rmse = [depth_rmse(_predict(head, val_tokens, size, config.batch_size, dev, lambda z: z[:, 0]), val_depth) for head in heads]
    i, weight, bias = best_head(heads, rmse, higher_is_better=False)
    log.info("depth probe: RMSE %.4f at lr %g", rmse[i], config.lrs[i])
    return DepthResult(rmse[i], config.lrs[i], weight, bias, {lr: {"rmse": r} for lr, r in zip(config.lrs, rmse)})


@torch.no_grad()
def dense_features(teacher: Teacher, student: Raptor | None, batches: Iterable[Any], *, max_samples: int, amp: bool = False) -> dict[str, Tensor]:
    """Final-norm patch-token grids ``[n, h, w, D]`` of the teacher (and the student's rollout), with masks and depth.

    ``batches`` are dense loader batches ``(images, labels, masks, depth)`` (``raptor.data.loader(..., dense=True)``).
    """
    lay = teacher.geometry
    grid = (lay.img_size // lay.patch_size, lay.img_size // lay.patch_size)
    tokens = lambda final: patch_grid(teacher.model.norm(final)[:, lay.num_prefix :].float().cpu(), grid)  # noqa: E731
    out: dict[str, list[Tensor]] = {"teacher": [], "student": [], "mask": [], "depth": []}
    seen = 0
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 4:
            raise ValueError("dense probes need dense batches (images, labels, masks, depth): load the shards with dense=True")
        images = batch[0][: max_samples - seen].to(teacher.device)
        traj = teacher.trajectory(images, amp=amp)
        out["teacher"].append(tokens(traj[:, -1]))
        if student is not None:
            out["student"].append(tokens(student.rollout(traj[:, 0])[:, -1]))
        out["mask"].append(batch[2][: images.shape[0]].long())
        out["depth"].append(batch[3][: images.shape[0]].float())
        seen += images.shape[0]
        if seen >= max_samples:
            break
    if not out["teacher"]:
        raise ValueError("no dense batches")
    return {k: torch.cat(v) for k, v in out.items() if v}


def dense_probes(
    teacher: Teacher,
    student: Raptor | None,
    train: Iterable[Any],
    val: Iterable[Any],
    *,
    num_classes: int | None = None,
    ignore_index: int = 255,
    max_samples: int = 512,
    config: ProbeConfig = DENSE_PROBE,
    amp: bool = False,
) -> dict[str, dict[str, Any]]:
    """Segmentation (mIoU) and depth (RMSE) linear probes on the teacher's and the student's patch tokens.

    ``num_classes`` defaults to the largest label in the train and val masks + 1.
    """
    tr = dense_features(teacher, student, train, max_samples=max_samples, amp=amp)
    va = dense_features(teacher, student, val, max_samples=max_samples, amp=amp)
    if num_classes is None:
        labelled = torch.cat([m[m != ignore_index] for m in (tr["mask"], va["mask"])])
        num_classes = int(labelled.max()) + 1 if labelled.numel() else 0
        if num_classes < 2:
            raise ValueError("the masks hold fewer than two classes; nothing to segment")
    results: dict[str, dict[str, Any]] = {}
    for model in ("teacher", "student"):
        if model not in tr:
            continue
        seg = train_segmentation_probe(tr[model], tr["mask"], va[model], va["mask"], num_classes=num_classes,
                                       ignore_index=ignore_index, config=config, device=teacher.device)
        dep = train_depth_probe(tr[model], tr["depth"], va[model], va["depth"], config=config, device=teacher.device)
        results[model] = {"segmentation": seg.to_dict(), "depth": dep.to_dict()}
        log.info("dense probes, %s: mIoU %.4f, depth RMSE %.4f", model, seg.miou, dep.rmse)
    return results
