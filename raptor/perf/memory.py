"""Per-GPU memory and throughput plan of a distillation stage, from model shapes alone.

:func:`plan` adds up, per GPU: the frozen teacher's weights; the student's parameters, gradients,
AdamW states and DeepSpeed's buffers per ZeRO stage; the teacher's trajectory buffer
``[B, L+1, N, D]``; and the student's activations at the batch, with or without activation
checkpointing. It says whether that fits the device and, when not, which switch makes it fit
(ZeRO stage, optimizer offload, activation checkpointing, a smaller batch), with the expected
samples/s of each from the FLOP model (:mod:`raptor.perf.flops`) at a stated utilisation.

The activation model counts the tensors autograd saves in one block application (checked exactly
against ``torch.autograd.graph.saved_tensors_hooks`` on CPU) plus the transients around the loss
and one application's backward (checked against a live-tensor count of a real step on CPU). It
is eager PyTorch's; under ``torch.compile`` inductor recomputes cheap elementwise results in
backward instead of saving them, so compiled steps use less: the plan is their upper bound.

The training configuration is the runner's own: :class:`Setup` holds a
:class:`~raptor.execution.DeepSpeedSettings` (the job spec's ``deepspeed`` section) and derives what
the model reads from it, so the engine's settings and their rules are declared once. Precisions
modelled:
  ``fp32``  everything fp32 (``deepspeed.precision`` fp32).
  ``amp``   the training policy, which keeps fp32 fidelity (``deepspeed.precision`` bf16, or auto: the
            plan is for GPUs): fp32 parameters (the master weights), residual stream, norms, gains and
            loss; matmul and attention operands in bf16 under ``torch.autocast`` (their saved inputs
            are bf16, plus one bf16 copy of each linear weight cached for the step).
  ``bf16``  DeepSpeed's bf16 mode (``Setup.deepspeed_bf16``; the runner never uses it): bf16
            parameters, gradients and residual stream, fp32 master weights and AdamW states in the
            optimizer (loses fidelity; kept for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from itertools import combinations
from typing import Any, Sequence

from pydantic import ValidationError

from raptor.errors import UserError
from raptor.execution import DEEPSPEED_BUCKET, DeepSpeedSettings
from raptor.perf.devices import GIB, DeviceSpec, lookup
from raptor.perf.flops import StudentShape, TeacherShape, stage_terms

PRECISIONS = ("fp32", "amp", "bf16")
_BYTES = {"fp32": 4, "bf16": 2}
# transients around one loss term, in units of its fp32 error tensor (measured on CPU, see tests):
_FWD_LOSS_TRANSIENT = 2  # the stacked predictions and the squared error
_BWD_LOSS_TRANSIENT = 4  # the predictions' gradient and the squared error's backward temporaries


class PlanError(UserError):
    """An impossible plan input (batch, ZeRO stage, precision, ...)."""


@dataclass(frozen=True)
class Setup:
    """The per-GPU training configuration a plan is made for: the DeepSpeed engine's settings as the
    runner takes them (``deepspeed``) and the modelling inputs that are not engine settings.

    ``deepspeed`` is validated by :class:`~raptor.execution.DeepSpeedSettings` (offload rules
    included); the properties below are what the model reads, derived from it."""

    batch: int  # per-GPU micro-batch
    world_size: int = 1  # data-parallel GPUs
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    # model DeepSpeed's own bf16 mode (bf16 parameters, gradients and residual stream) instead of
    # bf16 autocast in the fp32 engine: the runner never uses it; the plan keeps it for comparison
    deepspeed_bf16: bool = False
    stage: int = 2  # distillation stage
    lam: float = 0.5  # stage 1: TF weight; 0 < lam < 1 (the anneal) runs both TF and AR: the peak
    teacher_dtype: str = "fp32"  # storage of the frozen teacher's weights
    target_dtype: str = "fp32"  # storage of the trajectory buffer (the student's targets)
    online_teacher: bool = True  # the teacher runs in the step (False: precomputed trajectories)
    reduce_bucket_elems: int = DEEPSPEED_BUCKET  # DeepSpeed reduce_bucket_size: ZeRO >= 1 allocates a bucket this big

    def __post_init__(self) -> None:
        if self.batch < 1 or self.world_size < 1:
            raise PlanError(f"batch and world_size must be >= 1, got {self.batch}, {self.world_size}")
        if not isinstance(self.deepspeed, DeepSpeedSettings):
            raise PlanError(f"deepspeed must be a DeepSpeedSettings, got {type(self.deepspeed).__name__}")
        if self.deepspeed_bf16 and self.deepspeed.precision == "fp32":
            raise PlanError("deepspeed_bf16 (DeepSpeed's bf16 mode) contradicts deepspeed.precision fp32")
        for name in ("teacher_dtype", "target_dtype"):
            if getattr(self, name) not in _BYTES:
                raise PlanError(f"{name} must be fp32 or bf16, got {getattr(self, name)!r}")
        if self.stage not in (1, 2):
            raise PlanError(f"stage must be 1 or 2, got {self.stage}")

    @property
    def zero_stage(self) -> int:
        return self.deepspeed.zero_stage

    @property
    def precision(self) -> str:
        """The modelled precision (:data:`PRECISIONS`): ``bf16`` is DeepSpeed's bf16 mode, ``amp``
        bf16 autocast in the fp32 engine (``deepspeed.precision`` bf16, or auto on a GPU)."""
        if self.deepspeed_bf16:
            return "bf16"
        return "fp32" if self.deepspeed.precision == "fp32" else "amp"

    @property
    def checkpointing(self) -> bool | tuple[int, ...]:
        """Recompute in backward: every block (True), none (False), or these blocks (sorted)."""
        ck = self.deepspeed.activation_checkpointing
        return ck if isinstance(ck, bool) else tuple(sorted(ck))

    @property
    def offload_optimizer(self) -> bool:
        """AdamW states (and the fp32 master partition) in host memory."""
        return self.deepspeed.offload_optimizer != "none"

    @property
    def offload_params(self) -> bool:
        """Parameters in host memory (ZeRO-3)."""
        return self.deepspeed.offload_param != "none"

    @property
    def checkpointing_label(self) -> str:
        if isinstance(self.checkpointing, bool):
            return "on" if self.checkpointing else "off"
        return f"blocks {list(self.checkpointing)}" if self.checkpointing else "off"

    def with_deepspeed(self, **changes: Any) -> Setup:
        """This setup with these DeepSpeed settings changed, validated as a spec's would be (a
        combination :class:`~raptor.execution.DeepSpeedSettings` rejects raises ``ValidationError``)."""
        return replace(self, deepspeed=self.deepspeed.updated(**changes))

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (``deepspeed`` as the spec section's dict)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["deepspeed"] = self.deepspeed.model_dump(mode="json")
        return out


def checkpointed_blocks(checkpointing: bool | Sequence[int], k: int) -> tuple[int, ...]:
    """The block indices ``checkpointing`` recomputes (``True``: all k, ``False``: none)."""
    if isinstance(checkpointing, bool):
        return tuple(range(k)) if checkpointing else ()
    blocks = tuple(sorted({int(b) for b in checkpointing}))
    if blocks and (blocks[0] < 0 or blocks[-1] >= k):
        raise PlanError(f"checkpointing blocks {list(blocks)} out of range for k = {k}")
    return blocks


@dataclass(frozen=True)
class Activations:
    """Activation memory of one step (bytes, per GPU): what autograd keeps after the forward
    (``saved``) and the highest point of the forward and backward (``peak``, includes ``saved``)."""

    saved: int
    peak: int


def _linear_weights(student: StudentShape) -> int:
    b, D, h = student.block, student.block.width, student.depth_hidden
    return 4 * D * D + D * b.fc1_out + b.mlp_hidden * D + h + 3 * D * h


def activation_bytes(
    student: StudentShape,
    batch: int,
    *,
    stage: int = 2,
    precision: str = "amp",
    checkpointing: bool | Sequence[int] = False,
    tf: bool = False,
    ar: bool = True,
    horizon: int | None = None,
    blocks: tuple[int, ...] | None = None,
) -> Activations:
    """Activations of one step of ``raptor.distill.distill_loss`` (see the module docstring).

    Per block application and token, autograd saves 5 residual-stream tensors of width D (the
    input, the attention and MLP branches after LayerScale, the two sums: fp32 unless ``bf16``),
    8 D of matmul operands (the two normed inputs, q/k/v, attention output, the two projections'
    outputs: the compute dtype), the MLP's hidden (GELU: fc1 output and activation; SwiGLU: fc1
    output, silu and product), LayerNorm statistics and attention's log-sum-exp; per layer number,
    the gains and the depth MLP's hidden; per loss term, the fp32 error of every predicted state.
    ``checkpointing`` (every block, or a list of block indices, as ``Raptor.set_checkpointing``):
    the applications of those blocks keep only their input, and backward recomputes one
    application at a time. The peak adds the largest loss term's transients (stage 1's terms run
    one after another) or, with checkpointing, one recomputed application.
    """
    if precision not in PRECISIONS:
        raise PlanError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    D, blk, h = student.block.width, student.block, student.depth_hidden
    N = student.num_tokens
    r = 2 if precision == "bf16" else 4  # residual stream
    c = 4 if precision == "fp32" else 2  # matmul operands
    mlp = 2 * blk.mlp_hidden if blk.mlp == "gelu" else 4 * blk.mlp_hidden
    per_token = 5 * D * r + c * (8 * D + mlp) + 16 + 4 * blk.num_heads
    per_row = 3 * D * r + 2 * h * c + 4 if h else 0  # gains, depth-MLP hidden, layer number
    state = N * D * r  # one application's input, per sample
    chosen = checkpointed_blocks(checkpointing, student.k)
    saved = error_max = call_max = 0
    plain_blocks: set[int] = set()  # blocks with applications that keep their activations
    used: set[int] = set()
    groups = student.call_groups(stage, tf=tf, ar=ar, horizon=horizon, blocks=blocks)
    for g in groups:
        ck = student.checkpointed_applications(g, chosen)
        plain = g.applications - ck
        group_blocks = set(range(student.k)) if g.block < 0 else {g.block}
        used |= group_blocks
        if plain:
            plain_blocks |= group_blocks - set(chosen)
        view = batch * state if g.first_input_view else 0
        saved += batch * ck * state + batch * plain * N * per_token - view
        saved += (g.calls * plain // g.applications) * (1 if g.shared_t else batch * g.rows_per_call) * per_row
        error = batch * g.applications * N * D * 4  # the fp32 error of every predicted state
        saved += error
        error_max = max(error_max, error)
        if ck:
            call_max = max(call_max, batch * g.rows_per_call * N * per_token)
    # autocast's bf16 copy of each linear weight, cached for the forward: kept for backward by the
    # blocks that save their activations; the checkpointed ones recast it when they recompute
    cast = 2 * _linear_weights(student) if precision == "amp" else 0
    saved += cast * len(plain_blocks)
    forward = saved + cast * len(used - plain_blocks) + _FWD_LOSS_TRANSIENT * error_max
    backward = saved + _BWD_LOSS_TRANSIENT * error_max
    if chosen:  # backward recomputes one application (and recasts its block's weights)
        backward = saved + max(_BWD_LOSS_TRANSIENT * error_max, error_max + call_max + cast)
    return Activations(saved=int(saved), peak=int(max(forward, backward)))


def teacher_working_bytes(teacher: TeacherShape, batch: int, precision: str = "amp") -> int:
    """The teacher forward's transient working set beyond its trajectory buffer (no grad: one
    block's intermediates at a time): per token 3 fp32 states of width D and the MLP's hidden."""
    blk = teacher.block
    c = 4 if precision == "fp32" else 2
    mlp = 2 * blk.mlp_hidden if blk.mlp == "gelu" else 4 * blk.mlp_hidden
    return batch * teacher.num_tokens * (12 * blk.width + c * mlp)


@dataclass(frozen=True)
class Suggestion:
    """A change of the setup that fits, with its predicted memory and throughput."""

    change: str
    setup: Setup
    total_gib: float
    samples_per_s: float


@dataclass
class Plan:
    """Per-GPU memory (bytes by component) and throughput of one setup on one device."""

    setup: Setup
    device: DeviceSpec
    memory: dict[str, int]  # per GPU, by component; ``total`` is their sum
    cpu_memory: dict[str, int]  # offloaded state, per GPU's share of host memory
    activations: Activations
    budget: int  # usable device bytes (see :func:`plan`)
    flops_per_sample: float  # model FLOPs (teacher forward + student forward and backward)
    hardware_flops_per_sample: float  # + the recomputed forward under activation checkpointing
    peak_tflops: float
    utilisation: float
    max_batch: int  # the largest per-GPU batch that fits with these switches (0: none)
    suggestions: list[Suggestion] = field(default_factory=list)
    teacher_params: int = 0
    student_params: int = 0

    @property
    def total(self) -> int:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def samples_per_s(self) -> float:
        """Per GPU, at ``utilisation`` of the peak (hardware FLOPs, so checkpointing costs)."""
        return self.utilisation * self.peak_tflops * 1e12 / self.hardware_flops_per_sample

    @property
    def mfu(self) -> float:
        """Model FLOP utilisation at :attr:`samples_per_s` (below ``utilisation`` when recomputing)."""
        return self.samples_per_s * self.flops_per_sample / (self.peak_tflops * 1e12)

    def to_dict(self) -> dict[str, Any]:
        return {
            "setup": self.setup.to_dict(),
            "device": {"name": self.device.name, "memory_gib": self.device.memory_gib},
            "memory_gib": {k: round(v / GIB, 3) for k, v in self.memory.items()},
            "cpu_memory_gib": {k: round(v / GIB, 3) for k, v in self.cpu_memory.items()},
            "total_gib": round(self.total / GIB, 3),
            "budget_gib": round(self.budget / GIB, 3),
            "fits": self.fits,
            "max_batch": self.max_batch,
            "teacher_params": self.teacher_params,
            "student_params": self.student_params,
            "gflops_per_sample": round(self.flops_per_sample / 1e9, 3),
            "peak_tflops": self.peak_tflops,
            "utilisation": self.utilisation,
            "samples_per_s": round(self.samples_per_s, 1),
            "mfu": round(self.mfu, 4),
            "suggestions": [
                {"change": s.change, "total_gib": round(s.total_gib, 2), "samples_per_s": round(s.samples_per_s, 1)}
                for s in self.suggestions
            ],
        }

    def table(self) -> str:
        """A readable per-GPU table: components, total against the budget, throughput, advice."""
        s, gib = self.setup, lambda b: f"{b / GIB:8.2f}"
        head = (
            f"teacher {self.teacher_params / 1e6:,.1f}M params -> student {self.student_params / 1e6:,.1f}M params, "
            f"stage {s.stage}, {s.precision}, batch {s.batch}/GPU x {s.world_size} GPU(s), ZeRO-{s.zero_stage}, "
            f"checkpointing {s.checkpointing_label}"
            + (", optimizer offload" if s.offload_optimizer else "")
            + (", parameter offload" if s.offload_params else "")
        )
        lines = [head, f"device {self.device.name}: {self.device.memory_gib:.1f} GiB, "
                       f"usable {self.budget / GIB:.1f} GiB", f"{'per GPU':<40}{'GiB':>8}"]
        lines += [f"{name:<40}{gib(v)}" for name, v in self.memory.items()]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"{'total':<40}{gib(self.total)}  {verdict} "
                     f"(max batch {self.max_batch}/GPU with these switches)")
        if self.cpu_memory:
            host = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in self.cpu_memory.items())
            lines.append(f"host memory per GPU: {host}")
        lines.append(
            f"{self.flops_per_sample / 1e9:,.1f} GFLOP/sample (model); at {self.utilisation:.0%} of "
            f"{self.peak_tflops:,.0f} TFLOP/s: {self.samples_per_s:,.0f} samples/s/GPU, MFU {self.mfu:.1%}"
        )
        for sug in self.suggestions:
            lines.append(f"  fits with {sug.change}: {sug.total_gib:.2f} GiB, {sug.samples_per_s:,.0f} samples/s/GPU")
        return "\n".join(lines)


# the fraction of the dense peak a step is assumed to sustain when none is given: about what the compiled
# ViT-B step sustains on an H100 (docs/performance.md); a stated assumption, not a measurement of this device
UTILISATION = 0.35

# usable device memory: minus the CUDA context and library workspaces, minus allocator fragmentation
CONTEXT_GIB = 1.0
FRAGMENTATION = 0.08


def plan(
    teacher: TeacherShape,
    student: StudentShape,
    *,
    batch: int,
    device: str | DeviceSpec = "H100",
    memory_gib: float | None = None,
    peak_tflops: float | None = None,
    utilisation: float = UTILISATION,
    suggest: bool = True,
    **setup: Any,
) -> Plan:
    """Memory and throughput per GPU of a distillation stage; advice when it does not fit.

    ``setup`` takes the :class:`Setup` fields (``world_size``, ``deepspeed`` (the engine:
    ``DeepSpeedSettings(zero_stage=3, offload_param="cpu")``), ``deepspeed_bf16``, ``stage``,
    ``lam``, ``teacher_dtype``, ``target_dtype``, ``online_teacher``, ``reduce_bucket_elems``).
    ``device``: a table name (``"H100"``, ``"H200"``, ``"A100"``, ...) or a
    :class:`~raptor.perf.devices.DeviceSpec`; ``memory_gib`` / ``peak_tflops`` override it.
    ``utilisation``: the fraction of the peak the step sustains (hardware FLOPs), a stated
    assumption: the default is about what the compiled ViT-B step sustains on an H100 (see
    docs/performance.md). The usable memory is the device's minus ``CONTEXT_GIB`` for the CUDA
    context and workspaces, times ``1 - FRAGMENTATION``.
    """
    cfg = Setup(batch=batch, **setup)
    spec = device if isinstance(device, DeviceSpec) else lookup(device)
    if memory_gib is not None:
        spec = replace(spec, memory_gib=float(memory_gib))
    peak = float(peak_tflops) if peak_tflops is not None else spec.peak(cfg.precision)
    if not 0 < utilisation <= 1:
        raise PlanError(f"utilisation must be in (0, 1], got {utilisation}")
    budget = int((spec.memory_gib - CONTEXT_GIB) * (1 - FRAGMENTATION) * GIB)
    p = _plan(teacher, student, cfg, spec, peak, utilisation, budget)
    p.max_batch = _max_batch(teacher, student, cfg, spec, peak, utilisation, budget)
    if suggest and not p.fits:
        p.suggestions = _suggestions(teacher, student, cfg, spec, peak, utilisation, budget)
    return p


def _plan(teacher: TeacherShape, student: StudentShape, cfg: Setup, spec: DeviceSpec, peak: float,
          utilisation: float, budget: int) -> Plan:
    P, W, z = student.params(), cfg.world_size, cfg.zero_stage
    low = cfg.precision == "bf16"  # DeepSpeed bf16: bf16 params and grads, fp32 master in the optimizer
    wbytes = 2 if low else 4
    mem: dict[str, int] = {}
    cpu: dict[str, int] = {}
    if cfg.online_teacher:
        mem[f"teacher weights ({cfg.teacher_dtype})"] = teacher.params() * _BYTES[cfg.teacher_dtype]
    params = wbytes * P // (W if z == 3 else 1)
    if cfg.offload_params:
        cpu["student parameters"] = params
        params = 0
    mem[f"student parameters ({'bf16' if low else 'fp32'})"] = params
    if z == 3:  # the recurrent student uses every block all step: the other shards stay gathered
        mem["ZeRO-3 gathered parameters"] = wbytes * P if cfg.offload_params else wbytes * P * (W - 1) // W
    mem[f"student gradients ({'bf16' if low else 'fp32'})"] = wbytes * P // (W if z >= 2 else 1)
    # DeepSpeed keeps an fp32 partition copy at ZeRO >= 1; its bf16 mode partitions the fp32
    # master weights and AdamW states even at stage 0 (BF16_Optimizer)
    master = 4 * P // W if (z >= 1 or low) else 0
    adam = 8 * P // (W if (z >= 1 or low) else 1)
    if cfg.offload_optimizer:
        cpu["fp32 master partition + AdamW states"] = master + adam
        master = adam = 0
    mem["fp32 master partition"] = master
    mem["AdamW states (fp32)"] = adam
    if z >= 1:
        mem["DeepSpeed reduce bucket"] = cfg.reduce_bucket_elems * wbytes
    else:
        mem["gradient all-reduce bucket"] = min(P, cfg.reduce_bucket_elems) * wbytes
    traj = cfg.batch * (teacher.depth + 1) * teacher.num_tokens * teacher.block.width
    mem[f"trajectory [B, L+1, N, D] ({cfg.target_dtype})"] = traj * _BYTES[cfg.target_dtype]
    tf, ar = stage_terms(cfg.stage, cfg.lam)
    act = activation_bytes(student, cfg.batch, stage=cfg.stage, precision=cfg.precision,
                           checkpointing=cfg.checkpointing, tf=tf, ar=ar)
    working = teacher_working_bytes(teacher, cfg.batch, cfg.precision) if cfg.online_teacher else 0
    chosen = checkpointed_blocks(cfg.checkpointing, student.k)
    label = ("checkpointed" if len(chosen) == student.k else f"blocks {list(chosen)} checkpointed") if chosen \
        else "no checkpointing"
    mem[f"activations, peak ({label})"] = max(act.peak, working)
    model = student.step_flops(cfg.stage, cfg.batch, tf=tf, ar=ar)
    if cfg.online_teacher:
        model += teacher.forward_flops(cfg.batch)
    hardware = model + student.recompute_flops(cfg.stage, cfg.batch, chosen, tf=tf, ar=ar)
    return Plan(
        setup=cfg, device=spec, memory=mem, cpu_memory=cpu, activations=act, budget=budget,
        flops_per_sample=model / cfg.batch, hardware_flops_per_sample=hardware / cfg.batch,
        peak_tflops=peak, utilisation=utilisation, max_batch=0,
        teacher_params=teacher.params(), student_params=P,
    )


def _max_batch(teacher: TeacherShape, student: StudentShape, cfg: Setup, spec: DeviceSpec, peak: float,
               utilisation: float, budget: int) -> int:
    """Largest batch whose plan fits (memory grows monotonically with the batch)."""
    def fits(b: int) -> bool:
        return _plan(teacher, student, replace(cfg, batch=b), spec, peak, utilisation, budget).fits

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _suggestions(teacher: TeacherShape, student: StudentShape, cfg: Setup, spec: DeviceSpec, peak: float,
                 utilisation: float, budget: int) -> list[Suggestion]:
    """Single switches that make ``cfg`` fit (checkpointing combined with another switch only when
    checkpointing alone does not), selective checkpointing (the fastest subset of blocks that
    fits: it recomputes fewer applications than checkpointing all), and the batch split into
    gradient-accumulation steps that fits at the same effective batch; fastest first."""
    def fitting(name: str, c: Setup | None) -> Suggestion | None:
        if c is None:  # a combination DeepSpeedSettings rejects (e.g. ZeRO-3 with a compiled hot path)
            return None
        p = _plan(teacher, student, c, spec, peak, utilisation, budget)
        return Suggestion(name, c, p.total / GIB, p.samples_per_s) if p.fits else None

    def engine(c: Setup, **changes: Any) -> Setup | None:
        try:
            return c.with_deepspeed(**changes)
        except ValidationError:
            return None

    others: list[tuple[str, dict[str, Any]]] = [(f"ZeRO stage {z}", {"zero_stage": z})
                                                for z in range(cfg.zero_stage + 1, 4)]
    if not cfg.offload_optimizer:
        others.append(("optimizer offload (CPU AdamW: slower steps)",
                       {"offload_optimizer": "cpu", "zero_stage": max(cfg.zero_stage, 1)}))
    found = [fitting(name, engine(cfg, **kw)) for name, kw in others]
    current = checkpointed_blocks(cfg.checkpointing, student.k)
    if len(current) < student.k:
        alone = fitting("activation checkpointing", engine(cfg, activation_checkpointing=True))
        found.append(alone)
        subsets = [c for n in range(1, student.k) for c in combinations(range(student.k), n) if set(current) < set(c)]
        selective = [fitting(f"activation checkpointing of blocks {list(c)}",
                             engine(cfg, activation_checkpointing=list(c))) for c in subsets]
        found.append(max((x for x in selective if x is not None), key=lambda x: x.samples_per_s, default=None))
        if alone is None:
            found += [fitting(f"activation checkpointing + {name}", engine(cfg, activation_checkpointing=True, **kw))
                      for name, kw in others]
    for ckpt in dict.fromkeys([cfg.checkpointing, True]):
        c = cfg if ckpt == cfg.checkpointing else engine(cfg, activation_checkpointing=True)
        if c is None:
            continue
        most = _max_batch(teacher, student, c, spec, peak, utilisation, budget)
        if 0 < most < cfg.batch:  # the largest divisor of the batch: the same effective batch
            b = max(d for d in range(1, most + 1) if cfg.batch % d == 0)
            name = f"batch {b}/GPU x {cfg.batch // b} accumulation steps" + (
                " + activation checkpointing" if ckpt is True and len(current) < student.k else "")
            found.append(fitting(name, replace(c, batch=b)))
    return sorted((s for s in found if s is not None), key=lambda s: -s.samples_per_s)
