"""The Trainer: one Ray Train worker of a distillation stage, its parts named as attributes.

Per worker: the frozen teacher OUTSIDE the DeepSpeed engine (it has no optimizer state to shard,
and ZeRO-3 would not gather timm's cls/register/position parameters used outside a forward),
computing trajectories on the fly from this rank's shards; the student's k blocks INSIDE an fp32
``deepspeed.initialize`` with the configured ZeRO stage and the core's torch AdamW (fused on GPU).
The step is the core's :func:`raptor.distill.distill_loss` (eager or compiled, under autocast:
:mod:`raptor.train.hotpath`), the same one ``raptor.distill.fit`` differentiates; only the owner
of the optimizer differs.

Stage 1 is ONE job in which every block trains on its own segment of the same trajectories: the
blocks share no parameters, so the summed loss gives each block exactly its own gradient, and one
teacher forward (the expensive part at scale: L teacher blocks vs k*n_j student applications)
serves all k blocks. One trainer per block would run the teacher k times per sample and hold k
copies of it on the GPUs.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import ray.train
import ray.train.torch
import torch

from raptor import data, storage
from raptor.distill import fidelity, lr_scheduler, make_optimizer, summarize
from raptor.models import Raptor, Teacher, load_student
from raptor.models.teacher import autocast
from raptor.train.checkpoint import Checkpointer, Resumed
from raptor.train.export import export_student
from raptor.train.hotpath import HotPath
from raptor.train.job import ShardSource, StageJob
from raptor.train.logs import quiet_worker
from raptor.train.metrics import Progress, Utilisation, device_peak
from raptor.train.nonfinite import NonFiniteGuard

log = logging.getLogger(__name__)


def build_student(job: StageJob, teacher: Teacher) -> Raptor:
    """Stage 1 starts from fresh blocks on the boundaries (seeded by the data seed); stage 2 chains the
    blocks stage 1 exported."""
    if job.init_url is not None:
        student, _ = load_student(job.init_url, teacher)
        return student
    s = job.student
    return Raptor.from_teacher(teacher, list(job.boundaries), init=s.init, mlp=s.mlp, depth_scaling=s.depth_scaling,
                               seed=job.train.settings.seed)


def batches_from(loader: data.ShardLoader, step: int) -> Iterator[torch.Tensor]:
    """This rank's micro-batches from optimizer step ``step`` on, epoch after epoch.

    The loader's global batches are a pure function of (seed, epoch), whatever the world size, so
    starting at the step a checkpoint was taken continues exactly the samples an uninterrupted run
    would have seen, on any number of workers (the skipped steps are read, not decoded).
    """
    epoch, start = divmod(step, loader.steps_per_epoch)
    while True:
        loader.set_epoch(epoch, start)
        for images, _ in loader:
            yield images
        epoch, start = epoch + 1, 0


class Validator:
    """Per-layer fidelity of the chained rollout on a fixed validation batch (the same on every rank).

    The batch is the first eval-transformed batch of the validation shards; its teacher trajectory
    is computed once (under the teacher's precision, fp32 states). The rollout runs under the
    student's autocast, as in training, and eager: compiled blocks would compile again for the
    no-grad rollout. Where the teacher has a linear head, the student's last state is also read
    out through it (``val/top1``, the authors' check during training), beside the teacher's own
    top-1 on the same batch (``val/teacher_top1``).
    """

    def __init__(self, source: ShardSource, teacher: Teacher, student: Raptor, interval: int, device: torch.device,
                 teacher_amp: torch.dtype | bool, student_amp: torch.dtype | bool):
        images, labels = next(iter(source.loader(train=False)))
        with torch.compiler.set_stance("force_eager"):
            self.trajectory = teacher.trajectory(images.to(device), amp=teacher_amp)
        self.labels = labels.to(device)
        self.teacher, self.student, self.interval, self.amp = teacher, student, interval, student_amp

    def due(self, step: int, last: bool) -> bool:
        return step % self.interval == 0 or last

    def top1(self, state: torch.Tensor) -> float:
        return float((self.teacher.logits(state.float()).argmax(-1) == self.labels).float().mean())

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        traj = self.trajectory
        with torch.compiler.set_stance("force_eager"), autocast(traj.device, self.amp):
            states = self.student.rollout(traj[:, 0])
        fid = fidelity(states.float(), traj, self.student.geometry)
        out = {f"val/{k}": v for k, v in summarize(fid).items()}
        for name in ("update_r2", "rel_error"):
            for layer, v in enumerate(fid["all"][name].tolist(), start=1):
                out[f"val/layer{layer}/{name}"] = float(v)
        if self.teacher.head is not None:
            out["val/top1"], out["val/teacher_top1"] = self.top1(states[:, -1]), self.top1(traj[:, -1])
        return out


_HEADLINE = ("loss", "lambda", "lr", "grad_norm", "data/skipped", "val/all/update_r2/mean", "val/all/update_r2/min",
             "val/all/rel_error/max", "val/top1", "val/teacher_top1")


def _headline(row: dict[str, float]) -> dict[str, float]:
    """What Ray Train keeps beside each checkpoint (the full rows go to wandb and history.json)."""
    return {k: row[k] for k in _HEADLINE if k in row}


def _data_counters(loader: data.ShardLoader, device: torch.device) -> dict[str, float]:
    """Skipped/seen samples summed over all ranks (a tiny all-reduce at log time)."""
    stats = loader.stats.as_dict()
    t = torch.tensor([float(v) for v in stats.values()], device=device)
    torch.distributed.all_reduce(t)
    return {f"data/{k}": float(v) for k, v in zip(stats, t.tolist())}


def build_engine(job: StageJob, teacher: Teacher, student: Raptor, device: torch.device,
                 world_size: int) -> tuple[Any, HotPath]:
    """The student's DeepSpeed engine (fp32, ZeRO per the job) around the stage's hot path
    (:meth:`HotPath.for_job`); AdamW is torch's fused kernel on GPU unless the optimizer is offloaded.
    The micro-batch and accumulation are the job's at ``world_size`` (:meth:`StageJob.batching`)."""
    import deepspeed

    ds = job.deepspeed
    hot = HotPath.for_job(job, teacher, student, device)
    optimizer = make_optimizer(student, job.config, fused=ds.fused_adamw(device))
    micro, accumulation = job.batching(world_size)
    engine, _, _, _ = deepspeed.initialize(
        model=hot.objective,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler(optimizer, job.config),
        config=ds.config(micro, world_size, sum(p.numel() for p in student.parameters()), accumulation=accumulation),
    )
    return engine, hot


class Trainer:
    """One worker's stage: its parts are built from the :class:`StageJob` in ``__init__``, ``train`` runs them."""

    job: StageJob
    rank: int
    device: torch.device
    teacher: Teacher  # frozen, outside the engine
    student: Raptor  # its k blocks are the engine's parameters
    engine: Any  # deepspeed.DeepSpeedEngine around the hot path's StageObjective
    hot: HotPath  # the teacher's trajectory and the stage loss, eager or compiled, under autocast
    world_size: int
    micro_batch: int  # per worker (the largest), and the micro-batches of one optimizer step: the job's at this world size
    accumulation: int
    global_batch: int  # samples per optimizer step over all workers
    samples: int  # the samples this rank's optimizer steps took since the group started
    loader: data.ShardLoader  # this rank's training shards
    validator: Validator
    checkpointer: Checkpointer
    logger: Progress
    guard: NonFiniteGuard  # skips and counts non-finite steps; stops a diverged stage

    def __init__(self, job: StageJob):
        import deepspeed  # here, not at import: the driver that launches the stage never loads it

        ctx = ray.train.get_context()
        self.job, self.rank = job, ctx.get_world_rank()
        world = ctx.get_world_size()
        self.device = ray.train.torch.get_device() if job.scaling.use_gpu else torch.device("cpu")
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())

        self.teacher = job.teacher.load(self.device)
        self.checkpointer = Checkpointer(job.storage, lambda: self._fresh(world), lambda: self.student)
        self.resumed = self.checkpointer.restore()
        self.world_size = world
        self.micro_batch, self.accumulation = job.batching(world)
        self.global_batch = job.global_batch or self.micro_batch * self.accumulation * world
        self.samples = 0
        self.loader = job.train_loader(self.rank, world, self.device)
        self.validator = Validator(job.val, self.teacher, self.student, job.logging.val_interval, self.device,
                                   job.teacher.amp(self.device), job.deepspeed.amp(self.device))
        utilisation = Utilisation(self.teacher, self.student, job.config, world_size=world, device=self.device,
                                  peak_tflops=device_peak(self.device, job.deepspeed.amp(self.device),
                                                          job.logging.peak_tflops)) if self.rank == 0 else None
        self.logger = Progress(job.stage, job.config.steps, self.global_batch, job.logging, job.labels,
                               enabled=self.rank == 0, start_step=self.resumed.step, utilisation=utilisation)
        self.guard = NonFiniteGuard(job.stage, self.engine, self.student, job.faults.max_nonfinite_steps,
                                    self.resumed.nonfinite, report=self.rank == 0)

    def _fresh(self, world_size: int) -> Any:
        """The stage's start on this rank: the per-rank noise stream seeded, the initial student, a new
        engine around it (the checkpointer calls it, and again to undo a checkpoint another rank refused)."""
        torch.manual_seed(self.job.train.settings.seed * 7919 + self.rank)  # per-rank noise stream; restored on resume
        self.student = build_student(self.job, self.teacher)
        self.engine, self.hot = build_engine(self.job, self.teacher, self.student, self.device, world_size)
        return self.engine

    def step(self, batches: Iterator[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """One optimizer step: ``accumulation`` micro-batches through the engine; returns their metrics on this
        rank, weighted by size.

        DeepSpeed averages gradients over ranks and micro-batches as if all were equally large. Where the
        world size does not divide the global batch they are not (:mod:`raptor.data.streaming`), so each
        micro-batch's loss is weighted by its share of an equal split (exactly 1 where they are equal): the
        gradient is then the global batch's mean at any world size."""
        total: dict[str, torch.Tensor] = {}
        sizes = []
        for _ in range(self.accumulation):
            images = next(batches)
            loss, metrics = self.engine(self.hot.trajectory(images.to(self.device)), step)
            weight = len(images) * self.world_size * self.accumulation / self.global_batch
            self.engine.backward(loss if weight == 1 else loss * weight)
            self.guard.before_update()
            self.engine.step()
            sizes.append(len(images))
            self.samples += len(images)
            total = {k: total[k] + v * len(images) if k in total else v * len(images) for k, v in metrics.items()}
        return {k: v / sum(sizes) for k, v in total.items()}

    def global_mean(self, metrics: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Collective: this step's metrics over the global batch (each rank's mean weighted by its ``count``
        samples), so a logged loss means the same at any world size, not rank 0's share of the batch."""
        keys = sorted(metrics)
        t = torch.stack([metrics[k].detach().float().reshape(()) * count for k in keys]
                        + [torch.tensor(float(count), device=self.device)]).to(self.device)
        torch.distributed.all_reduce(t)
        return {k: float(t[i] / t[-1]) for i, k in enumerate(keys)}

    def samples_taken(self) -> int:
        """Collective: the training samples every optimizer step so far took, over all ranks and resumes
        (counted, not derived from the batch size: a resize must leave it at steps x global batch)."""
        here = torch.tensor([self.samples], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(here)
        return self.resumed.samples + int(here.item())

    def train(self) -> None:
        job, cfg, lg = self.job, self.job.config, self.job.logging
        history, latest = self.resumed.history, {}
        state = Resumed(history=history if self.rank == 0 else [], resumed_at=self.resumed.resumed_at)
        batches = batches_from(self.loader, self.resumed.step)
        for step in range(self.resumed.step, cfg.steps):
            before = self.samples
            metrics = self.step(batches, step)
            self.guard.after_update(step + 1, metrics)
            done, last = step + 1, step + 1 == cfg.steps or self.guard.stopped is not None
            row: dict[str, float] = {}
            if done % lg.log_interval == 0 or last:
                row = {**self.global_mean(metrics, self.samples - before), "lr": self.engine.get_lr()[0],
                       "nonfinite_steps": self.guard.total, "samples": self.samples_taken(),
                       **_data_counters(self.loader, self.device),
                       **self.hot.counters()}
                grad_norm = self.engine.get_global_grad_norm()
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                row = self.logger.log(done, row)
            if self.validator.due(done, last):
                val = self.validator()
                self.logger.log_validation(done, val)
                row.update(val)
            if row:
                history.append({"step": done, "world_size": self.world_size, **row})
                latest.update(row)
            reported = {**_headline(latest), "global_step": job.labels.step_offset + done}
            if self.checkpointer.due(done, last):
                state.nonfinite, state.samples = self.guard.counters(), self.samples_taken()
                stop = {"stopped": self.guard.stopped} if self.guard.stopped else {}
                self.checkpointer.save(done, {**reported, **stop}, state)
            elif job.labels.report_interval and done % job.labels.report_interval == 0:
                ray.train.report(reported)  # every rank: a Ray Train report is collective
            if self.guard.stopped:  # diverged: the checkpoint holds the state, the driver raises TrainingDiverged
                self.logger.finish(latest)
                return
        if self.resumed.step >= cfg.steps and self.rank == 0:
            log.info("%s already complete at step %d; exporting the checkpointed student", job.stage, self.resumed.step)
        self.export(history)

    def export(self, history: list[dict[str, float]]) -> None:
        """Rank 0 writes the student (gathered first under ZeRO-3); no rank leaves before it is written."""
        import deepspeed

        final = {k: v for row in history for k, v in row.items() if k != "step"}  # the newest value of each metric
        params = list(self.student.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.job.deepspeed.zero_stage == 3):
            self.guard.check_weights(max(self.resumed.step, self.job.config.steps))
            if self.rank == 0 and self.guard.stopped is None:
                url = export_student(self.student, self.job, final, history, resumed_at=self.resumed.resumed_at,
                                     nonfinite_steps=self.guard.total)
                log.info("%s exported to %s", self.job.stage, url)
        if self.guard.stopped is not None:  # never export weights that are not finite
            ray.train.report({"stopped": self.guard.stopped})
        self.logger.finish(final)
        torch.distributed.barrier()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: ``config = {"job": StageJob}``."""
    quiet_worker()
    storage.set_patience(config["job"].storage.patience)
    Trainer(config["job"]).train()
