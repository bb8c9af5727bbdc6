"""Faults injected into real runs: nodes killed, the object store down, checkpoints corrupted, NaNs, secrets.

One Ray cluster of three nodes on this machine (``ray.cluster_utils.Cluster``: a head and two
worker nodes, one CPU each) and the S3 server behind a relay that can be taken down
(``tests/s3proxy.py``): the data, the teacher, the store and every checkpoint live in S3. The
reference is an uninterrupted run of the tiny pipeline (``tests/test_service.tiny_spec``); each
fault run trains the same stages from the same teacher, data and seed and must end with the same
student. Tolerance: bit for bit (``torch.equal``): a resume restores the DeepSpeed state, the
schedules, every RNG and the data position exactly, and the CPU gloo reductions are deterministic.

What each test proves is read from artifacts, never from log lines: the export's ``resumed_at``
(the step of every resume; empty when no restart happened), the logged steps (each exactly once),
the checkpoints on S3, ``stage.json`` markers, exit codes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from raptor import storage
from raptor.errors import TrainingDiverged
from raptor.models import load_student
from raptor.service.spec.translate import teacher_ref
from raptor.service.engine.artifacts import RunFolder
from raptor.service.engine.graph import downstream
from raptor.service.engine.pipeline import run_pipeline
from raptor.service.spec import JobSpec, parse_spec
from raptor.service.stages import STAGES
from tests.s3proxy import S3Relay
from tests.secrets_scan import Scan
from tests.test_service import RAPTOR, REPO, _job, _wait_for, kill_job, run_folder_of, tiny_spec, variant

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # `make test-faults`

# dummy credentials: every artifact and log of the reference run is searched for them
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAULTSDUMMY0KEY1",
    "AWS_SECRET_ACCESS_KEY": "dummy-aws-secret-7f3c9e1b5a",
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdefdeadbeef",
}
SPEC_SECRETS = {"WANDB_API_KEY": "spec-wandb-key-4b1d0c9e", "MY_SERVICE_TOKEN": "spec-token-93a7e5f2c1"}
COUNTS: dict[str, Any] = {"faults": [], "outages": [], "corrupt": [], "secret_hits": None}  # the table in docs/reliability.md


@pytest.fixture(scope="module", autouse=True)
def _summary():
    """Print what the module injected and what survived (``pytest -s``), for the table in docs/reliability.md."""
    yield
    print(f"fault summary: {json.dumps(COUNTS)}")


# ---------------------------------------------------------------------------------------------- setup
@pytest.fixture(scope="module")
def relay(s3_server, tmp_path_factory):
    """The S3 server behind a relay; every process started from here on (the Ray nodes included) uses it."""
    import s3fs

    target = int(s3_server.rsplit(":", 1)[1])
    proxy = S3Relay(target)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", *SECRETS, "RAPTOR_LOG_DIR", "WANDB_DIR")}
    os.environ.update(AWS_ENDPOINT_URL=proxy.url, **SECRETS,
                      RAPTOR_LOG_DIR=str(tmp_path_factory.mktemp("logs")), WANDB_DIR=str(tmp_path_factory.mktemp("wandb")))
    s3fs.S3FileSystem.clear_instance_cache()  # filesystems made earlier in the session talk to the server directly
    try:
        yield proxy
    finally:
        proxy.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def direct(s3_server):
    """The S3 server itself, not through the relay: what the test reads while the relay is down."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing", skip_instance_cache=True)


