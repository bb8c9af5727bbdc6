"""The sweep's lock per artifact (:class:`KeyLocks`, :func:`holding`): one maker per (stage, key).

The unit tests drive the plain class with a fake clock. The others use the real lock actor on a
local Ray (1 CPU; the actor takes none) and the pipeline's own make step (:func:`make`) on a real,
cheap stage: the teacher of a tiny spec (1 epoch on 64 generated images, a few seconds on a CPU).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from raptor import storage
from raptor.service.sweep import trials as sweep
from raptor.service.engine.graph import Step
from raptor.service.engine.artifacts import RunFolder, corrupt_file
from raptor.service.engine.pipeline import make, plan
from raptor.service.spec import JobSpec, load_spec, parse_spec
from raptor.service.sweep.trials import KeyLocks, holding
from tests.test_service import tiny_spec

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "raptor-sweep-locks-test"


# ---------------------------------------------------------------- KeyLocks, a plain class


@pytest.fixture
def clock(monkeypatch) -> SimpleNamespace:
    """KeyLocks' clock, moved by hand (``clock.now``): lease expiry without sleeping."""
    fake = SimpleNamespace(now=0.0)
    monkeypatch.setattr(sweep, "time", SimpleNamespace(monotonic=lambda: fake.now))
    return fake


def test_one_holder_per_key_until_it_releases(clock):
    """A second holder is refused while the first holds a fresh lease, on that key only; the holder may
    acquire again (a stage retried in the same trial); a release by a non-holder frees nothing, the
    holder's does. Catches a lock that admits two makers, locks every key at once, or that anyone can free."""
    locks = KeyLocks(ttl_s=30)
    assert locks.acquire("teacher/k1", "a")
    assert not locks.acquire("teacher/k1", "b")
    assert locks.acquire("teacher/k2", "b") and locks.acquire("distances/k1", "b")
    assert locks.acquire("teacher/k1", "a")
    locks.release("teacher/k1", "b")
    clock.now = 1.0
    assert not locks.acquire("teacher/k1", "b")
    locks.release("teacher/k1", "a")
    assert locks.acquire("teacher/k1", "b")
    assert not locks.acquire("teacher/k1", "a")


def test_a_renewed_lease_holds_and_an_abandoned_one_passes_on_after_the_ttl(clock):
    """Renewing keeps the lock past the TTL; without renewal it passes on once the TTL is over (not at it);
    afterwards the old holder's renew and release touch nothing. Catches a holder that dies keeping its
    artifact locked forever, a lease that expires while renewed, and a stale holder stealing it back."""
    locks = KeyLocks(ttl_s=10)
    assert locks.acquire("teacher/k", "a")
    for clock.now in (8.0, 16.0, 24.0):
        locks.renew("teacher/k", "a")
    clock.now = 34.0  # 10 s after the last renewal: still fresh
    assert not locks.acquire("teacher/k", "b")
    clock.now = 34.5
    assert locks.acquire("teacher/k", "b")
    clock.now = 40.0
    locks.renew("teacher/k", "a")  # the dead holder wakes: no effect
    locks.release("teacher/k", "a")
    assert not locks.acquire("teacher/k", "c")
    clock.now = 44.6  # 10.1 s after b's acquire, which nobody renewed
    assert locks.acquire("teacher/k", "c")


