"""Sweeps end to end: real Ray Tune trials running real pipelines (Ray Train V2, DeepSpeed over gloo).

One local Ray cluster with 3 logical CPUs serves the module: two 1-worker trials at once plus their
drivers' 0.01 CPU (2 CPUs would not fit a trial's worker and its driver twice). All sweeps here
share one store and one generated dataset, so each test trains only what it is about: the teacher
(seed 0) is trained by the first test and reused by the others, as a user's sweeps would.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raptor import storage
from raptor.service.engine.artifacts import RunFolder
from raptor.service.engine.pipeline import run_pipeline
from raptor.service.spec import JobSpec, load_spec, parse_spec
from raptor.service.sweep.trials import load_results
from raptor.service.sweep.tune import run_sweep

REPO = Path(__file__).resolve().parents[1]
RAPTOR = str(Path(sys.executable).with_name("raptor"))


def sweep_spec(root: Path, name: str, sweep: dict, **sections) -> JobSpec:
    """A 6-layer width-32 DINOv2-architecture pipeline at test size, 1 worker per trial, with ``sweep``."""
    spec = {
        "name": name,
        "teacher": {
            "name": "vit_small_patch14_reg4_dinov2", "img_size": 28, "precision": "fp32", "drop_path_rate": 0.1,
            "model_kwargs": {"embed_dim": 32, "depth": 6, "num_heads": 2},
            "train": {"epochs": 6, "batch_size": 32, "lr": 2e-3, "warmup_steps": 4, "num_workers": 0, "seed": 0},
        },
        "data": {
            "train": str(root / "data" / "train"), "val": str(root / "data" / "val"), "batch_size": 16, "num_workers": 0,
            "generate": {"train_samples": 512, "val_samples": 64, "num_classes": 4, "image_size": 32},
        },
        "discovery": {"k": 3, "num_images": 64},
        "stage1": {"steps": 60, "lr": 2e-3, "warmup_steps": 1},
        "stage2": {"steps": 20, "lr": 1e-3, "warmup_steps": 1},
        "probe": {"epochs": 3, "batch_size": 64, "lrs": [1e-2], "warmup_steps": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "storage": {"url": str(root / name), "store": str(root / "store"), "checkpoint_interval": 20},
        "logging": {"wandb_mode": "disabled", "log_interval": 5, "val_interval": 10},
        "sweep": sweep,
    }
    for section, values in sections.items():
        spec[section] = {**spec[section], **values}
    return parse_spec(spec)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    ctx = ray.init(address="local", num_cpus=3, include_dashboard=True, logging_level="WARNING")  # the state API finds workers to kill
    try:
        yield ctx.address_info  # gcs_address, and session_dir (the trials' logs)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweeps")


def _rows(spec: JobSpec) -> dict[str, dict[str, str]]:
    return {r["trial"]: r for r in load_results(spec.storage.url)}


def _made(run_url: str) -> dict[str, str]:
    """stage -> when its artifact was made (stage.json), for a trial's finished stages."""
    run_folder = RunFolder.from_index(run_url)
    return {s: storage.read_json(run_folder.marker(s))["finished"] for s in run_folder.folders if s != "data"}


def _teacher_trainings(session_dir: str) -> list[str]:
    """The trial of every teacher training on the cluster so far: its driver's "training teacher" lines,
    marked with the trial's id, in Ray's worker logs."""
    return [m.group(1) for f in sorted(Path(session_dir, "logs").glob("worker-*.out"))
            for m in re.finditer(r"trial ([0-9a-f]{8}): training teacher", f.read_text(errors="replace"))]


def _tune_experiment(spec: JobSpec) -> tuple[str, dict[str, tuple[str, int, float, str]]]:
    """The sweep's one Tune experiment, read as `Tuner.restore` reads it (its experiment_state file, then
    each trial's results): its folder's name, and Tune's trial id -> (status, reports, last report's
    time, the trial's folder: trial-<raptor trial id>)."""
    from ray.tune import ExperimentAnalysis

    tune_root = storage.join(spec.storage.url, "sweep", "tune")
    (experiment,) = storage.listdir(tune_root)
    analysis = ExperimentAnalysis(storage.join(tune_root, experiment))
    frames = analysis.trial_dataframes
    return experiment, {t.trial_id: (t.status, len(frames.get(t.trial_id, ())), t.run_metadata.last_result_time,
                                     Path(t.path).name) for t in analysis.trials}


