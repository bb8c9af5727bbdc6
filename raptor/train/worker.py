"""``train_loop_per_worker``: one Ray Train worker of a distillation stage.

Per worker: the frozen teacher OUTSIDE the DeepSpeed engine (it has no optimizer state to shard,
and ZeRO-3 would not gather timm's cls/register/position parameters used outside a forward), bf16
autocast on GPU, computing trajectories on the fly from this rank's shards; the student's k blocks
INSIDE ``deepspeed.initialize`` with the configured ZeRO stage and the core's torch AdamW (no
fused-Adam compile on CPU). The step is the core's :func:`raptor.distill.distill_loss`, the same
one ``raptor.distill.fit`` differentiates; only the owner of the optimizer differs.

Stage 1 is ONE job in which every block trains on its own segment of the same trajectories: the
blocks share no parameters, so the summed loss gives each block exactly its own gradient, and one
teacher forward (the expensive part at scale: L teacher blocks vs k*n_j student applications)
serves all k blocks. One trainer per block would run the teacher k times per sample and hold k
copies of it on the GPUs.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tempfile
from typing import Any, Iterator

import deepspeed
import ray.train
import ray.train.torch
import torch
from torch import nn

from raptor import data, storage
from raptor.config import JobSpec
from raptor.distill import StageConfig, distill_loss, fidelity, lr_scheduler, make_optimizer, summarize
from raptor.models import Raptor, Teacher, load_student
from raptor.train import checkpoint
from raptor.train.export import export_student
from raptor.train.metrics import Progress
from raptor.build import load_teacher, spec_loader
from raptor.train.stage import StageName, deepspeed_config, stage_config, use_bf16

log = logging.getLogger(__name__)


class StageObjective(nn.Module):
    """The stage loss as the engine's module, so DeepSpeed owns forward/backward around it.

    Its only parameters are the student's blocks; the teacher is not registered (the student
    holds it outside its parameters), so it is neither sharded nor optimised.
    """

    def __init__(self, student: Raptor, cfg: StageConfig):
        super().__init__()
        self.student, self.cfg = student, cfg

    def forward(self, trajectory: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return distill_loss(self.student, trajectory, self.cfg, step)


def _checkpoint_activations(student: Raptor) -> None:
    """Recompute each block application in backward instead of storing its activations."""
    for blk in student.blocks:
        fwd = blk.forward
        blk.forward = lambda x, t, fwd=fwd: torch.utils.checkpoint.checkpoint(fwd, x, t, use_reentrant=False)


def build_student(spec: JobSpec, stage: StageName, teacher: Teacher, boundaries: list[int], init_url: str | None) -> Raptor:
    """Stage 1 starts from the spec's init; stage 2 chains the blocks stage 1 exported."""
    if stage == "stage2":
        if init_url is None:
            raise ValueError("stage 2 needs the stage-1 export (init_url)")
        student, _ = load_student(init_url, teacher)
        return student
    s = spec.student
    return Raptor.from_teacher(teacher, boundaries, init=s.init, mlp=s.mlp, depth_scaling=s.depth_scaling, seed=spec.data.seed)


def batches_from(loader: data.ShardLoader, micro_batches: int) -> Iterator[torch.Tensor]:
    """Images from the data position ``micro_batches`` on, epoch after epoch.

    The loader's order is a pure function of (seed, epoch, rank), so skipping the consumed part
    of the current epoch continues exactly the stream an uninterrupted run would have seen.
    """
    per_epoch = len(loader)
    epoch, skip = divmod(micro_batches, per_epoch)
    while True:
        loader.set_epoch(epoch)
        for images, _ in itertools.islice(loader, skip, None):
            yield images
        epoch, skip = epoch + 1, 0


def _validation_batch(spec: JobSpec, teacher: Teacher, device: torch.device, amp: Any) -> torch.Tensor:
    """The same fixed batch on every rank: the first eval-transformed batch of the val shards."""
    url = spec.data.val or spec.data.train
    images, _ = next(iter(spec_loader(spec, url, train=False)))
    return teacher.trajectory(images.to(device), amp=amp)


@torch.no_grad()
def validate(student: Raptor, trajectory: torch.Tensor) -> dict[str, float]:
    """Per-layer fidelity of the chained rollout (update-R^2 and relative error) and summaries."""
    states = student.rollout(trajectory[:, 0].to(next(student.parameters()).dtype)).float()
    fid = fidelity(states, trajectory.float(), student.layout)
    out = {f"val/{k}": v for k, v in summarize(fid).items()}
    for name in ("update_r2", "rel_error"):
        for layer, v in enumerate(fid["all"][name].tolist(), start=1):
            out[f"val/layer{layer}/{name}"] = float(v)
    return out


_HEADLINE = ("loss", "lambda", "lr", "grad_norm", "data/skipped", "val/all/update_r2/mean", "val/all/update_r2/min",
             "val/all/rel_error/max")


