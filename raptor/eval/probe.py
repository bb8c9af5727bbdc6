"""Linear classification probe on frozen features (the DINOv2 linear protocol, METHOD.md section 5).

Features are the readout of a frozen backbone (final norm, cls concatenated with the mean of the
patch tokens), computed once and cached, so every learning rate of the grid trains on the same
tensors. All heads of the grid train together in one pass over the data (one AdamW parameter group
per learning rate), as DINOv2's ``linear.py`` does, and the best head on the validation set is kept.
Augmentation (RandomResizedCrop + flip) is not applied: a cached-feature probe sees each image once
per extraction, which is the usual cheap variant and the one the service runs.

Pure torch: no Ray, no DeepSpeed, so it runs in a notebook and inside any pipeline stage.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from raptor.distill.schedules import lr_factor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    """How a probe's heads are optimised: one head per learning rate, AdamW, warm-up then cosine to zero."""

    lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    epochs: int = 15
    batch_size: int = 512
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lrs", tuple(float(lr) for lr in self.lrs))
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs must be a non-empty list of positive learning rates (got {list(self.lrs)})")
        if self.epochs <= 0 or self.batch_size <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(
                "need epochs > 0, batch_size > 0, warmup_steps >= 0, weight_decay >= 0 "
                f"(got {self.epochs}, {self.batch_size}, {self.warmup_steps}, {self.weight_decay})"
            )


def head_fingerprint(weight: Tensor, bias: Tensor) -> str:
    """First 16 hex digits of the sha256 of a head's float32 weight and bias bytes.

    Two probes compared like for like must start from the same head; the fingerprint makes that a
    recorded, checkable fact instead of a claim.
    """
    digest = hashlib.sha256()
    for t in (weight, bias):
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class ProbeResult:
    """The best head of the learning-rate grid, its validation accuracy, and the whole grid.

    ``init_fingerprints`` holds every head of the grid (not only the selected one): each learning
    rate's head has its own initial draw, and two probes may select different learning rates, so
    only the whole grid says whether they started alike.
    """

    top1: float
    top5: float
    best_lr: float
    weight: Tensor  # [C, F]
    bias: Tensor  # [C]
    per_lr: dict[float, dict[str, float]] = field(default_factory=dict)  # lr -> {"top1", "top5"}
    init_fingerprints: dict[float, str] = field(default_factory=dict)  # lr -> head_fingerprint of its initial head

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the head's tensors are saved separately, e.g. as safetensors, and
        ``init_fingerprints`` where the caller compares them with another probe's)."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "best_lr": self.best_lr,
            "per_lr": [{"lr": lr, **acc} for lr, acc in sorted(self.per_lr.items())],
        }


# Position of each target in a tuple batch: the data loader yields (images, labels) or, for dense
# shards, (images, labels, masks, depth).
TUPLE_TARGETS = {"label": 1, "mask": 2, "depth": 3}


def split_batch(batch: Any, target: str = "label") -> tuple[Tensor, Tensor]:
    """``(images, target)`` of a batch given as a loader tuple or a dict with ``image`` and ``target`` keys."""
    if target not in TUPLE_TARGETS:
        raise ValueError(f"unknown target {target!r} (use one of {sorted(TUPLE_TARGETS)})")
    if isinstance(batch, dict):
        try:
            return batch["image"], batch[target]
        except KeyError:
            raise ValueError(f"a batch dict needs 'image' and {target!r} keys (got {sorted(batch)})") from None
    index = TUPLE_TARGETS[target]
    if isinstance(batch, (tuple, list)) and len(batch) > index:
        return batch[0], batch[index]
    raise ValueError(f"a batch must be a tuple with {target} at position {index} or a dict with 'image' and {target!r} (got {type(batch).__name__})")


