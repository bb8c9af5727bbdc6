"""Model FLOPs and parameter counts of the teacher's trajectory and the student's training step.

Convention (torchtitan's, PaLM's "model FLOPs"): a multiply-accumulate is 2 FLOPs, and only the
matrix products are counted: the linear layers, the patch-embedding convolution and attention's
two batched products QK^T and AV. That is exactly what ``torch.utils.flop_counter.FlopCounterMode``
counts (tests check equality on real modules). Excluded: everything elementwise (norms, softmax,
GELU/SiLU, LayerScale, the depth-scaling gains, residual adds, the token loss: O(L N D) per sample
against O(L N D^2) counted), bias adds, and any recomputation (activation checkpointing, flash
attention's backward): MFU is model FLOPs per second over the device's dense peak.

Backward = 2 x forward per product (gradient w.r.t. input and w.r.t. weight), except where autograd
skips the input gradient: the depth-scaling MLP's first layer, whose input is the layer number t.

Per block application on N tokens of width D (forward, one sample):

    qkv 2N*D*3D + QK^T 2N^2*D + AV 2N^2*D + proj 2N*D^2 + fc1 2N*D*F + fc2 2N*H*D

with H the MLP's hidden width and F = H (GELU) or 2H (SwiGLU, fc1 packs gate and value).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn

from raptor.models.student import Raptor, segments_of
from raptor.models.teacher import Teacher, _mlp_kind


@dataclass(frozen=True)
class BlockShape:
    """A pre-norm transformer block: width D, heads, MLP kind and hidden width H."""

    width: int
    num_heads: int
    mlp: str = "gelu"  # "gelu" | "swiglu"
    mlp_hidden: int = 0  # H; 0 = 4 * width
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.width <= 0 or self.num_heads <= 0 or self.width % self.num_heads:
            raise ValueError(f"width {self.width} must be a positive multiple of num_heads {self.num_heads}")
        if not self.mlp_hidden:
            object.__setattr__(self, "mlp_hidden", 4 * self.width)

    @property
    def fc1_out(self) -> int:
        """F: fc1's output width (SwiGLU packs gate and value: 2H)."""
        return 2 * self.mlp_hidden if self.mlp == "swiglu" else self.mlp_hidden

    def forward_flops(self, tokens: int) -> int:
        """Forward matmul FLOPs of one application on one sample of ``tokens`` tokens."""
        D, N = self.width, tokens
        dense = 3 * D * D + D * D + D * self.fc1_out + self.mlp_hidden * D
        return 2 * N * dense + 4 * N * N * D

    def params(self, layerscale: bool = True) -> int:
        """Norms, qkv, proj, MLP and (optionally) the two LayerScale vectors."""
        D = self.width
        return (
            4 * D  # norm1, norm2 (weight + bias)
            + 3 * D * D + (3 * D if self.qkv_bias else 0) + D * D + D  # qkv, proj
            + D * self.fc1_out + self.fc1_out + self.mlp_hidden * D + D  # fc1, fc2
            + (2 * D if layerscale else 0)
        )


def _block_shape(blk: nn.Module) -> BlockShape:
    """The shape of a timm ViT block or a :class:`~raptor.models.RaptorBlock` (same attribute names)."""
    kind = blk.mlp.kind if hasattr(blk.mlp, "kind") else _mlp_kind(blk)
    return BlockShape(
        width=int(blk.attn.qkv.in_features),
        num_heads=int(blk.attn.num_heads),
        mlp=kind,
        mlp_hidden=int(blk.mlp.fc2.in_features),
        qkv_bias=blk.attn.qkv.bias is not None,
    )


