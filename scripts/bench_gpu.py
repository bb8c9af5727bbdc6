"""The device check: what one GPU does with raptor's hot path, in under 8 minutes.

Run from the repository root on a CUDA machine that has torch and timm; anything else raptor needs
is installed first (``pip install -e .`` pinned to the machine's torch/torchvision/timm builds).
Prints one JSON object per line, in this order:

  env            torch, CUDA, the device, its table peak and memory
  matmul         achieved bf16 GEMM TFLOP/s (the practical ceiling for MFU)
  student_step   ViT-B/14-reg k=3 stage 2, online teacher included: eager and compiled
                 (samples/s, MFU of model FLOPs from raptor.perf.flops, peak GiB against the
                 plan's prediction from raptor.perf.plan, compile seconds, recompiles)
  decode         JPEG decode + augmentation img/s, CPU and GPU (``raptor data bench``)
  student_step   ViT-L/14-reg and ViT-g/14-reg k=3 stage 2 at --large-batch (activation
                 checkpointing switched on where the plan says the batch does not fit)
  teacher        teacher trajectory img/s for ViT-B/L/g
  inference      the exported ViT-B k=3 student (RaptorViT: stem + blocks + norm) against its teacher,
                 eager and compiled: img/s and peak GiB of each, bf16 autocast (``raptor bench-model``'s
                 measurement on the device)
  runner         the ViT-B stage-2 step through Ray Train + DeepSpeed (1 worker) against the
                 bare step, both on generated JPEG shards: samples/s and their ratio

Weights are random (same FLOPs as the pretrained ones). Everything past ``--budget-s`` is skipped
with a line saying so. ``--smoke`` runs tiny sizes on CPU in seconds (tests/test_bench_gpu.py).

    python scripts/bench_gpu.py
    python scripts/bench_gpu.py --peak-tflops 790 --large-batch 128
    python scripts/bench_gpu.py --smoke --backend aot_eager
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE, LARGE, GIANT = (f"vit_{s}_patch14_reg4_dinov2" for s in ("base", "large", "giant"))
BOUNDARIES = {BASE: [7, 10], LARGE: [12, 18], GIANT: [20, 30]}  # k=3; the specs take discovery's
SMOKE = dict(img_size=28, embed_dim=48, depth=4, num_heads=2)
SMOKE_BOUNDARIES = [2, 3]
NEEDED = ("safetensors", "fsspec", "webdataset", "pydantic", "yaml", "deepspeed", "ray")


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def ensure_installed(mode: str) -> None:
    """Install the project into this Python when its dependencies are missing (``mode`` auto),
    keeping the machine's own torch, torchvision and timm builds."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if "9.0a" in arch:  # DeepSpeed's op builder rejects the 'a' suffix
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch.replace("9.0a", "9.0")
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if mode == "no" or (mode == "auto" and not missing):
        return
    t0 = time.perf_counter()
    import timm
    import torchvision

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:  # public versions match local builds
        for mod in (torch, torchvision, timm):
            pins.write(f"{mod.__name__}=={mod.__version__.split('+')[0]}\n")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-c", pins.name, "-e", str(ROOT)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    emit({"bench": "install", "missing": missing, "seconds": round(time.perf_counter() - t0, 1),
          "ok": done.returncode == 0, **({} if done.returncode == 0 else {"stderr": done.stderr[-2000:]})})
    if done.returncode != 0:
        sys.exit(1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first call: compilation happens there, seconds per call after ``warmup``)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return first, (time.perf_counter() - t0) / steps


def matmul_tflops(device: torch.device, size: int) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    _, sec = timed(lambda: a @ b, steps=10, warmup=3, device=device)
    return 2 * size**3 / sec / 1e12