@torch.no_grad()
def collect(
    fn: Callable[[Tensor], Tensor],
    batches: Iterable[Any],
    *,
    target: str = "label",
    device: torch.device | str | None = None,
    max_samples: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run a frozen ``fn(images) -> [B, ...]`` over ``(images, targets)`` batches; float32 outputs and targets on CPU.

    ``target`` picks what the batches carry beside the images: ``label``, ``mask`` or ``depth``.
    """
    outs: list[Tensor] = []
    targets: list[Tensor] = []
    seen = 0
    for batch in batches:
        images, y = split_batch(batch, target)
        if device is not None:
            images = images.to(device, non_blocking=True)
        out = fn(images)
        if out.shape[0] != images.shape[0]:
            raise ValueError(f"feature function returned {out.shape[0]} rows for a batch of {images.shape[0]} images")
        outs.append(out.float().cpu())
        targets.append(torch.as_tensor(y).cpu())
        seen += out.shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    if not outs:
        raise ValueError("no batches to extract features from")
    out_all, y_all = torch.cat(outs), torch.cat(targets)
    if max_samples is not None:
        out_all, y_all = out_all[:max_samples], y_all[:max_samples]
    log.debug("collected %d outputs of shape %s", out_all.shape[0], tuple(out_all.shape[1:]))
    return out_all, y_all


def extract_features(
    fn: Callable[[Tensor], Tensor],
    batches: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    max_samples: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``fn(images) -> features [B, F]`` over ``(images, labels)`` batches; float32 features and long labels on CPU.

    ``fn`` is any frozen backbone: ``lambda x: teacher.readout(teacher.trajectory(x)[:, -1])`` for
    the teacher, the same readout of the student's last rollout state for the student.
    """
    feats, labels = collect(fn, batches, device=device, max_samples=max_samples)
    if feats.ndim != 2:
        raise ValueError(f"feature function must return [batch, features]; got shape {tuple(feats.shape)}")
    return feats, labels.long().reshape(-1)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k largest logits; k is capped at the number of classes."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows but {labels.shape[0]} labels")
    if logits.shape[0] == 0:
        raise ValueError("no samples to score")
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels.reshape(-1, 1).to(top.device)
    return {f"top{k}": hit[:, : min(k, logits.shape[1])].any(dim=1).float().mean().item() for k in ks}


@torch.no_grad()
def evaluate_head(weight: Tensor, bias: Tensor, feats: Tensor, labels: Tensor, *, batch_size: int = 4096) -> dict[str, float]:
    """Top-1/top-5 of a fixed linear head, e.g. the teacher's head applied to the student's features."""
    if weight.shape[1] != feats.shape[1]:
        raise ValueError(f"head expects {weight.shape[1]} features but got {feats.shape[1]}")
    w, b = weight.float(), bias.float()
    logits = torch.cat([F.linear(feats[i : i + batch_size].to(w.device).float(), w, b).cpu() for i in range(0, feats.shape[0], batch_size)])
    return topk_accuracy(logits, labels)


def fit_heads(heads: Sequence[torch.nn.Module], batch_loss: Callable[[Tensor], Tensor], num_samples: int, cfg: ProbeConfig) -> None:
    """Train head i at peak learning rate ``cfg.lrs[i]``, all in a single pass over the data.

    The learning rate follows the DINOv2 probe schedule, the distillation stages' own
    :func:`~raptor.distill.schedules.lr_factor`: linear warm-up over ``cfg.warmup_steps``, then
    cosine that reaches zero as the last step ends.

    ``batch_loss(indices)`` returns the summed loss of all heads on those samples; the heads'
    parameters are disjoint, so each head gets exactly its own gradient. Shared by the
    classification and dense probes.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the data order, apart from the init's stream
    opt = torch.optim.AdamW([{"params": h.parameters(), "lr": lr} for h, lr in zip(heads, cfg.lrs)], weight_decay=cfg.weight_decay)
    total = cfg.epochs * math.ceil(num_samples / cfg.batch_size)
    warmup = min(cfg.warmup_steps, total // 2)  # a short probe still spends half its steps decaying
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup))
    for epoch in range(cfg.epochs):
        order = torch.randperm(num_samples, generator=gen)
        for i in range(0, num_samples, cfg.batch_size):
            loss = batch_loss(order[i : i + cfg.batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log.debug("probe epoch %d/%d: summed loss %.4f", epoch + 1, cfg.epochs, loss.item())


def new_heads(cfg: ProbeConfig, in_features: int, out_features: int, init: tuple[Tensor, Tensor] | None, device: torch.device) -> torch.nn.ModuleList:
    """One linear head per learning rate, from ``init = (weight, bias)`` or DINOv2's probe init (N(0, 0.01), zero bias)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    heads = torch.nn.ModuleList(torch.nn.Linear(in_features, out_features) for _ in cfg.lrs)
    with torch.no_grad():
        for head in heads:
            if init is None:
                head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
                head.bias.zero_()
            else:
                head.weight.copy_(init[0].float().reshape(head.weight.shape))
                head.bias.copy_(init[1].float().reshape(head.bias.shape))
    return heads.to(device)


