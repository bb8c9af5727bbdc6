"""Linear probe: separable features reach ~100%, chance features stay at chance, teacher-head init, the same initial
heads for teacher and student (and their fingerprints in the probe stage's results.json), the LR schedule, bad input."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from raptor.eval.probe import (
    ProbeConfig,
    evaluate_head,
    extract_features,
    fit_heads,
    head_fingerprint,
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


def test_same_seed_and_width_give_the_same_initial_heads() -> None:
    """Catches teacher and student probes starting from different heads (a draw that depends on the features'
    values, the device or a global RNG), and a fingerprint blind to the weights: another seed must change it."""
    cfg = ProbeConfig(lrs=(1e-3, 1e-2), seed=3)
    teacher_heads, student_heads = (new_heads(cfg, 16, 5, None, torch.device("cpu")) for _ in range(2))
    for t, s in zip(teacher_heads, student_heads, strict=True):
        assert torch.equal(t.weight, s.weight) and torch.equal(t.bias, s.bias)
        assert head_fingerprint(t.weight, t.bias) == head_fingerprint(s.weight, s.bias)
    other = new_heads(ProbeConfig(lrs=(1e-3, 1e-2), seed=4), 16, 5, None, torch.device("cpu"))
    assert not torch.equal(other[0].weight, teacher_heads[0].weight)
    assert head_fingerprint(other[0].weight, other[0].bias) != head_fingerprint(teacher_heads[0].weight, teacher_heads[0].bias)

    # train_linear_probe records the initial heads, not the trained ones, for every lr of the grid
    xtr, ytr = _blobs(64, 5, 16, sep=3.0, seed=0)
    xva, yva = _blobs(32, 5, 16, sep=3.0, seed=1)
    kw = dict(num_classes=5, lrs=cfg.lrs, epochs=2, batch_size=16, warmup_steps=1, seed=3)
    res_t = train_linear_probe(xtr, ytr, xva, yva, **kw)
    res_s = train_linear_probe(xtr * 2 + 1, ytr, xva * 2 + 1, yva, **kw)  # other features, same width
    expected = {lr: head_fingerprint(h.weight, h.bias) for lr, h in zip(cfg.lrs, teacher_heads)}
    assert res_t.init_fingerprints == res_s.init_fingerprints == expected
    assert head_fingerprint(res_t.weight, res_t.bias) not in expected.values()
    assert train_linear_probe(xtr, ytr, xva, yva, **{**kw, "seed": 4}).init_fingerprints != expected


@pytest.fixture(scope="module")
def probe_stage_inputs(tmp_path_factory) -> tuple:
    """(spec, teacher ref, student URL) for the probe stage's own function, in-process on CPU (no Ray):
    a 4-layer width-32 teacher, a k=2 student, 32 training and 16 validation images of 3 classes."""
    from raptor.data import synthetic_source, write_shards
    from raptor.models import Raptor, Teacher, save_student
    from raptor.service.spec import parse_spec
    from raptor.train.settings import TeacherSettings

    root = tmp_path_factory.mktemp("probe_stage")
    write_shards(synthetic_source(32, num_classes=3, size=32), str(root / "train"), prefix="train", max_samples=32)
    write_shards(synthetic_source(16, num_classes=3, size=32, seed=1), str(root / "val"), prefix="val", max_samples=16)
    arch = {"embed_dim": 32, "depth": 4, "num_heads": 2}
    teacher = Teacher.from_timm("vit_small_patch14_reg4_dinov2", img_size=28, **arch)
    teacher.save(str(root / "teacher.safetensors"))
    save_student(Raptor.from_teacher(teacher, [2]), str(root / "student.safetensors"))
    spec = parse_spec({
        "name": "probe-only",
        "teacher": {"name": "vit_small_patch14_reg4_dinov2", "img_size": 28, "precision": "fp32", "model_kwargs": arch,
                    "checkpoint": str(root / "teacher.safetensors")},
        "data": {"train": str(root / "train"), "val": str(root / "val"), "batch_size": 16, "num_workers": 0},
        "discovery": {"k": 2},
        "stage1": {"steps": 1}, "stage2": {"steps": 1},
        "probe": {"epochs": 2, "batch_size": 16, "lrs": [1e-3, 1e-2], "warmup_steps": 1},
        "storage": {"url": str(root / "run")},
    })
    ref = TeacherSettings(name=spec.teacher.name, img_size=28, checkpoint=spec.teacher.checkpoint, model_kwargs=arch, precision="fp32")
    return spec, ref, str(root / "student.safetensors")


def test_probe_stage_records_equal_head_fingerprints(probe_stage_inputs, monkeypatch) -> None:
    """Catches results.json stating the teacher's and the student's head init instead of recording it, a
    fine-tuned row that did not start from the teacher's trained head, and saved heads that are not the
    selected ones (an export would carry another head than the one measured)."""
    from raptor.service.stages import probe as probe_stage

    results = []  # the teacher's, the student's and the fine-tuned probe, in the stage's order
    monkeypatch.setattr(probe_stage, "train_linear_probe", lambda *a, **kw: results.append(train_linear_probe(*a, **kw)) or results[-1])
    result, heads = probe_stage.probe(*probe_stage_inputs)

    init = json.loads(json.dumps(result))["head_init"]  # as results.json holds it
    assert set(init) == {"teacher", "student", "student_finetuned"}
    assert list(init["teacher"]) == ["0.001", "0.01"]
    assert init["teacher"] == init["student"]
    assert len(set(init["teacher"].values())) == 2  # each lr's head is its own draw
    trained_teacher = head_fingerprint(results[0].weight, results[0].bias)
    assert set(init["student_finetuned"].values()) == {trained_teacher}
    # the heads an export carries: the student rows' selected ones, as trained
    assert sorted(heads) == ["student.bias", "student.weight", "student_finetuned.bias", "student_finetuned.weight"]
    assert torch.equal(heads["student.weight"], results[1].weight) and torch.equal(heads["student_finetuned.bias"], results[2].bias)


def test_probe_stage_fails_when_the_heads_start_differently(probe_stage_inputs, monkeypatch) -> None:
    """Catches a probe stage that would report a student share over probes started from different heads."""
    from raptor.service.stages import probe as probe_stage

    seeds = itertools.chain([0], itertools.repeat(1))  # the student's probe gets another seed, as a bug in the stage would give it
    monkeypatch.setattr(probe_stage, "train_linear_probe", lambda *a, **kw: train_linear_probe(*a, **{**kw, "seed": next(seeds)}))
    with pytest.raises(RuntimeError, match="started from different weights"):
        probe_stage.probe(*probe_stage_inputs)


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
