"""The run report: one JSON (its pydantic model in :mod:`raptor.analysis.schema`), PNG plots, Markdown and HTML.

RunFolder under the report URL (any fsspec URL)::

    report.json          every number, validated against the model :class:`~raptor.analysis.schema.Report`
    report.schema.json   the JSON Schema generated from that model
    index.html           the summary with the plots (self-contained apart from the PNGs beside it)
    index.md             the same in Markdown (renders on GitHub and in most viewers); written last
    plots/*.png          gamma, speed, patch_motion, basins, fidelity, probe, distances, layer_swap, partition
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
from typing import Any

from raptor import storage
from raptor.analysis.plots import render_plots
from raptor.analysis.schema import PROBE_ROWS, REPORT_SCHEMA, SCHEMA_VERSION, ProbeSection, validate_report

log = logging.getLogger(__name__)


def build_report(
    analysis: dict[str, Any],
    *,
    run_name: str | None = None,
    run_url: str | None = None,
    discovery: dict[str, Any] | None = None,
    probe: dict[str, Any] | None = None,
    studies: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report dict from :func:`raptor.analysis.analyze.analyze_models` and the run's other results.

    ``discovery`` = ``{"metric", "distances" (L x L), "boundaries"}``; ``probe`` = trained probes
    ``{"source", "teacher": {"top1", "top5"}, "student": {...}, "student_finetuned": {...} (optional),
    "student_share"}`` from the probe stage, which replace the head-only accuracy of the analysis;
    ``studies`` = layer_swap / partition / ablation / dense. Raises pydantic's ValidationError when
    the result does not fit :class:`~raptor.analysis.schema.Report` (a bug in whatever built the parts).
    """
    report = {
        "schema_version": SCHEMA_VERSION,
        "run": {"name": run_name, "url": run_url, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
        **{k: v for k, v in analysis.items() if k != "num_samples"},
        "discovery": discovery,
        "studies": studies or {},
        "plots": {},
    }
    if probe is not None:
        report["probe"] = probe
    validate_report(report)
    return report


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _summary_sections(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(title, Markdown lines) per section; shared by the Markdown and HTML renderers."""
    t = report["teacher"]
    sections = [
        ("Run", [
            f"- run: `{report['run'].get('name') or '-'}` at `{report['run'].get('url') or '-'}`, created {report['run']['created']}",
            f"- teacher: `{t.get('name', '-')}`, depth L = {t['depth']}, width D = {t['width']}, "
            f"{t.get('num_registers', 0)} registers, {t.get('num_patches', '-')} patches",
            f"- student: k = {report.get('k', '-')} blocks, boundaries {report.get('boundaries', [])}",
        ]),
    ]
    probe = report.get("probe")
    if probe:
        teacher_top1 = probe["teacher"]["top1"]
        rows = [[ProbeSection.model_fields[name].title, probe[name]["top1"], probe[name].get("top5"), probe[name]["top1"] / teacher_top1 if teacher_top1 > 0 else None]
                for name in PROBE_ROWS if probe.get(name)]
        lines = _table(["model", "top-1", "top-5", "top-1 / teacher's"], rows)
        lines.append(f"\nstudent share of the teacher's top-1, same head init: {_fmt(probe['student_share'])} ({probe['source']})")
        sections.append(("Linear probe", lines))
    fid = report.get("fidelity")
    if fid:
        rows = [[l, fid["update_r2"][i], fid["rel_error"][i], fid["r2"][i], fid["cosine"][i]] for i, l in enumerate(fid["layers"])]
        sections.append(("Fidelity of the student per layer", _table(["layer", "update R^2", "rel. error", "R^2", "cosine"], rows)))
    rows = []
    for model, d in report["dynamics"].items():
        if d is None:
            continue
        jumps = (d.get("speed_jumps") or {}).get("patches") or {}
        rows.append([model, d["gamma_midpoint"].get("cls"), d["patch_stable_rank"][-1], (d["patch_coherence"] or [None])[-1], jumps.get("ratio"), d["silhouette"]])
    sections.append(("Dynamics", _table(["model", "gamma(cls) midpoint layer", "last patch stable rank", "last patch coherence", "patch speed jump ratio", "cls silhouette"], rows)))
    basin_rows = [[m, r["layer"], r["scale"], r["cos_cls"], r["prediction_held"]] for m, d in report["dynamics"].items() if d for r in d["basin"]]
    sections.append(("Basin robustness", _table(["model", "perturbed layer", "noise scale", "final cls cosine", "prediction held"], basin_rows)))
    studies = report.get("studies") or {}
    if "partition" in studies:
        s = studies["partition"]["summary"]
        rows = [[m, v["value"], v["random_mean"], v["random_std"], v["z"]] for m, v in s.items()]
        sections.append((f"Partition study (max-cut {studies['partition']['boundaries']} vs {studies['partition']['n_random']} random)",
                         _table(["metric", "max-cut", "random mean", "random sigma", "z"], rows)))
    if "layer_swap" in studies and studies["layer_swap"].get("within_across"):
        wa = studies["layer_swap"]["within_across"]
        sections.append(("Layer swap", _table(["swaps", "pairs", "mean change", "mean readout cosine"],
                                              [[n, wa[f"{n}_pairs"], wa[f"{n}_change"], wa[f"{n}_cosine"]] for n in ("within", "across")])))
    if "dense" in studies:
        rows = [[m, d["segmentation"]["miou"], d["segmentation"]["pixel_acc"], d["depth"]["rmse"]] for m, d in studies["dense"].items()]
        sections.append(("Dense probes", _table(["model", "mIoU", "pixel accuracy", "depth RMSE"], rows)))
    if "ablation" in studies:
        rows = [[r["row"], r["update_r2_mean"], r["rel_error_mean"], r["top1"]] for r in studies["ablation"]]
        sections.append(("Ablation", _table(["recipe", "update R^2", "rel. error", "top-1"], rows)))
    return sections


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# raptor report: {report['run'].get('name') or 'run'}", ""]
    for title, body in _summary_sections(report):
        lines += [f"## {title}", "", *body, ""]
    if report["plots"]:
        lines += ["## Plots", ""]
        lines += [f"![{name}]({path})" for name, path in report["plots"].items()]
    return "\n".join(lines) + "\n"


def _md_table_to_html(lines: list[str]) -> str:
    out = []
    table: list[list[str]] = []
    for line in lines + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                table.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")
            table = []
        if line.strip():
            out.append(f"<p>{html.escape(line.lstrip('- ').replace('`', ''))}</p>")
    return "\n".join(out)


def to_html(report: dict[str, Any]) -> str:
    title = html.escape(f"raptor report: {report['run'].get('name') or 'run'}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>",
             "<style>body{font-family:sans-serif;max-width:980px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}</style></head><body>",
             f"<h1>{title}</h1>"]
    for name, body in _summary_sections(report):
        parts += [f"<h2>{html.escape(name)}</h2>", _md_table_to_html(body)]
    if report["plots"]:
        parts.append("<h2>Plots</h2>")
        parts += [f"<figure><img src='{html.escape(p)}' alt='{html.escape(n)}'><figcaption>{html.escape(n)}</figcaption></figure>"
                  for n, p in report["plots"].items()]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(url: str, report: dict[str, Any]) -> dict[str, str]:
    """Render plots, then write report.schema.json, report.json, index.html and index.md under ``url``.

    Returns the URLs written. ``index.md`` goes last, so a folder holding it is complete (the
    pipeline's "artifact exists" test for the report stage). The report is validated against
    :class:`~raptor.analysis.schema.Report` before anything is written and again with its plots.
    """
    validate_report(report)
    log.debug("report: drawing plots into %s", url)
    report["plots"] = render_plots(report, url)
    validate_report(report)
    storage.write_json(storage.join(url, "report.schema.json"), REPORT_SCHEMA)
    written = {"json": storage.join(url, "report.json"), "html": storage.join(url, "index.html"), "markdown": storage.join(url, "index.md")}
    storage.write_json(written["json"], report)
    storage.write_bytes(written["html"], to_html(report).encode())
    storage.write_bytes(written["markdown"], to_markdown(report).encode())
    log.debug("report: wrote %s (%d plots)", written["markdown"], len(report["plots"]))
    return written
