"""From raw shard samples to training items: labels, CPU decoding, and decoding on the GPU.

``decode="cpu"``: a loader worker decodes each image, applies its drawn crop (uint8) and sends uint8
batches; the training process normalises them on its device (a quarter of the bytes of float
batches between processes, and no float pass on the worker's core).

``decode="gpu"``: the worker only reads the shards, parses labels, reads each JPEG's size from its
header and draws the crop; it sends the encoded bytes with the boxes (:class:`EncodedBatch`), and
the training process decodes the whole batch at once on its device (``decode_jpeg(device=...)``,
nvjpeg on CUDA), crops, resizes, flips and normalises there (:func:`decode_on_device`). Images the
device should not get (PNG, WebP, CMYK or progressive-looking oddities, JPEGs without their end
marker) are decoded by the worker as in the CPU path; a JPEG the device then still fails on is
decoded on the CPU, and one that fails there too is reported back for the loader to count.

Labels come from ``label_key``: a member whose text is the class index (``cls``, WebDataset's
convention), or ``MEMBER:FIELD`` for a field of a JSON member (``json:label``; ``json:a.b`` for a
nested field), as timm's shards carry them in their ``.json`` member.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from raptor.data.sources import IMAGE_EXTS
from raptor.data.transforms import Box, crop_box, crop_resize
from raptor.errors import UserError

JPEG_EXTS = ("jpg", "jpeg")
Item = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class LabelKey:
    """Where a sample's class index is: ``member`` alone (its text), or ``fields`` of its JSON."""

    member: str
    fields: tuple[str, ...] = ()

    @classmethod
    def parse(cls, key: str) -> "LabelKey":
        member, colon, path = key.partition(":")
        fields = tuple(path.split(".")) if colon else ()
        if not member or (colon and not all(fields)) or member.startswith("__"):
            raise UserError(
                f"label_key {key!r}: expected a member like 'cls' or MEMBER:FIELD like 'json:label'"
            )
        return cls(member.lower(), fields)

    def __str__(self) -> str:
        return self.member + (":" + ".".join(self.fields) if self.fields else "")

    def read(self, sample: dict[str, Any], num_classes: int | None) -> int:
        """The label, or ValueError saying why the sample has none usable."""
        if self.member not in sample:
            raise ValueError(f"no {self.member} entry")
        raw: Any = sample[self.member]
        if self.fields:
            try:
                raw = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise ValueError(f"{self.member} entry is not JSON") from None
            for field in self.fields:
                if not isinstance(raw, dict) or field not in raw:
                    raise ValueError(f"no field {'.'.join(self.fields)!r} in the {self.member} entry")
                raw = raw[field]
            if isinstance(raw, bool) or not isinstance(raw, (int, str)):
                raise ValueError(f"label {raw!r} is not an integer")
        try:
            label = int(raw)
        except ValueError:
            raise ValueError(f"label {raw[:20]!r} is not an integer") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise ValueError(f"label {label} outside 0..{num_classes}")
        return label


def image_entry(sample: dict[str, Any]) -> str:
    """The member holding the image (the first of jpg, jpeg, png, webp, bmp)."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError("no image entry")
    return ext


@dataclass
class Augment:
    """One reader's per-sample transform: its own RNG draws each crop, in sample order."""

    size: int
    train: bool
    crop_scale: tuple[float, float]
    rng: random.Random

    def box(self, height: int, width: int) -> Box:
        return crop_box(height, width, self.size, self.train, self.crop_scale, self.rng)


def cpu_item(
    sample: dict[str, Any], label: int, augment: Augment, dense: bool
) -> Item:
    """(image uint8 [3,S,S], label[, mask [S,S] long, depth [S,S] float]) decoded and cropped here."""
    if "__error__" in sample:
        raise ValueError(sample["__error__"])
    image = decode_rgb(sample[image_entry(sample)])
    box = augment.box(*image.shape[-2:])
    label_t = torch.tensor(label)
    if not dense:
        return crop_resize(image, box, augment.size), label_t
    if "seg.png" not in sample or "depth.npy" not in sample:
        raise ValueError("dense sample needs seg.png and depth.npy")
    mask = _pil(sample["seg.png"], "L")
    depth = torch.from_numpy(np.load(io.BytesIO(sample["depth.npy"]))).float()[None]
    if mask.shape[-2:] != image.shape[-2:] or depth.shape[-2:] != image.shape[-2:]:
        raise ValueError("seg.png / depth.npy size differs from the image")
    return (
        crop_resize(image, box, augment.size),
        label_t,
        crop_resize(mask, box, augment.size, nearest=True)[0].long(),
        crop_resize(depth, box, augment.size, nearest=True)[0],
    )


@dataclass
class Encoded:
    """A JPEG the training process will decode, with its drawn crop."""

    data: bytes
    box: Box
    label: int
    key: str


def gpu_item(sample: dict[str, Any], label: int, augment: Augment) -> Encoded | Item:
    """The sample as an :class:`Encoded` JPEG for the device, or decoded here (see the module
    docstring for which images stay on the CPU)."""
    if "__error__" in sample:
        raise ValueError(sample["__error__"])
    ext = image_entry(sample)
    data = sample[ext]
    size = _device_jpeg_size(data) if ext in JPEG_EXTS else None
    if size is None:
        return cpu_item(sample, label, augment, dense=False)
    return Encoded(data, augment.box(*size), label, sample["__key__"])


