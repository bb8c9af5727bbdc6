"""Contiguous segmentation of the layer-distance graph (max-cut blocks).

Layers 1..L, boundaries 0 = b_0 < b_1 < ... < b_k = L; block j holds layers b_{j-1}+1 .. b_j.
objective = sum over segments of the summed within-segment pairwise distance (each unordered pair
once), minimised. Since total = within + cut, this is exactly the max cut between segments.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class Segmentation:
    boundaries: list[int]  # 1-based b_1..b_{k-1}
    objective: float  # summed within-segment distance (minimised)
    k: int
    cut: float = float("nan")  # total pairwise weight - objective (maximised)
    method: str = "dp"
    depth: int = 0  # L

    @property
    def segments(self) -> list[tuple[int, int]]:
        """(first, last) 1-based layers of each block."""
        edges = [0, *self.boundaries, self.depth]
        return [(a + 1, b) for a, b in zip(edges[:-1], edges[1:])]

    def to_dict(self) -> dict:
        return asdict(self)


def _as_matrix(distances) -> np.ndarray:
    d = np.asarray(distances.detach().cpu() if hasattr(distances, "detach") else distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distances must be a square L x L matrix, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("distances contain NaN or inf")
    d = 0.5 * (d + d.T)
    np.fill_diagonal(d, 0.0)
    return d


def _within_table(d: np.ndarray) -> np.ndarray:
    """W[i, j] = summed pairwise distance inside layers i..j-1 (0-based, half-open), O(L^2)."""
    L = d.shape[0]
    upper = np.triu(d, 1)
    # P[i, j] = sum_{a < i, b < j} upper[a, b]
    P = np.zeros((L + 1, L + 1))
    P[1:, 1:] = upper.cumsum(0).cumsum(1)
    i = np.arange(L + 1)[:, None]
    j = np.arange(L + 1)[None, :]
    W = P[j, j] - P[i, j] - P[j, i] + P[i, i]  # rectangle [i, j) x [i, j), upper triangle only
    return np.where(j >= i, W, np.inf)


def objective(distances, boundaries: Sequence[int]) -> float:
    """Summed within-segment distance of a segmentation."""
    d = _as_matrix(distances)
    L = d.shape[0]
    edges = [0, *[int(b) for b in boundaries], L]
    W = _within_table(d)
    return float(sum(W[a, b] for a, b in zip(edges[:-1], edges[1:])))


def _check_k(k: int, L: int) -> None:
    if not 1 <= k <= L:
        raise ValueError(f"k must be in 1..L = {L}, got {k}")


def segment(distances, k: int | Iterable[int]) -> Segmentation | dict[int, Segmentation]:
    """Exact minimum-within-distance contiguous segmentation by dynamic programming, O(k L^2).

    ``k`` an int -> one :class:`Segmentation`; an iterable (e.g. ``range(2, 6)``) -> ``{k: Segmentation}``
    from one DP pass up to the largest k.
    """
    d = _as_matrix(distances)
    L = d.shape[0]
    ks = [int(k)] if isinstance(k, (int, np.integer)) else sorted({int(x) for x in k})
    if not ks:
        raise ValueError("no k given")
    for kk in ks:
        _check_k(kk, L)
    W = _within_table(d)
    total = float(np.triu(d, 1).sum())
    K = max(ks)
    best = np.full((K + 1, L + 1), np.inf)
    arg = np.zeros((K + 1, L + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for c in range(1, K + 1):
        # best[c, e] = min_s best[c-1, s] + W[s, e], s < e
        cand = best[c - 1][:, None] + W  # [s, e]
        cand[np.arange(L + 1)[:, None] >= np.arange(L + 1)[None, :]] = np.inf
        arg[c] = np.argmin(cand, axis=0)
        best[c] = cand[arg[c], np.arange(L + 1)]
    out = {}
    for kk in ks:
        b = []
        e = L
        for c in range(kk, 0, -1):
            s = int(arg[c, e])
            if c > 1:
                b.append(s)
            e = s
        b = sorted(b)
        obj = float(best[kk, L])
        out[kk] = Segmentation(boundaries=b, objective=obj, k=kk, cut=total - obj, method="dp", depth=L)
    return out[ks[0]] if isinstance(k, (int, np.integer)) else out


def bisection(distances, k: int | None = None, *, eps: float = 0.1, min_size: int = 2) -> Segmentation:
    """The authors' recursive bisection: split segments in two by an exhaustive max cut.

    At each round every segment of >= 2 * ``min_size`` layers is scored by its best contiguous
    two-way split (the cut weight between the halves, all split points tried); the segment with
    the largest cut is split. With ``k`` it stops at k segments (or when nothing can be split);
    without ``k`` it stops when the best cut is below ``eps`` times the total pairwise weight.
    """
    d = _as_matrix(distances)
    L = d.shape[0]
    if k is not None:
        _check_k(k, L)
    if min_size < 1:
        raise ValueError("min_size must be >= 1")
    total = float(np.triu(d, 1).sum())
    segs = [(0, L)]

    def best_split(a: int, b: int) -> tuple[float, int]:
        best = (-math.inf, -1)
        for p in range(a + min_size, b - min_size + 1):
            cut = float(d[a:p, p:b].sum())
            if cut > best[0]:
                best = (cut, p)
        return best

    while k is None or len(segs) < k:
        scored = [(best_split(a, b), (a, b)) for a, b in segs if b - a >= 2 * min_size]
        if not scored:
            break
        (cut, p), (a, b) = max(scored, key=lambda x: x[0][0])
        if k is None and cut < eps * total:
            break
        segs.remove((a, b))
        segs += [(a, p), (p, b)]
        segs.sort()
    bnd = [b for _, b in segs[:-1]]
    obj = objective(d, bnd)
    return Segmentation(boundaries=bnd, objective=obj, k=len(segs), cut=total - obj, method="bisection",
                        depth=L)


@dataclass(frozen=True)
class RandomBaseline:
    mean: float  # objective over random contiguous partitions
    std: float
    n: int
    objective: float  # of the solution compared (the DP optimum unless given)
    z: float  # (objective - mean) / std: negative = better than random (we minimise)

    @property
    def sigmas_better(self) -> float:
        return -self.z

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sigmas_better"] = self.sigmas_better
        return d


def random_baseline(
    distances, k: int, n: int = 1000, *, seed: int = 0, solution: Sequence[int] | None = None
) -> RandomBaseline:
    """Objective of ``n`` uniformly random contiguous k-partitions (boundaries drawn without
    replacement from 1..L-1) vs ``solution`` (default: the DP optimum)."""
    d = _as_matrix(distances)
    L = d.shape[0]
    _check_k(k, L)
    if n < 2:
        raise ValueError("n must be >= 2")
    rng = random.Random(seed)
    W = _within_table(d)
    vals = []
    for _ in range(n):
        b = sorted(rng.sample(range(1, L), k - 1))
        e = [0, *b, L]
        vals.append(sum(W[x, y] for x, y in zip(e[:-1], e[1:])))
    v = np.asarray(vals)
    sol = segment(d, k).boundaries if solution is None else list(solution)
    obj = objective(d, sol)
    std = float(v.std(ddof=1))
    z = (obj - float(v.mean())) / std if std > 0 else 0.0
    return RandomBaseline(mean=float(v.mean()), std=std, n=n, objective=obj, z=float(z))
