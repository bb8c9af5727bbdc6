"""Hot-path throughput on one GPU, without Ray or DeepSpeed (the device image has neither).

Measures what DEVELOPERS.md sets as targets on an H100:
  - the stage-2 student step (rollout over all L layers, token loss, backward, clip, AdamW) from
    in-memory teacher trajectories, in fp32 eager, bf16 eager (SDPA) and bf16 torch.compile;
    reference ViT-B k=3: 202 samples/s for the authors' fp32 code, ~1,090 bf16, ~1,900 compiled;
  - the frozen teacher's trajectory forward in bf16: ViT-B ~5,400 img/s, ViT-L ~1,900, ViT-g ~570.
Weights are random (same FLOPs as the pretrained ones). Prints one JSON object per measurement,
with model FLOP utilisation against ``--peak-tflops``.

    python scripts/bench_gpu.py                          # ViT-B/14-reg, k=3 [7, 10], batch 64
    python scripts/bench_gpu.py --teachers vit_base_patch14_reg4_dinov2,vit_large_patch14_reg4_dinov2
    python scripts/bench_gpu.py --smoke                  # tiny sizes, CPU is fine (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from raptor.distill import StageConfig, distill_loss, make_optimizer
from raptor.models import Raptor, Teacher

SMOKE = dict(img_size=28, model_kwargs={"embed_dim": 48, "depth": 4, "num_heads": 2}, boundaries=[2, 3], batch=4)


def block_flops(tokens: int, width: int, mlp_in: int, mlp_hidden: int) -> float:
    """Forward FLOPs of one pre-norm block on one sample: projections, MLP and the two attention matmuls."""
    dense = 2 * width * 3 * width + 2 * width * width + 2 * width * mlp_in + 2 * mlp_hidden * width
    return tokens * dense + 2 * 2 * tokens * tokens * width


def timed(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call after ``warmup`` calls (compilation happens there)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_student(teacher: Teacher, boundaries: list[int], mlp_kind: str, batch: int, steps: int, modes: list[str],
                  peak: float, device: torch.device) -> None:
    lay = teacher.layout
    images = torch.randn(batch, 3, teacher.img_size, teacher.img_size, device=device)
    trajectory = teacher.trajectory(images).float()
    student = Raptor.from_teacher(teacher, boundaries, mlp=mlp_kind, seed=0)
    mlp = student.blocks[0].mlp
    flops = 3 * lay.depth * block_flops(trajectory.shape[2], lay.width, mlp.fc1.out_features, mlp.fc2.in_features)
    cfg = StageConfig.paper_stage2(steps=10_000)
    for mode in modes:
        bf16 = mode.startswith("bf16")
        loss_fn = torch.compile(distill_loss) if mode.endswith("compiled") else distill_loss
        optimizer = make_optimizer(student, cfg)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = loss_fn(student, trajectory, cfg, 1000)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        sec = timed(step, steps, warmup=3, device=device)
        rate = batch / sec
        print(json.dumps({"bench": "student_step", "mode": mode, "mlp": mlp_kind, "k": student.k, "boundaries": boundaries,
                          "batch": batch, "samples_per_s": round(rate, 1),
                          "tflops": round(rate * flops / 1e12, 2), "mfu": round(rate * flops / (peak * 1e12), 4)}),
              flush=True)


def bench_teacher(teacher: Teacher, batch: int, steps: int, peak: float, device: torch.device) -> None:
    lay = teacher.layout
    images = torch.randn(batch, 3, teacher.img_size, teacher.img_size, device=device)
    mlp = teacher.blocks[0].mlp  # timm: fc1/fc2 for GELU and packed SwiGLU alike
    flops = lay.depth * block_flops(lay.num_tokens, lay.width, mlp.fc1.out_features, mlp.fc2.in_features)
    amp = torch.bfloat16 if device.type == "cuda" else False
    sec = timed(lambda: teacher.trajectory(images, amp=amp), steps, warmup=2, device=device)
    rate = batch / sec
    print(json.dumps({"bench": "teacher_trajectory", "teacher": teacher.name, "batch": batch,
                      "img_per_s": round(rate, 1), "tflops": round(rate * flops / 1e12, 2),
                      "mfu": round(rate * flops / (peak * 1e12), 4)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student-teacher", default="vit_base_patch14_reg4_dinov2")
    p.add_argument("--boundaries", default="7,10")
    p.add_argument("--mlp", default="swiglu", choices=["swiglu", "gelu"], help="student MLP (the spec's default: swiglu)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--teacher-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", default="fp32-eager,bf16-eager,bf16-compiled")
    p.add_argument("--teachers", default="vit_base_patch14_reg4_dinov2,vit_large_patch14_reg4_dinov2,vit_giant_patch14_reg4_dinov2")
    p.add_argument("--peak-tflops", type=float, default=780.0, help="dense bf16 peak of the device (H100 ~780 measured)")
    p.add_argument("--smoke", action="store_true", help="tiny models and batches: checks the script, not the GPU")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in the authors' numbers
    kw = dict(img_size=SMOKE["img_size"], **SMOKE["model_kwargs"]) if args.smoke else {}
    boundaries = SMOKE["boundaries"] if args.smoke else [int(b) for b in args.boundaries.split(",")]
    batch = SMOKE["batch"] if args.smoke else args.batch
    teacher = Teacher.from_timm(args.student_teacher, **kw).to(device)
    bench_student(teacher, boundaries, args.mlp, batch, args.steps, args.modes.split(","), args.peak_tflops, device)
    for name in args.teachers.split(","):
        t = Teacher.from_timm(name, **kw).to(device)
        bench_teacher(t, SMOKE["batch"] if args.smoke else args.teacher_batch, args.steps, args.peak_tflops, device)
        del t
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