@pytest.fixture(scope="module")
def cluster(relay, tmp_path_factory):
    """A head (the driver, Ray Train's controller, the dashboard) and two one-CPU worker nodes."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    # a busy 2-core machine can starve a raylet of its heartbeats for a while: only 10 missed checks
    # (30 s) make a node dead, so a killed node is still noticed within half a minute
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                      "_system_config": {"health_check_failure_threshold": 10}})
    ray.init(address=c.address, logging_level="WARNING")
    _ensure_worker_nodes(c)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _ensure_worker_nodes(cluster, count: int = 2) -> None:
    """Replace the worker nodes the cluster lost (killed by a test, or dead on its own) until ``count`` live."""
    import ray

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    for node in list(cluster.worker_nodes):
        if node.node_id not in alive or not node.any_processes_alive():
            node.kill_all_processes(check_alive=False, allow_graceful=False)
            cluster.worker_nodes.discard(node)
    while len(cluster.worker_nodes) < count:
        cluster.add_node(num_cpus=1, resources={"worker_node": 1})
    cluster.wait_for_nodes()


@pytest.fixture(autouse=True)
def _two_worker_nodes(cluster):
    _ensure_worker_nodes(cluster)


@pytest.fixture(scope="module")
def bucket(s3_server, direct) -> str:
    name = f"raptor-faults-{uuid.uuid4().hex[:8]}"
    direct.mkdir(name)
    return f"s3://{name}"


def _spec(bucket: str, name: str, **sections: Any) -> JobSpec:
    """The tiny pipeline with its data, store and run in S3 (a 3-epoch teacher: quality is not the point here)."""
    raw = tiny_spec(f"{bucket}/{name}", f"{bucket}/data")
    raw["teacher"]["train"]["epochs"] = 3
    # Ray Train workers only on the worker nodes (the head keeps the driver), so killing one hits a worker
    raw["scaling"].update(max_failures=2, resources_per_worker={"worker_node": 1})
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return parse_spec(raw)


@pytest.fixture(scope="module")
def reference(cluster, bucket, tmp_path_factory) -> dict[str, Any]:
    """The uninterrupted run, as a person starts it (`raptor run`), with dummy credentials in its
    environment and in its spec's runtime_env; its console output is kept for the secrets check."""
    spec = _spec(bucket, "reference")
    raw = yaml.safe_load(spec.to_yaml())
    raw["runtime_env"] = {"env_vars": dict(SPEC_SECRETS)}
    spec = parse_spec(raw)
    spec_file = tmp_path_factory.mktemp("reference") / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    t0 = time.perf_counter()
    out = _raptor_run(spec_file, cluster, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(f"reference run: {time.perf_counter() - t0:.0f}s")
    run_folder = run_folder_of(spec)
    return {"spec": spec, "run_folder": run_folder, "console": out.stdout + out.stderr, "spec_file": spec_file,
            "teacher": run_folder.teacher, "boundaries": run_folder.boundaries()}


def _given_teacher(reference: dict[str, Any], bucket: str, name: str, *overrides: str) -> JobSpec:
    """The reference's stages 1 and 2 again in their own store: the same teacher file, data, boundaries and seed."""
    return variant(reference["spec"], f"storage.url={bucket}/{name}", f"teacher.checkpoint={reference['teacher']}",
                   "teacher.train=null", "data.generate=null", f"discovery.boundaries={reference['boundaries']}",
                   "runtime_env={}", *overrides)


def _past_stage1(reference: dict[str, Any], direct, bucket: str, name: str, *overrides: str) -> JobSpec:
    """The reference's spec in a store of its own that holds the reference's artifacts up to stage 1
    (copied: the same keys), so its run trains stage 2 on, the stage the fault is injected into, and
    must end with the reference's stage-2 student."""
    spec = variant(reference["spec"], f"storage.url={bucket}/{name}", "runtime_env={}", *overrides)
    source, redone = reference["spec"].storage.store_url, downstream(STAGES, ["stage2"])
    for stage, url in reference["run_folder"].folders.items():
        if stage not in redone and url.startswith(source + "/"):
            _copy_store(direct, url, spec.storage.store_url + url[len(source):])
    return spec


def _raptor_run(spec_file: Path, cluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    return subprocess.run([RAPTOR, "run", str(spec_file), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _popen_run(spec_file: Path, cluster, output: Any = subprocess.PIPE) -> subprocess.Popen:
    """`raptor run` in the background; its output to ``output`` (a file for a run nobody reads while it runs)."""
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    return subprocess.Popen([RAPTOR, "run", str(spec_file)], env=env, cwd=REPO, stdout=output,
                            stderr=subprocess.STDOUT, text=True)


# ---------------------------------------------------------------------------------------------- helpers
def _key_path(url: str) -> str:
    return url.removeprefix("s3://")


def _checkpoint_steps(direct, folder: str) -> set[int]:
    """The steps of the checkpoints Ray Train has registered (its snapshot names them), read past the relay."""
    try:
        snapshot = direct.cat_file(f"{_key_path(folder)}/checkpoints/checkpoint_manager_snapshot.json").decode()
    except FileNotFoundError:
        return set()
    return {int(step) for step in re.findall(r"checkpoint_step(\d{8})", snapshot)}


def _registered(direct, folder: str, step: int) -> bool:
    """Ray Train has registered the checkpoint of ``step``."""
    return step in _checkpoint_steps(direct, folder)


def _same_student(a: RunFolder, b: RunFolder, stage: str, teacher_url: str, spec: JobSpec) -> None:
    """The two exports of ``stage`` hold the same weights, bit for bit."""
    teacher = teacher_ref(spec, a).load()
    sa, _ = load_student(a.student(stage), teacher)
    sb, _ = load_student(b.student(stage), teacher)
    for (name, x), y in zip(sa.state_dict().items(), sb.state_dict().values()):
        assert torch.equal(x, y), f"{stage} {name}: max |diff| {(x - y).abs().max().item():.3g}"


def _manifest(run_folder: RunFolder, stage: str) -> dict:
    return storage.read_json(storage.join(run_folder.folder(stage), "manifest.json"))


def _steps(run_folder: RunFolder, stage: str) -> list[int]:
    return [row["step"] for row in storage.read_json(run_folder.history(stage))]


def _copy_store(direct, src: str, dst: str) -> None:
    """Copy a run's store (artifacts and checkpoints) to another run folder: Ray's snapshot names its
    checkpoints relative to the folder, so the copy resumes from its own files."""
    for path in direct.find(_key_path(src)):
        direct.pipe_file(_key_path(dst) + path[len(_key_path(src)):], direct.cat_file(path))


# ---------------------------------------------------------------------------------------------- 1. nodes
def test_worker_nodes_killed_in_stage1_and_stage2_resume_to_the_same_student(reference, cluster, bucket, direct,
                                                                             tmp_path):
    """A worker node hosting a Ray Train worker is killed (SIGKILL of its raylet and workers) after
    stage 1's first checkpoint and again after stage 2's, while `raptor run` runs; a replacement node
    joins each time (added from this, the main, thread: Ray starts a node's processes only there).
    Each stage resumes from its newest checkpoint (its export says where; a restart from step 0 says
    nothing), logs every step once, and ends with the reference's student, bit for bit."""
    from ray.util.state import list_actors

    spec = _given_teacher(reference, bucket, "nodes")
    run_folder = run_folder_of(spec)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    killed: list[str] = []
    t0 = time.perf_counter()
    proc = _popen_run(spec_file, cluster)
    try:
        for stage in ("stage1", "stage2"):
            _wait_for(lambda: _registered(direct, run_folder.folder(stage), 20), 600, f"{stage}'s first checkpoint")
            workers = {a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                              ("state", "=", "ALIVE")], detail=True)}
            controller = {a.node_id for a in list_actors(filters=[("class_name", "=", "TrainController"),
                                                                 ("state", "=", "ALIVE")], detail=True)}
            node = next(n for n in list(cluster.worker_nodes) if n.node_id in workers - controller)
            cluster.remove_node(node, allow_graceful=False)
            killed.append(stage)
            _ensure_worker_nodes(cluster)  # the replacement node joins
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert killed == ["stage1", "stage2"]
    for stage in ("stage1", "stage2"):
        (resumed,) = _manifest(run_folder, stage)["resumed_at"]
        assert resumed in (20, 40), (stage, resumed)
        assert _steps(run_folder, stage) == list(range(5, 61, 5))
        _same_student(run_folder, reference["run_folder"], stage, reference["teacher"], spec)
        COUNTS["faults"].append(("worker node killed", stage, resumed))
    print(f"node kills: resumed at {[_manifest(run_folder, s)['resumed_at'] for s in ('stage1', 'stage2')]}, "
          f"{time.perf_counter() - t0:.0f}s")


def _train_workers() -> dict[str, str]:
    """The live Ray Train workers: actor id -> node id."""
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                                ("state", "=", "ALIVE")], detail=True)}


