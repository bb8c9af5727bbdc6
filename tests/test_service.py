"""The distillation service end to end: real Ray Train V2 workers, real DeepSpeed over gloo, real S3.

One Ray cluster (2 CPUs, with its dashboard for the job API and the state API) serves every test
here. A tiny DINOv2-architecture run of the whole pipeline (``tiny_run``) is the base the other
tests build on: its teacher, boundaries and stage-1 student feed the ZeRO, resume and failure
tests, so each of those trains only the stage it is about.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from raptor import storage
from raptor.config import JobSpec, parse_spec
from raptor.models import load_student
from raptor.pipeline import run_pipeline
from raptor.build import load_teacher
from raptor.train.trainer import run_stage

REPO = Path(__file__).resolve().parents[1]
RAPTOR = str(Path(sys.executable).with_name("raptor"))


def tiny_spec(root: str, data: str, **sections) -> dict:
    """A DINOv2-architecture pipeline at test size: 6 layers of width 32, 28 px, k=3, 2 workers, ZeRO-2."""
    spec = {
        "name": "tiny",
        "teacher": {
            "name": "vit_small_patch14_reg4_dinov2", "img_size": 28, "precision": "fp32", "drop_path_rate": 0.1,
            "model_kwargs": {"embed_dim": 32, "depth": 6, "num_heads": 2},
            "train": {"epochs": 3, "batch_size": 32, "lr": 2e-3, "warmup_steps": 4, "num_workers": 0},
        },
        "data": {
            "train": f"{data}/train", "val": f"{data}/val", "batch_size": 16, "num_workers": 0,
            "generate": {"train_samples": 256, "val_samples": 64, "num_classes": 4, "image_size": 32},
        },
        "discovery": {"k": 3, "num_images": 64},
        "stage1": {"steps": 8, "lr": 2e-3, "warmup_steps": 1},
        "stage2": {"steps": 48, "lr": 1e-3, "warmup_steps": 1},
        "probe": {"epochs": 3, "batch_size": 64, "lrs": [1e-3, 1e-2], "warmup_steps": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 1},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "storage": {"url": root, "checkpoint_interval": 4},
        "logging": {"wandb_mode": "offline", "log_interval": 1, "val_interval": 8},
    }
    for name, values in sections.items():
        spec[name] = {**spec.get(name, {}), **values}
    return spec


@pytest.fixture(scope="module")
def ray_cluster(s3_server, tmp_path_factory):
    """A local Ray cluster started AFTER the S3 fixture, so its workers inherit the AWS endpoint."""
    import ray

    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `raptor` for Ray jobs
    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    ctx = ray.init(num_cpus=2, include_dashboard=True, logging_level="WARNING")
    try:
        yield {"gcs": ctx.address_info["gcs_address"], "dashboard": f"http://{ctx.dashboard_url}"}
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory) -> JobSpec:
    base = tmp_path_factory.mktemp("tiny")
    spec = parse_spec(tiny_spec(str(base / "run"), str(base / "data")))
    t0 = time.perf_counter()
    timings = run_pipeline(spec)
    print(f"tiny pipeline: {time.perf_counter() - t0:.0f}s {timings}")
    (base / "spec.yaml").write_text(spec.to_yaml())
    return spec


def _history(url: str) -> list[dict]:
    return storage.read_json(storage.join(url, "history.json"))


def _url(spec: JobSpec, *parts: str) -> str:
    return storage.join(spec.storage.url, *parts)


@pytest.mark.slow
def test_pipeline_completes_and_stage2_loss_falls(tiny_run):
    spec = tiny_run
    for artifact in ("spec.yaml", "teacher/teacher.safetensors", "discovery/segmentation.json",
                     "discovery/distances.png", "stage1/manifest.json", "stage2/student.safetensors",
                     "probe/results.json", "report/index.md", "report/report.json"):
        assert storage.exists(_url(spec, artifact)), artifact
    losses = [row["loss"] for row in _history(_url(spec, "stage2"))]
    assert len(losses) == spec.stage2.steps
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    seg = storage.read_json(_url(spec, "discovery", "segmentation.json"))
    assert len(seg["boundaries"]) == 2 and seg["method"] == "dp"
    probe = storage.read_json(_url(spec, "probe", "results.json"))
    assert probe["num_val"] == 64 and 0 <= probe["student"]["top1"] <= 1
    report = storage.read_json(_url(spec, "report", "report.json"))  # written by raptor.analysis
    assert report["discovery"]["boundaries"] == seg["boundaries"]
    assert report["probe"]["student"]["top1"] == probe["student"]["top1"]
    assert len(report["fidelity"]["update_r2"]) == 6
    assert run_pipeline(spec) == {}  # every artifact exists: a re-run does nothing


@pytest.mark.slow
def test_exported_student_reproduces_the_trained_rollout(tiny_run):
    """The safetensors export (no Ray, no DeepSpeed) equals the weights in the final DeepSpeed checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    spec = tiny_run
    teacher = load_teacher(spec, _url(spec, "teacher", "teacher.safetensors"))
    exported, manifest = load_student(_url(spec, "stage2", "student.safetensors"), teacher)
    assert manifest["stage"] == "stage2" and manifest["teacher"]["checkpoint"].endswith("teacher.safetensors")
    trained, _ = load_student(_url(spec, "stage2", "student.safetensors"), teacher)
    sd = get_fp32_state_dict_from_zero_checkpoint(_url(spec, "checkpoints", "stage2", f"checkpoint_step{spec.stage2.steps:08d}"))
    trained.load_state_dict({k.removeprefix("student."): v for k, v in sd.items()})
    images = torch.randn(4, 3, 28, 28)
    a0 = teacher.embed(images)
    with torch.no_grad():
        torch.testing.assert_close(exported.rollout(a0), trained.rollout(a0), rtol=0, atol=0)
    stage1, _ = load_student(_url(spec, "stage1", "student.safetensors"), teacher)
    with torch.no_grad():
        assert not torch.allclose(stage1.rollout(a0), exported.rollout(a0))  # stage 2 did train


