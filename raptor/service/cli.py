"""The service's commands: ``raptor run``, ``plan``, ``sweep``, ``submit``, ``teacher train``, ``analyze`` and ``k8s render``.

``run`` executes the pipeline here and ``sweep`` a Ray Tune sweep of it: on the Ray cluster in
``RAY_ADDRESS`` (set by ``ray job submit`` for its entrypoint) or on a local Ray it starts (the
embedded default). ``submit`` sends that same ``raptor run`` (or ``raptor sweep``) to a cluster
through Ray's job API (``raptor.service.deploy.submit``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

from raptor.errors import CorruptArtifact, UserError
from raptor.service.spec import JobSpec, SpecError, load_spec

if TYPE_CHECKING:
    from raptor.distill import StageConfig
    from raptor.models import Raptor, Teacher

log = logging.getLogger(__name__)


def _load(args: argparse.Namespace) -> JobSpec:
    """``args.spec`` with its ``--set`` overrides, validated, and its teacher architecture built on the
    meta device: a spec timm cannot build fails here, in one line naming the file."""
    from raptor.service.spec.translate import check_teacher

    spec = load_spec(args.spec, args.overrides)
    try:
        check_teacher(spec)
    except SpecError as e:
        raise SpecError(f"{args.spec}: {e}") from None
    return spec


def _spec_args(p: argparse.ArgumentParser, what: str = "job spec YAML (path or URL)") -> None:
    p.add_argument("spec", help=what)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set stage2.steps=2000 (repeatable; the value is YAML)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """The service's commands (the top-level CLI imports this module only when one of them runs)."""
    from raptor.export import FORMATS
    from raptor.service.deploy.k8s import OVERLAYS

    p = subparsers.add_parser("run", help="run a job spec: data -> teacher -> discovery -> stage1 -> stage2 -> probe -> report -> export",
                              description="Plan the stage graph of the spec (a content key per stage), print the plan, "
                              "then make the artifacts that do not exist yet. Re-running a finished spec does nothing; "
                              "a changed spec redoes exactly the stages whose inputs changed.")
    _spec_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print per stage: done, will run or will resume, and why (which field changed); run nothing")
    p.set_defaults(func=cmd_run)
    p = subparsers.add_parser(
        "plan", help="per-GPU memory and throughput of a spec's training stages; what makes it fit",
        description="Per GPU, for stage 1 and stage 2: the teacher's weights, the student's parameters, gradients and "
        "optimizer states per ZeRO stage, the trajectory buffer, activations with and without activation "
        "checkpointing, and the samples/s the FLOP model expects at a stated utilisation of the device's peak. When a "
        "stage does not fit, the --set switches that make every stage fit. Exit code 3 when it does not fit.")
    _spec_args(p)
    p.add_argument("--device", help="device from raptor.perf's table, e.g. H100, H200, A100, A100-40GB, L40S "
                   "(default: this machine's GPU, else H100)")
    p.add_argument("--memory-gib", type=float, help="override the device's memory")
    p.add_argument("--peak-tflops", type=float, help="override the device's dense peak (default: logging.peak_tflops, else the table)")
    p.add_argument("--utilisation", type=float,
                   help="fraction of the peak the step sustains, for the expected samples/s (default: the memory "
                        "plan's stated assumption, raptor.perf.memory.UTILISATION)")
    p.add_argument("--boundaries", help="comma-separated boundaries to plan with, e.g. the discovered 7,10 "
                   "(default: discovery.boundaries, else an even split)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
    p = subparsers.add_parser(
        "sweep", help="run the spec's sweep section as a Ray Tune sweep: one pipeline per trial, one shared store",
        description="Validate every trial's spec (the base spec with the trial's values from sweep.space), then run "
        "the trials with Ray Tune (search: grid, random or optuna; scheduler: fifo or asha, which stops trailing trials "
        "mid-stage). Trials share every artifact whose inputs agree, and no two trials make one artifact at once. "
        "Results go to STORAGE_URL/sweep/ (results.csv, results.md, best.yaml, one PNG per swept field); trials run in "
        "STORAGE_URL/trials/<id>/. Re-running the same command resumes the sweep: finished trials are not redone.")
    _spec_args(p, "job spec YAML with a sweep section (path or URL)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate every trial and print it with the stages it would run; run nothing")
    p.set_defaults(func=cmd_sweep)
    p = subparsers.add_parser("submit", help="submit `raptor run SPEC` (or `raptor sweep SPEC`) to a Ray cluster as a Ray job")
    _spec_args(p, "job spec YAML (a path inside the working directory that is uploaded, or a URL)")
    p.add_argument("--address", default=None, help="Ray dashboard URL (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--sweep", action="store_true", help="submit `raptor sweep SPEC`: the spec's sweep section as a Ray Tune sweep")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.set_defaults(func=cmd_submit)
    teacher = subparsers.add_parser("teacher", help="teacher models (train)")
    sub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="supervised training of the spec's timm ViT on data.train (drop-path from teacher.drop_path_rate)")
    _spec_args(p)
    p.add_argument("--out", default=None, help="output URL (default: the teacher's place in the spec's store)")
    p.set_defaults(func=cmd_teacher_train)
    p = subparsers.add_parser(
        "analyze", help="dynamics and probe report of a finished run",
        description="Read a run's artifacts (its run.json names them: spec, teacher, boundaries, student, probes), "
        "analyse teacher and student on the val data (directional convergence, angular speed, patch-update rank and "
        "coherence, basin robustness, fidelity) and write report.json, index.md, index.html and plots/.")
    p.add_argument("run", metavar="RUN_URL", help="the run's folder (the spec's storage.url); with --sweep, the sweep's")
    p.add_argument("--sweep", action="store_true",
                   help="RUN_URL is a sweep: the stochastic-depth study over its trials (per drop-path rate: teacher "
                   "blockiness z-scores for cosine and swap distances, the student's update-R^2 and probe share, mean +- std "
                   "over seeds) to RUN_URL/sweep/study/")
    p.add_argument("--out", metavar="URL", help="report folder (default: RUN_URL/report)")
    p.add_argument("--samples", type=int, default=64, help="val images to analyse (default 64)")
    p.add_argument("--layer-swap", action="store_true", help="also run the layer-swap study (L(L+1)/2 partial teacher passes)")
    p.add_argument("--partition", type=int, default=0, metavar="N",
                   help="partition study: distil on the max-cut boundaries and on N random partitions (same k and budget)")
    p.add_argument("--ablation", action="store_true", help="ablation study: the paper's recipe table at this run's scale")
    p.add_argument("--dense", action="store_true", help="segmentation (mIoU) and depth (RMSE) linear probes; needs dense shards")
    p.add_argument("--study-samples", type=int, default=512, help="train images the studies and dense probes use (default 512)")
    p.add_argument("--study-steps", type=int, help="steps per stage for the studies' students (default: the run's)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the basin perturbations")
    p.set_defaults(func=cmd_analyze)
    p = subparsers.add_parser(
        "export", help="the student as a self-contained model: a safetensors file, a Hugging Face folder, ONNX",
        description="Write a finished run's student (RUN_URL: its run.json names the artifacts) or a student file or "
        "model folder (STUDENT_URL) as a self-contained model: stem, k blocks, final norm and heads, loadable with "
        "raptor.models.load_student, RaptorViT.from_pretrained, timm.create_model('raptor_vit', ...) or onnxruntime, "
        "without Ray, DeepSpeed or the teacher's file. An ONNX file is run by onnxruntime against PyTorch once written.")
    p.add_argument("source", metavar="RUN_URL|STUDENT_URL", help="a run's folder, a student .safetensors file or a model folder")
    p.add_argument("--to", required=True, metavar="DIR|URL", help="output folder (path or fsspec URL, e.g. s3://bucket/models/x)")
    p.add_argument("--format", dest="formats", action="append", choices=FORMATS, metavar="FORMAT",
                   help=f"one of {', '.join(FORMATS)} (repeatable; default: the run's export.formats, else safetensors and hf)")
    p.add_argument("--resolution", type=int, help="the ONNX graph's image size, a multiple of the patch size (default: the model's)")
    p.set_defaults(func=cmd_export)
    k8s = subparsers.add_parser("k8s", help="Kubernetes (KubeRay) manifests generated from a job spec")
    actions = k8s.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "render", help="render the RayJob (with its RayCluster), NetworkPolicy, ServiceAccount and namespace for a spec",
        description="The entrypoint, runtime env, worker pods, GPUs and resources all come from the spec; "
        "an overlay is a named set of --set overrides that the job's entrypoint repeats.")
    _spec_args(p, "job spec path (as the image sees it, e.g. jobs/distill_k3.yaml) or URL")
    p.add_argument("--overlay", choices=sorted(OVERLAYS), default="multinode", help="dev: 1 GPU worker; multinode: the spec's scaling (default)")
    p.add_argument("--out", help="write DIR/base and DIR/overlays/OVERLAY for `kubectl apply -k`; default: print a YAML stream")
    p.set_defaults(func=cmd_k8s_render)