def _headline(row: dict[str, float]) -> dict[str, float]:
    """What Ray Train keeps beside each checkpoint (the full rows go to wandb and history.json)."""
    return {k: row[k] for k in _HEADLINE if k in row}


def _scalars(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _data_counters(loader: data.ShardLoader, device: torch.device) -> dict[str, float]:
    """Skipped/seen samples summed over all ranks (a tiny all-reduce at log time)."""
    stats = loader.stats.as_dict()
    t = torch.tensor([float(v) for v in stats.values()], device=device)
    torch.distributed.all_reduce(t)
    return {f"data/{k}": float(v) for k, v in zip(stats, t.tolist())}


def _run_id(spec: JobSpec, stage: str) -> str:
    """Stable across re-runs of one run (a resumed stage continues its wandb run), distinct across runs."""
    return f"{spec.name}-{stage}-{hashlib.sha1(spec.storage.url.encode()).hexdigest()[:8]}"


def _wandb_dir(spec: JobSpec) -> str:
    if storage.scheme(spec.storage.url) == "file":
        return os.path.join(spec.storage.url, "wandb")
    return os.environ.get("WANDB_DIR") or os.path.join(tempfile.gettempdir(), "raptor-wandb")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: config = {spec (JSON dict), stage, teacher_url, boundaries, init_url, out_url}."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    spec = JobSpec.model_validate(config["spec"])
    stage: StageName = config["stage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if spec.scaling.use_gpu else torch.device("cpu")
    torch.manual_seed(spec.data.seed * 7919 + rank)  # per-rank noise stream; restored on resume
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())

    teacher = load_teacher(spec, config["teacher_url"]).to(device)
    amp = torch.bfloat16 if use_bf16(spec.teacher.precision, device) else False
    student = build_student(spec, stage, teacher, config["boundaries"], config.get("init_url"))
    if spec.deepspeed.activation_checkpointing:
        _checkpoint_activations(student)
    cfg = stage_config(spec, stage)
    optimizer = make_optimizer(student, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=StageObjective(student, cfg),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler(optimizer, cfg),
        config=deepspeed_config(spec, world, device),
    )
    resumed = checkpoint.restore(engine)
    history: list[dict[str, float]] = resumed.history

    loader = spec_loader(spec, spec.data.train, train=True, rank=rank, world_size=world,
                         num_workers=spec.data.num_workers)
    batches = batches_from(loader, resumed.micro_batches)
    val_traj = _validation_batch(spec, teacher, device, amp)
    accum = spec.deepspeed.gradient_accumulation_steps
    lg = spec.logging
    progress = Progress(
        stage, cfg.steps, spec.effective_batch, lg, run_name=_run_id(spec, stage), wandb_dir=_wandb_dir(spec),
        config={"spec": spec.model_dump(mode="json"), "stage": stage, "world_size": world},
        enabled=rank == 0, start_step=resumed.step,
    )
    micro, latest = resumed.micro_batches, {}
    for step in range(resumed.step, cfg.steps):
        for _ in range(accum):
            traj = teacher.trajectory(next(batches).to(device), amp=amp).to(traj_dtype(engine))
            loss, metrics = engine(traj, step)
            engine.backward(loss)
            engine.step()
            micro += 1
        done = step + 1
        last = done == cfg.steps
        row: dict[str, float] = {}
        if done % lg.log_interval == 0 or last:
            grad_norm = engine.get_global_grad_norm()
            row = {**_scalars(metrics), "lr": engine.get_lr()[0], **_data_counters(loader, device)}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            progress.log(done, row)
            row["samples_per_s"] = progress.samples_per_s
        if done % lg.val_interval == 0 or last:
            val = validate(student, val_traj)
            progress.log_validation(done, val)
            row.update(val)
        if row:
            history.append({"step": done, **row})
            latest.update(row)
        if done % spec.storage.checkpoint_interval == 0 or last:
            checkpoint.save_and_report(engine, done, micro, _headline(latest), history if rank == 0 else [])
    if resumed.step >= cfg.steps and rank == 0:
        log.info("%s already complete at step %d; exporting the checkpointed student", stage, resumed.step)
    final = {k: v for row in history for k, v in row.items() if k != "step"}  # the newest value of each metric
    params = list(student.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=spec.deepspeed.zero_stage == 3):
        if rank == 0:
            url = export_student(student, config["out_url"], spec=spec, stage=stage,
                                 teacher_url=config["teacher_url"], metrics=final)
            storage.write_json(storage.join(config["out_url"], "history.json"), history)
            log.info("%s exported to %s", stage, url)
    progress.finish(final)
    torch.distributed.barrier()  # no rank leaves before the export is written


def traj_dtype(engine: Any) -> torch.dtype:
    """Inputs in the engine's compute dtype (bf16/fp16 engines hold bf16/fp16 weights)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32