@pytest.mark.slow
def test_three_trials_share_a_teacher_and_the_best_reruns_as_a_no_op(cluster, root):
    """Random search, 3 trials drawing teacher seeds 0, 0, 1 and a stage-2 lr, two at once: the two seed-0
    trials share one teacher, trained once: one of them made it (its run.json says made_here, the
    teacher's stage.json names its run), the other found it done, and the trials' logs hold one training
    per teacher. The store holds exactly 2 teachers, results.csv has 3 finished rows, and best.yaml is a
    complete spec whose `raptor run` does nothing. Catches trials training the same teacher twice (two
    racing writes of one key leave one folder, so counting folders cannot tell), a results table that
    misses trials, and a best.yaml that points at other artifacts than the trial's."""
    spec = sweep_spec(root, "share", {"search": "random", "num_samples": 3, "seed": 0, "max_concurrent_trials": 2,
                                      "space": {"teacher.train.seed": {"choice": [0, 1]},
                                                "stage2.lr": {"loguniform": [3e-4, 3e-3]}}})
    summary = run_sweep(spec)
    assert summary["trials"] == 3 and summary["finished"] == 3, summary
    rows = _rows(spec)
    seeds = sorted(int(r["teacher.train.seed"]) for r in rows.values())
    assert seeds == [0, 0, 1]
    teachers = storage.listdir(str(root / "store" / "teacher"))
    assert len(teachers) == 2 and len({r["teacher"] for r in rows.values()}) == 2
    assert len(storage.listdir(str(root / "store" / "stage1"))) == 2  # stage 1 reads no stage-2 field: shared too
    seed0 = {t: r for t, r in rows.items() if r["teacher.train.seed"] == "0"}
    (teacher,) = {r["teacher"] for r in seed0.values()}
    made_here = {t: storage.read_json(storage.join(r["run"], "run.json"))["stages"]["teacher"]["made_here"]
                 for t, r in seed0.items()}
    (maker,) = [t for t, made in made_here.items() if made]
    assert storage.read_json(storage.join(teacher, "stage.json"))["made_by"]["run"] == rows[maker]["run"]
    (seed1,) = set(rows) - set(seed0)
    assert sorted(_teacher_trainings(cluster["session_dir"])) == sorted([maker, seed1])
    for r in rows.values():  # metrics from each trial's own artifacts, and where they are
        assert r["update_r2"] and r["probe_top1"] and r["report"].startswith(str(root / "store" / "report"))

    best = load_spec(str(root / "share" / "sweep" / "best.yaml"))
    top = max(rows.values(), key=lambda r: float(r["update_r2"]))
    assert best.storage.url == top["run"] and best.sweep is None and best.storage.store == str(root / "store")
    before = _made(top["run"])
    assert run_pipeline(best) == {}
    assert _made(top["run"]) == before
    assert (root / "share" / "sweep" / "stage2.lr.png").stat().st_size > 1000
    assert "Best: trial" in (root / "share" / "sweep" / "results.md").read_text()


@pytest.mark.slow
def test_depth_study_groups_teachers_by_drop_path_rate(cluster, root):
    """`raptor analyze --sweep` over two drop-path rates x two probe lengths, so each rate has one teacher
    (and one student: the probe is the only stage the trials of a rate do not share) shared by two trials
    (rate 0.1 is the seed-0 teacher the store already holds, so only the 0.3 one is trained). One row
    per rate, each with one teacher and two trials, finite z-scores for both distances. Catches a study
    that mixes rates, counts a shared teacher once per trial, or loses a distance metric."""
    import json

    from raptor.cli import main

    spec = sweep_spec(root, "study", {"space": {"teacher.drop_path_rate": {"grid": [0.1, 0.3]},
                                                "probe.epochs": {"grid": [2, 3]}}, "max_concurrent_trials": 2},
                      stage1={"steps": 20}, stage2={"steps": 10})
    summary = run_sweep(spec)
    assert summary["finished"] == 4, summary
    assert main(["analyze", "--sweep", str(root / "study"), "--samples", "32"]) == 0
    folder = root / "study" / "sweep" / "study"
    table = json.loads((folder / "study.json").read_text())["table"]
    assert [(r["drop_path_rate"], r["teachers"], r["trials"]) for r in table] == [(0.1, 1, 2), (0.3, 1, 2)]
    for row in table:
        for metric in ("cosine", "swap"):
            mean, std = row[f"{metric}_z"]
            assert math.isfinite(mean) and std == 0  # one teacher per rate
    text = (folder / "study.md").read_text()
    assert "| 0.1 | 1 |" in text and "| 0.3 | 1 |" in text, text
    assert (folder / "distances.png").stat().st_size > 1000


