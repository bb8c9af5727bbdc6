"""Block discovery: exact DP vs brute force, planted-teacher recovery, bisection, baseline, CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from raptor.discovery import (
    bisection,
    layer_distances,
    objective,
    plot_distances,
    random_baseline,
    segment,
    swap_distances,
)
from tests.planted import boundaries_of, build_teacher, images


def _sym(L: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.random((L, L))
    a = a + a.T
    np.fill_diagonal(a, 0)
    return a


def _brute(d: np.ndarray, k: int) -> float:
    L = d.shape[0]
    return min(objective(d, list(b)) for b in itertools.combinations(range(1, L), k - 1))


@pytest.mark.parametrize("seed", range(6))
def test_segment_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    for L in (1, 2, 5, 8, 12):
        d = _sym(L, rng)
        ks = range(1, min(5, L) + 1)
        all_k = segment(d, ks)
        for k in ks:
            seg = all_k[k]
            assert len(seg.boundaries) == k - 1
            assert seg.boundaries == sorted(set(seg.boundaries))
            assert seg.objective == pytest.approx(objective(d, seg.boundaries))
            assert seg.objective == pytest.approx(_brute(d, k), abs=1e-9)
            assert seg.objective + seg.cut == pytest.approx(np.triu(d, 1).sum())
            assert segment(d, k).objective == pytest.approx(seg.objective)


def test_segment_objective_by_hand():
    # layers {1,2} close, {3,4} close, far across
    d = np.array([[0, 1, 9, 9], [1, 0, 9, 9], [9, 9, 0, 2], [9, 9, 2, 0]], float)
    s = segment(d, 2)
    assert s.boundaries == [2] and s.objective == pytest.approx(3.0)
    assert s.segments == [(1, 2), (3, 4)]
    assert segment(d, 1).objective == pytest.approx(1 + 2 + 4 * 9)
    assert segment(d, 4).objective == 0.0 and segment(d, 4).boundaries == [1, 2, 3]


def test_bad_k_and_matrix():
    d = np.zeros((4, 4))
    with pytest.raises(ValueError, match="k must be"):
        segment(d, 5)
    with pytest.raises(ValueError, match="k must be"):
        segment(d, 0)
    with pytest.raises(ValueError, match="square"):
        segment(np.zeros((3, 4)), 2)
    with pytest.raises(ValueError, match="NaN"):
        segment(np.full((3, 3), np.nan), 2)


def test_bisection_and_random_baseline():
    # three planted blocks of sizes 5, 4, 3: distances 0.1 inside, 1 across
    labels = np.repeat([0, 1, 2], [5, 4, 3])
    d = np.where(labels[:, None] == labels[None, :], 0.1, 1.0)
    np.fill_diagonal(d, 0)
    assert segment(d, 3).boundaries == [5, 9]
    b = bisection(d, 3, min_size=2)
    assert b.boundaries == [5, 9] and b.method == "bisection"
    assert bisection(d, None, eps=0.05).k >= 3  # threshold-driven splitting continues past 3
    assert bisection(d, None, eps=0.9).k == 1  # nothing cuts 90% of the weight
    rb = random_baseline(d, 3, 500, seed=1)
    assert rb.objective == pytest.approx(segment(d, 3).objective)
    assert rb.mean > rb.objective and rb.z < -1 and rb.sigmas_better == -rb.z


def test_layer_distances_batched_equals_whole():
    torch.manual_seed(0)
    traj = torch.randn(12, 7, 6, 8)  # B, L+1, N (1 cls + 1 reg + 4 patches), D
    for metric in ("cosine", "mse", "cka"):
        whole = layer_distances(traj, metric, geometry=2)
        parts = layer_distances([traj[:6], traj[6:]], metric, geometry=2)
        assert whole.shape == (6, 6)
        assert torch.allclose(whole, whole.T)
        assert torch.all(whole.diagonal() == 0)
        if metric != "cka":  # minibatch CKA is an estimator that depends on the batching
            assert torch.allclose(whole, parts, atol=1e-5)
    # cosine by hand for one pair
    f = torch.stack([traj[:, 1:, 0], traj[:, 1:, 2:].mean(2)], 2)
    cos = torch.nn.functional.cosine_similarity(f[:, 0], f[:, 3], dim=-1)  # [B, 2]
    want = (1 - cos).sum(-1).mean()
    assert layer_distances(traj, "cosine", geometry=2)[0, 3] == pytest.approx(float(want), rel=1e-5)
    # identical layers -> distance 0; cka of a layer with a scaled copy -> 0
    t2 = traj.clone()
    t2[:, 2] = 3 * t2[:, 1]
    assert layer_distances(t2, "cka", geometry=2)[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert layer_distances(t2, "cosine", geometry=2)[0, 1] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="metric"):
        layer_distances(traj, "l1", geometry=2)
    with pytest.raises(ValueError, match="geometry"):
        layer_distances(traj, "cosine")


def test_planted_teacher_swap_distances_recover_boundaries():
    torch.set_num_threads(1)
    pattern = (7, 3, 2)
    teacher = build_teacher(pattern)
    x = images(16)
    s = swap_distances(teacher, [x[:8], x[8:]])
    assert s.shape == (12, 12)
    # within a planted segment the blocks are identical: zero functional distance
    assert float(s[:7, :7].abs().max()) == 0.0 and float(s[7:10, 7:10].abs().max()) == 0.0
    assert float(s[:7, 7:].min()) > 0.1
    seg = segment(s, 3)
    assert seg.boundaries == boundaries_of(pattern) == [7, 10]
    # the representational metrics run on the same trajectories (no claim about what they find)
    traj = teacher.trajectory(x)
    for metric in ("cosine", "mse", "cka"):
        d = layer_distances(traj, metric, geometry=teacher.geometry)
        assert len(segment(d, 3).boundaries) == 2


def test_plot_and_cli(tmp_path, capsys):
    from raptor.cli import main

    labels = np.repeat([0, 1, 2], [7, 3, 2])
    d = np.where(labels[:, None] == labels[None, :], 0.1, 1.0)
    np.fill_diagonal(d, 0)
    path = tmp_path / "d.npy"
    np.save(path, d)
    png = tmp_path / "heat.png"
    assert main(["maxcut", str(path), "--k", "3", "--json", "--plot", str(png), "--baseline", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["boundaries"] == [7, 10] and out["method"] == "dp"
    assert out["random_baseline"]["z"] < 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["maxcut", str(path), "--k", "3", "--method", "bisection"]) == 0
    assert "boundaries [7, 10]" in capsys.readouterr().out
    assert main(["maxcut", str(path), "--k", "13"]) == 2
    assert "--k must be" in capsys.readouterr().err
    fig = plot_distances(d, [7, 10])
    assert fig.axes
