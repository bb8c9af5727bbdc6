"""The library's components built from a job spec: the frozen teacher and the shard loaders.

Every stage (teacher training, discovery, the Ray workers, probes, the report) builds them here, so
one spec setting (image size, seed, error budget, crop scale) means the same thing everywhere.
"""

from __future__ import annotations

from raptor import data
from raptor.config import JobSpec
from raptor.models import Teacher


def load_teacher(spec: JobSpec, url: str) -> Teacher:
    """The frozen teacher at ``url`` (a raptor teacher export or any checkpoint layout the core reads)."""
    t = spec.teacher
    return Teacher.from_timm(t.name, img_size=t.img_size, checkpoint=url, **t.model_kwargs)


def spec_loader(
    spec: JobSpec,
    url: str,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    batch_size: int | None = None,
    dense: bool = False,
) -> data.ShardLoader:
    """``url``'s shards with the spec's data settings (seed, error budget, crop scale, image size).

    ``train``: augmented, shuffled, the same number of whole batches on every rank.
    Otherwise: eval transform, every sample once in file order (one process), last batch kept.
    """
    return data.loader(
        url, batch_size=batch_size or spec.data.batch_size, image_size=spec.teacher.img_size, train=train,
        seed=spec.data.seed, num_workers=num_workers, rank=rank, world_size=world_size, drop_last=train,
        error_budget=spec.data.error_budget, crop_scale=spec.data.crop_scale, dense=dense,
    )
