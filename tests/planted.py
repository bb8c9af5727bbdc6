"""Planted block-recurrent teachers for tests (importable: ``from tests.planted import ...``).

A planted teacher is a small DINOv2-architecture ViT (timm ``vit_small_patch14_reg4_dinov2`` with
overrides) whose L layers are copies of k distinct random blocks, e.g. pattern (7, 3, 2) ->
[A x 7, B x 3, C x 2], boundaries [7, 10]. A "distinct" teacher has L different random layers.
Block weights are drawn with std weight_scale/sqrt(fan_in) and LayerScale uniform in ``ls_range`` so every
layer moves the residual stream noticeably.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import nn

from raptor.models import Teacher

NAME = "vit_small_patch14_reg4_dinov2"


def boundaries_of(pattern: Sequence[int]) -> list[int]:
    """(7, 3, 2) -> [7, 10]."""
    return list(itertools.accumulate(pattern))[:-1]


@torch.no_grad()
def _randomize_block(
    block: nn.Module, gen: torch.Generator, ls_range: tuple[float, float], scale: float
) -> None:
    for m in block.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(scale * torch.randn(m.weight.shape, generator=gen) / math.sqrt(m.in_features))
            if m.bias is not None:
                m.bias.copy_(0.02 * torch.randn(m.bias.shape, generator=gen))
        elif isinstance(m, nn.LayerNorm):
            m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    lo, hi = ls_range
    for name in ("ls1", "ls2"):
        g = getattr(block, name).gamma
        g.copy_(lo + (hi - lo) * torch.rand(g.shape, generator=gen))


def build_teacher(
    pattern: Sequence[int] | None = (7, 3, 2),
    *,
    depth: int | None = None,
    width: int = 64,
    heads: int = 4,
    img_size: int = 56,
    ls_range: tuple[float, float] = (0.3, 1.0),
    weight_scale: float = 0.5,
    seed: int = 0,
    name: str = NAME,
) -> Teacher:
    """pattern=(7, 3, 2): layers are copies of 3 random blocks. pattern=None: ``depth`` distinct layers."""
    L = sum(pattern) if pattern is not None else int(depth or 12)
    torch.manual_seed(seed)
    teacher = Teacher.from_timm(name, img_size=img_size, embed_dim=width, depth=L, num_heads=heads)
    gen = torch.Generator().manual_seed(seed + 1)
    blocks = teacher.blocks
    if pattern is None:
        for blk in blocks:
            _randomize_block(blk, gen, ls_range, weight_scale)
        return teacher
    layer = 0
    for n in pattern:
        proto = blocks[layer]
        _randomize_block(proto, gen, ls_range, weight_scale)
        for i in range(1, n):
            blocks[layer + i].load_state_dict(proto.state_dict())
        layer += n
    return teacher


def images(n: int, img_size: int = 56, seed: int = 0) -> torch.Tensor:
    """Smooth random images (low-frequency noise upsampled), ImageNet-normalised scale."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, max(img_size // 7, 2), max(img_size // 7, 2), generator=gen)
    up = torch.nn.functional.interpolate(low, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return up + 0.3 * torch.randn(n, 3, img_size, img_size, generator=gen)
