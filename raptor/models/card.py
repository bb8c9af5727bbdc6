"""The model card (a Hugging Face ``README.md``) of an exported student, rendered from its manifest alone.

Every number comes from the manifest the export wrote: ``student`` (k, boundaries, heads),
``teacher`` (name, license, parameters, FLOPs), ``stats`` (the student's parameters and FLOPs per
image), ``report`` (per-layer fidelity, probe top-1) and ``run`` (where and from what it was made).
A section whose numbers are absent says so instead of inventing them.
"""

from __future__ import annotations

from typing import Any


def _n(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else "-" if x is None else str(x)


def _millions(x: Any) -> str:
    return f"{x / 1e6:.2f} M" if isinstance(x, (int, float)) else "-"


def _giga(x: Any) -> str:
    return f"{x / 1e9:.3f} GFLOPs" if isinstance(x, (int, float)) else "-"


def _flops_sentence(k: int, depth: int, block: dict[str, Any], student: Any, teacher: Any) -> str:
    """What the FLOPs row means, from the numbers: a block-recurrent student saves parameters, not arithmetic."""
    said = (f"The {k} blocks are applied {depth} times, once per layer, as many block applications as the teacher's "
            f"{depth} layers: what the student saves is parameters (and the memory and bandwidth they take), not arithmetic.")
    if not (isinstance(student, (int, float)) and isinstance(teacher, (int, float)) and teacher > 0):
        return said
    ratio = student / teacher
    if abs(ratio - 1) < 0.05:
        return said + f" Its FLOPs per image are the teacher's ({ratio:.2f}x: the depth-scaling MLPs add a little)."
    return said + (f" Its FLOPs per image are {ratio:.2f}x the teacher's because its blocks are shaped otherwise than the "
                   f"teacher's layers ({block.get('mlp')} MLP of hidden width {block.get('mlp_hidden')}).")


def model_card(manifest: dict[str, Any]) -> str:
    """Markdown with Hugging Face front matter (license, library, tags) for the student ``manifest`` describes."""
    s = manifest["student"]
    teacher = manifest.get("teacher") or {}
    stats = manifest.get("stats") or {}
    report = manifest.get("report") or {}
    run = manifest.get("run") or {}
    k, depth, boundaries = s["k"], s["depth"], s["boundaries"]
    size = s["layout"]["img_size"]
    name = teacher.get("name", "its teacher")
    license_ = teacher.get("license") or "other"
    lines = [
        "---",
        f"license: {license_}",
        "library_name: raptor",
        "pipeline_tag: image-feature-extraction",
        "tags: [raptor, vision-transformer, distillation, block-recurrent]",
        "---",
        "",
        f"# Raptor student of {name}, k = {k}",
        "",
        f"A block-recurrent student (Raptor, \"Block-Recurrent Dynamics in Vision Transformers\", ICLR 2026) distilled "
        f"from `{name}`: {k} shared blocks unrolled over the teacher's {depth} layers (boundaries {boundaries}: block j "
        f"produces layers b_(j-1)+1 .. b_j, each application told its layer number by the depth-scaling MLP). "
        f"It keeps the teacher's patch embedding, tokens, position embeddings and final norm, and runs at {size} px "
        "(other multiples of the patch size resample the position embeddings).",
        "",
        "## Size and cost",
        "",
        "| | student | teacher |",
        "|---|---|---|",
        f"| parameters | {_millions(stats.get('params'))} | {_millions(teacher.get('params'))} |",
        f"| FLOPs per image ({size} px) | {_giga(stats.get('flops_per_image'))} | {_giga(teacher.get('flops_per_image'))} |",
        "",
        _flops_sentence(k, depth, s["block"], stats.get("flops_per_image"), teacher.get("flops_per_image")),
        "",
    ]
    fid = report.get("fidelity")
    lines += ["## Fidelity to the teacher", ""]
    if fid:
        lines += [f"Per layer on {report.get('num_samples', 'the')} validation images (update-R²: how much of the teacher's "
                  "per-layer update the student reproduces; R² and cosine of the states).", "",
                  "| layer | update-R² | R² | cosine |", "|---|---|---|---|"]
        lines += [f"| {l} | {_n(u)} | {_n(r)} | {_n(c)} |"
                  for l, u, r, c in zip(fid["layers"], fid["update_r2"], fid["r2"], fid["cosine"])]
    else:
        lines += ["Not measured in this export (no report)."]
    probe = report.get("probe")
    lines += ["", "## Linear-probe top-1", ""]
    if probe:
        lines += ["| | top-1 |", "|---|---|"]
        lines += [f"| {row.replace('_', ' ')} | {_n(probe[row]['top1'])} |"
                  for row in ("teacher", "student", "student_finetuned") if isinstance(probe.get(row), dict)]
        if probe.get("student_share") is not None:
            lines += ["", f"The student's probe reaches {100 * probe['student_share']:.1f}% of the teacher's (same head initialisation)."]
    else:
        lines += ["Not measured in this export (no probe stage)."]
    heads = s.get("heads") or {}
    lines += ["", "## Heads", ""]
    lines += ([f"- `{h}`: {n} classes{' (used by `forward`)' if h == s.get('head') else ''}" for h, n in heads.items()]
              or ["None: `forward` returns the 2D readout [cls, mean patch]."])
    lines += [
        "", "## Use", "",
        "```python",
        "from raptor.models import RaptorViT, load_student",
        "model = RaptorViT.from_pretrained(\"path/to/this/folder\")      # or load_student(URL)[0]: a file, a folder, s3://...",
        "tokens = model.forward_features(images)                        # [B, N, D], normed",
        "layers = model.get_intermediate_layers(images, n=4, reshape=True)  # DINOv2's interface, for dense heads",
        "```",
        "",
        "`import raptor.models` also registers it with timm: `timm.create_model(\"raptor_vit\", pretrained=True, "
        "pretrained_cfg_overlay=dict(file=PATH))`, and `timm.data.resolve_data_config({}, model=model)` gives its eval "
        "transform.",
        "",
        "## Intended use",
        "",
        f"A drop-in backbone where `{name}` is used (frozen features, linear probes, dense heads over intermediate layers) "
        "with fewer parameters. It was distilled on the data named below and inherits the teacher's biases; its fidelity "
        "differs by layer (table above), so check it on your task before relying on it.",
        "",
        "## Provenance",
        "",
        f"- teacher: `{name}`, checkpoint `{teacher.get('checkpoint') or '-'}` (informational: this model does not need it); "
        f"license {license_}",
    ]
    if run:
        lines += [f"- run: `{run.get('url', '-')}` ({run.get('name', '-')})"]
        lines += ["- artifacts (each named by its content key): "
                  + ", ".join(f"{stage} `{url}`" for stage, url in (run.get("artifacts") or {}).items())]
    if manifest.get("spec"):
        lines += ["- the job spec is in `config.json` (`spec`)"]
    return "\n".join(lines) + "\n"
