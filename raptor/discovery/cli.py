"""``raptor maxcut DISTANCES.npy --k K [--method dp|bisection] [--json] [--plot FILE.png]``."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np

from raptor import storage
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


def load_matrix(url: str) -> np.ndarray:
    try:
        with storage.open_file(url, "rb") as f:
            return np.load(io.BytesIO(f.read()), allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{url}: no such file") from None
    except ValueError as e:
        raise UserError(f"{url}: not a .npy matrix ({e})") from None


def run(args: argparse.Namespace) -> int:
    from raptor.discovery import bisection, random_baseline, segment

    d = load_matrix(args.distances)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise UserError(f"{args.distances}: expected a square matrix, got shape {d.shape}")
    if not 1 <= args.k <= d.shape[0]:
        raise UserError(f"--k must be in 1..{d.shape[0]} (L), got {args.k}")
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
