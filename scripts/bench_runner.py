"""Stage-2 throughput: the Ray Train + DeepSpeed runner against the bare step, and what checkpoints cost (``raptor.train.bench``).

    python scripts/bench_runner.py runs/quickstart [--steps 100] [--workers 1,2]
    python scripts/bench_runner.py --generated [--steps 40]
    python scripts/bench_runner.py --generated --quickstart --checkpoint-every 10 [--store s3://...]
    python scripts/bench_runner.py --generated --quickstart --resize 2,1 [--stop 60] [--store s3://...]

With a run folder (a run whose stage 1 has finished, e.g. runs/quickstart): that run's spec,
data, teacher and stage-1 student. With ``--generated``: generated shards, a random teacher and a
random stage-1 student (``--teacher``, ``--img-size``, ``--model-kwargs``, ``--batch``), as the device
check (scripts/bench_gpu.py) runs it on a GPU. Prints one JSON line per worker count: the bare
rate, the runner's rate per worker and their ratio. One worker measures what Ray Train + DeepSpeed
add; more workers on one machine also share its cores (CPU) with their loader processes.

With ``--checkpoint-every N``: the runner alone, checkpointing every N steps into ``--store``, once
with the uploads sync and once async; one JSON line per mode with the checkpoint's size, the median
step without and with a checkpoint, and the mean step. Without ``--store``, a local S3 server
(``moto_server``, as the tests use) is started for it. ``--quickstart``: the generated job at the
sizes of jobs/quickstart.yaml (teacher, resolution, batch, two workers).

With ``--resize N,M``: what a resize costs. The stage is stopped after its ``--stop`` checkpoint on N
workers and resumed from it on M, and started afresh on M; one JSON line with each run's wall time,
the start-up of the fresh one and of the resumed one (wall time less their steps), the checkpoint's
size and the step time. The global batch is the job's batch x N, so M workers accumulate or split it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any, Iterator

from raptor import storage
from raptor.train.job import StageJob

BASE = "vit_base_patch14_reg4_dinov2"


def run_job(run_dir: str, steps: int) -> StageJob:
    """Stage 2 of a finished run's spec (its teacher and stage-1 student), ``steps`` steps."""
    from raptor.service.spec.translate import stage_job
    from raptor.service.engine.artifacts import RunFolder
    from raptor.service.spec import load_spec

    run_folder = RunFolder.from_index(run_dir)
    spec = load_spec(run_folder.spec_file, [f"stage2.steps={steps}", f"stage2.warmup_steps={steps // 10}"])
    return stage_job(spec, "stage2", run_folder, key="bench", inputs={})


