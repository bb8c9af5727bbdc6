"""Fast checks of the service's translations from the spec (no Ray cluster, no training)."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from raptor.errors import UserError
from raptor.models import Raptor, Teacher
from raptor.service.spec.translate import stage_config, stage_job
from raptor.service.engine.artifacts import RunFolder
from raptor.service.engine.pipeline import save_spec
from raptor.service.spec import SpecError, load_spec, parse_spec
from raptor.service.deploy.submit import submission
from raptor.train.metrics import wandb_mode


@pytest.fixture
def quickstart() -> dict:
    with open("jobs/quickstart.yaml") as f:
        return yaml.safe_load(f)


def test_stage_config_follows_the_spec(quickstart):
    """Catches a spec field lost or renamed on its way to the core's StageConfig."""
    spec = parse_spec(quickstart)
    s1, s2 = stage_config(spec, "stage1"), stage_config(spec, "stage2")
    assert (s1.stage, s1.steps, s1.lr, s1.warmup_steps) == (1, spec.stage1.steps, spec.stage1.lr, spec.stage1.warmup_steps)
    assert s1.token_weights is None and s1.last_block_token_weights == (0.34, 0.33, 0.33)  # paper: plain MSE, cls up last
    assert s1.lambda_schedule == "linear" and s1.lambda_rho == 0.25 and s1.horizon is None
    assert s2.stage == 2 and s2.loss == "mse" and s2.token_weights == pytest.approx((0.45, 0.10, 0.45))
    assert s1.grad_clip == spec.deepspeed.gradient_clipping
    quickstart["stage2"].update(schedule="constant", loss="cosine")
    s2c = stage_config(parse_spec(quickstart), "stage2")
    assert s2c.min_lr == s2c.lr and s2c.loss == "cosine" and s2c.token_weights is None


def test_warmup_left_open_is_the_papers_rule_everywhere(quickstart):
    """Catches the spec, StageConfig.paper_stage* and the studies disagreeing on the default warm-up."""
    from raptor.distill import StageConfig

    quickstart["stage1"].pop("warmup_steps")
    quickstart["stage2"] = {"steps": 200_000}
    spec = parse_spec(quickstart)
    assert stage_config(spec, "stage1").warmup_steps == StageConfig.paper_stage1(spec.stage1.steps).warmup_steps == 20
    assert stage_config(spec, "stage2").warmup_steps == StageConfig.paper_stage2(200_000).warmup_steps == 10_000


