"""Reading checkpoints safely and mapping external layouts onto timm ViTs.

Every format goes through one filter function (:func:`to_timm_state_dict`), never ad-hoc tensor edits
at call sites (timm's habit):

- the official facebookresearch/dinov2 ``.pth`` layout (``mask_token``, ``register_tokens``,
  ``blocks.N.ls1.gamma``, SwiGLU ``blocks.N.mlp.w12/w3`` of ViT-g, chunked ``blocks.C.N.`` keys of
  ``block_chunks > 0`` backbones, training checkpoints under ``teacher``/``backbone.``) -- mapped by
  timm's own ``checkpoint_filter_fn`` (which calls its ``_convert_dinov2``) after un-chunking;
- timm / Hugging Face safetensors (timm keys; ``pos_embed`` resampled when the image size differs);
- the project's own teacher export (:meth:`raptor.models.Teacher.save`): timm keys plus an optional
  ``head.weight``/``head.bias`` over the 2D readout, and JSON metadata that rebuilds the model.

Files are read with ``safetensors`` or ``torch.load(weights_only=True)``: arbitrary pickles are
never executed.
"""

from __future__ import annotations

import io
import json
import re
import struct
from typing import Any, Callable

import torch
from torch import nn

from raptor.errors import MissingInput, UserError
from raptor import storage

TEACHER_FORMAT = "raptor-teacher"
STUDENT_FORMAT = "raptor-student"

_PREFIXES = ("module.", "backbone.", "model.", "_orig_mod.")


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the architecture: the user's file, named in one line."""


def _is_safetensors(url: str, data: bytes) -> bool:
    if url.endswith(".safetensors"):
        return True
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 0 < n < len(data) and data[8:9] == b"{"


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file held in memory."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n].decode())
    return dict(header.get("__metadata__") or {})


