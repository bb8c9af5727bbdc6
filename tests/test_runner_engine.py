"""The runner's engine and hot path on CPU, in this process: a real DeepSpeed ZeRO-2 engine over gloo
(world size 1), built by ``raptor.train.trainer.build_engine`` exactly as each Ray Train worker builds it.

Mixed precision: ``deepspeed.precision: bf16`` is bf16 autocast in an fp32 engine with
fp32 targets. Stated bound, measured on this CPU stand-in (a teacher whose layers move the
residual stream ~1.5% per layer, as trained ViTs do; a student copied from it, 20 AdamW steps of
stage 2): per-layer update-R^2 of the bf16 run within 2e-3 of the fp32 run's, both on the runner's
validation rollout (itself under bf16 autocast) and on the exported (fp32) student; measured 1.1e-3
and 6e-4 on a 2-core CPU. Compiled (``compile: loss``, inductor) and eager runner losses agree
within 1e-4 relative over three steps (fp32; measured 3e-7): only float reassociation differs.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

from raptor.data import synthetic_source, write_shards
from raptor.distill import StageConfig, fidelity
from raptor.models import Raptor, Teacher, load_student
from raptor.models.checkpoints import read_checkpoint
from raptor.train.export import export_student
from raptor.execution import DeepSpeedSettings
from raptor.data.settings import LoaderSettings
from raptor.train.job import RunLabels, ShardSource, StageJob
from raptor.train import settings as runner
from raptor.train.trainer import Validator, build_engine

KW = dict(embed_dim=64, depth=6, num_heads=4, init_values=0.1)
CPU = torch.device("cpu")
UPDATE_R2_BOUND = 2e-3  # per layer, bf16 autocast run vs fp32 run
COMPILE_RTOL = 1e-4  # compiled vs eager loss, fp32


@pytest.fixture(scope="module")
def gloo():
    """One-rank gloo process group, as deepspeed.init_distributed sees it in a Ray Train worker."""
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    torch.distributed.destroy_process_group()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher (saved, as the job references it), its val shards, and trajectories to train on."""
    root = tmp_path_factory.mktemp("engine")
    torch.manual_seed(0)
    teacher = Teacher.from_timm("vit_small_patch14_reg4_dinov2", img_size=28, **KW)
    teacher.save(str(root / "teacher.safetensors"))
    write_shards(synthetic_source(8, num_classes=2, size=32), str(root / "val"), prefix="val", max_samples=8)
    traj = teacher.trajectory(torch.randn(8, 3, 28, 28))
    return root, teacher, traj


def job_for(root, cfg: StageConfig, **deepspeed) -> StageJob:
    source = ShardSource(url=str(root / "val"), image_size=28, settings=LoaderSettings(batch_size=8, num_workers=0))
    return StageJob(
        stage="stage2", config=cfg,
        teacher=runner.TeacherSettings(name="vit_small_patch14_reg4_dinov2", img_size=28, model_kwargs=KW,
                                       checkpoint=str(root / "teacher.safetensors"), precision="fp32"),
        student=runner.StudentSettings(), boundaries=(2, 4), init_url=None, train=source, val=source,
        scaling=runner.ScalingSettings(), deepspeed=DeepSpeedSettings(zero_stage=2, **deepspeed),
        storage=runner.StorageSettings(), faults=runner.FaultSettings(), logging=runner.LoggingSettings(),
        labels=RunLabels("test", "test", wandb_dir=str(root / "wandb")),
        out_url=str(root / "out-{precision}-{compile}".format(**deepspeed)),
    )


def train(job: StageJob, teacher: Teacher, student: Raptor, traj: torch.Tensor, steps: int) -> tuple[list[float], object]:
    """``steps`` optimizer steps of the runner's engine on ``traj``; the losses, and the engine."""
    engine, hot = build_engine(job, teacher, student, CPU, world_size=1)
    seen = []
    hot.objective.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    losses = []
    for step in range(steps):
        loss, _ = engine(traj, step)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    assert set(seen) == {torch.float32}  # the targets reach the loss in fp32
    return losses, engine


