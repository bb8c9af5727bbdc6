"""DINOv2's image transforms (``torchvision.transforms.v2``), applied jointly to dense targets.

train: RandomResizedCrop(size, scale 0.08-1 unless ``crop_scale`` says otherwise, bicubic) +
horizontal flip; eval: resize the short side
to size * 256/224, then centre-crop ``size``. Both end with ImageNet mean/std normalisation. Masks
and depth maps ride along as ``tv_tensors.Mask`` so they get the same crop and flip (nearest
neighbour) and no normalisation.

The loader runs the geometric part per sample on uint8 images and normalises whole batches at once
(:func:`normalise_batch`): one float conversion per batch instead of one per image is most of the
per-worker cost at small image sizes.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224


def check_size(size: int, patch_size: int | None = None) -> None:
    """The image side must be positive and, for a ViT, a multiple of its patch."""
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    if patch_size is not None and size % patch_size:
        raise ValueError(f"image size {size} is not a multiple of the patch size {patch_size}")


def geometric_transform(
    size: int,
    train: bool,
    patch_size: int | None = None,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> v2.Compose:
    """The crop/resize/flip part, on uint8 images (and masks riding along)."""
    check_size(size, patch_size)
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
    if train:
        steps = [
            v2.RandomResizedCrop(size, crop_scale, interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(),
        ]
    else:
        steps = [
            v2.Resize(round(size * EVAL_RESIZE_RATIO), interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(size),
        ]
    return v2.Compose(steps)


def normalise_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B,3,H,W]`` -> float32 scaled to 0..1 and standardised by ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return images.float().sub_(mean).div_(std)


def image_transform(
    size: int,
    train: bool,
    patch_size: int | None = None,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> v2.Compose:
    """The whole DINOv2 transform for one image (uint8 tensor or PIL in, normalised float out)."""
    return v2.Compose(
        [
            geometric_transform(size, train, patch_size, crop_scale),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
