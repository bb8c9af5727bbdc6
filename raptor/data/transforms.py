"""DINOv2's image transforms, split into a random draw and a pure function of it.

train: RandomResizedCrop(size, scale 0.08-1 unless ``crop_scale`` says otherwise, aspect 3/4-4/3,
bicubic) + horizontal flip; eval: resize the short side to size * 256/224, then centre-crop
``size``. Both end with ImageNet mean/std normalisation.

Each image's crop is drawn first (:func:`crop_box`: a box in the original image's pixels and a flip
bit, from the reader's own ``random.Random``), then applied (:func:`crop_resize`). So a loader worker
can draw the crops and let the training process apply them on its GPU after decoding there, with
augmentation still a pure function of (seed, epoch, rank); the eval transform is the centred box
that resize + centre-crop would keep. Masks and depth maps take the same box with nearest-neighbour
sampling. Normalisation runs once per batch (:func:`normalise_batch`), on the training device.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import to_image

from raptor.data.settings import check_crop_scale
from raptor.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224
ASPECT = (3 / 4, 4 / 3)

Box = tuple[int, int, int, int, bool]  # top, left, height, width, flip


def check_size(size: int, patch_size: int | None = None) -> None:
    """The image side must be positive and, for a ViT, a multiple of its patch."""
    if size < 1:
        raise UserError(f"image size must be positive, got {size}")
    if patch_size is not None and size % patch_size:
        raise UserError(f"image size {size} is not a multiple of the patch size {patch_size}")


def crop_box(
    height: int,
    width: int,
    size: int,
    train: bool,
    crop_scale: tuple[float, float],
    rng: random.Random,
) -> Box:
    """The region of a ``height`` x ``width`` image that becomes the ``size`` x ``size`` output.

    train: Inception-style random area in ``crop_scale`` and log-uniform aspect in 3/4-4/3 (ten
    tries, then the largest centred box within those aspects), flipped with probability 1/2.
    eval: the centred square that resizing the short side to size * 256/224 and centre-cropping
    ``size`` keeps.
    """
    if not train:
        side = max(1, min(height, width, round(min(height, width) * size / round(size * EVAL_RESIZE_RATIO))))
        return (height - side) // 2, (width - side) // 2, side, side, False
    area = height * width
    log_lo, log_hi = math.log(ASPECT[0]), math.log(ASPECT[1])
    for _ in range(10):
        target = area * rng.uniform(*crop_scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return top, left, h, w, rng.random() < 0.5
    ratio = width / height
    if ratio < ASPECT[0]:
        w, h = width, min(height, round(width / ASPECT[0]))
    elif ratio > ASPECT[1]:
        w, h = min(width, round(height * ASPECT[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, rng.random() < 0.5


def crop_resize(image: torch.Tensor, box: Box, size: int, nearest: bool = False) -> torch.Tensor:
    """``[C,H,W]`` -> ``[C,size,size]``: the box, resized (bicubic with antialiasing, or nearest
    for masks), flipped if the box says so. uint8 stays uint8 on the CPU, where PyTorch resizes
    uint8 natively; elsewhere (CUDA) it is resized as float and clamped to 0..255.
    """
    top, left, h, w, flip = box
    crop = image[None, :, top : top + h, left : left + w]
    if nearest:
        out = F.interpolate(crop, size=(size, size), mode="nearest")
    else:
        if crop.dtype == torch.uint8 and crop.device.type == "cpu":
            # the native uint8 kernel works on channels-last (as decode_jpeg returns images)
            crop = crop.contiguous(memory_format=torch.channels_last)
        elif crop.dtype == torch.uint8:
            crop = crop.float()
        out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        if out.is_floating_point():
            out = out.clamp_(0, 255)
    out = out[0]
    return out.flip(-1) if flip else out


def normalise_batch(images: torch.Tensor) -> torch.Tensor:
    """``[B,3,H,W]`` 0..255 (uint8 or float, any device) -> contiguous float32 standardised by
    ImageNet mean/std, on the same device (in place when it is float32 already)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    if images.dtype == torch.float32 and images.is_contiguous():
        out = images
    else:
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        out.copy_(images)  # converts dtype and memory layout in one pass
    return out.sub_(mean).div_(std)


class ImageTransform:
    """The whole DINOv2 transform for one image (PIL or uint8 tensor in, normalised float out);
    train crops draw from torch's global RNG, so ``torch.manual_seed`` repeats them."""

    def __init__(self, size: int, train: bool, crop_scale: tuple[float, float]):
        self.size, self.train, self.crop_scale = size, train, crop_scale

    def __call__(self, image: Any) -> torch.Tensor:
        tensor = to_image(image).as_subclass(torch.Tensor)
        rng = random.Random(int(torch.randint(2**62, ())))
        box = crop_box(*tensor.shape[-2:], self.size, self.train, self.crop_scale, rng)
        return normalise_batch(crop_resize(tensor, box, self.size)[None])[0]


def image_transform(
    size: int,
    train: bool,
    patch_size: int | None = None,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> ImageTransform:
    """The DINOv2 transform for one image, outside the loader (the loader applies the same one)."""
    check_size(size, patch_size)
    check_crop_scale(crop_scale)
    return ImageTransform(size, train, tuple(crop_scale))
