"""Dense probes: metrics against independent numpy computations, and probes that learn planted linear maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raptor.eval.probe import ProbeConfig
from raptor.eval.dense import confusion_matrix, depth_rmse, mean_iou, patch_grid, train_depth_probe, train_segmentation_probe


def _miou_numpy(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int) -> tuple[float, list]:
    keep = target != ignore
    ious = []
    for c in range(num_classes):
        p, t = (pred == c) & keep, (target == c) & keep
        union = np.logical_or(p, t).sum()
        ious.append(None if union == 0 else np.logical_and(p, t).sum() / union)
    vals = [v for v in ious if v is not None]
    return float(np.mean(vals)), ious


def test_miou_matches_numpy_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 6, size=(5, 17, 13))
    target[rng.random(target.shape) < 0.2] = 255
    target[target == 4] = 3  # class 4 absent from labels ...
    pred = rng.integers(0, 6, size=target.shape)
    pred[pred == 5] = 0  # ... and class 5 absent from predictions only
    miou, per_class = mean_iou(torch.from_numpy(pred), torch.from_numpy(target), 6, ignore_index=255)
    ref, ref_per_class = _miou_numpy(pred, target, 6, 255)
    assert miou == pytest.approx(ref)
    for a, b in zip(per_class, ref_per_class):
        assert (a is None and b is None) or a == pytest.approx(b)
    assert per_class[5] == 0.0  # labelled but never predicted counts as 0, not as absent
    assert mean_iou(torch.from_numpy(target), torch.from_numpy(target), 6)[0] == pytest.approx(1.0)


def test_rmse_matches_numpy_with_invalid_pixels() -> None:
    rng = np.random.default_rng(1)
    target = rng.uniform(0.5, 5.0, size=(4, 9, 11))
    target[rng.random(target.shape) < 0.3] = 0.0
    target[0, 0, 0] = np.nan
    target[3] = 0.0  # an image with no valid depth is skipped
    pred = target + rng.normal(0, 0.3, size=target.shape)
    per_image = []
    for p, t in zip(pred, target):
        v = np.isfinite(t) & (t > 0)
        if v.any():
            per_image.append(np.sqrt(np.mean((p[v] - t[v]) ** 2)))
    assert depth_rmse(torch.from_numpy(pred), torch.from_numpy(target)) == pytest.approx(float(np.mean(per_image)))
    with pytest.raises(ValueError, match="no valid depth"):
        depth_rmse(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))


def test_bad_masks_and_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"mask labels must lie in 0..2"):
        confusion_matrix(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 7), 3)
    with pytest.raises(ValueError, match="do not form a square grid"):
        patch_grid(torch.zeros(1, 6, 4))
    assert patch_grid(torch.arange(24.0).reshape(1, 6, 4), grid=(2, 3))[0, 1, 0].tolist() == [12.0, 13.0, 14.0, 15.0]
    with pytest.raises(ValueError, match=r"\[samples, h, w, dim\]"):
        train_segmentation_probe(torch.zeros(2, 4, 8), torch.zeros(2, 8, 8), torch.zeros(2, 4, 8), torch.zeros(2, 8, 8), num_classes=2)


def _planted_dense(n: int, seed: int, num_classes: int = 3, grid: int = 4, dim: int = 12, up: int = 4):
    """Patch tokens that linearly encode a class and a depth per patch; labels are the nearest-upsampled maps."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(num_classes + 1, dim, generator=torch.Generator().manual_seed(99))
    cls_map = torch.randint(0, num_classes, (n, grid, grid), generator=g)
    depth_map = 1.0 + 3.0 * torch.rand(n, grid, grid, generator=g)
    code = torch.cat([F.one_hot(cls_map, num_classes).float() * 3, depth_map[..., None]], dim=-1)
    tokens = code @ mix + 0.05 * torch.randn(n, grid, grid, dim, generator=g)
    masks = cls_map.repeat_interleave(up, 1).repeat_interleave(up, 2)
    masks[:, 0, :] = 255  # an unlabelled row
    depth = F.interpolate(depth_map[:, None], scale_factor=up, mode="bilinear", align_corners=False)[:, 0]
    return tokens, masks, depth


def test_probes_learn_planted_linear_maps() -> None:
    tr_tok, tr_mask, tr_depth = _planted_dense(200, seed=0)
    va_tok, va_mask, va_depth = _planted_dense(60, seed=1)
    seg = train_segmentation_probe(tr_tok, tr_mask, va_tok, va_mask, num_classes=3, config=ProbeConfig(lrs=(1e-2, 3e-2), epochs=15, batch_size=16, warmup_steps=10))
    assert seg.miou > 0.9 and seg.pixel_acc > 0.9  # bilinear upsampling blurs patch edges, so not 1.0
    assert len(seg.per_class_iou) == 3 and seg.weight.shape == (3, 12)
    dep = train_depth_probe(tr_tok, tr_depth, va_tok, va_depth, config=ProbeConfig(lrs=(1e-2, 3e-2), epochs=30, batch_size=16, warmup_steps=10))
    baseline = depth_rmse(torch.full_like(va_depth, float(tr_depth.mean())), va_depth)  # predict the mean depth
    assert dep.rmse < 0.1 * baseline, (dep.rmse, baseline)
    assert set(dep.to_dict()) == {"rmse", "best_lr", "per_lr"}