def read_metadata(url: str) -> dict[str, str]:
    """The ``__metadata__`` of the safetensors file at ``url``, reading its header only (not the tensors)."""
    try:
        with storage.open_file(url, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return dict(json.loads(f.read(n).decode()).get("__metadata__") or {})
    except FileNotFoundError as e:
        raise MissingInput(f"checkpoint not found: {url}") from e
    except (struct.error, ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{url}: not a readable safetensors file ({e})") from None


def read_checkpoint(url: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read ``url`` (local path or fsspec URL) -> (flat tensor dict, safetensors metadata or {}).

    ``.safetensors`` is read with safetensors; anything else with ``torch.load(weights_only=True)``
    on CPU. Nested training checkpoints (``{"model": ...}``, ``{"state_dict": ...}``,
    ``{"teacher": ...}``) are unwrapped and ``module.``/``backbone.``/``model.`` prefixes stripped.
    """
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError as e:
        raise MissingInput(f"checkpoint not found: {url}") from e
    if _is_safetensors(url, data):
        from safetensors.torch import load as st_load

        try:
            sd, meta = st_load(data), safetensors_metadata(data)
        except Exception as e:  # noqa: BLE001 - reported with the URL
            raise CheckpointError(f"{url}: not a readable safetensors file ({e})") from e
        if meta.get("format") == TEACHER_FORMAT:
            _check_teacher_metadata(meta, url)
        return sd, meta
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{url}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); only tensor state dicts are accepted"
        ) from e
    return unwrap_state_dict(obj, url), {}


def _check_teacher_metadata(meta: dict[str, str], url: str) -> None:
    """A teacher export's metadata rebuilds the model, so a file whose metadata lies fails here, named."""
    kwargs = meta.get("model_kwargs", "{}")
    try:
        kwargs = json.loads(kwargs)
    except ValueError:
        kwargs = None
    if not meta.get("timm_name") or not meta.get("img_size", "").isdigit() or not isinstance(kwargs, dict):
        raise CheckpointError(
            f"{url}: a {TEACHER_FORMAT} export needs 'timm_name', a positive integer 'img_size' and "
            "'model_kwargs' (a JSON object) in its metadata"
        )


def unwrap_state_dict(obj: Any, url: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a (possibly nested) checkpoint and strip wrapper prefixes."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("model", "state_dict", "teacher", "model_state", "module"):
                if key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
            else:
                break
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not sd:
        raise CheckpointError(f"{url}: no tensor state dict found (a dict of name -> tensor)")
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    # DINOv2 training checkpoints hold backbone + heads: keep the backbone
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


_CHUNK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.*)$")


def unchunk_blocks(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 ``block_chunks > 0`` keys ``blocks.C.I.rest`` -> ``blocks.I.rest``.

    DINOv2's BlockChunk pads each chunk with Identity modules, so I is already the global index.
    A key is treated as chunked only when ``blocks.C.I.`` is followed by a block attribute.
    """
    if not any(_CHUNK.match(k) for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        m = _CHUNK.match(k)
        if m and not m.group(3)[:1].isdigit():
            out[f"blocks.{m.group(2)}.{m.group(3)}"] = v
        else:
            out[k] = v
    return out


def is_official_dinov2(sd: dict[str, torch.Tensor]) -> bool:
    return "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in sd)


def to_timm_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The filter function: any supported layout -> the keys of ``model`` (a timm ViT).

    Resamples ``pos_embed`` to the model's grid (timm's bicubic resampling) when the checkpoint
    was saved at another image size.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = unchunk_blocks(dict(sd))
    if is_official_dinov2(sd) and "mask_token" not in sd:
        # timm's converter keys on mask_token; some exports drop it
        sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    return checkpoint_filter_fn(sd, model)


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], url: str = "checkpoint") -> None:
    """Strict load with an error that names missing, unexpected and mis-shaped keys."""
    check_fits(model, sd, url)
    model.load_state_dict(sd, strict=True)


def check_fits(model: nn.Module, sd: dict[str, torch.Tensor], url: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys; works on a
    ``meta``-device model, so a file can be checked against the architecture it claims before any
    memory is allocated for it."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:

        def few(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f" ... (+{len(xs) - 8} more)" if len(xs) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {few(shapes)}")
        raise CheckpointError(f"{url} does not fit the architecture; " + "; ".join(parts))


def manifest_of(section: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A student file's manifest: the format, its version (2 when the file holds the stem: a
    self-contained student) and the ``student`` section that rebuilds the architecture, plus ``extra``."""
    return {"format": STUDENT_FORMAT, "version": 2 if "stem" in section else 1, "student": section, **extra}


def merged(manifest: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """``extra``'s entries on top of ``manifest``'s, one level deep (a section given in part keeps the rest)."""
    out = dict(manifest)
    for k, v in (extra or {}).items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first dotted path where two JSON values differ, with both values (None when they agree)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            found = first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
        return None
    return None if a == b else f"{path} is {json.dumps(a)} there, {json.dumps(b)} in the weights' manifest"


def parse_student_manifest(manifest: str | dict[str, Any], url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A student file's manifest (JSON text or parsed) and its ``student`` section, checked for the shape
    the builders read; anything else is :class:`CheckpointError` naming ``url``."""
    if isinstance(manifest, str):
        try:
            manifest = json.loads(manifest)
        except ValueError as e:
            raise CheckpointError(f"{url}: its manifest is not valid JSON ({e})") from None
    s = manifest.get("student") if isinstance(manifest, dict) else None
    if not (isinstance(s, dict) and isinstance(s.get("layout"), dict) and isinstance(s.get("block"), dict)
            and isinstance(s.get("boundaries"), list) and s.get("k") == len(s["boundaries"]) + 1):
        raise CheckpointError(
            f"{url}: its manifest needs student.layout and student.block (objects), student.boundaries "
            "(a list) and student.k (one more than the boundaries)"
        )
    if "stem" in s and not (isinstance(s["stem"], dict) and isinstance(s.get("heads", {}), dict)):
        raise CheckpointError(f"{url}: student.stem and student.heads must be objects")
    return manifest, s


def load_checked(build: Callable[[], nn.Module], sd: dict[str, torch.Tensor], url: str) -> nn.Module:
    """``build()`` with the tensors ``sd``, checked on the meta device first: a file whose manifest lies
    about the sizes allocates nothing before it is caught (:func:`check_fits` names the keys)."""
    with torch.device("meta"):
        check_fits(build(), sd, url)
    model = build()
    model.load_state_dict(sd, strict=True)
    return model


def split_head(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate ``head.weight``/``head.bias`` (or a bare ``weight``/``bias`` linear-head file)."""
    if set(sd) <= {"weight", "bias"}:
        return {}, dict(sd)
    head = {k[len("head.") :]: v for k, v in sd.items() if k.startswith("head.")}
    body = {k: v for k, v in sd.items() if not k.startswith("head.")}
    return body, head


def save_safetensors(url: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file through :mod:`raptor.storage` (atomic; s3:// works)."""
    from safetensors.torch import save as st_save

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    storage.write_bytes(url, st_save(flat, metadata={k: str(v) for k, v in metadata.items()}))