def test_an_elastic_stage_checkpoints_before_a_preemption_shrinks_and_grows_back(reference, cluster, bucket, direct,
                                                                                   tmp_path, monkeypatch):
    """Stage 1 with scaling.num_workers=3, min_workers=2 (global batch 32) on three worker nodes. After
    its step-20 checkpoint one worker node gets a preemption notice (a Ray node drain with a 25 s
    deadline, what a spot reclaim or a KubeRay drain makes): the stage checkpoints at the next step
    boundary and trains on; at the deadline Ray Train restarts the group as a preemption (with
    scaling.max_failures=0, a restart counted as a failure would fail the stage), the node stops 5 s
    later, and the group runs on the two nodes left from that checkpoint, not from step 500 nor step 0; once it has checkpointed, a node joins and the group
    grows back to three from that checkpoint.
    Proved from artifacts: the checkpoint steps Ray registered, the export's ``resumed_at``, the logged
    steps (each once), the world size and the samples counted at every logged step (steps x 32 exactly:
    a resize that lost or repeated a step's samples, or re-counted them, fails). Catches a notice that
    is ignored (the restart would come from step 500), a group that waits for three workers instead of
    shrinking, one that never grows back, and a resume that changes the batch."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")  # Ray Train's watcher of node drains (default 5 s)
    # the group's first restart after the reclaim still counts the drained node and waits this long to start
    # without it (default 60 s); a start here takes a few seconds
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    # a tiny step takes ~50 ms here: enough steps that the stage outlasts the notice, the restart and the growth
    steps, every = 3000, 500
    # max_failures=0: the restart must count as a preemption (scaling.max_preemptions), or the stage fails
    spec = _given_teacher(reference, bucket, "elastic", "scaling.num_workers=3", "scaling.min_workers=2",
                          "scaling.max_failures=0", "scaling.resize_interval=5", "data.global_batch_size=32",
                          f"stage1.steps={steps}", f"storage.checkpoint_interval={every}", "logging.val_interval=1000")
    run_folder = run_folder_of(spec)
    folder = run_folder.folder("stage1")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    _ensure_worker_nodes(cluster, 3)
    import ray

    # the stage starts on all three (Ray Train sizes the group by the resources it sees ready)
    _wait_for(lambda: ray.available_resources().get("worker_node", 0) >= 3, 60, "three worker nodes ready")
    t0 = time.perf_counter()
    console = tmp_path / "console.txt"
    proc = _popen_run(spec_file, cluster, console.open("w"))
    try:
        _wait_for(lambda: every in _checkpoint_steps(direct, folder), 600, "stage 1's first checkpoint")
        first = _train_workers()
        assert len(first) == 3, first
        from ray.util.state import list_actors

        controller = {a.node_id for a in list_actors(filters=[("class_name", "=", "TrainController"),
                                                             ("state", "=", "ALIVE")], detail=True)}
        node = next(n for n in list(cluster.worker_nodes) if n.node_id in set(first.values()) - controller)
        noticed = time.time()
        deadline = noticed + 25
        accepted, why = GcsClient(address=cluster.address).drain_node(
            node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "test: spot reclaim",
            int(deadline * 1000))
        assert accepted, why
        _wait_for(lambda: any(s % every for s in _checkpoint_steps(direct, folder)), 60, "a checkpoint after the notice")
        registered_after = time.time() - noticed
        (jit,) = [s for s in _checkpoint_steps(direct, folder) if s % every]
        # the reclaim, as KubeRay's preStop makes it: `ray stop` 5 s after the deadline, when Ray Train has
        # restarted the group without the node
        time.sleep(max(0.0, deadline + 5 - time.time()))
        cluster.remove_node(node)
        removed = time.perf_counter()
        _wait_for(lambda: len(w := _train_workers()) == 2 and not set(w) & set(first), 300, "the group on two nodes")
        shrink_s, second = time.perf_counter() - removed, _train_workers()
        # the smaller group checkpoints before it grows, so its steps are in the final history
        _wait_for(lambda: max(_checkpoint_steps(direct, folder)) > jit, 300, "a checkpoint of the group on two nodes")
        _ensure_worker_nodes(cluster, 3)  # a node joins
        joined = time.perf_counter()
        _wait_for(lambda: len(w := _train_workers()) == 3 and not set(w) & set(second), 300, "the group on three nodes")
        grow_s = time.perf_counter() - joined
        _wait_for(lambda: storage.exists(run_folder.marker("stage1")), 900, "stage 1's end")
    except BaseException:
        print(console.read_text()[-6000:])
        raise
    finally:
        kill_job(proc) if proc.poll() is None else proc.communicate()
        while len(cluster.worker_nodes) > 2:
            cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)
    history = storage.read_json(run_folder.history("stage1"))
    assert every < jit < 2 * every, jit  # at the first check after the notice, not a periodic one
    resumed = _manifest(run_folder, "stage1")["resumed_at"]
    assert len(resumed) == 2 and resumed[0] == jit and jit < resumed[1] < steps and resumed[1] % every == 0, resumed
    grown = resumed[1]
    assert [row["step"] for row in history] == list(range(5, steps + 1, 5))
    assert [row["world_size"] for row in history] == [3 if row["step"] <= jit or row["step"] > grown else 2
                                                      for row in history], [(r["step"], r["world_size"]) for r in history]
    assert [row["samples"] for row in history] == [row["step"] * 32 for row in history]
    COUNTS["faults"].append(("preemption notice, node reclaimed, node back (elastic 2-3)", "stage1", resumed))
    print(f"elastic: notice -> checkpoint at step {jit} registered {registered_after:.1f}s after the drain; node stopped -> "
          f"2 workers in {shrink_s:.0f}s, node back -> 3 workers in {grow_s:.0f}s; resumed at {resumed}, "
          f"{time.perf_counter() - t0:.0f}s")


# ---------------------------------------------------------------------------------------------- 2. outages
def test_object_store_outage_is_waited_out_without_a_restart(reference, relay, bucket, direct):
    """S3 goes down for 25 s in the middle of stage 2 (after its step-20 checkpoint) and comes back:
    the checkpoint writes, Ray's bookkeeping and the shard reads wait with backoff; the stage never
    restarts (its export records no resume) and ends with the reference's student."""
    spec = _past_stage1(reference, direct, bucket, "outage")
    run_folder = run_folder_of(spec)

    def outage() -> None:
        _wait_for(lambda: _registered(direct, run_folder.folder("stage2"), 20), 600, "stage 2's first checkpoint")
        relay.down()
        time.sleep(25)
        relay.up()

    blip = threading.Thread(target=outage, daemon=True)
    blip.start()
    run_pipeline(spec)
    blip.join(timeout=60)
    assert relay.outages and relay.outages[-1] >= 25
    assert _manifest(run_folder, "stage2")["resumed_at"] == []  # waited out, not restarted from a checkpoint
    assert _steps(run_folder, "stage2") == list(range(5, 61, 5))
    _same_student(run_folder, reference["run_folder"], "stage2", reference["teacher"], spec)
    COUNTS["outages"].append(("25 s outage in stage 2", "survived, no restart"))


