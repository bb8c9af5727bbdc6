"""Non-finite steps: a NaN/Inf loss or gradient skips the optimizer step, is counted, and a run of them stops the stage.

DeepSpeed's ZeRO optimizers (stages 1-3) refuse non-finite gradients on their own: the update is
skipped on every rank, the LR schedule holds, and ``engine.skipped_steps`` counts it. ZeRO-0 hands
the gradients to the torch optimizer as they are, so :meth:`NonFiniteGuard.before_update` makes the
same check there and skips the same way. After each step the guard reads that counter: a skipped
step is logged naming the block whose loss was not finite and counted (the logged rows, the
checkpoint and the export's manifest carry the count); more than ``limit`` in a row mean the stage
has diverged, and the trainer stops it with a checkpoint and a one-line reason
(:attr:`NonFiniteGuard.stopped`). Weights that are not finite are never exported
(:meth:`NonFiniteGuard.check_weights`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from raptor.models import Raptor

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"block(\d+)/loss$")
_LAYER = re.compile(r"layer(\d+)/loss$")


class NonFiniteGuard:
    """Counts skipped non-finite steps of one stage on every rank (they agree: the check is global)."""

    def __init__(self, stage: str, engine: Any, student: Raptor, limit: int, counters: dict[str, int] | None = None,
                 *, report: bool = True):
        self.stage, self.engine, self.student, self.limit = stage, engine, student, limit
        self._warn = log.warning if report else log.debug  # one rank reports; every rank decides alike
        counters = counters or {}
        self.total, self.in_a_row = int(counters.get("total", 0)), int(counters.get("in_a_row", 0))
        self.stopped: str | None = None
        self._seen = engine.skipped_steps
        self._zero0 = engine.zero_optimization_stage() == 0
        self._clip = engine.gradient_clipping()

    def counters(self) -> dict[str, int]:
        """What a checkpoint keeps, so a resumed stage continues the count."""
        return {"total": self.total, "in_a_row": self.in_a_row}

    def before_update(self) -> None:
        """Call before ``engine.step()``: under ZeRO-0, refuse non-finite gradients as ZeRO 1-3 do.

        The gradients are dropped (the torch optimizer skips parameters without one), clipping is
        off for that step (there is nothing to clip, and DeepSpeed's clip needs a gradient), and the
        optimizer is flagged as overflowed, which is how DeepSpeed counts a skipped step and holds
        the LR schedule. The gradients are already all-reduced, so every rank decides alike.
        """
        if not self._zero0 or not self.engine.is_gradient_accumulation_boundary():
            return
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        finite = bool(torch.stack([p.grad.isfinite().all() for p in params]).all()) if params else True
        if not finite:
            for p in params:
                p.grad = None
        self.engine._config.gradient_clipping = self._clip if finite else 0.0
        self.engine.optimizer.overflow = not finite

    def after_update(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """Call after the optimizer step ``step`` (1-based): count it if it was skipped, stop past the limit."""
        skipped = self.engine.skipped_steps > self._seen
        self._seen = self.engine.skipped_steps
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        where = self.locate(metrics)
        self._warn("%s step %d: non-finite %s; the optimizer step was skipped (%d in a row, %d in all)",
                   self.stage, step, where, self.in_a_row, self.total)
        if self.in_a_row > self.limit:
            self.stopped = (f"{self.stage} stopped at step {step}: {self.in_a_row} optimizer steps in a row had a non-finite "
                            f"loss or gradient (the last one: {where}), more than {self.stage}.max_nonfinite_steps="
                            f"{self.limit}; lower {self.stage}.lr or check the teacher and data. Its checkpoint at step "
                            f"{step} is kept")

    def locate(self, metrics: dict[str, torch.Tensor]) -> str:
        """Which block's loss was not finite (stage 1: per block; stage 2: the first bad layer's block)."""
        bad_blocks = sorted(int(m.group(1)) for k, v in metrics.items() if (m := _BLOCK.match(k)) and not torch.isfinite(v))
        if bad_blocks:
            return f"loss in block {bad_blocks[0]} ({self._layers(bad_blocks[0])})"
        bad_layers = sorted(int(m.group(1)) for k, v in metrics.items() if (m := _LAYER.match(k)) and not torch.isfinite(v))
        if bad_layers:
            block = next(j for j, (s, e) in enumerate(self.student.segments) if s < bad_layers[0] <= e)
            return f"loss in block {block} ({self._layers(block)}, first at layer {bad_layers[0]})"
        return "gradient (the loss was finite)"

    def _layers(self, block: int) -> str:
        s, e = self.student.segments[block]
        return f"layers {s + 1}-{e}"

    def check_weights(self, step: int) -> None:
        """Before the export: weights that are not finite make the stage stop instead (every rank holds them whole)."""
        for name, p in self.student.named_parameters():
            if not torch.isfinite(p).all():
                block = int(m.group(1)) if (m := re.match(r"blocks\.(\d+)\.", name)) else None
                where = f"block {block} ({name})" if block is not None else name
                self.stopped = (f"{self.stage} stopped at step {step}: the weights of {where} are not finite, so the "
                                f"stage is not exported; lower {self.stage}.lr or check the teacher and data")
                return
