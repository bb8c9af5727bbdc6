"""The report renders: real PNGs, JSON valid against the schema generated from its model, Markdown/HTML; `raptor analyze` on a run folder."""

from __future__ import annotations

import copy
import io
import json

import jsonschema
import numpy as np
import pydantic
import pytest
import torch
from PIL import Image

from raptor import storage
from raptor.analysis.analyze import analyze_models
from raptor.analysis.report import build_report, write_report
from raptor.analysis.schema import REPORT_SCHEMA, Report, validate_report
from raptor.cli import main
from raptor.models import Raptor, save_student
from raptor.service.engine.pipeline import plan, save_spec, write_index
from raptor.service.spec import parse_spec
from tests import planted

PATTERN = (3, 2, 1)
IMG = 42  # 3 x 3 patches of 14 px


@pytest.fixture(scope="module")
def models() -> tuple:
    teacher = planted.build_teacher(PATTERN, width=32, heads=2, img_size=IMG)
    gen = torch.Generator().manual_seed(0)
    teacher.set_head(torch.randn(4, 64, generator=gen), torch.zeros(4))
    student = Raptor.from_teacher(teacher, planted.boundaries_of(PATTERN), init="teacher", seed=0)
    return teacher, student


def _batches(n: int = 24, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images = planted.images(n, img_size=IMG, seed=3)
    labels = torch.arange(n) % 4
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]


def _check_report_folder(url: str) -> dict:
    """The written report validates against the schema written beside it, which is the model's generated schema."""
    report = storage.read_json(storage.join(url, "report.json"))
    schema = storage.read_json(storage.join(url, "report.schema.json"))
    assert schema == json.loads(json.dumps(Report.model_json_schema())) and schema["$schema"].endswith("2020-12/schema")
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(report)
    validate_report(report)
    assert {"gamma", "speed", "patch_motion", "basins"} <= set(report["plots"])
    for rel in report["plots"].values():
        data = storage.read_bytes(storage.join(url, rel))
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        img = Image.open(io.BytesIO(data))
        img.verify()
        assert img.size[0] > 200 and img.size[1] > 200
    md = storage.read_bytes(storage.join(url, "index.md")).decode()
    html = storage.read_bytes(storage.join(url, "index.html")).decode()
    for rel in report["plots"].values():
        assert f"]({rel})" in md and f"src='{rel}'" in html
    assert "## Basin robustness" in md and "<table>" in html
    return report


def test_analysis_report_renders_and_validates(models, tmp_path) -> None:
    teacher, student = models
    analysis = analyze_models(teacher, student, _batches(), max_samples=20, basin_scales=(0.0, 0.3))
    assert analysis["num_samples"] == 20 and analysis["boundaries"] == [3, 5]
    dyn_t = analysis["dynamics"]["teacher"]
    assert dyn_t["gamma"]["cls"][-1] == pytest.approx(1.0)
    zero_noise = [r for r in dyn_t["basin"] if r["scale"] == 0.0]
    assert all(r["cos_all"] == pytest.approx(1.0, abs=1e-5) and r["prediction_held"] == 1.0 for r in zero_noise)
    assert len(analysis["fidelity"]["update_r2"]) == 6 and analysis["probe"]["source"] == "teacher head"
    distances = np.random.default_rng(0).random((6, 6))
    report = build_report(analysis, run_name="unit", discovery={"metric": "cosine", "distances": distances.tolist(), "boundaries": [3, 5]})
    write_report(str(tmp_path / "report"), report)
    written = _check_report_folder(str(tmp_path / "report"))
    assert {"fidelity", "probe", "distances"} <= set(written["plots"])


@pytest.fixture(scope="module")
def real_report(models, tmp_path_factory) -> dict:
    """A report written by the real analysis (teacher, student, discovery), read back from report.json."""
    teacher, student = models
    analysis = analyze_models(teacher, student, _batches(16), max_samples=16, basin_layers=[0, 3], basin_scales=(0.1,))
    url = str(tmp_path_factory.mktemp("real") / "report")
    distances = np.random.default_rng(0).random((6, 6)).tolist()
    write_report(url, build_report(analysis, run_name="unit", discovery={"metric": "cosine", "distances": distances, "boundaries": [3, 5]}))
    return _check_report_folder(url)


DELETE = object()