def best_head(heads: Sequence[torch.nn.Module], scores: Sequence[Any], *, higher_is_better: bool = True) -> tuple[int, Tensor, Tensor]:
    """(index, weight, bias) of the head with the best validation score (scores compare as tuples too)."""
    pick = max if higher_is_better else min
    i = pick(range(len(scores)), key=lambda j: scores[j])
    return i, heads[i].weight.detach().cpu().clone(), heads[i].bias.detach().cpu().clone()


def _check_inputs(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor, num_classes: int) -> None:
    for name, f, y in (("train", train_feats, train_labels), ("val", val_feats, val_labels)):
        if f.ndim != 2:
            raise ValueError(f"{name} features must be [samples, features] (got shape {tuple(f.shape)})")
        if f.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: {f.shape[0]} feature rows but {y.shape[0]} labels")
        if f.shape[0] == 0:
            raise ValueError(f"{name}: no samples")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"{name} labels must lie in 0..{num_classes - 1} (got {int(y.min())}..{int(y.max())})")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"train features have width {train_feats.shape[1]} but val features {val_feats.shape[1]}")


def train_linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    *,
    num_classes: int,
    lrs: Sequence[float] = (1e-4, 1e-3, 1e-2),
    epochs: int = 15,
    batch_size: int = 512,
    weight_decay: float = 1e-2,
    warmup_steps: int = 100,
    init: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> ProbeResult:
    """Train one linear head per learning rate on frozen features; keep the best on the validation set.

    ``init = (weight [C, F], bias [C])`` starts every head from a given head (the teacher's), which
    is the paper's fine-tuned probe for the student (METHOD.md section 5, last step). Selecting the
    learning rate on the reported split follows DINOv2's protocol; pass a held-out split as ``val``
    when an unbiased number is needed.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (got {num_classes})")
    _check_inputs(train_feats, train_labels, val_feats, val_labels, num_classes)
    dim = train_feats.shape[1]
    if init is not None and (tuple(init[0].shape) != (num_classes, dim) or tuple(init[1].shape) != (num_classes,)):
        raise ValueError(f"init head must be weight [{num_classes}, {dim}] and bias [{num_classes}] (got {tuple(init[0].shape)}, {tuple(init[1].shape)})")
    cfg = ProbeConfig(tuple(lrs), epochs, batch_size, weight_decay, warmup_steps, seed)
    device = torch.device(device) if device is not None else train_feats.device
    heads = new_heads(cfg, dim, num_classes, init, device)
    init_fingerprints = {lr: head_fingerprint(h.weight, h.bias) for lr, h in zip(cfg.lrs, heads)}
    x_all, y_all = train_feats.float(), train_labels.long()

    def batch_loss(idx: Tensor) -> Tensor:
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        return sum(F.cross_entropy(head(x), y) for head in heads)

    fit_heads(heads, batch_loss, x_all.shape[0], cfg)
    accs = [evaluate_head(h.weight.detach(), h.bias.detach(), val_feats, val_labels) for h in heads]
    i, weight, bias = best_head(heads, [(a["top1"], a["top5"]) for a in accs])
    log.debug("linear probe: top-1 %.4f top-5 %.4f at lr %g (grid %s)", accs[i]["top1"], accs[i]["top5"], cfg.lrs[i], list(cfg.lrs))
    return ProbeResult(
        top1=accs[i]["top1"], top5=accs[i]["top5"], best_lr=cfg.lrs[i], weight=weight, bias=bias,
        per_lr=dict(zip(cfg.lrs, accs)), init_fingerprints=init_fingerprints,
    )


def student_share(student_top1: float, teacher_top1: float) -> float:
    """The student's accuracy as a fraction of the teacher's (the paper's 96-98% figure)."""
    if teacher_top1 <= 0:
        raise ValueError(f"teacher top-1 must be positive to take a share of it (got {teacher_top1})")
    return student_top1 / teacher_top1