def test_outage_past_patience_stops_in_one_line_and_resumes(reference, relay, cluster, bucket, direct, tmp_path):
    """S3 stays down past storage.patience (10 s) during stage 2: `raptor run` stops with exit code 3
    and one line saying so, stage 2 is not marked done; once S3 is back, the same command resumes
    from the newest registered checkpoint and ends with the reference's student."""
    spec = _past_stage1(reference, direct, bucket, "patience", "storage.patience=10")
    run_folder = run_folder_of(spec)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    proc = _popen_run(spec_file, cluster)
    try:
        _wait_for(lambda: _registered(direct, run_folder.folder("stage2"), 20), 600, "stage 2's first checkpoint")
        relay.down()
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        relay.up()
    last = out.rstrip().splitlines()[-1]
    assert proc.returncode == 3, out[-4000:]
    assert last.startswith("raptor run: stopped: ") and "unreachable" in last and "Traceback" not in out, last
    assert not direct.exists(f"{_key_path(run_folder.folder('stage2'))}/stage.json")
    newest = max(_checkpoint_steps(direct, run_folder.folder("stage2")))  # 20, or 40 where its async upload landed first

    run_pipeline(spec)
    assert _manifest(run_folder, "stage2")["resumed_at"] == [newest] and newest in (20, 40)
    _same_student(run_folder, reference["run_folder"], "stage2", reference["teacher"], spec)
    COUNTS["outages"].append(("outage past storage.patience", "stopped in one line, resumed"))


