"""``raptor sweep``: Ray Tune over a job spec's ``sweep.space``, every trial a run of the stage graph.

A trial is a spec of its own: the base spec with the trial's values, its run folder at
``{storage.url}/trials/<trial id>`` (the id is a hash of its values, so it is the same on every
re-run), the sweep's store (``storage.store``, default ``{storage.url}/store``) and its wandb runs
grouped under the sweep's name. Every trial's spec is validated before Tune starts (Optuna's are
drawn while the sweep runs: each field's extremes and choices are validated instead).

Following Ray Train V2's guide, a trial is a small driver (:func:`run_trial`, 0.01 CPU) that runs
the trial's pipeline, on capacity that is not preempted where the cluster says which: nodes that
advertise the ``raptor_driver`` resource (the KubeRay head does) host the trial drivers and the
sweep's locks, so a reclaimed spot node takes training workers, never a trial's driver; its training stages launch their own TorchTrainers, whose reports (every
``logging.log_interval`` steps, with a step counter that rises across stage 1 and stage 2) reach
Tune through ``TuneReportCallback``, so ASHA stops a trailing trial in the middle of a stage.

Shared upstream work runs once. Trials that agree on a stage's inputs agree on its key, hence on
its folder in the store, and the stage graph skips an artifact that exists. Two trials must also
never *make* the same artifact at the same time: each stage a trial makes is held under a lock
per (stage, key) in a named Ray actor that lives as long as the sweep (:class:`KeyLocks`), and
the stage's status is checked again once the lock is held. A lock rather than "plan the shared
stages first" because the trial list is not known up front with Optuna, ASHA decides at run time
which trials reach the shared stage-1 artifacts, and a lock keeps every trial in Tune's hands (its
slot, its report, its error row) instead of a second scheduler beside Tune. A trial that Tune
stops or that dies stops renewing its lease, and the lock passes on after ``LOCK_TTL_S``.

Results (``{storage.url}/sweep/``): ``results.csv`` and ``results.md`` (one row per trial: values,
status, metrics, wall time, artifact URLs), ``best.yaml`` (the best finished trial's complete spec,
runnable with ``raptor run``) and one PNG per swept field, rewritten as trials end. Re-running the
same command resumes the sweep: Tune's experiment (``sweep/tune/``, named by a hash of the spec) is
restored, finished and stopped trials are not run again, and a trial that was running continues
where its pipeline stopped (finished stages are done, a training stage resumes its checkpoint).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import numpy as np
import ray

from raptor import storage
from raptor.console import MARK
from raptor.errors import UserError
from raptor.service.spec.translate import absolute_paths
from raptor.service.engine.graph import Step
from raptor.service.engine.artifacts import RunFolder
from raptor.service.spec import DRIVER_RESOURCE, JobSpec, SpecError, SweepSpec, parse_spec, set_field, tied

log = logging.getLogger(__name__)

TRIAL_DRIVER_CPUS = 0.01  # a trial's own process only drives its pipeline; its workers reserve their own
LOCK_TTL_S = 30.0  # a lock whose holder stopped renewing for this long passes on
LOCK_POLL_S = 2.0
SWEEP_FOLDER = "sweep"
TRIALS_FOLDER = "trials"


class SweepError(SpecError):
    """A sweep that cannot run as specified; the message names the trial and the field."""


# ---------------------------------------------------------------- trials: values, ids, specs


def trial_id(params: dict[str, Any]) -> str:
    """A short hash of a trial's values: its run folder's name, the same on every re-run."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]


def describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def tune_domain(sweep: SweepSpec, path: str) -> Any:
    """Ray Tune's sampler for a non-grid field; ``choice`` draws an index (values may be lists, which
    Tune's and Optuna's categorical samplers do not take), decoded by :func:`decode`."""
    from ray import tune

    d = sweep.space[path]
    if d.kind == "choice":
        return tune.choice(list(range(len(d.values))))
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[d.kind](*d.values)