def test_deepspeed_config_batch_precision_and_offload(quickstart):
    """Catches a DeepSpeed batch that disagrees with the spec's effective batch, DeepSpeed's own bf16/fp16
    mode switched on (the engine must stay fp32: mixed precision is autocast), buckets not sized to the
    student, or fused AdamW where the optimizer steps on CPU."""
    quickstart["deepspeed"].update(zero_stage=3, gradient_accumulation_steps=4, precision="auto", offload_optimizer="cpu")
    spec = parse_spec(quickstart)
    plan = spec.deepspeed
    cpu = plan.config(spec.data.batch_size, world_size=2, student_params=1234)
    assert cpu["train_batch_size"] == spec.data.batch_size * 2 * 4 == spec.effective_batch
    assert cpu["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                        "reduce_bucket_size": 1234, "allgather_bucket_size": 1234}
    assert "bf16" not in cpu and "fp16" not in cpu
    assert plan.config(8, 1, 10**10)["zero_optimization"]["reduce_bucket_size"] == 500_000_000  # DeepSpeed's default at most
    gpu = torch.device("cuda", 0)
    assert plan.amp(torch.device("cpu")) is False and plan.amp(gpu) == torch.bfloat16  # auto
    assert not plan.fused_adamw(gpu)  # offloaded: AdamW steps on CPU
    assert plan.compile_mode(gpu) == "off"  # ZeRO-3
    quickstart["deepspeed"].update(zero_stage=2, offload_optimizer="none", precision="bf16")
    plan = parse_spec(quickstart).deepspeed
    assert plan.compile_mode(gpu) == "loss" and plan.compile_mode(torch.device("cpu")) == "off"
    assert plan.fused_adamw(gpu) and not plan.fused_adamw(torch.device("cpu"))
    assert plan.amp(torch.device("cpu")) == torch.bfloat16  # bf16 asked for: autocast on CPU too


@pytest.mark.parametrize("deepspeed, message", [
    ({"precision": "fp16"}, "deepspeed.precision: Input should be 'auto', 'fp32' or 'bf16'"),
    ({"activation_checkpointing": [0, 3]}, "blocks [0, 3] out of range for discovery.k=3"),
    ({"activation_checkpointing": [1, 1]}, "distinct indices"),
    ({"compile": "loss", "zero_stage": 3}, "compile=loss needs zero_stage <= 2"),
])
def test_bad_engine_settings_are_one_line_errors(quickstart, deepspeed, message):
    """Catches a removed precision (fp16), checkpointing blocks the student does not have, or a compiled
    ZeRO-3 step passing validation and failing inside the Ray workers."""
    quickstart["deepspeed"].update(deepspeed)
    with pytest.raises(UserError, match=re.escape(message)):
        parse_spec(quickstart, source="q.yaml")


def test_selective_checkpointing_reaches_the_student(quickstart):
    """Catches the spec's block list in a form the student cannot take (the runner passes the spec's
    ``deepspeed`` section to ``Raptor.set_checkpointing`` as it is): the wrong blocks recomputed."""
    teacher = Teacher.from_timm("vit_small_patch14_reg4_dinov2", img_size=28, embed_dim=32, depth=6, num_heads=2)
    student = Raptor.from_teacher(teacher, [2, 4], seed=0)
    for setting, chosen in (([0, 2], [True, False, True]), (True, [True] * 3), (False, [False] * 3)):
        quickstart["deepspeed"]["activation_checkpointing"] = setting
        student.set_checkpointing(parse_spec(quickstart).deepspeed.activation_checkpointing)
        assert [b.checkpointing for b in student.blocks] == chosen


def test_wandb_is_offline_without_a_key(monkeypatch):
    """Catches a laptop or CI run that would try to reach wandb.ai without an account."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"


def test_spec_is_saved_beside_the_artifacts(quickstart, tmp_path):
    """Catches a changed spec overwriting the one earlier stages ran with (its old copy must be kept), or a
    spec saved with its fields in another order (an older version's) counted as a change."""
    quickstart["storage"]["url"] = str(tmp_path / "run")
    spec = parse_spec(quickstart)
    run_folder = RunFolder(str(tmp_path / "run"), str(tmp_path / "store"))
    save_spec(spec, run_folder)
    assert parse_spec(yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())) == spec
    first = (tmp_path / "run" / "spec.yaml").read_text()
    save_spec(spec, run_folder)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["spec.yaml"]  # same spec: nothing new
    reordered = {k: dict(reversed(v.items())) if isinstance(v, dict) else v for k, v in yaml.safe_load(first).items()}
    (tmp_path / "run" / "spec.yaml").write_text(yaml.safe_dump(reordered, sort_keys=False))  # an older field order
    save_spec(spec, run_folder)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["spec.yaml"]  # the same values: not a change
    quickstart["stage2"]["steps"] = 999
    save_spec(parse_spec(quickstart), run_folder)
    kept = [p for p in (tmp_path / "run").iterdir() if p.name != "spec.yaml"]
    assert len(kept) == 1 and yaml.safe_load(kept[0].read_text()) == yaml.safe_load(first)  # the one stages ran with
    assert yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())["stage2"]["steps"] == 999


def test_submission_entrypoint_and_runtime_env():
    """Catches an entrypoint that loses or mis-quotes --set overrides, or a spec outside the uploaded folder."""
    spec = load_spec("jobs/distill_k3.yaml")
    job = submission("jobs/distill_k3.yaml", spec, ["stage2.steps=2000", "name=a b"])
    assert job["entrypoint"] == "raptor run jobs/distill_k3.yaml --set stage2.steps=2000 --set 'name=a b'"
    assert job["runtime_env"]["working_dir"] == "." and job["runtime_env"]["env_vars"] == {"NCCL_DEBUG": "WARN"}
    with pytest.raises(UserError, match="inside the working directory"):
        submission("../elsewhere.yaml", spec, [])


