"""Stage hyperparameters as one plain dataclass (the job spec converts into it); the paper's from ``raptor.recipe``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from raptor.recipe import (
    PAPER_LAST_BLOCK_TOKEN_WEIGHTS,
    PAPER_LR,
    PAPER_MIN_LR,
    PAPER_STAGE2_TOKEN_WEIGHTS,
    PAPER_WEIGHT_DECAY,
    paper_warmup,
)


@dataclass
class StageConfig:
    """Everything one distillation stage needs. Field names are plain on purpose.

    stage              1 = each block on its own segment (hybrid TF/AR); 2 = chained rollout a_0 -> a_L (AR)
    steps              optimizer steps of this stage (also the length of the LR and lambda schedules)
    lr, min_lr         peak learning rate and the cosine floor (AdamW)
    warmup_steps       linear LR warm-up from 0 to ``lr``, then cosine to ``min_lr`` at ``steps``
    weight_decay       AdamW weight decay; betas: AdamW betas
    grad_clip          max global gradient norm (None or <= 0: no clipping)
    lambda_schedule    "linear" | "cosine" | "constant": weight of teacher forcing (stage 1)
    lambda_start       lambda at step 0 (1 = pure TF); "constant" keeps this value
    lambda_min         lambda at the end of the anneal (0 = pure AR afterwards)
    lambda_rho         fraction of ``steps`` over which lambda anneals (paper: 0.25)
    horizon            AR horizon H (stage 1); None = the segment length (the paper)
    sigma              std of Gaussian noise added to the teacher states fed to the student
    loss               "mse" (token-group weighted) or "cosine" (1 - cos per token)
    token_weights      (w_cls, w_reg, w_patch) for every block; None = plain MSE over all tokens
    last_block_token_weights  override for the LAST block in stage 1 (paper: 0.34/0.33/0.33)
    blocks             stage-1 blocks to train (None = all k at once, summed independent losses)
    """

    stage: int = 1
    steps: int = 1000
    lr: float = PAPER_LR
    min_lr: float = PAPER_MIN_LR
    warmup_steps: int = 0
    weight_decay: float = PAPER_WEIGHT_DECAY
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    lambda_schedule: str = "linear"
    lambda_start: float = 1.0
    lambda_min: float = 0.0
    lambda_rho: float = 0.25
    horizon: int | None = None
    sigma: float = 0.0
    loss: str = "mse"
    token_weights: tuple[float, float, float] | None = None
    last_block_token_weights: tuple[float, float, float] | None = None
    blocks: list[int] | None = None

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lambda_schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"lambda_schedule must be linear|cosine|constant, got {self.lambda_schedule!r}")
        if self.loss not in ("mse", "cosine"):
            raise ValueError(f"loss must be 'mse' or 'cosine', got {self.loss!r}")
        if self.horizon is not None and self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if not 0 <= self.lambda_rho <= 1:
            raise ValueError(f"lambda_rho must be in [0, 1], got {self.lambda_rho}")
        for name in ("token_weights", "last_block_token_weights"):
            v = getattr(self, name)
            if v is not None:
                if len(v) != 3:
                    raise ValueError(f"{name} must be (w_cls, w_reg, w_patch), got {v}")
                setattr(self, name, tuple(float(x) for x in v))
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if self.blocks is not None:
            self.blocks = [int(b) for b in self.blocks]

    def weights_for_block(self, block: int, k: int) -> tuple[float, float, float] | None:
        """Token weights of ``block`` (0-based) among ``k`` in this stage."""
        if self.stage == 1 and block == k - 1 and self.last_block_token_weights is not None:
            return self.last_block_token_weights
        return self.token_weights

    @classmethod
    def paper_stage1(cls, steps: int, **overrides: Any) -> "StageConfig":
        """METHOD.md stage 1: AdamW 3e-4, wd 1e-4, warm-up, cosine to 1e-6, clip 1, lambda 1 -> 0
        over 25%, H = segment, last block 0.34/0.33/0.33, others plain MSE."""
        base = dict(stage=1, steps=steps, warmup_steps=paper_warmup(steps),
                    last_block_token_weights=PAPER_LAST_BLOCK_TOKEN_WEIGHTS)
        return cls(**{**base, **overrides})

    @classmethod
    def paper_stage2(cls, steps: int, **overrides: Any) -> "StageConfig":
        """METHOD.md stage 2: full rollout, pure AR, token weights 0.45/0.10/0.45."""
        base = dict(stage=2, steps=steps, warmup_steps=paper_warmup(steps),
                    token_weights=PAPER_STAGE2_TOKEN_WEIGHTS)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown StageConfig fields: {sorted(unknown)}")
        return cls(**d)