def connect_ray(spec: JobSpec, trials: int = 0) -> None:
    """Join the cluster in RAY_ADDRESS, or start a new local Ray big enough for the spec's workers
    (a new one: a cluster someone else started on this machine is never joined by accident).

    ``trials``: a sweep runs this many trials at once, each with the spec's workers; the local Ray
    gets one CPU more for the trials' drivers (0.01 CPU each), or a 2-core machine would deadlock.
    """
    import ray

    from raptor import console

    if not ray.is_initialized():
        console.adopt_ray_loggers()
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        else:
            need = spec.scaling.num_workers * spec.scaling.cpus_per_worker * max(trials, 1)
            # the workers' CPUs are Ray's bookkeeping, not threads: a smaller laptop still runs the default
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(need)) + (1 if trials else 0),
                     logging_level=logging.WARNING)
        console.adopt_ray_loggers()
    console.route_worker_output()


def cmd_run(args: argparse.Namespace) -> int:
    from raptor import console
    from raptor.service.engine.pipeline import run_pipeline

    spec = _load(args)
    if spec.sweep is not None:
        log.info("%s has a sweep section; `raptor run` runs the base spec alone (`raptor sweep` runs the trials)", args.spec)
    if args.dry_run:
        run_pipeline(spec, dry_run=True)
        log.info("training stages: %s", spec.worker_layout())
        return 0
    path = console.log_file(spec.storage.url, spec.name)
    log.info("raptor run %s: full log in %s", spec.name, path)
    t0 = time.perf_counter()
    timings = run_pipeline(spec, before_work=lambda: connect_ray(spec))
    total = time.perf_counter() - t0
    ran = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) or "nothing to do: every stage was done"
    report = f"{spec.storage.url.rstrip('/')}/report/index.md"
    print(f"raptor run {spec.name}: finished in {total:.0f}s ({ran}); report {report}, index {spec.storage.url.rstrip('/')}/run.json")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from raptor.service.deploy.sizing import plan_spec

    spec = _load(args)
    try:
        boundaries = [int(b) for b in args.boundaries.split(",")] if args.boundaries else None
    except ValueError:
        raise UserError(f"--boundaries: expected comma-separated layer numbers, got {args.boundaries!r}") from None
    try:
        result = plan_spec(spec, device=args.device, memory_gib=args.memory_gib, peak_tflops=args.peak_tflops,
                           boundaries=boundaries, **({} if args.utilisation is None else {"utilisation": args.utilisation}))
    except ValueError as e:  # boundaries that do not fit the teacher's depth
        raise UserError(f"--boundaries: {e}") from None
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.table())
    return 0 if result.fits else 3


