"""A procedural labelled image set: the embedded default dataset, no downloads needed.

Each class is a (shape, palette) pair: ten shapes, some told apart only by their texture (a plain
disc, a striped disc, a dotted square, a checkered square), drawn at a random position, scale and
rotation over a noisy, tinted gradient background. Class c has shape c % 10 and palette
(c % 10 + c // 10) % 4, so colour is an easy first cue that narrows the class down to a few, and
shape and texture decide among them: a small ViT learns it well above chance within minutes on a
CPU, and its later layers have real work to do. Every sample is a pure function of (seed, index), so shards
can be generated in parallel, skipped on re-runs and regenerated bit for bit.

Dense samples add a segmentation mask (0 = background, class + 1 on the object) and a depth map (a
ramp receding across the background with the object standing in front of it), for the probes.
"""

from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from raptor.data.sources import digest
from raptor.errors import UserError

SHAPES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "diamond",
    "ellipse",
    "striped-disc",
    "checkered-square",
    "dotted-square",
)
# hue ranges (0..1) of the object's colour
PALETTES = {"warm": (0.0, 0.1), "green": (0.25, 0.4), "cool": (0.55, 0.68), "purple": (0.75, 0.9)}
MAX_CLASSES = len(SHAPES) * len(PALETTES)


def class_parts(label: int) -> tuple[str, str]:
    """(shape, palette) of a class; distinct for every label below MAX_CLASSES."""
    shape = label % len(SHAPES)
    return SHAPES[shape], list(PALETTES)[(shape + label // len(SHAPES)) % len(PALETTES)]


def class_names(num_classes: int) -> list[str]:
    return ["-".join(class_parts(c)) for c in range(num_classes)]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The object's pixels in its own frame (unit size, centred, rotated)."""
    radius2 = u * u + v * v
    square = np.maximum(np.abs(u), np.abs(v)) < 0.8
    if shape == "disc":
        return radius2 < 1
    if shape == "square":
        return square
    if shape == "triangle":
        return (v > -0.5) & (v < 1 - np.sqrt(3) * np.abs(u))
    if shape == "ring":
        return (radius2 < 1) & (radius2 > 0.3)
    if shape == "cross":
        return ((np.abs(u) < 0.3) & (np.abs(v) < 1)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1))
    if shape == "diamond":
        return np.abs(u) + np.abs(v) < 1
    if shape == "ellipse":
        return u * u + (v / 0.45) ** 2 < 1
    if shape == "striped-disc":
        return (radius2 < 1) & (np.sin(u * 12) > 0)
    if shape == "checkered-square":
        return square & (np.sin(u * 10) * np.sin(v * 10) > 0)
    if shape == "dotted-square":
        fu, fv = (u * 2.5) % 1 - 0.5, (v * 2.5) % 1 - 0.5
        return square & (fu * fu + fv * fv < 0.09)
    raise AssertionError(shape)


@dataclass
class SyntheticSource:
    """``n`` procedural samples of ``num_classes`` classes at ``size`` x ``size`` pixels."""

    n: int
    num_classes: int
    size: int
    seed: int = 0
    dense: bool = False
    quality: int = 90
    classes: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise UserError(f"num_classes must be 2..{MAX_CLASSES}, got {self.num_classes}")
        if self.size < 16:
            raise UserError(f"size must be at least 16 pixels, got {self.size}")
        if self.n < 1:
            raise UserError(f"need at least one sample, got n={self.n}")
        self.classes = class_names(self.num_classes)
        axis = np.linspace(-1, 1, self.size, dtype=np.float32)
        self._y, self._x = np.meshgrid(axis, axis, indexing="ij")

    def __len__(self) -> int:
        return self.n

    def nbytes(self, index: int) -> int | None:
        return None

    def fingerprint(self) -> str:
        params = [self.n, self.num_classes, self.size, self.seed, self.dense, self.quality]
        return digest(["synthetic", *params])

    def label(self, index: int) -> int:
        return index % self.num_classes

    def draw(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(RGB uint8 HxWx3, object mask HxW bool, depth float32 HxW) of sample ``index``."""
        label = self.label(index)
        rng = np.random.default_rng([self.seed, index])
        x, y = self._x, self._y
        # background: a tinted gradient in a random direction, plus noise
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * x + np.sin(angle) * y + 1.5) / 3  # 0..1
        base = rng.uniform(0.2, 0.8, 3).astype(np.float32)
        tint = rng.uniform(-0.25, 0.25, 3).astype(np.float32)
        image = base + ramp[..., None] * tint
        # the object: class shape, random place, scale and rotation, palette colour
        cx, cy = rng.uniform(-0.35, 0.35, 2)
        scale = rng.uniform(0.35, 0.6)
        theta = rng.uniform(0, 2 * np.pi)
        dx, dy = (x - cx) / scale, (y - cy) / scale
        u = np.cos(theta) * dx + np.sin(theta) * dy
        v = -np.sin(theta) * dx + np.cos(theta) * dy
        shape, palette = class_parts(label)
        mask = _shape_mask(shape, u, v)
        lo, hi = PALETTES[palette]
        colour = colorsys.hsv_to_rgb(rng.uniform(lo, hi), rng.uniform(0.6, 1), rng.uniform(0.6, 1))
        image[mask] = np.asarray(colour, dtype=np.float32)
        image += rng.normal(0, 0.04, image.shape).astype(np.float32)
        rgb = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
        depth = (2 + 2 * ramp).astype(np.float32)
        depth[mask] = rng.uniform(0.8, 1.5) + 0.1 * v[mask]
        return rgb, mask, depth

    def sample(self, index: int) -> dict[str, bytes | str]:
        rgb, mask, depth = self.draw(index)
        label = self.label(index)
        out: dict[str, bytes | str] = {
            "__key__": f"{index:08d}",
            "jpg": _encode(Image.fromarray(rgb), "JPEG", quality=self.quality),
            "cls": str(label),
        }
        if self.dense:
            seg = (mask * (label + 1)).astype(np.uint8)
            out["seg.png"] = _encode(Image.fromarray(seg), "PNG")
            buf = io.BytesIO()
            np.save(buf, depth)
            out["depth.npy"] = buf.getvalue()
        return out


def _encode(image: Image.Image, fmt: str, **kw: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def synthetic_source(
    n: int, num_classes: int = 10, size: int = 112, seed: int = 0, dense: bool = False
) -> SyntheticSource:
    """The procedural generator as a shard source (see the module docstring)."""
    return SyntheticSource(n, num_classes, size, seed, dense)
