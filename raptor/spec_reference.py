"""The job-spec reference in the README, generated from the pydantic model so it cannot drift.

Field names, types, bounds and defaults come from ``JobSpec`` itself; the meaning is the field's
``description`` or, for fields the model leaves undescribed, the entry below. A test fails when the
README's copy differs from ``reference_markdown()`` or when a field has no meaning at all; refresh with
``python -m raptor.spec_reference --update README.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from raptor.config import JobSpec

BEGIN, END = "<!-- spec-reference:begin -->", "<!-- spec-reference:end -->"

# "Class.field" -> meaning, for fields whose Field() has no description (looked up along the MRO)
MEANINGS = {
    "JobSpec.name": "name of the job; the RayJob and its pods are named after it",
    "TeacherSpec.name": "timm model name of the teacher ViT; a DINOv2 name fixes its depth L",
    "TeacherSpec.img_size": "input resolution in pixels (224 for ViT-B/14: 16 x 16 patches)",
    "TeacherTrainSpec.epochs": "passes over the training shards",
    "TeacherTrainSpec.batch_size": "images per optimizer step",
    "TeacherTrainSpec.lr": "peak AdamW learning rate",
    "TeacherTrainSpec.weight_decay": "AdamW weight decay",
    "TeacherTrainSpec.warmup_steps": "linear warm-up steps before the cosine decay",
    "TeacherTrainSpec.label_smoothing": "cross-entropy label smoothing",
    "DataSpec.val": "validation shard URL (probe, fidelity checks); null = none",
    "DataSpec.seed": "seed of shuffling and augmentation",
    "GenerateSpec.train_samples": "labelled images written to the training shards",
    "GenerateSpec.val_samples": "labelled images written to the validation shard",
    "GenerateSpec.num_classes": "classes of the generated images",
    "GenerateSpec.image_size": "side of the generated images in pixels",
    "GenerateSpec.seed": "seed of the generator",
    "DiscoverySpec.metric": "layer distance: cosine (1 - cos of [cls, mean patch]), mse, linear cka, or swap (damage of swapping two layers)",
    "DiscoverySpec.method": "segmentation: dp (exact max-cut over contiguous segments) or recursive bisection",
    "DiscoverySpec.k": "number of student blocks, i.e. segments of the teacher's L layers",
    "DiscoverySpec.num_images": "images the distance matrix averages over",
    "StudentSpec.mlp": "block MLP: swiglu (D -> 2 x 4D, silu(a) * b, -> D) or gelu",
    "StudentSpec.depth_scaling": "(g1, g2, g3) = 1 + MLP_t(t) for the layer index t: a non-autonomous block",
    "StudentSpec.init": "initial block weights: random or from the teacher's layers",
    "TokenWeights.cls": "loss weight of the cls token",
    "TokenWeights.reg": "loss weight of the register tokens",
    "TokenWeights.patch": "loss weight of the patch tokens",
    "StageSpec.steps": "optimizer steps of the stage",
    "StageSpec.min_lr": "learning rate at the end of the cosine schedule",
    "StageSpec.warmup_steps": "linear learning-rate warm-up steps",
    "StageSpec.weight_decay": "AdamW weight decay",
    "StageSpec.schedule": "learning rate after the warm-up",
    "StageSpec.loss": "mse over all tokens, token (cls/reg/patch MSE weighted by token_weights) or cosine",
    "Stage1Spec.lambda_schedule": "how lambda, the teacher-forcing weight, falls from 1 to lambda_min",
    "Stage1Spec.lambda_min": "final lambda (0 = pure autoregressive training)",
    "ProbeSpec.epochs": "passes over the training set",
    "ProbeSpec.batch_size": "images per step",
    "ProbeSpec.lrs": "learning rates tried, one linear head each; the best one is reported",
    "ProbeSpec.weight_decay": "AdamW weight decay",
    "ProbeSpec.warmup_steps": "linear warm-up steps",
    "ProbeSpec.init_from_teacher_head": "start the student's head from the teacher's linear head",
    "ScalingSpec.num_workers": "Ray Train workers (data-parallel ranks; one per GPU on GPU clusters)",
    "ScalingSpec.use_gpu": "train on GPUs (NCCL) rather than CPUs (gloo)",
    "ScalingSpec.cpus_per_worker": "CPUs each worker reserves (its data loading runs there)",
    "ScalingSpec.gpus_per_worker": "GPUs each worker reserves when use_gpu is true",
    "ScalingSpec.placement_strategy": "Ray placement-group strategy for the workers",
    "DeepSpeedSpec.zero_stage": "ZeRO stage: 0 none, 1 shards optimizer states, 2 also gradients, 3 also parameters",
    "DeepSpeedSpec.gradient_clipping": "global gradient-norm clip (0 = off)",
    "DeepSpeedSpec.gradient_accumulation_steps": "micro-batches per optimizer step",
    "DeepSpeedSpec.activation_checkpointing": "recompute activations in the backward pass to save memory",
    "DeepSpeedSpec.offload_optimizer": "optimizer states to cpu or nvme (ZeRO >= 1)",
    "DeepSpeedSpec.offload_param": "parameters to cpu or nvme (ZeRO-3 only)",
    "LoggingSpec.wandb_project": "wandb project",
    "LoggingSpec.wandb_entity": "wandb team or user; null = the key's default",
    "LoggingSpec.log_interval": "steps between metric logs (console and wandb)",
    "ClusterSpec.namespace": "Kubernetes namespace of every object",
    "ClusterSpec.head_memory_gib": "memory of the head pod",
}

_BOUNDS = ((at.Gt, "gt", ">"), (at.Ge, "ge", ">="), (at.Lt, "lt", "<"), (at.Le, "le", "<="))


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X`` or ``X | None``, if any."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "any" if annotation is Any else annotation.__name__


def _type(field: FieldInfo) -> str:
    bounds = [f"{sym} {getattr(m, attr)}" for m in field.metadata for cls, attr, sym in _BOUNDS if isinstance(m, cls)]
    return " ".join([_type_name(field.annotation), *bounds])


def _short(value: Any) -> Any:
    """Floats to four significant digits (1/3 reads as 0.3333), inside lists and dicts too."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_short(v) for v in value]
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    return value


