"""The report renders: real PNGs, JSON valid against the documented schema, Markdown/HTML; `raptor analyze` on a run folder."""

from __future__ import annotations

import io
import json

import jsonschema
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from raptor import storage
from raptor.analysis.analyze import analyze_models
from raptor.analysis.report import build_report, write_report
from raptor.analysis.schema import REPORT_SCHEMA
from raptor.cli import main
from raptor.models import Raptor, save_student
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
    report = storage.read_json(storage.join(url, "report.json"))
    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)
    jsonschema.validate(report, REPORT_SCHEMA)
    assert storage.read_json(storage.join(url, "report.schema.json")) == json.loads(json.dumps(REPORT_SCHEMA))
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
    bad = {**written, "teacher": {"depth": 0, "width": 32}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, REPORT_SCHEMA)


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
    storage.write_bytes(storage.join(root, "spec.yaml"), yaml.safe_dump(spec).encode())
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).random((6, 6)))
    storage.write_bytes(storage.join(root, "discovery", "distances.npy"), buf.getvalue())
    storage.write_json(storage.join(root, "discovery", "segmentation.json"), {"boundaries": [3, 5], "metric": "cosine", "k": 3})
    save_student(student, storage.join(root, "stage2", "student.safetensors"))
    storage.write_json(storage.join(root, "probe", "results.json"), {"teacher": {"top1": 0.8, "top5": 0.95}, "student": {"top1": 0.76, "top5": 0.9}})


def test_raptor_analyze_on_s3_run(models, s3_bucket, capsys) -> None:
    teacher, student = models
    root = f"{s3_bucket}/runs/analyze-test"
    _write_run(root, teacher, student)
    assert main(["analyze", root, "--samples", "16", "--layer-swap"]) == 0
    out = capsys.readouterr().out
    assert f"{root}/report/index.md" in out
    report = _check_report_folder(f"{root}/report")
    assert report["probe"]["source"] == "probe stage" and report["probe"]["student_share"] == pytest.approx(0.95)
    assert report["run"]["student_stage"] == "stage2" and report["discovery"]["boundaries"] == [3, 5]
    swap = report["studies"]["layer_swap"]
    assert swap["within_across"]["within_change"] == pytest.approx(0.0) and {"layer_swap"} <= set(report["plots"])


def test_analyze_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["analyze", str(tmp_path / "nothing")]) == 2
    assert "is not a raptor run (no spec.yaml)" in capsys.readouterr().err
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
