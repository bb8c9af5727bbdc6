"""The report stage (and ``raptor analyze``): a finished (or partly finished) run, analysed from its artifacts.

Reads the artifacts the run's index (``run.json``, :class:`~raptor.service.engine.artifacts.RunFolder`) names:
the teacher, the distances and boundaries, the student (stage 2, else stage 1, else none: the
report covers the teacher alone) and the probe results; analyses teacher and student on the val
images with :mod:`raptor.analysis` and writes the report (``report.json``, ``index.md``,
``index.html``, ``plots/``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from raptor import storage
from raptor.analysis.analyze import analyze_models, collect_trajectories
from raptor.analysis.report import build_report, write_report
from raptor.data import ShardLoader
from raptor.discovery import load_distances
from raptor.distill import StageConfig
from raptor.errors import CorruptArtifact, UserError
from raptor.eval.dense import dense_probes
from raptor.eval.structure import ablation_study, layer_swap_study, partition_study
from raptor.models import Raptor, Teacher, load_student
from raptor.service.spec.translate import shard_source, single_process, stage_config, teacher_ref
from raptor.service.engine.graph import StageContext
from raptor.service.engine.artifacts import RunFolder, corrupt_file
from raptor.service.spec import JobSpec, load_spec

log = logging.getLogger(__name__)

STUDENT_STAGES = ("stage2", "stage1")


def _student(layout: RunFolder, teacher: Teacher) -> tuple[Raptor | None, str | None]:
    for stage in STUDENT_STAGES:
        if stage in layout.folders and storage.exists(layout.student(stage)):
            log.debug("loading the %s student from %s", stage, layout.student(stage))
            return load_student(layout.student(stage), teacher)[0], stage
    log.warning("no student in %s (stage 1 has not finished): the report covers the teacher only", layout.run_url)
    return None, None


def _discovery(layout: RunFolder) -> dict[str, Any] | None:
    if not {"distances", "discovery"} <= set(layout.folders):
        return None
    seg = storage.read_json(layout.segmentation)
    boundaries = seg.get("boundaries") if isinstance(seg, dict) else None
    if not isinstance(boundaries, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in boundaries):
        raise CorruptArtifact(f"{layout.segmentation}: not a segmentation (an object with integer 'boundaries')")
    dist = load_distances(layout.distances)
    return {"metric": seg.get("metric"), "distances": dist.tolist(), "boundaries": boundaries}


def _probe(layout: RunFolder) -> dict[str, Any] | None:
    """The probe stage's trained probes, reduced to the report's fields (None when absent)."""
    if "probe" not in layout.folders:
        return None
    res = storage.read_json(layout.probe)
    pick = lambda d: {"top1": float(d["top1"]), "top5": d.get("top5")}  # noqa: E731
    try:
        out = {"source": "probe stage", "teacher": pick(res["teacher"]), "student": pick(res["student"])}
        if isinstance(res.get("student_finetuned"), dict):
            out["student_finetuned"] = pick(res["student_finetuned"])
        share = res.get("student_share")
        out["student_share"] = None if share is None else float(share)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CorruptArtifact(f"{layout.probe}: not the probe stage's results ({type(e).__name__}: {e})") from None
    return out


def split_batches(spec: JobSpec, split: str = "val", dense: bool = False) -> ShardLoader:
    """A split's shards once (val falls back to train), with eval transforms, in file order."""
    source = shard_source(spec, "val" if split == "val" else "train", num_workers=0)
    return source.loader(train=False, batch_size=min(spec.data.batch_size, 64), dense=dense)


def run_dense_probes(spec: JobSpec, teacher: Teacher, student: Raptor | None, *, samples: int, amp: bool) -> dict[str, Any]:
    """Segmentation and depth probes for teacher and student, when the run's shards carry masks and depth."""
    from raptor.data import Shards

    if not Shards.resolve(spec.data.train, split=spec.data.train_split).dense:
        raise UserError(f"{spec.data.train}: these shards carry no masks or depth maps (write them with dense=True)")
    log.info("dense probes on %d train / val images", samples)
    return dense_probes(teacher, student, split_batches(spec, "train", dense=True),
                        split_batches(spec, "val", dense=True), max_samples=samples, amp=amp)