@dataclass(frozen=True)
class TeacherShape:
    """A DINOv2-style timm ViT: patch embedding, cls/registers, positions, L blocks, final norm."""

    block: BlockShape
    depth: int
    num_patches: int
    num_registers: int = 0
    has_cls: bool = True
    patch_size: int = 14
    in_chans: int = 3
    pos_tokens: int | None = None  # rows of pos_embed; None = num_patches (DINOv2 reg: no_embed_class)
    layerscale: bool = True
    head_classes: int = 0  # linear head over the 2D readout (0: none)

    @property
    def num_prefix(self) -> int:
        return int(self.has_cls) + self.num_registers

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    @classmethod
    def from_model(cls, model: nn.Module, head_classes: int = 0) -> "TeacherShape":
        """Read the shape of a built timm VisionTransformer (works on the meta device)."""
        pos = getattr(model, "pos_embed", None)
        return cls(
            block=_block_shape(model.blocks[0]),
            depth=len(model.blocks),
            num_patches=int(model.patch_embed.num_patches),
            num_registers=int(getattr(model, "num_reg_tokens", 0)),
            has_cls=getattr(model, "cls_token", None) is not None,
            patch_size=int(model.patch_embed.patch_size[0]),
            in_chans=int(model.patch_embed.proj.in_channels),
            pos_tokens=int(pos.shape[1]) if pos is not None else 0,
            layerscale=hasattr(getattr(model.blocks[0], "ls1", None), "gamma"),
            head_classes=head_classes,
        )

    @classmethod
    def from_teacher(cls, teacher: Teacher) -> "TeacherShape":
        head = teacher.head.out_features if teacher.head is not None else 0
        return cls.from_model(teacher.model, head_classes=head)

    @classmethod
    def from_timm(cls, name: str, img_size: int = 224, **model_kwargs: Any) -> "TeacherShape":
        """The shape of ``timm.create_model(name, img_size=..., **model_kwargs)``, built on the meta
        device (no memory, no weights): exact for any timm ViT, e.g. DINOv2 S/B/L/g with registers."""
        import timm

        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, img_size=int(img_size), num_classes=0, **model_kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"unknown timm model {name!r}") from e
            raise
        return cls.from_model(model)

    def params(self) -> int:
        """Parameters of the teacher module (exactly ``sum(p.numel())`` of the timm model + head)."""
        D = self.block.width
        pos = self.num_patches if self.pos_tokens is None else self.pos_tokens
        embed = self.in_chans * self.patch_size**2 * D + D + (pos + self.num_prefix) * D
        head = (2 * D + 1) * self.head_classes
        return embed + self.depth * self.block.params(self.layerscale) + 2 * D + head

    def forward_flops(self, batch: int = 1) -> int:
        """The trajectory a_0..a_L of ``batch`` images: patch embedding + L block applications."""
        D = self.block.width
        embed = 2 * self.num_patches * D * self.in_chans * self.patch_size**2
        return batch * (embed + self.depth * self.block.forward_flops(self.num_tokens))


@dataclass(frozen=True)
class CallGroup:
    """Block applications of one loss term in one step, per sample.

    ``applications`` block applications (= predicted states) per sample, made in ``calls``
    sequential calls of ``rows_per_call`` stacked rows per sample each (the rollout: L calls of 1;
    teacher forcing: 1 call of n layers; AR: H calls of S starts). ``shared_t``: the call's layer
    number is one scalar for the whole batch (the rollout), so the depth-scaling MLP runs on one
    row, not one per sample. ``first_input_view``: the first call's input is a view of the
    trajectory (not a copy the step holds)."""

    block: int  # -1: the chained rollout over all blocks (stage 2)
    applications: int
    calls: int
    rows_per_call: int
    shared_t: bool
    first_input_view: bool


