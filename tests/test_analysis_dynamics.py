"""Dynamics measures on hand-built trajectories whose answers are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raptor.analysis import dynamics as dyn
from raptor.models import TokenGeometry


def _groups(num_tokens: int, num_registers: int = 0) -> dict[str, slice]:
    return TokenGeometry(num_prefix=1 + num_registers, num_registers=num_registers, num_patches=num_tokens - 1 - num_registers, depth=1, width=1).groups()


def _rotation(theta: float, depth: int, batch: int = 2, tokens: int = 5, dim: int = 6) -> torch.Tensor:
    """Every token rotates by ``theta`` per layer in its own plane, with a norm that grows with depth."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    e1, e2 = q[:, 0], q[:, 1]
    out = torch.empty(batch, depth + 1, tokens, dim)
    for n in range(tokens):
        phase = 0.3 * n
        for layer in range(depth + 1):
            a = phase + layer * theta
            out[:, layer, n] = (1.0 + layer) * (math.cos(a) * e1 + math.sin(a) * e2)
    return out


def test_rotation_gives_its_angular_speed_and_gamma() -> None:
    theta, depth = 0.2, 8
    traj = _rotation(theta, depth)
    speed = dyn.angular_speed(traj)
    assert speed.shape == (2, depth, 5)
    assert torch.allclose(speed, torch.full_like(speed, theta), atol=1e-5)
    gamma = dyn.directional_convergence(traj)
    expected = torch.tensor([math.cos((depth - l) * theta) for l in range(depth + 1)])
    assert torch.allclose(gamma[0, :, 0], expected, atol=1e-5)
    assert gamma[:, -1].allclose(torch.ones(2, 5))


def test_gamma_midpoint_and_group_curves() -> None:
    values = torch.arange(6.0).reshape(1, 1, 6).expand(3, 2, 6)
    curves = dyn.group_curves(values, _groups(6, num_registers=2))
    assert curves["cls"].tolist() == [0.0, 0.0] and curves["registers"].tolist() == [1.5, 1.5] and curves["patches"].tolist() == [4.0, 4.0]
    assert list(dyn.group_curves(values, {"cls": slice(0, 1), "registers": slice(1, 1), "patches": slice(1, 6)})) == ["cls", "patches"]
    assert dyn.crossing_layer([0.0, 0.2, 0.6, 1.0]) == pytest.approx(1.75)
    assert dyn.crossing_layer([0.0, 0.1]) is None


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_updates_of_known_rank_give_that_stable_rank(rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    patches, dim, depth = 12, 16, 4
    traj = torch.zeros(2, depth + 1, 1 + patches, dim)
    for layer in range(depth):
        a, _ = torch.linalg.qr(torch.randn(patches, rank, generator=g))  # orthonormal columns
        b, _ = torch.linalg.qr(torch.randn(dim, rank, generator=g))
        traj[:, layer + 1, 1:] = traj[:, layer, 1:] + (a @ b.T)  # all singular values 1
    u = dyn.updates(traj, _groups(1 + patches)["patches"], on_sphere=False)
    assert torch.allclose(dyn.stable_rank(u), torch.full((2, depth), float(rank)), atol=1e-4)


def test_stable_rank_with_unequal_singular_values_and_zero_updates() -> None:
    u = torch.zeros(4, 3)
    u[0, 0], u[1, 1] = 3.0, 1.0
    assert dyn.stable_rank(u).item() == pytest.approx(10 / 9)
    assert dyn.stable_rank(torch.zeros(4, 3)).item() == 0.0


def test_coherence_known_cases() -> None:
    v = torch.randn(7)
    assert dyn.coherence(v.expand(6, 7)).item() == pytest.approx(1.0, abs=1e-6)
    assert dyn.coherence(torch.eye(5)).item() == pytest.approx(0.0, abs=1e-7)
    half = torch.cat([v.expand(3, 7), -v.expand(3, 7)])
    assert dyn.coherence(half).item() == pytest.approx(-1 / 5, abs=1e-6)
    x = torch.randn(9, 4)
    xn = (x / x.norm(dim=1, keepdim=True)).numpy()
    c = xn @ xn.T
    assert dyn.coherence(x).item() == pytest.approx((c.sum() - 9) / 72, abs=1e-5)


def test_boundary_jumps() -> None:
    speed = [0.1, 0.1, 0.1, 0.5, 0.5, 0.2]  # steps producing layers 1..6, blocks [1-3], [4-5], [6]
    jumps = dyn.boundary_jumps(speed, [3, 5])
    assert jumps["at_boundaries"] == pytest.approx((0.4 + 0.3) / 2)
    assert jumps["inside_blocks"] == pytest.approx(0.0)
    assert jumps["ratio"] is None
    with pytest.raises(ValueError, match="boundaries must lie in 1..5"):
        dyn.boundary_jumps(speed, [6])


def _silhouette_numpy(x: np.ndarray, y: np.ndarray) -> float:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.maximum(1 - xn @ xn.T, 0)
    scores = []
    for i in range(len(x)):
        same = (y == y[i]) & (np.arange(len(x)) != i)
        if not same.any():
            scores.append(0.0)
            continue
        a = d[i, same].mean()
        b = min(d[i, y == c].mean() for c in np.unique(y) if c != y[i])
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


def test_silhouette_matches_numpy_and_separates_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 4, (40,), generator=g)
    y[0] = 7  # a singleton class
    assert dyn.silhouette(x, y) == pytest.approx(_silhouette_numpy(x.numpy(), y.numpy()), abs=1e-5)
    centers = torch.eye(5)[:3] * 10
    labels = torch.arange(30) % 3
    tight = centers[labels] + 0.05 * torch.randn(30, 5, generator=g)
    assert dyn.silhouette(tight, labels) > 0.95
    with pytest.raises(ValueError, match="two classes"):
        dyn.silhouette(x, torch.zeros(40))