def decode(sweep: SweepSpec, sampled: dict[str, Any]) -> dict[str, Any]:
    """A trial's values from Tune's config (choice indices -> the chosen values), in the space's order."""
    out = {}
    for path, d in sweep.space.items():
        value = _plain(sampled[path])
        out[path] = d.values[int(value)] if d.kind == "choice" else value
    return out


def grid_points(sweep: SweepSpec) -> list[dict[str, Any]]:
    """Every trial of a grid or random sweep, encoded as Tune passes them (choice as an index).

    The grid fields are crossed; each pass (``num_samples``) draws the sampled fields anew from
    Tune's samplers, seeded by ``sweep.seed``, so the same spec gives the same trials every time.
    """
    grid = [p for p, d in sweep.space.items() if d.kind == "grid"]
    sampled = {p: tune_domain(sweep, p) for p, d in sweep.space.items() if d.kind != "grid"}
    rng = np.random.RandomState(sweep.seed)
    points = []
    for _ in range(sweep.num_samples):
        for combo in itertools.product(*(sweep.space[p].values for p in grid)):
            point = dict(zip(grid, combo))
            point.update({p: _plain(dom.sample(random_state=rng)) for p, dom in sampled.items()})
            points.append({p: point[p] for p in sweep.space})
    return points


def corner_points(sweep: SweepSpec) -> list[dict[str, Any]]:
    """Optuna's trials are drawn while the sweep runs; these cover each field's every choice and both ends."""
    first = {p: 0 if d.kind == "choice" else d.values[0] for p, d in sweep.space.items()}
    points = []
    for path, d in sweep.space.items():
        ends = range(len(d.values)) if d.kind == "choice" else (d.values[0], d.values[1] - (d.kind == "randint"))
        points += [{**first, path: v} for v in ends]
    return points


def trial_url(base: JobSpec, tid: str) -> str:
    """The run folder of trial ``tid`` of the sweep ``base``."""
    return storage.join(base.storage.url, TRIALS_FOLDER, tid)


def trial_spec(base: JobSpec, params: dict[str, Any], source: str = "spec") -> JobSpec:
    """The spec of the trial with ``params``: its own run folder and name, the sweep's store, no sweep section."""
    tid = trial_id(params)
    raw = base.model_dump(mode="json")
    raw["sweep"] = None
    where = f"{source}: sweep trial {tid} ({describe(params)})"
    try:
        for key, value in params.items():
            for path, v in zip(tied(key), value if len(tied(key)) > 1 else [value]):
                set_field(raw, path, v)
    except SpecError as e:
        raise SweepError(f"{where}: {e}") from None
    raw["name"] = f"{base.name}-{tid}"
    raw["storage"].update(url=trial_url(base, tid), store=base.storage.store_url)
    raw["logging"]["wandb_group"] = base.logging.wandb_group or base.name
    try:
        return parse_spec(raw, source=where)
    except SpecError as e:
        raise SweepError(str(e)) from None


def trial_specs(base: JobSpec, source: str = "spec") -> list[tuple[dict[str, Any], JobSpec]]:
    """(values, spec) of every trial, validated (grid/random: each one; optuna: each field's extremes and choices)."""
    sweep = _sweep(base, source)
    points = corner_points(sweep) if sweep.search == "optuna" else grid_points(sweep)
    trials: dict[str, tuple[dict[str, Any], JobSpec]] = {}
    for point in points:
        params = decode(sweep, point)
        tid = trial_id(params)
        if tid in trials and sweep.search != "optuna":
            raise SweepError(f"{source}: sweep trials repeat ({describe(params)}): num_samples={sweep.num_samples} "
                             "passes over a grid with nothing to draw run the same trial again; sweep a seed instead")
        trials[tid] = params, trial_spec(base, params, source)
    return list(trials.values())


def _sweep(spec: JobSpec, source: str) -> SweepSpec:
    if spec.sweep is None:
        raise UserError(f"{source}: no sweep section (`raptor run` runs a spec without one)")
    return spec.sweep


