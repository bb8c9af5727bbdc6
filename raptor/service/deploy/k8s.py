"""KubeRay manifests rendered from a job spec: the cluster's shape is read from the spec, never typed twice.

``render`` turns a spec into the objects ``kubectl apply`` needs: the namespace and ServiceAccount
(shared, the kustomize base) and, per overlay, a RayJob whose embedded RayCluster has exactly the
pods the spec's ``scaling`` section asks for, plus a NetworkPolicy that closes the head to everyone
but the job's own pods and the KubeRay operator. Ray's token authentication is on (``authOptions``,
the token from the ``cluster.ray_token_secret`` Secret; KubeRay hands it to every Ray container and
the submitter), so even a pod the NetworkPolicy admits needs the token. An overlay is a named set of
``--set`` overrides, and the RayJob's entrypoint carries the same overrides, so the job always asks
Ray for the resources its cluster has. Credentials reach the pods only through ``secretKeyRef``: a
spec that carries one in ``runtime_env`` is refused rather than written into a manifest.

A spec with a ``sweep`` section renders as a RayJob whose entrypoint is ``raptor sweep``; its worker
group holds ``sweep.max_concurrent_trials`` trials' worth of pods (each trial's ``scaling``), scaled
by the autoscaler between none and all of them, and each worker pod carries one CPU more for the
trial drivers Tune places there (0.01 CPU each), so they never take a worker's place.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import yaml

from raptor.errors import UserError
from raptor.service.spec import DRIVER_RESOURCE, DRIVER_SLOTS, ClusterSpec, JobSpec, load_spec, secrets_in
from raptor.train.settings import ScalingSettings
from raptor.service.deploy.submit import entrypoint

# overlay -> the --set overrides it applies on top of the spec
OVERLAYS: dict[str, tuple[str, ...]] = {
    "dev": ("scaling.num_workers=1",),  # one GPU worker: the whole deployment at the smallest size
    "multinode": (),  # the spec's own scaling: scaling.num_workers GPUs on pods of cluster.gpus_per_node
}

PROJECT_DIR = "/home/ray/raptor"  # WORKDIR of cluster/Dockerfile; holds jobs/
RAY_UID, RAY_GID = 1000, 100  # the image's non-root user
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}
DASHBOARD_AGENT_PORT = 52365
MAX_JOB_NAME = 47  # KubeRay appends a suffix for the cluster and its services (63-character names)
BASE_KINDS = ("Namespace", "ServiceAccount")  # shared by every overlay


class RenderError(UserError):
    """A spec that cannot be laid out on Kubernetes pods; the message names the fields."""


@dataclass(frozen=True)
class WorkerPacking:
    """How the spec's Ray Train workers (of every trial that runs at once, for a sweep) are packed onto identical pods."""

    pods: int
    min_pods: int  # an elastic range's fewest workers need this many (pods otherwise)
    workers_per_pod: int
    gpus_per_pod: int
    cpus_per_pod: float
    memory_gib: int


