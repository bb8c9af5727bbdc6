"""Linear probe: separable features reach ~100%, chance features stay at chance, teacher-head init, the LR schedule, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raptor.eval.probe import (
    ProbeConfig,
    evaluate_head,
    extract_features,
    fit_heads,
    new_heads,
    student_share,
    topk_accuracy,
    train_linear_probe,
)


def _blobs(n: int, num_classes: int, dim: int, sep: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * sep
    y = torch.randint(0, num_classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def test_separable_features_reach_full_accuracy() -> None:
    xtr, ytr = _blobs(600, 10, 32, sep=4.0, seed=0)
    xva, yva = _blobs(300, 10, 32, sep=4.0, seed=1)
    res = train_linear_probe(xtr, ytr, xva, yva, num_classes=10, lrs=[1e-3, 1e-2], epochs=20, batch_size=64, warmup_steps=10)
    assert res.top1 >= 0.99
    assert res.top5 == pytest.approx(1.0)
    assert res.best_lr in (1e-3, 1e-2) and set(res.per_lr) == {1e-3, 1e-2}
    assert res.weight.shape == (10, 32) and res.bias.shape == (10,)
    # the returned head reproduces the reported accuracy
    assert evaluate_head(res.weight, res.bias, xva, yva)["top1"] == pytest.approx(res.top1)
    d = res.to_dict()
    assert d["per_lr"][0]["lr"] == 1e-3 and "weight" not in d


def test_random_labels_stay_near_chance() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(800, 16, generator=g), torch.randint(0, 4, (800,), generator=g)
    res = train_linear_probe(x[:600], y[:600], x[600:], y[600:], num_classes=4, lrs=[1e-2], epochs=10, batch_size=64, warmup_steps=5)
    assert 0.1 < res.top1 < 0.45


def test_init_from_teacher_head_starts_at_its_accuracy() -> None:
    xtr, ytr = _blobs(400, 5, 8, sep=3.0, seed=0)
    xva, yva = _blobs(200, 5, 8, sep=3.0, seed=1)
    trained = train_linear_probe(xtr, ytr, xva, yva, num_classes=5, lrs=[1e-2], epochs=15, batch_size=32, warmup_steps=5)
    # a tiny learning rate keeps the head where it started: the result is the init head's accuracy
    tuned = train_linear_probe(xtr, ytr, xva, yva, num_classes=5, lrs=[1e-9], epochs=1, batch_size=32, warmup_steps=0, init=(trained.weight, trained.bias))
    assert tuned.top1 == pytest.approx(trained.top1)
    assert torch.allclose(tuned.weight, trained.weight, atol=1e-5)


def test_heads_follow_the_dinov2_lr_schedule() -> None:
    """Per step, each head's LR is its peak x linear warm-up over warmup_steps, then cosine to 0 at the end.

    Catches a warm-up of the wrong length or shape, a missing or shifted cosine, a schedule that
    does not reach zero, or one head's peak applied to another. AdamW with a constant unit gradient
    and no weight decay moves a weight by exactly the step's LR (m^ / sqrt(v^) = 1), so the weights'
    trajectory reads the schedule out of the real training loop.
    """
    cfg = ProbeConfig(lrs=(1e-3, 1e-2), epochs=4, batch_size=10, weight_decay=0.0, warmup_steps=5)
    num_samples, total, warmup = 50, 20, 5  # 5 steps per epoch
    heads = new_heads(cfg, 1, 1, None, torch.device("cpu")).double()  # float64: differences of 1e-5 LRs stay exact
    weights: list[list[float]] = []

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        weights.append([h.weight.item() for h in heads])
        return sum(h.weight.sum() for h in heads)

    fit_heads(heads, batch_loss, num_samples, cfg)
    weights.append([h.weight.item() for h in heads])
    taken = -np.diff(np.array(weights), axis=0)  # [steps, heads]: the LR of every step
    assert taken.shape == (total, 2)

    def factor(t: int) -> float:
        return (t + 1) / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))

    expected = np.array([[lr * factor(t) for lr in cfg.lrs] for t in range(total)])
    np.testing.assert_allclose(taken, expected, rtol=1e-6)
    assert taken[0, 1] == pytest.approx(1e-2 / warmup) and taken[warmup - 1, 1] == pytest.approx(1e-2)
    assert np.all(np.diff(taken[warmup:], axis=0) < 0) and taken[-1, 1] < 0.02 * 1e-2  # peak, then down to ~0 by the last step


def test_topk_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(500, 20, generator=g), torch.randint(0, 20, (500,), generator=g)
    acc = topk_accuracy(logits, y)
    order = np.argsort(-logits.numpy(), axis=1)
    assert acc["top1"] == pytest.approx(np.mean(order[:, 0] == y.numpy()))
    assert acc["top5"] == pytest.approx(np.mean([y[i].item() in order[i, :5] for i in range(500)]))
    assert topk_accuracy(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))["top5"] == 1.0  # k capped at C


def test_extract_features_over_batches() -> None:
    batches = [(torch.full((4, 3, 2, 2), float(i)), torch.arange(4) + i) for i in range(3)]
    feats, labels = extract_features(lambda x: x.flatten(1).mean(1, keepdim=True).repeat(1, 2), batches, max_samples=10)
    assert feats.shape == (10, 2) and labels.tolist() == [0, 1, 2, 3, 1, 2, 3, 4, 2, 3]
    assert feats[:, 0].tolist() == [0.0] * 4 + [1.0] * 4 + [2.0] * 2
    feats2, _ = extract_features(lambda x: x.flatten(1)[:, :1], [{"image": torch.ones(2, 1), "label": torch.zeros(2)}])
    assert feats2.shape == (2, 1)


def test_bad_input_is_named() -> None:
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        train_linear_probe(x, y + 5, x, y, num_classes=3)
    with pytest.raises(ValueError, match="width 4 but val features 5"):
        train_linear_probe(x, y, torch.randn(10, 5), y, num_classes=3)
    with pytest.raises(ValueError, match="init head must be"):
        train_linear_probe(x, y, x, y, num_classes=3, init=(torch.zeros(3, 5), torch.zeros(3)))
    with pytest.raises(ValueError, match="lrs"):
        train_linear_probe(x, y, x, y, num_classes=3, lrs=[])
    with pytest.raises(ValueError, match=r"\[batch, features\]"):
        extract_features(lambda im: im, [(torch.zeros(2, 3, 4), torch.zeros(2))])
    with pytest.raises(ValueError, match="teacher top-1"):
        student_share(0.5, 0.0)
    assert student_share(0.8, 0.9) == pytest.approx(0.8 / 0.9)
