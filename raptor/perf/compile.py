"""The training hot path under ``torch.compile``: the teacher's trajectory and the stage loss.

Both are captured whole (``fullgraph=True``: a graph break is an error, not a silent slowdown) with
static shapes (``dynamic=False``: one graph per batch shape; the loaders keep the batch fixed).
Stage 1's lambda changes every step of the anneal, so it enters the graph as a 0-d tensor; which
terms run (teacher forcing at lambda > 0, AR at lambda < 1) is a Python choice made outside, so a
run compiles at most three stage-1 graphs, one per phase (lambda = 1 at step 0, the anneal, pure AR).

:class:`CompileCounter` counts the graphs each region compiles (dynamo calls the backend once per
graph), so the runner can log ``compile/recompiles``: anything above 0 means something outside
the plan (a new batch shape, a changed config object, a dtype) forced a recompilation.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import nn

from raptor.distill.config import StageConfig
from raptor.distill.losses import stage1_loss, stage2_loss
from raptor.distill.schedules import stage_lambda
from raptor.models.student import Raptor
from raptor.models.teacher import Teacher
from raptor.perf.flops import stage_terms

log = logging.getLogger(__name__)

LossResult = tuple[torch.Tensor, dict[str, torch.Tensor]]
_PHASES = {(True, False): "tf", (True, True): "tf+ar", (False, True): "ar"}


class CompileCounter:
    """Graphs compiled per region; ``recompiles`` = graphs beyond those each region expects."""

    def __init__(self) -> None:
        self.graphs: dict[str, int] = {}
        self.expected: dict[str, int] = {}

    def backend(self, region: str, backend: str = "inductor", expected: int = 1) -> Callable:
        """A ``torch.compile`` backend that counts its graphs under ``region``, then runs ``backend``.
        ``expected``: graphs the region needs by design (more are logged as recompiles)."""
        inner = torch._dynamo.lookup_backend(backend)
        self.expected[region] = expected

        def compile_graph(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            n = self.graphs[region] = self.graphs.get(region, 0) + 1
            if n > expected:
                log.warning("torch.compile: %s compiled again (graph %d); see TORCH_LOGS=recompiles", region, n)
            return inner(gm, example_inputs)

        return compile_graph

    @property
    def recompiles(self) -> int:
        return sum(max(n - self.expected.get(region, 1), 0) for region, n in self.graphs.items())

    def as_dict(self) -> dict[str, int]:
        """Flat counters for the logs: ``compile/graphs``, ``compile/recompiles``, ``compile/<region>``."""
        out = {"compile/graphs": sum(self.graphs.values()), "compile/recompiles": self.recompiles}
        out.update({f"compile/{region}": n for region, n in sorted(self.graphs.items())})
        return out


def compile_trajectory(
    teacher: Teacher,
    *,
    amp: bool | torch.dtype = False,
    dtype: torch.dtype = torch.float32,
    counter: CompileCounter | None = None,
    backend: str = "inductor",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images -> teacher.trajectory(images, amp=amp, dtype=dtype)``, compiled as one graph.

    The states come back as ``dtype`` (fp32 by default: the student's targets keep fp32 precision
    whatever ``amp`` computes the blocks in)."""
    counter = counter if counter is not None else CompileCounter()

    def trajectory(images: torch.Tensor) -> torch.Tensor:
        return teacher.trajectory(images, amp=amp, dtype=dtype)

    return torch.compile(trajectory, backend=counter.backend("trajectory", backend), fullgraph=True, dynamic=False)


def compile_blocks(
    blocks: nn.ModuleList,
    region: str,
    *,
    counter: CompileCounter | None = None,
    backend: str = "inductor",
) -> CompileCounter:
    """Regional compilation (torchtitan's per-block ``torch.compile``): each block compiled in
    place, the loop around them left eager. Compile time no longer grows with the depth (the
    blocks share their graphs: parameters are graph inputs), which keeps ViT-g's 40-layer teacher
    and rollout cheap to compile; state_dict keys are unchanged. Two graphs are expected per
    shape: a student's first application gets the teacher's state (no grad), later ones its own."""
    counter = counter if counter is not None else CompileCounter()
    compile_graph = counter.backend(region, backend, expected=2)
    for blk in blocks:
        blk.compile(backend=compile_graph, fullgraph=True, dynamic=False)
    return counter


class CompiledLoss:
    """A drop-in for :func:`raptor.distill.distill_loss` that runs the stage loss compiled.

    ``loss_fn(student, trajectory, cfg, step, blocks=None) -> (loss, metrics)``, the same
    signature and results (to floating-point reassociation) as the eager function; the caller
    owns autocast, backward and the optimizer step, as with the eager one."""

    def __init__(self, counter: CompileCounter | None = None, backend: str = "inductor"):
        self.counter = counter if counter is not None else CompileCounter()
        self.backend = backend
        self._compiled: dict[str, Callable[..., LossResult]] = {}

    def _fn(self, region: str, fn: Callable[..., LossResult]) -> Callable[..., LossResult]:
        if region not in self._compiled:
            self._compiled[region] = torch.compile(
                fn, backend=self.counter.backend(region, self.backend), fullgraph=True, dynamic=False
            )
        return self._compiled[region]

    def __call__(
        self,
        student: Raptor,
        trajectory: torch.Tensor,
        cfg: StageConfig,
        step: int,
        *,
        blocks: Sequence[int] | None = None,
    ) -> LossResult:
        if cfg.stage == 2:
            return self._fn("stage2", stage2_loss)(student, trajectory, cfg)
        lam = stage_lambda(step, cfg)
        terms = stage_terms(1, lam)
        lam_t = torch.full((), lam, dtype=torch.float32, device=trajectory.device)
        fn = self._fn(f"stage1/{_PHASES[terms]}", stage1_loss)
        return fn(student, trajectory, cfg, lam=lam_t, terms=terms, blocks=blocks)
