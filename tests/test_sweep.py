"""Sweeps without a cluster: which trials a sweep section makes, how bad ones fail, the CLI and the manifests.

The real sweeps (Ray Tune over real pipelines) are in tests/test_sweep_e2e.py; these pin down the
trial list, the one-line errors and the rendering in seconds.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from raptor import storage
from raptor.cli import build_parser, main
from raptor.service.deploy.k8s import RenderError, render
from raptor.service.spec import JobSpec, SpecError, apply_overrides, parse_spec
from raptor.service.deploy.submit import submission
from raptor.service.sweep.trials import SweepError, concurrency, plan_sweep, trial_id, trial_specs

ROOT = Path(__file__).resolve().parents[1]


def _job(tmp_path: Path, job: str) -> dict:
    """A job spec of jobs/ with its run, store and generated data in ``tmp_path`` (a user's runs/ never counts)."""
    raw = yaml.safe_load((ROOT / "jobs" / f"{job}.yaml").read_text())
    raw["storage"] = {**raw["storage"], "url": str(tmp_path / "run")}
    raw["storage"].pop("store", None)
    if raw["data"].get("generate"):
        raw["data"].update(train=str(tmp_path / "data" / "train"), val=str(tmp_path / "data" / "val"))
    return raw


def _spec(tmp_path: Path, job: str = "sweep_quick", *overrides: str) -> JobSpec:
    return parse_spec(apply_overrides(_job(tmp_path, job), list(overrides)))


def _sweep_file(tmp_path: Path, sweep: dict) -> Path:
    raw = _job(tmp_path, "sweep_quick")
    raw["sweep"] = sweep
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_grid_trials_cross_the_grid_and_are_specs_of_their_own(tmp_path):
    """Catches a grid that is not crossed, trials that overwrite each other's run folder, or trials
    that do not share the sweep's store (then no artifact would be shared)."""
    base = _spec(tmp_path)
    trials = trial_specs(base)
    assert [(p["discovery.k"], p["stage1.lambda_schedule"]) for p, _ in trials] == [
        (k, s) for k in (2, 3, 4) for s in ("linear", "constant")]
    runs = {spec.storage.url for _, spec in trials}
    assert len(runs) == 6 and all(url.startswith(str(tmp_path / "run" / "trials")) for url in runs)
    for params, spec in trials:
        assert spec.sweep is None and spec.storage.store_url == base.storage.store_url
        assert spec.discovery.k == params["discovery.k"] and spec.stage1.lambda_schedule == params["stage1.lambda_schedule"]
        assert spec.logging.wandb_group == "sweep_quick" and spec.name == f"sweep_quick-{trial_id(params)}"


def test_random_search_draws_the_same_trials_from_the_same_seed(tmp_path):
    """Catches unseeded draws (a re-run would make other trials, so the sweep could not resume) and
    draws outside the declared ranges; choice values may be lists (Tune's categorical cannot take them)."""
    space = ["sweep.search=random", "sweep.num_samples=4",
             "sweep.space={stage1.lr: {loguniform: [1.0e-4, 1.0e-2]}, discovery.boundaries: {choice: [[4, 8], [3, 9]]},"
             " stage1.horizon: {randint: [1, 3]}}"]
    first = [p for p, _ in trial_specs(_spec(tmp_path, "sweep_quick", *space))]
    again = [p for p, _ in trial_specs(_spec(tmp_path, "sweep_quick", *space))]
    other = [p for p, _ in trial_specs(_spec(tmp_path, "sweep_quick", *space, "sweep.seed=1"))]
    assert first == again and first != other and len(first) == 4
    for p in first:
        assert 1e-4 <= p["stage1.lr"] <= 1e-2 and p["discovery.boundaries"] in ([4, 8], [3, 9]) and p["stage1.horizon"] in (1, 2)
    assert len({p["stage1.lr"] for p in first}) == 4


def test_tied_fields_vary_together(tmp_path):
    """Catches tied fields crossed instead of zipped (the recipe sweep's variants would mix batch and lr)."""
    trials = trial_specs(_spec(tmp_path, "sweep_recipe_cpu"))
    assert len(trials) == 10
    for _, spec in trials:
        large = spec.deepspeed.gradient_accumulation_steps == 4
        assert spec.stage1.steps == (80 if large else 320) and spec.stage2.steps == (40 if large else 160)
        assert spec.stage1.steps * spec.effective_batch == 5120  # the same samples in every variant


def test_a_trial_that_does_not_validate_names_the_trial_and_the_field(tmp_path):
    """Catches a bad trial found only when its turn comes (hours into a sweep) or an error that hides which trial."""
    base = _spec(tmp_path, "sweep_quick", "sweep.space={discovery.k: {grid: [3, 13]}}")
    with pytest.raises(SweepError) as err:
        plan_sweep(base, "jobs/sweep_quick.yaml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("jobs/sweep_quick.yaml: sweep trial ")
    assert "(discovery.k=13)" in msg and "discovery.k=13 exceeds the teacher's depth L=12" in msg


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"space": {"discovery.k": {"grd": [2, 3]}}}, "sweep.space.discovery.k.grd: unknown field"),
        ({"space": {"discovery.k": {"grid": [2], "choice": [3]}}}, "exactly one of grid, choice"),
        ({"space": {"stage1.lr": {"uniform": [0.1, 0.01]}}, "search": "random"}, "needs lo < hi"),
        ({"space": {"stage1.lr": {"uniform": [0.01, 0.1]}}}, "search grid takes grid fields only; stage1.lr is uniform"),
        ({"space": {"storage.url": {"grid": ["a", "b"]}}}, "storage.url: not a field a trial can vary"),
        ({"space": {"discovery.k": {"grid": [2, 3]}}, "scheduler": "asha", "metric": "probe_top1"}, "scheduler asha needs"),
        ({"space": {"stage1.lr,stage2.lr": {"grid": [[0.1, 0.2], [0.3]]}}}, "2 tied fields take grid or choice values"),
        ({"space": {"discovery.k": {"grid": [2, 3]}}, "num_samples": 2}, "sweep trials repeat"),
        ({"space": {"discovery.k": {"grid": [2, 3]}}, "scheduler": "asha", "grace_period": 250}, "grace_period=250 must be below"),
        ({"space": {"stage2.stepz": {"grid": [2, 3]}}}, "stage2.stepz: unknown field"),
        ({"space": {}}, "sweep.space: Dictionary should have at least 1 item"),
    ],
)
def test_a_bad_sweep_section_is_a_one_line_error(tmp_path, capsys, sweep, message):
    """Catches tracebacks for a user's mistake in the sweep section, and messages that do not name the field."""
    path = _sweep_file(tmp_path, sweep)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("raptor sweep: error: ") and message in err, err


