"""Heatmap of a layer-distance matrix with block boundaries (used by the CLI and the report)."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from raptor import storage


def plot_distances(
    distances,
    boundaries: Sequence[int] | None,
    path_or_url: str | None = None,
    *,
    title: str | None = None,
    cmap: str = "viridis",
    ax=None,
):
    """Draw D (layers 1..L on both axes) and lines after each boundary layer.

    Saves a PNG (or any matplotlib format by extension) to ``path_or_url`` through
    :mod:`raptor.storage` (s3:// works) when given; returns the matplotlib Figure. ``ax``: draw
    into this axis of a larger figure (several matrices side by side) instead of a new figure.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    d = np.asarray(distances.detach().cpu() if hasattr(distances, "detach") else distances, dtype=float)
    L = d.shape[0]
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 4.2), dpi=120)
    else:
        fig = ax.figure
    im = ax.imshow(d, cmap=cmap, origin="upper", extent=(0.5, L + 0.5, L + 0.5, 0.5))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="distance")
    for b in boundaries or []:
        ax.axhline(b + 0.5, color="white", lw=1.5)
        ax.axvline(b + 0.5, color="white", lw=1.5)
    ticks = list(range(1, L + 1)) if L <= 24 else list(range(1, L + 1, max(L // 12, 1)))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title or (f"boundaries {list(boundaries)}" if boundaries else "layer distances"))
    fig.tight_layout()
    if path_or_url is not None:
        buf = io.BytesIO()
        fmt = path_or_url.rsplit(".", 1)[-1].lower() if "." in path_or_url else "png"
        fig.savefig(buf, format=fmt)
        storage.write_bytes(path_or_url, buf.getvalue())
        plt.close(fig)
    return fig
