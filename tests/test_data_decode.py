"""decode="gpu": workers send JPEG bytes and crops, the training process decodes on its device.

On a machine without a GPU the same code path runs with device="cpu"; these tests pin what must
hold on any device: the same labels in the same order as the CPU path, the same image statistics,
the same counting of bad images within the error budget.
"""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from raptor.cli import main
from raptor.data import ErrorBudgetExceeded, LoaderSettings, loader, synthetic_source, write_shards
from raptor.data.transforms import crop_box, crop_resize
from tests.test_data_layouts import write_tar

SIZE = 48


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("decode") / "ds")
    write_shards(synthetic_source(64, 6, 80, seed=2), out, max_samples=16)
    return out


def run(url: str, decode: str, error_budget: float = 0.01, **kw) -> tuple[torch.Tensor, torch.Tensor, object]:
    settings = LoaderSettings(batch_size=8, num_workers=0, decode=decode, error_budget=error_budget)
    batches = loader(url, settings, image_size=SIZE, device="cpu", **kw)
    images, labels = zip(*list(batches))
    return torch.cat(images), torch.cat(labels), batches.stats


@pytest.mark.parametrize("train", [True, False])
def test_device_decode_matches_the_cpu_path(shards, train):
    """Catches: crops applied wrongly on the device path (box axes swapped, flip lost, eval box
    off-centre), labels out of step with their images, or unnormalised output."""
    cpu_images, cpu_labels, _ = run(shards, "cpu", train=train)
    dev_images, dev_labels, stats = run(shards, "gpu", train=train)
    assert dev_labels.tolist() == cpu_labels.tolist() and len(dev_labels) == 64
    assert dev_images.dtype == torch.float32 and dev_images.shape == (64, 3, SIZE, SIZE)
    for reduce in (torch.mean, torch.std):
        a = reduce(cpu_images.transpose(0, 1).reshape(3, -1), dim=1)
        b = reduce(dev_images.transpose(0, 1).reshape(3, -1), dim=1)
        assert torch.allclose(a, b, atol=0.02), (reduce.__name__, a, b)
    assert (dev_images - cpu_images).abs().mean() < 0.02  # the same crops of the same images
    assert stats.skipped == 0 and stats.repeated == 0


def test_float_resize_on_devices_agrees_with_the_uint8_cpu_kernel():
    """Catches: the float path CUDA takes (uint8 -> float -> bicubic -> clamp) drifting from the
    native uint8 kernel the CPU path uses (a box or scale error would show as large differences)."""
    image = torch.from_numpy(np.asarray(Image.open(io.BytesIO(
        synthetic_source(1, 2, 120).sample(0)["jpg"])))).permute(2, 0, 1).contiguous()
    rng = random.Random(0)
    for _ in range(20):
        box = crop_box(120, 120, SIZE, True, (0.08, 1.0), rng)
        native = crop_resize(image, box, SIZE).float()
        via_float = crop_resize(image.float(), box, SIZE)
        assert (native - via_float).abs().mean() < 1.0  # of 0..255: rounding only