class Check:
    """One device check run: arguments, device, peak, the time budget."""

    def __init__(self, args: argparse.Namespace):
        from raptor.perf import current_device, lookup

        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.spec = current_device() if self.device.type == "cuda" else lookup("H100")  # plans need a table entry
        self.start = time.perf_counter()

    def peak(self, precision: str) -> float:
        """TFLOP/s to divide by: --peak-tflops, else the table's dense peak (CPU: a nominal 1)."""
        if self.args.peak_tflops:
            return self.args.peak_tflops
        return self.spec.peak(precision) if self.device.type == "cuda" else 1.0

    def within_budget(self, what: str) -> bool:
        elapsed = time.perf_counter() - self.start
        if elapsed > self.args.budget_s:
            emit({"bench": what, "skipped": f"time budget {self.args.budget_s:.0f} s spent ({elapsed:.0f} s)"})
            return False
        return True

    def teacher(self, name: str):
        from raptor.models import Teacher

        kw = SMOKE if self.args.smoke else {}
        return Teacher.from_timm(name, **kw).to(self.device)

    def boundaries(self, name: str) -> list[int]:
        return SMOKE_BOUNDARIES if self.args.smoke else BOUNDARIES[name]


def student_step(check: Check, name: str, batch: int, mode: str) -> None:
    """Stage-2 step with the online teacher: trajectory, rollout loss, backward, clip, fused AdamW.

    ``mode``: ``eager`` (bf16 autocast, fp32 weights), ``compiled`` (the same, teacher trajectory
    and loss under torch.compile), ``blocks`` (regional compilation: every block compiled, the
    loops eager; compile time independent of depth), ``fp32`` (the authors' precision, eager)."""
    from raptor.distill import StageConfig, distill_loss, make_optimizer
    from raptor.execution import DeepSpeedSettings
    from raptor.models import Raptor
    from raptor.perf import CompileCounter, CompiledLoss, StudentShape, TeacherShape, compile_blocks, compile_trajectory
    from raptor.perf import flops_per_sample, mfu, plan
    from raptor.perf.devices import GIB

    args, device = check.args, check.device
    teacher = check.teacher(name)
    student = Raptor.from_teacher(teacher, check.boundaries(name), mlp=args.mlp, seed=0)
    tshape, sshape = TeacherShape.from_teacher(teacher), StudentShape.from_student(student)
    precision = "fp32" if mode == "fp32" else "amp"
    engine = DeepSpeedSettings(zero_stage=0, precision="fp32" if mode == "fp32" else "bf16")
    common = dict(batch=batch, device=check.spec, reduce_bucket_elems=0)
    checkpointing = not plan(tshape, sshape, deepspeed=engine, **common).fits  # the bare step: no DeepSpeed buffers
    predicted = plan(tshape, sshape, deepspeed=engine.updated(activation_checkpointing=checkpointing),
                     **common)
    student.set_checkpointing(checkpointing)
    cfg = StageConfig.paper_stage2(steps=10_000)
    optimizer = make_optimizer(student, cfg)
    amp = precision == "amp"
    counter = CompileCounter()
    trajectory: Callable[[torch.Tensor], torch.Tensor] = lambda x: teacher.trajectory(x, amp=amp)
    loss_fn: Callable = distill_loss
    if mode == "compiled":
        trajectory = compile_trajectory(teacher, amp=amp, counter=counter, backend=args.backend)
        loss_fn = CompiledLoss(counter, backend=args.backend)
    elif mode == "blocks":
        compile_blocks(teacher.blocks, "teacher", counter=counter, backend=args.backend)
        compile_blocks(student.blocks, "student", counter=counter, backend=args.backend)
    images = torch.randn(batch, 3, teacher.img_size, teacher.img_size, device=device)

    def step() -> None:
        traj = trajectory(images)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = loss_fn(student, traj, cfg, 1000)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first, sec = timed(step, args.steps, args.warmup, device)
    rate = batch / sec
    fps = flops_per_sample(sshape, tshape, batch=batch)
    emit({
        "bench": "student_step", "teacher": name, "mode": mode, "mlp": args.mlp, "k": student.k, "batch": batch,
        "checkpointing": checkpointing, "samples_per_s": round(rate, 1), "gflops_per_sample": round(fps / 1e9, 2),
        "mfu": float(f"{mfu(rate, fps, check.peak(precision)):.3g}"), "peak_tflops": check.peak(precision),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None,
        "plan_gib": round(predicted.total / GIB, 2), "first_step_s": round(first, 1),
        **({"recompiles": counter.recompiles, "graphs": sum(counter.graphs.values())} if counter.graphs else {}),
    })