# ---------------------------------------------------------------------------------------------- 3. checkpoints
def test_kill_during_a_checkpoint_write_never_resumes_the_half_written_one(reference, relay, cluster, bucket, direct,
                                                                           tmp_path):
    """The job is killed while stage 2's step-40 checkpoint is being uploaded (the relay stalls its
    PUTs): a half-written folder is left in S3. The re-run resumes from step 20 (the last whole,
    registered checkpoint), never from the half-written one, and ends with the reference's student."""
    spec = _past_stage1(reference, direct, bucket, "halfwritten")
    run_folder = run_folder_of(spec)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    # only rank 1's RNG state stalls: rank 0's files and rank 1's checksums land, a half-written folder
    stalled = relay.hold(re.escape(f"PUT /{_key_path(run_folder.folder('stage2'))}/checkpoints/checkpoint_step00000040/"
                                   "rng_rank1").encode())
    proc = _popen_run(spec_file, cluster)
    try:
        _wait_for(stalled.is_set, 600, "the upload of stage 2's step-40 checkpoint")
        half = f"{_key_path(run_folder.folder('stage2'))}/checkpoints/checkpoint_step00000040"
        _wait_for(lambda: direct.invalidate_cache() or direct.exists(f"{half}/state.pt"),
                  60, "rank 0's consolidated state")
        # Ray Train registers a checkpoint when its controller next polls the ranks' reports, which can
        # lag the next checkpoint's upload: the premise is a registered step 20 and a half-written step 40
        _wait_for(lambda: _registered(direct, run_folder.folder("stage2"), 20), 120, "stage 2's step-20 registration")
    finally:
        kill_job(proc)
        relay.release()
    direct.invalidate_cache()
    assert direct.exists(half) and not _registered(direct, run_folder.folder("stage2"), 40)
    run_pipeline(spec)
    assert _manifest(run_folder, "stage2")["resumed_at"] == [20]
    _same_student(run_folder, reference["run_folder"], "stage2", reference["teacher"], spec)
    COUNTS["faults"].append(("job killed during a checkpoint upload", "stage2", 20))


