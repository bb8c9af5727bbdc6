"""The distances stage: the teacher's layer-distance matrix (``distances.npy``) on the val images.

Block discovery is two stages, this and the max-cut boundaries on it (``discovery``), because they are
made from different things: the distances from the teacher, the metric and the images; the
boundaries from the distances and k. A sweep over k (or over the segmentation method) computes the
distances once.
"""

from __future__ import annotations

import io
from typing import Any, Iterator

import numpy as np
import torch

from raptor import storage
from raptor.discovery import layer_distances, swap_distances
from raptor.service.spec.translate import shard_source, single_device, single_process, teacher_ref
from raptor.service.engine.graph import Stage, StageContext
from raptor.service.spec import JobSpec
from raptor.service.stages.fields import EVAL_DATA
from raptor.train.settings import TeacherSettings


def distance_matrix(spec: JobSpec, teacher: TeacherSettings) -> np.ndarray:
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


def run(ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec
    dist = single_process(spec, distance_matrix, spec, teacher_ref(spec, ctx.run_folder))
    buf = io.BytesIO()
    np.save(buf, dist)
    storage.write_bytes(ctx.run_folder.distances, buf.getvalue())
    return {"depth": int(dist.shape[0]), "metric": spec.discovery.metric}


STAGE = Stage(
    "distances",
    reads=("discovery.metric", "discovery.num_images", *EVAL_DATA, "teacher.precision", "scaling.use_gpu"),
    upstream=("teacher",), run=run,
    ignores={"data.batch_size": "batches only group the images; the average over them is the same"},
)