# ---------------------------------------------------------------- the real actor and the real make step


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory) -> str:
    import ray

    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    ctx = ray.init(address="local", num_cpus=1, namespace=NAMESPACE, include_dashboard=False, logging_level="WARNING")
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder whose generated dataset (64 + 16 images) every spec here reads, made once."""
    root = tmp_path_factory.mktemp("locks")
    spec = small_spec(root, "data", "store-data")
    steps, run_folder = plan(spec)
    make(spec, run_folder, steps[0])
    return root


def small_spec(root: Path, name: str, store: str) -> JobSpec:
    """The tiny pipeline with a 1-epoch teacher on 64 images: run ``root/name``, store ``root/store``."""
    raw = tiny_spec(str(root / name), str(root / "data"),
                    teacher={"train": {"epochs": 1, "batch_size": 32, "lr": 2e-3, "warmup_steps": 1, "num_workers": 0, "seed": 0}},
                    storage={"url": str(root / name), "store": str(root / store)},
                    logging={"wandb_mode": "disabled"})
    raw["name"] = name
    raw["data"]["generate"] = {"train_samples": 64, "val_samples": 16, "num_classes": 4, "image_size": 32}
    return parse_spec(raw)


def teacher_step(spec: JobSpec) -> tuple[Step, RunFolder]:
    steps, run_folder = plan(spec)
    (step,) = [s for s in steps if s.name == "teacher"]
    return step, run_folder


def lock_actor(ttl_s: float) -> tuple[str, object]:
    """A named KeyLocks actor, made as ``run_planned`` makes it."""
    import ray

    name = f"locks-{ttl_s}-{time.monotonic_ns()}"
    return name, ray.remote(num_cpus=0)(KeyLocks).options(name=name).remote(ttl_s)


@pytest.mark.slow
def test_two_runs_racing_for_one_artifact_make_it_once(ray_address, root, caplog):
    """Two runs sharing a store start the same teacher (same stage and key) at the same moment, each
    through the pipeline's make step under the sweep's lock: exactly one trains it, the other waits for
    the lock, finds it done and says "made meanwhile"; stage.json names the one that trained.
    Catches a lock that admits both (two trainings writing one folder) and a make step that does not
    check the status again once it holds the lock."""
    import ray

    _, locks = lock_actor(sweep.LOCK_TTL_S)
    runs = {name: small_spec(root, name, "store-race") for name in ("race-a", "race-b")}
    steps = {name: teacher_step(spec) for name, spec in runs.items()}
    assert len({step.url for step, _ in steps.values()}) == 1 and all(s.status == "will run" for s, _ in steps.values())
    start = threading.Barrier(len(runs))
    made: dict[str, float | None | BaseException] = {}

    def run(name: str) -> None:
        step, run_folder = steps[name]
        start.wait()
        try:
            made[name] = make(runs[name], run_folder, step, partial(holding, locks, name))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
            made[name] = e

    caplog.set_level(logging.INFO, logger="raptor")
    threads = [threading.Thread(target=run, args=(name,)) for name in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for result in made.values():
        if isinstance(result, BaseException):
            raise result
    makers = [name for name, seconds in made.items() if seconds is not None]
    assert len(makers) == 1, f"the teacher was made by {makers}"
    (maker,), (other,) = makers, set(runs) - set(makers)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("training teacher" in line for line in lines) == 1, lines
    assert any("another trial is making teacher/" in line for line in lines), lines  # they did race
    assert any("stage teacher: made meanwhile" in line for line in lines), lines
    step, _ = steps[other]
    assert step.done
    marker = storage.read_json(storage.join(step.url, "stage.json"))
    assert marker["made_by"] == {"name": maker, "run": runs[maker].storage.url}
    assert corrupt_file(step.url) is None
    assert ray.get(locks.acquire.remote(f"teacher/{step.key}", "next"))  # both released it


def hold_and_hang(address: str, locks_name: str, spec_file: str) -> None:
    """A trial that takes the teacher's lock, starts writing the teacher, and hangs there until killed."""
    import ray

    ray.init(address=address, namespace=NAMESPACE, logging_level="WARNING")
    step, _ = teacher_step(load_spec(spec_file))
    with holding(ray.get_actor(locks_name), "doomed", step):
        storage.write_bytes(storage.join(step.url, "teacher.safetensors"), b"half a teacher")
        print("holding", flush=True)
        time.sleep(600)


@pytest.mark.slow
def test_a_holder_that_dies_passes_the_lock_on_after_its_lease_and_leaves_nothing_that_counts(ray_address, root, tmp_path):
    """A process holding the teacher's lock (half a teacher written) is SIGKILLed: while its lease is
    fresh nobody else may make the teacher, and the plan still says the teacher will run (the half
    file does not count); once the lease is over the next run takes the lock, makes the teacher, and
    its stage.json names that run. Catches a dead trial's lock held forever, a lock taken over while
    its holder may still be writing, and a half-made artifact counted as done."""
    import ray

    ttl_s = 6.0
    name, locks = lock_actor(ttl_s)
    doomed_spec = small_spec(root, "doomed", "store-death")
    spec_file = tmp_path / "doomed.yaml"
    spec_file.write_text(yaml.safe_dump(doomed_spec.model_dump(mode="json")))
    key = f"teacher/{teacher_step(doomed_spec)[0].key}"
    code = "import sys; from tests.test_sweep_locks import hold_and_hang; hold_and_hang(*sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, ray_address, name, str(spec_file)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if line.strip() == "holding":
                break
        else:
            pytest.fail("the holder never took the lock:\n" + "".join(seen[-40:]))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    killed = time.monotonic()

    refused = not ray.get(locks.acquire.remote(key, "next"))
    assert time.monotonic() - killed < ttl_s * 3 / 4, "too slow to see the fresh lease (renewed every ttl/4)"
    assert refused
    spec = small_spec(root, "next", "store-death")
    step, run_folder = teacher_step(spec)
    assert f"teacher/{step.key}" == key
    assert step.status == "will run" and storage.exists(storage.join(step.url, "teacher.safetensors"))
    assert not storage.exists(storage.join(step.url, "stage.json"))

    assert make(spec, run_folder, step, partial(holding, locks, "next")) is not None
    marker = storage.read_json(storage.join(step.url, "stage.json"))
    assert marker["made_by"] == {"name": "next", "run": spec.storage.url}
    assert corrupt_file(step.url) is None  # the recorded teacher is the one on disk, not the half one
    assert storage.read_bytes(storage.join(step.url, "teacher.safetensors")) != b"half a teacher"
