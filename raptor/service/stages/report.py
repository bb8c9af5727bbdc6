"""The report stage: a finished (or partly finished) run, analysed from its artifacts.

Reads the artifacts a :class:`~raptor.service.engine.artifacts.RunFolder` names: the teacher, the
distances and boundaries, the student (stage 2, else stage 1, else none: the report covers the
teacher alone) and the probe results; analyses teacher and student on the val images with
:mod:`raptor.analysis` and writes the report (``report.json``, ``index.md``, ``index.html``,
``plots/``), which the pipeline then copies into the run folder (``report/``). ``raptor analyze``
(``raptor.service.cli``) runs :func:`analyze_run` on a run's folder, with optional studies.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from raptor import storage
from raptor.analysis.analyze import analyze_models
from raptor.analysis.report import build_report, write_report
from raptor.data import ShardLoader
from raptor.discovery import load_distances
from raptor.errors import CorruptArtifact, UserError
from raptor.models import Raptor, Teacher, load_student
from raptor.service.spec.translate import shard_source, single_process, teacher_ref
from raptor.service.engine.graph import Stage, StageContext
from raptor.service.engine.artifacts import RunFolder
from raptor.service.spec import JobSpec
from raptor.service.stages.fields import EVAL_DATA

log = logging.getLogger(__name__)

STUDENT_STAGES = ("stage2", "stage1")
PUBLISHED = "report"  # the run folder's copy of the report

# extra studies of the analysed models: (teacher, student or None, boundaries, autocast) -> the report's studies
StudyHook = Callable[[Teacher, Raptor | None, list[int], bool], dict[str, Any]]


def _student(run_folder: RunFolder, teacher: Teacher) -> tuple[Raptor | None, str | None]:
    for stage in STUDENT_STAGES:
        if stage in run_folder.folders and storage.exists(run_folder.student(stage)):
            log.debug("loading the %s student from %s", stage, run_folder.student(stage))
            return load_student(run_folder.student(stage), teacher)[0], stage
    log.warning("no student in %s (stage 1 has not finished): the report covers the teacher only", run_folder.run_url)
    return None, None


def _discovery(run_folder: RunFolder) -> dict[str, Any] | None:
    if not {"distances", "discovery"} <= set(run_folder.folders):
        return None
    seg = storage.read_json(run_folder.segmentation)
    boundaries = seg.get("boundaries") if isinstance(seg, dict) else None
    if not isinstance(boundaries, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in boundaries):
        raise CorruptArtifact(f"{run_folder.segmentation}: not a segmentation (an object with integer 'boundaries')")
    dist = load_distances(run_folder.distances)
    return {"metric": seg.get("metric"), "distances": dist.tolist(), "boundaries": boundaries}


def _probe(run_folder: RunFolder) -> dict[str, Any] | None:
    """The probe stage's trained probes, reduced to the report's fields (None when absent)."""
    if "probe" not in run_folder.folders:
        return None
    res = storage.read_json(run_folder.probe)
    pick = lambda d: {"top1": float(d["top1"]), "top5": d.get("top5")}  # noqa: E731
    try:
        out = {"source": "probe stage", "teacher": pick(res["teacher"]), "student": pick(res["student"])}
        if isinstance(res.get("student_finetuned"), dict):
            out["student_finetuned"] = pick(res["student_finetuned"])
        share = res.get("student_share")
        out["student_share"] = None if share is None else float(share)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CorruptArtifact(f"{run_folder.probe}: not the probe stage's results ({type(e).__name__}: {e})") from None
    return out


def split_batches(spec: JobSpec, split: str = "val", dense: bool = False) -> ShardLoader:
    """A split's shards once (val falls back to train), with eval transforms, in file order."""
    source = shard_source(spec, "val" if split == "val" else "train", num_workers=0)
    return source.loader(train=False, batch_size=min(spec.data.batch_size, 64), dense=dense)


def analyze_run(
    spec: JobSpec,
    run_folder: RunFolder,
    out_url: str,
    *,
    max_samples: int = 64,
    studies: StudyHook | None = None,
    device: str | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Analyse the run's teacher and student on ``max_samples`` val images and write the report to ``out_url``.

    Returns the URLs written (``json``, ``html``, ``markdown``); ``studies`` adds its sections (those of
    :mod:`raptor.eval.structure` for ``raptor analyze``).
    """
    t0 = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref = teacher_ref(spec, run_folder)
    if not storage.exists(ref.checkpoint):
        raise UserError(f"no teacher at {ref.checkpoint}: has the teacher stage run?")
    teacher = ref.load(dev)
    amp = bool(ref.amp(dev))
    student, stage = _student(run_folder, teacher)
    discovery = _discovery(run_folder)
    boundaries = list(student.boundaries if student is not None else (discovery or {}).get("boundaries") or [])
    analysis = analyze_models(teacher, student, split_batches(spec), boundaries=boundaries,
                              max_samples=max_samples, seed=seed, amp=amp)
    extra = studies(teacher, student, boundaries, amp) if studies is not None else {}
    report = build_report(analysis, run_name=spec.name, run_url=run_folder.run_url, discovery=discovery,
                          probe=_probe(run_folder), studies=extra)
    report["run"]["student_stage"] = stage
    written = write_report(out_url, report)
    log.debug("analysis of %s finished in %.1fs", run_folder.run_url, time.perf_counter() - t0)
    return written


def run(ctx: StageContext) -> dict[str, Any]:
    device = None if ctx.spec.scaling.use_gpu else "cpu"  # None: the GPU of the task, where there is one
    written = single_process(ctx.spec, analyze_run, ctx.spec, ctx.run_folder, ctx.folder, device=device)
    log.info("report: %s (copied to %s)", written["markdown"], ctx.run_folder.run(PUBLISHED))
    return {"markdown": written["markdown"]}


STAGE = Stage("report", reads=(*EVAL_DATA, "teacher.precision", "scaling.use_gpu"),
              upstream=("distances", "discovery", "stage2", "probe"), run=run, publish=PUBLISHED,
              ignores={"data.batch_size": "batches only group the analysed images"})
