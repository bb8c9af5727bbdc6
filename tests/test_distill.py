"""Losses on hand-computable cases, schedules, step/fit plumbing, fidelity."""

from __future__ import annotations

import math

import pytest
import torch

from raptor.distill import (
    FidelityAccumulator,
    StageConfig,
    ar_loss,
    fidelity,
    fit,
    lambda_at,
    lr_factor,
    lr_scheduler,
    stage1_loss,
    stage2_loss,
    tf_loss,
    token_loss,
)
from raptor.models import Raptor, RaptorBlock, TokenGeometry
from tests.planted import build_teacher, images

LAY = TokenGeometry(num_prefix=3, num_registers=2, num_patches=4, depth=6, width=8, num_heads=2)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def identity_student(boundaries=(3, 5)) -> Raptor:
    """Blocks with LayerScale 0 and no depth scaling: every block is the identity map."""
    blocks = [RaptorBlock(8, 2, depth_scaling=False, ls_init=0.0) for _ in range(len(boundaries) + 1)]
    return Raptor(blocks, list(boundaries), LAY)


def linear_trajectory(B=2) -> torch.Tensor:
    """a_l = l * v with v = 1 on cls, 2 on registers, 3 on patches: per-group squared step 1/4/9."""
    v = torch.tensor([1.0] + [2.0] * 2 + [3.0] * 4)[:, None].expand(7, 8)
    return torch.stack([l * v for l in range(7)])[None].repeat(B, 1, 1, 1)


def test_token_loss_groups():
    p, t = torch.zeros(2, 7, 8), linear_trajectory()[:, 1]
    assert torch.allclose(token_loss(p, t, LAY), torch.full((2,), (1 + 2 * 4 + 4 * 9) / 7))
    w = token_loss(p, t, LAY, (0.34, 0.33, 0.33))
    assert torch.allclose(w, torch.full((2,), 0.34 * 1 + 0.33 * 4 + 0.33 * 9))
    assert torch.allclose(token_loss(p, t, LAY, (0.0, 1.0, 0.0)), torch.full((2,), 4.0))
    assert torch.allclose(token_loss(t, 2 * t, LAY, kind="cosine"), torch.zeros(2), atol=1e-6)
    no_reg = TokenGeometry(num_prefix=1, num_registers=0, num_patches=6, depth=6, width=8)
    assert torch.allclose(token_loss(p, t, no_reg, (0.5, 7.0, 0.5)), torch.full((2,), 0.5 * 1 + 0.5 * (4 * 2 + 9 * 4) / 6))


def test_identity_student_tf_and_ar_by_hand():
    s, tr = identity_student(), linear_trajectory()
    w = (0.34, 0.33, 0.33)
    c = 0.34 * 1 + 0.33 * 4 + 0.33 * 9  # weighted loss of one unit step
    # TF: each layer predicted from the teacher's previous state -> one unit step everywhere
    loss, per = tf_loss(s, tr, 0, 3, weights=w)
    assert torch.allclose(per, torch.full((3,), c)) and loss.item() == pytest.approx(c, rel=1e-6)
    # AR on block 0 (layers 1..3): stays at a_0, errors 1, 4, 9 steps^2
    loss, per = ar_loss(s, tr, 0, weights=w)
    assert torch.allclose(per, torch.tensor([1.0, 4.0, 9.0]) * c)
    assert loss.item() == pytest.approx(c * 14 / 3, rel=1e-6)
    # hybrid with lambda = 0.25 on all three blocks (segments 3, 2, 1 layers)
    cfg = StageConfig(token_weights=w)
    total, m = stage1_loss(s, tr, cfg, lam=0.25)
    ar = [14 / 3, 5 / 2, 1.0]
    want = sum(0.25 * c + 0.75 * a * c for a in ar)
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert m["lambda"].item() == 0.25 and not m["loss"].requires_grad
    assert m["layer5/loss"].item() == pytest.approx(4 * c, rel=1e-6)
    # stage 2: the chained identity stays at a_0 -> layer l error l^2
    cfg2 = StageConfig(stage=2, token_weights=w)
    loss2, m2 = stage2_loss(s, tr, cfg2)
    assert loss2.item() == pytest.approx(c * sum(l * l for l in range(1, 7)) / 6, rel=1e-6)
    assert m2["layer6/loss"].item() == pytest.approx(36 * c, rel=1e-6)


@pytest.mark.parametrize("H", [1, 2, 3])
def test_ar_horizon_rolls_exactly_h_steps(H):
    s, tr = identity_student((3, 5)), linear_trajectory()
    calls = []
    s.blocks[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    loss, per = ar_loss(s, tr, 0, horizon=H)
    starts = 3 - H + 1
    assert len(calls) == H and all(n == 2 * starts for n in calls)  # H steps, all starts batched
    # identity: a prediction h+1 steps ahead misses by (h+1) unit steps
    unit = (1 + 2 * 4 + 4 * 9) / 7
    assert loss.item() == pytest.approx(unit * sum((h + 1) ** 2 for h in range(H)) / H, rel=1e-6)
    assert per.shape == (3,)


def test_lambda_and_lr_schedules_end_points():
    for kind in ("linear", "cosine"):
        assert lambda_at(0, 100, kind) == 1.0
        assert lambda_at(25, 100, kind) == pytest.approx(0.0, abs=1e-12)
        assert lambda_at(99, 100, kind) == pytest.approx(0.0, abs=1e-12)
        assert lambda_at(0, 100, kind, minimum=0.2) == 1.0
        assert lambda_at(50, 100, kind, minimum=0.2, rho=0.5) == pytest.approx(0.2)
        assert 0.0 < lambda_at(10, 100, kind) < 1.0
    assert lambda_at(12, 100, "linear") == pytest.approx(1 - 12 / 25)
    assert lambda_at(50, 100, "constant", start=0.3) == 0.3
    with pytest.raises(ValueError):
        StageConfig(lambda_schedule="step")
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.01) == pytest.approx(0.01)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = StageConfig(steps=20, lr=1.0, min_lr=0.1, warmup_steps=5)
    sched = lr_scheduler(opt, cfg)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_stage_config_roundtrip_and_weights():
    cfg = StageConfig.paper_stage1(1000)
    assert cfg.weights_for_block(2, 3) == (0.34, 0.33, 0.33) and cfg.weights_for_block(0, 3) is None
    assert StageConfig.paper_stage2(10).weights_for_block(0, 3) == (0.45, 0.10, 0.45)
    assert StageConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        StageConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="stage"):
        StageConfig(stage=3)