def _bad_shard(path: str) -> list[int]:
    """Good JPEGs plus: a PNG (decoded by the worker), a JPEG cut short (no end marker: the
    worker's CPU decode fails), a JPEG with an unsupported frame type (its header parses, so
    it reaches the device, where it fails to decode, and on the CPU too), and a PNG with a
    damaged chunk (torchvision's PNG decoder segfaults on it). Returns the good labels."""
    src = synthetic_source(10, 5, 40, seed=4)
    samples = [src.sample(i) for i in range(10)]
    png = io.BytesIO()
    Image.open(io.BytesIO(samples[2]["jpg"])).save(png, "PNG")
    samples[2] = {"__key__": samples[2]["__key__"], "png": png.getvalue(), "cls": samples[2]["cls"]}
    samples[4]["jpg"] = samples[4]["jpg"][: len(samples[4]["jpg"]) // 2]
    samples[7]["jpg"] = samples[7]["jpg"].replace(b"\xff\xc0", b"\xff\xc5", 1)
    damaged = bytearray(png.getvalue())
    damaged[len(damaged) // 2] ^= 0xFF  # inside IDAT: a CRC mismatch
    samples[9] = {"__key__": samples[9]["__key__"], "png": bytes(damaged), "cls": samples[9]["cls"]}
    write_tar(path, samples)
    return [int(s["cls"]) for i, s in enumerate(samples) if i not in (4, 7, 9)]


def test_undecodable_images_are_counted_the_same_on_both_paths(tmp_path):
    """Catches: a JPEG the device cannot decode crashing the batch, vanishing uncounted, or
    being counted differently from the CPU path; a PNG not falling back to the CPU."""
    good = _bad_shard(str(tmp_path / "bad-0000.tar"))
    kw = dict(train=False, drop_last=False, error_budget=0.5)
    for decode in ("cpu", "gpu"):
        _, labels, stats = run(str(tmp_path), decode, **kw)
        assert labels.tolist() == good, decode
        assert (stats.seen, stats.skipped, stats.repeated) == (10, 3, 0), decode

    # a training epoch keeps its batches whole and its positions: the worker's failure (sample 4) and
    # the device's (sample 7) each leave their row to another image of the batch
    batches = loader(str(tmp_path), LoaderSettings(batch_size=4, num_workers=0, decode="gpu", error_budget=0.5),
                     image_size=SIZE, device="cpu", steps_per_epoch=2, shuffle=False)
    assert [len(x) for x, _ in batches] == [4, 4] and batches.stats.repeated == 2
    assert batches.stats.skipped == 2  # the damaged PNG comes after the 8 samples taken


def test_device_failures_respect_the_error_budget(tmp_path):
    """Catches: images failing on the device escaping the error budget (only the worker's
    failures counted against it)."""
    src = synthetic_source(8, 4, 40)
    samples = [src.sample(i) for i in range(8)]
    for i in (1, 5):
        samples[i]["jpg"] = samples[i]["jpg"].replace(b"\xff\xc0", b"\xff\xc5", 1)
    write_tar(str(tmp_path / "x-0.tar"), samples)
    with pytest.raises(ErrorBudgetExceeded, match="decoding on cpu: 1 of 8 samples were bad"):
        run(str(tmp_path), "gpu", train=False, drop_last=False, error_budget=0.1)


def test_uint8_output_and_reproducible_crops_with_device_decode(shards):
    """Catches: normalize=False still converting to float, and device-decoded crops that are not
    a pure function of the seed (two runs must agree exactly)."""
    a = list(loader(shards, LoaderSettings(batch_size=8, num_workers=1, decode="gpu", seed=5),
                    image_size=SIZE, device="cpu", normalize=False))
    b = list(loader(shards, LoaderSettings(batch_size=8, num_workers=1, decode="gpu", seed=5),
                    image_size=SIZE, device="cpu", normalize=False))
    assert a[0][0].dtype == torch.uint8 and len(a) == 8
    assert all(torch.equal(x, y) and torch.equal(lx, ly) for (x, lx), (y, ly) in zip(a, b))
    with pytest.raises(ValueError, match="dense batches decode on the CPU"):
        loader(shards, LoaderSettings(batch_size=8, num_workers=2, decode="gpu"), image_size=SIZE, dense=True)


def test_bench_prints_loader_bare_loop_and_ratio(shards, capsys):
    """Catches: `raptor data bench --bare` / `--decode gpu` not running or not printing the ratio."""
    assert main(["data", "bench", shards, "--size", "32", "--batch-size", "8", "--batches", "3",
                 "--workers", "0", "--bare", "--decode", "gpu", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["decode"] == "gpu" and result["samples"] == 24
    assert result["bare_samples_per_s"] > 0 and result["ratio_per_worker"] > 0
