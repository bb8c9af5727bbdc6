"""Is the block structure real? Layer-swap, partition and ablation studies (METHOD.md sections 3 and 6).

- Layer swap: run the teacher with two of its layers traded and read the accuracy of its head (and
  the cosine of the readout to the unswapped teacher's). Within a segment of a block-recurrent
  teacher a swap barely matters; across segments it collapses accuracy.
- Partition: distil students on the max-cut boundaries and on ``n`` random contiguous partitions
  with the same k and training budget; fidelity and accuracy as mean +- sigma and z-scores.
- Ablation: the paper's table at small scale, each row adding one ingredient of the recipe.

Data are ``(trajectory [B, L+1, N, D], labels [B])`` batches from the teacher (computed once, since
every study reuses them many times); accuracy uses a linear head over the readout, by default the
teacher's own (``teacher.head``).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from raptor.distill import FidelityAccumulator, StageConfig, fit
from raptor.eval.probe import evaluate_head, train_linear_probe
from raptor.models import Raptor, Teacher, check_boundaries
from raptor.models.teacher import autocast
from raptor.recipe import PAPER_LAST_BLOCK_TOKEN_WEIGHTS

log = logging.getLogger(__name__)

Batches = Sequence[tuple[Tensor, Tensor]]  # (trajectory, labels)


def _head(teacher: Teacher, head: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
    if head is not None:
        return head
    if teacher.head is not None:
        return teacher.head.weight.detach(), teacher.head.bias.detach()
    return None


def _correct(head: tuple[Tensor, Tensor] | None, feats: Tensor, labels: Tensor) -> float:
    """Number of correct top-1 predictions of ``head`` (0 without a head)."""
    if head is None:
        return 0.0
    return evaluate_head(head[0].to(feats.device), head[1].to(feats.device), feats, labels)["top1"] * feats.shape[0]


# --------------------------------------------------------------------------- layer swap
def swapped_order(depth: int, i: int, j: int) -> list[int]:
    """0-based teacher block indices in running order when layers ``i`` and ``j`` (1-based) trade places."""
    if not (1 <= i <= depth and 1 <= j <= depth):
        raise ValueError(f"layers to swap must lie in 1..{depth} (got {i}, {j})")
    order = list(range(depth))
    order[i - 1], order[j - 1] = order[j - 1], order[i - 1]
    return order


def segment_of(layer: int, boundaries: Sequence[int]) -> int:
    """0-based block that produces ``layer`` (1-based): b_{j-1} < layer <= b_j."""
    return bisect.bisect_left(list(boundaries), layer)


@dataclass
class SwapStudy:
    """L x L matrices over swapped layer pairs (1-based ``layers``); entry (i, i) is the unswapped teacher."""

    layers: list[int]
    cosine: list[list[float]]  # mean cosine of the readout to the unswapped teacher's
    top1: list[list[float]] | None  # accuracy of the head, None without a head
    base_top1: float | None

    def change(self) -> Tensor:
        """Accuracy change against the unswapped teacher, or cosine - 1 without a head (0 = no effect)."""
        if self.top1 is not None and self.base_top1 is not None:
            return torch.tensor(self.top1) - self.base_top1
        return torch.tensor(self.cosine) - 1.0

    def within_across(self, boundaries: Sequence[int]) -> dict[str, float | None]:
        """Mean change and cosine over swaps inside one segment versus swaps across segments (i < j)."""
        change, cos = self.change(), torch.tensor(self.cosine)
        pairs: dict[str, list[tuple[int, int]]] = {"within": [], "across": []}
        for a, b in itertools.combinations(range(len(self.layers)), 2):
            same = segment_of(self.layers[a], boundaries) == segment_of(self.layers[b], boundaries)
            pairs["within" if same else "across"].append((a, b))
        out: dict[str, float | None] = {}
        for name, idx in pairs.items():
            out[f"{name}_change"] = sum(float(change[a, b]) for a, b in idx) / len(idx) if idx else None
            out[f"{name}_cosine"] = sum(float(cos[a, b]) for a, b in idx) / len(idx) if idx else None
            out[f"{name}_pairs"] = len(idx)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "cosine": self.cosine, "top1": self.top1, "base_top1": self.base_top1}


@torch.no_grad()
def layer_swap_study(
    teacher: Teacher, val: Batches, *, head: tuple[Tensor, Tensor] | None = None, amp: bool | torch.dtype = False
) -> SwapStudy:
    """Swap every pair of teacher layers (i <= j), rerun from a_{i-1}, and score the readout.

    Only layers from min(i, j) on are recomputed (earlier states are the trajectory's), under ``amp``
    as the trajectory was. The matrix is symmetric because a swap is; the diagonal reruns the
    unswapped teacher and must show no change.
    """
    depth = teacher.depth
    head = _head(teacher, head)
    cos_sum = torch.zeros(depth, depth, dtype=torch.float64)
    correct = torch.zeros(depth, depth, dtype=torch.float64)
    base_correct, total = 0.0, 0
    for traj, labels in val:
        if traj.shape[1] != depth + 1:
            raise ValueError(f"trajectories have {traj.shape[1] - 1} layers but the teacher has {depth}")
        traj = traj.to(teacher.device)
        base = teacher.readout(traj[:, -1]).float()
        base_correct += _correct(head, base, labels)
        total += traj.shape[0]
        for i in range(1, depth + 1):
            for j in range(i, depth + 1):
                x = traj[:, i - 1]
                with autocast(traj.device, amp):
                    for b in swapped_order(depth, i, j)[i - 1 :]:
                        x = teacher.blocks[b](x)
                feats = teacher.readout(x).float()
                cos = torch.nn.functional.cosine_similarity(feats, base, dim=-1).sum().item()
                cos_sum[i - 1, j - 1] += cos
                correct[i - 1, j - 1] += _correct(head, feats, labels)
        log.info("layer swap: %d samples scored over %d pairs", total, depth * (depth + 1) // 2)
    if total == 0:
        raise ValueError("no validation batches for the layer-swap study")
    sym = lambda m: (torch.triu(m) + torch.triu(m, 1).T) / total  # noqa: E731  mirror i <= j onto j < i
    return SwapStudy(
        layers=list(range(1, depth + 1)),
        cosine=sym(cos_sum).tolist(),
        top1=sym(correct).tolist() if head is not None else None,
        base_top1=base_correct / total if head is not None else None,
    )


# --------------------------------------------------------------------------- students
def random_partitions(depth: int, k: int, n: int, *, seed: int = 0, exclude: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """``n`` distinct random contiguous partitions into k segments (boundaries), none of them in ``exclude``.

    Drawn uniformly over the C(L-1, k-1) ways to place k-1 cuts between L layers.
    """
    if not 1 <= k <= depth:
        raise ValueError(f"k must lie in 1..{depth} (got {k})")
    banned = {tuple(check_boundaries(b, depth)) for b in exclude}
    available = math.comb(depth - 1, k - 1) - len(banned)
    if n > available:
        raise ValueError(f"only {available} contiguous partitions of {depth} layers into {k} segments are left; cannot draw {n}")
    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < n:
        cand = tuple(sorted(rng.sample(range(1, depth), k - 1)))
        if cand not in banned:
            banned.add(cand)
            out.append(list(cand))
    return out


def distill_student(
    teacher: Teacher,
    boundaries: Sequence[int],
    train: Batches,
    stage1: StageConfig,
    stage2: StageConfig | None = None,
    *,
    depth_scaling: bool = True,
    mlp: str | None = None,
    seed: int = 0,
) -> Raptor:
    """Build a Raptor on ``boundaries`` and train stage 1 (all k blocks at once), then stage 2 if given."""
    student = Raptor.from_teacher(teacher, boundaries, mlp=mlp, depth_scaling=depth_scaling, seed=seed)
    trajs = [t for t, _ in train]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fit(student, trajs, stage1)
        if stage2 is not None:
            fit(student, trajs, stage2)
    return student.eval()


@torch.no_grad()
def _student_features(student: Raptor, traj: Tensor) -> tuple[Tensor, Tensor]:
    dev = next(student.parameters()).device
    states = student.rollout(traj[:, 0].to(dev))
    return states, student.readout(states[:, -1]).float()


@torch.no_grad()
def evaluate_student(student: Raptor, val: Batches, *, head: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
    """Fidelity per layer (all tokens) plus its layer means, and the head's top-1 on the student's readout."""
    teacher = student.teacher
    if teacher is None:
        raise ValueError("the student needs its teacher attached (student.attach(teacher))")
    head = _head(teacher, head)
    acc = FidelityAccumulator(student.geometry)
    correct, total = 0.0, 0
    for traj, labels in val:
        states, feats = _student_features(student, traj)
        acc.update(states, traj.to(states.device))
        correct += _correct(head, feats, labels)
        total += traj.shape[0]
    if total == 0:
        raise ValueError("no validation batches to evaluate the student on")
    fid = acc.compute()
    per_layer = {m: fid["all"][m].tolist() for m in ("r2", "cosine", "update_r2", "rel_error")}
    out: dict[str, Any] = {f"{m}_mean": sum(v) / len(v) for m, v in per_layer.items()}
    out["per_layer"] = {"layers": fid["layers"], **per_layer}
    out["top1"] = correct / total if head is not None else None
    return out


def _stats(values: list[float], target: float) -> dict[str, float | None]:
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    mean = float(t.mean())
    return {"value": target, "random_mean": mean, "random_std": std, "z": (target - mean) / std if std > 0 else None}


def partition_study(
    teacher: Teacher,
    train: Batches,
    val: Batches,
    *,
    boundaries: Sequence[int],
    n_random: int,
    stage1: StageConfig,
    stage2: StageConfig | None = None,
    depth_scaling: bool = True,
    seed: int = 0,
    head: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """Distil on the max-cut ``boundaries`` and on ``n_random`` random partitions with the same k and budget.

    Returns every run and, per metric, the max-cut value against the random mean +- sigma with its
    z-score (positive = max-cut better for update_r2/r2/cosine/top1; negative for rel_error).
    """
    chosen = check_boundaries(boundaries, teacher.depth)
    others = random_partitions(teacher.depth, len(chosen) + 1, n_random, seed=seed, exclude=[chosen])
    runs = []
    for kind, bnd in [("max-cut", chosen)] + [("random", b) for b in others]:
        student = distill_student(teacher, bnd, train, stage1, stage2, depth_scaling=depth_scaling, seed=seed)
        result = {"kind": kind, "boundaries": list(bnd), **evaluate_student(student, val, head=head)}
        log.info("partition %s %s: update-R2 %.4f rel-error %.4f", kind, bnd, result["update_r2_mean"], result["rel_error_mean"])
        runs.append(result)
    metrics = ["update_r2_mean", "r2_mean", "cosine_mean", "rel_error_mean"] + (["top1"] if runs[0]["top1"] is not None else [])
    summary = {m: _stats([r[m] for r in runs[1:]], runs[0][m]) for m in metrics}
    return {"boundaries": chosen, "n_random": n_random, "runs": runs, "summary": summary}


# --------------------------------------------------------------------------- ablation
ABLATION_ROWS = ("TF only", "+ annealed AR", "+ depth scaling", "+ cls weighting", "+ stage 2", "+ fine-tuned probe")


def ablation_study(
    teacher: Teacher,
    train: Batches,
    val: Batches,
    *,
    boundaries: Sequence[int],
    stage1: StageConfig,
    stage2: StageConfig,
    probe_epochs: int = 15,
    probe_lrs: Sequence[float] = (1e-4, 1e-3),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The paper's k=3 ablation table (METHOD.md section 6) as cumulative rows, each with fidelity and top-1.

    ``stage1`` is the full recipe's stage 1 (annealed lambda); the rows switch its parts on one by
    one: pure teacher forcing, annealed TF -> AR, depth scaling, cls-weighted last block, stage 2,
    and finally the student's linear probe fine-tuned from the teacher's head on ``train``.
    """
    head = _head(teacher, None)
    if head is None:
        raise ValueError("the ablation study needs a teacher with a linear head (teacher.head)")
    plain = dataclasses.replace(stage1, last_block_token_weights=None)
    weighted = dataclasses.replace(stage1, last_block_token_weights=stage1.last_block_token_weights or PAPER_LAST_BLOCK_TOKEN_WEIGHTS)
    tf_only = dataclasses.replace(plain, lambda_schedule="constant", lambda_start=1.0)
    configs = [(tf_only, False), (plain, False), (plain, True), (weighted, True)]
    rows: list[dict[str, Any]] = []
    student = None
    for name, (cfg, scaling) in zip(ABLATION_ROWS, configs):
        student = distill_student(teacher, boundaries, train, cfg, depth_scaling=scaling, seed=seed)
        rows.append({"row": name, **evaluate_student(student, val)})
        log.info("ablation %-18s update-R2 %.4f top-1 %.4f", name, rows[-1]["update_r2_mean"], rows[-1]["top1"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fit(student, [t for t, _ in train], stage2)
    student.eval()
    rows.append({"row": ABLATION_ROWS[4], **evaluate_student(student, val)})
    feats = {name: [_student_features(student, t)[1] for t, _ in data] for name, data in (("train", train), ("val", val))}
    labels = {name: torch.cat([y for _, y in data]) for name, data in (("train", train), ("val", val))}
    probe = train_linear_probe(
        torch.cat(feats["train"]), labels["train"], torch.cat(feats["val"]), labels["val"], num_classes=head[0].shape[0],
        lrs=probe_lrs, epochs=probe_epochs, batch_size=256, warmup_steps=10, init=head, seed=seed,
    )
    rows.append({**{k: v for k, v in rows[-1].items() if k != "row"}, "row": ABLATION_ROWS[5], "top1": probe.top1})
    log.info("ablation %-18s top-1 %.4f, then %.4f with the fine-tuned probe", ABLATION_ROWS[4], rows[-2]["top1"], probe.top1)
    return rows