def cmd_sweep(args: argparse.Namespace) -> int:
    from raptor import console
    from raptor.service.sweep.trials import plan_sweep
    from raptor.service.sweep.tune import run_planned

    spec = _load(args)
    plan, specs = plan_sweep(spec, args.spec)  # every trial validated before anything starts
    if args.dry_run:
        from raptor.service.engine.pipeline import plan as plan_stages

        from raptor.service.sweep.trials import describe, trial_id

        for params, trial in specs:
            todo = [s.name for s in plan_stages(trial)[0] if not s.done]
            print(f"{trial_id(params)}  {describe(params)}  {'will run ' + ', '.join(todo) if todo else 'done'}")
        return 0
    path = console.log_file(spec.storage.url, spec.name)
    log.info("raptor sweep %s: full log in %s", spec.name, path)
    t0 = time.perf_counter()
    assert plan.spec.sweep is not None
    connect_ray(spec, trials=plan.spec.sweep.max_concurrent_trials or 1)
    summary = run_planned(plan, specs)
    print(f"raptor sweep {spec.name}: {summary['trials']} trials in {time.perf_counter() - t0:.0f}s "
          f"({summary['finished']} finished, {summary['stopped']} stopped, {summary['failed']} failed); "
          f"best {summary['best'] or 'none'}; results {summary['folder']}/results.md")
    return 0 if summary["finished"] else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from raptor.service.deploy.submit import auth_error, follow, redacted_entrypoint, submission, submit

    spec = _load(args)  # fail here, not on the cluster, on a bad spec
    if args.sweep:
        from raptor.service.sweep.trials import plan_sweep

        plan_sweep(spec, args.spec)
    address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    try:
        client = JobSubmissionClient(address)
        job = submission(args.spec, spec, args.overrides, command="sweep" if args.sweep else "run")
        job_id = submit(client, job, spec.name, address)
        print(f"submitted {job_id} to {address}: {redacted_entrypoint(job['entrypoint'])}")
        if args.no_wait:
            return 0
        return 0 if follow(client, job_id) else 1
    except AuthenticationError as e:
        raise auth_error(address, e) from None
    except (ConnectionError, RuntimeError) as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def cmd_teacher_train(args: argparse.Namespace) -> int:
    """``raptor teacher train``: the teacher stage's training (:func:`raptor.service.stages.teacher.train_teacher`)
    outside the pipeline, by default into the teacher's keyed place in the spec's store."""
    from raptor.service.spec.translate import absolute_paths
    from raptor.service.engine.pipeline import plan
    from raptor.service.stages.teacher import train_teacher

    spec = absolute_paths(_load(args))
    if spec.teacher.train is None:
        raise UserError("teacher.train: missing (the spec gives no recipe to train the teacher with)")
    out = args.out or plan(spec)[1].teacher
    metrics = train_teacher(spec, out)
    print(json.dumps({"teacher": out, **metrics}))
    return 0


