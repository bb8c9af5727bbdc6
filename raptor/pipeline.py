"""``raptor run``: the whole distillation as stages with artifacts under the spec's storage URL.

    data       (generate shards when ``data.generate`` is set and they are missing)
    teacher    teacher/metrics.json            teacher.safetensors trained here (``teacher.train``) unless a checkpoint is given
    discovery  discovery/segmentation.json     layer distances on the val images, max-cut boundaries, heatmap
    stage1     stage1/manifest.json            all k blocks on their segments (Ray Train + DeepSpeed)
    stage2     stage2/manifest.json            the chained student, full rollout (Ray Train + DeepSpeed)
    probe      probe/results.json              linear probes on frozen features, teacher vs student
    report     report/index.md                 raptor.analysis: heatmap + boundaries, per-layer fidelity,
                                               probe accuracies side by side, dynamics

A stage whose artifact exists is skipped (each artifact is written last, after everything it
summarises), so re-running a finished job does nothing and a crashed job continues where it
stopped; inside stage 1 and 2, Ray Train resumes from the newest checkpoint. The spec is saved as
``spec.yaml`` beside the artifacts.

Single-process stages (teacher training, discovery, probes) run in the driver on CPU with one
worker's share of threads (``scaling.cpus_per_worker``: oversubscribed BLAS threads are many times
slower on a busy machine), or, with ``scaling.use_gpu``, as a Ray task on one GPU worker, so a
driver on a CPU-only head node still has the GPUs do the work.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import braceexpand
import numpy as np
import torch

from raptor import data, storage
from raptor.config import JobSpec
from raptor.data.shards import dataset_folder

log = logging.getLogger(__name__)

SPEC_FILE = "spec.yaml"


@dataclass(frozen=True)
class Stage:
    """A named step with the one file whose presence means it is done."""

    name: str
    artifact: str  # relative to storage.url; "" = not under the run (checked by _DONE instead)
    fn: Callable[["Run"], None]


class Run:
    """One job's artifact tree; every stage reads its inputs from here, so stages resume alone."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.root = spec.storage.url

    def url(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def teacher_url(self) -> str:
        return self.spec.teacher.checkpoint or self.url("teacher", "teacher.safetensors")

    def boundaries(self) -> list[int]:
        return list(storage.read_json(self.url("discovery", "segmentation.json"))["boundaries"])


def single_process(run: Run, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in the driver (CPU) or as a Ray task on one GPU worker (``use_gpu``)."""
    sc = run.spec.scaling
    if not sc.use_gpu:
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(sc.cpus_per_worker)))
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    import ray

    task = ray.remote(num_cpus=sc.cpus_per_worker, num_gpus=1)(fn)
    return ray.get(task.remote(*args, **kwargs))


# ---------------------------------------------------------------- stages
def _data_folders(spec: JobSpec) -> list[tuple[str, str, int, int]]:
    """(folder, prefix, samples, seed) of each dataset ``data.generate`` writes."""
    g = spec.data.generate
    assert g is not None
    out = [(dataset_folder(spec.data.train), "train", g.train_samples, g.seed)]
    if spec.data.val:
        out.append((dataset_folder(spec.data.val), "val", g.val_samples, g.seed + 1))
    return out


def _num_shards(spec: JobSpec, url: str, prefix: str) -> int:
    """As many shards as a brace pattern names; for a folder, enough to feed every rank's loader
    workers (the loader deals whole shards); the val split is read by one process."""
    if "{" in url:
        return len(list(braceexpand.braceexpand(url)))
    return spec.scaling.num_workers * max(1, spec.data.num_workers) if prefix == "train" else 1


def stage_data(run: Run) -> None:
    g = run.spec.data.generate
    if g is None:
        return
    for (folder, prefix, n, seed), url in zip(_data_folders(run.spec), [run.spec.data.train, run.spec.data.val]):
        if storage.exists(storage.join(folder, "_info.json")):
            continue
        per_shard = math.ceil(n / _num_shards(run.spec, url or folder, prefix))
        data.write_shards(data.synthetic_source(n, g.num_classes, g.image_size, seed), folder,
                          prefix=prefix, max_samples=per_shard)


def _data_done(run: Run) -> bool:
    if run.spec.data.generate is None:
        return True
    return all(storage.exists(storage.join(f, "_info.json")) for f, *_ in _data_folders(run.spec))


def stage_teacher(run: Run) -> None:
    from raptor.train.teacher_train import train_teacher

    metrics = single_process(run, train_teacher, run.spec, run.teacher_url)
    storage.write_json(run.url("teacher", "metrics.json"), metrics)


def _teacher_done(run: Run) -> bool:
    if run.spec.teacher.checkpoint is not None:
        return True  # a given checkpoint is the artifact; nothing to train
    return storage.exists(run.url("teacher", "metrics.json"))  # written after the teacher file


def discover(spec: JobSpec, teacher_url: str, out: str) -> dict[str, Any]:
    """Distances over ``discovery.num_images`` val images, then the max-cut boundaries (or the fixed ones)."""
    from raptor.discovery import bisection, layer_distances, plot_distances, segment, swap_distances
    from raptor.build import load_teacher, spec_loader
    from raptor.train.stage import single_device

    d = spec.discovery
    device = single_device(spec)
    teacher = load_teacher(spec, teacher_url).to(device)
    amp = device.type == "cuda"

    def images():
        seen = 0
        for x, _ in spec_loader(spec, spec.data.val or spec.data.train, train=False):
            yield x[: d.num_images - seen].to(device)
            seen += len(x)
            if seen >= d.num_images:
                return

    if d.metric == "swap":
        dist = swap_distances(teacher, images(), amp=amp)
    else:
        dist = layer_distances((teacher.trajectory(x, amp=amp) for x in images()), d.metric, teacher.layout)
    dist = np.asarray(dist.cpu(), dtype=np.float64)
    if d.boundaries is not None:
        result: dict[str, Any] = {"boundaries": list(d.boundaries), "method": "fixed", "k": d.k}
    else:
        seg = segment(dist, d.k) if d.method == "dp" else bisection(dist, d.k)
        result = {"boundaries": list(seg.boundaries), "method": seg.method, "k": seg.k,
                  "objective": seg.objective, "cut": seg.cut}
    result.update(metric=d.metric, num_images=d.num_images, depth=int(dist.shape[0]))
    buf = io.BytesIO()
    np.save(buf, dist)
    storage.write_bytes(storage.join(out, "distances.npy"), buf.getvalue())
    plot_distances(dist, result["boundaries"], storage.join(out, "distances.png"),
                   title=f"{d.metric} distances, k={d.k}: {result['boundaries']}")
    storage.write_json(storage.join(out, "segmentation.json"), result)
    return result


def stage_discovery(run: Run) -> None:
    result = single_process(run, discover, run.spec, run.teacher_url, run.url("discovery"))
    log.info("discovery: boundaries %s (%s on %s distances)", result["boundaries"], result["method"], result["metric"])


def _distill(stage: str) -> Callable[[Run], None]:
    def fn(run: Run) -> None:
        from raptor.train.trainer import run_stage

        init = run.url("stage1", "student.safetensors") if stage == "stage2" else None
        metrics = run_stage(run.spec, stage, teacher_url=run.teacher_url, boundaries=run.boundaries(),
                            out_url=run.url(stage), init_url=init)
        log.info("%s done: loss %.4g, val update_r2 mean %.3f", stage, metrics.get("loss", float("nan")),
                 metrics.get("val/all/update_r2/mean", float("nan")))

    return fn


def stage_probe(run: Run) -> None:
    from raptor.train.probe import probe

    result = single_process(run, probe, run.spec, run.teacher_url, run.url("stage2", "student.safetensors"), run.url("probe"))
    log.info("probe: teacher top-1 %.3f, student top-1 %.3f", result["teacher"]["top1"], result["student"]["top1"])


def stage_report(run: Run) -> None:
    from raptor.analysis.run import analyze_run

    device = "cuda" if run.spec.scaling.use_gpu else "cpu"
    written = single_process(run, analyze_run, run.root, run.url("report"), device=device)
    log.info("report: %s", written["markdown"])


STAGES: tuple[Stage, ...] = (
    Stage("data", "", stage_data),
    Stage("teacher", "", stage_teacher),
    Stage("discovery", "discovery/segmentation.json", stage_discovery),
    Stage("stage1", "stage1/manifest.json", _distill("stage1")),
    Stage("stage2", "stage2/manifest.json", _distill("stage2")),
    Stage("probe", "probe/results.json", stage_probe),
    Stage("report", "report/index.md", stage_report),
)
_DONE = {"data": _data_done, "teacher": _teacher_done}


def done(run: Run, stage: Stage) -> bool:
    check = _DONE.get(stage.name)
    return check(run) if check else storage.exists(run.url(stage.artifact))


def save_spec(run: Run) -> None:
    """``spec.yaml`` beside the artifacts. A changed spec replaces it, and the old one is kept as
    ``spec.<UTC time>.yaml``: the finished stages were made with it."""
    url, text = run.url(SPEC_FILE), run.spec.to_yaml()
    if storage.exists(url):
        old = storage.read_bytes(url)
        if old.decode() == text:
            return
        kept = run.url(f"spec.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.yaml")
        storage.write_bytes(kept, old)
        log.warning("%s differs from the spec of this run (the old one is kept as %s); finished stages are kept "
                    "(delete their artifacts to redo them)", url, kept)
    storage.write_bytes(url, text.encode())


def run_pipeline(spec: JobSpec) -> dict[str, float]:
    """Run every stage not yet done; returns seconds per stage run (skipped stages are absent)."""
    from raptor.train.stage import absolute_paths

    run = Run(absolute_paths(spec))
    storage.makedirs(run.root)
    save_spec(run)
    timings: dict[str, float] = {}
    for stage in STAGES:
        if done(run, stage):
            log.info("stage %s: done, skipped", stage.name)
            continue
        log.info("stage %s: running", stage.name)
        t0 = time.perf_counter()
        stage.fn(run)
        timings[stage.name] = time.perf_counter() - t0
        log.info("stage %s: finished in %.1fs", stage.name, timings[stage.name])
    return timings