def _study_configs(spec: JobSpec, steps: int | None) -> tuple[StageConfig, StageConfig]:
    """The run's own stage recipes (same budget as the run unless ``steps`` overrides both stages)."""
    configs = []
    for name in ("stage1", "stage2"):
        cfg = stage_config(spec, name)
        if steps:
            cfg = dataclasses.replace(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, steps // 10))
        configs.append(cfg)
    return configs[0], configs[1]


@dataclass(frozen=True)
class Studies:
    """Which optional studies a report runs (each costs far more than the analysis itself).

    ``partition`` = number of random partitions (0: none); the partition and ablation studies distil
    students on ``samples`` train images with the run's stage recipes (``steps`` overrides both
    stages' step counts); ``dense`` = segmentation and depth probes on ``samples`` images.
    """

    layer_swap: bool = False
    partition: int = 0
    ablation: bool = False
    dense: bool = False
    samples: int = 512
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.partition < 0 or self.samples < 1 or (self.steps is not None and self.steps < 1):
            raise UserError(f"studies need partition >= 0, samples >= 1, steps >= 1 (got {self.partition}, {self.samples}, {self.steps})")


def run_studies(
    spec: JobSpec, teacher: Teacher, student: Raptor | None, boundaries: list[int], opts: Studies, *, val_samples: int, amp: bool, seed: int
) -> dict[str, Any]:
    """The eval studies on the run's data: layer swap (val), partition and ablation (students distilled on train), dense probes."""
    studies: dict[str, Any] = {}
    if (opts.partition or opts.ablation) and not boundaries:
        raise UserError("the partition and ablation studies need boundaries (run the discovery stage first)")
    if opts.layer_swap or opts.partition or opts.ablation:
        traj, _, labels = collect_trajectories(teacher, None, split_batches(spec), max_samples=val_samples, amp=amp)
        val = [(traj, labels)]
    if opts.layer_swap:
        log.info("layer-swap study on %d samples", traj.shape[0])
        swap = layer_swap_study(teacher, val, amp=amp)
        studies["layer_swap"] = {**swap.to_dict(), "within_across": swap.within_across(boundaries) if boundaries else None}
    if opts.partition or opts.ablation:
        t_train, _, y_train = collect_trajectories(teacher, None, split_batches(spec, "train"), max_samples=opts.samples, amp=amp)
        bs = spec.data.batch_size
        train = [(t_train[i : i + bs], y_train[i : i + bs]) for i in range(0, t_train.shape[0], bs)]
        stage1, stage2 = _study_configs(spec, opts.steps)
        if opts.partition:
            log.info("partition study: max-cut %s against %d random partitions, %d stage-1 steps each", boundaries, opts.partition, stage1.steps)
            studies["partition"] = partition_study(teacher, train, val, boundaries=boundaries, n_random=opts.partition, stage1=stage1, seed=seed)
        if opts.ablation:
            log.info("ablation study: %d students, %d + %d steps", 4, stage1.steps, stage2.steps)
            studies["ablation"] = ablation_study(teacher, train, val, boundaries=boundaries, stage1=stage1, stage2=stage2, seed=seed)
    if opts.dense:
        studies["dense"] = run_dense_probes(spec, teacher, student, samples=opts.samples, amp=amp)
    return studies


def analyze_run(
    spec: JobSpec,
    layout: RunFolder,
    out_url: str,
    *,
    max_samples: int = 64,
    studies: Studies = Studies(),
    device: str | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Analyse the run's teacher and student on ``max_samples`` val images and write the report to ``out_url``.

    Returns the URLs written (``json``, ``html``, ``markdown``); ``studies`` adds those of
    :mod:`raptor.eval.structure`.
    """
    t0 = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref = teacher_ref(spec, layout)
    if not storage.exists(ref.checkpoint):
        raise UserError(f"no teacher at {ref.checkpoint}: has the teacher stage run?")
    teacher = ref.load(dev)
    amp = bool(ref.amp(dev))
    student, stage = _student(layout, teacher)
    discovery = _discovery(layout)
    boundaries = list(student.boundaries if student is not None else (discovery or {}).get("boundaries") or [])
    analysis = analyze_models(teacher, student, split_batches(spec), boundaries=boundaries,
                              max_samples=max_samples, seed=seed, amp=amp)
    extra = run_studies(spec, teacher, student, boundaries, studies, val_samples=max_samples, amp=amp, seed=seed)
    report = build_report(analysis, run_name=spec.name, run_url=layout.run_url, discovery=discovery,
                          probe=_probe(layout), studies=extra)
    report["run"]["student_stage"] = stage
    written = write_report(out_url, report)
    log.debug("analysis of %s finished in %.1fs", layout.run_url, time.perf_counter() - t0)
    return written


def analyze(run_url: str, out_url: str | None = None, **kwargs: Any) -> dict[str, str]:
    """``raptor analyze``: the report of the run at ``run_url`` (its spec and artifacts from ``run.json``)."""
    layout = RunFolder.from_index(run_url)
    for folder in layout.folders.values():  # never analyse a file that is not the one its stage wrote
        if (problem := corrupt_file(folder)) is not None:
            raise CorruptArtifact(f"{problem}; `raptor run` on the run's spec makes it again")
    spec = load_spec(layout.spec_file)
    return analyze_run(spec, layout, out_url or layout.run_report, **kwargs)


def run(ctx: StageContext) -> dict[str, Any]:
    device = None if ctx.spec.scaling.use_gpu else "cpu"  # None: the GPU of the task, where there is one
    written = single_process(ctx.spec, analyze_run, ctx.spec, ctx.layout, ctx.folder, device=device)
    log.info("report: %s (copied to %s)", written["markdown"], ctx.layout.run_report)
    return {"markdown": written["markdown"]}
