"""``raptor plan SPEC``: per-GPU memory and expected throughput of a spec's training stages, before anything runs.

The spec is mapped onto :func:`raptor.perf.plan` (model shapes only: the teacher is built on the
meta device, so a ViT-g plan takes a second and no memory): per GPU, the frozen teacher's weights,
the student's parameters, gradients and optimizer states under the spec's ZeRO stage (and under
every other one, for comparison), the trajectory buffer, the activations with and without
activation checkpointing, and the samples/s the FLOP model expects at a stated utilisation of the
device's peak. Stage 1 is planned during the lambda anneal (teacher forcing and AR both run: its
peak), stage 2 for the rollout. When a stage does not fit, the switches that make every stage fit
are given as ``--set`` overrides, each checked by planning the changed spec again.

Boundaries come from ``discovery.boundaries``, or ``--boundaries`` (e.g. the discovered ones), or an
even split of the teacher's depth (the plan says which): they change stage 1's largest call and
which blocks selective checkpointing names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Sequence

import torch
import yaml

from raptor.perf import Plan, Setup, StudentShape, TeacherShape, activation_bytes, plan, stage_terms
from raptor.perf.devices import GIB, DeviceSpec, current_device, lookup
from raptor.perf.memory import UTILISATION
from raptor.service.spec import JobSpec, apply_overrides, parse_spec
from raptor.execution import DeepSpeedSettings, bucket_elems

STAGES = (1, 2)
_STATE_ROWS = ("student", "fp32 master", "AdamW", "ZeRO-3", "DeepSpeed reduce", "gradient all-reduce")


def even_boundaries(depth: int, k: int) -> list[int]:
    """k segments of the depth as equal as possible (the later ones longer by one)."""
    return [depth * j // k for j in range(1, k)]


@lru_cache(maxsize=16)
def _teacher_shape(name: str, img_size: int, model_kwargs: str) -> TeacherShape:
    """The teacher's shape (built on the meta device), once per model: the fixes re-plan the spec."""
    return TeacherShape.from_timm(name, img_size, **json.loads(model_kwargs))


def setup_of(spec: JobSpec, stage: int, student: StudentShape) -> Setup:
    """The per-GPU configuration the runner trains ``stage`` of ``spec`` with: its DeepSpeed settings
    as they are, with the buckets the runner sizes to the student and its micro-batch at its fewest workers
    (``scaling.num_workers``, or ``min_workers`` of an elastic range: the largest micro-batch and ZeRO shard)."""
    fewest = spec.scaling.world_sizes[0]
    return Setup(batch=spec.batching(fewest)[0], world_size=fewest, deepspeed=spec.deepspeed,
                 stage=stage, reduce_bucket_elems=bucket_elems(student.params()))


def _device(name: str | None) -> tuple[DeviceSpec, str]:
    if name:
        return lookup(name), ""
    if torch.cuda.is_available():
        return current_device(), " (this machine's GPU)"
    return lookup("H100"), " (the default; --device to plan for another)"


@dataclass
class Fix:
    """``--set`` overrides that make every stage fit, with the planned total and samples/s per stage."""

    overrides: list[str]
    total_gib: dict[int, float]
    samples_per_s: dict[int, float]


