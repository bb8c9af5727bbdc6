"""Depth as time: the dynamical-interpretability measures of METHOD.md section 8.

Every function is pure and works on trajectories ``[B, L+1, N, D]`` (a_0 and every block output,
raw residual stream) from a teacher or a student rollout. Directions live on the unit sphere,
x^_l = x_l / ||x_l|| per token, because the residual stream's norm grows with depth and would
otherwise dominate every comparison.

Token groups come from the teacher's geometry (``teacher.geometry.groups()``: ``cls``, ``registers``,
``patches`` -> slices of the token axis), so the measures are reported per token type.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

_EPS = 1e-12


def _check_trajectory(traj: Tensor) -> None:
    if traj.ndim != 4 or traj.shape[1] < 2:
        raise ValueError(f"a trajectory must be [batch, L+1 >= 2, tokens, dim] (got shape {tuple(traj.shape)})")


def unit(x: Tensor) -> Tensor:
    """Project every token onto the unit sphere (last axis)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def directional_convergence(traj: Tensor) -> Tensor:
    """gamma_l = <x^_l, x^_L> per sample, layer and token: ``[B, L+1, N]``, rising to 1 at l = L."""
    _check_trajectory(traj)
    u = unit(traj.float())
    return (u * u[:, -1:]).sum(-1)


def angular_speed(traj: Tensor) -> Tensor:
    """s_l = arccos <x^_{l+1}, x^_l> in radians: ``[B, L, N]``; entry l is the step that produces layer l+1."""
    _check_trajectory(traj)
    u = unit(traj.float())
    return (u[:, 1:] * u[:, :-1]).sum(-1).clamp(-1.0, 1.0).acos()


def updates(traj: Tensor, tokens: slice, *, on_sphere: bool = True) -> Tensor:
    """U_l = x_{l+1} - x_l of the selected tokens: ``[B, L, n, D]`` (on the unit sphere by default)."""
    _check_trajectory(traj)
    x = traj[:, :, tokens].float()
    if on_sphere:
        x = unit(x)
    return x[:, 1:] - x[:, :-1]


def stable_rank(u: Tensor) -> Tensor:
    """||U||_F^2 / ||U||_2^2 of each matrix in ``[..., n, D]``: an effective number of directions of motion."""
    sv = torch.linalg.svdvals(u.float())
    return (sv.square().sum(-1) / sv[..., 0].square().clamp_min(_EPS)).where(sv[..., 0] > _EPS, torch.zeros(()))


def coherence(u: Tensor) -> Tensor:
    """Mean pairwise cosine between the rows of each ``[..., n, D]`` (n >= 2): 1 when all move together."""
    n = u.shape[-2]
    if n < 2:
        raise ValueError("coherence needs at least two tokens")
    s = unit(u.float()).sum(-2)
    return (s.square().sum(-1) - n) / (n * (n - 1))


def group_curves(values: Tensor, groups: Mapping[str, slice]) -> dict[str, Tensor]:
    """Average a per-token measure ``[B, T, N]`` over the batch and each token group -> ``{group: [T]}``."""
    return {name: values[:, :, s].mean(dim=(0, 2)) for name, s in groups.items() if s.stop > s.start}


def crossing_layer(curve: Sequence[float] | Tensor, level: float = 0.5) -> float | None:
    """First (linearly interpolated) layer where a rising curve reaches ``level``: the S-curve's midpoint."""
    c = [float(v) for v in curve]
    for i in range(len(c)):
        if c[i] >= level:
            if i == 0:
                return 0.0
            return i - 1 + (level - c[i - 1]) / (c[i] - c[i - 1])
    return None


def boundary_jumps(speed: Sequence[float] | Tensor, boundaries: Sequence[int]) -> dict[str, float | None]:
    """Mean |s change| where one block hands over to the next versus inside blocks.

    ``speed[l]`` is the step producing layer l+1 (:func:`angular_speed`). Boundary b (the last layer
    of a block) separates the step producing layer b (``speed[b-1]``) from the one producing layer
    b+1 (``speed[b]``).
    """
    s = [float(v) for v in speed]
    depth = len(s)
    if any(not 1 <= b < depth for b in boundaries):
        raise ValueError(f"boundaries must lie in 1..{depth - 1} (got {list(boundaries)})")
    jumps = {b: abs(s[b] - s[b - 1]) for b in range(1, depth)}
    marked = set(boundaries)
    at = [jumps[b] for b in marked]
    inside = [j for b, j in jumps.items() if b not in marked]
    mean_at = sum(at) / len(at) if at else None
    mean_inside = sum(inside) / len(inside) if inside else None
    ratio = mean_at / mean_inside if mean_at is not None and mean_inside else None
    return {"at_boundaries": mean_at, "inside_blocks": mean_inside, "ratio": ratio}


