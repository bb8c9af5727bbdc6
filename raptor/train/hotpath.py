"""A training stage's hot path: the teacher's trajectory and the stage loss, as the engine runs them.

Precision: the frozen teacher computes its trajectory under ``teacher.precision``'s
autocast and returns it in fp32, so the student's targets keep fp32 precision; the student's loss
runs under ``deepspeed.precision``'s autocast inside the engine's forward. Autocast computes the
matmuls and attention in bf16 while the student's parameters (the master weights), residual
stream, norms, depth-scaling gains and loss stay fp32; the DeepSpeed engine around it is fp32, so
gradients, optimizer states and the export are fp32 too.

Compilation (``deepspeed.compile``): ``loss`` captures the teacher's trajectory and the whole stage
loss as graphs (:mod:`raptor.perf.compile`: fullgraph, static shapes, stage 1's lambda as a tensor);
``blocks`` compiles each teacher and student block in place (regional: compile time independent of
the depth); ``off`` is eager. The graphs each region compiles are counted, so the logs show
``compile/recompiles`` (anything above 0 is a shape or guard the plan did not expect).

The Trainer and the runner benchmark's bare step (:mod:`raptor.train.bench`) both run this class,
so the benchmark's ratio measures Ray Train + DeepSpeed and nothing else.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import nn

from raptor.distill import StageConfig, distill_loss
from raptor.models import Raptor, Teacher
from raptor.models.teacher import autocast
from raptor.perf import CompileCounter, CompiledLoss, compile_blocks, compile_trajectory
from raptor.train.job import StageJob

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


class StageObjective(nn.Module):
    """The stage loss as the engine's module, so DeepSpeed owns forward/backward around it.

    Its only parameters are the student's blocks; the teacher is not registered (the student
    holds it outside its parameters), so it is neither sharded nor optimised. The forward runs
    under the student's autocast; backward (outside it) follows the recorded dtypes.
    """

    def __init__(self, student: Raptor, cfg: StageConfig, loss_fn: LossFn = distill_loss,
                 amp: torch.dtype | bool = False):
        super().__init__()
        self.student, self.cfg, self.loss_fn, self.amp = student, cfg, loss_fn, amp

    def forward(self, trajectory: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast(trajectory.device, self.amp):
            return self.loss_fn(self.student, trajectory, self.cfg, step)


class HotPath:
    """The per-step compute of a stage: ``trajectory(images)`` (fp32 targets) and ``objective``
    (the module the engine wraps), eager or compiled; ``counters()`` for the logs."""

    def __init__(
        self,
        teacher: Teacher,
        student: Raptor,
        cfg: StageConfig,
        *,
        teacher_amp: torch.dtype | bool,
        student_amp: torch.dtype | bool,
        compile: Literal["off", "loss", "blocks"] = "off",
        backend: str = "inductor",
    ):
        self.mode = compile
        self.counter = CompileCounter()
        self._trajectory: Callable[[torch.Tensor], torch.Tensor] = lambda x: teacher.trajectory(x, amp=teacher_amp)
        loss_fn: LossFn = distill_loss
        if compile == "loss":
            self._trajectory = compile_trajectory(teacher, amp=teacher_amp, counter=self.counter, backend=backend)
            loss_fn = CompiledLoss(self.counter, backend=backend)
        elif compile == "blocks":
            compile_blocks(teacher.blocks, "teacher", counter=self.counter, backend=backend)
            compile_blocks(student.blocks, "student", counter=self.counter, backend=backend)
        elif compile != "off":
            raise ValueError(f"compile must be off, loss or blocks, got {compile!r}")
        self.objective = StageObjective(student, cfg, loss_fn, student_amp)

    @classmethod
    def for_job(cls, job: StageJob, teacher: Teacher, student: Raptor, device: torch.device) -> "HotPath":
        """The job's hot path on ``device``: its precisions, compile mode and activation checkpointing
        (through ``Raptor.set_checkpointing``: every block or the job's blocks)."""
        ds = job.deepspeed
        student.set_checkpointing(ds.activation_checkpointing)
        return cls(teacher, student, job.config, teacher_amp=job.teacher.amp(device), student_amp=ds.amp(device),
                   compile=ds.compile_mode(device))

    @torch.no_grad()
    def trajectory(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's states a_0..a_L of ``images``, ``[B, L+1, N, D]`` in fp32."""
        return self._trajectory(images)

    def counters(self) -> dict[str, int]:
        """``compile/graphs``, ``compile/recompiles`` and graphs per region (empty when eager)."""
        return self.counter.as_dict() if self.mode != "off" else {}