@pytest.fixture(scope="module")
def interrupted(reference, cluster, bucket, direct, tmp_path_factory) -> JobSpec:
    """A run whose stage 2 was killed after its step-40 checkpoint: checkpoints 20 and 40 in S3."""
    spec = _past_stage1(reference, direct, bucket, "interrupted")
    run_folder = run_folder_of(spec)
    spec_file = tmp_path_factory.mktemp("interrupted") / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    proc = _popen_run(spec_file, cluster)
    try:
        _wait_for(lambda: _registered(direct, run_folder.folder("stage2"), 40), 600, "stage 2's step-40 checkpoint")
    finally:
        kill_job(proc)
    return spec


def _bit_flip(direct, path: str) -> None:
    data = bytearray(direct.cat_file(path))
    data[len(data) // 2] ^= 0x10
    direct.pipe_file(path, bytes(data))


def _truncate(direct, path: str) -> None:
    direct.pipe_file(path, direct.cat_file(path)[: -4096])


def _planted_pickle(direct, path: str, marker: Path) -> None:
    """Replace the file with a pickle that runs a command when unpickled, and forge its checksum."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import io

    buf = io.BytesIO()
    torch.save({"module": Payload()}, buf)
    direct.pipe_file(path, buf.getvalue())
    folder = path[: path.index("/", path.index("/checkpoint_step") + 1)]  # where the checksum records are
    name = path[len(folder) + 1:]
    for sums in direct.glob(f"{folder}/checksums_rank*.json"):
        record = json.loads(direct.cat_file(sums))
        if name in record["files"]:
            import hashlib

            record["files"][name] = hashlib.sha256(buf.getvalue()).hexdigest()
            direct.pipe_file(sums, json.dumps(record).encode())


@pytest.mark.parametrize("fault", ["bit flip", "truncated", "planted pickle"])
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(fault, interrupted, reference, cluster, bucket, direct,
                                                             tmp_path):
    """Stage 2's newest checkpoint (step 40) gets a shard bit-flipped, truncated, or replaced by a
    malicious pickle whose checksum was forged too. The re-run detects it (checksum; weights-only load
    for the pickle, which never runs), warns naming the file, resumes from step 20 and ends with the
    reference's student."""
    name = f"corrupt-{fault.replace(' ', '-')}"
    spec = variant(interrupted, f"storage.url={bucket}/{name}")
    _copy_store(direct, interrupted.storage.store_url, spec.storage.store_url)
    run_folder = run_folder_of(spec)
    folder = f"{_key_path(run_folder.folder('stage2'))}/checkpoints/checkpoint_step00000040"
    marker = tmp_path / "payload-ran"
    file = {"bit flip": "rng_rank1.pt", "truncated": "state.pt", "planted pickle": "state.pt"}[fault]
    {"bit flip": _bit_flip, "truncated": _truncate}.get(fault, lambda d, p: _planted_pickle(d, p, marker))(direct, f"{folder}/{file}")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    out = _raptor_run(spec_file, cluster)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    warning = next((line for line in out.stderr.splitlines() if "not used" in line), "")
    assert "checkpoint_step00000040" in warning and file in warning, out.stderr[-3000:]
    assert _manifest(run_folder, "stage2")["resumed_at"] == [20]
    _same_student(run_folder, reference["run_folder"], "stage2", reference["teacher"], spec)
    assert not marker.exists(), "the planted pickle was executed"
    COUNTS["corrupt"].append((fault, file))


def test_a_corrupt_export_is_never_loaded_and_is_made_again(reference, bucket, direct):
    """A finished run's stage-1 student is bit-flipped in the store. Re-running with a changed stage 2
    (which reads that student) does not load it: the plan marks stage 1 corrupt, naming the file,
    and stage 1 re-exports the same weights from its last checkpoint before stage 2 runs."""
    from raptor.service.engine.pipeline import plan

    spec = variant(reference["spec"], f"storage.url={bucket}/export", f"storage.store={reference['spec'].storage.store_url}",
                   "runtime_env={}")
    run_folder = run_folder_of(spec)
    teacher = teacher_ref(spec, run_folder).load()
    before, _ = load_student(run_folder.student("stage1"), teacher)
    _bit_flip(direct, _key_path(run_folder.student("stage1")))
    changed = variant(spec, "stage2.lr=0.0007")
    steps = {s.name: s for s in plan(changed)[0]}
    assert steps["stage1"].status == "will run", steps["stage1"].why
    assert steps["stage1"].why.startswith("corrupt: ") and "student.safetensors" in steps["stage1"].why
    assert "stage1" in run_pipeline(changed)
    after, manifest = load_student(run_folder.student("stage1"), teacher)
    assert manifest["resumed_at"] == [60]  # re-exported from the final checkpoint, not retrained
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b), name
    COUNTS["corrupt"].append(("exported student bit-flipped", "student.safetensors"))