# ---------------------------------------------------------------- raptor analyze


@dataclasses.dataclass(frozen=True)
class Studies:
    """Which optional studies ``raptor analyze`` runs (each costs far more than the analysis itself).

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


def run_dense_probes(spec: JobSpec, teacher: Teacher, student: Raptor | None, *, samples: int, amp: bool) -> dict[str, Any]:
    """Segmentation and depth probes for teacher and student, when the run's shards carry masks and depth."""
    from raptor.data import Shards
    from raptor.eval.dense import dense_probes
    from raptor.service.stages.report import split_batches

    if not Shards.resolve(spec.data.train, split=spec.data.train_split).dense:
        raise UserError(f"{spec.data.train}: these shards carry no masks or depth maps (write them with dense=True)")
    log.info("dense probes on %d train / val images", samples)
    return dense_probes(teacher, student, split_batches(spec, "train", dense=True),
                        split_batches(spec, "val", dense=True), max_samples=samples, amp=amp)


def _study_configs(spec: JobSpec, steps: int | None) -> tuple[StageConfig, StageConfig]:
    """The run's own stage recipes (same budget as the run unless ``steps`` overrides both stages)."""
    from raptor.service.spec.translate import stage_config

    configs = []
    for name in ("stage1", "stage2"):
        cfg = stage_config(spec, name)
        if steps:
            cfg = dataclasses.replace(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, steps // 10))
        configs.append(cfg)
    return configs[0], configs[1]


def run_studies(
    spec: JobSpec, teacher: Teacher, student: Raptor | None, boundaries: list[int], opts: Studies, *, val_samples: int, amp: bool, seed: int
) -> dict[str, Any]:
    """The eval studies on the run's data: layer swap (val), partition and ablation (students distilled on train), dense probes."""
    from raptor.analysis.analyze import collect_trajectories
    from raptor.eval.structure import ablation_study, layer_swap_study, partition_study
    from raptor.service.stages.report import split_batches

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


def analyze(run_url: str, out_url: str | None = None, *, max_samples: int = 64, studies: Studies = Studies(),
            device: str | None = None, seed: int = 0) -> dict[str, str]:
    """``raptor analyze``: the report of the run at ``run_url`` (its spec and artifacts from ``run.json``),
    with ``studies``; by default into the run folder's copy of the report."""
    from raptor.service.engine.artifacts import RunFolder, corrupt_file
    from raptor.service.stages.report import PUBLISHED, analyze_run

    run_folder = RunFolder.from_index(run_url)
    for folder in run_folder.folders.values():  # never analyse a file that is not the one its stage wrote
        if (problem := corrupt_file(folder)) is not None:
            raise CorruptArtifact(f"{problem}; `raptor run` on the run's spec makes it again")
    spec = load_spec(run_folder.spec_file)

    def extra(teacher: Teacher, student: Raptor | None, boundaries: list[int], amp: bool) -> dict[str, Any]:
        return run_studies(spec, teacher, student, boundaries, studies, val_samples=max_samples, amp=amp, seed=seed)

    return analyze_run(spec, run_folder, out_url or run_folder.run(PUBLISHED), max_samples=max_samples, studies=extra,
                       device=device, seed=seed)


def cmd_analyze(args: argparse.Namespace) -> int:
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1 (got {args.samples})")
    if args.sweep:
        from raptor.service.sweep.depth_study import depth_study

        for kind, url in depth_study(args.run, args.out, samples=args.samples, seed=args.seed).items():
            print(f"{kind}: {url}")
        return 0
    studies = Studies(layer_swap=args.layer_swap, partition=args.partition, ablation=args.ablation, dense=args.dense,
                      samples=args.study_samples, steps=args.study_steps)
    written = analyze(args.run, args.out, max_samples=args.samples, studies=studies, device=args.device, seed=args.seed)
    for kind, url in written.items():
        print(f"{kind}: {url}")
    return 0


def export(source: str, to: str, formats: list[str] | None = None, resolution: int | None = None) -> dict[str, str]:
    """``raptor export``: a run's student (``source`` holds a run.json) or a student file/folder, written to ``to``."""
    from raptor import storage
    from raptor.export import DEFAULT_FORMATS
    from raptor.export.write import write_exports
    from raptor.models import RaptorViT, load_student, rebuild_student
    from raptor.service.engine.artifacts import INDEX_FILE, RunFolder, corrupt_file
    from raptor.service.stages.export import export_run

    if storage.exists(storage.join(source, INDEX_FILE)):
        run_folder = RunFolder.from_index(source)
        for folder in run_folder.folders.values():  # never export from a file that is not the one its stage wrote
            if (problem := corrupt_file(folder)) is not None:
                raise CorruptArtifact(f"{problem}; `raptor run` on the run's spec makes it again")
        return export_run(load_spec(run_folder.spec_file), run_folder, to, formats, resolution)
    model, manifest = load_student(source)
    if not isinstance(model, RaptorViT):  # block-only: the teacher named in its manifest gives the stem
        student, teacher, manifest = rebuild_student(source)
        model = RaptorViT.from_student(student, teacher)
    extra = {k: v for k, v in manifest.items() if k not in ("format", "version", "student")}
    return write_exports(model, to, formats or DEFAULT_FORMATS, extra=extra, resolution=resolution)


def cmd_export(args: argparse.Namespace) -> int:
    if args.resolution is not None and args.resolution < 1:
        raise UserError(f"--resolution must be positive (got {args.resolution})")
    for fmt, url in export(args.source, args.to, args.formats, args.resolution).items():
        print(f"{fmt}: {url}")
    return 0


def cmd_k8s_render(args: argparse.Namespace) -> int:
    from raptor.service.deploy.k8s import dump, render, write_tree

    objects = render(args.spec, args.overlay, args.overrides)
    if args.out is None:
        print(dump(objects), end="")
        return 0
    for path in write_tree(objects, args.out, args.overlay, args.spec):
        log.info("wrote %s", path)
    log.info("apply with: kubectl apply -k %s/overlays/%s", args.out, args.overlay)
    return 0