def test_basin_robustness_on_a_contracting_map() -> None:
    """A map that pulls every token toward a class anchor: small noise keeps the basin, large noise at the end does not."""
    anchors = torch.eye(4) * 3.0
    depth = 6

    def step(x: torch.Tensor) -> torch.Tensor:
        sims = x @ anchors.T  # [B, N, 4]
        target = anchors[sims.argmax(-1)]
        return 0.5 * x + 0.5 * target

    def continue_fn(x: torch.Tensor, start: int) -> torch.Tensor:
        for _ in range(start, depth):
            x = step(x)
        return x

    x0 = anchors[torch.tensor([0, 1, 2, 3])][:, None, :].repeat(1, 3, 1) + 0.1
    traj = [x0]
    for _ in range(depth):
        traj.append(step(traj[-1]))
    traj_t = torch.stack(traj, dim=1)  # [4, 7, 3, 4]
    predict = lambda final: final[:, 0].argmax(-1)  # noqa: E731
    rows = dyn.basin_robustness(traj_t, continue_fn, layers=[0, depth], scales=[0.0, 0.05, 3.0], predict_fn=predict, seed=0)
    by = {(r["layer"], r["scale"]): r for r in rows}
    assert by[(0, 0.0)]["cos_all"] == pytest.approx(1.0) and by[(0, 0.0)]["prediction_held"] == 1.0
    assert by[(0, 0.05)]["cos_cls"] > 0.99 and by[(0, 0.05)]["prediction_held"] == 1.0
    assert by[(depth, 3.0)]["cos_all"] < 0.9  # nothing left to pull it back
    with pytest.raises(ValueError, match="0..6"):
        dyn.basin_robustness(traj_t, continue_fn, layers=[7], scales=[0.1])


def test_summary_is_json_ready() -> None:
    import json

    traj = _rotation(0.1, 6, tokens=6)
    summary = dyn.dynamics_summary(traj, _groups(6, num_registers=1), boundaries=[3])
    json.dumps(summary)
    assert summary["depth"] == 6 and len(summary["gamma"]["patches"]) == 7 and len(summary["patch_stable_rank"]) == 6
    assert summary["speed_deg"]["cls"][0] == pytest.approx(math.degrees(0.1), abs=1e-3)
    with pytest.raises(ValueError, match=r"\[batch, L\+1"):
        dyn.dynamics_summary(traj[0], _groups(6))
    with pytest.raises(ValueError, match="need 'patches'"):
        dyn.dynamics_summary(traj, {"cls": slice(0, 1)})