@dataclass(frozen=True)
class StudentShape:
    """k RaptorBlocks unrolled over the teacher's L layers, with the depth-scaling MLP 1 -> h -> 3D."""

    block: BlockShape
    depth: int
    num_tokens: int
    boundaries: tuple[int, ...]
    depth_hidden: int = 16  # 0 = no depth scaling

    def __post_init__(self) -> None:
        object.__setattr__(self, "boundaries", tuple(int(b) for b in self.boundaries))
        segments_of(self.boundaries, self.depth)  # validates

    @property
    def k(self) -> int:
        return len(self.boundaries) + 1

    @property
    def segments(self) -> list[tuple[int, int]]:
        return segments_of(self.boundaries, self.depth)

    @classmethod
    def from_student(cls, student: Raptor) -> "StudentShape":
        blk = student.blocks[0]
        dm = blk.depth_mlp
        return cls(
            block=_block_shape(blk),
            depth=student.depth,
            num_tokens=student.geometry.num_tokens,
            boundaries=tuple(student.boundaries),
            depth_hidden=int(dm[0].out_features) if dm is not None else 0,
        )

    @classmethod
    def from_teacher(
        cls,
        teacher: TeacherShape,
        boundaries: Sequence[int],
        *,
        mlp: str | None = None,
        mlp_hidden: int | None = None,
        depth_scaling: bool = True,
    ) -> "StudentShape":
        """The student ``Raptor.from_teacher`` builds (same MLP defaults: the teacher's kind and
        hidden width, or 4D for a different kind)."""
        tb = teacher.block
        kind = mlp or tb.mlp
        hidden = mlp_hidden or (tb.mlp_hidden if kind == tb.mlp else 4 * tb.width)
        return cls(
            block=replace(tb, mlp=kind, mlp_hidden=int(hidden)),
            depth=teacher.depth,
            num_tokens=teacher.num_tokens,
            boundaries=tuple(boundaries),
            depth_hidden=16 if depth_scaling else 0,
        )

    def block_params(self) -> int:
        h, D = self.depth_hidden, self.block.width
        depth_mlp = (2 * h + h * 3 * D + 3 * D) if h else 0
        return self.block.params(layerscale=True) + depth_mlp

    def params(self) -> int:
        """Trainable parameters: the k blocks (the teacher's embedding and norm are not the student's)."""
        return self.k * self.block_params()

    def _depth_mlp(self, rows: int) -> tuple[int, int]:
        """(forward, backward) FLOPs of the depth-scaling MLP on ``rows`` layer numbers."""
        h, D = self.depth_hidden, self.block.width
        if not h:
            return 0, 0
        fwd = 2 * rows * h + 2 * rows * h * 3 * D
        return fwd, 2 * rows * h + 2 * (2 * rows * h * 3 * D)  # no input gradient for t

    def call_groups(self, stage: int, *, tf: bool = False, ar: bool = True, horizon: int | None = None,
                    blocks: Sequence[int] | None = None) -> list[CallGroup]:
        """How one step of ``distill_loss`` applies the blocks (see :class:`CallGroup`).

        Stage 2: one rollout of L applications. Stage 1, per trained block j on its segment of
        n_j layers: teacher forcing (``tf``: one call on the n_j layers stacked along the batch;
        lambda > 0) and the autoregressive term (``ar``: H steps from S_j = n_j - H + 1 stacked
        starts, H = n_j by default, the paper; lambda < 1). Both run during the lambda anneal."""
        if stage == 2:
            return [CallGroup(-1, self.depth, self.depth, 1, True, True)]
        if stage != 1:
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if not (tf or ar):
            raise ValueError("stage 1 needs tf=True and/or ar=True")
        out = []
        for j in range(self.k) if blocks is None else [int(b) for b in blocks]:
            s, e = self.segments[j]
            n = e - s
            H = n if horizon is None else min(int(horizon), n)
            S = n - H + 1
            if tf:
                out.append(CallGroup(j, n, 1, n, False, n == 1))
            if ar:
                out.append(CallGroup(j, S * H, H, S, False, S == 1))
        return out

    def step_flops(
        self,
        stage: int,
        batch: int,
        *,
        tf: bool = False,
        ar: bool = True,
        horizon: int | None = None,
        blocks: Sequence[int] | None = None,
        backward: bool = True,
    ) -> int:
        """Matmul FLOPs of one step of ``raptor.distill.distill_loss`` on ``batch`` samples.

        Stage 2: the rollout a_0 -> a_L (L applications per sample). Stage 1, per trained block j
        on its segment of n_j layers: teacher forcing (``tf``: n_j applications, lambda > 0) and
        the autoregressive term (``ar``: S_j = n_j - H + 1 starts x H steps, lambda < 1; H = n_j
        by default, the paper). During the lambda anneal both terms run; at lambda = 1 only TF,
        after it only AR. ``backward`` adds the gradient products (2x, see the module docstring).
        """
        f_blk = self.block.forward_flops(self.num_tokens)
        fwd = bwd = 0
        for g in self.call_groups(stage, tf=tf, ar=ar, horizon=horizon, blocks=blocks):
            f, b = self._depth_mlp(1 if g.shared_t else batch * g.rows_per_call)
            fwd += batch * g.applications * f_blk + g.calls * f
            bwd += 2 * batch * g.applications * f_blk + g.calls * b
        return fwd + bwd if backward else fwd


    def checkpointed_applications(self, group: CallGroup, blocks: Sequence[int]) -> int:
        """Applications of ``group`` (per sample) made by the checkpointed ``blocks``: the whole
        group for a stage-1 block, the segments of those blocks in the stage-2 rollout."""
        chosen = {int(b) for b in blocks}
        if group.block >= 0:
            return group.applications if group.block in chosen else 0
        return sum(e - s for j, (s, e) in enumerate(self.segments) if j in chosen)

    def recompute_flops(
        self,
        stage: int,
        batch: int,
        blocks: Sequence[int],
        *,
        tf: bool = False,
        ar: bool = True,
        horizon: int | None = None,
    ) -> int:
        """Forward FLOPs that activation checkpointing of ``blocks`` adds to a step: the backward
        recomputes each of their applications once (hardware FLOPs, not model FLOPs)."""
        f_blk = self.block.forward_flops(self.num_tokens)
        total = 0
        for g in self.call_groups(stage, tf=tf, ar=ar, horizon=horizon):
            ck = self.checkpointed_applications(g, blocks)
            if ck:
                calls = g.calls * ck // g.applications
                total += batch * ck * f_blk + calls * self._depth_mlp(1 if g.shared_t else batch * g.rows_per_call)[0]
        return total


def stage_terms(stage: int, lam: float) -> tuple[bool, bool]:
    """(teacher forcing, autoregressive) computed at TF weight ``lam`` (stage 2: AR only)."""
    return (False, True) if stage == 2 else (lam > 0, lam < 1)


def flops_per_sample(
    student: StudentShape,
    teacher: TeacherShape | None = None,
    *,
    stage: int = 2,
    lam: float = 0.0,
    batch: int = 1,
    horizon: int | None = None,
    blocks: Sequence[int] | None = None,
) -> float:
    """Model FLOPs of one training sample: the online teacher's trajectory (``teacher``; None when
    trajectories come precomputed) + the student's forward and backward at TF weight ``lam``.

    ``batch`` only matters for the depth-scaling MLP's per-batch share in the rollout (tiny)."""
    tf, ar = stage_terms(stage, lam)
    total = student.step_flops(stage, batch, tf=tf, ar=ar, horizon=horizon, blocks=blocks)
    if teacher is not None:
        total += teacher.forward_flops(batch)
    return total / batch
