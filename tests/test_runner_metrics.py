"""The Trainer's logged step cost: samples/s per device, MFU from raptor.perf's FLOP model, peak memory."""

from __future__ import annotations

import pytest
import torch

from raptor.distill import StageConfig
from raptor.models import Raptor, Teacher
from raptor.perf import StudentShape, TeacherShape, flops_per_sample
from raptor.train.job import RunLabels
from raptor.train.settings import LoggingSettings
from raptor.train.metrics import Progress, Utilisation, device_peak

CPU = torch.device("cpu")
NO_WANDB = LoggingSettings(wandb_mode="disabled")
LABELS = RunLabels("t", "t", wandb_dir="wandb")


@pytest.fixture(scope="module")
def pair():
    teacher = Teacher.from_timm("vit_small_patch14_reg4_dinov2", img_size=28, embed_dim=32, depth=4, num_heads=2)
    return teacher, Raptor.from_teacher(teacher, [1, 3], seed=0)


def test_mfu_follows_the_flop_model_and_the_stated_peak(pair):
    """Catches MFU over all ranks' samples instead of one device's, FLOPs that ignore the lambda
    phase of stage 1 (teacher forcing and AR both run during the anneal), or an invented CPU peak."""
    teacher, student = pair
    cfg = StageConfig.paper_stage1(steps=100)
    util = Utilisation(teacher, student, cfg, world_size=4, device=CPU, peak_tflops=2.0)
    row = util(samples_per_s=400.0, lam=0.5)
    fps = flops_per_sample(StudentShape.from_student(student), TeacherShape.from_teacher(teacher), stage=1, lam=0.5)
    assert row["perf/samples_per_s_per_device"] == 100.0
    assert row["perf/mfu"] == pytest.approx(100.0 * fps / 2e12)
    assert util(400.0, lam=0.0)["perf/gflops_per_sample"] < row["perf/gflops_per_sample"]  # AR only after the anneal
    assert 0 < row["perf/peak_mem_gib"] < 1024
    no_peak = Utilisation(teacher, student, cfg, world_size=1, device=CPU, peak_tflops=device_peak(CPU, False, None))
    assert "perf/mfu" not in no_peak(100.0, 0.5)  # CPU: no table peak, no MFU unless logging.peak_tflops


def test_progress_rows_carry_the_cost(pair, caplog):
    """Catches the perf figures computed but not logged (console line, returned row for history/wandb)."""
    teacher, student = pair
    util = Utilisation(teacher, student, StageConfig.paper_stage2(steps=10), world_size=1, device=CPU, peak_tflops=1.0)
    progress = Progress("stage2", 10, 8, NO_WANDB, LABELS, enabled=True, utilisation=util)
    with caplog.at_level("INFO", logger="raptor.train.metrics"):
        row = progress.log(5, {"loss": 1.0, "lambda": 0.0, "lr": 1e-3})
    assert row["samples_per_s"] > 0 and row["perf/mfu"] > 0 and "perf/peak_mem_gib" in row
    assert "MFU" in caplog.text
    quiet = Progress("stage2", 10, 8, NO_WANDB, LABELS, enabled=False, utilisation=util)
    assert quiet.log(5, {"loss": 1.0}) == {"loss": 1.0}  # other ranks log nothing
