"""The discovery stage: the max-cut block boundaries on the teacher's layer distances (or the spec's fixed ones).

``segmentation.json`` holds the boundaries and ``distances.png`` the distance heatmap with them drawn.
The distances are a stage of their own (``distances``): a sweep over k or the segmentation method
computes them once.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from raptor import storage
from raptor.discovery import bisection, plot_distances, segment
from raptor.service.engine.graph import Stage, StageContext

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict[str, Any]:
    """Max-cut boundaries on the distances (or the spec's fixed ones), and the heatmap with them drawn."""
    d = ctx.spec.discovery
    dist = np.load(io.BytesIO(storage.read_bytes(ctx.run_folder.distances)))
    if d.boundaries is not None:
        result: dict[str, Any] = {"boundaries": list(d.boundaries), "method": "fixed", "k": d.k}
    else:
        seg = segment(dist, d.k) if d.method == "dp" else bisection(dist, d.k)
        result = {"boundaries": list(seg.boundaries), "method": seg.method, "k": seg.k,
                  "objective": seg.objective, "cut": seg.cut}
    result.update(metric=d.metric, num_images=d.num_images, depth=int(dist.shape[0]))
    plot_distances(dist, result["boundaries"], storage.join(ctx.folder, "distances.png"),
                   title=f"{d.metric} distances, k={d.k}: {result['boundaries']}")
    storage.write_json(ctx.run_folder.segmentation, result)
    log.info("discovery: boundaries %s (%s on %s distances)", result["boundaries"], result["method"], d.metric)
    return {"boundaries": result["boundaries"]}


STAGE = Stage("discovery", reads=("discovery.k", "discovery.method", "discovery.boundaries"),
              upstream=("distances",), run=run)