def test_sweep_without_a_sweep_section_says_so(tmp_path, capsys):
    """Catches `raptor sweep` on a plain spec failing obscurely instead of pointing at `raptor run`."""
    path = tmp_path / "spec.yaml"
    path.write_text((ROOT / "jobs" / "quickstart.yaml").read_text())
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert "no sweep section" in capsys.readouterr().err


def test_sweep_help_documents_every_option():
    """Catches an option without help text (argparse prints it bare) and a command missing from `raptor --help`."""
    parser = build_parser("sweep")
    sub = next(a for a in parser._actions if a.dest == "command").choices["sweep"]
    for action in sub._actions:
        assert action.help, action.dest
    text = sub.format_help()
    for option in ("--set", "--dry-run", "spec"):
        assert option in text
    assert "sweep" in build_parser(None).format_help()


def test_dry_run_lists_every_trial_with_its_values(tmp_path, capsys):
    """Catches a dry run that hides which trials a sweep would run."""
    path = _sweep_file(tmp_path, {"space": {"discovery.k": {"grid": [2, 3]}}})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "discovery.k=2" in lines[0] and "will run data, teacher" in lines[0]


def test_concurrency_follows_free_resources_and_each_trials_workers(tmp_path):
    """Catches a default that ignores the trial's workers (a 2-core machine deadlocks on 2 two-worker trials)
    or forgets the driver's 0.01 CPU (2 CPUs do not fit a 2-worker trial and its driver)."""
    one = _spec(tmp_path)  # 1 worker x 1 CPU
    assert concurrency(one, {"CPU": 3.0}) == 2
    two = _spec(tmp_path, "sweep_quick", "scaling.num_workers=2")
    assert concurrency(two, {"CPU": 3.0}) == 1 and concurrency(two, {"CPU": 8.0}) == 3
    gpu = _spec(tmp_path, "sweep_quick", "scaling.use_gpu=true", "scaling.num_workers=2", "scaling.gpus_per_worker=1")
    assert concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    assert concurrency(_spec(tmp_path, "sweep_quick", "sweep.max_concurrent_trials=5"), {"CPU": 1.0}) == 5


def test_trial_drivers_stay_on_the_nodes_that_are_never_preempted(tmp_path):
    """Where the cluster has nodes advertising raptor_driver (the KubeRay head, on on-demand capacity), a
    trial's driver reserves a unit of it and no CPU (the head offers none), so Tune places it there, not on
    a spot worker whose reclaim would kill the trial; elsewhere it takes 0.01 CPU anywhere. Catches drivers
    left free to land on preemptible nodes, and a driver resource a local cluster cannot satisfy (every
    trial would wait forever)."""
    from raptor.service.spec import DRIVER_RESOURCE
    from raptor.service.sweep.trials import driver_resources

    assert driver_resources({"CPU": 2.0}) == {"CPU": 0.01}
    assert driver_resources({"CPU": 64.0, DRIVER_RESOURCE: 1000.0}) == {"CPU": 0.0, DRIVER_RESOURCE: 1.0}
    two = _spec(tmp_path, "sweep_quick", "scaling.num_workers=2")
    assert concurrency(two, {"CPU": 4.0, DRIVER_RESOURCE: 1000.0}) == 2  # the drivers take no worker CPU