def update_r2(student: Raptor, traj: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return fidelity(student.rollout(traj[:, 0]), traj, student.geometry)["all"]["update_r2"]


def test_bf16_autocast_engine_keeps_fp32_fidelity_in_training_and_export(gloo, setup):
    """Catches the runner's mixed precision costing fidelity: DeepSpeed's bf16 mode (bf16 weights and
    residual stream), bf16 targets, or a bf16 export. The bf16 run's validation and its export must
    match the fp32 run's per-layer update-R^2 within UPDATE_R2_BOUND; weights, optimizer and export stay fp32."""
    root, teacher, traj = setup
    start = Raptor.from_teacher(teacher, [2, 4], init="teacher", seed=0)
    cfg = StageConfig.paper_stage2(steps=20, lr=1e-4, warmup_steps=0)
    runs = {}
    for precision in ("fp32", "bf16"):
        job = job_for(root, cfg, precision=precision, compile="off")
        student = copy.deepcopy(start)
        losses, engine = train(job, teacher, student, traj, cfg.steps)
        assert not engine.bfloat16_enabled() and not engine.fp16_enabled()
        assert {p.dtype for p in student.parameters()} == {torch.float32}
        assert all(v.dtype == torch.float32 for st in engine.optimizer.state.values() for v in st.values() if v.ndim)
        validator = Validator(job.val, teacher, student, 1, CPU, job.teacher.amp(CPU), job.deepspeed.amp(CPU))
        val = torch.tensor([validator()[f"val/layer{layer}/update_r2"] for layer in range(1, teacher.depth + 1)])
        url = export_student(student, job, {}, [], resumed_at=[])
        assert {v.dtype for v in read_checkpoint(url)[0].values()} == {torch.float32}
        exported, _ = load_student(url, teacher)
        runs[precision] = losses, val, update_r2(exported, validator.trajectory)
    (l32, val32, exp32), (l16, val16, exp16) = runs["fp32"], runs["bf16"]
    assert l32[-1] < 0.8 * l32[0]  # it trained
    assert l16 != l32  # bf16 autocast did run
    assert (val16 - val32).abs().max() <= UPDATE_R2_BOUND, (val16, val32)
    assert (exp16 - exp32).abs().max() <= UPDATE_R2_BOUND, (exp16, exp32)
    print(f"update-R^2 |bf16 - fp32| max: validation {(val16 - val32).abs().max():.2e}, export {(exp16 - exp32).abs().max():.2e}")


@pytest.mark.slow
def test_compiled_runner_step_matches_eager(gloo, setup):
    """Catches the compiled hot path (teacher trajectory + stage loss under inductor, inside the
    DeepSpeed engine) computing another loss or update than the eager one, or recompiling."""
    root, teacher, _ = setup
    images = torch.randn(4, 3, 28, 28)
    start = Raptor.from_teacher(teacher, [2, 4], seed=0)
    cfg = StageConfig.paper_stage2(steps=3, lr=1e-3, warmup_steps=0)
    losses = {}
    for mode in ("off", "loss"):
        torch._dynamo.reset()
        student = copy.deepcopy(start)
        engine, hot = build_engine(job_for(root, cfg, precision="fp32", compile=mode), teacher, student, CPU, 1)
        losses[mode] = []
        for step in range(cfg.steps):
            loss, _ = engine(hot.trajectory(images), step)
            engine.backward(loss)
            engine.step()
            losses[mode].append(float(loss.detach()))
        counters = hot.counters()
    torch._dynamo.reset()
    assert counters == {"compile/graphs": 2, "compile/recompiles": 0, "compile/stage2": 1, "compile/trajectory": 1}
    torch.testing.assert_close(torch.tensor(losses["loss"]), torch.tensor(losses["off"]), rtol=COMPILE_RTOL, atol=0)
    assert len(set(losses["off"])) == 3  # the steps changed the student
    print(f"compiled vs eager loss, max relative difference: "
          f"{max(abs(a - b) / b for a, b in zip(losses['loss'], losses['off'])):.1e}")


@pytest.mark.parametrize("made, resumed", [(2, 0), (0, 3), (3, 1), (1, 2)])
def test_a_consolidated_state_resumes_under_another_zero_stage(gloo, setup, made, resumed):
    """Catches a checkpoint state tied to the ZeRO stage that made it (DeepSpeed's own is): the whole
    state gathered from an engine under ZeRO-``made`` and loaded into a fresh engine (another student's
    weights) under ZeRO-``resumed`` must gather back identical (weights, both AdamW moments, step
    count, learning rates, schedule), and the next step must move both engines to the same weights.
    A lost moment, step count or schedule position, or working weights left stale, breaks it."""
    import dataclasses

    from raptor.train import consolidated

    root, teacher, traj = setup
    cfg = StageConfig.paper_stage2(steps=10, lr=1e-3, warmup_steps=6)
    base = job_for(root, cfg, precision="fp32", compile="off")
    engines = []
    for zero, seed in ((made, 0), (resumed, 1)):
        job = dataclasses.replace(base, deepspeed=base.deepspeed.updated(zero_stage=zero))
        student = Raptor.from_teacher(teacher, [2, 4], seed=seed)
        engine, hot = build_engine(job, teacher, student, CPU, world_size=1)
        engines.append((engine, student))
    (a, student_a), (b, student_b) = engines
    for step in range(3):
        loss, _ = a(traj, step)
        a.backward(loss)
        a.step()
    state = consolidated.gather(a, student_a)
    assert state["adam_step"] == 3 and state["lrs"][0] < cfg.lr  # mid-warmup
    consolidated.scatter(b, student_b, state)
    again = consolidated.gather(b, student_b)
    assert again.keys() == state.keys()
    for key, value in state.items():
        if torch.is_tensor(value):
            assert torch.equal(again[key], value), key
        else:
            assert again[key] == value, key
    losses = []
    for engine in (a, b):
        loss, _ = engine(traj, 3)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    after_a, after_b = consolidated.gather(a, student_a), consolidated.gather(b, student_b)
    for key in after_a:
        if key.startswith("param/"):
            torch.testing.assert_close(after_b[key], after_a[key], rtol=1e-5, atol=1e-7)
    assert after_b["lrs"] == after_a["lrs"] and after_b["adam_step"] == after_a["adam_step"] == 4
