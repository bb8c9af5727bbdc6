"""``raptor analyze RUN_URL [--out URL] [--samples N] [--layer-swap] [--partition N] [--ablation] [--dense] [--device DEV]``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="dynamics and probe report of a finished run",
        description="Read a run's artifacts (spec, teacher, boundaries, student, probes), analyse teacher and "
        "student on the val data (directional convergence, angular speed, patch-update rank and coherence, "
        "basin robustness, fidelity) and write report.json, index.md, index.html and plots/.",
    )
    p.add_argument("run", metavar="RUN_URL", help="the run's storage URL (the spec's storage.url)")
    p.add_argument("--out", metavar="URL", help="report folder (default: RUN_URL/report)")
    p.add_argument("--samples", type=int, default=64, help="val images to analyse (default 64)")
    p.add_argument("--layer-swap", action="store_true", help="also run the layer-swap study (L(L+1)/2 partial teacher passes)")
    p.add_argument("--partition", type=int, default=0, metavar="N",
                   help="partition study: distil on the max-cut boundaries and on N random partitions (same k and budget)")
    p.add_argument("--ablation", action="store_true", help="ablation study: the paper's recipe table at this run's scale")
    p.add_argument("--dense", action="store_true", help="segmentation (mIoU) and depth (RMSE) linear probes; needs dense shards")
    p.add_argument("--study-samples", type=int, default=512, help="train images the studies and dense probes use (default 512)")
    p.add_argument("--study-steps", type=int, help="steps per stage for the studies' students (default: the run's)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the basin perturbations")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raptor.analysis.run import Studies, analyze_run

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1 (got {args.samples})")
    studies = Studies(layer_swap=args.layer_swap, partition=args.partition, ablation=args.ablation, dense=args.dense,
                      samples=args.study_samples, steps=args.study_steps)
    written = analyze_run(args.run, args.out, max_samples=args.samples, studies=studies, device=args.device, seed=args.seed)
    for kind, url in written.items():
        print(f"{kind}: {url}")
    return 0
