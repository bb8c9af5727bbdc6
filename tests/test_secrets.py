"""Credentials never echoed, saved or printed: the scan helper's controls, URL passwords, `raptor submit`.

Fast (no Ray cluster, no S3): the faults suite's end-to-end search (``tests/test_faults.py``) relies
on :mod:`tests.secrets_scan`, so the helper is proved here to find what is planted and to count
what it read.
"""

from __future__ import annotations

import copy
import shlex
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from raptor.cli import build_parser, main
from raptor.service.spec import SpecError, apply_overrides, load_spec, parse_spec
from raptor.service.deploy.submit import redacted_entrypoint, submission
from tests.jobclient import RecordingClient
from tests.secrets_scan import Hit, Scan, scan

# AWS's documented example key pair: the secret holds "/" and "+", as about half of real ones do
AWS_KEY_ID, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
URLS = {  # URL with a password -> the password, which no message may echo
    f"s3://{AWS_KEY_ID}:{AWS_SECRET}@bucket/x": AWS_SECRET,
    f"s3://{AWS_KEY_ID}:plantedS3cret@bucket/x": "plantedS3cret",
    "https://user:plantedPa55@host/x": "plantedPa55",
}
URL_FIELDS = ("teacher.checkpoint", "data.train", "data.val", "storage.url", "storage.store")
TOKEN = "planted-token-5e1f9a"  # a runtime_env credential given with --set


def _raw(tmp_path: Path) -> dict[str, Any]:
    """A valid spec at test size (a given teacher: no training section needed; nothing is read)."""
    return {
        "name": "secrets",
        "teacher": {"name": "vit_small_patch14_reg4_dinov2", "img_size": 28, "checkpoint": str(tmp_path / "t.safetensors"),
                    "model_kwargs": {"embed_dim": 32, "depth": 6, "num_heads": 2}},
        "data": {"train": str(tmp_path / "data/train"), "val": str(tmp_path / "data/val")},
        "discovery": {"k": 3},
        "stage1": {"steps": 2},
        "stage2": {"steps": 2},
        "storage": {"url": str(tmp_path / "run")},
        "runtime_env": {"env_vars": {"WANDB_API_KEY": "file-wandb-key-0c4e"}},
    }


def _write(tmp_path: Path, raw: dict[str, Any], name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _with(raw: dict[str, Any], field: str, value: str) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    section, key = field.split(".")
    out[section][key] = value
    return out


def _one_line_without(text: str, *secrets: str) -> None:
    assert text.strip() and "\n" not in text.strip(), f"not one line: {text!r}"
    for secret in secrets:
        assert secret not in text, f"{secret!r} echoed: {text!r}"


# ---------------------------------------------------------------------------------------------- the scan helper
def test_scan_finds_a_planted_secret_and_counts_every_file_it_read(tmp_path):
    """Catches a scan that cannot fail: one that skips nested folders or stored objects, misses a
    value in binary data, or reports how many things it read wrongly (a floor on it would then prove nothing)."""
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "top.log").write_text("nothing here\n")
    (tmp_path / "a/b/deep.bin").write_bytes(b"\x00\xff" + b"planted-1" + b"\x00")
    (tmp_path / "a/other.json").write_text('{"k": "v"}')
    (tmp_path / "link").symlink_to(tmp_path / "a/b/deep.bin")  # read where it lies, not twice
    objects = [("bucket/run/spec.yaml", b"env: planted-2"), ("bucket/run/run.json", b"{}")]
    hits, searched = scan(["planted-1", "planted-2"], roots=[tmp_path], objects=objects)
    assert hits == [Hit(str(tmp_path / "a/b/deep.bin"), "planted-1"), Hit("bucket/run/spec.yaml", "planted-2")]
    assert searched == 3 + 2

    s = Scan(["planted-1"])
    s.search("console", "text around planted-1 and more")
    assert s.walk(tmp_path) == 3 and s.objects(objects) == 2
    assert [h.where for h in s.hits] == ["console", str(tmp_path / "a/b/deep.bin")]
    assert s.searched[0] == "console" and len(s.searched) == 6


