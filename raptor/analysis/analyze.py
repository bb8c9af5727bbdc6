"""Teacher and student side by side on a validation set: dynamics, basins, fidelity, head accuracy.

:func:`analyze_models` is what both ``raptor analyze RUN_URL`` and the pipeline's report stage call;
its dict goes into :func:`raptor.analysis.report.build_report`. Trajectories of ``max_samples``
images are held on the CPU (``[n, L+1, N, D]`` per model: 64 ViT-B/14 images at 224 px are about
0.7 GB), so every measure is exact over that set rather than averaged over batches.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from raptor.analysis import dynamics as dyn
from raptor.distill import fidelity
from raptor.eval.probe import split_batch, student_share, topk_accuracy
from raptor.models import Raptor, Teacher
from raptor.models.teacher import autocast

log = logging.getLogger(__name__)

DEFAULT_SCALES = (0.05, 0.2, 0.5)


def default_basin_layers(depth: int) -> list[int]:
    """Perturb at the input, a quarter, half and three quarters of the depth."""
    return sorted({round(f * depth) for f in (0.0, 0.25, 0.5, 0.75)})


@torch.no_grad()
def collect_trajectories(
    teacher: Teacher, student: Raptor | None, batches: Iterable[Any], *, max_samples: int, amp: bool = False
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Teacher trajectories, the student's rollouts from the same a_0 (a_0 prepended), and labels; all on CPU."""
    t_parts: list[Tensor] = []
    s_parts: list[Tensor] = []
    labels: list[Tensor] = []
    seen = 0
    for batch in batches:
        images, y = split_batch(batch)
        images = images[: max_samples - seen].to(teacher.device)
        traj = teacher.trajectory(images, amp=amp)
        t_parts.append(traj.cpu())
        if student is not None:
            rollout = student.rollout(traj[:, 0]).float()
            s_parts.append(torch.cat([traj[:, :1], rollout], dim=1).cpu())
        labels.append(torch.as_tensor(y)[: images.shape[0]].long().reshape(-1).cpu())
        seen += images.shape[0]
        log.debug("analysis: %d/%d samples through teacher%s", seen, max_samples, " and student" if student is not None else "")
        if seen >= max_samples:
            break
    if not t_parts:
        raise ValueError("no validation batches to analyse")
    return torch.cat(t_parts), (torch.cat(s_parts) if student is not None else None), torch.cat(labels)


def _on_device(fn: Callable[[Tensor], Tensor], device: torch.device) -> Callable[[Tensor], Tensor]:
    return lambda x: fn(x.to(device)).float().cpu()


def model_dynamics(
    traj: Tensor,
    labels: Tensor,
    groups: dict[str, slice],
    boundaries: Sequence[int],
    continue_fn: Callable[[Tensor, int], Tensor],
    predict_fn: Callable[[Tensor], Tensor] | None,
    *,
    basin_layers: Sequence[int],
    basin_scales: Sequence[float],
    seed: int = 0,
) -> dict[str, Any]:
    """Trajectory measures, class-basin separation of the final cls directions and basin robustness of one model."""
    out = dyn.dynamics_summary(traj, groups, boundaries)
    cls = groups.get("cls")
    enough = labels.unique().numel() >= 2 and cls is not None
    out["silhouette"] = dyn.silhouette(traj[:, -1, cls.start], labels) if enough else None
    out["basin"] = dyn.basin_robustness(traj, continue_fn, layers=basin_layers, scales=basin_scales, predict_fn=predict_fn, seed=seed)
    return out


def _head_accuracy(teacher: Teacher, final: Tensor, labels: Tensor) -> dict[str, float]:
    logits = _on_device(teacher.logits, teacher.device)(final)
    return topk_accuracy(logits, labels)


@torch.no_grad()
def analyze_models(
    teacher: Teacher,
    student: Raptor | None,
    batches: Iterable[Any],
    *,
    boundaries: Sequence[int] | None = None,
    max_samples: int = 64,
    basin_layers: Sequence[int] | None = None,
    basin_scales: Sequence[float] = DEFAULT_SCALES,
    seed: int = 0,
    amp: bool = False,
) -> dict[str, Any]:
    """Everything the report shows that needs the models: dynamics of both, fidelity, head accuracy.

    ``batches`` yield ``(images, labels)`` (or dicts with ``image``/``label``); at most
    ``max_samples`` images are used. Accuracy here is the teacher's head on each readout (the
    paper's validation metric); trained probes come from the probe stage.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (got {max_samples})")
    depth = teacher.depth
    if student is not None:
        boundaries = student.boundaries
    bnd = list(boundaries or [])
    layers = default_basin_layers(depth) if basin_layers is None else list(basin_layers)
    traj_t, traj_s, labels = collect_trajectories(teacher, student, batches, max_samples=max_samples, amp=amp)
    groups = teacher.geometry.groups()
    predict = _on_device(lambda f: teacher.logits(f).argmax(-1), teacher.device) if teacher.head is not None else None
    lay = teacher.geometry
    result: dict[str, Any] = {
        "teacher": {"name": teacher.name, "depth": depth, "width": lay.width, "num_registers": lay.num_registers, "num_patches": lay.num_patches},
        "boundaries": bnd,
        "k": len(bnd) + 1,
        "num_samples": int(traj_t.shape[0]),
    }
    log.debug("analysis: teacher dynamics on %d samples", traj_t.shape[0])

    def teacher_blocks(x: Tensor, layer: int) -> Tensor:  # the perturbed continuation, in the trajectory's precision
        with autocast(teacher.device, amp):
            return teacher.run_blocks(x, layer, depth)

    teacher_cont = _continuation(teacher_blocks, teacher.device)
    dynamics = {"teacher": model_dynamics(traj_t, labels, groups, bnd, teacher_cont, predict, basin_layers=layers, basin_scales=basin_scales, seed=seed)}
    dynamics["student"] = None
    result["fidelity"] = None
    result["probe"] = None
    if traj_s is not None:
        log.debug("analysis: student dynamics and fidelity")
        student_cont = _continuation(lambda x, l: x if l == depth else student.rollout(x, l, depth)[:, -1], teacher.device)
        dynamics["student"] = model_dynamics(traj_s, labels, groups, bnd, student_cont, predict, basin_layers=layers, basin_scales=basin_scales, seed=seed)
        fid = fidelity(traj_s[:, 1:], traj_t)["all"]
        result["fidelity"] = {"layers": list(range(1, depth + 1)), **{m: fid[m].tolist() for m in ("r2", "cosine", "update_r2", "rel_error")}}
        if teacher.head is not None:
            t_acc, s_acc = _head_accuracy(teacher, traj_t[:, -1], labels), _head_accuracy(teacher, traj_s[:, -1], labels)
            share = student_share(s_acc["top1"], t_acc["top1"]) if t_acc["top1"] > 0 else None
            result["probe"] = {"source": "teacher head", "teacher": t_acc, "student": s_acc, "student_share": share}
    result["dynamics"] = dynamics
    return result


def _continuation(fn: Callable[[Tensor, int], Tensor], device: torch.device) -> Callable[[Tensor, int], Tensor]:
    """Run a continuation on the model's device and bring the final state back to the CPU."""
    return lambda x, layer: fn(x.to(device), layer).float().cpu()