@dataclass
class SpecPlan:
    """Both training stages of one spec on one device: plans, comparisons and fixes."""

    spec: JobSpec
    device_note: str
    teacher: TeacherShape
    student: StudentShape
    boundaries_from: str
    stages: dict[int, Plan]
    state_by_zero: dict[int, int]  # student parameters + gradients + optimizer + buffers per GPU
    activations: dict[str, dict[int, int]]  # "no checkpointing" / "every block" / the spec's blocks -> stage -> peak
    fixes: list[Fix] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.stages.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.name, "boundaries": list(self.student.boundaries), "boundaries_from": self.boundaries_from,
            "fits": self.fits, "stages": {f"stage{s}": p.to_dict() for s, p in self.stages.items()},
            "student_state_gib_by_zero_stage": {z: round(b / GIB, 3) for z, b in self.state_by_zero.items()},
            "activations_gib": {k: {f"stage{s}": round(b / GIB, 3) for s, b in v.items()} for k, v in self.activations.items()},
            "fixes": [{"set": f.overrides, "total_gib": {f"stage{s}": round(g, 2) for s, g in f.total_gib.items()},
                       "samples_per_s": {f"stage{s}": round(r, 1) for s, r in f.samples_per_s.items()}} for f in self.fixes],
        }

    def table(self) -> str:
        p1, p2 = self.stages[1], self.stages[2]
        s, dev = p1.setup, p1.device
        gib = lambda b: f"{b / GIB:10.2f}"  # noqa: E731
        row = lambda name, a, b: f"{name:<44}{a:>10}{b:>10}"  # noqa: E731
        lines = [
            f"raptor plan: {self.spec.name} on {dev.name}{self.device_note}: {dev.memory_gib:.1f} GiB, "
            f"{p1.budget / GIB:.1f} usable per GPU; {s.world_size} GPU(s)"
            + (f" (elastic up to {self.spec.scaling.num_workers}: planned at its fewest, the most per GPU)"
               if self.spec.scaling.min_workers else ""),
            f"training: {self.spec.worker_layout()}",
            f"teacher {self.spec.teacher.name} at {self.spec.teacher.img_size} px: {p1.teacher_params / 1e6:,.1f}M "
            f"parameters, L = {self.teacher.depth}, N = {self.teacher.num_tokens} tokens",
            f"student k = {self.student.k} on boundaries {list(self.student.boundaries)} ({self.boundaries_from}): "
            f"{p1.student_params / 1e6:,.1f}M parameters",
            f"per GPU: batch {s.batch}, ZeRO-{s.zero_stage}, "
            f"{'bf16 autocast, fp32 weights' if s.precision == 'amp' else 'fp32'}, checkpointing {s.checkpointing_label}"
            + (", optimizer offload" if s.offload_optimizer else "") + (", parameter offload" if s.offload_params else ""),
            "",
            row("GiB per GPU", "stage 1", "stage 2"),
        ]
        for name in dict.fromkeys([*p1.memory, *p2.memory]):
            lines.append(row(name, gib(p1.memory.get(name, 0)), gib(p2.memory.get(name, 0))))
        lines += [row("total", gib(p1.total), gib(p2.total)), row("usable", gib(p1.budget), gib(p2.budget)),
                  row("fits", *("yes" if p.fits else "NO" for p in (p1, p2)))]
        if p1.cpu_memory or p2.cpu_memory:
            lines.append(row("host memory (offloaded)", gib(sum(p1.cpu_memory.values())), gib(sum(p2.cpu_memory.values()))))
        lines += ["", "student parameters + gradients + optimizer states + buffers, GiB per GPU: "
                  + ", ".join(f"ZeRO-{z} {b / GIB:.2f}" for z, b in self.state_by_zero.items())]
        lines += ["", row("activations, peak GiB per GPU", "stage 1", "stage 2")]
        lines += [row(f"  {name}", gib(v[1]), gib(v[2])) for name, v in self.activations.items()]
        lines += ["", f"throughput at {p1.utilisation:.0%} of {p1.peak_tflops:,.0f} TFLOP/s "
                  f"({'bf16' if s.precision == 'amp' else 'fp32'} dense peak; the stated utilisation, not a measurement)",
                  row("  model GFLOP per sample", *(f"{p.flops_per_sample / 1e9:,.1f}" for p in (p1, p2))),
                  row("  samples/s per GPU", *(f"{p.samples_per_s:,.0f}" for p in (p1, p2))),
                  row("  MFU (model FLOPs)", *(f"{p.mfu:.1%}" for p in (p1, p2))),
                  row(f"  samples/s, {s.world_size} GPU(s)", *(f"{p.samples_per_s * s.world_size:,.0f}" for p in (p1, p2)))]
        if self.fits:
            lines += ["", "fits: every stage within the usable memory"]
        else:
            short = ", ".join(f"stage {n} needs {p.total / GIB:.1f} GiB" for n, p in self.stages.items() if not p.fits)
            lines += ["", f"DOES NOT FIT: {short} of {p1.budget / GIB:.1f} usable"]
            if self.fixes:
                lines.append("it fits with (fastest first; GiB and samples/s per GPU, stage 1 / stage 2):")
                for f in self.fixes:
                    sets = " ".join(f"--set {o}" for o in f.overrides)
                    lines.append(f"  {sets}: {f.total_gib[1]:.1f} / {f.total_gib[2]:.1f} GiB, "
                                 f"{f.samples_per_s[1]:,.0f} / {f.samples_per_s[2]:,.0f} samples/s")
            else:
                lines.append("no single switch makes it fit: lower data.batch_size or use a larger device")
        return "\n".join(lines)


# the order the fixes name the engine's switches in; any other changed setting follows
_SWITCHES = ("zero_stage", "offload_optimizer", "activation_checkpointing")