def test_the_global_batch_is_the_same_at_every_world_size(quickstart):
    """Catches an optimizer batch that follows the worker count when data.global_batch_size is set (the
    LR schedule would then mean another thing after a resize), a micro-batch over data.batch_size, a
    batch changed silently where it does not divide, and a spec without the field changing meaning."""
    from raptor.errors import UserError
    from raptor.train.settings import micro_batching

    assert [micro_batching(48, w, 16) for w in (1, 2, 3, 4, 6)] == [(16, 3), (12, 2), (16, 1), (12, 1), (8, 1)]
    assert micro_batching(None, 4, 16, accumulation=2) == (16, 2)  # no global batch: it grows with the workers
    assert micro_batching(48, 5, 16) == (10, 1) and micro_batching(48, 7, 4) == (4, 2)  # shares of 9-10, 6-7
    with pytest.raises(UserError, match=r"^data.global_batch_size=4 leaves some of 5 workers without a sample"):
        micro_batching(4, 5, 16)
    quickstart["data"]["global_batch_size"] = 48
    for workers in (1, 2, 3):
        quickstart["scaling"]["num_workers"] = workers
        spec = parse_spec(quickstart)
        micro, accumulation = spec.batching()
        assert spec.effective_batch == 48 and micro <= spec.data.batch_size
        config = spec.deepspeed.config(micro, world_size=workers, student_params=10, accumulation=accumulation)
        assert config["train_batch_size"] == 48 and config["gradient_accumulation_steps"] == accumulation
    quickstart["scaling"]["num_workers"] = 49
    with pytest.raises(SpecError, match="data.global_batch_size=48 leaves some of 49 workers without a sample"):
        parse_spec(quickstart)
    quickstart["scaling"]["num_workers"], quickstart["deepspeed"]["gradient_accumulation_steps"] = 2, 2
    with pytest.raises(SpecError, match="set data.global_batch_size or deepspeed.gradient_accumulation_steps, not both"):
        parse_spec(quickstart)


def test_an_elastic_range_needs_a_global_batch(quickstart):
    """Catches an elastic range whose optimizer batch would change with the worker count (no global batch),
    a range upside down, and a runner that does not hand Ray Train the range (at 3 of 2-4 workers the global
    batch of 96 splits evenly; at 5 it would not, and still works: tests/test_data_s3.py)."""
    import types

    from raptor.train.launch import scaling_config

    quickstart["scaling"].update(min_workers=3, num_workers=2)
    with pytest.raises(SpecError, match="scaling.min_workers=3 exceeds scaling.num_workers=2"):
        parse_spec(quickstart)
    quickstart["scaling"].update(min_workers=2, num_workers=4)
    with pytest.raises(SpecError, match="scaling.min_workers .elastic training. needs data.global_batch_size"):
        parse_spec(quickstart)
    quickstart["data"]["global_batch_size"] = 96
    spec = parse_spec(quickstart)
    assert list(spec.scaling.world_sizes) == [2, 3, 4]
    assert spec.worker_layout() == ("2-4 Ray Train workers (elastic), effective batch 96 (micro-batch 24 x 2 accumulated "
                                    "x 2) to effective batch 96 (micro-batch 24 x 1 accumulated x 4)")
    assert scaling_config(types.SimpleNamespace(scaling=spec.scaling)).num_workers == (2, 4)
    uneven = parse_spec({**quickstart, "scaling": {**quickstart["scaling"], "min_workers": 4, "num_workers": 5}})
    assert uneven.worker_layout().endswith("effective batch 96 (micro-batch up to 20 x 1 accumulated x 5)")
    assert uneven.effective_batch == 96
    fixed = parse_spec({**quickstart, "scaling": {**quickstart["scaling"], "min_workers": None}})
    assert fixed.worker_layout() == "4 Ray Train workers, effective batch 96 (micro-batch 24 x 1 accumulated x 4)"
    assert scaling_config(types.SimpleNamespace(scaling=fixed.scaling)).num_workers == 4


def test_a_local_run_starts_its_own_ray_and_joins_only_the_named_cluster(quickstart, monkeypatch):
    """Catches `raptor run` without RAY_ADDRESS joining a Ray cluster someone else started on the machine
    (ray.init's default address): asked for CPUs, ray.init then refuses, and the run dies before its
    first stage. With RAY_ADDRESS set, that cluster is joined as is."""
    import ray

    from raptor.service.cli import connect_ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = parse_spec(quickstart)
    connect_ray(spec)
    assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] >= spec.scaling.num_workers
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    connect_ray(spec)
    assert calls[-1]["address"] == "10.0.0.7:6379" and "num_cpus" not in calls[-1]