def total_steps(spec: JobSpec) -> int:
    """A trial's training steps, stage 1 then stage 2 (the step counter the scheduler sees)."""
    return spec.stage1.steps + spec.stage2.steps


# ---------------------------------------------------------------- locks: one maker per artifact


class KeyLocks:
    """Which trial makes which artifact: one holder per ``stage/key``, held while it renews its lease.

    A plain class (unit-testable); :func:`run_planned` makes it a named Ray actor every trial reaches.
    """

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self.held: dict[str, tuple[str, float]] = {}

    def ttl(self) -> float:
        """The lease's length, so a holder renews often enough whatever the actor was made with."""
        return self.ttl_s

    def acquire(self, key: str, holder: str) -> bool:
        now = time.monotonic()
        current = self.held.get(key)
        if current is None or current[0] == holder or now - current[1] > self.ttl_s:
            self.held[key] = (holder, now)
            return True
        return False

    def renew(self, key: str, holder: str) -> None:
        if self.held.get(key, ("",))[0] == holder:
            self.held[key] = (holder, time.monotonic())

    def release(self, key: str, holder: str) -> None:
        if self.held.get(key, ("",))[0] == holder:
            del self.held[key]


@contextmanager
def holding(locks: Any, holder: str, step: Step) -> Iterator[None]:
    """Hold the lock of ``step``'s artifact while the pipeline makes it, renewing the lease meanwhile.

    The lease is renewed every quarter of the actor's TTL and polled for at most every ``LOCK_POLL_S``.
    """
    key = f"{step.name}/{step.key}"
    ttl_s = ray.get(locks.ttl.remote())
    waited = False
    while not ray.get(locks.acquire.remote(key, holder)):
        if not waited:
            log.info("stage %s: another trial is making %s; waiting for it", step.name, key)
            waited = True
        time.sleep(min(LOCK_POLL_S, ttl_s / 4))
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 4):
            ray.get(locks.renew.remote(key, holder))

    renewer = threading.Thread(target=renew, name=f"lease-{key}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        ray.get(locks.release.remote(key, holder))


# ---------------------------------------------------------------- one trial


def trial_metrics(run_folder: RunFolder) -> dict[str, float]:
    """A finished trial's metrics, read from its artifacts (stage 2's stage.json, the probe's results)."""
    out: dict[str, float] = {}
    if "stage2" in run_folder.folders:
        out.update(storage.read_json(run_folder.marker("stage2")).get("summary", {}))
    if "probe" in run_folder.folders:
        probe = storage.read_json(run_folder.probe)
        out["probe/student_top1"] = probe["student"]["top1"]
        out["probe/teacher_top1"] = probe["teacher"]["top1"]
        if probe.get("student_share") is not None:
            out["probe/student_share"] = probe["student_share"]
    return out


def _trial_logging(tid: str) -> None:
    """Raptor's lines of this trial process reach the sweep's console marked with the trial's id."""
    import sys

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(MARK + "%(levelname)s %(name)s: " + f"trial {tid}: " + "%(message)s"))
    logger = logging.getLogger("raptor")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_trial(config: dict[str, Any], *, base: dict[str, Any], locks_name: str) -> None:
    """Tune's trainable: the trial's spec through the stage graph, then its final metrics to Tune."""
    from ray import tune

    from raptor.service.engine.pipeline import run_pipeline

    spec0 = parse_spec(base)
    assert spec0.sweep is not None
    params = decode(spec0.sweep, config["params"])
    spec = trial_spec(spec0, params)
    tid = trial_id(params)
    _trial_logging(tid)
    log.info("%s -> %s", describe(params), spec.storage.url)
    locks = ray.get_actor(locks_name)
    holder = f"{tid}-{uuid.uuid4().hex[:8]}"
    run_pipeline(spec, guard=partial(holding, locks, holder), report_interval=spec.logging.log_interval)
    tune.report({**trial_metrics(RunFolder.from_index(spec.storage.url)), "global_step": total_steps(spec)})


# ---------------------------------------------------------------- the sweep


