"""How the shards are read: the loader's settings, declared once (the job spec's ``data`` section extends them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from raptor.errors import UserError
from raptor.settings import Settings


def check_crop_scale(crop_scale: tuple[float, float]) -> None:
    """The one rule for a RandomResizedCrop area range, for the spec and for direct callers of the loader."""
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise UserError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")


class LoaderSettings(Settings):
    """Batching, loader workers, shuffling seed, corruption budget, augmentation range, labels and decoding."""

    num_classes: int | None = Field(None, gt=1, description="class count where no info file gives it (the teacher's classifier is sized by it)")
    label_key: str = Field("cls", description="where a sample's label is: cls (a member holding the class index) or MEMBER:FIELD, e.g. json:label")
    decode: Literal["cpu", "gpu"] = Field(
        "cpu", description="where training JPEGs are decoded: cpu (loader workers) or gpu (the training process, batched on its GPU)")
    batch_size: int = Field(64, gt=0, description="per worker")
    num_workers: int = Field(4, ge=0, description="loader workers per training worker")
    streams: int | None = Field(
        None, gt=0, description="read streams of a training epoch: its sample order, the same at any worker count "
        "(each step takes global batch / streams samples from every stream; a multiple of ranks x loader workers "
        "that divides the global batch has each reader read whole streams); null = ranks x num_workers at the "
        "world size the order is laid out for (with data.global_batch_size: global batch / batch_size ranks), "
        "rounded down to a divisor of the global batch and to the shard count")
    seed: int = Field(0, description="seed of shuffling and augmentation")
    error_budget: float = Field(0.01, ge=0, le=1, description="fraction of samples that may be skipped as corrupt")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range of the train transform (DINOv2: 0.08-1; raise the floor for tiny images)")

    @field_validator("crop_scale")
    @classmethod
    def _crop(cls, v: tuple[float, float]) -> tuple[float, float]:
        try:
            check_crop_scale(v)
        except UserError as e:
            raise ValueError(str(e)) from None
        return v