def silhouette(x: Tensor, labels: Tensor) -> float:
    """Mean silhouette score of the rows of ``x`` by class, with cosine distance 1 - cos.

    a(i) = mean distance to the other members of i's class, b(i) = smallest mean distance to another
    class, s(i) = (b - a) / max(a, b); members of singleton classes score 0 (the usual convention).
    """
    labels = labels.reshape(-1).long()
    if x.ndim != 2 or x.shape[0] != labels.shape[0]:
        raise ValueError(f"silhouette needs [n, D] points and n labels (got {tuple(x.shape)} and {labels.shape[0]})")
    classes, inv = labels.unique(return_inverse=True)
    if len(classes) < 2:
        raise ValueError("silhouette needs at least two classes")
    u = unit(x.float())
    dist = (1.0 - u @ u.T).clamp_min(0.0)
    onehot = torch.nn.functional.one_hot(inv, len(classes)).float()  # [n, C]
    counts = onehot.sum(0)  # [C]
    sums = dist @ onehot  # [n, C]: summed distance from i to each class
    own = counts[inv]
    a = sums.gather(1, inv[:, None]).squeeze(1) / (own - 1).clamp_min(1)
    mean_other = sums / counts
    mean_other = mean_other.scatter(1, inv[:, None], float("inf"))
    b = mean_other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(_EPS)
    s = torch.where(own > 1, s, torch.zeros_like(s))
    return s.mean().item()


def _perturb(x: Tensor, scale: float, gen: torch.Generator) -> Tensor:
    """Add to every token a random direction of norm ``scale * ||token||`` (noise relative to the state)."""
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device)
    return x + scale * x.float().norm(dim=-1, keepdim=True) * unit(noise)


@torch.no_grad()
def basin_robustness(
    traj: Tensor,
    continue_fn: Callable[[Tensor, int], Tensor],
    *,
    layers: Sequence[int],
    scales: Sequence[float],
    predict_fn: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
) -> list[dict[str, float | int | None]]:
    """Perturb the state at layer l, continue the dynamics to depth L, and see whether it lands in the same basin.

    ``continue_fn(x_l, l)`` maps a state at layer l to the final state ``[B, N, D]`` (a teacher's
    remaining blocks or the student's rollout from l). The reference is the unperturbed state
    continued the same way, so only the perturbation differs. Noise is relative: each token moves
    by ``scale * ||token||`` in a random direction. ``predict_fn(final) -> class ids`` (readout plus
    head) adds whether the prediction holds.
    """
    _check_trajectory(traj)
    depth = traj.shape[1] - 1
    if any(not 0 <= layer <= depth for layer in layers):
        raise ValueError(f"perturbation layers must lie in 0..{depth} (got {list(layers)})")
    if any(s < 0 for s in scales):
        raise ValueError(f"noise scales must be >= 0 (got {list(scales)})")
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, float | int | None]] = []
    for layer in layers:
        clean_state = traj[:, layer]
        ref = continue_fn(clean_state, layer)
        ref_pred = predict_fn(ref) if predict_fn is not None else None
        for scale in scales:
            out = continue_fn(_perturb(clean_state, scale, gen).to(clean_state.dtype), layer)
            cos = (unit(out.float()) * unit(ref.float())).sum(-1)  # [B, N]
            held = None if ref_pred is None else (predict_fn(out) == ref_pred).float().mean().item()
            rows.append(
                {"layer": int(layer), "scale": float(scale), "cos_cls": cos[:, 0].mean().item(), "cos_all": cos.mean().item(), "prediction_held": held}
            )
    return rows


def dynamics_summary(traj: Tensor, groups: Mapping[str, slice], boundaries: Sequence[int] = ()) -> dict[str, object]:
    """Every trajectory-only measure as JSON-ready lists: per-group gamma and speed, patch-update rank and coherence.

    ``groups`` must hold ``patches`` (``teacher.geometry.groups()``).
    """
    _check_trajectory(traj)
    if "patches" not in groups:
        raise ValueError(f"token groups need 'patches' (got {sorted(groups)})")
    gamma = {k: v.tolist() for k, v in group_curves(directional_convergence(traj), groups).items()}
    speed = {k: v.tolist() for k, v in group_curves(angular_speed(traj), groups).items()}
    u = updates(traj, groups["patches"])  # [B, L, P, D]
    out: dict[str, object] = {
        "depth": traj.shape[1] - 1,
        "num_samples": traj.shape[0],
        "gamma": gamma,
        "gamma_midpoint": {k: crossing_layer(v) for k, v in gamma.items()},
        "speed": speed,
        "speed_deg": {k: [math.degrees(s) for s in v] for k, v in speed.items()},
        "patch_stable_rank": stable_rank(u).mean(0).tolist(),
        "patch_coherence": (coherence(u).mean(0).tolist() if u.shape[2] >= 2 else None),
    }
    if boundaries:
        out["speed_jumps"] = {k: boundary_jumps(v, boundaries) for k, v in speed.items()}
    return out
