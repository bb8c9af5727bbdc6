"""The stochastic-depth study (``raptor analyze --sweep URL``): are teachers trained with more drop-path more block-recurrent?

METHOD.md section 7: a higher drop-path rate should give more alike layers, a stronger block
structure in the layer-distance matrix and a better Raptor fit. Over a sweep's finished trials
(``teacher.drop_path_rate`` swept, replicate teachers through ``teacher.train.seed``), per teacher:
its cosine and swap distance matrices on the same val images, the max-cut objective against random
contiguous partitions (:func:`raptor.discovery.random_baseline`; z < 0: the max-cut partition keeps
far less distance inside its segments than chance, i.e. blocks) and the objective as a fraction of
the random mean; per trial, the k-block student's update-R^2 and probe share. Per rate: mean +- std
over the replicates (trials are grouped by their spec's rate, whatever the sweep varied). Written to ``{sweep}/study/``: ``study.json``, ``study.md`` (the table) and
``distances.png`` (one teacher per rate, cosine above swap, with its max-cut boundaries).
"""

from __future__ import annotations

import io
import logging
import math
from collections import defaultdict
from typing import Any

import numpy as np

from raptor import storage
from raptor.discovery import plot_distances, random_baseline, segment
from raptor.errors import UserError
from raptor.service.spec.translate import teacher_ref
from raptor.service.engine.artifacts import RunFolder
from raptor.service.spec import JobSpec, load_spec
from raptor.service.stages.distances import distance_matrix
from raptor.service.sweep.trials import SWEEP_FOLDER, load_results

log = logging.getLogger(__name__)

METRICS = ("cosine", "swap")
RANDOM_PARTITIONS = 1000


def _float(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def teacher_blockiness(spec: JobSpec, run_folder: RunFolder, *, samples: int, seed: int) -> dict[str, Any]:
    """Cosine and swap distances of the trial's teacher on ``samples`` val images, and their max-cut vs random partitions."""
    ref = teacher_ref(spec, run_folder)
    out: dict[str, Any] = {"teacher": ref.checkpoint}
    for metric in METRICS:
        probe = spec.updated(discovery=spec.discovery.updated(metric=metric, num_images=samples).model_dump())
        dist = distance_matrix(probe, ref)
        k = spec.discovery.k
        base = random_baseline(dist, k, RANDOM_PARTITIONS, seed=seed)
        out[metric] = {"z": base.z, "ratio": base.objective / base.mean if base.mean else math.nan,
                       "boundaries": list(segment(dist, k).boundaries), "distances": dist.tolist()}
    if storage.exists(run_folder.teacher_metrics):
        out["teacher_top1"] = storage.read_json(run_folder.teacher_metrics).get("val_top1")
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _pm(stat: tuple[float, float], digits: int = 3) -> str:
    mean, std = stat
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} +- {std:.{digits}f}"


