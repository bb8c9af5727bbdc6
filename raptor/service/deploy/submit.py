"""Sending ``raptor run SPEC`` (or ``raptor sweep SPEC``) to a Ray cluster: the entrypoint (built here only), runtime_env, the job API.

``raptor submit`` and the KubeRay RayJob (``raptor k8s render``) run the same entrypoint; the
spec's ``runtime_env`` ships the code (the working directory is uploaded unless the spec names its
own), so submitting a spec file is one command.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import time
from typing import Any, Sequence

import yaml

from raptor.errors import UserError
from raptor.service.spec import REDACTED, SECRET_NAME, JobSpec, hide_passwords, redact

log = logging.getLogger(__name__)


def entrypoint(spec_ref: str, overrides: Sequence[str], command: str = "run") -> str:
    """``raptor COMMAND SPEC --set ...`` (run or sweep): the spec path as given (relative to the job's working
    directory, or a URL)."""
    return shlex.join(["raptor", command, spec_ref, *(arg for o in overrides for arg in ("--set", o))])


def submission(spec_path: str, spec: JobSpec, overrides: list[str], command: str = "run") -> dict[str, Any]:
    """Entrypoint and runtime_env of the Ray job for ``raptor COMMAND SPEC --set ...`` (run or sweep)."""
    if "://" in spec_path or os.path.isabs(spec_path):
        path = spec_path
    else:
        path = os.path.relpath(spec_path)
        if path.startswith(".."):
            raise UserError(f"{spec_path}: the spec must lie inside the working directory that is uploaded ({os.getcwd()})")
    runtime_env = dict(spec.runtime_env)
    runtime_env.setdefault("working_dir", ".")
    # a credential set with --set reaches the job through runtime_env (below), which `raptor run` never reads;
    # the entrypoint carries it redacted, since Ray stores, shows and logs the entrypoint
    return {"entrypoint": entrypoint(path, [redacted_override(o) for o in overrides], command), "runtime_env": runtime_env}


def auth_error(address: str, error: BaseException) -> UserError:
    """The one-line fix for Ray's token authentication (on by default for local clusters since Ray 2.52)."""
    text = " ".join(str(getattr(error, "message", error)).split())
    if "invalid" in text.lower() or "forbidden" in text.lower():
        return UserError(f"the Ray cluster at {address} rejected the token this client sent: set RAY_AUTH_TOKEN to "
                         "the cluster's token (`ray get-auth-token` on its head node prints it)")
    return UserError(f"the Ray cluster at {address} has token authentication on and this client sent no token: "
                     "set RAY_AUTH_MODE=token, and for a cluster on another machine also RAY_AUTH_TOKEN=<its token> "
                     "(`ray get-auth-token` on its head node prints it)")


def redacted_override(override: str) -> str:
    """A ``--set`` override with every credential it puts into ``runtime_env`` replaced by ``<redacted>``: a key
    that names one (``runtime_env.env_vars.MY_TOKEN=...``) or a mapping entry that does (``runtime_env={...}``);
    the rest stays, so the override still parses into the same shape."""
    key, eq, value = override.partition("=")
    if not eq or not key.strip().startswith("runtime_env"):
        return override
    if SECRET_NAME.search(key):
        return f"{key}={REDACTED}"
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return f"{key}={REDACTED}"  # cannot tell what it holds (the spec would not have loaded)
    hidden = redact(parsed)
    return override if hidden == parsed else f"{key}={yaml.safe_dump(hidden, default_flow_style=True, width=math.inf).strip()}"


def redacted_entrypoint(entry: str) -> str:
    """The entrypoint as printed: credentials in ``--set`` overrides and passwords in URLs hidden."""
    parts = [hide_passwords(p) for p in shlex.split(entry)]
    for i in range(1, len(parts)):
        if parts[i - 1] == "--set":
            parts[i] = redacted_override(parts[i])
    return shlex.join(parts)


def submit(client: Any, job: dict[str, Any], name: str, address: str, wait_s: float = 90.0) -> str:
    """Submit, retrying while the head has no job agent yet (seconds after a cluster starts or scales)."""
    deadline = time.monotonic() + wait_s
    delay = 1.0
    while True:
        try:
            return client.submit_job(**job, metadata={"raptor_spec": name})
        except RuntimeError as e:
            if "try again later" not in str(e) or time.monotonic() + delay > deadline:
                raise UserError(f"the Ray cluster at {address} refused the job: {str(e).splitlines()[0]}") from None
            log.info("Ray has no job agent ready yet; retrying in %.0fs", delay)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


def follow(client: Any, job_id: str) -> bool:
    """Print the job's log as it grows until the job ends; True when it succeeded."""
    from ray.job_submission import JobStatus

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
    return status == JobStatus.SUCCEEDED