def driver_resources(cluster: dict[str, float]) -> dict[str, float]:
    """What a trial's driver reserves on a cluster with these resources: a unit of ``raptor_driver`` (on
    the nodes that advertise it, never preempted) where it has any, else 0.01 CPU anywhere."""
    return {"CPU": 0.0, DRIVER_RESOURCE: 1.0} if cluster.get(DRIVER_RESOURCE) else {"CPU": TRIAL_DRIVER_CPUS}


def trial_resources(spec: JobSpec, cluster: dict[str, float]) -> dict[str, float]:
    """What one trial holds at most: its Ray Train workers and its driver (:func:`driver_resources`)."""
    need = {k: v * spec.scaling.num_workers for k, v in spec.scaling.worker_resources().items()}
    for k, v in driver_resources(cluster).items():
        need[k] = need.get(k, 0.0) + v
    return need


def concurrency(spec: JobSpec, free: dict[str, float]) -> int:
    """``sweep.max_concurrent_trials``, else as many trials as ``free`` resources fit (at least one)."""
    assert spec.sweep is not None
    if spec.sweep.max_concurrent_trials:
        return spec.sweep.max_concurrent_trials
    need = trial_resources(spec, free)
    fits = min(math.floor(free.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)
    if fits < 1:
        log.warning("one trial needs %s but the cluster has %s free: trials wait for the autoscaler", need, free)
    return max(1, fits)


def fingerprint(spec: JobSpec) -> str:
    """The spec's values, hashed: the same for a spec whose fields are listed in another order."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class SweepRun:
    """Where one sweep keeps its outputs and Tune's experiment."""

    spec: JobSpec
    folder: str  # {storage.url}/sweep
    experiment: str  # Tune's experiment name: the spec's name and a hash of the whole spec

    @property
    def tune_root(self) -> str:
        return storage.join(self.folder, "tune")

    @property
    def experiment_path(self) -> str:
        return storage.join(self.tune_root, self.experiment)


def plan_sweep(spec: JobSpec, source: str = "spec") -> tuple[SweepRun, list[tuple[dict[str, Any], JobSpec]]]:
    """The sweep's folders and every trial's validated spec; nothing is written or started."""
    spec = absolute_paths(spec)
    specs = trial_specs(spec, source)
    sweep = _sweep(spec, source)
    if sweep.scheduler == "asha":
        longest = max(total_steps(s) for _, s in specs)
        if sweep.grace_period >= longest:
            raise SweepError(f"{source}: sweep.grace_period={sweep.grace_period} must be below a trial's "
                             f"{longest} training steps (stage1.steps + stage2.steps)")
    return SweepRun(spec, storage.join(spec.storage.url, SWEEP_FOLDER), f"{spec.name}-{fingerprint(spec)}"), specs


def summarize(plan: SweepRun, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Counts by status and the best finished trial, from results.csv's rows."""
    sweep = plan.spec.sweep
    assert sweep is not None
    summary: dict[str, Any] = {s: sum(r["status"] == s for r in rows) for s in ("finished", "stopped", "failed")}
    ranked = [r for r in rows if r["status"] == "finished" and r.get(sweep.metric)]
    sign = 1 if sweep.mode == "max" else -1
    top = max(ranked, key=lambda r: sign * float(r[sweep.metric]), default=None)
    summary.update(trials=len(rows), folder=plan.folder, best=top and top["trial"],
                   best_metric=top and float(top[sweep.metric]))
    return summary


def load_results(url: str) -> list[dict[str, Any]]:
    """The rows of a sweep's ``results.csv`` (``url``: the sweep's storage.url or its sweep/ folder)."""
    import csv
    import io

    folder = url if url.rstrip("/").endswith(SWEEP_FOLDER) else storage.join(url, SWEEP_FOLDER)
    csv_url = storage.join(folder, "results.csv")
    if not storage.exists(csv_url):
        raise UserError(f"{url}: no sweep results ({csv_url} does not exist)")
    return list(csv.DictReader(io.StringIO(storage.read_bytes(csv_url).decode())))

