"""Running a sweep on Ray Tune: the Tuner (new or restored), the per-trial lock actor, and the results callback.

What a trial is and how the trials are planned lives in :mod:`raptor.service.sweep.trials`; the
results files in :mod:`raptor.service.sweep.results`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import posixpath
import uuid
from typing import Any

import ray

from raptor import storage
from raptor.service.spec import JobSpec
from raptor.service.sweep.results import ResultsCallback
from raptor.service.sweep.trials import (
    LOCK_TTL_S, KeyLocks, SweepError, SweepRun, concurrency, decode, driver_resources, grid_points, load_results,
    plan_sweep, run_trial, summarize, total_steps, trial_id, tune_domain,
)

log = logging.getLogger(__name__)


def _tuner(plan: SweepRun, specs: list[tuple[dict[str, Any], JobSpec]], locks_name: str, max_concurrent: int) -> Any:
    """A new Tuner for the sweep, or the one restored from its experiment folder (a re-run resumes)."""
    from ray import tune

    from raptor.train.launch import ray_storage

    spec = plan.spec
    sweep = spec.sweep
    assert sweep is not None
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=spec.model_dump(mode="json"), locks_name=locks_name),
                                    driver_resources(ray.cluster_resources()))
    where = ray_storage(plan.tune_root, spec.storage.patience)
    fs = where.get("storage_filesystem")
    path = posixpath.join(where["storage_path"], plan.experiment)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log.info("resuming the sweep from %s", plan.experiment_path)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    scheduler = None
    if sweep.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="global_step", max_t=max(total_steps(s) for _, s in specs), grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor, stop_last_trials=False)
    if sweep.search == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise SweepError("sweep.search: optuna is not installed (pip install optuna)")
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=sweep.seed)
        param_space = {"params": {p: tune_domain(sweep, p) for p in sweep.space}}
        num_samples = sweep.num_samples
    else:
        searcher, num_samples = None, 1
        param_space = {"params": tune.grid_search(grid_points(sweep))}
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=sweep.metric_key, mode=sweep.mode, search_alg=searcher, scheduler=scheduler,
            num_samples=num_samples, max_concurrent_trials=max_concurrent,
            trial_dirname_creator=lambda t: f"trial-{trial_id(decode(sweep, t.config['params']))}",
        ),
        run_config=tune.RunConfig(
            name=plan.experiment, failure_config=tune.FailureConfig(max_failures=0), verbose=0,
            callbacks=[ResultsCallback(plan)], **where,
        ),
    )


def run_sweep(spec: JobSpec, source: str = "spec") -> dict[str, Any]:
    """Plan, then run (or resume) the sweep on the connected Ray cluster; returns the results' summary."""
    return run_planned(*plan_sweep(spec, source))


def run_planned(plan: SweepRun, specs: list[tuple[dict[str, Any], JobSpec]]) -> dict[str, Any]:
    """Run (or resume) the sweep ``plan_sweep`` planned (its trials validated) on the connected Ray cluster."""
    storage.makedirs(plan.folder)
    storage.write_bytes(storage.join(plan.folder, "spec.yaml"), plan.spec.to_yaml().encode())
    max_concurrent = concurrency(plan.spec, ray.available_resources())
    sweep = plan.spec.sweep
    assert sweep is not None
    log.info("sweep %s: %d trials, %d at once, store %s", plan.spec.name,
             sweep.num_samples if sweep.search == "optuna" else len(specs), max_concurrent, plan.spec.storage.store_url)
    # a stage reports before its first validation and rollout_top1 needs a teacher head: reports may lack
    # the metric (ASHA skips those), which Tune's strict check would turn into an error
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    locks_name = f"raptor-sweep-locks-{uuid.uuid4().hex[:8]}"
    on_demand = {k: v for k, v in driver_resources(ray.cluster_resources()).items() if k != "CPU"}  # beside the drivers
    locks = ray.remote(num_cpus=0)(KeyLocks).options(name=locks_name, resources=on_demand).remote(LOCK_TTL_S)
    try:
        tuner = _tuner(plan, specs, locks_name, max_concurrent)
        tuner.fit()
    finally:
        ray.kill(locks)
    # the results were written from Tune's trials as they ended, the last time when the sweep ended
    return summarize(plan, load_results(plan.spec.storage.url))