def _value(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(_short(value))}`"


def _meaning(model: type[BaseModel], name: str, field: FieldInfo) -> str:
    if field.description:
        return field.description
    for cls in model.__mro__:
        if f"{cls.__name__}.{name}" in MEANINGS:
            return MEANINGS[f"{cls.__name__}.{name}"]
    return ""


def _rows(model: type[BaseModel], defaults: BaseModel | None, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(field, type, default, meaning) for every leaf of ``model``; nested sections become dotted names."""
    for name, field in model.model_fields.items():
        if field.is_required():
            default = "required"
        elif defaults is not None:
            default = _value(getattr(defaults, name))
        else:
            default = _value(field.get_default(call_default_factory=True))
        sub = _section_model(field.annotation)
        if sub is None:
            yield f"{prefix}{name}", _type(field), default, _meaning(model, name, field)
            continue
        if type(None) in typing.get_args(field.annotation):  # an optional sub-section: say so, then list what it holds
            yield f"{prefix}{name}", "section \\| null", default, _meaning(model, name, field) or (sub.__doc__ or "").split("\n")[0]
        nested = getattr(defaults, name) if defaults is not None else field.get_default(call_default_factory=True)
        yield from _rows(sub, nested if isinstance(nested, sub) else None, f"{prefix}{name}.")


def reference_markdown() -> str:
    """The reference: the top-level fields, then one table per section, in the order a spec lists them."""
    rows = list(_rows(JobSpec, None))
    header = ["| field | type | default | meaning |", "|---|---|---|---|"]

    def table(prefix: str) -> list[str]:
        return [f"| `{n.removeprefix(prefix)}` | {t} | {d} | {m} |" for n, t, d, m in rows if (n.startswith(prefix) if prefix else "." not in n)]

    out = [BEGIN, "", *header, *table("")]
    for name, field in JobSpec.model_fields.items():
        sub = _section_model(field.annotation)
        if sub is None:
            continue
        doc = (sub.__doc__ or "").strip().split("\n")[0]
        status = "required section" if field.is_required() else "optional section"
        out += ["", f"**`{name}`** ({status}){': ' + doc if doc else ''}", "", *header, *table(f"{name}.")]
    return "\n".join([*out, "", END])


def undocumented() -> list[str]:
    """Fields with a meaning from neither the model nor MEANINGS (the test names them)."""
    return [name for name, _, _, meaning in _rows(JobSpec, None) if not meaning]


def replace_block(text: str) -> str:
    """``text`` with the block between the markers replaced by the current reference."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN} ... {END} block to replace")
    return pattern.sub(lambda _: reference_markdown(), text, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the job-spec reference, or refresh it in a Markdown file.")
    parser.add_argument("--update", metavar="FILE", help="replace the reference block in FILE (README.md)")
    args = parser.parse_args(argv)
    if args.update:
        path = Path(args.update)
        path.write_text(replace_block(path.read_text()))
    else:
        sys.stdout.write(reference_markdown() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
