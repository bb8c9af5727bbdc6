"""What a training stage tells its user: console progress on rank 0 and wandb (offline by default).

Console lines carry step, loss, lambda, LR, gradient norm, samples/s, MFU and ETA; wandb gets every
scalar (total and per-layer loss, lambda, LR, grad norm, fidelity on the fixed validation batch,
skipped samples, ``perf/*`` utilisation and memory, ``compile/*`` graph counts). wandb is online
only when ``WANDB_API_KEY`` is set (``logging.wandb_mode: auto``), so a laptop or CI run never
needs an account; offline runs can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import logging
import os
import resource
import time

import torch

from raptor.distill import StageConfig
from raptor.models import Raptor, Teacher
from raptor.perf import StudentShape, TeacherShape, UnknownDeviceError, current_device, flops_per_sample, mfu
from raptor.perf.devices import GIB
from raptor.train.job import RunLabels
from raptor.train.settings import LoggingSettings

log = logging.getLogger(__name__)


def device_peak(device: torch.device, amp: torch.dtype | bool, override: float | None) -> float | None:
    """TFLOP/s that MFU divides by: ``override`` (``logging.peak_tflops``), else the table's dense
    peak of this GPU in the step's precision (bf16 under autocast, else fp32). None on CPU (no
    table: a CPU's peak depends on its cores, clock and vector units, so MFU is left out unless
    the spec states one) and on a GPU the table does not know."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    try:
        return current_device(device.index).peak("bf16" if amp else "fp32")
    except UnknownDeviceError as e:
        log.warning("no MFU in the logs: %s", e)
        return None


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory: what torch allocated on the GPU, else the peak resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


class Utilisation:
    """Per-device throughput, model FLOP utilisation and peak memory of a stage's step.

    FLOPs per sample come from :mod:`raptor.perf.flops` (the same model ``raptor plan`` and
    ``scripts/bench_gpu.py`` use): the online teacher's trajectory plus the student's forward and
    backward at the step's lambda (stage 1 runs teacher forcing and/or AR). Model FLOPs: activation
    checkpointing's recomputation is not counted, so it lowers MFU.
    """

    def __init__(self, teacher: Teacher, student: Raptor, cfg: StageConfig, *, world_size: int,
                 device: torch.device, peak_tflops: float | None):
        self.teacher, self.student = TeacherShape.from_teacher(teacher), StudentShape.from_student(student)
        self.cfg, self.world_size, self.device = cfg, world_size, device
        self.peak = peak_tflops

    def __call__(self, samples_per_s: float, lam: float) -> dict[str, float]:
        """``samples_per_s``: all ranks together; ``lam``: the step's teacher-forcing weight."""
        per_device = samples_per_s / self.world_size
        fps = flops_per_sample(self.student, self.teacher, stage=self.cfg.stage, lam=lam, horizon=self.cfg.horizon)
        out = {"perf/samples_per_s_per_device": per_device, "perf/tflops_per_device": per_device * fps / 1e12,
               "perf/gflops_per_sample": fps / 1e9, "perf/peak_mem_gib": peak_memory_gib(self.device)}
        if self.peak:
            out["perf/mfu"] = mfu(per_device, fps, self.peak)
        return out


def wandb_mode(mode: str) -> str:
    """``auto`` -> online with an API key, offline without; an explicit mode wins.

    Resolved in the worker, whose environment (e.g. a cluster's secret) is the one that counts.
    """
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _eta(seconds: float) -> str:
    m, s = divmod(int(max(seconds, 0)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Rank-0 reporter for one stage: throughput over the last interval, ETA from it, wandb run.

    Other ranks build it with ``enabled=False`` so the call sites stay rank-agnostic.
    """

    def __init__(
        self,
        stage: str,
        total_steps: int,
        samples_per_step: int,
        settings: LoggingSettings,
        labels: RunLabels,
        *,
        enabled: bool,
        start_step: int = 0,
        utilisation: Utilisation | None = None,
    ):
        self.stage, self.total, self.samples_per_step = stage, total_steps, samples_per_step
        self.enabled, self.utilisation = enabled, utilisation
        self._mark_step, self._mark_time = start_step, time.perf_counter()
        self.samples_per_s = 0.0
        self.run = None
        mode = wandb_mode(settings.wandb_mode)
        if enabled and mode != "disabled":
            import wandb

            os.makedirs(labels.wandb_dir, exist_ok=True)
            # a fixed id (the stage's key) + resume="allow": a resumed stage continues the same wandb run
            self.run = wandb.init(
                project=settings.wandb_project,
                entity=settings.wandb_entity,
                name=labels.run_name,
                id=labels.run_id,
                group=settings.wandb_group,
                resume="allow",
                mode=mode,
                dir=labels.wandb_dir,
                config=labels.wandb_config,
                settings=wandb.Settings(silent=True, console="off"),
            )

    def throughput(self, step: int) -> float:
        """Samples/s since the previous call (all ranks together); resets the interval."""
        now = time.perf_counter()
        steps, dt = step - self._mark_step, now - self._mark_time
        self._mark_step, self._mark_time = step, now
        if steps > 0 and dt > 0:
            self.samples_per_s = steps * self.samples_per_step / dt
        return self.samples_per_s

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """One console line and one wandb row at optimizer step ``step`` (1-based: steps done).
        Returns the row as logged (with samples/s and, on rank 0, the ``perf/*`` figures)."""
        if not self.enabled:
            return dict(metrics)
        rate = self.throughput(step)
        eta = (self.total - step) * self.samples_per_step / rate if rate > 0 else float("nan")
        row = {**metrics, "samples_per_s": rate}
        if self.utilisation is not None and rate > 0:
            row.update(self.utilisation(rate, row.get("lambda", 0.0)))
        # ZeRO-0 engines do not expose the gradient norm: the column is left out rather than faked
        grad = f" grad_norm {row['grad_norm']:.3g}" if "grad_norm" in row else ""
        util = f" MFU {row['perf/mfu']:.1%}" if "perf/mfu" in row else ""
        log.info(
            "%s step %d/%d loss %.4g lambda %.3f lr %.3g%s | %.1f samples/s%s ETA %s",
            self.stage, step, self.total, row.get("loss", float("nan")), row.get("lambda", 0.0),
            row.get("lr", float("nan")), grad, rate, util, _eta(eta) if rate > 0 else "?",
        )
        if self.run is not None:
            self.run.log({f"{self.stage}/{k}": v for k, v in row.items()}, step=step)
        return row

    def log_validation(self, step: int, metrics: dict[str, float]) -> None:
        """Fidelity on the fixed validation batch (per layer and summarised)."""
        if not self.enabled:
            return
        log.info(
            "%s step %d validation: update_r2 mean %.3f min %.3f, rel_error max %.3f",
            self.stage, step, metrics.get("val/all/update_r2/mean", float("nan")),
            metrics.get("val/all/update_r2/min", float("nan")), metrics.get("val/all/rel_error/max", float("nan")),
        )
        if self.run is not None:
            self.run.log({f"{self.stage}/{k}": v for k, v in metrics.items()}, step=step)

    def finish(self, summary: dict[str, float]) -> None:
        if self.run is not None:
            self.run.summary.update({f"{self.stage}/{k}": v for k, v in summary.items()})
            self.run.finish()
