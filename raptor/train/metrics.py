"""What a training stage tells its user: console progress on rank 0 and wandb (offline by default).

Console lines carry step, loss, lambda, LR, gradient norm, samples/s and ETA; wandb gets every
scalar (total and per-layer loss, lambda, LR, grad norm, fidelity on the fixed validation batch,
skipped samples). wandb is online only when ``WANDB_API_KEY`` is set (``logging.wandb_mode: auto``),
so a laptop or CI run never needs an account; offline runs can be uploaded later with
``wandb sync``.
"""

from __future__ import annotations

import logging
import os
import time

from raptor.train.job import LogPlan

log = logging.getLogger(__name__)


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
        plan: LogPlan,
        *,
        enabled: bool,
        start_step: int = 0,
    ):
        self.stage, self.total, self.samples_per_step = stage, total_steps, samples_per_step
        self.enabled = enabled
        self._mark_step, self._mark_time = start_step, time.perf_counter()
        self.samples_per_s = 0.0
        self.run = None
        mode = wandb_mode(plan.wandb_mode)
        if enabled and mode != "disabled":
            import wandb

            os.makedirs(plan.wandb_dir, exist_ok=True)
            # a fixed id (the stage's key) + resume="allow": a resumed stage continues the same wandb run
            self.run = wandb.init(
                project=plan.wandb_project,
                entity=plan.wandb_entity,
                name=plan.run_name,
                id=plan.run_id,
                group=plan.wandb_group,
                resume="allow",
                mode=mode,
                dir=plan.wandb_dir,
                config=plan.config,
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

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One console line and one wandb row at optimizer step ``step`` (1-based: steps done)."""
        if not self.enabled:
            return
        rate = self.throughput(step)
        eta = (self.total - step) * self.samples_per_step / rate if rate > 0 else float("nan")
        row = {**metrics, "samples_per_s": rate}
        # ZeRO-0 engines do not expose the gradient norm: the column is left out rather than faked
        grad = f" grad_norm {row['grad_norm']:.3g}" if "grad_norm" in row else ""
        log.info(
            "%s step %d/%d loss %.4g lambda %.3f lr %.3g%s | %.1f samples/s ETA %s",
            self.stage, step, self.total, row.get("loss", float("nan")), row.get("lambda", 0.0),
            row.get("lr", float("nan")), grad, rate, _eta(eta) if rate > 0 else "?",
        )
        if self.run is not None:
            self.run.log({f"{self.stage}/{k}": v for k, v in row.items()}, step=step)

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