def _device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) when the device decoder can take this JPEG whole, else None."""
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None  # truncated (no end-of-image marker): let the CPU decoder judge it
    try:
        image = Image.open(io.BytesIO(data))  # parses the header only
    except Exception:  # noqa: BLE001 - any unparseable header: the CPU path decides and counts
        return None
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    return image.height, image.width


@dataclass
class EncodedBatch:
    """What a worker sends under ``decode="gpu"``: JPEGs back to back, their crops, and the images
    it decoded itself (``decoded`` at positions ``decoded_at``)."""

    data: torch.Tensor  # uint8 [N]
    offsets: list[int]  # len B + 1; image i is data[offsets[i]:offsets[i + 1]] (empty: decoded)
    boxes: list[Box]
    keys: list[str]
    labels: torch.Tensor  # int64 [B]
    decoded: torch.Tensor  # uint8 [K, 3, S, S]
    decoded_at: list[int]

    @classmethod
    def collate(cls, items: list[Encoded | Item], size: int) -> "EncodedBatch":
        encoded = [it for it in items if isinstance(it, Encoded)]
        blob = b"".join(e.data for e in encoded)
        offsets, boxes, keys, labels, decoded, decoded_at = [0], [], [], [], [], []
        for i, item in enumerate(items):
            if isinstance(item, Encoded):
                offsets.append(offsets[-1] + len(item.data))
                boxes.append(item.box)
                keys.append(item.key)
                labels.append(item.label)
            else:
                offsets.append(offsets[-1])
                boxes.append((0, 0, 0, 0, False))
                keys.append("")
                labels.append(int(item[1]))
                decoded.append(item[0])
                decoded_at.append(i)
        return cls(
            data=_uint8(blob),
            offsets=offsets,
            boxes=boxes,
            keys=keys,
            labels=torch.tensor(labels, dtype=torch.long),
            decoded=torch.stack(decoded) if decoded else torch.empty(0, 3, size, size, dtype=torch.uint8),
            decoded_at=decoded_at,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def pin_memory(self) -> "EncodedBatch":
        """Called by the DataLoader's pinning thread (``pin_memory=True``)."""
        self.data, self.labels, self.decoded = (
            self.data.pin_memory(), self.labels.pin_memory(), self.decoded.pin_memory()
        )
        return self


def decode_on_device(
    batch: EncodedBatch, size: int, device: torch.device
) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """``(images float [B,3,S,S] 0..255 on device, failures)``: the batch decoded (one batched call),
    cropped and resized on ``device``. ``failures`` lists (position, message) of the JPEGs neither
    the device nor the CPU could decode; their rows are left zero for the caller to replace.
    """
    out = torch.zeros(len(batch), 3, size, size, device=device)
    if batch.decoded_at:
        out[batch.decoded_at] = batch.decoded.to(device, non_blocking=True).float()
    todo = [i for i in range(len(batch)) if batch.offsets[i + 1] > batch.offsets[i]]
    if not todo:
        return out, []
    chunks = [batch.data[batch.offsets[i] : batch.offsets[i + 1]] for i in todo]
    try:
        images: list[torch.Tensor | None] = list(decode_jpeg(chunks, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad image fails the whole call: decode them one by one
        images = [_decode_one(chunk, device) for chunk in chunks]
    failures = []
    for i, image in zip(todo, images):
        if image is None:
            failures.append((i, f"{batch.keys[i]}: undecodable JPEG"))
            continue
        top, left, h, w, flip = batch.boxes[i]
        if top + h > image.shape[-2] or left + w > image.shape[-1]:
            failures.append((i, f"{batch.keys[i]}: decoded size differs from its header"))
            continue
        out[i] = crop_resize(image, batch.boxes[i], size).float()
    return out, failures


def _decode_one(chunk: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One JPEG on the device, else on the CPU (moved to the device), else None."""
    try:
        return decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        return decode_rgb(chunk.numpy().tobytes()).to(device)
    except Exception:  # noqa: BLE001 - undecodable anywhere: the caller counts it
        return None


def _uint8(data: bytes) -> torch.Tensor:
    """The bytes as a uint8 tensor of their own (``frombuffer`` refuses an empty buffer)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def decode_rgb(data: bytes) -> torch.Tensor:
    """uint8 ``[3,H,W]``: JPEGs with torchvision (libjpeg-turbo), anything else with PIL.

    torchvision's PNG decoder crashes the process (a segfault, not an exception) on most PNGs with
    a damaged chunk, as the fuzz tests found; PIL raises instead, so a bad PNG is one skipped sample.
    """
    if data[:3] == b"\xff\xd8\xff":
        return decode_jpeg(_uint8(data), mode=ImageReadMode.RGB)
    return _pil(data, "RGB")


def _pil(data: bytes, mode: str) -> torch.Tensor:
    """``[C,H,W]`` uint8 of an image PIL decodes, converted to ``mode`` (a channels-last view)."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.array(image.convert(mode))
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)
