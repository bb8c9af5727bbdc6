"""The paper's recipe (METHOD.md section 5): the one source of its numbers.

The job spec's defaults, :meth:`raptor.distill.StageConfig.paper_stage1` / ``paper_stage2`` and
the eval studies all read them here. Plain Python, so the spec loads without torch.
"""

from __future__ import annotations

PAPER_LR = 3e-4
PAPER_MIN_LR = 1e-6
PAPER_WEIGHT_DECAY = 1e-4
PAPER_WARMUP_STEPS = 10_000  # of 312,500 steps per stage
PAPER_LAST_BLOCK_TOKEN_WEIGHTS = (0.34, 0.33, 0.33)  # stage 1, last block: (cls, reg, patch), cls weighted up
PAPER_STAGE2_TOKEN_WEIGHTS = (0.45, 0.10, 0.45)  # stage 2, every layer of the rollout


def paper_warmup(steps: int) -> int:
    """The paper's 10k warm-up steps, capped at a tenth of a shorter stage (else it never leaves warm-up)."""
    return min(PAPER_WARMUP_STEPS, steps // 10)