def depth_study(url: str, out: str | None = None, *, samples: int = 256, seed: int = 0) -> dict[str, str]:
    """The study over the finished trials of the sweep at ``url`` (its storage.url); returns the URLs written.
    The distances run where each trial's spec says (``scaling.use_gpu``), like the discovery stage."""
    rows = [r for r in load_results(url) if r["status"] == "finished"]
    if not rows:
        raise UserError(f"{url}: the sweep has no finished trial to study")
    folder = out or storage.join(url, SWEEP_FOLDER, "study")
    teachers: dict[str, dict[str, Any]] = {}
    trials = []
    for row in rows:
        run_folder = RunFolder.from_index(row["run"])
        spec = load_spec(run_folder.spec_file)
        key = run_folder.folders["teacher"]
        if key not in teachers:
            log.info("study: teacher %s (drop-path %s, seed %s)", key, spec.teacher.drop_path_rate,
                     spec.teacher.train.seed if spec.teacher.train else None)
            teachers[key] = teacher_blockiness(spec, run_folder, samples=samples, seed=seed)
        trials.append({"rate": spec.teacher.drop_path_rate, "teacher": key,
                       "seed": spec.teacher.train.seed if spec.teacher.train else None,
                       "update_r2": _float(row.get("update_r2")), "student_share": _float(row.get("student_share")),
                       "probe_top1": _float(row.get("probe_top1"))})
    by_rate: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        by_rate[t["rate"]].append(t)
    table = []
    for rate in sorted(by_rate):
        ts = by_rate[rate]
        tch = [teachers[k] for k in dict.fromkeys(t["teacher"] for t in ts)]
        entry: dict[str, Any] = {"drop_path_rate": rate, "teachers": len(tch), "trials": len(ts)}
        for metric in METRICS:
            entry[f"{metric}_z"] = _mean_std([t[metric]["z"] for t in tch])
            entry[f"{metric}_ratio"] = _mean_std([t[metric]["ratio"] for t in tch])
        entry["teacher_top1"] = _mean_std([t.get("teacher_top1") for t in tch])
        for name in ("update_r2", "student_share", "probe_top1"):
            entry[name] = _mean_std([t[name] for t in ts])
        table.append(entry)
    written = {
        "json": storage.join(folder, "study.json"),
        "markdown": storage.join(folder, "study.md"),
        "figure": storage.join(folder, "distances.png"),
    }
    storage.write_json(written["json"], {"samples": samples, "random_partitions": RANDOM_PARTITIONS, "table": table,
                                         "trials": trials, "teachers": teachers})
    storage.write_bytes(written["markdown"], _markdown(url, table, samples).encode())
    storage.write_bytes(written["figure"], _figure(by_rate, teachers))
    log.info("study: %d drop-path rates, %d teachers, %d trials -> %s", len(table), len(teachers), len(trials), folder)
    return written


def _markdown(url: str, table: list[dict[str, Any]], samples: int) -> str:
    head = ["drop-path", "teachers", "cosine z", "cosine obj/random", "swap z", "swap obj/random", "teacher top-1",
            "student update-R^2", "student share"]
    lines = [
        f"# Stochastic-depth study of {url}",
        "",
        f"Per drop-path rate, mean +- std over teachers (seeds): the max-cut objective (distance kept inside the "
        f"segments) against {RANDOM_PARTITIONS} random contiguous partitions of the same k, as a z-score (more negative: "
        f"stronger block structure) and as a fraction of the random mean, on {samples} val images; the teacher's own "
        "val top-1; the k-block student's stage-2 validation update-R^2 mean and its probe share of the teacher's top-1.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for e in table:
        cells = [f"{e['drop_path_rate']:g}", str(e["teachers"]), _pm(e["cosine_z"], 2), _pm(e["cosine_ratio"]),
                 _pm(e["swap_z"], 2), _pm(e["swap_ratio"]), _pm(e["teacher_top1"]), _pm(e["update_r2"]),
                 _pm(e["student_share"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![distances](distances.png)", ""]
    return "\n".join(lines)


def _figure(by_rate: dict[float, list[dict[str, Any]]], teachers: dict[str, dict[str, Any]]) -> bytes:
    """One teacher per rate (its first seed), cosine distances above swap distances, max-cut boundaries drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted(by_rate)
    fig, axes = plt.subplots(len(METRICS), len(rates), figsize=(3.6 * len(rates), 3.2 * len(METRICS)), dpi=100,
                             squeeze=False)
    for j, rate in enumerate(rates):
        first = min(by_rate[rate], key=lambda t: (t["seed"] is None, t["seed"]))
        tch = teachers[first["teacher"]]
        for i, metric in enumerate(METRICS):
            m = tch[metric]
            plot_distances(m["distances"], m["boundaries"], title=f"p={rate:g} seed {first['seed']}: {metric} "
                           f"z={m['z']:.1f}", ax=axes[i][j])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
