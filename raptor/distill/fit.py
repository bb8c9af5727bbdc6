"""Single-process training: one optimizer step = :func:`train_step` around the stage loss."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from raptor.distill.config import StageConfig
from raptor.distill.losses import distill_loss
from raptor.distill.schedules import lr_scheduler
from raptor.models.student import Raptor
from raptor.models.teacher import Teacher, autocast

log = logging.getLogger(__name__)


def trained_blocks(student: Raptor, cfg: StageConfig, blocks: Sequence[int] | None = None) -> list[int]:
    if cfg.stage == 2:
        return list(range(student.k))
    b = blocks if blocks is not None else cfg.blocks
    return list(range(student.k)) if b is None else [int(x) for x in b]


def make_optimizer(
    student: Raptor, cfg: StageConfig, blocks: Sequence[int] | None = None, *, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over the trained blocks' parameters; no weight decay on norms, LayerScale, biases.

    ``fused`` (torch's single-kernel AdamW): default on when the parameters are on a GPU, where
    the per-tensor kernels of the default implementation cost measurable step time."""
    decay, no_decay = [], []
    for j in trained_blocks(student, cfg, blocks):
        for name, p in student.blocks[j].named_parameters():
            (no_decay if p.ndim < 2 or name.startswith(("ls", "norm")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def train_step(
    student: Raptor,
    trajectory: torch.Tensor,
    step: int,
    cfg: StageConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    blocks: Sequence[int] | None = None,
    amp: bool | torch.dtype = False,
) -> dict[str, torch.Tensor]:
    """loss -> backward -> clip -> optimizer.step -> scheduler.step; returns detached metrics
    (plus ``grad_norm`` and ``lr``). The DeepSpeed runner does the same around :func:`distill_loss`."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(trajectory.device, amp):
        loss, metrics = distill_loss(student, trajectory, cfg, step, blocks=blocks)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if cfg.grad_clip and cfg.grad_clip > 0:
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        metrics["grad_norm"] = gn.detach()
    optimizer.step()
    metrics["lr"] = torch.tensor(optimizer.param_groups[0]["lr"])
    if scheduler is not None:
        scheduler.step()
    return metrics


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per logged step
    steps: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def _batches(data: Iterable) -> Iterable:
    if isinstance(data, torch.Tensor):
        raise TypeError("pass an iterable of batches (e.g. [trajectory]), not one tensor")
    while True:
        n = 0
        for b in data:
            n += 1
            yield b
        if n == 0:
            raise ValueError("fit: the data iterable yielded no batches")
        if iter(data) is data:  # a one-shot iterator cannot be cycled
            return


def fit(
    student: Raptor,
    data: Iterable[torch.Tensor],
    cfg: StageConfig,
    *,
    teacher: Teacher | None = None,
    blocks: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    amp: bool | torch.dtype = False,
    log_every: int = 0,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``student`` for ``cfg.steps`` steps of stage ``cfg.stage`` on one device.

    ``data`` yields teacher trajectories ``[B, L+1, N, D]`` or, with ``teacher``, image batches
    ``[B, 3, H, W]`` turned into trajectories on the fly (``teacher.trajectory``). Re-iterable data
    (a list, a DataLoader) is cycled until ``cfg.steps``. Stage 1 trains ``blocks`` (default
    ``cfg.blocks`` or all k at once); stage 2 trains the chained student. ``log_every`` > 0 logs
    and records metrics every that many steps (and the last step); ``callback(step, metrics)``
    receives the same floats.
    """
    device = torch.device(device) if device is not None else next(student.parameters()).device
    student.to(device).train()
    opt = make_optimizer(student, cfg, blocks)
    sched = lr_scheduler(opt, cfg)
    result = FitResult()
    t0 = time.perf_counter()
    it = _batches(data)
    for step in range(cfg.steps):
        try:
            batch = next(it)
        except StopIteration:
            log.warning("fit: data exhausted after %d steps", step)
            break
        batch = batch.to(device, non_blocking=True)
        if teacher is not None:  # image batches -> trajectories on the fly
            batch = teacher.trajectory(batch, amp=amp)
        metrics = train_step(student, batch, step, cfg, opt, sched, blocks=blocks, amp=amp)
        result.steps = step + 1
        last = step == cfg.steps - 1
        if (log_every and (step % log_every == 0 or last)) or (callback is not None and last):
            flat = {k: float(v) for k, v in metrics.items()}
            flat["step"] = step
            result.history.append(flat)
            if log_every:
                log.info("step %d loss %.4g lambda %.3f lr %.3g", step, flat["loss"],
                         flat.get("lambda", 0.0), flat["lr"])
            if callback is not None:
                callback(step, flat)
    result.seconds = time.perf_counter() - t0
    student.eval()
    return result