def test_all_blocks_loss_has_independent_gradients():
    t = build_teacher((2, 2, 2), width=32, heads=2, img_size=28)
    tr = t.trajectory(images(4, 28))
    s = Raptor.from_teacher(t, [2, 4], seed=0)
    cfg = StageConfig(last_block_token_weights=(0.34, 0.33, 0.33))
    total, _ = stage1_loss(s, tr, cfg, lam=0.5)
    grads_all = torch.autograd.grad(total, list(s.parameters()))
    for j in range(3):
        alone, _ = stage1_loss(s, tr, cfg, lam=0.5, blocks=[j])
        g = torch.autograd.grad(alone, list(s.blocks[j].parameters()))
        offset = sum(len(list(s.blocks[i].parameters())) for i in range(j))
        for a, b in zip(grads_all[offset : offset + len(g)], g):
            assert torch.allclose(a, b, atol=1e-7)
    with pytest.raises(ValueError, match="trajectory must be"):
        stage1_loss(s, tr[:, :3], cfg, lam=0.5)


def test_fit_trains_only_student_and_teacher_is_unchanged():
    t = build_teacher((2, 2), width=32, heads=2, img_size=28)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    s = Raptor.from_teacher(t, [2], seed=0)
    start = {k: v.clone() for k, v in s.state_dict().items()}
    x = images(8, 28)
    cfg = StageConfig(steps=6, lr=1e-3, warmup_steps=2)
    r = fit(s, [x[:4], x[4:]], cfg, teacher=t, log_every=1)
    assert r.steps == 6 and len(r.history) == 6 and r.history[0]["lambda"] == 1.0
    assert all(math.isfinite(h["loss"]) for h in r.history)
    for k, v in t.state_dict().items():
        assert torch.equal(v, before[k]), k  # bitwise unchanged
    assert all(p.grad is None for p in t.parameters())
    assert any(not torch.equal(v, start[k]) for k, v in s.state_dict().items())
    # stage 1 on one block leaves the others untouched
    snap = {k: v.clone() for k, v in s.state_dict().items()}
    tr = t.trajectory(x)
    fit(s, [tr], StageConfig(steps=2, lr=1e-3, blocks=[1]))
    for k, v in s.state_dict().items():
        assert torch.equal(v, snap[k]) == k.startswith("blocks.0."), k
    # stage 2 runs and gradients land on the student only
    loss, _ = stage2_loss(s, tr, StageConfig(stage=2, token_weights=(0.45, 0.1, 0.45)))
    loss.backward()
    assert all(p.grad is not None for p in s.parameters())
    assert all(p.grad is None for p in t.parameters())


def test_fidelity_metrics():
    torch.manual_seed(0)
    tr = torch.randn(4, 4, 9, 8)
    tr[:, 1:] = tr[:, :1] + 0.3 * tr[:, 1:]  # a_0 dominates every state
    f = fidelity(tr[:, 1:].clone(), tr, TokenGeometry(num_prefix=5, num_registers=4, num_patches=4, depth=3, width=8))
    assert f["layers"] == [1, 2, 3] and set(f) == {"layers", "all", "cls", "registers", "patches"}
    for g in ("all", "cls", "registers", "patches"):
        assert torch.allclose(f[g]["r2"], torch.ones(3, dtype=torch.float64)) and torch.allclose(f[g]["update_r2"], torch.ones(3, dtype=torch.float64))
        assert torch.allclose(f[g]["rel_error"], torch.zeros(3, dtype=torch.float64)) and torch.allclose(f[g]["cosine"], torch.ones(3, dtype=torch.float64))
    # predicting "no update" (s_l = a_0) scores high plain r2 but update_r2 <= 0, rel_error 1
    lazy = tr[:, :1].expand(-1, 3, -1, -1)
    f = fidelity(lazy, tr)
    assert set(f) == {"layers", "all"}
    assert torch.all(f["all"]["r2"] > 0.8) and torch.all(f["all"]["update_r2"] < 0.0)
    assert torch.allclose(f["all"]["rel_error"], torch.ones(3, dtype=torch.float64))
    # R^2 by hand for one layer: rows = samples x tokens
    pred = tr[:, 1:] + 0.1 * torch.randn_like(tr[:, 1:])
    f = fidelity(pred, tr)
    y, p = tr[:, 2].reshape(-1, 8).double(), pred[:, 1].reshape(-1, 8).double()
    want = 1 - (y - p).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert f["all"]["r2"][1].item() == pytest.approx(want.item(), rel=1e-9)
    # accumulated over batches equals one pass over everything
    acc = FidelityAccumulator()
    acc.update(pred[:2], tr[:2])
    acc.update(pred[2:], tr[2:])
    g = acc.compute()
    for m in ("r2", "cosine", "update_r2", "rel_error"):
        assert torch.allclose(g["all"][m], f["all"][m])
    # start offset: states for layers 2..3
    f = fidelity(tr[:, 2:], tr, start=1)
    assert f["layers"] == [2, 3]
