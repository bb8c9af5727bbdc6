"""cluster/: the image (what can be checked without a container engine) and the Ray cluster-launcher config."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import yaml

from raptor.service.spec import ClusterSpec, load_spec
from raptor.service.deploy.k8s import PROJECT_DIR, RAY_GID, RAY_UID

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
LAUNCHER = ROOT / "cluster" / "aws-gpu.yaml"
PINS = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(i.upper(), a.strip()) for i, a in (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())]


def build_args(text: str) -> dict[str, str]:
    """ARG defaults (the last default given wins, as in a build without --build-arg)."""
    out = {}
    for ins, arg in instructions(text):
        if ins == "ARG" and "=" in arg:
            name, value = arg.split("=", 1)
            out[name] = value.strip('"')
    return out


def secret_assignments(text: str) -> list[str]:
    """Literal credentials: a secret-like name given a value, or strings shaped like AWS or wandb keys."""
    named = re.findall(r"\b\w*(?:KEY|SECRET|TOKEN|PASSWORD)\w*\s*[=:]\s*[\"']?[^\s\"'$]{8,}", text, re.I)
    shaped = re.findall(r"\bAKIA[0-9A-Z]{16}\b|\b[0-9a-f]{40}\b", text)
    return named + shaped


# ---- the image -----------------------------------------------------------------------------------


def test_image_versions_agree_with_constraints():
    args = build_args(DOCKERFILE.read_text())
    assert args["TORCH_VERSION"] == PINS["torch"]
    assert args["RAY_VERSION"] == PINS["ray"]
    assert args["DEEPSPEED_VERSION"] == PINS["deepspeed"]
    base = args["BASE_IMAGE"]
    assert base.startswith("pytorch/pytorch:${TORCH_VERSION}-cuda") and base.endswith("-devel"), base


def test_image_prebuilds_fused_adam_for_a100_and_h100():
    text = DOCKERFILE.read_text()
    assert set(build_args(text)["TORCH_CUDA_ARCH_LIST"].split(";")) >= {"8.0", "9.0"}
    runs = [a for i, a in instructions(text) if i == "RUN"]
    (ds,) = [r for r in runs if "DS_BUILD_FUSED_ADAM=1" in r]
    assert 'TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}"' in ds and "deepspeed==${DEEPSPEED_VERSION}" in ds
    assert "installed_ops" in ds and "fused_adam" in ds  # the build fails if the op did not compile


def test_image_installs_the_project_with_the_constraints():
    """Catches an image without the runner (the train extra), without ONNX export (the export extra), or with
    versions other than the tested ones."""
    text = DOCKERFILE.read_text()
    runs = [a for i, a in instructions(text) if i == "RUN"]
    assert any('pip install -c constraints.txt ".[train,export]"' in r for r in runs)
    # a build argument that changes a version rewrites its pin, so pip never sees two pins
    (rewrite,) = [r for r in runs if "sed -i" in r]
    for pkg, arg in (("torch", "TORCH_VERSION"), ("ray", "RAY_VERSION"), ("deepspeed", "DEEPSPEED_VERSION")):
        assert f"s/^{pkg}==.*/{pkg}==${{{arg}}}/" in rewrite
    ignore = (ROOT / "cluster" / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[[line.startswith("#") for line in ignore].index(False)] == "*", "the context starts empty"
    for ins, arg in instructions(text):
        if ins == "COPY":
            for src in [s for s in shlex.split(arg) if not s.startswith("--")][:-1]:
                assert (ROOT / src).exists(), src
                assert f"!{src}" in ignore, f"{src} is copied but not let through Dockerfile.dockerignore"


def test_image_runs_as_the_non_root_user_the_manifests_expect():
    steps = instructions(DOCKERFILE.read_text())
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] == f"{RAY_UID}:{RAY_GID}"
    assert any(i == "RUN" and f"--uid {RAY_UID} --gid {RAY_GID}" in a for i, a in steps)
    env = " ".join(a for i, a in steps if i == "ENV")
    assert f"PROJECT_DIR={PROJECT_DIR}" in env
    assert ("WORKDIR", "${PROJECT_DIR}") in steps


def test_image_command_is_a_console_script_of_the_project():
    steps = instructions(DOCKERFILE.read_text())
    assert not [a for i, a in steps if i == "ENTRYPOINT"], "KubeRay and the launcher supply their own commands"
    (cmd,) = [json.loads(a) for i, a in steps if i == "CMD"]
    target = PYPROJECT["project"]["scripts"][cmd[0]]
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func))
    assert any(i == "RUN" and f"{cmd[0]} --help" in a for i, a in steps)  # the build runs it once


def test_image_bakes_in_no_secrets():
    text = DOCKERFILE.read_text()
    assert secret_assignments(text) == []
    for ins, arg in instructions(text):
        if ins in ("ARG", "ENV"):
            assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", arg.split("=")[0], re.I), arg
    ignore = (ROOT / "cluster" / "Dockerfile.dockerignore").read_text()
    assert "!.env" not in ignore and "!.venv" not in ignore


def test_secret_check_catches_literal_credentials():
    assert secret_assignments("ENV WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567")
    assert secret_assignments("ARG AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG")
    assert secret_assignments("ENV AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE")
    assert secret_assignments("ARG TORCH_CUDA_ARCH_LIST=8.0") == []


def test_one_image_tag_everywhere():
    version = PYPROJECT["project"]["version"]
    image = ClusterSpec().image
    assert image.endswith(f":{version}")
    assert load_spec(str(ROOT / "jobs" / "distill_k3.yaml")).cluster.image == image
    assert f"-t {image} ." in DOCKERFILE.read_text()
    assert yaml.safe_load(LAUNCHER.read_text())["docker"]["image"] == image


# ---- the Ray cluster launcher ---------------------------------------------------------------------


def _ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    return json.loads((Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json").read_text())


def test_launcher_config_validates_against_rays_schema():
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.Draft7Validator(_ray_schema()).validate(config)
    bad = dict(config, max_worker=4)
    assert not jsonschema.Draft7Validator(_ray_schema()).is_valid(bad)


def test_launcher_config_passes_ray_up_preparation():
    """What `ray up` does before it calls AWS: fill in the provider defaults and validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(LAUNCHER.read_text()))
    validate_config(config)
    assert config["head_node_type"] == "head"


def test_launcher_config_fits_the_distill_job():
    config = yaml.safe_load(LAUNCHER.read_text())
    spec = load_spec(str(ROOT / "jobs" / "distill_k3.yaml"))
    gpu_nodes = spec.scaling.num_workers * spec.scaling.gpus_per_worker / spec.cluster.gpus_per_node
    assert config["available_node_types"]["gpu_worker"]["max_workers"] >= gpu_nodes
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"] == "p5.48xlarge"  # 8 x H100
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--dashboard-host=0.0.0.0" in head_start
    options = " ".join(config["docker"]["run_options"])
    assert "NCCL_SOCKET_IFNAME" in options and "FI_PROVIDER=efa" in options
    assert config["file_mounts"] == {f"{PROJECT_DIR}/jobs": "./jobs"}


def test_launcher_config_holds_no_secrets():
    assert secret_assignments(LAUNCHER.read_text()) == []
