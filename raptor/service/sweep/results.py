"""A sweep's results: one row per trial, from Tune's record of it and the trial's own artifacts.

Written to ``{storage.url}/sweep/`` whenever a trial ends (so a long sweep can be read while it
runs) and when the sweep ends: ``results.csv``, ``results.md``, ``best.yaml`` and one PNG per swept
field (the metric against the field's values). A finished trial's metrics are read from its
artifacts (stage 2's ``stage.json``, the probe's ``results.json``); a trial the scheduler stopped
keeps the last metrics it reported; a failed trial is a row with its error.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from raptor import storage
from raptor.service.engine.artifacts import RunFolder
from raptor.service.spec import SWEEP_METRICS
from raptor.service.sweep.trials import SweepRun, decode, describe, trial_id, trial_metrics, trial_spec, trial_url

log = logging.getLogger(__name__)

# results.csv column -> the metric key a trial reports (SWEEP_METRICS, plus the teacher's numbers beside them)
COLUMNS = {**SWEEP_METRICS, "teacher_top1": "probe/teacher_top1",
           "val_teacher_top1": "val/teacher_top1", "steps": "global_step"}
ARTIFACTS = ("teacher", "discovery", "stage2", "probe", "report")


@dataclass
class Row:
    """One trial of the sweep, as results.csv shows it."""

    trial: str
    params: dict[str, Any]
    status: str  # finished | stopped (by the scheduler) | failed | running | pending
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None
    run: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b")


def _one_line(error: BaseException | str) -> str:
    """The error itself from an error's text (a Tune error carries the whole remote traceback): its
    last ``SomeError: message`` line, else its last line."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    return (named or lines or [type(error).__name__])[-1]


def trial_error(trial: Any) -> str | None:
    """A failed Tune trial's error text: the file Tune has just written beside the driver, else its stored copy."""
    if trial.status != "ERROR":
        return None
    path = trial.error_file
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read()
    return trial.get_error() or "failed without an error message"


def collect(plan: SweepRun, items: list[tuple[dict[str, Any] | None, dict[str, Any], Any]], statuses: list[str] | None = None) -> list[Row]:
    """Rows from (Tune's encoded params, its last reported metrics, its error) per trial."""
    sweep = plan.spec.sweep
    assert sweep is not None
    rows = []
    for i, (encoded, reported, error) in enumerate(items):
        if encoded is None:
            continue
        params = decode(sweep, encoded)
        tid = trial_id(params)
        row = Row(tid, params, "pending", run=trial_url(plan.spec, tid), seconds=reported.get("time_total_s"))
        row.metrics = {name: reported[key] for name, key in COLUMNS.items() if isinstance(reported.get(key), (int, float))}
        if storage.exists(storage.join(row.run, "run.json")):
            run_folder = RunFolder.from_index(row.run)
            row.artifacts = {s: run_folder.folders[s] for s in ARTIFACTS if s in run_folder.folders}
            if "report" in run_folder.folders:
                row.status = "finished"
                done = trial_metrics(run_folder)
                row.metrics.update({name: done[key] for name, key in COLUMNS.items() if key in done})
        if error is not None:
            row.status, row.error = "failed", _one_line(error)
        elif row.status != "finished":
            tune_status = (statuses[i] if statuses else "TERMINATED")
            row.status = {"RUNNING": "running", "PENDING": "pending", "PAUSED": "pending"}.get(
                tune_status, "stopped" if "steps" in row.metrics else "pending")
        rows.append(row)
    return rows


def best(plan: SweepRun, rows: list[Row]) -> Row | None:
    """The finished trial with the best ``sweep.metric`` (ties: the first)."""
    sweep = plan.spec.sweep
    assert sweep is not None
    ranked = [r for r in rows if r.status == "finished" and sweep.metric in r.metrics]
    if not ranked:
        return None
    sign = 1 if sweep.mode == "max" else -1
    return max(ranked, key=lambda r: sign * r.metrics[sweep.metric])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def to_csv(plan: SweepRun, rows: list[Row]) -> str:
    assert plan.spec.sweep is not None
    fields = ["trial", *plan.spec.sweep.space, "status", *COLUMNS, "seconds", "error", "run", *ARTIFACTS]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({"trial": r.trial, **{p: v if isinstance(v, (int, float, str)) else str(v) for p, v in r.params.items()},
                         "status": r.status, **r.metrics, "seconds": r.seconds and round(r.seconds, 1), "error": r.error,
                         "run": r.run, **r.artifacts})
    return out.getvalue()