def _yaml(value: Any) -> str:
    """A ``--set`` value: YAML booleans, lists without spaces."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value).replace(" ", "")


def _overrides(spec: JobSpec, old: Setup, new: Setup) -> list[str]:
    """The spec fields that turn ``old`` into ``new``."""
    out = [f"deepspeed.{name}={_yaml(getattr(new.deepspeed, name))}"
           for name in dict.fromkeys([*_SWITCHES, *DeepSpeedSettings.model_fields])
           if getattr(new.deepspeed, name) != getattr(old.deepspeed, name)]
    if new.batch != old.batch and spec.data.global_batch_size is not None:
        out.append(f"data.batch_size={new.batch}")  # the accumulation follows from the global batch
    elif new.batch != old.batch:
        accum = spec.deepspeed.gradient_accumulation_steps * old.batch // new.batch
        out += [f"data.batch_size={new.batch}", f"deepspeed.gradient_accumulation_steps={accum}"]
    return out


def plan_spec(
    spec: JobSpec,
    *,
    device: str | None = None,
    memory_gib: float | None = None,
    peak_tflops: float | None = None,
    utilisation: float = UTILISATION,
    boundaries: Sequence[int] | None = None,
    fixes: bool = True,
) -> SpecPlan:
    """Plan both training stages of ``spec`` per GPU on ``device`` (a table name; default: this
    machine's GPU, else an H100). ``peak_tflops`` defaults to ``logging.peak_tflops``."""
    dev, note = _device(device)
    t = spec.teacher
    teacher = _teacher_shape(t.name, t.img_size, json.dumps(t.model_kwargs, sort_keys=True))
    if boundaries is not None:
        bounds, source = list(boundaries), "given"
    elif spec.discovery.boundaries is not None:
        bounds, source = list(spec.discovery.boundaries), "discovery.boundaries"
    else:
        bounds, source = even_boundaries(teacher.depth, spec.discovery.k), \
            "an even split: discovery finds the real ones; --boundaries to plan those"
    student = StudentShape.from_teacher(teacher, bounds, mlp=spec.student.mlp, depth_scaling=spec.student.depth_scaling)
    peak = peak_tflops if peak_tflops is not None else spec.logging.peak_tflops
    kw = dict(device=dev, memory_gib=memory_gib, peak_tflops=peak, utilisation=utilisation)
    stages = {n: plan(teacher, student, **kw, **vars(setup_of(spec, n, student))) for n in STAGES}
    base = stages[2].setup
    state = {}
    for z in range(4):
        # the engine at ZeRO-z without offload (compile does not change the plan; auto is valid at every stage)
        bare = base.with_deepspeed(zero_stage=z, offload_optimizer="none", offload_param="none", compile="auto")
        p = plan(teacher, student, **kw, suggest=False, **vars(bare))
        state[z] = sum(b for name, b in p.memory.items() if name.startswith(_STATE_ROWS))
    acts: dict[str, dict[int, int]] = {}
    variants = [("no checkpointing", False), ("every block checkpointed", True)]
    if not isinstance(base.checkpointing, bool) and base.checkpointing:
        variants.append((f"blocks {list(base.checkpointing)} checkpointed (the spec)", base.checkpointing))
    for name, ck in variants:
        acts[name] = {}
        for n in STAGES:
            tf, ar = stage_terms(n, stages[n].setup.lam)
            acts[name][n] = activation_bytes(student, base.batch, stage=n, precision=base.precision,
                                             checkpointing=ck, tf=tf, ar=ar).peak
    result = SpecPlan(spec, note, teacher, student, source, stages, state, acts)
    if fixes and not result.fits:
        result.fixes = _fixes(spec, result, dict(device=device, memory_gib=memory_gib, peak_tflops=peak_tflops,
                                                 utilisation=utilisation, boundaries=bounds))
    return result


def _fixes(spec: JobSpec, result: SpecPlan, kw: dict[str, Any]) -> list[Fix]:
    """The library's advice for each stage that does not fit, as spec overrides that make EVERY stage fit."""
    raw = yaml.safe_load(spec.to_yaml())
    seen: set[tuple[str, ...]] = set()
    found = []
    for p in result.stages.values():
        for sug in p.suggestions:
            sets = _overrides(spec, p.setup, replace(sug.setup, stage=p.setup.stage, lam=p.setup.lam))
            if not sets or tuple(sets) in seen:
                continue
            seen.add(tuple(sets))
            changed = plan_spec(parse_spec(apply_overrides(yaml.safe_load(yaml.safe_dump(raw)), sets)), fixes=False, **kw)
            if changed.fits:
                found.append(Fix(sets, {n: q.total / GIB for n, q in changed.stages.items()},
                                 {n: q.samples_per_s for n, q in changed.stages.items()}))
    # equal samples per stage: the time per sample of both stages together decides
    return sorted(found, key=lambda f: sum(1 / r for r in f.samples_per_s.values()))
