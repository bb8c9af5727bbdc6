"""The device check script (scripts/bench_gpu.py) stays runnable: tiny sizes on CPU, every section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE, LARGE, GIANT = (f"vit_{s}_patch14_reg4_dinov2" for s in ("base", "large", "giant"))


def run(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--smoke", "--install", "no", *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_smoke_run_reports_every_measurement():
    """Catches a section that crashes or goes missing (the GPU run would lose it), a step without
    MFU or memory plan, a compiled step that recompiles, a decode path (CPU workers or batched
    on the device) that fails, or a runner row without both rates and their ratio (the runner
    section runs Ray Train + DeepSpeed for real, on CPU), an inference row without the student and the teacher."""
    rows = run("--backend", "aot_eager")
    assert [r["bench"] for r in rows] == ["env", "matmul", "student_step", "student_step", "decode", "decode",
                                          "student_step", "student_step", "teacher", "teacher", "teacher",
                                          "inference", "inference", "runner", "done"]
    steps = [r for r in rows if r["bench"] == "student_step"]
    assert [(r["teacher"], r["mode"]) for r in steps] == [(BASE, "eager"), (BASE, "compiled"), (LARGE, "blocks"),
                                                          (GIANT, "blocks")]
    for r in steps:
        assert r["samples_per_s"] > 0 and r["mfu"] > 0 and r["plan_gib"] >= 0 and r["gflops_per_sample"] > 0
        assert r.get("recompiles", 0) == 0
    assert {r["decode"] for r in rows if r["bench"] == "decode"} == {"cpu", "gpu"}
    decode = {r["decode"]: r for r in rows if r["bench"] == "decode"}
    assert decode["cpu"]["samples_per_s"] > 0 and decode["cpu"]["bare_samples_per_s"] > 0, decode
    assert decode["gpu"]["samples_per_s"] > 0, decode  # batched decode_jpeg on the check's device (the CPU here)
    assert [r["teacher"] for r in rows if r["bench"] == "teacher"] == [BASE, LARGE, GIANT]
    inference = [r for r in rows if r["bench"] == "inference"]
    assert [r["mode"] for r in inference] == ["eager", "compiled"]
    for r in inference:  # the exported student against its teacher, both measured
        assert r["student_img_per_s"] > 0 and r["teacher_img_per_s"] > 0 and r["student_params_m"] < r["teacher_params_m"]
    (runner,) = [r for r in rows if r["bench"] == "runner"]
    assert runner["workers"] == 1 and runner["bare_samples_per_s"] > 0 and runner["runner_samples_per_s"] > 0
    assert runner["ratio"] == pytest.approx(runner["runner_per_worker"] / runner["bare_samples_per_s"], rel=1e-2)


def test_time_budget_skips_the_rest_but_still_reports():
    """Catches a budget that aborts the run instead of skipping (the < 8 minute device check must
    always end with its summary lines)."""
    rows = run("--budget-s", "0", "--skip", "decode")
    assert [r["bench"] for r in rows[:2]] == ["env", "matmul"]
    assert all("skipped" in r for r in rows[2:-2]) and len(rows) == 2 + 2 + 2 + 3 + 1 + 2
    assert [r["bench"] for r in rows[-2:]] == ["runner", "done"]


def test_install_step_fixes_deepspeed_arch_list(monkeypatch):
    """Catches the H100 default TORCH_CUDA_ARCH_LIST=9.0a reaching DeepSpeed's op builder, which
    rejects it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_gpu

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    bench_gpu.ensure_installed("no")
    assert bench_gpu.os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