@pytest.mark.slow
def test_asha_stops_a_trial_that_cannot_learn_mid_stage(cluster, root):
    """ASHA on update-R^2 from step 50 (stage 1 has 60): a trial at lr 1e-9 stays at its initial
    update-R^2 (about -0.3 here) while the trained one passes it (about 0 by step 30 of a 30-step
    stage 1), so ASHA stops it in the middle of stage 1: its last reported step is below 60, and its
    stage 1 never finished.
    Catches metrics that reach Tune only at the end of a stage (nothing to stop on) and a step counter
    that restarts in stage 2."""
    spec = sweep_spec(root, "asha", {"space": {"stage1.lr": {"grid": [2.5e-3, 1e-9]}}, "scheduler": "asha",
                                     "grace_period": 50, "reduction_factor": 4, "max_concurrent_trials": 1})
    summary = run_sweep(spec)
    rows = {float(r["stage1.lr"]): r for r in _rows(spec).values()}
    assert rows[2.5e-3]["status"] == "finished" and summary["stopped"] == 1, rows
    stopped = rows[1e-9]
    assert stopped["status"] == "stopped" and int(stopped["steps"]) < 60, stopped
    run_folder = RunFolder.from_index(stopped["run"])
    assert "stage1" not in run_folder.folders  # run.json: stage 1 never finished
    index = storage.read_json(storage.join(stopped["run"], "run.json"))["stages"]["stage1"]
    assert not storage.exists(storage.join(index["url"], "stage.json"))


@pytest.mark.slow
def test_a_trial_that_raises_is_a_row_with_its_error_and_the_others_finish(cluster, root):
    """A teacher with 3 heads on width 32 cannot be built (timm raises at run time, no spec check
    can know): that trial is a failed row naming the error; the other one finishes (its artifacts
    are the earlier tests', so it only re-reads them). Catches one failing trial ending the sweep."""
    spec = sweep_spec(root, "fail", {"space": {"teacher.model_kwargs.num_heads": {"grid": [3, 2]}}, "max_concurrent_trials": 1})
    summary = run_sweep(spec)
    assert summary == {**summary, "trials": 2, "finished": 1, "failed": 1}
    rows = {r["teacher.model_kwargs.num_heads"]: r for r in _rows(spec).values()}
    assert rows["3"]["status"] == "failed" and rows["3"]["error"] and "\n" not in rows["3"]["error"]
    assert rows["2"]["status"] == "finished" and not rows["2"]["error"]


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_trials(cluster, root, tmp_path):
    """`raptor sweep` SIGKILLed (with its trials' workers) once Tune's saved experiment state has its first
    trial finished; the same command again restores that experiment (the same folder and trial ids,
    not a fresh one), leaves the finished trial as it was (no new reports: a re-run appends to its
    results) and finishes the other; the first trial's artifacts keep their stage.json times. Catches
    a resume that re-runs finished trials, starts a new experiment, or cannot continue a Tune
    experiment whose driver died."""
    from tests.test_service import _kill_when

    # the second trial probes for long enough that Tune writes its state (every few seconds) before it ends
    spec = sweep_spec(root, "resume", {"space": {"probe.epochs": {"grid": [2, 60]}}, "max_concurrent_trials": 1})
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": cluster["gcs_address"]}
    first_run = storage.join(spec.storage.url, "trials")

    def first_finished() -> bool:
        try:
            return any(trial[0] == "TERMINATED" for trial in _tune_experiment(spec)[1].values())
        except (FileNotFoundError, ValueError):  # no experiment state yet, or one being written
            return False

    proc = subprocess.Popen([RAPTOR, "sweep", str(path)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _kill_when(proc, first_finished, "Tune's experiment state with a finished trial")
    experiment, killed = _tune_experiment(spec)
    finished = {t: trial for t, trial in killed.items() if trial[0] == "TERMINATED"}
    assert len(finished) == 1, killed  # the other one has work left for the resume
    (trial,) = finished.values()
    assert trial[1] > 0 and trial[3].startswith("trial-"), killed
    done = trial[3].removeprefix("trial-")
    before = _made(storage.join(first_run, done))
    time.sleep(2)
    again = subprocess.run([RAPTOR, "sweep", str(path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = _rows(spec)
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows.values()), rows
    assert _made(storage.join(first_run, done)) == before
    resumed_as, resumed = _tune_experiment(spec)
    assert resumed_as == experiment and set(killed) <= set(resumed) and len(resumed) == 2, (killed, resumed)
    assert {t: resumed[t] for t in finished} == finished  # same status, reports and last report time: not re-run
    assert all(trial[0] == "TERMINATED" for trial in resumed.values()), resumed


@pytest.mark.slow
def test_optuna_search_runs_through_tune(cluster, root):
    """Optuna draws 2 trials over a field no stage reads (logging.log_interval), so both reuse every
    artifact: catches the Optuna integration (categorical choices as indices, the metric to optimise)
    breaking, at the price of two no-op pipelines."""
    spec = sweep_spec(root, "optuna", {"search": "optuna", "num_samples": 2, "space": {"logging.log_interval": {"choice": [5, 10]}},
                                       "max_concurrent_trials": 1})
    teachers = storage.listdir(str(root / "store" / "teacher"))
    summary = run_sweep(spec)
    assert summary["trials"] == 2 and summary["finished"] == 2, summary
    assert storage.listdir(str(root / "store" / "teacher")) == teachers