def worker_packing(scaling: ScalingSettings, cluster: ClusterSpec, trials: int = 1) -> WorkerPacking:
    """Pack workers onto pods of ``cluster.gpus_per_node`` GPUs (one worker per pod on CPU).

    ``trials`` > 0 for a sweep: that many trials' pods, each pod with one extra CPU for trial drivers.
    """
    workers_per_pod = 1
    if scaling.use_gpu:
        if scaling.gpus_per_worker <= 0:
            raise RenderError("scaling.gpus_per_worker must be > 0 when scaling.use_gpu is true")
        if scaling.gpus_per_worker > cluster.gpus_per_node:
            raise RenderError(
                f"scaling.gpus_per_worker={scaling.gpus_per_worker:g} exceeds cluster.gpus_per_node={cluster.gpus_per_node}"
            )
        workers_per_pod = min(scaling.num_workers, int(cluster.gpus_per_node // scaling.gpus_per_worker))
        if scaling.num_workers % workers_per_pod:
            raise RenderError(
                f"scaling.num_workers={scaling.num_workers} does not fill pods of {workers_per_pod} workers "
                f"(cluster.gpus_per_node={cluster.gpus_per_node}); use a multiple of {workers_per_pod}"
            )
    gpus = workers_per_pod * scaling.gpus_per_worker if scaling.use_gpu else 0
    if gpus != int(gpus):
        raise RenderError(f"{workers_per_pod} workers x scaling.gpus_per_worker={scaling.gpus_per_worker:g} is not a whole number of GPUs per pod")
    cpus = scaling.cpus_per_worker * workers_per_pod
    return WorkerPacking(
        pods=scaling.num_workers // workers_per_pod * max(trials, 1),
        min_pods=-(-scaling.world_sizes[0] // workers_per_pod) * max(trials, 1),
        workers_per_pod=workers_per_pod,
        gpus_per_pod=int(gpus),
        cpus_per_pod=cpus + (1 if trials else 0),  # Ray counts a pod's CPUs from its limit: room for trial drivers
        memory_gib=cluster.memory_per_worker_gib * workers_per_pod,
    )


def sweep_trials(spec: JobSpec) -> int:
    """Trials a sweep runs at once on Kubernetes: ``sweep.max_concurrent_trials`` (0 without a sweep)."""
    if spec.sweep is None:
        return 0
    if spec.sweep.max_concurrent_trials is None:
        raise RenderError("sweep.max_concurrent_trials: set it to render a sweep (the worker group is sized for that "
                          "many trials at once)")
    return spec.sweep.max_concurrent_trials


def job_name(spec: JobSpec, overlay: str) -> str:
    """The RayJob's name: the spec's name as a DNS label, with the overlay so both can coexist."""
    name = f"{re.sub(r'[^a-z0-9-]+', '-', spec.name.lower()).strip('-')}-{overlay}"
    if len(name) > MAX_JOB_NAME:
        raise RenderError(f"name: {name!r} is {len(name)} characters; KubeRay allows {MAX_JOB_NAME} for a RayJob")
    return name


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "raptor", "app.kubernetes.io/instance": name, "app.kubernetes.io/component": component}


def _secret_env(cluster: ClusterSpec) -> list[dict[str, Any]]:
    """Credentials as secretKeyRef only; optional, so workload identity and offline wandb still start."""
    refs = []
    if cluster.wandb_secret:
        refs.append(("WANDB_API_KEY", cluster.wandb_secret, "api-key"))
    if cluster.s3_secret:
        refs += [("AWS_ACCESS_KEY_ID", cluster.s3_secret, "access-key-id"), ("AWS_SECRET_ACCESS_KEY", cluster.s3_secret, "secret-access-key")]
    return [{"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}} for env, secret, key in refs]


def _head_placement(cluster: ClusterSpec) -> dict[str, Any]:
    """Where the head and the submitter run (``cluster.head_node_selector``, e.g. on-demand nodes), as pod fields."""
    return {"nodeSelector": dict(cluster.head_node_selector)} if cluster.head_node_selector else {}


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod_spec(cluster: ClusterSpec, containers: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "serviceAccountName": cluster.service_account,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RAY_UID,
            "runAsGroup": RAY_GID,
            "fsGroup": RAY_GID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": containers,
        **extra,
    }


DRAIN_MARGIN_S = 5  # a draining worker pod stops this long after its deadline, and is killed this long after that


def _start_resources(resources: dict[str, float]) -> str:
    """``rayStartParams.resources`` as KubeRay wants it: JSON in double quotes, its own quotes escaped (the value
    goes into the ``ray start`` shell command, and the autoscaler reads it the same way)."""
    return json.dumps(json.dumps(resources))


def _pre_stop(cluster: ClusterSpec, role: str) -> str:
    """How a Ray pod stops: a worker first drains its node as preempted with ``cluster.drain_seconds`` to go
    (Ray Train's preemption notice: the training stage checkpoints at its next step boundary) and stops a
    little after that deadline, once Ray Train has restarted the group without it (a node stopped earlier
    would count as a failure, not a preemption)."""
    if role == "head" or not cluster.drain_seconds:
        return "ray stop"
    n = cluster.drain_seconds
    return (f"ray drain-node --address auto --reason DRAIN_NODE_REASON_PREEMPTION --reason-message 'pod terminating' "
            f"--deadline-remaining-seconds {n}; sleep {n + DRAIN_MARGIN_S}; ray stop")


def _ray_container(spec: JobSpec, role: str, resources: dict[str, str], ready: str) -> dict[str, Any]:
    """A Ray node container; KubeRay supplies its ``ray start`` command."""
    container: dict[str, Any] = {
        "name": f"ray-{role}",
        "image": spec.cluster.image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": PROJECT_DIR,
        "env": _secret_env(spec.cluster),
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", _pre_stop(spec.cluster, role)]}}},
        "readinessProbe": {
            "exec": {"command": ["/bin/sh", "-c", ready]},
            "initialDelaySeconds": 10,
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 12,
        },
        "securityContext": _container_security(),
    }
    if not container["env"]:
        del container["env"]
    if role == "head":
        container["ports"] = [{"name": n, "containerPort": p} for n, p in HEAD_PORTS.items()]
    return container


def _shm_volume(gib: int) -> list[dict[str, Any]]:
    """Memory-backed /dev/shm for Ray's object store, DataLoader workers and NCCL (the default is 64 MiB)."""
    return [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{gib}Gi"}}]


def ray_cluster_spec(spec: JobSpec, name: str) -> dict[str, Any]:
    """The RayCluster spec: a CPU head with the dashboard and one worker group sized by ``spec.scaling``."""
    cluster, scaling = spec.cluster, spec.scaling
    packing = worker_packing(scaling, cluster, sweep_trials(spec))
    raylet_ok = f"curl -fsS http://localhost:{DASHBOARD_AGENT_PORT}/api/local_raylet_healthz | grep -q success"
    head_ok = f"{raylet_ok} && curl -fsS http://localhost:{HEAD_PORTS['dashboard']}/api/gcs_healthz | grep -q success"

    head_res = {"cpu": str(cluster.head_cpus), "memory": f"{cluster.head_memory_gib}Gi"}
    head = {
        # num-cpus 0: Ray schedules no tasks on the head, so the driver and GCS never compete with training;
        # raptor_driver: the on-demand node where a sweep's trial drivers and locks go (raptor.service.sweep.trials)
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0",
                           "resources": _start_resources({DRIVER_RESOURCE: DRIVER_SLOTS})},
        "template": {
            "metadata": {"labels": _labels(name, "ray-head")},
            "spec": _pod_spec(
                cluster,
                [_ray_container(spec, "head", head_res, head_ok)],
                volumes=_shm_volume(cluster.head_memory_gib // 2),
                **_head_placement(cluster),
            ),
        },
    }

    worker_res = {"cpu": _quantity(packing.cpus_per_pod), "memory": f"{packing.memory_gib}Gi"}
    worker_extra: dict[str, Any] = {"volumes": _shm_volume(packing.memory_gib // 2)}
    tolerations = list(cluster.worker_tolerations)
    if packing.gpus_per_pod:
        worker_res["nvidia.com/gpu"] = str(packing.gpus_per_pod)
        tolerations.insert(0, {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        worker_extra["tolerations"] = tolerations
    if cluster.node_selector:
        worker_extra["nodeSelector"] = dict(cluster.node_selector)
    start_params: dict[str, str] = {}
    if scaling.resources_per_worker:
        pod_resources = {k: v * packing.workers_per_pod for k, v in scaling.resources_per_worker.items()}
        start_params["resources"] = _start_resources(pod_resources)
    workers = {
        "groupName": "gpu-workers" if packing.gpus_per_pod else "cpu-workers",
        "replicas": packing.pods,
        "minReplicas": packing.min_pods if scaling.min_workers else 0,
        "maxReplicas": packing.pods,
        "rayStartParams": start_params,
        "template": {
            "metadata": {"labels": _labels(name, "ray-worker")},
            "spec": _pod_spec(
                cluster,
                [_ray_container(spec, "worker", worker_res, raylet_ok)],
                terminationGracePeriodSeconds=cluster.drain_seconds + 2 * DRAIN_MARGIN_S,
                **worker_extra,
            ),
        },
    }
    auth: dict[str, Any] = {"mode": "token"}
    if cluster.ray_token_secret:
        auth["secretName"] = cluster.ray_token_secret
    return {
        "rayVersion": metadata.version("ray"),
        "authOptions": auth,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 300,
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}},
            "securityContext": _container_security(),
        },
        "headGroupSpec": head,
        "workerGroupSpecs": [workers],
    }


def ray_job(spec: JobSpec, name: str, entrypoint: str) -> dict[str, Any]:
    """The RayJob: creates the cluster, submits ``raptor run`` (or ``raptor sweep``), deletes the cluster after a TTL."""
    cluster = spec.cluster
    submitter = {
        "name": "submitter",
        "image": cluster.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": _container_security(),
    }
    job: dict[str, Any] = {"entrypoint": entrypoint, "submissionMode": "K8sJobMode"}
    if spec.runtime_env:
        job["runtimeEnvYAML"] = yaml.safe_dump(spec.runtime_env, sort_keys=True)
    job |= {
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": cluster.ttl_seconds_after_finished,
        "backoffLimit": cluster.backoff_limit,
    }
    if cluster.active_deadline_seconds is not None:
        job["activeDeadlineSeconds"] = cluster.active_deadline_seconds
    job["submitterPodTemplate"] = {
        "metadata": {"labels": _labels(name, "submitter")},
        "spec": _pod_spec(cluster, [submitter], restartPolicy="Never", **_head_placement(cluster)),
    }
    job["rayClusterSpec"] = ray_cluster_spec(spec, name)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": _labels(name, "job")},
        "spec": job,
    }


def network_policy(spec: JobSpec, name: str) -> dict[str, Any]:
    """Only this job's pods (head, workers, submitter) and the KubeRay operator reach the head."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-head", "namespace": spec.cluster.namespace, "labels": _labels(name, "network-policy")},
        "spec": {
            "podSelector": {"matchLabels": _labels(name, "ray-head")},
            "policyTypes": ["Ingress"],
            "ingress": [
                # the job's own pods: GCS, dashboard and every raylet/object-manager/worker port
                {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": name}}}]},
                # the operator polls the dashboard for job status
                {
                    "from": [
                        {
                            "namespaceSelector": {},
                            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": HEAD_PORTS["dashboard"]}],
                },
            ],
        },
    }


def namespace(cluster: ClusterSpec) -> dict[str, Any]:
    # baseline is enforced; restricted is audited (KubeRay injects containers we do not template)
    psa = {f"pod-security.kubernetes.io/{mode}": level for mode, level in (("enforce", "baseline"), ("warn", "restricted"), ("audit", "restricted"))}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cluster.namespace, "labels": psa}}


def service_account(cluster: ClusterSpec) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": cluster.service_account, "namespace": cluster.namespace, "labels": {"app.kubernetes.io/name": "raptor"}}
    if cluster.service_account_annotations:
        meta["annotations"] = dict(cluster.service_account_annotations)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


def render(spec_ref: str, overlay: str = "multinode", overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every object for one overlay of the spec at ``spec_ref``: base objects first, then the job's."""
    if overlay not in OVERLAYS:
        raise RenderError(f"unknown overlay {overlay!r} (use one of {', '.join(OVERLAYS)})")
    applied = [*OVERLAYS[overlay], *overrides]
    spec = load_spec(spec_ref, applied)
    if leaked := secrets_in(spec.runtime_env, "runtime_env"):
        raise RenderError(f"{leaked[0]}: a credential would be written into the manifest in plain text; give it to "
                          "the pods through a Secret (cluster.wandb_secret, cluster.s3_secret) instead")
    name = job_name(spec, overlay)
    return [
        namespace(spec.cluster),
        service_account(spec.cluster),
        network_policy(spec, name),
        ray_job(spec, name, entrypoint(spec_ref, applied, command="run" if spec.sweep is None else "sweep")),
    ]


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (runtimeEnvYAML), so the manifests read like hand-written ones."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def dump(objects: Sequence[dict[str, Any]], header: str = "") -> str:
    """A YAML stream of ``objects`` (``kubectl apply -f -`` reads it)."""
    docs = [yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=120) for o in objects]
    return header + "---\n".join(docs)


def write_tree(objects: Sequence[dict[str, Any]], out: str | Path, overlay: str, spec_ref: str) -> list[Path]:
    """Write a kustomize tree: ``base/`` (namespace, ServiceAccount) and ``overlays/<overlay>/`` (the job)."""
    out = Path(out)
    folders = (
        (out / "base", [o for o in objects if o["kind"] in BASE_KINDS], [], spec_ref),
        (out / "overlays" / overlay, [o for o in objects if o["kind"] not in BASE_KINDS], ["../../base"], f"{spec_ref} --overlay {overlay}"),
    )
    written = []
    for folder, objs, parents, source in folders:
        header = f"# Generated by `raptor k8s render` from {source}; edit the spec and re-render, not this file.\n"
        files = {f"{o['kind'].lower()}.yaml": o for o in objs}
        files["kustomization.yaml"] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [*parents, *files]}
        folder.mkdir(parents=True, exist_ok=True)
        for filename, obj in files.items():
            (folder / filename).write_text(dump([obj], header))
            written.append(folder / filename)
    return written