def _mutated(report: dict, path: tuple, value: object) -> dict:
    bad = copy.deepcopy(report)
    node = bad
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return bad


@pytest.mark.parametrize("path, value", [
    (("fidelity",), DELETE),  # a whole section missing
    (("teacher", "width"), DELETE),  # a field missing
    (("dynamics", "teacher", "basin", 0, "cos_cls"), DELETE),  # a field missing deep inside
    (("k",), "3"),  # a string where a number belongs
    (("probe", "teacher", "top1"), "0.2"),
    (("dynamics", "student", "patch_stable_rank"), 1.5),  # a number where a curve belongs
    (("boundaries",), [0, 3]),  # out of range (layers are 1-based)
    (("plots", "gamma"), "/tmp/gamma.png"),  # a plot outside the report folder
    (("probe", "student", "top_1"), 0.5),  # an undocumented field
    (("schema_version",), 2),
])
def test_schema_and_model_reject_missing_or_mistyped_fields(real_report, tmp_path, path, value) -> None:
    """A report missing a field or holding a wrong type fails the generated JSON Schema, the model, and write_report.

    Catches a schema generated too loosely (fields optional that readers need, types not pinned,
    extra fields allowed) and a write_report that writes a malformed report.
    """
    bad = _mutated(real_report, path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(bad)
    with pytest.raises(pydantic.ValidationError, match=str(path[-1]) if isinstance(path[-1], str) else None):
        validate_report(bad)
    with pytest.raises(pydantic.ValidationError):
        write_report(str(tmp_path / "bad"), bad)
    assert not (tmp_path / "bad").exists()  # nothing written, not even a plot


@pytest.mark.parametrize("path, value, message", [
    (("probe", "student_share"), 0.5, "student_share"),  # not student top-1 / teacher top-1
    (("discovery", "distances", 2), [0.1, 0.2], "square"),
    (("fidelity", "r2"), [0.5], "one value per layer"),
])
def test_model_checks_what_the_json_schema_cannot(real_report, path, value, message) -> None:
    """Cross-field rules (the like-for-like share, a square distance matrix, one fidelity value per layer) are enforced by the model."""
    with pytest.raises(pydantic.ValidationError, match=message):
        validate_report(_mutated(real_report, path, value))


def test_finetuned_probe_is_its_own_row_and_not_in_the_share(models, tmp_path) -> None:
    """The student's head fine-tuned from the teacher's shows as its own row; the share stays student vs teacher.

    Catches a report that drops the fine-tuned row, folds it into the student row, or takes the
    paper's favourable share (fine-tuned student over a randomly initialised teacher probe).
    """
    teacher, student = models
    analysis = analyze_models(teacher, student, _batches(8), max_samples=8, basin_layers=[0], basin_scales=(0.1,))
    probe = {"source": "probe stage", "teacher": {"top1": 0.8, "top5": 0.95}, "student": {"top1": 0.7, "top5": 0.9},
             "student_finetuned": {"top1": 0.78, "top5": 0.93}, "student_share": 0.7 / 0.8}
    write_report(str(tmp_path), build_report(analysis, probe=probe))
    report = _check_report_folder(str(tmp_path))
    assert report["probe"]["student_finetuned"] == {"top1": 0.78, "top5": 0.93}
    md, html = (tmp_path / "index.md").read_text(), (tmp_path / "index.html").read_text()
    assert "| student | 0.7000 | 0.9000 | 0.8750 |" in md
    assert "| student, head fine-tuned from the teacher's | 0.7800 | 0.9300 | 0.9750 |" in md
    assert "same head init: 0.8750 (probe stage)" in md
    assert "<td>student, head fine-tuned from the teacher&#x27;s</td><td>0.7800</td>" in html
    with pytest.raises(pydantic.ValidationError, match="student_share"):
        build_report(analysis, probe={**probe, "student_share": 0.78 / 0.8})


def test_teacher_only_report(models, tmp_path) -> None:
    teacher, _ = models
    analysis = analyze_models(teacher, None, _batches(8), boundaries=[3], max_samples=8, basin_layers=[1], basin_scales=(0.1,))
    assert analysis["dynamics"]["student"] is None and analysis["fidelity"] is None
    write_report(str(tmp_path), build_report(analysis))
    report = _check_report_folder(str(tmp_path))
    assert "fidelity" not in report["plots"]


def _write_run(root: str, teacher, student) -> None:
    """A finished run's artifacts in the service's layout, written with the real exporters."""
    from raptor.data import synthetic_source, write_shards

    write_shards(synthetic_source(24, num_classes=4, size=48, seed=1, dense=True), storage.join(root, "data", "val"), prefix="val", max_samples=12)
    teacher.save(storage.join(root, "teacher", "teacher.safetensors"))
    spec = {
        "name": "analyze-test",
        "teacher": {"name": planted.NAME, "img_size": IMG, "checkpoint": storage.join(root, "teacher", "teacher.safetensors"),
                    "model_kwargs": teacher.model_kwargs},
        "data": {"train": storage.join(root, "data", "val"), "val": storage.join(root, "data", "val"), "batch_size": 8},
        "discovery": {"k": 3},
        "stage1": {"steps": 1},
        "stage2": {"steps": 1},
        "storage": {"url": root},
    }
    spec = parse_spec(spec)
    steps, layout = plan(spec)
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).random((6, 6)))
    storage.write_bytes(layout.distances, buf.getvalue())
    storage.write_json(layout.segmentation, {"boundaries": [3, 5], "metric": "cosine", "k": 3})
    save_student(student, layout.student("stage2"))
    storage.write_json(layout.probe, {"teacher": {"top1": 0.8, "top5": 0.95}, "student": {"top1": 0.76, "top5": 0.9},
                                      "student_finetuned": {"top1": 0.79, "top5": 0.92}, "student_share": 0.95})
    for step in steps:
        if step.name in ("distances", "discovery", "stage2", "probe"):
            step.status = "done"
    save_spec(spec, layout)
    write_index(spec, layout, steps)