def test_teacher_train_command_exports_a_loadable_teacher(tmp_path, capsys):
    """Catches `raptor teacher train` writing somewhere the pipeline does not look, or losing the drop-path rate."""
    from raptor.cli import main
    from raptor.service.engine.pipeline import plan
    from raptor.data import synthetic_source, write_shards
    from raptor.models import Teacher, read_checkpoint

    write_shards(synthetic_source(64, num_classes=3, size=32), str(tmp_path / "train"), prefix="train", max_samples=32)
    write_shards(synthetic_source(32, num_classes=3, size=32, seed=1), str(tmp_path / "val"), prefix="val", max_samples=32)
    spec = {
        "name": "teacher-only",
        "teacher": {"name": "vit_small_patch14_reg4_dinov2", "img_size": 28, "drop_path_rate": 0.2,
                    "model_kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2},
                    "train": {"epochs": 1, "batch_size": 16, "warmup_steps": 1, "num_workers": 0}},
        "data": {"train": str(tmp_path / "train"), "val": str(tmp_path / "val"), "batch_size": 16},
        "discovery": {"k": 2},
        "stage1": {"steps": 1}, "stage2": {"steps": 1},
        "storage": {"url": str(tmp_path / "run")},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["teacher", "train", str(tmp_path / "spec.yaml")]) == 0
    out = plan(load_spec(str(tmp_path / "spec.yaml")))[1].teacher  # the teacher's place in the store, by its key
    assert out.startswith(str(tmp_path / "run" / "store" / "teacher")) and out in capsys.readouterr().out
    teacher = Teacher.load(str(out))
    assert teacher.depth == 4 and teacher.head is not None and teacher.head.out_features == 3
    assert read_checkpoint(str(out))[1]["drop_path_rate"] == "0.2"
    assert main(["teacher", "train", str(tmp_path / "spec.yaml"), "--set", "teacher.train=null"]) == 2  # neither a checkpoint nor a recipe: a one-line error


def test_data_the_workers_cannot_split_fails_in_the_driver(quickstart, tmp_path):
    """Two read streams over one shard: a one-line error before any worker starts (and is retried)."""
    from raptor.data import synthetic_source, write_shards
    from raptor.service.engine.pipeline import plan
    from raptor.train.launch import preflight

    write_shards(synthetic_source(64, num_classes=2, size=64), str(tmp_path / "train"), prefix="train", max_samples=64)
    quickstart["data"].update(train=str(tmp_path / "train"), val=None, generate=None, streams=2)
    spec = parse_spec(quickstart)
    steps, run_folder = plan(spec)
    step = next(s for s in steps if s.name == "stage1")
    run_folder.folders["stage1"] = str(tmp_path / "stage1")
    run_folder.boundaries = lambda: [4, 8, 12]  # discovery's artifact, which this test does not make
    job = stage_job(spec, "stage1", run_folder, step.key, step.inputs)
    with pytest.raises(ValueError, match="data.streams=2 needs at least as many shards; there are 1"):
        preflight(job, spec.scaling.num_workers)


def test_submit_retries_while_the_head_has_no_job_agent(monkeypatch):
    """Catches `raptor submit` failing in the seconds after a cluster starts, or retrying a job Ray refused."""
    from raptor.service.deploy import submit as submit_module

    calls = []

    class Head:  # answers as Ray's job API does in the seconds before its agent registers
        def submit_job(self, **job):
            calls.append(job)
            if len(calls) < 3:
                raise RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later..")
            return "raysubmit_1"

    class Refusing:
        def submit_job(self, **job):
            raise RuntimeError("Request failed with status code 400: runtime_env has an unknown field")

    monkeypatch.setattr(submit_module.time, "sleep", lambda s: None)
    job = {"entrypoint": "raptor run jobs/quickstart.yaml", "runtime_env": {}}
    assert submit_module.submit(Head(), job, "quickstart", "http://head:8265") == "raysubmit_1"
    assert len(calls) == 3
    with pytest.raises(UserError, match="refused the job: .*unknown field"):
        submit_module.submit(Refusing(), job, "quickstart", "http://head:8265")