def test_scan_finds_nothing_where_nothing_is_planted(tmp_path):
    """Catches a scan that reports hits it did not find (an empty needle is in everything), which would
    make the faults suite's zero-hits assertion unreachable or its control meaningless."""
    (tmp_path / "x.txt").write_text("AKIA but not the key; token= nothing")
    hits, searched = scan(["AKIAFAULTSDUMMY0KEY1"], roots=[tmp_path, tmp_path / "missing"], objects=[("o", b"")])
    assert hits == [] and searched == 2
    with pytest.raises(ValueError, match="non-empty"):
        Scan(["x", ""])


# ---------------------------------------------------------------------------------------------- URL passwords
@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("field", URL_FIELDS)
def test_a_url_with_a_password_is_refused_in_one_line_without_echoing_it(tmp_path, field, url):
    """Catches a URL field that accepts ``scheme://user:password@...`` (the password would be saved in
    spec.yaml and run.json, keyed and sent to wandb), a check that misses a password holding "/" (an AWS
    secret key), or an error message that echoes the password, whether from a YAML file or ``--set``."""
    password = URLS[url]
    spec_file = _write(tmp_path, _with(_raw(tmp_path), field, url), "bad.yaml")
    with pytest.raises(SpecError) as from_file:
        load_spec(str(spec_file))
    clean = str(_write(tmp_path, _raw(tmp_path)))
    with pytest.raises(SpecError) as from_set:
        load_spec(clean, [f"{field}={url}"])
    with pytest.raises(SpecError) as from_dict:
        parse_spec(apply_overrides(_raw(tmp_path), [f"{field}={url}"]))
    for e in (from_file, from_set, from_dict):
        message = str(e.value)
        _one_line_without(message, password, url)
        assert field in message
        if url.startswith("s3://") or not field.startswith("storage"):  # https is no storage scheme at all
            assert "holds a password" in message, message


@pytest.mark.parametrize("override", [
    f"data.train=[s3://{AWS_KEY_ID}:plantedS3cret@bucket/x",  # a typo: not valid YAML
    f"data.train.x=s3://{AWS_KEY_ID}:plantedS3cret@bucket/x",  # data.train is no section
    f"data.train: s3://{AWS_KEY_ID}:plantedS3cret@bucket/x",  # no "="
    f"data.train=[s3://{AWS_KEY_ID}:plantedS3cret@bucket/x]",  # a list: the wrong type, echoed with its value
])
def test_a_bad_override_holding_a_url_password_is_not_echoed(tmp_path, override):
    """Catches an error about a malformed ``--set`` that quotes the override, URL password included."""
    with pytest.raises(SpecError) as e:
        load_spec(str(_write(tmp_path, _raw(tmp_path))), [override])
    _one_line_without(str(e.value), "plantedS3cret")


def test_a_port_or_an_at_sign_in_a_path_is_no_password(tmp_path):
    """Catches a password check so broad that it refuses ordinary URLs (a port, an "@" in a path)."""
    for url in ("https://host:8080/@scope/teacher.pth", "s3://bucket/runs/a:b@c/t.pth", "http://127.0.0.1:9000/t.pth"):
        assert load_spec(str(_write(tmp_path, _raw(tmp_path))), [f"teacher.checkpoint={url}"]).teacher.checkpoint == url