def generated_job(folder: str, *, steps: int, teacher: str = BASE, img_size: int = 224,
                  model_kwargs: dict[str, Any] | None = None, boundaries: tuple[int, ...] = (7, 10), batch: int = 64,
                  loader_workers: int = 2, use_gpu: bool = False, image_size: int = 256) -> StageJob:
    """Stage 2 on generated shards with a random teacher and stage-1 student saved under ``folder``
    (the FLOPs of pretrained weights; the data path of a real run: JPEG shards, decode, augmentation)."""
    import torch

    from raptor.data import synthetic_source, write_shards
    from raptor.models import Raptor, Teacher, save_student
    from raptor.service.spec.translate import stage_job
    from raptor.service.engine.artifacts import RunFolder
    from raptor.service.spec import parse_spec

    kw = model_kwargs or {}
    shards = 2 * max(1, loader_workers)
    samples = max(4 * batch, 256)
    write_shards(synthetic_source(samples, num_classes=10, size=image_size), f"{folder}/train", prefix="train",
                 max_samples=-(-samples // shards))
    torch.manual_seed(0)
    model = Teacher.from_timm(teacher, img_size=img_size, **kw)
    model.save(f"{folder}/teacher.safetensors")
    os.makedirs(f"{folder}/discovery", exist_ok=True)
    storage.write_json(f"{folder}/discovery/segmentation.json", {"boundaries": list(boundaries)})
    save_student(Raptor.from_teacher(model, list(boundaries), seed=0), f"{folder}/stage1/student.safetensors")
    spec = parse_spec({
        "name": "bench",
        "teacher": {"name": teacher, "img_size": img_size, "model_kwargs": kw, "checkpoint": f"{folder}/teacher.safetensors"},
        "data": {"train": f"{folder}/train", "batch_size": batch, "num_workers": loader_workers},
        "discovery": {"k": len(boundaries) + 1, "boundaries": list(boundaries)},
        "stage1": {"steps": 1}, "stage2": {"steps": steps, "warmup_steps": steps // 10},
        "scaling": {"num_workers": 1, "use_gpu": use_gpu, "cpus_per_worker": max(1, loader_workers)},
        "storage": {"url": f"{folder}/run"},
        "logging": {"wandb_mode": "disabled"},
    })
    run_folder = RunFolder(f"{folder}/run", f"{folder}/store", given={"teacher": f"{folder}/teacher.safetensors"},
                           folders={"discovery": f"{folder}/discovery", "stage1": f"{folder}/stage1", "stage2": f"{folder}/stage2"})
    return stage_job(spec, "stage2", run_folder, key="bench", inputs={})


QUICKSTART = {"teacher": "vit_small_patch14_reg4_dinov2", "img_size": 56, "batch": 32, "image_size": 64,
              "model_kwargs": {"embed_dim": 96, "depth": 12, "num_heads": 3}, "boundaries": (4, 8), "loader_workers": 1}


@contextlib.contextmanager
def local_s3() -> Iterator[str]:
    """A bucket on a ``moto_server`` started on a free loopback port, with the AWS variables pointing at it."""
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([shutil.which("moto_server") or "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            time.sleep(0.2)
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
        yield "s3://bench"
    finally:
        server.kill()


def main() -> None:
    import ray

    from raptor.train.bench import checkpoint_cost, compare, resize_cost

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", help="a run folder whose stage 1 has finished (e.g. runs/quickstart)")
    p.add_argument("--generated", action="store_true", help="generated shards, random teacher and student")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5, help="bare steps before timing")
    p.add_argument("--workers", default="1", help="comma list of runner worker counts")
    p.add_argument("--teacher", default=BASE)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--model-kwargs", default="{}", help="timm overrides as JSON, e.g. '{\"depth\": 6}'")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--quickstart", action="store_true", help="with --generated: jobs/quickstart.yaml's sizes")
    p.add_argument("--checkpoint-every", type=int, help="measure checkpoints every N steps, sync vs async upload")
    p.add_argument("--resize", help="N,M: stop on N workers, resume on M (what a resize costs)")
    p.add_argument("--stop", type=int, help="with --resize: the checkpointed step it stops at (default: half the steps)")
    p.add_argument("--store", help="where the checkpoints go (default: a local S3 server started for it)")
    args = p.parse_args()
    if bool(args.run) == args.generated:
        p.error("give a run folder or --generated")
    logging.basicConfig(level=logging.WARNING)
    workers = tuple(int(w) for w in args.workers.split(","))
    with tempfile.TemporaryDirectory(prefix="raptor-bench-") as tmp:
        sizes = QUICKSTART if args.quickstart else {
            "teacher": args.teacher, "img_size": args.img_size, "model_kwargs": json.loads(args.model_kwargs),
            "batch": args.batch, "loader_workers": args.loader_workers}
        job = run_job(args.run, args.steps) if args.run else generated_job(tmp, steps=args.steps, use_gpu=args.gpu, **sizes)
        if args.quickstart and args.workers == "1":
            workers = (2,)
        if args.resize:
            workers = tuple(int(w) for w in args.resize.split(","))
            if len(workers) != 2:
                p.error(f"--resize takes N,M (two worker counts), not {args.resize!r}")
            job = dataclasses.replace(job, global_batch=job.train.settings.batch_size * workers[0])
        cpus = int(job.scaling.cpus_per_worker)
        with contextlib.ExitStack() as stack:
            store = args.store or (stack.enter_context(local_s3()) if args.checkpoint_every or args.resize else None)
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus * max(workers)), logging_level=logging.WARNING)
            stack.callback(ray.shutdown)
            if args.resize:
                row = resize_cost(job, args.steps, args.stop or args.steps // 2, *workers, store)
                print(json.dumps({"bench": "resize", "store": store.split(":")[0], **row}), flush=True)
            elif args.checkpoint_every:
                for w in workers:
                    for row in checkpoint_cost(job, args.steps, args.checkpoint_every, store, w):
                        print(json.dumps({"bench": "checkpoint", "store": store.split(":")[0], **row}), flush=True)
            else:
                for row in compare(job, args.steps, args.warmup, workers):
                    print(json.dumps({"bench": "runner", **row}), flush=True)


if __name__ == "__main__":
    main()