@pytest.mark.slow
def test_zero_stages_give_the_same_first_losses(tiny_run, tmp_path):
    """Stage 2 from the same stage-1 student under ZeRO 0-3: the same loss at step 1 (before any
    update) to 1e-6 and after two optimizer steps to 1e-4 (relative), the sharded reductions only
    reorder float32 sums."""
    base = tiny_run
    boundaries = storage.read_json(_url(base, "discovery", "segmentation.json"))["boundaries"]
    losses = {}
    for zero in (0, 1, 2, 3):
        raw = yaml.safe_load(base.to_yaml())
        raw["deepspeed"]["zero_stage"] = zero
        raw["stage2"]["steps"] = 3
        raw["storage"] = {"url": str(tmp_path / f"zero{zero}"), "checkpoint_interval": 100}
        raw["logging"]["val_interval"] = 100
        spec = parse_spec(raw)
        run_stage(spec, "stage2", teacher_url=_url(base, "teacher", "teacher.safetensors"), boundaries=boundaries,
                  out_url=_url(spec, "stage2"), init_url=_url(base, "stage1", "student.safetensors"))
        losses[zero] = torch.tensor([row["loss"] for row in _history(_url(spec, "stage2"))], dtype=torch.float64)
    for zero in (1, 2, 3):
        torch.testing.assert_close(losses[zero][:1], losses[0][:1], rtol=1e-6, atol=0)
        torch.testing.assert_close(losses[zero], losses[0], rtol=1e-4, atol=0)
    assert len(set(losses[0].tolist())) == 3  # the steps did change the student


def _checkpointed(run_root: str, stage: str, step: int) -> bool:
    """Ray Train has registered the checkpoint of ``step`` (its snapshot names it)."""
    snap = storage.join(run_root, "checkpoints", stage, "checkpoint_manager_snapshot.json")
    return storage.exists(snap) and f"checkpoint_step{step:08d}" in storage.read_bytes(snap).decode()


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.3)


