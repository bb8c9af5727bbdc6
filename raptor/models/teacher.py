"""The frozen teacher: a DINOv2-family (or any timm) ViT exposed as a residual-stream trajectory.

    a_0 = patch embedding + positions, cls and registers prepended     (teacher.embed)
    a_l = block_l(a_{l-1}),  l = 1..L                                  (teacher.run_blocks)
    readout(a_L) = [norm(a_L)[cls], mean(norm(a_L)[patches])]          (teacher.readout, 2D)

``teacher.trajectory(images)`` returns all L+1 states in one no-grad pass, ``[B, L+1, N, D]``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from raptor.models import checkpoints as ckpt


@dataclass(frozen=True)
class TokenGeometry:
    """Token and shape bookkeeping of a ViT residual stream.

    Tokens are ordered [cls, registers..., patches...] (DINOv2's and timm's order).
    """

    num_prefix: int  # cls + registers
    num_registers: int
    num_patches: int
    depth: int  # L
    width: int  # D
    num_heads: int = 1
    patch_size: int = 14
    img_size: int = 224

    @property
    def has_cls(self) -> bool:
        return self.num_prefix - self.num_registers > 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    def groups(self) -> dict[str, slice]:
        """Token groups present in this stream: ``cls``, ``registers``, ``patches``."""
        out: dict[str, slice] = {}
        c = self.num_prefix - self.num_registers
        if c:
            out["cls"] = slice(0, c)
        if self.num_registers:
            out["registers"] = slice(c, self.num_prefix)
        out["patches"] = slice(self.num_prefix, self.num_tokens)
        return out

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _mlp_kind(block: nn.Module) -> str:
    mlp = block.mlp
    fc1 = getattr(mlp, "fc1", None)
    fc2 = getattr(mlp, "fc2", None)
    if fc1 is not None and fc2 is not None and fc1.out_features == 2 * fc2.in_features:
        return "swiglu"
    return "gelu"


def autocast(device: torch.device, amp: bool | torch.dtype):
    """``torch.autocast`` for ``amp`` = False (off), True (bf16) or a dtype; a no-op when off."""
    if not amp:
        return contextlib.nullcontext()
    dtype = amp if isinstance(amp, torch.dtype) else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _infer_kwargs(model: nn.Module) -> dict[str, Any]:
    """Architecture kwargs that rebuild ``model`` with ``timm.create_model`` (checked at save)."""
    blk = model.blocks[0]
    kw: dict[str, Any] = dict(
        patch_size=int(model.patch_embed.patch_size[0]),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(blk.attn.num_heads),
        reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        class_token=model.cls_token is not None,
        no_embed_class=bool(getattr(model, "no_embed_class", False)),
        qkv_bias=blk.attn.qkv.bias is not None,
    )
    ls = getattr(blk, "ls1", None)
    if ls is not None and hasattr(ls, "gamma"):
        kw["init_values"] = 1e-5
    hidden = blk.mlp.fc2.in_features
    if _mlp_kind(blk) == "swiglu":
        kw["mlp_ratio"] = 2 * hidden / kw["embed_dim"]
    else:
        kw["mlp_ratio"] = hidden / kw["embed_dim"]
    return kw


class Teacher(nn.Module):
    """A frozen timm ViT (always in eval mode, no gradients) with an optional linear head.

    Build with :meth:`from_timm` (by name, optional checkpoint), :meth:`from_model` (an already
    built timm ViT, e.g. one trained here) or :meth:`load` (the project's own export).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        img_size: int,
        model_kwargs: dict[str, Any] | None = None,
        head: nn.Linear | None = None,
        checkpoint: str | None = None,
    ):
        super().__init__()
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise TypeError(f"Teacher needs a timm VisionTransformer, got {type(model).__name__}")
        self.model = model
        self.name = name
        self.img_size = int(img_size)
        self.model_kwargs = dict(model_kwargs or {})
        self.checkpoint = checkpoint
        self.head = head
        blk = model.blocks[0]
        patch = int(model.patch_embed.patch_size[0])
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        nreg = int(getattr(model, "num_reg_tokens", 0))
        self.geometry = TokenGeometry(
            num_prefix=int(model.num_prefix_tokens),
            num_registers=nreg,
            num_patches=grid[0] * grid[1],
            depth=len(model.blocks),
            width=int(model.embed_dim),
            num_heads=int(blk.attn.num_heads),
            patch_size=patch,
            img_size=self.img_size,
        )
        self.mlp_kind = _mlp_kind(blk)
        self.requires_grad_(False)
        self.eval()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_timm(
        cls,
        name: str,
        img_size: int = 224,
        checkpoint: str | None = None,
        drop_path_rate: float = 0.0,
        *,
        pretrained: bool = False,
        head: str | None = None,
        **model_kwargs: Any,
    ) -> "Teacher":
        """Build ``timm.create_model(name, img_size=..., **model_kwargs)`` and wrap it, frozen.

        ``model_kwargs`` are timm overrides (``embed_dim=64, depth=12, num_heads=4`` builds a small
        DINOv2-architecture teacher). ``checkpoint``: local path or fsspec URL in the official
        DINOv2 ``.pth`` layout, timm/HF safetensors, or a :meth:`save` export (whose linear head is
        loaded too). ``head``: optional separate DINOv2 linear-head file (``weight``/``bias`` over
        the 2D readout). ``pretrained=True`` lets timm download its own weights.
        """
        import timm

        if int(img_size) <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        model_kwargs = dict(model_kwargs)
        model_kwargs.pop("num_classes", None)
        try:
            model = timm.create_model(
                name,
                pretrained=pretrained,
                img_size=int(img_size),
                num_classes=0,
                drop_path_rate=drop_path_rate,
                **model_kwargs,
            )
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"unknown timm model {name!r}") from e
            raise
        patch = int(model.patch_embed.patch_size[0])
        if int(img_size) % patch:
            raise ValueError(
                f"img_size {img_size} is not divisible by the patch size {patch} of {name}"
            )
        if not hasattr(model, "blocks"):
            raise ValueError(f"{name} is not a ViT with .blocks")
        lin = None
        if checkpoint is not None:
            sd, meta = ckpt.read_checkpoint(checkpoint)
            body, head_sd = ckpt.split_head(sd)
            if meta.get("format") == ckpt.TEACHER_FORMAT:
                saved_kw = json.loads(meta.get("model_kwargs", "{}"))
                if meta.get("timm_name") != name or any(
                    saved_kw.get(k) != v for k, v in model_kwargs.items() if k in saved_kw
                ):
                    raise ckpt.CheckpointError(
                        f"{checkpoint} is a teacher export of {meta.get('timm_name')} "
                        f"{saved_kw}, not {name} {model_kwargs}; use Teacher.load({checkpoint!r})"
                    )
            if not body:
                raise ckpt.CheckpointError(f"{checkpoint} holds only a linear head, not a backbone")
            ckpt.load_into(model, ckpt.to_timm_state_dict(body, model), checkpoint)
            if head_sd:
                lin = _head_from_state(head_sd, 2 * model.embed_dim, checkpoint)
        if head is not None:
            sd, _ = ckpt.read_checkpoint(head)
            _, head_sd = ckpt.split_head(sd)
            lin = _head_from_state(head_sd, 2 * model.embed_dim, head)
        return cls(
            model, name=name, img_size=img_size, model_kwargs=model_kwargs, head=lin,
            checkpoint=checkpoint,
        )

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        name: str | None = None,
        img_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        head: nn.Linear | None = None,
        copy: bool = True,
    ) -> "Teacher":
        """Wrap an already built timm ViT (a frozen deep copy; ``copy=False`` freezes it in place).

        Wrappers are unwrapped (``torch.compile``'s ``_orig_mod``, DDP/DeepSpeed ``.module``), so a
        trainer can call ``Teacher.from_model(model).save(url)`` mid-training and keep training.

        ``name``/``model_kwargs`` let :meth:`save` rebuild it; by default the name comes from the
        model's ``pretrained_cfg`` and the kwargs are inferred from its modules (verified at save).
        A timm classifier over the cls token (``global_pool='token'``, the DINOv2 default) is
        turned into the equivalent linear head over the 2D readout ``[cls, mean patch]`` (zeros on
        the patch half), so the logits are unchanged; pass ``head`` to override.
        """
        for attr in ("_orig_mod", "module"):
            while hasattr(model, attr) and not hasattr(model, "blocks"):
                model = getattr(model, attr)
        model = getattr(model, "_orig_mod", model)
        if copy:
            import copy as _copy

            model = _copy.deepcopy(model)
        if name is None:
            cfg = getattr(model, "pretrained_cfg", None) or {}
            name = cfg.get("architecture")
            if not name:
                raise ValueError("cannot tell the timm name of this model; pass name=...")
        if img_size is None:
            img_size = int(model.patch_embed.img_size[0])
        if model_kwargs is None:
            model_kwargs = _infer_kwargs(model)
        if head is None:
            head = _readout_head_from_timm(model)
        if getattr(model, "num_classes", 0):
            model.reset_classifier(0)
        return cls(model, name=name, img_size=img_size, model_kwargs=model_kwargs, head=head)

    @classmethod
    def load(cls, url: str) -> "Teacher":
        """Load a :meth:`save` export: the safetensors metadata rebuilds the architecture."""
        sd, meta = ckpt.read_checkpoint(url)
        if meta.get("format") != ckpt.TEACHER_FORMAT:
            raise ckpt.CheckpointError(
                f"{url} is not a raptor teacher export (no '{ckpt.TEACHER_FORMAT}' metadata); "
                "use Teacher.from_timm(name, checkpoint=...)"
            )
        import timm

        name = meta["timm_name"]
        img_size = int(meta["img_size"])
        kwargs = json.loads(meta.get("model_kwargs", "{}"))
        model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0, **kwargs)
        body, head_sd = ckpt.split_head(sd)
        ckpt.load_into(model, ckpt.to_timm_state_dict(body, model), url)
        lin = _head_from_state(head_sd, 2 * model.embed_dim, url) if head_sd else None
        return cls(model, name=name, img_size=img_size, model_kwargs=kwargs, head=lin, checkpoint=url)

    def save(self, url: str, metadata: dict[str, Any] | None = None) -> None:
        """Export as one safetensors file: timm keys + ``head.*``; metadata rebuilds the model.

        Metadata: ``format=raptor-teacher``, ``timm_name``, ``img_size``, ``model_kwargs`` (JSON),
        plus ``metadata`` given here (JSON-encoded values). Loads with :meth:`load` or
        ``Teacher.from_timm(name, img_size, checkpoint=url, **model_kwargs)``.
        """
        self._check_rebuildable()
        tensors = dict(self.model.state_dict())
        if self.head is not None:
            tensors["head.weight"] = self.head.weight
            tensors["head.bias"] = self.head.bias
        meta = {
            "format": ckpt.TEACHER_FORMAT,
            "version": "1",
            "timm_name": self.name,
            "img_size": str(self.img_size),
            "model_kwargs": json.dumps(self.model_kwargs, sort_keys=True),
            "layout": json.dumps(self.geometry.to_dict()),
        }
        for k, v in (metadata or {}).items():
            meta[k] = v if isinstance(v, str) else json.dumps(v)
        ckpt.save_safetensors(url, tensors, meta)
        self.checkpoint = url

    def _check_rebuildable(self) -> None:
        import timm

        with torch.device("meta"):
            fresh = timm.create_model(
                self.name, pretrained=False, img_size=self.img_size, num_classes=0, **self.model_kwargs
            )
        a = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()))[:6]
            raise ValueError(
                f"{self.name} with model_kwargs={self.model_kwargs} does not rebuild this teacher "
                f"(differs at {diff}); pass name=/model_kwargs= to Teacher.from_model"
            )

    def set_head(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Attach a linear head over the 2D readout (DINOv2 linear-head format)."""
        self.head = _head_from_state(
            {"weight": weight, "bias": bias if bias is not None else torch.zeros(weight.shape[0])},
            2 * self.geometry.width,
            "head",
        ).to(self.device)

    # ---------------------------------------------------------------- frozen module
    def train(self, mode: bool = True) -> "Teacher":  # the teacher never trains
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.patch_embed.proj.weight.device

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def depth(self) -> int:
        return self.geometry.depth

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"images are {tuple(images.shape[-2:])}, this teacher was built for "
                f"{self.img_size}x{self.img_size}"
            )

    # ---------------------------------------------------------------- the stream
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """a_0: patch embedding + positions with cls and registers prepended, ``[B, N, D]``.

        Computed in the weights' dtype even under autocast: a bf16 patch embedding errs by ~2^-9
        of |a_0|, and the blocks' updates are only a few % of |a_0| (2.8% over all 12 layers of
        the quickstart teacher), so that error alone cost the bf16-autocast trajectory 0.02 of
        update-R^2 against fp32. The convolution is ~0.5% of the forward's FLOPs."""
        self.check_images(images)
        m = self.model
        with torch.autocast(images.device.type, enabled=False):
            x = m.patch_embed(images.to(m.patch_embed.proj.weight.dtype))
            x = m._pos_embed(x)
            x = m.patch_drop(x)
            return m.norm_pre(x)

    def run_blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Apply teacher layers start+1..end to the state after layer ``start``."""
        end = self.depth if end is None else end
        if not 0 <= start <= end <= self.depth:
            raise ValueError(f"need 0 <= start <= end <= {self.depth}, got {start}, {end}")
        for blk in self.model.blocks[start:end]:
            x = blk(x)
        return x

    @torch.no_grad()
    def trajectory(
        self,
        images: torch.Tensor,
        amp: bool | torch.dtype = False,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """All states a_0..a_L in one pass, ``[B, L+1, N, D]`` (raw residual stream, no norm).

        ``amp=True`` runs under bf16 autocast (or pass a dtype); the result is stored as ``dtype``.
        """
        with autocast(images.device, amp):
            x = self.embed(images)
            out = x.new_empty((x.shape[0], self.depth + 1, *x.shape[1:]), dtype=dtype)
            out[:, 0] = x
            for i, blk in enumerate(self.model.blocks):
                x = blk(x)
                out[:, i + 1] = x
        return out

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, then [cls, mean of patch tokens] (registers excluded) -> ``[B, 2D]``."""
        if not self.geometry.has_cls:
            raise ValueError(f"{self.name} has no cls token; the readout needs one")
        x = self.model.norm(x)
        return torch.cat([x[:, 0], x[:, self.geometry.num_prefix :].mean(dim=1)], dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Linear head over :meth:`readout` of a final state."""
        if self.head is None:
            raise ValueError("this teacher has no linear head")
        return self.head(self.readout(x))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The 2D readout features of ``images``."""
        return self.readout(self.run_blocks(self.embed(images)))


def _head_from_state(sd: dict[str, torch.Tensor], in_features: int, url: str) -> nn.Linear:
    w = sd.get("weight")
    if w is None or w.ndim != 2:
        raise ckpt.CheckpointError(f"{url}: linear head needs 'weight' [C, {in_features}]")
    if w.shape[1] != in_features:
        raise ckpt.CheckpointError(
            f"{url}: linear head expects {w.shape[1]} inputs, the readout has {in_features} "
            "(cls + mean patch)"
        )
    b = sd.get("bias")
    lin = nn.Linear(in_features, w.shape[0], bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b if b is not None else torch.zeros(w.shape[0]))
    lin.requires_grad_(False)
    return lin


def _readout_head_from_timm(model: nn.Module) -> nn.Linear | None:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        return None
    D = int(model.embed_dim)
    pool = getattr(model, "global_pool", "token")
    fc_norm = getattr(model, "fc_norm", None)
    if fc_norm is not None and not isinstance(fc_norm, nn.Identity):
        raise ValueError(
            "this timm model normalises after pooling (fc_norm); its head does not act on the "
            "DINOv2 readout. Train with global_pool='token' (or fc_norm=False) or pass head=..."
        )
    w = torch.zeros(head.out_features, 2 * D)
    if pool == "token":
        w[:, :D] = head.weight.detach()
    elif pool == "avg" and not getattr(model, "pool_include_prefix", False):
        w[:, D:] = head.weight.detach()
    else:
        raise ValueError(f"cannot convert a timm head with global_pool={pool!r}; pass head=...")
    lin = nn.Linear(2 * D, head.out_features)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(head.bias.detach() if head.bias is not None else torch.zeros(head.out_features))
    lin.requires_grad_(False)
    return lin.to(head.weight.device)
