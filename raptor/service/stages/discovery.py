"""Block discovery as two stages: the layer-distance matrix, then the max-cut boundaries on it.

They are separate artifacts because they are made from different things: the distances from the
teacher, the metric and the images; the boundaries from the distances and k. A sweep over k (or
over the segmentation method) computes the distances once.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Iterator

import numpy as np
import torch

from raptor import storage
from raptor.discovery import bisection, layer_distances, plot_distances, segment, swap_distances
from raptor.service.spec.translate import shard_source, single_device, single_process, teacher_ref
from raptor.service.engine.graph import StageContext
from raptor.service.spec import JobSpec
from raptor.train.job import TeacherRef

log = logging.getLogger(__name__)


def distance_matrix(spec: JobSpec, teacher: TeacherRef) -> np.ndarray:
    """``discovery.metric`` distances between the teacher's layers over ``discovery.num_images`` val images."""
    d = spec.discovery
    device = single_device(spec)
    model = teacher.load(device)
    amp = teacher.amp(device)

    def images() -> Iterator[torch.Tensor]:
        seen = 0
        for x, _ in shard_source(spec, "val", num_workers=0).loader(train=False):
            yield x[: d.num_images - seen].to(device)
            seen += len(x)
            if seen >= d.num_images:
                return

    if d.metric == "swap":
        dist = swap_distances(model, images(), amp=amp)
    else:
        dist = layer_distances((model.trajectory(x, amp=amp) for x in images()), d.metric, model.geometry)
    return np.asarray(dist.cpu(), dtype=np.float64)


def run_distances(ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec
    dist = single_process(spec, distance_matrix, spec, teacher_ref(spec, ctx.layout))
    buf = io.BytesIO()
    np.save(buf, dist)
    storage.write_bytes(ctx.layout.distances, buf.getvalue())
    return {"depth": int(dist.shape[0]), "metric": spec.discovery.metric}


def run_discovery(ctx: StageContext) -> dict[str, Any]:
    """Max-cut boundaries on the distances (or the spec's fixed ones), and the heatmap with them drawn."""
    d = ctx.spec.discovery
    dist = np.load(io.BytesIO(storage.read_bytes(ctx.layout.distances)))
    if d.boundaries is not None:
        result: dict[str, Any] = {"boundaries": list(d.boundaries), "method": "fixed", "k": d.k}
    else:
        seg = segment(dist, d.k) if d.method == "dp" else bisection(dist, d.k)
        result = {"boundaries": list(seg.boundaries), "method": seg.method, "k": seg.k,
                  "objective": seg.objective, "cut": seg.cut}
    result.update(metric=d.metric, num_images=d.num_images, depth=int(dist.shape[0]))
    plot_distances(dist, result["boundaries"], storage.join(ctx.folder, "distances.png"),
                   title=f"{d.metric} distances, k={d.k}: {result['boundaries']}")
    storage.write_json(ctx.layout.segmentation, result)
    log.info("discovery: boundaries %s (%s on %s distances)", result["boundaries"], result["method"], d.metric)
    return {"boundaries": result["boundaries"]}
