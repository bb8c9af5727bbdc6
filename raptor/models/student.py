"""The block-recurrent student (Raptor): k shared blocks unrolled over the teacher's L layers.

METHOD.md section 4, written as the paper writes it:

    g1, g2, g3 = 1 + MLP_t(t)                       t = the 1-based layer being produced
    x = x + g1 * LS1(Attn(LN1 x))
    x = x + g2 * LS2(MLP(LN2 x))
    out = g3 * x

``boundaries`` b_1 < ... < b_{k-1} (1-based, in 1..L-1): block j produces layers b_{j-1}+1 .. b_j.
The student owns only the k blocks' parameters; the teacher's embedding and final norm are reused
through a reference that is deliberately not a submodule (so ``state_dict``, ``parameters`` and a
DeepSpeed engine see the blocks only).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from raptor.models.teacher import Teacher, TokenGeometry, _mlp_kind


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (weights never built)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """``gelu``: fc1 D->H, GELU, fc2 H->D.  ``swiglu``: fc1 D->2H, silu(a) * b, fc2 H->D.

    The SwiGLU packing (first half gated) matches timm's ``SwiGLUPacked`` and DINOv2's ``w12``.
    """

    def __init__(self, dim: int, hidden: int, kind: str = "swiglu"):
        super().__init__()
        if kind not in ("swiglu", "gelu"):
            raise ValueError(f"mlp must be 'swiglu' or 'gelu', got {kind!r}")
        self.kind = kind
        self.fc1 = nn.Linear(dim, 2 * hidden if kind == "swiglu" else hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.kind == "swiglu":
            a, b = x.chunk(2, dim=-1)
            x = F.silu(a) * b
        else:
            x = F.gelu(x)
        return self.fc2(x)


class RaptorBlock(nn.Module):
    """One shared pre-norm block with LayerScale and depth scaling (g1, g2, g3) = 1 + MLP_t(t)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp: str = "swiglu",
        mlp_hidden: int | None = None,
        qkv_bias: bool = True,
        ls_init: float = 1e-5,
        depth_scaling: bool = True,
        depth_hidden: int = 16,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = nn.Parameter(torch.full((dim,), float(ls_init)))
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden or 4 * dim, mlp)
        self.ls2 = nn.Parameter(torch.full((dim,), float(ls_init)))
        self.depth_scaling = depth_scaling
        self.checkpointing = False  # activation checkpointing of every application (Raptor.set_checkpointing)
        if depth_scaling:
            self.depth_mlp = nn.Sequential(
                nn.Linear(1, depth_hidden), nn.SiLU(), nn.Linear(depth_hidden, 3 * dim)
            )
        else:
            self.depth_mlp = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.depth_mlp is not None:
            nn.init.normal_(self.depth_mlp[0].weight, std=1.0)
            last = self.depth_mlp[2]
            nn.init.normal_(last.weight, std=1e-4)
            nn.init.zeros_(last.bias)

    def gains(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(g1, g2, g3), each ``[B or 1, 1, D]``, for layer numbers ``t`` (``[]``, ``[1]`` or ``[B]``)."""
        if self.depth_mlp is None:
            return None
        # 1 + delta is formed in the parameters' dtype: under bf16 autocast with fp32 parameters the
        # gains stay fp32 (not quantised to steps of 2^-8 around 1, which would compound over L
        # layers); with bf16 parameters (DeepSpeed bf16) everything stays bf16
        dt = self.ls1.dtype
        g = 1.0 + self.depth_mlp(t.reshape(-1, 1).to(dt)).to(dt)
        g1, g2, g3 = g.unsqueeze(1).chunk(3, dim=-1)
        return g1, g2, g3

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():  # keep only x and t; recompute in backward
            return checkpoint(self._forward, x, t, use_reentrant=False)
        return self._forward(x, t)

    def _forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g = self.gains(t)
        if g is None:
            x = x + self.ls1 * self.attn(self.norm1(x))
            return x + self.ls2 * self.mlp(self.norm2(x))
        g1, g2, g3 = g
        x = x + g1 * (self.ls1 * self.attn(self.norm1(x)))
        x = x + g2 * (self.ls2 * self.mlp(self.norm2(x)))
        return g3 * x

    @torch.no_grad()
    def copy_from_timm(self, block: nn.Module) -> None:
        """Initialise from a timm ViT block (norms, attention, LayerScale, MLP)."""
        kind = _mlp_kind(block)
        if kind != self.mlp.kind or block.mlp.fc1.weight.shape != self.mlp.fc1.weight.shape:
            raise ValueError(
                f"cannot copy a {kind} teacher MLP {tuple(block.mlp.fc1.weight.shape)} into a "
                f"{self.mlp.kind} student MLP {tuple(self.mlp.fc1.weight.shape)}"
            )
        pairs = [
            (self.norm1, block.norm1), (self.norm2, block.norm2), (self.attn.qkv, block.attn.qkv),
            (self.attn.proj, block.attn.proj), (self.mlp.fc1, block.mlp.fc1),
            (self.mlp.fc2, block.mlp.fc2),
        ]
        for dst, src in pairs:
            dst.weight.copy_(src.weight)
            if dst.bias is not None:
                dst.bias.copy_(src.bias if src.bias is not None else torch.zeros_like(dst.bias))
        for mine, name in ((self.ls1, "ls1"), (self.ls2, "ls2")):
            ls = getattr(block, name, None)
            mine.copy_(ls.gamma if hasattr(ls, "gamma") else torch.ones_like(mine))


def check_boundaries(boundaries: Sequence[int], depth: int) -> list[int]:
    """Validate 1-based boundaries b_1 < ... < b_{k-1} in 1..L-1 and return them as ints."""
    b = [int(x) for x in boundaries]
    if any(int(x) != x for x in boundaries):
        raise ValueError(f"boundaries must be integers, got {list(boundaries)}")
    if len(b) + 1 > depth:
        raise ValueError(f"k = {len(b) + 1} blocks > depth L = {depth}")
    if any(y <= x for x, y in zip(b, b[1:])):
        raise ValueError(f"boundaries must be strictly increasing, got {b}")
    if b and (b[0] < 1 or b[-1] > depth - 1):
        raise ValueError(f"boundaries must lie in 1..{depth - 1} (L = {depth}), got {b}")
    return b


def segments_of(boundaries: Sequence[int], depth: int) -> list[tuple[int, int]]:
    """Per block j, ``(start, end)``: block j produces layers start+1..end."""
    edges = [0, *check_boundaries(boundaries, depth), depth]
    return list(zip(edges[:-1], edges[1:]))


class Raptor(nn.Module):
    """k RaptorBlocks unrolled over L layers; reuses the teacher's embedding and final norm."""

    def __init__(
        self,
        blocks: Sequence[RaptorBlock],
        boundaries: Sequence[int],
        geometry: TokenGeometry,
        teacher: Teacher | None = None,
    ):
        super().__init__()
        self.geometry = geometry
        self.depth = geometry.depth
        self.boundaries = check_boundaries(boundaries, self.depth)
        self.segments = segments_of(self.boundaries, self.depth)
        if len(blocks) != len(self.segments):
            raise ValueError(f"{len(blocks)} blocks for {len(self.segments)} segments")
        for blk in blocks:
            if blk.dim != geometry.width:
                raise ValueError(f"block width {blk.dim} != teacher width {geometry.width}")
        self.blocks = nn.ModuleList(blocks)
        # owner[l-1] = the block that produces layer l (static Python ints: compile-friendly)
        self.owner = [j for j, (s, e) in enumerate(self.segments) for _ in range(s, e)]
        self.register_buffer(
            "layer_t", torch.arange(1, self.depth + 1, dtype=torch.float32), persistent=False
        )
        self._teacher: list[Teacher] = []
        if teacher is not None:
            self.attach(teacher)
        self.config: dict = {}

    @property
    def k(self) -> int:
        return len(self.blocks)

    def describe(self) -> dict:
        """The architecture as a saved manifest's ``student`` section: what rebuilds it (empty) from a file."""
        blk = self.blocks[0]
        block = dict(dim=blk.dim, num_heads=blk.attn.num_heads, mlp=blk.mlp.kind, mlp_hidden=blk.mlp.fc2.in_features,
                     qkv_bias=blk.attn.qkv.bias is not None, depth_scaling=blk.depth_mlp is not None,
                     norm_eps=float(blk.norm1.eps))
        return {"boundaries": list(self.boundaries), "depth": self.depth, "k": self.k, "block": block,
                "layout": self.geometry.to_dict()}

    @property
    def teacher(self) -> Teacher | None:
        return self._teacher[0] if self._teacher else None

    def attach(self, teacher: Teacher) -> "Raptor":
        """Use ``teacher``'s embedding and final norm (not registered: not part of the student)."""
        lay = teacher.geometry
        if (lay.width, lay.depth, lay.num_prefix, lay.num_patches) != (
            self.geometry.width, self.geometry.depth, self.geometry.num_prefix, self.geometry.num_patches,
        ):
            raise ValueError(f"teacher geometry {lay} does not match the student's {self.geometry}")
        self._teacher = [teacher]
        return self

    @classmethod
    def from_teacher(
        cls,
        teacher: Teacher,
        boundaries: Sequence[int],
        init: str = "random",
        *,
        mlp: str | None = None,
        mlp_hidden: int | None = None,
        depth_scaling: bool = True,
        ls_init: float = 1e-5,
        seed: int | None = None,
    ) -> "Raptor":
        """k = len(boundaries)+1 blocks of the teacher's width and heads.

        ``init="teacher"`` copies block j from the first teacher layer of its segment.
        ``mlp``: ``"swiglu"`` or ``"gelu"``; default (None) = the teacher's own MLP kind and hidden
        size (GELU 4D for ViT-S/B/L, SwiGLU for ViT-g), which ``init="teacher"`` requires.
        """
        if init not in ("random", "teacher"):
            raise ValueError(f"init must be 'random' or 'teacher', got {init!r}")
        lay = teacher.geometry
        bnd = check_boundaries(boundaries, lay.depth)
        tblk = teacher.blocks[0]
        kind = mlp or teacher.mlp_kind
        if mlp_hidden is None:
            mlp_hidden = tblk.mlp.fc2.in_features if kind == teacher.mlp_kind else 4 * lay.width
        cfg = dict(
            dim=lay.width, num_heads=lay.num_heads, mlp=kind, mlp_hidden=int(mlp_hidden),
            qkv_bias=tblk.attn.qkv.bias is not None, ls_init=ls_init, depth_scaling=depth_scaling,
            norm_eps=float(getattr(tblk.norm1, "eps", 1e-6)),
        )
        gen_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            blocks = [RaptorBlock(**{k: v for k, v in cfg.items() if k != "dim"}, dim=lay.width)
                      for _ in range(len(bnd) + 1)]
        finally:
            if seed is not None:
                torch.random.set_rng_state(gen_state)
        student = cls(blocks, bnd, lay, teacher)
        student.config = cfg
        if init == "teacher":
            for blk, (s, _) in zip(student.blocks, student.segments):
                blk.copy_from_timm(teacher.blocks[s])
        return student.to(teacher.device)

    # ---------------------------------------------------------------- the hot path
    def rollout(self, a0: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """States for layers start+1..end from the state ``a0`` after layer ``start``.

        ``[B, end-start, N, D]``; layer l is produced by the block that owns it with t = l.
        The loop runs over static Python ints: capturable by ``torch.compile(fullgraph=True)``.
        """
        end = self.depth if end is None else end
        if not 0 <= start < end <= self.depth:
            raise ValueError(f"need 0 <= start < end <= {self.depth}, got {start}, {end}")
        x = a0
        out = []
        for l in range(start + 1, end + 1):
            x = self.blocks[self.owner[l - 1]](x, self.layer_t[l - 1 : l])
            out.append(x)
        return torch.stack(out, dim=1)

    def forward(self, a0: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Same as :meth:`rollout` (so ``torch.compile(student)`` and engines wrap the hot path)."""
        return self.rollout(a0, start, end)

    def rollout_from(self, x: torch.Tensor, starts: torch.Tensor, horizon: int, block: int) -> torch.Tensor:
        """Roll ``horizon`` steps of ONE block from per-sample start layers.

        ``x`` ``[M, N, D]`` are states after layers ``starts`` (``[M]``, ints); sample m produces
        layers starts[m]+1 .. starts[m]+horizon, all inside ``block``'s segment. -> ``[M, H, N, D]``.
        """
        blk = self.blocks[block]
        t = starts.to(self.layer_t.dtype)
        out = []
        for h in range(horizon):
            x = blk(x, t + (h + 1))
            out.append(x)
        return torch.stack(out, dim=1)

    def teacher_forcing(self, inputs: torch.Tensor, start: int) -> torch.Tensor:
        """Predict layers start+1..start+n from the teacher's states a_start..a_{start+n-1}.

        ``inputs`` ``[B, n, N, D]``. Each block runs ONCE on its layers stacked along the batch
        with per-sample t. -> ``[B, n, N, D]``.
        """
        B, n = inputs.shape[:2]
        end = start + n
        if not 0 <= start < end <= self.depth:
            raise ValueError(f"need 0 <= start < start+n <= {self.depth}, got {start}, {n}")
        outs = []
        for j, (s, e) in enumerate(self.segments):
            lo, hi = max(s, start), min(e, end)
            if lo >= hi:
                continue
            m = hi - lo
            x = inputs[:, lo - start : hi - start].reshape(B * m, *inputs.shape[2:])
            t = self.layer_t[lo:hi].repeat(B)  # layer numbers lo+1..hi for each sample
            outs.append(self.blocks[j](x, t).reshape(B, m, *inputs.shape[2:]))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    # ---------------------------------------------------------------- with the teacher
    def _need_teacher(self) -> Teacher:
        if self.teacher is None:
            raise ValueError("no teacher attached: student.attach(teacher) (it provides embed/norm)")
        return self.teacher

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self._need_teacher().embed(images)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        return self._need_teacher().readout(x)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images -> a_0 (teacher) -> rollout -> readout ``[B, 2D]``."""
        return self.readout(self.rollout(self.embed(images))[:, -1])

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        t = self._need_teacher()
        if t.head is None:
            raise ValueError("the teacher has no linear head")
        return t.head(self.features(images))

    def set_checkpointing(self, enabled: bool | Sequence[int] = True) -> "Raptor":
        """Activation checkpointing: the chosen blocks (all with ``True``, none with ``False``, or a
        list of block indices) keep only each application's input and recompute it in backward."""
        chosen = set(range(self.k)) if enabled is True else set() if enabled is False else {int(j) for j in enabled}
        if not chosen <= set(range(self.k)):
            raise ValueError(f"checkpointing blocks {sorted(chosen)} out of range for k = {self.k}")
        for j, blk in enumerate(self.blocks):
            blk.checkpointing = j in chosen
        return self

    def segment_params(self, blocks: Sequence[int] | None = None) -> list[nn.Parameter]:
        """Parameters of the chosen blocks (all by default)."""
        idx = range(self.k) if blocks is None else blocks
        return [p for j in idx for p in self.blocks[j].parameters()]