# ---------------------------------------------------------------------------------------------- 4. numerics
def _poisoned_loop(config: dict[str, Any]) -> None:
    """The runner's worker loop, with NaN images in the micro-batches of steps 21..40 (0-based 20..39)."""
    from raptor import storage as st
    from raptor.train.logs import quiet_worker
    from raptor.train.trainer import Trainer

    class Poisoned(Trainer):
        def step(self, batches, step):
            if 20 <= step < 40:
                batches = (b * float("nan") for b in batches)
            return super().step(batches, step)

    quiet_worker()
    st.set_patience(config["job"].storage.patience)
    Poisoned(config["job"]).train()


@pytest.mark.parametrize("zero", [0, 2])
def test_non_finite_steps_are_skipped_and_counted(zero, reference, tmp_path):
    """NaN inputs make every step from 21 to 40 non-finite. Each is skipped (ZeRO-0 by raptor's guard,
    ZeRO-2 by DeepSpeed's own check): the step-40 checkpoint holds exactly the step-20 weights, the
    export counts 20 skipped steps, and training goes on to a finite student."""
    from ray import cloudpickle  # Ray's own copy: the one that pickles the training function

    from raptor.train.integrity import load_weights_only
    from raptor.train.launch import stage_trainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    spec = variant(reference["spec"], f"deepspeed.zero_stage={zero}", "stage2.max_nonfinite_steps=25",
                   "logging.val_interval=100", "storage.keep=5", "runtime_env={}")
    folder = str(tmp_path / "stage2")
    job = _job(spec, "stage2", folder)
    stage_trainer(job, _poisoned_loop).fit()
    manifest = storage.read_json(storage.join(folder, "manifest.json"))
    assert manifest["nonfinite_steps"] == 20 and manifest["resumed_at"] == []
    weights = {}
    for step in (20, 40):
        weights[step] = load_weights_only(str(Path(folder, "checkpoints", f"checkpoint_step{step:08d}", "state.pt")))["training"]
    for name, w in weights[20].items():  # weights, both moments, step count, learning rates
        assert torch.equal(w, weights[40][name]) if torch.is_tensor(w) else w == weights[40][name], \
            f"{name} changed during the skipped steps"
    student, _ = load_student(storage.join(folder, "student.safetensors"))
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert any(not torch.equal(w, weights[40][f"param/{k}"]) for k, w in student.named_parameters())  # it trained on
    COUNTS["faults"].append((f"NaN loss, 20 steps, ZeRO-{zero}", "stage2", "skipped"))


def test_a_diverging_stage_stops_with_a_checkpoint_and_is_never_exported(reference, cluster, bucket, tmp_path):
    """A learning rate of 1e6 makes stage 2 diverge (a real overflow, nothing injected). After
    stage2.max_nonfinite_steps=3 skipped steps in a row the run stops: exit code 3, one line naming
    the step and the block; a checkpoint of that step exists; no student was exported and stage 2 is
    not marked done."""
    spec = variant(reference["spec"], f"storage.url={bucket}/diverged", f"storage.store={reference['spec'].storage.store_url}",
                   "stage2.lr=1e6", "stage2.max_nonfinite_steps=3", "runtime_env={}")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    out = _raptor_run(spec_file, cluster)
    last = out.stderr.rstrip().splitlines()[-1]
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    m = re.fullmatch(r"raptor run: stopped: stage2 stopped at step (\d+): 4 optimizer steps in a row had a non-finite "
                     r"loss or gradient \(the last one: (loss in block \d .*|gradient .*)\).*", last)
    assert m, last
    run_folder = run_folder_of(spec)
    step = int(m.group(1))
    assert storage.exists(storage.join(run_folder.folder("stage2"), "checkpoints", f"checkpoint_step{step:08d}"))
    assert not storage.exists(run_folder.student("stage2")) and not storage.exists(run_folder.marker("stage2"))
    with pytest.raises(TrainingDiverged):
        run_pipeline(spec)  # the same spec stops again, from its checkpoint
    COUNTS["faults"].append(("diverged stage (lr 1e6)", "stage2", f"stopped at step {step}"))


