"""Inference benchmark of an exported student against its teacher: images/s and peak memory, eager
and compiled, at the same batch and resolution.

The FLOPs per image are equal (k blocks applied L times); what differs is memory (k blocks' weights
instead of L) and whatever speed follows from it, so those are measured. The teacher is rebuilt
from the export's manifest (timm name and architecture) with random weights: speed and memory do
not depend on the weights' values, so no teacher file is needed. Each measurement runs in a fresh
process, so its peak memory is its own: on CUDA ``torch.cuda.max_memory_allocated``, on the CPU the
rise of the process's peak resident memory (reset first) over what it held before the model was
loaded: the weights, the activations and, compiled, the compiler's own.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from typing import Any

import torch

from raptor.errors import UserError
from raptor.models import RaptorViT, Teacher, load_student
from raptor.models.saving import read_manifest

log = logging.getLogger(__name__)

MODES = ("eager", "compiled")
BATCH, ITERS, WARMUP = 32, 10, 3  # warm-up forwards include the compilation


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> None:
    """Make the resident peak start from now (Linux: ``5`` to /proc/self/clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def teacher_of(manifest: dict[str, Any], size: int) -> Teacher:
    """A teacher of the export's architecture (random weights) for ``size`` px images."""
    info = manifest.get("teacher") or {}
    if not info.get("name"):
        raise UserError("the export's manifest names no teacher architecture (teacher.name): nothing to compare with")
    return Teacher.from_timm(info["name"], img_size=size, **(info.get("model_kwargs") or {}))


def measure(url: str, which: str, mode: str, *, batch: int, device: str, iters: int, warmup: int,
            size: int | None = None) -> dict[str, Any]:
    """One row: ``which`` (student | teacher) of the export at ``url``, ``mode`` (eager | compiled). The
    teacher's row reads only the export's manifest, so the student's weights are not in its memory."""
    dev = torch.device(device)
    _reset_peak_rss()
    before = _status_mib("VmRSS")
    manifest = read_manifest(url)
    size = size or manifest["student"]["layout"]["img_size"]
    if which == "teacher":
        model, forward = (t := teacher_of(manifest, size)), t.forward
    else:
        model = load_student(url)[0]
        if not isinstance(model, RaptorViT):
            raise UserError(f"{url}: a block-only student; benchmark a `raptor export` output")
        if size != model.geometry.img_size:
            model = model.at_resolution(size)
        forward = model.features
    params = sum(p.numel() for p in model.parameters())
    model.to(dev).eval()
    if mode == "compiled":
        forward = torch.compile(forward)
    images = torch.randn(batch, 3, size, size, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            forward(images)
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            forward(images)
        sync()
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _status_mib("VmHWM") - before
    return {"model": which, "mode": mode, "batch": batch, "size": size, "device": device,
            "params": params, "images_per_s": batch * iters / seconds, "peak_mib": round(peak, 1),
            "memory": "cuda max allocated" if dev.type == "cuda" else "peak RSS rise"}


def bench_model(url: str, *, batch: int = BATCH, device: str = "cpu", iters: int = ITERS, warmup: int = WARMUP,
                size: int | None = None, modes: tuple[str, ...] = MODES) -> list[dict[str, Any]]:
    """Student and teacher, each mode, each in its own process -> rows, then the student/teacher ratios."""
    rows = []
    for mode in modes:
        for which in ("student", "teacher"):
            args = json.dumps({"url": url, "which": which, "mode": mode, "batch": batch, "device": device,
                               "iters": iters, "warmup": warmup, "size": size})
            out = subprocess.run([sys.executable, "-m", "raptor.export.bench", args], capture_output=True, text=True)
            if out.returncode:
                last = (out.stderr.strip().splitlines() or ["no output"])[-1]
                raise UserError(f"the benchmark of the {which} ({mode}) failed: {last}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            log.info("bench: %s %s %.1f images/s, peak %.0f MiB", which, mode, rows[-1]["images_per_s"], rows[-1]["peak_mib"])
    for mode in modes:
        s, t = (next(r for r in rows if r["model"] == m and r["mode"] == mode) for m in ("student", "teacher"))
        s["speed_vs_teacher"] = s["images_per_s"] / t["images_per_s"]
        s["memory_vs_teacher"] = s["peak_mib"] / t["peak_mib"] if t["peak_mib"] > 0 else None
    return rows


if __name__ == "__main__":  # one measurement in a fresh process: its peak memory is its own
    kwargs = json.loads(sys.argv[1])
    print(json.dumps(measure(kwargs.pop("url"), kwargs.pop("which"), kwargs.pop("mode"), **kwargs)))