@pytest.mark.parametrize("via_set", [False, True], ids=["yaml", "set"])
def test_raptor_run_refuses_a_url_password_in_one_line_and_exit_code_2(tmp_path, capsys, via_set):
    """Catches the CLI printing a traceback or the password (to the console, and from there to CI logs)
    when a spec's URL holds one."""
    url = f"s3://{AWS_KEY_ID}:{AWS_SECRET}@bucket/x"
    if via_set:
        argv = ["run", str(_write(tmp_path, _raw(tmp_path))), "--set", f"data.val={url}", "--dry-run"]
    else:
        argv = ["run", str(_write(tmp_path, _with(_raw(tmp_path), "data.val", url))), "--dry-run"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    _one_line_without(err, AWS_SECRET, url)
    assert err.startswith("raptor run: error: ") and "data.val" in err and "holds a password" in err


# ---------------------------------------------------------------------------------------------- raptor submit
SECRET_OVERRIDES = [
    f"runtime_env.env_vars.MY_TOKEN={TOKEN}",  # the key names the credential
    f"runtime_env.env_vars={{MY_TOKEN: {TOKEN}, NCCL_DEBUG: WARN}}",  # a mapping holds it
    f"runtime_env={{env_vars: {{MY_TOKEN: {TOKEN}}}, working_dir: .}}",
]


@pytest.mark.parametrize("override", SECRET_OVERRIDES)
def test_submission_and_its_printed_line_never_carry_a_runtime_env_credential(tmp_path, override):
    """Catches ``raptor submit`` putting a ``--set`` credential into the job's entrypoint (Ray stores it,
    shows it in the dashboard and ``ray job list``, and logs it) or into the line it prints, or losing
    it on the way to the job (it must still reach the job's environment, through runtime_env)."""
    spec_file = _write(tmp_path, _raw(tmp_path))
    spec = load_spec(str(spec_file), [override])
    job = submission(str(spec_file), spec, [override])
    assert TOKEN not in job["entrypoint"] and TOKEN not in redacted_entrypoint(job["entrypoint"])
    assert job["runtime_env"]["env_vars"]["MY_TOKEN"] == TOKEN  # the job still gets it, through its environment
    # the job's `raptor run` still parses the entrypoint into a valid spec, its credential redacted
    args = build_parser("run").parse_args(shlex.split(job["entrypoint"])[1:])
    assert load_spec(args.spec, args.overrides).runtime_env["env_vars"]["MY_TOKEN"] == "<redacted>"
    assert redacted_entrypoint(f"raptor run s3://{AWS_KEY_ID}:{AWS_SECRET}@b/s.yaml --set stage2.steps=3") == \
        "raptor run 's3://<redacted>@b/s.yaml' --set stage2.steps=3"


def test_raptor_submit_prints_the_entrypoint_without_the_credential(tmp_path, capsys, monkeypatch):
    """Catches the ``submitted ...`` line (or anything else `raptor submit` prints) quoting a credential
    given with ``--set``, and the job being sent it in its entrypoint."""
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", RecordingClient)
    RecordingClient.sent.clear()
    spec_file = _write(tmp_path, _raw(tmp_path))
    argv = ["submit", str(spec_file), "--set", SECRET_OVERRIDES[0], "--set", "stage2.steps=3",
            "--address", "http://127.0.0.1:8265", "--no-wait"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    for text in (out, err):
        assert TOKEN not in text and "file-wandb-key-0c4e" not in text
    assert out.startswith("submitted raysubmit_recorded to http://127.0.0.1:8265: raptor run ")
    assert "'runtime_env.env_vars.MY_TOKEN=<redacted>'" in out and "stage2.steps=3" in out
    (job,) = RecordingClient.sent
    assert TOKEN not in job["entrypoint"] and job["runtime_env"]["env_vars"]["MY_TOKEN"] == TOKEN


def test_raptor_submit_to_no_cluster_fails_in_one_line_without_the_credential(tmp_path, capsys, monkeypatch):
    """Catches a failed submission (no cluster at the address) printing a traceback, the entrypoint or the
    credential; exit code 2 and one line naming the address."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{s.getsockname()[1]}"
    spec_file = _write(tmp_path, _raw(tmp_path))
    assert main(["submit", str(spec_file), "--set", SECRET_OVERRIDES[0], "--address", address, "--no-wait"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and TOKEN not in err
    _one_line_without(err, TOKEN, "file-wandb-key-0c4e")
    assert err.startswith(f"raptor submit: error: cannot reach the Ray cluster at {address}"), err


def test_the_spec_saved_with_a_run_hides_runtime_env_credentials(tmp_path):
    """Catches spec.yaml / run.json (``public_dump``) keeping a runtime_env credential, nested or in a list."""
    raw = _raw(tmp_path)
    raw["runtime_env"] = {"env_vars": {"MY_TOKEN": TOKEN, "NCCL_DEBUG": "WARN"}, "pip": [{"index_password": TOKEN}]}
    spec = parse_spec(raw)
    assert TOKEN not in spec.to_yaml(public=True) and TOKEN not in str(spec.public_dump())
    assert spec.public_dump()["runtime_env"]["env_vars"] == {"MY_TOKEN": "<redacted>", "NCCL_DEBUG": "WARN"}
    assert TOKEN in spec.to_yaml()  # the job itself still gets it