@pytest.mark.slow
def test_interrupted_run_resumes_on_s3_and_matches_the_uninterrupted_one(tiny_run, ray_cluster, s3_bucket, tmp_path):
    """`raptor run` with every artifact on the S3 server: killed (SIGKILL) once stage 2 has a
    checkpoint, re-run, it resumes at that checkpoint's step and ends with the same student as the
    uninterrupted local run of the same spec and seed."""
    base = tiny_run
    raw = yaml.safe_load(base.to_yaml())
    root = f"{s3_bucket}/run"
    raw["data"]["train"], raw["data"]["val"] = f"{s3_bucket}/data/train", f"{s3_bucket}/data/val"
    raw["teacher"]["checkpoint"] = f"{s3_bucket}/teacher.safetensors"
    raw["teacher"].pop("train")
    raw["storage"]["url"] = root
    spec = parse_spec(raw)
    # the run got as far as stage 1 earlier: same teacher, boundaries and stage-1 student as the base run
    storage.write_bytes(raw["teacher"]["checkpoint"], storage.read_bytes(_url(base, "teacher", "teacher.safetensors")))
    for artifact in ("discovery/segmentation.json", "stage1/student.safetensors", "stage1/manifest.json"):
        storage.write_bytes(storage.join(root, artifact), storage.read_bytes(_url(base, artifact)))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["gcs"]}

    first = subprocess.Popen([RAPTOR, "run", str(spec_file)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: _checkpointed(root, "stage2", 4), 240, "stage 2's step-4 checkpoint on S3")
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: no cleanup, no final checkpoint
        first.communicate(timeout=60)
    assert not storage.exists(storage.join(root, "stage2", "manifest.json"))

    second = subprocess.run([RAPTOR, "run", str(spec_file)], env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "stage stage1: done, skipped" in log
    resumed_at = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed_at and 4 <= int(resumed_at.group(1)) < spec.stage2.steps, log[-3000:]
    print(f"killed run resumed at step {resumed_at.group(1)} of {spec.stage2.steps}")
    assert storage.exists(storage.join(root, "report", "index.md"))

    teacher = load_teacher(spec, raw["teacher"]["checkpoint"])
    resumed, _ = load_student(storage.join(root, "stage2", "student.safetensors"), teacher)
    straight, _ = load_student(_url(base, "stage2", "student.safetensors"), teacher)
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    steps = [row["step"] for row in storage.read_json(storage.join(root, "stage2", "history.json"))]
    assert steps == list(range(1, spec.stage2.steps + 1))


@pytest.mark.slow
def test_killed_worker_is_recovered_by_failure_config(tiny_run, tmp_path):
    """SIGKILL one Ray Train worker after the first checkpoint: FailureConfig restarts the group,
    which resumes from the newest checkpoint and finishes every step exactly once."""
    from ray.util.state import list_actors

    base = tiny_run
    raw = yaml.safe_load(base.to_yaml())
    raw["stage2"]["steps"] = 60
    raw["storage"] = {"url": str(tmp_path / "run"), "checkpoint_interval": 4}
    raw["logging"]["val_interval"] = 100
    spec = parse_spec(raw)
    killed: list[int] = []

    def kill_a_worker() -> None:
        _wait_for(lambda: _checkpointed(spec.storage.url, "stage2", 4), 240, "the first checkpoint")
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
        pid = int(workers[-1].pid)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    boundaries = storage.read_json(_url(base, "discovery", "segmentation.json"))["boundaries"]
    metrics = run_stage(spec, "stage2", teacher_url=_url(base, "teacher", "teacher.safetensors"), boundaries=boundaries,
                        out_url=_url(spec, "stage2"), init_url=_url(base, "stage1", "student.safetensors"))
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    assert metrics["step"] == 60
    steps = [row["step"] for row in _history(_url(spec, "stage2"))]
    assert steps == list(range(1, 61))  # resumed from a checkpoint, not restarted from step 1
    dead = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "DEAD")], detail=True)
    assert killed[0] in {int(a.pid) for a in dead}


@pytest.mark.slow
def test_submit_runs_the_spec_as_a_ray_job(tiny_run, ray_cluster, tmp_path):
    """`raptor submit` sends `raptor run SPEC` through the job API; on a finished run it does nothing."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(tiny_run.to_yaml())
    out = subprocess.run([RAPTOR, "submit", str(spec_file), "--address", ray_cluster["dashboard"]],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout and "nothing to do: every stage was done" in out.stdout