def release(check: Check) -> None:
    """Free one model's graphs and memory before the next (peak GiB is per model)."""
    torch._dynamo.reset()
    gc.collect()
    if check.device.type == "cuda":
        torch.cuda.empty_cache()


def teacher_forward(check: Check, name: str, batch: int) -> None:
    from raptor.perf import TeacherShape, mfu

    teacher = check.teacher(name)
    images = torch.randn(batch, 3, teacher.img_size, teacher.img_size, device=check.device)
    with torch.no_grad():
        _, sec = timed(lambda: teacher.trajectory(images, amp=True), check.args.steps, check.args.warmup, check.device)
    rate = batch / sec
    fps = TeacherShape.from_teacher(teacher).forward_flops(1)
    emit({"bench": "teacher", "teacher": name, "batch": batch, "img_per_s": round(rate, 1),
          "mfu": float(f"{mfu(rate, fps, check.peak('bf16')):.3g}")})


def inference(check: Check, name: str, batch: int) -> None:
    """Student (features) and teacher (readout) for inference at the same batch and size, one model on
    the device at a time so each peak is its own."""
    from raptor.models import Raptor, RaptorViT
    from raptor.models.teacher import autocast

    teacher = check.teacher(name)
    student = RaptorViT.from_student(Raptor.from_teacher(teacher, check.boundaries(name)), teacher).cpu()
    teacher.cpu()
    images = torch.randn(batch, 3, teacher.img_size, teacher.img_size, device=check.device)
    on_gpu = check.device.type == "cuda"
    for mode in ("eager", "compiled"):
        row: dict[str, Any] = {"bench": "inference", "teacher": name, "mode": mode, "batch": batch, "k": student.k}
        for who, model in (("student", student), ("teacher", teacher)):
            model.to(check.device)
            fn = model.features if who == "student" else model.forward
            if mode == "compiled":
                fn = torch.compile(fn, backend=check.args.backend)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(check.device)
            with torch.no_grad(), autocast(check.device, on_gpu):
                _, sec = timed(lambda: fn(images), check.args.steps, check.args.warmup, check.device)
            row[f"{who}_img_per_s"] = round(batch / sec, 1)
            row[f"{who}_params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
            row[f"{who}_peak_gib"] = round(torch.cuda.max_memory_allocated(check.device) / 2**30, 2) if on_gpu else None
            model.cpu()
            release(check)
        row["speed_ratio"] = round(row["student_img_per_s"] / row["teacher_img_per_s"], 3)
        emit(row)


def decode(check: Check, tmp: str) -> None:
    """JPEG decode + train augmentation through ``raptor data bench``: loader workers decoding on the
    CPU (per worker, against a bare PIL loop) vs the training process decoding batches on this device."""
    shards = os.path.join(tmp, "shards")
    n, size = (64, 64) if check.args.smoke else (2048, 320)
    gen = [sys.executable, "-m", "raptor.cli", "shards", "generate", shards, "--samples", str(n),
           "--size", str(size), "--workers", str(min(8, os.cpu_count() or 1)), "--max-samples", "512"]
    subprocess.run(gen, check=True, capture_output=True, cwd=ROOT)
    batches = 2 if check.args.smoke else 20
    workers = 0 if check.args.smoke else max(1, min(8, (os.cpu_count() or 2) - 2))
    for where, extra in (("cpu", ["--workers", "1", "--bare"]),
                         ("gpu", ["--workers", str(workers), "--device", str(check.device)])):
        cmd = [sys.executable, "-m", "raptor.cli", "data", "bench", shards, "--size", "28" if check.args.smoke else "224",
               "--batches", str(batches), "--decode", where, *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode == 0 and rows:
            emit({"bench": "decode", "decode": where, **rows[-1]})
        else:
            emit({"bench": "decode", "decode": where, "unavailable": (out.stderr.strip().splitlines() or ["?"])[-1]})


def runner(check: Check) -> None:
    """The ViT-B stage-2 step through Ray Train + DeepSpeed on this device (one worker, the spec's
    default compile and precision) against the bare step, both on generated JPEG shards
    (``scripts/bench_runner.py``, ``raptor.train.bench``; the target is a ratio >= 0.9)."""
    import ray

    from bench_runner import generated_job
    from raptor.train.bench import compare

    smoke, on_gpu = check.args.smoke, check.device.type == "cuda"
    steps = 10 if smoke else 60
    loaders = 0 if smoke else max(1, min(8, (os.cpu_count() or 2) - 2))
    model = {k: v for k, v in SMOKE.items() if k != "img_size"} if smoke else {}
    with tempfile.TemporaryDirectory() as tmp:
        job = generated_job(tmp, steps=steps, teacher=BASE, img_size=SMOKE["img_size"] if smoke else 224,
                            model_kwargs=model, boundaries=tuple(check.boundaries(BASE)), batch=check.args.batch,
                            loader_workers=loaders, use_gpu=on_gpu, image_size=32 if smoke else 256)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, loaders + 1), num_gpus=1 if on_gpu else 0,
                 logging_level="WARNING")
        try:
            rows = compare(job, steps, warmup=check.args.warmup)
        finally:
            ray.shutdown()
    for row in rows:
        emit({"bench": "runner", **row})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="ViT-B per-GPU batch")
    p.add_argument("--large-batch", type=int, default=64, help="ViT-L and ViT-g per-GPU batch")
    p.add_argument("--teacher-batch", type=int, default=256)
    p.add_argument("--modes", default="eager,compiled", help="ViT-B modes: eager, compiled, blocks, fp32")
    p.add_argument("--large-modes", default="blocks", help="ViT-L/g modes (blocks: compile time independent of depth)")
    p.add_argument("--mlp", default="swiglu", choices=["swiglu", "gelu"], help="student MLP (the spec default)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: capture only)")
    p.add_argument("--peak-tflops", type=float, help="override the table's dense peak (e.g. a measured 790)")
    p.add_argument("--budget-s", type=float, default=450, help="skip what would start after this many seconds")
    p.add_argument("--skip", default="", help="comma list of sections to skip: large,decode,teacher,inference,runner")
    p.add_argument("--install", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU: checks the script, not the GPU")
    args = p.parse_args()
    if args.smoke:
        args.batch = args.large_batch = args.teacher_batch = 4
        args.steps, args.warmup = min(args.steps, 1), 1
    ensure_installed(args.install)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in the authors' numbers
    check = Check(args)
    skip = set(filter(None, args.skip.split(",")))
    on_gpu = check.device.type == "cuda"
    emit({"bench": "env", "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
          "device": check.spec.name if on_gpu else "cpu", "peak_tflops_bf16": check.peak("bf16"),
          "memory_gib": round(check.spec.memory_gib, 1) if on_gpu else None,
          "plans_for": check.spec.name})
    tflops = matmul_tflops(check.device, 256 if args.smoke else 8192)
    emit({"bench": "matmul", "dtype": "bf16", "tflops": float(f"{tflops:.3g}")})
    for mode in filter(None, args.modes.split(",")):
        if check.within_budget(f"student_step {BASE} {mode}"):
            student_step(check, BASE, args.batch, mode)
            release(check)
    if "decode" not in skip and check.within_budget("decode"):
        with tempfile.TemporaryDirectory() as tmp:
            decode(check, tmp)
    if "large" not in skip:
        for name in (LARGE, GIANT):
            for mode in filter(None, args.large_modes.split(",")):
                if check.within_budget(f"student_step {name} {mode}"):
                    student_step(check, name, args.large_batch, mode)
                    release(check)
    if "teacher" not in skip:
        for name in (BASE, LARGE, GIANT):
            if check.within_budget(f"teacher {name}"):
                teacher_forward(check, name, args.teacher_batch)
    if "inference" not in skip and check.within_budget("inference"):
        inference(check, BASE, args.teacher_batch)
    if "runner" not in skip and check.within_budget("runner"):
        runner(check)
    emit({"bench": "done", "seconds": round(time.perf_counter() - check.start, 1)})


if __name__ == "__main__":
    main()
