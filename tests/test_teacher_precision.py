"""``teacher.precision`` means the same in every stage.

Teacher training, discovery's distances, the runner's trajectories (training and validation), the
probe and the report (with its layer-swap study) all run the teacher's blocks under the autocast
that ``teacher.precision`` names for the device: on CPU, ``bf16`` is bf16 autocast and ``fp32`` and
``auto`` are none. A global forward hook records the autocast state of every timm block call, so
a stage that chose its own precision (e.g. bf16 on any GPU, fp32 everywhere else) fails.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import yaml
from timm.models.vision_transformer import Block

from raptor.data import synthetic_source, write_shards
from raptor.models import Raptor, Teacher, save_student
from raptor.service.spec.translate import shard_source, stage_config, teacher_ref
from raptor.service.engine.artifacts import RunFolder
from raptor.service.spec import parse_spec
from raptor.service.cli import Studies, run_studies
from raptor.service.stages.distances import distance_matrix
from raptor.service.stages.probe import probe
from raptor.service.stages.report import analyze_run
from raptor.service.stages.teacher import train_teacher
from raptor.train.hotpath import HotPath
from raptor.train.trainer import Validator

KW = {"embed_dim": 32, "depth": 4, "num_heads": 2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    write_shards(synthetic_source(48, num_classes=3, size=32), str(root / "train"), prefix="train", max_samples=48)
    write_shards(synthetic_source(16, num_classes=3, size=32, seed=1), str(root / "val"), prefix="val", max_samples=16)
    torch.manual_seed(0)
    teacher = Teacher.from_timm("vit_small_patch14_reg4_dinov2", img_size=28, **KW)
    teacher.save(str(root / "teacher.safetensors"))
    save_student(Raptor.from_teacher(teacher, [2], seed=0), str(root / "student.safetensors"))
    return root


def spec_for(root, precision: str):
    return parse_spec(yaml.safe_load(f"""
name: precision
teacher: {{name: vit_small_patch14_reg4_dinov2, img_size: 28, precision: {precision}, model_kwargs: {KW},
          checkpoint: {root}/teacher.safetensors, train: {{epochs: 1, batch_size: 16, warmup_steps: 1, num_workers: 0}}}}
data: {{train: {root}/train, val: {root}/val, batch_size: 8, num_workers: 0}}
discovery: {{k: 2, num_images: 8}}
stage1: {{steps: 1}}
stage2: {{steps: 1}}
probe: {{epochs: 1, batch_size: 16, lrs: [0.01], warmup_steps: 1}}
storage: {{url: {root}/run}}
"""))


@pytest.fixture
def teacher_calls():
    """(stage -> autocast dtypes of the teacher's block calls); ``calls.stage`` names the stage running."""
    calls: dict[str, set] = defaultdict(set)
    current = {"stage": None}

    def hook(module, args):
        if isinstance(module, Block):
            calls[current["stage"]].add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield calls, current
    finally:
        handle.remove()


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp32", None), ("auto", None)])
def test_every_stage_runs_the_teacher_in_the_specs_precision(files, teacher_calls, tmp_path, precision, expected):
    """Catches a stage that picks the teacher's precision itself instead of from teacher.precision."""
    spec = spec_for(files, precision)
    run_folder = RunFolder(str(tmp_path / "run"), str(tmp_path / "store"), folders={"stage2": str(files)},
                           given={"teacher": str(files / "teacher.safetensors")})
    ref = teacher_ref(spec, run_folder)
    calls, current = teacher_calls
    cpu = torch.device("cpu")

    current["stage"] = "teacher"
    train_teacher(spec, str(tmp_path / "trained.safetensors"))
    current["stage"] = "distances"
    distance_matrix(spec, ref)
    current["stage"] = "runner"
    teacher = ref.load()
    student = Raptor.from_teacher(teacher, [2], seed=0)
    HotPath(teacher, student, stage_config(spec, "stage2"), teacher_amp=ref.amp(cpu),
            student_amp=False).trajectory(torch.randn(2, 3, 28, 28))
    Validator(shard_source(spec, "val", num_workers=0), teacher, student, 1, cpu, ref.amp(cpu), False)
    current["stage"] = "probe"
    probe(spec, ref, str(files / "student.safetensors"))
    current["stage"] = "report"
    layer_swap = Studies(layer_swap=True)
    analyze_run(spec, run_folder, str(tmp_path / "report"), max_samples=4, device="cpu",
                studies=lambda t, s, b, amp: run_studies(spec, t, s, b, layer_swap, val_samples=4, amp=amp, seed=0))

    assert dict(calls) == {stage: {expected} for stage in ("teacher", "distances", "runner", "probe", "report")}
