"""The report's figures, drawn from the report dict alone (matplotlib, Agg backend, no display needed).

Each ``plot_*`` returns a Figure, or None when the report lacks that section; :func:`render_plots`
saves them as PNGs through :mod:`raptor.storage`, so a report folder may live on s3://.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from raptor import storage  # noqa: E402
from raptor.analysis.schema import PROBE_ROWS  # noqa: E402
from raptor.discovery import plot_distances  # noqa: E402

log = logging.getLogger(__name__)

_GROUP_COLORS = {"cls": "tab:red", "registers": "tab:green", "patches": "tab:blue"}
_MODEL_STYLE = {"teacher": "-", "student": "--"}


def _boundary_lines(ax: Any, boundaries: list[int], offset: float = 0.0) -> None:
    for b in boundaries:
        ax.axvline(b + 0.5 + offset, color="grey", lw=0.8, ls=":")


def _models(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, d) for name, d in report["dynamics"].items() if d is not None]


def plot_group_curves(report: dict[str, Any], key: str, ylabel: str, first_layer: int) -> Figure:
    """Per token group, teacher (solid) and student (dashed) curves of a dynamics measure over layers."""
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    for model, d in _models(report):
        for group, curve in d[key].items():
            ax.plot(range(first_layer, first_layer + len(curve)), curve, _MODEL_STYLE[model], color=_GROUP_COLORS.get(group), label=f"{model} {group}")
    _boundary_lines(ax, report.get("boundaries", []))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_patch_motion(report: dict[str, Any]) -> Figure:
    """Stable rank and coherence of the patch updates: late low-rank collective motion."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    for model, d in _models(report):
        steps = range(1, len(d["patch_stable_rank"]) + 1)
        ax1.plot(steps, d["patch_stable_rank"], _MODEL_STYLE[model], label=model)
        if d["patch_coherence"] is not None:
            ax2.plot(steps, d["patch_coherence"], _MODEL_STYLE[model], label=model)
    for ax, label in ((ax1, "stable rank of patch updates"), (ax2, "patch coherence")):
        _boundary_lines(ax, report.get("boundaries", []))
        ax.set_xlabel("layer produced")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_basins(report: dict[str, Any]) -> Figure:
    """Final cls cosine to the unperturbed run against the noise scale, per perturbed layer."""
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    for model, d in _models(report):
        for layer in sorted({r["layer"] for r in d["basin"]}):
            rows = sorted((r for r in d["basin"] if r["layer"] == layer), key=lambda r: r["scale"])
            ax.plot([r["scale"] for r in rows], [r["cos_cls"] for r in rows], _MODEL_STYLE[model], marker="o", label=f"{model} l={layer}")
    ax.set_xlabel("relative noise scale")
    ax.set_ylabel("final cls cosine to unperturbed")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_fidelity(report: dict[str, Any]) -> Figure | None:
    fid = report.get("fidelity")
    if not fid:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    for metric in ("update_r2", "cosine", "r2"):
        ax.plot(fid["layers"], fid[metric], marker=".", label=metric)
    ax2 = ax.twinx()
    ax2.plot(fid["layers"], fid["rel_error"], color="black", ls="--", label="rel_error")
    ax2.set_ylabel("relative error")
    _boundary_lines(ax, report.get("boundaries", []), offset=0.0)
    ax.set_xlabel("layer")
    ax.set_ylabel("fidelity")
    ax.legend(loc="lower left", fontsize=7)
    ax2.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def plot_probe(report: dict[str, Any]) -> Figure | None:
    probe = report.get("probe")
    if not probe:
        return None
    names = [n for n in PROBE_ROWS if probe.get(n)]
    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=110)
    bars = ax.bar(names, [probe[n]["top1"] for n in names], color=["tab:grey", "tab:blue", "tab:cyan"][: len(names)])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("top-1")
    share = probe.get("student_share")
    ax.set_title("linear probe" + (f" (student share {share:.1%})" if share is not None else ""))
    fig.tight_layout()
    return fig


def plot_distance_matrix(report: dict[str, Any]) -> Figure | None:
    disc = report.get("discovery")
    if not disc:
        return None
    title = f"{disc.get('metric') or 'layer'} distances, boundaries {disc.get('boundaries', report.get('boundaries'))}"
    return plot_distances(disc["distances"], disc.get("boundaries", report.get("boundaries")), title=title)


def plot_layer_swap(report: dict[str, Any]) -> Figure | None:
    swap = report.get("studies", {}).get("layer_swap")
    if not swap:
        return None
    import numpy as np

    if swap["top1"] is not None:
        m, label = np.asarray(swap["top1"]) - swap["base_top1"], "top-1 change"
    else:
        m, label = np.asarray(swap["cosine"]), "readout cosine to unswapped"
    n = m.shape[0]
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=110)
    im = ax.imshow(m, cmap="magma", extent=(0.5, n + 0.5, n + 0.5, 0.5))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    for b in report.get("boundaries", []):
        ax.axhline(b + 0.5, color="cyan", lw=1.2)
        ax.axvline(b + 0.5, color="cyan", lw=1.2)
    ax.set_xlabel("swapped layer j")
    ax.set_ylabel("swapped layer i")
    ax.set_title("layer swap")
    fig.tight_layout()
    return fig


def plot_partition(report: dict[str, Any]) -> Figure | None:
    part = report.get("studies", {}).get("partition")
    if not part:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    rand = [r["update_r2_mean"] for r in part["runs"] if r["kind"] == "random"]
    ours = [r["update_r2_mean"] for r in part["runs"] if r["kind"] != "random"]
    ax.scatter(rand, [0] * len(rand), color="tab:grey", label="random partitions")
    ax.scatter(ours, [0] * len(ours), color="tab:red", marker="*", s=150, label=f"max-cut {part['boundaries']}")
    ax.set_yticks([])
    ax.set_xlabel("mean update-R^2 over layers")
    z = part["summary"]["update_r2_mean"]["z"]
    ax.set_title("partition study" + (f" (z = {z:.2f})" if z is not None else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


PLOTS: dict[str, Callable[[dict[str, Any]], Figure | None]] = {
    "gamma": lambda r: plot_group_curves(r, "gamma", "directional convergence gamma_l", first_layer=0),
    "speed": lambda r: plot_group_curves(r, "speed_deg", "angular speed s_l (degrees)", first_layer=1),
    "patch_motion": plot_patch_motion,
    "basins": plot_basins,
    "fidelity": plot_fidelity,
    "probe": plot_probe,
    "distances": plot_distance_matrix,
    "layer_swap": plot_layer_swap,
    "partition": plot_partition,
}


def render_plots(report: dict[str, Any], folder: str) -> dict[str, str]:
    """Save every applicable figure as ``folder/plots/NAME.png``; returns ``{name: "plots/NAME.png"}``."""
    out: dict[str, str] = {}
    for name, draw in PLOTS.items():
        fig = draw(report)
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        rel = f"plots/{name}.png"
        storage.write_bytes(storage.join(folder, rel), buf.getvalue())
        out[name] = rel
        log.debug("wrote %s", rel)
    return out
