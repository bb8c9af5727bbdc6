"""``raptor bench-model EXPORT``: an exported student against its teacher, for inference."""

from __future__ import annotations

import argparse
import json

from raptor import storage
from raptor.errors import UserError
from raptor.export.bench import BATCH, ITERS, MODES, WARMUP, bench_model


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench-model", help="inference of an exported student against its teacher: images/s and peak memory",
        description="Images/s and peak memory of the exported student and of its teacher's architecture (random "
        "weights: speed and memory do not depend on them), at the same batch and resolution, eager and compiled, each "
        "in a fresh process. Both do the same FLOPs per image (k blocks applied L times); the student holds k blocks' "
        "weights instead of L.")
    p.add_argument("export", metavar="EXPORT", help="a `raptor export` output: student.safetensors or the hf/ folder (path or URL)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"images per forward (default {BATCH})")
    p.add_argument("--resolution", type=int, help="image size, a multiple of the patch size (default: the model's)")
    p.add_argument("--iters", type=int, default=ITERS, help=f"timed forwards (default {ITERS})")
    p.add_argument("--warmup", type=int, default=WARMUP, help=f"untimed forwards first, compilation included (default {WARMUP})")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--mode", dest="modes", action="append", choices=MODES, help="eager and/or compiled (default both)")
    p.add_argument("--json", metavar="URL", help="also write the rows as JSON")
    p.set_defaults(func=cmd_bench_model)


def cmd_bench_model(args: argparse.Namespace) -> int:
    for flag in ("batch", "iters"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    rows = bench_model(args.export, batch=args.batch, device=args.device, iters=args.iters, warmup=max(args.warmup, 0),
                       size=args.resolution, modes=tuple(args.modes or MODES))
    print(f"{'model':8} {'mode':9} {'params':>12} {'images/s':>10} {'peak MiB':>9}  vs teacher")
    for r in rows:
        ratio = f"{r['speed_vs_teacher']:.2f}x speed, {r['memory_vs_teacher'] or 0:.2f}x memory" if "speed_vs_teacher" in r else ""
        print(f"{r['model']:8} {r['mode']:9} {r['params']:>12,} {r['images_per_s']:>10.1f} {r['peak_mib']:>9.1f}  {ratio}")
    print(f"batch {rows[0]['batch']}, {rows[0]['size']} px, {rows[0]['device']}; peak memory: {rows[0]['memory']}")
    if args.json:
        storage.write_bytes(args.json, json.dumps(rows, indent=2).encode() + b"\n")
    return 0
