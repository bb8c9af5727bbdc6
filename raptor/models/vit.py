"""The student as a whole ViT: the teacher's stem (patch embedding, cls/register tokens, position
embeddings), the k recurrent blocks, the final norm and linear heads, in one module that owns all of them.

:class:`~raptor.models.Raptor` borrows the teacher's embedding and norm (training needs only the
blocks); :class:`RaptorViT` copies them in, so a saved student runs with no teacher file. It keeps
the rollout of :class:`Raptor` (layer l is produced by the block that owns it, with t = l) and adds
the interfaces dense heads and feature extractors call:

- timm: ``forward(images) -> logits``, ``forward_features``, ``forward_head``,
  ``forward_intermediates`` over the L virtual layers, ``reset_classifier``, ``pretrained_cfg``
  (so ``timm.data.resolve_data_config`` gives the eval transform);
- DINOv2: ``get_intermediate_layers(images, n, reshape, return_class_token, norm)``.

The readout is DINOv2's linear-probe input: ``[cls, mean of patch tokens]`` of the normed final
state (2D wide), which is what the teacher's classifier and the probe stage's heads act on.
Position embeddings are stored at their native grid and resampled (bicubic, timm's
``resample_abs_pos_embed``) for another image size; :meth:`RaptorViT.at_resolution` bakes them for
one size (ONNX).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from raptor import storage
from raptor.models import checkpoints as ckpt
from raptor.data.transforms import EVAL_RESIZE_RATIO, IMAGENET_MEAN, IMAGENET_STD
from raptor.models.card import model_card
from raptor.models.student import Raptor, RaptorBlock
from raptor.models.teacher import Teacher, TokenGeometry


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens ``[B, H/p * W/p, D]`` (timm's key names: ``patch_embed.proj``)."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"  # a model folder's files
DATA_FIELDS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")  # timm's data config


class RaptorViT(Raptor, PyTorchModelHubMixin, library_name="raptor", tags=["raptor", "vision-transformer", "distillation"]):
    """A self-contained Raptor student: stem + k blocks unrolled over L layers + norm + heads.

    ``heads`` maps a name (``teacher``: the teacher's classifier; ``probe``, ``probe_finetuned``:
    the probe stage's heads on this student's features) to a linear head over the 2D readout;
    ``head_name`` picks the one ``forward`` uses. ``from_pretrained(folder)`` and
    ``save_pretrained`` / ``push_to_hub`` are huggingface_hub's (ModelHubMixin) over a model folder.
    """

    def __init__(
        self,
        blocks: Sequence[RaptorBlock],
        boundaries: Sequence[int],
        geometry: TokenGeometry,
        *,
        no_embed_class: bool,
        norm_eps: float = 1e-6,
        heads: dict[str, int] | None = None,
        head_name: str | None = None,
        data_config: dict[str, Any] | None = None,
    ):
        super().__init__(blocks, boundaries, geometry)
        D, p = geometry.width, geometry.patch_size
        self.grid = (geometry.img_size // p, geometry.img_size // p)
        if self.grid[0] * self.grid[1] != geometry.num_patches:
            raise ValueError(f"{geometry.num_patches} patches is not a {geometry.img_size} px image of {p} px patches")
        self.no_embed_class = no_embed_class
        self.num_prefix_tokens = geometry.num_prefix
        self.patch_embed = PatchEmbed(p, D)
        num_cls = geometry.num_prefix - geometry.num_registers
        self.cls_token = nn.Parameter(torch.zeros(1, num_cls, D)) if num_cls else None
        self.reg_token = nn.Parameter(torch.zeros(1, geometry.num_registers, D)) if geometry.num_registers else None
        positions = geometry.num_patches + (0 if no_embed_class else geometry.num_prefix)
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, D))
        self.norm = nn.LayerNorm(D, eps=norm_eps)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * D, int(n)) for name, n in (heads or {}).items()})
        if head_name is not None and head_name not in self.heads:
            raise ValueError(f"head {head_name!r} is not one of {sorted(self.heads)}")
        self.head_name = head_name
        self.num_features = D  # per token (timm)
        self.head_hidden_size = 2 * D  # the readout the heads act on
        self.pretrained_cfg = data_config_of(geometry.img_size, data_config)
        self.manifest: dict[str, Any] = {}  # what it was loaded with (provenance), kept when it is saved again
        self.eval()  # built or loaded for inference; .train() to fine-tune it as a backbone

    def describe(self) -> dict[str, Any]:
        """The manifest's ``student`` section: the blocks' (:meth:`Raptor.describe`), the stem, the heads'
        class counts, the default head and the data config."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in self.pretrained_cfg.items() if k in DATA_FIELDS}
        return {**super().describe(), "stem": {"no_embed_class": self.no_embed_class, "norm_eps": float(self.norm.eps)},
                "heads": {n: h.out_features for n, h in self.heads.items()}, "head": self.head_name, "data": cfg}

    @classmethod
    def from_description(cls, s: dict[str, Any], url: str) -> "RaptorViT":
        """The (untrained) model a manifest's ``student`` section describes; values it cannot take are the file's fault."""
        try:
            geometry = TokenGeometry(**s["layout"])
            blocks = [RaptorBlock(**s["block"]) for _ in range(s["k"])]
            return cls(blocks, s["boundaries"], geometry, no_embed_class=bool(s["stem"]["no_embed_class"]),
                       norm_eps=float(s["stem"].get("norm_eps", 1e-6)), heads=s.get("heads"), head_name=s.get("head"),
                       data_config=s.get("data"))
        except (TypeError, ValueError, KeyError, ArithmeticError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"{url}: its manifest does not describe a student ({type(e).__name__}: {e})") from None

    # ---------------------------------------------------------------- huggingface_hub
    def _save_pretrained(self, save_directory: Path) -> None:
        save_folder(self, str(save_directory), {k: v for k, v in self.manifest.items() if k not in ("format", "version", "student")})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "RaptorViT":  # type: ignore[override]
        """A model folder on a path or any fsspec URL (``s3://...``), else a Hub repository id (the mixin's)."""
        url = str(pretrained_model_name_or_path)
        if "://" in url or is_folder(url):
            return load_folder(url)[0]
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir: str | None = None,
                         force_download: bool = False, local_files_only: bool = False, token: str | bool | None = None,
                         **_: Any) -> "RaptorViT":
        """A Hub repository id through the Hub's cache (a folder never gets here: :meth:`from_pretrained`)."""
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                   local_files_only=local_files_only, token=token, allow_patterns=[WEIGHTS, CONFIG])
        return load_folder(folder)[0]

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_student(
        cls,
        student: Raptor,
        teacher: Teacher,
        *,
        heads: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        head_name: str | None = None,
        data_config: dict[str, Any] | None = None,
    ) -> "RaptorViT":
        """Copy ``student``'s blocks and ``teacher``'s stem and norm into one model.

        ``heads``: name -> (weight ``[C, 2D]``, bias ``[C]``); the teacher's own classifier is added
        as ``teacher`` when it has one; ``head_name`` (default: the first head) is the one ``forward`` uses. Refuses a teacher whose stem does more than DINOv2's
        (a patch-embedding norm, a pre-norm, a norm other than LayerNorm): the copy would differ.
        """
        m = teacher.model
        for what, module in (("patch_embed.norm", getattr(m.patch_embed, "norm", None)), ("norm_pre", getattr(m, "norm_pre", None))):
            if module is not None and not isinstance(module, nn.Identity):
                raise ValueError(f"teacher {teacher.name}: {what} is {type(module).__name__}; a RaptorViT copies stems without one")
        if not teacher.geometry.has_cls:
            raise ValueError(f"teacher {teacher.name} has no cls token; the readout [cls, mean patch] needs one")
        if not isinstance(m.norm, nn.LayerNorm):
            raise ValueError(f"teacher {teacher.name}: its final norm is {type(m.norm).__name__}, not LayerNorm")
        weights = dict(heads or {})
        if teacher.head is not None:
            weights.setdefault("teacher", (teacher.head.weight, teacher.head.bias))
        if head_name is None:  # forward gives logits whenever there is a head: the first given, else the teacher's
            head_name = next(iter(weights), None)
        blocks = [copy.deepcopy(b) for b in student.blocks]
        for b in blocks:
            b.checkpointing = False
        model = cls(blocks, student.boundaries, teacher.geometry, no_embed_class=bool(getattr(m, "no_embed_class", False)),
                    norm_eps=float(m.norm.eps), heads={n: w.shape[0] for n, (w, _) in weights.items()},
                    head_name=head_name, data_config=data_config)
        model.config = dict(student.config)
        with torch.no_grad():
            model.patch_embed.proj.load_state_dict(m.patch_embed.proj.state_dict())
            for name in ("cls_token", "reg_token", "pos_embed"):
                if getattr(model, name) is not None:
                    getattr(model, name).copy_(getattr(m, name))
            model.norm.load_state_dict(m.norm.state_dict())
            for n, (w, b) in weights.items():
                model.heads[n].weight.copy_(w)
                model.heads[n].bias.copy_(b)
        return model.to(teacher.device)

    def attach(self, teacher: Teacher) -> "RaptorViT":
        """Checks that ``teacher`` has this student's geometry; the stem used stays this model's own."""
        super().attach(teacher)
        self._teacher = []
        return self

    # ---------------------------------------------------------------- the stream
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """a_0: patch tokens + position embeddings (resampled for another grid), cls and registers prepended."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        p = self.patch_embed.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = self.patch_embed(images.to(self.pos_embed.dtype))
        pos = self.position_embeddings((H // p, W // p))
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:  # positions for the patches only (DINOv2 with registers)
            return torch.cat([*prefix, x + pos], dim=1)
        return torch.cat([*prefix, x], dim=1) + pos

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embeddings for a ``grid`` of patches: the stored ones, or resampled from them."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.grid),
                                      num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, then [cls, mean of patch tokens] (registers excluded) -> ``[B, 2D]``."""
        return self.forward_head(self.norm(x), pre_logits=True)

    # ---------------------------------------------------------------- timm
    @property
    def head(self) -> nn.Module:
        return self.heads[self.head_name] if self.head_name is not None else nn.Identity()

    @property
    def num_classes(self) -> int:
        return self.heads[self.head_name].out_features if self.head_name is not None else 0

    def get_classifier(self) -> nn.Module:
        return self.head

    def set_head(self, name: str) -> "RaptorViT":
        """Use head ``name`` in ``forward`` (one of ``heads``)."""
        if name not in self.heads:
            raise ValueError(f"head {name!r} is not one of {sorted(self.heads)}")
        self.head_name = name
        return self

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new (trainable) head ``head`` of ``num_classes`` over the readout; 0 removes the heads."""
        if global_pool not in (None, "token_avg"):
            raise ValueError(f"the readout is [cls, mean patch] ('token_avg'), not {global_pool!r}")
        if num_classes:
            self.heads = nn.ModuleDict({"head": nn.Linear(2 * self.geometry.width, num_classes)}).to(self.pos_embed.device)
            self.head_name = "head"
        else:
            self.heads, self.head_name = nn.ModuleDict(), None

    def final_state(self, a0: torch.Tensor) -> torch.Tensor:
        """a_L from a_0: the rollout keeping only the current state (inference holds one layer's
        activations, as the teacher's forward does, not all L)."""
        return self._states(a0, (), self.depth)[1]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images -> the normed final state ``[B, N, D]`` (prefix tokens first)."""
        return self.norm(self.final_state(self.embed(images)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normed tokens -> ``[cls, mean patch]`` (``pre_logits``) -> the chosen head's logits."""
        pooled = torch.cat([x[:, 0], x[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """images -> logits of the chosen head (the readout when there is none), timm's convention;
        the rollout over states stays :meth:`rollout`."""
        return self.forward_head(self.forward_features(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images -> the 2D readout (what the probes were trained on)."""
        return self.forward_head(self.forward_features(images), pre_logits=True)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.head_name is None:
            raise ValueError("this student has no head")
        return self.forward(images)

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list | tuple[torch.Tensor, list]:
        """timm's ``forward_intermediates`` over the L virtual layers (layer l is index l-1).

        ``indices``: the last n layers (int), all (None), or positions (negative from the end).
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = feature_take_indices(self.depth, indices)
        B, _, H, W = images.shape
        chosen, x = self._states(self.embed(images), take, last + 1 if stop_early or intermediates_only else self.depth)
        chosen = [self.norm(y) if norm else y for y in chosen]
        prefix = [y[:, : self.num_prefix_tokens] for y in chosen]
        out = [y[:, self.num_prefix_tokens:] for y in chosen]
        if output_fmt == "NCHW":
            p = self.patch_embed.patch_size
            out = [y.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous() for y in out]
        if return_prefix_tokens:
            out = list(zip(out, prefix))
        if intermediates_only:
            return out
        return self.norm(x), out

    def _states(self, a0: torch.Tensor, take: Sequence[int], end: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The states after layers i+1 for each 0-based index in ``take`` (in layer order), and the state
        after layer ``end``: the rollout keeping only those (not all L)."""
        wanted, chosen, x = set(take), [], a0
        for l in range(1, end + 1):
            x = self.blocks[self.owner[l - 1]](x, self.layer_t[l - 1 : l])
            if l - 1 in wanted:
                chosen.append(x)
        return chosen, x

    # ---------------------------------------------------------------- DINOv2
    def get_intermediate_layers(
        self,
        images: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """DINOv2's ``get_intermediate_layers``: the last ``n`` layers (or the listed 0-based ones, in layer order),
        patch tokens only (registers dropped), normed by default, ``[B, D, h, w]`` with ``reshape``,
        each paired with its cls token with ``return_class_token``."""
        take = list(range(self.depth - n, self.depth)) if isinstance(n, int) else sorted({int(i) for i in n})
        if not take or any(not 0 <= i < self.depth for i in take):
            raise ValueError(f"layers {take} out of range for {self.depth} layers")
        B, _, H, W = images.shape
        chosen, _ = self._states(self.embed(images), take, take[-1] + 1)
        chosen = [self.norm(y) if norm else y for y in chosen]
        cls_tokens = [y[:, 0] for y in chosen]
        out = [y[:, self.num_prefix_tokens:] for y in chosen]
        if reshape:
            p = self.patch_embed.patch_size
            out = [y.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous() for y in out]
        return tuple(zip(out, cls_tokens)) if return_class_token else tuple(out)

    # ---------------------------------------------------------------- fixed resolution
    def at_resolution(self, size: int) -> "RaptorViT":
        """A copy whose position embeddings are resampled once for ``size`` px images (its native
        size from then on): no interpolation left in the graph (ONNX export)."""
        p = self.patch_embed.patch_size
        if size <= 0 or size % p:
            raise ValueError(f"resolution {size} is not a positive multiple of the patch size {p}")
        g = self.geometry
        geometry = TokenGeometry(**{**g.to_dict(), "img_size": size, "num_patches": (size // p) ** 2})
        model = copy.deepcopy(self)
        with torch.no_grad():
            pos = self.position_embeddings((size // p, size // p))
        model.pos_embed = nn.Parameter(pos.detach().clone(), requires_grad=False)
        model.geometry, model.grid = geometry, (size // p, size // p)
        model.pretrained_cfg = {**self.pretrained_cfg, "input_size": (3, size, size)}
        return model


def data_config_of(img_size: int, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's pretrained_cfg data fields for this student: the eval transform raptor's data stage
    uses (short side to size * 256/224, bicubic, centre crop, ImageNet mean/std), overridable."""
    cfg: dict[str, Any] = {
        "input_size": (3, img_size, img_size), "interpolation": "bicubic", "crop_pct": 1 / EVAL_RESIZE_RATIO,
        "crop_mode": "center", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
    }
    cfg.update(given or {})
    cfg["input_size"] = tuple(cfg["input_size"])
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return cfg


def is_folder(url: str) -> bool:
    """Whether ``url`` is a folder (a model folder, or meant as one) rather than a file."""
    fs, path = storage.filesystem(url)
    return fs.isdir(path)


def save_folder(model: RaptorViT, url: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Hugging Face model folder at ``url`` (a path or any fsspec URL): ``model.safetensors`` (the
    self-contained file, manifest in its metadata), ``config.json`` (the same manifest) and ``README.md``
    (the model card rendered from it). ``extra``: the manifest's provenance sections. Returns the manifest."""
    man = ckpt.merged(ckpt.manifest_of(model.describe()), extra)
    meta = {"format": ckpt.STUDENT_FORMAT, "manifest": json.dumps(man, sort_keys=True, default=str)}
    ckpt.save_safetensors(storage.join(url, WEIGHTS), model.state_dict(), meta)
    storage.write_bytes(storage.join(url, CONFIG), json.dumps(man, indent=2, sort_keys=True, default=str).encode() + b"\n")
    storage.write_bytes(storage.join(url, CARD), model_card(man).encode())
    return man


def load_folder(url: str) -> tuple[RaptorViT, dict[str, Any]]:
    """A model folder -> (model, manifest): the architecture from ``config.json``, the tensors from
    ``model.safetensors`` (checked against it before loading)."""
    config, weights = storage.join(url, CONFIG), storage.join(url, WEIGHTS)
    for needed in (config, weights):
        if not storage.exists(needed):
            raise ckpt.CheckpointError(f"{needed}: missing (a raptor model folder holds {CONFIG}, {WEIGHTS} and {CARD})")
    man, s = ckpt.parse_student_manifest(storage.read_bytes(config).decode(errors="replace"), config)
    if "stem" not in s:
        raise ckpt.CheckpointError(f"{config}: describes a block-only student; a model folder holds a self-contained one")
    sd, meta = ckpt.read_checkpoint(weights)
    if "manifest" in meta:  # the weights' own description: a config.json edited apart from them is named
        _, own = ckpt.parse_student_manifest(meta["manifest"], weights)
        differ = ckpt.first_difference(s, own)
        if differ is not None:
            raise ckpt.CheckpointError(f"{config} does not describe {weights}: student.{differ}")
    model = ckpt.load_checked(lambda: RaptorViT.from_description(s, config), sd, f"{weights} (with {config})")
    model.config, model.manifest = dict(s["block"]), man
    return model, man