def to_markdown(plan: SweepRun, rows: list[Row], top: Row | None, plots: list[str]) -> str:
    sweep = plan.spec.sweep
    assert sweep is not None
    counts = {s: sum(r.status == s for r in rows) for s in ("finished", "stopped", "failed", "running", "pending")}
    head = ["trial", *sweep.space, "status", *(c for c in COLUMNS if any(c in r.metrics for r in rows)), "seconds", "error"]
    lines = [
        f"# Sweep {plan.spec.name}",
        "",
        f"{len(rows)} trials ({', '.join(f'{n} {s}' for s, n in counts.items() if n)}); search {sweep.search}, "
        f"scheduler {sweep.scheduler}, metric {sweep.metric} ({sweep.mode}). Store: `{plan.spec.storage.store_url}`.",
        "",
        f"Best: trial `{top.trial}` ({describe(top.params)}), {sweep.metric} {top.metrics[sweep.metric]:.4g}; "
        f"its spec is `best.yaml` (`raptor run best.yaml` re-runs it as a no-op)." if top else "No trial has finished yet.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = {"trial": f"`{r.trial}`", "status": r.status, "seconds": _fmt(r.seconds), "error": r.error or "",
                 **{p: _fmt(v) for p, v in r.params.items()}, **{k: _fmt(v) for k, v in r.metrics.items()}}
        lines.append("| " + " | ".join(cells.get(h, "").replace("|", "\\|") for h in head) + " |")
    lines += ["", "Artifacts per trial (run folder, then the store folders its run.json names):", ""]
    lines += [f"- `{r.trial}`: {r.run}" + "".join(f"; {s} {u}" for s, u in r.artifacts.items()) for r in rows]
    lines += ["", *(f"![{p}]({p})" for p in plots), ""]
    return "\n".join(lines)


def plot_field(plan: SweepRun, rows: list[Row], path: str) -> bytes | None:
    """The sweep's metric against one swept field's values (finished filled, stopped hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = plan.spec.sweep
    assert sweep is not None
    points = [(r.params[path], r.metrics[sweep.metric], r.status) for r in rows
              if sweep.metric in r.metrics and r.status in ("finished", "stopped")]
    if not points:
        return None
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _, _ in points)
    labels = sorted({json_label(v) for v, _, _ in points}) if not numeric else []
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    for status, face in (("finished", "tab:blue"), ("stopped", "none")):
        xs = [v if numeric else labels.index(json_label(v)) for v, _, s in points if s == status]
        ys = [m for _, m, s in points if s == status]
        if xs:
            ax.scatter(xs, ys, facecolors=face, edgecolors="tab:blue", label=status, zorder=3)
    if not numeric:
        ax.set_xticks(range(len(labels)), labels, rotation=20)
    elif sweep.space[path].kind == "loguniform":
        ax.set_xscale("log")
    ax.set_xlabel(path)
    ax.set_ylabel(f"{sweep.metric} ({COLUMNS[sweep.metric]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def json_label(value: Any) -> str:
    return str(value) if isinstance(value, (int, float, str)) else repr(value)


def write_results(plan: SweepRun, rows: list[Row]) -> None:
    """results.csv, results.md, best.yaml (when a trial finished) and the PNGs."""
    sweep = plan.spec.sweep
    assert sweep is not None
    storage.makedirs(plan.folder)
    storage.write_bytes(storage.join(plan.folder, "results.csv"), to_csv(plan, rows).encode())
    plots = []
    for path in sweep.space:
        png = plot_field(plan, rows, path)
        if png is not None:
            storage.write_bytes(storage.join(plan.folder, f"{path}.png"), png)
            plots.append(f"{path}.png")
    top = best(plan, rows)
    if top is not None:
        storage.write_bytes(storage.join(plan.folder, "best.yaml"), trial_spec(plan.spec, top.params).to_yaml().encode())
    storage.write_bytes(storage.join(plan.folder, "results.md"), to_markdown(plan, rows, top, plots).encode())


class ResultsCallback(tune.Callback):
    """In the sweep's driver: one console line per trial start and end, and the results rewritten as trials end."""

    def __init__(self, plan: SweepRun):
        self.plan = plan

    def _name(self, trial: Any) -> str:
        assert self.plan.spec.sweep is not None
        params = decode(self.plan.spec.sweep, trial.config["params"])
        return f"{trial_id(params)} ({describe(params)})"

    def _write(self, trials: list[Any]) -> None:
        items = [(t.config.get("params"), t.last_result or {}, trial_error(t)) for t in trials]
        write_results(self.plan, collect(self.plan, items, [t.status for t in trials]))

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        log.info("trial %s: started", self._name(trial))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        sweep = self.plan.spec.sweep
        assert sweep is not None
        value = (trial.last_result or {}).get(sweep.metric_key)
        log.info("trial %s: ended at step %s, %s %s", self._name(trial), (trial.last_result or {}).get("global_step"),
                 sweep.metric, f"{value:.4g}" if isinstance(value, float) else value)
        self._write(trials)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        log.warning("trial %s: failed: %s", self._name(trial), _one_line(trial_error(trial) or ""))
        self._write(trials)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self._write(trials)