def test_raptor_analyze_on_s3_run(models, s3_bucket, capsys) -> None:
    teacher, student = models
    root = f"{s3_bucket}/runs/analyze-test"
    _write_run(root, teacher, student)
    assert main(["analyze", root, "--samples", "16", "--layer-swap"]) == 0
    out = capsys.readouterr().out
    assert f"{root}/report/index.md" in out
    report = _check_report_folder(f"{root}/report")
    assert report["probe"]["source"] == "probe stage" and report["probe"]["student_share"] == pytest.approx(0.95)
    assert report["probe"]["student_finetuned"]["top1"] == 0.79
    assert "| student, head fine-tuned from the teacher's | 0.7900 |" in storage.read_bytes(f"{root}/report/index.md").decode()
    assert report["run"]["student_stage"] == "stage2" and report["discovery"]["boundaries"] == [3, 5]
    swap = report["studies"]["layer_swap"]
    assert swap["within_across"]["within_change"] == pytest.approx(0.0) and {"layer_swap"} <= set(report["plots"])


def test_analyze_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["analyze", str(tmp_path / "nothing")]) == 2
    assert "is not a raptor run (no run.json)" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path), "--samples", "0"]) == 2
    assert main(["analyze", str(tmp_path), "--partition", "-1"]) == 2
    assert "partition >= 0" in capsys.readouterr().err


def test_raptor_analyze_runs_the_studies(models, tmp_path) -> None:
    """The CLI wires the studies and dense probes to the run's data and recipes (tiny budget: wiring, not findings)."""
    teacher, student = models
    root = str(tmp_path / "run")
    _write_run(root, teacher, student)
    args = ["analyze", root, "--out", str(tmp_path / "out"), "--samples", "8", "--partition", "2", "--ablation",
            "--study-samples", "16", "--study-steps", "3", "--dense"]
    assert main(args) == 0
    report = _check_report_folder(str(tmp_path / "out"))
    part = report["studies"]["partition"]
    assert [r["kind"] for r in part["runs"]] == ["max-cut", "random", "random"] and part["boundaries"] == [3, 5]
    assert [r["row"] for r in report["studies"]["ablation"]][-1] == "+ fine-tuned probe"
    assert "partition" in report["plots"]
    md = (tmp_path / "out" / "index.md").read_text()
    assert "## Ablation" in md and "## Partition study" in md and "## Dense probes" in md
    dense = report["studies"]["dense"]
    assert set(dense) == {"teacher", "student"} and 0.0 <= dense["student"]["segmentation"]["miou"] <= 1.0
    assert dense["teacher"]["depth"]["rmse"] > 0