# ---------------------------------------------------------------------------------------------- 6. secrets
def test_no_secret_reaches_an_artifact_a_log_or_a_manifest(reference, cluster, direct, tmp_path):
    """The reference run had dummy AWS keys and WANDB_API_KEY in its environment and two credentials
    in its spec's runtime_env.env_vars. None of them appears in its console output, its log file, its
    wandb files, Ray's session logs, any object it wrote to S3 (spec.yaml, run.json, stage.json,
    manifests, checkpoints), nor in the k8s manifests rendered from it (which refuses the spec).

    Catches a scan that cannot fail: two planted controls (a file in the log folder, an object in the
    run's S3 folder, each holding a dummy value) must each be found exactly once, and the scan must have
    read what a run must write (every stage's marker, spec.yaml, run.json, the log file) and at least
    ``search_floor`` things in all."""
    spec, run_folder = reference["spec"], reference["run_folder"]
    run_key = _key_path(spec.storage.url)
    stages = [s.name for s in STAGES if s.complete is None and not s.given(spec)]  # the keyed store stages (with a stage.json)
    # console 1 + the log file 1 + Ray's head session >= 4 (gcs_server and raylet .out/.err are always made)
    # + S3 >= 16 (each store stage's stage.json and >= 1 artifact file, spec.yaml, run.json) + 2 k8s renders
    search_floor = 1 + 1 + 4 + (2 * len(stages) + 2) + 2
    scan = Scan((*SECRETS.values(), *SPEC_SECRETS.values()))
    log_dir = Path(os.environ["RAPTOR_LOG_DIR"])
    planted_file = log_dir / "control" / "planted.txt"  # the file-tree search must find it
    planted_file.parent.mkdir()
    planted_file.write_text(f"control: {SECRETS['AWS_SECRET_ACCESS_KEY']}\n")
    planted_object = f"{run_key}/control/planted.txt"  # so must the S3 search
    direct.pipe_file(planted_object, f"control: {SPEC_SECRETS['MY_SERVICE_TOKEN']}\n".encode())
    try:
        scan.search("console", reference["console"])
        assert scan.walk(log_dir) >= 1 + 1, "the run's log file was not searched"
        scan.walk(os.environ["WANDB_DIR"])
        assert scan.walk(cluster.head_node.get_session_dir_path()) >= 4, "Ray's session logs were not searched"
        s3 = scan.objects((path, direct.cat_file(path)) for path in direct.find(run_key))
        assert s3 >= 2 * len(stages) + 2 + 1, f"only {s3} objects under {spec.storage.url} (with the control)"
    finally:
        planted_file.unlink()
        planted_file.parent.rmdir()
        direct.rm_file(planted_object)
    searched = set(scan.searched)
    must = {f"{run_key}/spec.yaml", f"{run_key}/run.json", *(_key_path(run_folder.marker(s)) for s in stages)}
    assert must <= searched, f"never searched: {sorted(must - searched)}"
    assert any(Path(p).match("raptor-*.log") for p in searched), "no raptor-*.log was searched"
    saved = yaml.safe_load(direct.cat_file(f"{run_key}/spec.yaml"))
    assert saved["runtime_env"]["env_vars"] == {k: "<redacted>" for k in SPEC_SECRETS}
    render = subprocess.run([RAPTOR, "k8s", "render", str(reference["spec_file"])], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert render.returncode == 2 and "runtime_env.env_vars." in render.stderr, render.stderr
    scan.search("k8s render", render.stdout + render.stderr)
    clean = tmp_path / "clean.yaml"
    clean.write_text(variant(spec, "runtime_env={}").to_yaml())
    render = subprocess.run([RAPTOR, "k8s", "render", str(clean)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert render.returncode == 0 and "secretKeyRef" in render.stdout
    scan.search("k8s manifests", render.stdout)

    controls = {str(planted_file), planted_object}
    assert sorted((h.where, h.value) for h in scan.hits if h.where in controls) == sorted([
        (str(planted_file), SECRETS["AWS_SECRET_ACCESS_KEY"]), (planted_object, SPEC_SECRETS["MY_SERVICE_TOKEN"])])
    leaks = [f"{h.where}: {h.value}" for h in scan.hits if h.where not in controls]
    searched_real = len(scan.searched) - len(controls)
    COUNTS["secret_hits"] = (len(leaks), searched_real)
    print(f"secrets: {len(leaks)} found in {searched_real} files and outputs searched (floor {search_floor}); "
          f"both planted controls found")
    assert searched_real >= search_floor
    assert leaks == []
