"""``raptor run SPEC`` and ``raptor submit SPEC``: one command from a job spec to a report.

``run`` executes the pipeline here: on the Ray cluster in ``RAY_ADDRESS`` (set by ``ray job
submit`` for its entrypoint) or on a local Ray it starts (the embedded default). ``submit`` sends
that same ``raptor run`` to a cluster through Ray's JobSubmissionClient, with the spec's
``runtime_env`` (the working directory is uploaded unless the spec names its own), so submitting
a spec file is one command.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import time

from raptor.cli import CliError
from raptor.config import JobSpec, load_spec

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run a job spec: data -> teacher -> discovery -> stage1 -> stage2 -> probe -> report")
    run.add_argument("spec", help="job spec YAML (path or URL)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec field, e.g. --set stage2.steps=2000 (repeatable)")
    run.set_defaults(func=cmd_run)

    sub = subparsers.add_parser("submit", help="submit `raptor run SPEC` to a Ray cluster as a Ray job")
    sub.add_argument("spec", help="job spec YAML (a path inside the working directory that is uploaded)")
    sub.add_argument("--address", default=None, help="Ray dashboard URL (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sub.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    sub.set_defaults(func=cmd_submit)


def connect_ray(spec: JobSpec) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray big enough for the spec's workers."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        return
    need = spec.scaling.num_workers * spec.scaling.cpus_per_worker
    # the workers' CPUs are Ray's bookkeeping, not threads: a smaller laptop still runs the default
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), logging_level=logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    from raptor.pipeline import run_pipeline

    spec = load_spec(args.spec, args.overrides)
    t0 = time.perf_counter()
    connect_ray(spec)
    timings = run_pipeline(spec)
    total = time.perf_counter() - t0
    ran = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) or "nothing to do: every stage was done"
    print(f"raptor run {spec.name}: finished in {total:.0f}s ({ran}); artifacts in {spec.storage.url}, "
          f"report {spec.storage.url.rstrip('/')}/report/index.md")
    return 0


def submission(spec_path: str, spec: JobSpec, overrides: list[str]) -> dict:
    """Entrypoint and runtime_env of the Ray job for ``raptor run SPEC --set ...``."""
    if "://" in spec_path or os.path.isabs(spec_path):
        path = spec_path
    else:
        path = os.path.relpath(spec_path)
        if path.startswith(".."):
            raise CliError(f"{spec_path}: the spec must lie inside the working directory that is uploaded ({os.getcwd()})")
    entry = ["raptor", "run", path] + [a for o in overrides for a in ("--set", o)]
    runtime_env = dict(spec.runtime_env)
    runtime_env.setdefault("working_dir", ".")
    return {"entrypoint": shlex.join(entry), "runtime_env": runtime_env}


def _submit(client, job: dict, name: str, address: str, wait_s: float = 90.0) -> str:
    """Submit, retrying while the head has no job agent yet (seconds after a cluster starts or scales)."""
    deadline = time.monotonic() + wait_s
    delay = 1.0
    while True:
        try:
            return client.submit_job(**job, metadata={"raptor_spec": name})
        except RuntimeError as e:
            if "try again later" not in str(e) or time.monotonic() + delay > deadline:
                raise CliError(f"the Ray cluster at {address} refused the job: {str(e).splitlines()[0]}") from None
            log.info("Ray has no job agent ready yet; retrying in %.0fs", delay)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


def cmd_submit(args: argparse.Namespace) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = load_spec(args.spec, args.overrides)  # fail here, not on the cluster, on a bad spec
    address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as e:
        raise CliError(f"cannot reach the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    job = submission(args.spec, spec, args.overrides)
    job_id = _submit(client, job, spec.name, address)
    print(f"submitted {job_id} to {address}: {job['entrypoint']}")
    if args.no_wait:
        return 0
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    printed = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        if status in terminal:
            break
        time.sleep(2)
    print(f"job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1