def test_submit_and_k8s_run_raptor_sweep():
    """Catches a sweep submitted or deployed as `raptor run` (it would run the base spec alone)."""
    spec = parse_spec(yaml.safe_load((ROOT / "jobs" / "sweep_k_lambda.yaml").read_text()))
    job = submission("jobs/sweep_k_lambda.yaml", spec, ["sweep.max_concurrent_trials=2"], command="sweep")
    assert shlex.split(job["entrypoint"]) == ["raptor", "sweep", "jobs/sweep_k_lambda.yaml", "--set", "sweep.max_concurrent_trials=2"]
    args = build_parser("sweep").parse_args(shlex.split(job["entrypoint"])[1:])
    assert args.command == "sweep" and args.overrides == ["sweep.max_concurrent_trials=2"]


def test_a_sweep_renders_as_a_rayjob_sized_for_its_concurrent_trials(monkeypatch):
    """Catches a sweep manifest with one trial's pods (trials would queue) or with no room for the
    trials' drivers (their 0.01 CPU would take a worker's place and the last worker never starts)."""
    from tests.test_deploy_k8s import _crd_errors, _worker_resources, _workers

    monkeypatch.chdir(ROOT)
    job = next(o for o in render("jobs/sweep_k_lambda.yaml", "multinode") if o["kind"] == "RayJob")
    assert _crd_errors(job) == []
    assert shlex.split(job["spec"]["entrypoint"])[:3] == ["raptor", "sweep", "jobs/sweep_k_lambda.yaml"]
    group = _workers(job)
    assert group["maxReplicas"] == 4 and group["minReplicas"] == 0  # 4 trials x one 8-GPU pod, autoscaled
    assert _worker_resources(job) == {"cpu": "81", "memory": "512Gi", "nvidia.com/gpu": "8"}
    dev = next(o for o in render("jobs/sweep_k_lambda.yaml", "dev") if o["kind"] == "RayJob")
    assert _workers(dev)["maxReplicas"] == 4 and _worker_resources(dev)["nvidia.com/gpu"] == "1"
    with pytest.raises(RenderError, match="sweep.max_concurrent_trials: set it"):
        render("jobs/sweep_k_lambda.yaml", "multinode", ["sweep.max_concurrent_trials=null"])


def test_centre_transform_feeds_the_eval_crops_shuffled(tmp_path):
    """Catches data.distill_transform: centre still augmenting (the paper's fixed states) or no longer shuffling."""
    from raptor import data
    from raptor.service.spec.translate import distill_source

    folder = str(tmp_path / "train")
    data.write_shards(data.synthetic_source(32, 4, 40, 0), folder, prefix="train", max_samples=32)
    raw = yaml.safe_load((ROOT / "jobs" / "sweep_quick.yaml").read_text())
    raw["data"].update(train=folder, val=folder, batch_size=8, num_workers=0)
    raw["storage"]["url"] = str(tmp_path / "run")
    centre = distill_source(parse_spec(raw | {"data": {**raw["data"], "distill_transform": "centre"}}))
    augment = distill_source(parse_spec(raw))

    def images(source, train):
        return [x for batch, _ in source.loader(train=train) for x in batch]

    fixed = {x.numpy().tobytes() for x in images(centre, train=False)}
    shuffled = images(centre, train=True)
    assert {x.numpy().tobytes() for x in shuffled} <= fixed and len(shuffled) == 32
    assert [x.numpy().tobytes() for x in shuffled] != [x.numpy().tobytes() for x in images(centre, train=False)]
    assert not {x.numpy().tobytes() for x in images(augment, train=True)} & fixed


def test_results_csv_is_read_back(tmp_path):
    """Catches `raptor analyze --sweep` pointed at a folder without results failing with a traceback."""
    from raptor.service.sweep.trials import load_results

    with pytest.raises(SpecError.__mro__[1], match="no sweep results"):
        load_results(str(tmp_path))
    storage.write_bytes(str(tmp_path / "sweep" / "results.csv"), b"trial,status\nabc,finished\n")
    assert load_results(str(tmp_path)) == [{"trial": "abc", "status": "finished"}]


def test_a_failed_trials_row_names_the_error_not_the_traceback():
    """Catches results.md rows that end in a traceback's trailing detail instead of the error itself."""
    from raptor.service.sweep.results import _one_line

    traceback = ("Failure # 1\nray.exceptions.RayTaskError(AssertionError): ray::run_trial()\n  File \"x.py\", line 3\n"
                 "    assert dim % num_heads == 0\nAssertionError: dim should be divisible by num_heads\n")
    assert _one_line(traceback) == "AssertionError: dim should be divisible by num_heads"
    oom = "ray.exceptions.OutOfMemoryError: 3 worker(s) were killed\n- objects errored: 0\n- bytes errored: 0\n"
    assert _one_line(oom) == "ray.exceptions.OutOfMemoryError: 3 worker(s) were killed"
