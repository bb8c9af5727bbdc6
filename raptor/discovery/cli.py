"""``raptor maxcut DISTANCES.npy --k K [--method dp|bisection] [--json] [--plot FILE.png]``."""

from __future__ import annotations

import argparse
import json

from raptor.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "maxcut",
        help="block boundaries from a layer-distance matrix",
        description="Segment layers 1..L into k contiguous blocks (min within-block distance = max cut).",
    )
    p.add_argument("distances", help="L x L distance matrix (.npy; local path or URL)")
    p.add_argument("--k", type=int, required=True, help="number of blocks")
    p.add_argument("--method", choices=["dp", "bisection"], default="dp",
                   help="exact dynamic programming (default) or the authors' recursive bisection")
    p.add_argument("--min-size", type=int, default=1, help="bisection: minimum layers per block")
    p.add_argument("--baseline", type=int, default=0, metavar="N",
                   help="also compare against N random contiguous partitions")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="write the heatmap with the boundaries")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raptor.discovery import bisection, load_distances, random_baseline, segment

    if args.min_size < 1 or args.baseline < 0 or args.baseline == 1:
        raise UserError(f"--min-size must be >= 1 and --baseline 0 or >= 2 (got {args.min_size}, {args.baseline})")
    d = load_distances(args.distances)
    if not 1 <= args.k <= d.shape[0]:
        raise UserError(f"--k must be in 1..{d.shape[0]} (the L of {args.distances}), got {args.k}")
    if args.method == "dp":
        seg = segment(d, args.k)
    else:
        seg = bisection(d, args.k, min_size=args.min_size)
    out = {"method": seg.method, "k": seg.k, "L": int(d.shape[0]), "boundaries": seg.boundaries,
           "objective": seg.objective, "cut": seg.cut}
    if args.baseline:
        out["random_baseline"] = random_baseline(d, seg.k, args.baseline, solution=seg.boundaries).to_dict()
    if args.plot:
        from raptor.discovery import plot_distances

        plot_distances(d, seg.boundaries, args.plot, title=f"{seg.method} k={seg.k}: {seg.boundaries}")
        out["plot"] = args.plot
    if args.json:
        print(json.dumps(out))
    else:
        print(f"boundaries {seg.boundaries}  objective {seg.objective:.6g}  cut {seg.cut:.6g}  "
              f"(k={seg.k}, L={d.shape[0]}, {seg.method})")
        if args.baseline:
            rb = out["random_baseline"]
            print(f"random partitions: mean {rb['mean']:.6g} std {rb['std']:.6g}  z {rb['z']:.3g}")
    return 0
