"""The job spec: one pydantic model shared by the CLI, Ray jobs, sweeps and the Kubernetes renderer.

A spec is a YAML file (``jobs/*.yaml``), overridable from the command line with
``--set section.field=value`` (the value is parsed as YAML, so ``--set stage2.steps=2000`` is an
int), and saved beside every run's artifacts as ``spec.yaml``. Every error names the field and the
bad value in one line: ``jobs/x.yaml: stage2.steps: must be > 0 (got -5)``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from raptor import storage
from raptor.recipe import (
    PAPER_LAST_BLOCK_TOKEN_WEIGHTS,
    PAPER_LR,
    PAPER_MIN_LR,
    PAPER_STAGE2_TOKEN_WEIGHTS,
    PAPER_WEIGHT_DECAY,
    paper_warmup,
)
from raptor.data.settings import LoaderSettings
from raptor.errors import UserError
from raptor.export.formats import DEFAULT_FORMATS, FORMATS
from raptor.execution import DeepSpeedSettings
from raptor.settings import Settings
from raptor.train import settings as runner

# Schemes fsspec reaches without extra code here; others need their fsspec plugin installed.
READ_SCHEMES = {"file", "s3", "gs", "gcs", "az", "abfs", "memory", "http", "https", "hf"}
WRITE_SCHEMES = {"file", "s3", "gs", "gcs", "az", "abfs", "memory"}

# Environment variables whose values are credentials: never written into a saved spec, run.json or a manifest.
SECRET_NAME = re.compile(r"secret|token|passw|api[_-]?key|access[_-]?key|credential|private[_-]?key|auth", re.IGNORECASE)
REDACTED = "<redacted>"
# user:password@ after the scheme; the password may hold "/" (AWS secret keys do), a port ("host:8080/") is no password
_URL_PASSWORD = re.compile(r"(?P<scheme>[\w+.-]+://)[^/@:]*:(?!\d+/)[^@]*@")

# Depths of the DINOv2 family, so ``k > L`` fails when the spec is loaded, before any model is built.
_DINOV2_DEPTHS = {"small": 12, "base": 12, "large": 24, "giant": 40}


class SpecError(UserError):
    """A job spec that does not validate; the message is one line naming the field."""


def _check_url(url: str, allowed: set[str], field: str) -> str:
    scheme = storage.scheme(url)
    if scheme not in allowed:
        raise ValueError(f"unsupported URL scheme {scheme!r} for {field} (use one of {', '.join(sorted(allowed))})")
    if _URL_PASSWORD.match(url):  # it would be saved with the run, keyed, logged and sent to wandb
        raise ValueError(f"{field} holds a password; give credentials through the environment (AWS_ACCESS_KEY_ID, ...)")
    return url


def redact(value: Any) -> Any:
    """``value`` with every mapping entry whose key names a credential (``SECRET_NAME``) replaced by ``<redacted>``."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and SECRET_NAME.search(k) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def hide_passwords(text: str) -> str:
    """``text`` with the credentials of every URL in it (``s3://KEY:SECRET@bucket``) replaced by ``<redacted>``."""
    return _URL_PASSWORD.sub(rf"\g<scheme>{REDACTED}@", text)


def secrets_in(value: Any, prefix: str) -> list[str]:
    """Dotted names of the entries :func:`redact` would hide."""
    if isinstance(value, dict):
        return [name for k, v in value.items()
                for name in ([f"{prefix}.{k}"] if isinstance(k, str) and SECRET_NAME.search(k) else secrets_in(v, f"{prefix}.{k}"))]
    if isinstance(value, list):
        return [name for i, v in enumerate(value) for name in secrets_in(v, f"{prefix}.{i}")]
    return []


class TeacherTrainSpec(Settings):
    """Supervised training of the teacher on the shards (``raptor teacher train``); used when no checkpoint is given."""

    epochs: int = Field(10, gt=0, description="passes over the training shards")
    batch_size: int = Field(64, gt=0, description="images per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps before the cosine decay")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="cross-entropy label smoothing")
    num_workers: int = Field(1, ge=0, description="loader workers")
    seed: int | None = Field(
        None, description="seed of the teacher's initialisation, drop-path masks and data order; null = data.seed "
        "(sweep it for replicate teachers)")


class TeacherSpec(runner.TeacherSettings):
    """The frozen teacher: a timm ViT, loaded from a checkpoint or trained first."""

    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="stochastic depth when training the teacher")
    train: TeacherTrainSpec | None = None

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_scheme(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v, READ_SCHEMES, "teacher.checkpoint")

    @field_validator("model_kwargs")
    @classmethod
    def _depth(cls, v: dict[str, Any]) -> dict[str, Any]:
        depth = v.get("depth", 1)
        if not isinstance(depth, int) or isinstance(depth, bool) or not 0 < depth <= 1000:
            raise ValueError(f"depth must be a whole number of layers in 1..1000 (got {depth!r})")
        return v

    @model_validator(mode="after")
    def _source(self) -> "TeacherSpec":
        if self.checkpoint is None and self.train is None:
            raise ValueError("teacher needs a checkpoint URL or a train section")
        return self

    def depth(self) -> int | None:
        """The teacher's depth L when the spec states it (model_kwargs.depth or a DINOv2 name)."""
        if "depth" in self.model_kwargs:
            return int(self.model_kwargs["depth"])
        m = re.match(r"vit_(small|base|large|giant)_patch14(_reg4)?_dinov2", self.name)
        return _DINOV2_DEPTHS[m.group(1)] if m else None


class GenerateSpec(Settings):
    """Procedurally generated labelled shards (the embedded default); written when missing."""

    train_samples: int = Field(4000, gt=0, description="labelled images written to the training shards")
    val_samples: int = Field(500, gt=0, description="labelled images written to the validation shard")
    num_classes: int = Field(10, gt=1, description="classes of the generated images")
    image_size: int = Field(112, gt=0, description="side of the generated images in pixels")
    seed: int = Field(0, description="seed of the generator")


class DataSpec(LoaderSettings):
    """The shards of each split and how the stages read them (the loader's settings, extended)."""

    train: str = Field(..., description="shard URL with brace expansion, e.g. s3://bucket/imagenet/train-{000000..001023}.tar")
    val: str | None = Field(None, description="validation shard URL (probe, fidelity checks); null = none")
    train_split: str | None = Field(
        None, description="split of a timm WebDataset (_info.json with splits) or tar set in a folder for data.train; null = the only one")
    val_split: str | None = Field(None, description="the same for data.val, e.g. validation")
    train_samples: int | None = Field(
        None, gt=0, description="training samples where no info file gives the count; null = count the tars once (cached beside them)")
    global_batch_size: int | None = Field(
        None, gt=0, description="images per optimizer step over all training workers, the same at any "
        "scaling.num_workers (micro-batch x accumulation derived per world size, the micro-batch at most "
        "batch_size); null = batch_size x scaling.num_workers x deepspeed.gradient_accumulation_steps")
    distill_transform: Literal["augment", "centre"] = Field(
        "augment", description="images of the distillation stages: augment (RandomResizedCrop over crop_scale + flip, "
        "shuffled) or centre (Resize 256/224 + CentreCrop, no augmentation, shuffled: the paper's fixed states)")
    generate: GenerateSpec | None = None

    @field_validator("train", "val")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v, READ_SCHEMES, "data URL")


class DiscoverySpec(Settings):
    metric: Literal["cosine", "mse", "cka", "swap"] = Field(
        "cosine", description="layer distance: cosine (1 - cos of [cls, mean patch]), mse, linear cka, or swap (damage of swapping two layers)")
    method: Literal["dp", "bisection"] = Field(
        "dp", description="segmentation: dp (exact max-cut over contiguous segments) or recursive bisection")
    k: int = Field(3, ge=1, description="number of student blocks, i.e. segments of the teacher's L layers")
    boundaries: list[int] | None = Field(None, description="fixed boundaries; skip the search")
    num_images: int = Field(10_000, gt=0, description="images the distance matrix averages over")

    @model_validator(mode="after")
    def _boundaries(self) -> "DiscoverySpec":
        b = self.boundaries
        if b is not None:
            if any(x <= 0 for x in b) or any(x >= y for x, y in zip(b, b[1:])):
                raise ValueError(f"boundaries must be increasing positive layer numbers (got {b})")
            if len(b) + 1 != self.k:
                raise ValueError(f"{len(b)} boundaries make k={len(b) + 1} blocks, but k={self.k}")
        return self


class TokenWeights(Settings):
    cls: float = Field(1 / 3, ge=0, description="loss weight of the cls token")
    reg: float = Field(1 / 3, ge=0, description="loss weight of the register tokens")
    patch: float = Field(1 / 3, ge=0, description="loss weight of the patch tokens")

    @classmethod
    def of(cls, weights: tuple[float, float, float]) -> "TokenWeights":
        return cls(cls=weights[0], reg=weights[1], patch=weights[2])

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.cls, self.reg, self.patch)


class StageSpec(runner.FaultSettings):
    """Optimiser and loss of one training stage (the paper's recipe is the default)."""

    steps: int = Field(..., gt=0, description="optimizer steps of the stage")
    lr: float = Field(PAPER_LR, gt=0, description="peak learning rate at the spec's effective batch")
    min_lr: float = Field(PAPER_MIN_LR, ge=0, description="learning rate at the end of the cosine schedule")
    warmup_steps: int | None = Field(
        None, ge=0, description="linear learning-rate warm-up steps; null = the paper's 10,000, at most a tenth of the stage")
    weight_decay: float = Field(PAPER_WEIGHT_DECAY, ge=0, description="AdamW weight decay")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning rate after the warm-up")
    loss: Literal["mse", "token", "cosine"] = Field(
        "mse", description="mse over all tokens, token (cls/reg/patch MSE weighted by token_weights) or cosine")
    token_weights: TokenWeights = Field(default_factory=TokenWeights)
    sigma: float = Field(0.0, ge=0, description="input noise on teacher states")

    @model_validator(mode="after")
    def _warmup(self) -> "StageSpec":
        if self.warmup_steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        return self

    @property
    def warmup(self) -> int:
        """The warm-up steps this stage runs (the paper's rule when the spec leaves it open)."""
        return paper_warmup(self.steps) if self.warmup_steps is None else self.warmup_steps


class Stage1Spec(StageSpec):
    """Per-block training: lambda * teacher forcing + (1 - lambda) * autoregressive."""

    lambda_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="how lambda, the teacher-forcing weight, falls from 1 to lambda_min")
    lambda_min: float = Field(0.0, ge=0, le=1, description="final lambda (0 = pure autoregressive training)")
    lambda_rho: float = Field(0.25, gt=0, le=1, description="fraction of steps over which lambda anneals")
    horizon: int | None = Field(None, gt=0, description="autoregressive horizon; None = segment length (the paper)")
    last_block_token_weights: TokenWeights | None = Field(
        default_factory=lambda: TokenWeights.of(PAPER_LAST_BLOCK_TOKEN_WEIGHTS),
        description="the paper weights cls up for the last block; None = same loss as the others",
    )


class Stage2Spec(StageSpec):
    """End-to-end autoregressive rollout of the chained student over all L layers."""

    loss: Literal["mse", "token", "cosine"] = Field(
        "token", description="mse over all tokens, token (cls/reg/patch MSE weighted by token_weights) or cosine")
    token_weights: TokenWeights = Field(default_factory=lambda: TokenWeights.of(PAPER_STAGE2_TOKEN_WEIGHTS))


class ProbeSpec(Settings):
    """Linear classification probe on frozen features (DINOv2 protocol)."""

    epochs: int = Field(15, gt=0, description="passes over the training set")
    batch_size: int = Field(512, gt=0, description="images per step")
    lrs: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2], min_length=1,
                             description="learning rates tried, one linear head each; the best one is reported")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    init_from_teacher_head: bool = Field(
        True, description="also report the paper's variant: the student's head fine-tuned from the teacher's probe head")


class ExportSpec(Settings):
    """The export stage: the student as a self-contained model (stem, blocks, norm, heads) in the formats people load."""

    formats: list[Literal[FORMATS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(DEFAULT_FORMATS), min_length=1,
        description="safetensors: one file; hf: a Hugging Face model folder with its model card; onnx: one resolution, "
        "dynamic batch (needs the export extra)")
    resolution: int | None = Field(None, gt=0, description="the ONNX graph's image size, a multiple of the patch size; null = teacher.img_size")
    head: Literal["probe_finetuned", "probe", "teacher"] | None = Field(
        None, description="the head forward() uses; null = the student's probe head with the better val top-1")
    license: str | None = Field(
        None, description="the license in the model card; null = the teacher's: timm's for a given checkpoint, 'other' for one trained here")


class StorageSpec(runner.StorageSettings):
    """Where the run's folder and its artifacts live, and how the workers checkpoint there."""

    url: str = Field(..., description="this run's folder: spec.yaml, run.json (stage -> artifact), report/, logs/; local path or fsspec URL")
    store: str | None = Field(
        None, description="content-addressed artifact store, shared by runs and sweep trials; null = <url>/store")

    @field_validator("url", "store")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v, WRITE_SCHEMES, "storage URL")

    @property
    def store_url(self) -> str:
        return self.store or storage.join(self.url, "store")


# A Ray resource that nodes never preempted advertise (the KubeRay head does): a sweep's trial drivers and
# its locks reserve a unit of it where a cluster has any (raptor.service.sweep.trials.driver_resources).
DRIVER_RESOURCE = "raptor_driver"
DRIVER_SLOTS = 1000  # how much of it such a node advertises: the trial drivers it may host


class ClusterSpec(Settings):
    """Where the job runs on Kubernetes (KubeRay); read only by ``raptor k8s render``, never by training."""

    image: str = Field("ghcr.io/raptor-distill/raptor:0.1.0", description="image built from cluster/Dockerfile, for head, workers and submitter")
    namespace: str = Field("raptor", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63, description="Kubernetes namespace of every object")
    service_account: str = Field("raptor", description="ServiceAccount of the Ray pods")
    service_account_annotations: dict[str, str] = Field(default_factory=dict, description="cloud workload identity, e.g. eks.amazonaws.com/role-arn, so pods reach S3 without keys")
    gpus_per_node: int = Field(8, gt=0, description="GPUs of one worker pod; workers are packed onto pods of this size")
    memory_per_worker_gib: int = Field(64, gt=0, description="host memory per Ray Train worker (half of a pod's memory backs /dev/shm)")
    node_selector: dict[str, str] = Field(default_factory=dict, description="node labels for worker pods, e.g. the GPU type "
                                          "or a spot/preemptible node pool")
    worker_tolerations: list[dict[str, str]] = Field(
        default_factory=list, description="extra tolerations of worker pods, e.g. a spot pool's taint "
        "({key: cloud.google.com/gke-spot, operator: Equal, value: 'true', effect: NoSchedule}); pair with "
        "scaling.min_workers so a preempted node shrinks the group")
    head_node_selector: dict[str, str] = Field(
        default_factory=dict, description="node labels for the head and the submitter (the driver, a sweep's trial "
        "drivers and its cluster state), e.g. an on-demand pool while workers run on spot")
    drain_seconds: int = Field(
        25, ge=0, le=3600, description="a worker pod being terminated (a spot reclaim, a scale-down) announces its "
        "preemption to Ray with this long to go, so a training stage checkpoints at its next step boundary, and stops "
        "its Ray node 5 s after that (terminationGracePeriodSeconds = this + 10; keep it within the provider's "
        "notice); 0 = stop at once")
    head_cpus: int = Field(8, gt=0, description="the head runs the driver and dashboard only (Ray schedules no work there)")
    head_memory_gib: int = Field(32, gt=0, description="memory of the head pod")
    wandb_secret: str | None = Field("raptor-wandb", description="Secret with key api-key -> WANDB_API_KEY; None = no wandb credentials")
    s3_secret: str | None = Field("raptor-s3", description="Secret with keys access-key-id, secret-access-key; optional where workload identity is used")
    ray_token_secret: str | None = Field(
        "raptor-ray-token", description="Secret with key auth_token: the token of Ray's token authentication "
        "(authOptions mode token, KubeRay >= 1.5.1); None = KubeRay generates one per cluster")
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="the job's Ray cluster is deleted this long after the job ends")
    active_deadline_seconds: int | None = Field(172_800, gt=0, description="the RayJob fails after running this long")
    backoff_limit: int = Field(1, ge=0, description="RayJob retries, each on a fresh Ray cluster; resumes from the last checkpoint")


SWEEP_METRICS: dict[str, str] = {
    # sweep.metric -> the key a trial reports it under (to Ray Tune, results.csv)
    "update_r2": "val/all/update_r2/mean",  # rollout fidelity on the fixed validation batch, reported while training
    "rollout_top1": "val/top1",  # the student's rollout through the teacher's own head, reported while training
    "probe_top1": "probe/student_top1",  # the probe stage's linear probe on the student: only when a trial ends
    "student_share": "probe/student_share",  # student top-1 / teacher top-1, same head init: only when a trial ends
}
# sections a trial may not vary: where the sweep keeps its trials, its own settings, and labels
_NOT_SWEEPABLE = ("name", "sweep", "storage", "cluster", "runtime_env")


def tied(key: str) -> list[str]:
    """The fields of one ``sweep.space`` key: one dotted field, or several that vary together (comma-separated)."""
    return [p.strip() for p in key.split(",")]


class Domain(Settings):
    """The values of one swept field: exactly one of grid, choice, uniform, loguniform or randint."""

    grid: list[Any] | None = Field(None, min_length=1, description="every value, crossed with the other grid fields")
    choice: list[Any] | None = Field(None, min_length=1, description="one value drawn per trial")
    uniform: tuple[float, float] | None = Field(None, description="a float drawn uniformly from [lo, hi]")
    loguniform: tuple[float, float] | None = Field(None, description="a float drawn log-uniformly from [lo, hi], lo > 0")
    randint: tuple[int, int] | None = Field(None, description="an integer drawn from lo .. hi - 1")

    @model_validator(mode="after")
    def _one(self) -> "Domain":
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {', '.join(given) or 'none'})")
        kind = given[0]
        if kind in ("uniform", "loguniform", "randint"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind}: [lo, hi] needs lo < hi (got [{lo}, {hi}])")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: lo must be > 0 (got {lo})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    @property
    def values(self) -> Any:
        return getattr(self, self.kind)


class SweepSpec(Settings):
    """A Ray Tune sweep over this spec (``raptor sweep``): one trial per point of ``space``, sharing the store."""

    space: dict[str, Domain] = Field(
        ..., min_length=1, description="dotted spec field -> its values, e.g. discovery.k: {grid: [2, 3, 4]}, "
        "stage1.lr: {loguniform: [1.0e-4, 1.0e-2]}; kinds: grid, choice, uniform, loguniform, randint. Fields that "
        "vary together share one key, comma-separated, with a list per value: 'stage1.lr,stage2.lr': {grid: [[1e-3, 5e-4], [2e-3, 1e-3]]}")
    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: the cross product of the grid fields (no sampled ones); random: grid fields crossed, "
        "the others drawn per trial (Tune's BasicVariantGenerator); optuna: Tune's OptunaSearch (TPE)")
    num_samples: int = Field(1, gt=0, description="grid/random: passes over the grid, each drawing the sampled fields "
                             "anew; optuna: the number of trials")
    seed: int = Field(0, description="seed of the sampled fields (random) and of Optuna's sampler")
    metric: Literal["update_r2", "rollout_top1", "probe_top1", "student_share"] = Field(
        "update_r2", description="what ranks trials: update_r2 (stage-2 validation update-R^2 mean), rollout_top1 "
        "(the student's rollout through the teacher's head on the validation batch), probe_top1 or student_share "
        "(the probe stage's; known only when a trial ends, so ASHA cannot use them)")
    mode: Literal["max", "min"] = Field("max", description="whether a higher or a lower metric is better")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="fifo: every trial runs to the end; asha: "
                                               "asynchronous successive halving stops trials that trail at a rung")
    grace_period: int = Field(100, gt=0, description="asha: training steps (stage 1 + stage 2 counted on) a trial runs "
                              "before it can be stopped; the first rung")
    reduction_factor: float = Field(4.0, gt=1, description="asha: rungs at grace_period x factor^n; a trial continues "
                                    "past a rung when it is in the top 1/factor there")
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="trials at once; null = as many as the cluster's free CPUs and GPUs fit, each trial "
        "taking its scaling section's workers (plus 0.01 CPU for its driver)")

    @field_validator("space")
    @classmethod
    def _sweepable(cls, v: dict[str, Domain]) -> dict[str, Domain]:
        for key, domain in v.items():
            for path in tied(key):
                if path.split(".")[0] in _NOT_SWEEPABLE:
                    raise ValueError(f"{path}: not a field a trial can vary (the sweep owns {', '.join(_NOT_SWEEPABLE)})")
            if len(tied(key)) > 1:
                bad = [x for x in domain.values if not (isinstance(x, list) and len(x) == len(tied(key)))] \
                    if domain.kind in ("grid", "choice") else [domain.kind]
                if bad:
                    raise ValueError(f"{key}: {len(tied(key))} tied fields take grid or choice values that are lists of "
                                     f"{len(tied(key))} (got {bad[0]!r})")
        return v

    @model_validator(mode="after")
    def _search(self) -> "SweepSpec":
        kinds = {path: d.kind for path, d in self.space.items()}
        if self.search == "grid" and (sampled := [p for p, k in kinds.items() if k != "grid"]):
            raise ValueError(f"search grid takes grid fields only; {sampled[0]} is {kinds[sampled[0]]} (use search: random)")
        if self.search == "optuna" and (grids := [p for p, k in kinds.items() if k == "grid"]):
            raise ValueError(f"search optuna samples every field; {grids[0]} is a grid (use choice)")
        if self.scheduler == "asha" and self.metric in ("probe_top1", "student_share"):
            raise ValueError(f"scheduler asha needs a metric reported while training; {self.metric} exists only when a "
                             "trial ends (use update_r2 or rollout_top1)")
        return self

    @property
    def metric_key(self) -> str:
        return SWEEP_METRICS[self.metric]


class JobSpec(Settings):
    """A whole distillation: teacher -> discovery -> stage 1 -> stage 2 -> probe -> report -> export."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="name of the job; the RayJob and its pods are named after it")
    teacher: TeacherSpec
    data: DataSpec
    discovery: DiscoverySpec = Field(default_factory=DiscoverySpec)
    student: runner.StudentSettings = Field(default_factory=runner.StudentSettings)
    stage1: Stage1Spec
    stage2: Stage2Spec
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    scaling: runner.ScalingSettings = Field(default_factory=runner.ScalingSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    storage: StorageSpec
    logging: runner.LoggingSettings = Field(default_factory=runner.LoggingSettings)
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime_env for `raptor submit`; entries named like a credential are "
        "redacted in the saved spec and refused by `raptor k8s render`")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    sweep: SweepSpec | None = None

    @model_validator(mode="after")
    def _k_fits_teacher(self) -> "JobSpec":
        depth = self.teacher.depth()
        if depth is not None:
            if self.discovery.k > depth:
                raise ValueError(f"discovery.k={self.discovery.k} exceeds the teacher's depth L={depth}")
            b = self.discovery.boundaries
            if b and b[-1] >= depth:
                raise ValueError(f"discovery.boundaries {b} must lie in 1..{depth - 1} (teacher depth {depth})")
        blocks = self.deepspeed.activation_checkpointing
        if isinstance(blocks, list) and blocks and max(blocks) >= self.discovery.k:
            raise ValueError(f"deepspeed.activation_checkpointing blocks {blocks} out of range for discovery.k={self.discovery.k}")
        return self

    @model_validator(mode="after")
    def _global_batch(self) -> "JobSpec":
        if self.data.global_batch_size is None:
            return self
        if self.deepspeed.gradient_accumulation_steps != 1:
            raise ValueError("set data.global_batch_size or deepspeed.gradient_accumulation_steps, not both "
                             "(with a global batch the accumulation is derived per world size)")
        try:
            self.batching()
        except UserError as e:
            raise ValueError(str(e)) from None
        return self

    @model_validator(mode="after")
    def _elastic(self) -> "JobSpec":
        if self.scaling.min_workers is not None and self.data.global_batch_size is None:
            raise ValueError("scaling.min_workers (elastic training) needs data.global_batch_size: the optimizer's batch "
                             "must not change with the number of workers")
        return self

    def batching(self, world_size: int | None = None) -> tuple[int, int]:
        """(micro-batch per worker, micro-batches per optimizer step) at ``world_size`` (default ``scaling.num_workers``)."""
        return runner.micro_batching(self.data.global_batch_size, world_size or self.scaling.num_workers,
                                     self.data.batch_size, self.deepspeed.gradient_accumulation_steps)

    def worker_layout(self) -> str:
        """The training stages' workers and batching, at each end of an elastic range (:func:`runner.worker_layout`)."""
        return runner.worker_layout(self.scaling.world_sizes, self.batching, self.data.global_batch_size)

    @property
    def effective_batch(self) -> int:
        micro, accumulation = self.batching()
        return self.data.global_batch_size or micro * accumulation * self.scaling.num_workers

    def public_dump(self) -> dict[str, Any]:
        """The spec as saved with a run (``spec.yaml``, ``run.json``): credentials in ``runtime_env`` redacted."""
        raw = self.model_dump(mode="json")
        raw["runtime_env"] = redact(raw["runtime_env"])
        return raw

    def to_yaml(self, public: bool = False) -> str:
        """YAML of the spec; ``public``: as saved with a run, credentials redacted."""
        return yaml.safe_dump(self.public_dump() if public else self.model_dump(mode="json"), sort_keys=False)


def set_field(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set the dotted ``path`` of a raw spec dict to ``value``; missing sections are created."""
    parts = path.strip().split(".")
    if not all(parts):
        raise SpecError(f"{path}: expected section.field=value (an empty name in {path.strip()!r})")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{path}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides to a raw spec dict; values are parsed as YAML."""
    for item in overrides:
        shown = hide_passwords(item)  # an error echoes the override, never a URL's password
        if "=" not in item:
            raise SpecError(f"--set {shown!r}: expected section.field=value")
        key, value = item.split("=", 1)
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise SpecError(f"--set {shown!r}: the value is not valid YAML ({hide_passwords(' '.join(str(e).split()))})") from None
        try:
            set_field(raw, key, value)
        except SpecError as e:
            raise SpecError(f"--set {shown!r}: {str(e).split(': ', 1)[1]}") from None
    return raw


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown field"
    if err["type"] == "missing":
        return f"{loc}: required field is missing"
    msg = " ".join(err["msg"].removeprefix("Value error, ").split())
    bad = err.get("input")
    if isinstance(bad, dict):  # a whole section failed a cross-field check; msg names the values
        return f"{loc}: {msg}" if loc else msg
    if isinstance(bad, str) and _URL_PASSWORD.match(bad):
        return f"{loc}: {msg}"  # never echo a password
    shown = hide_passwords(repr(bad))
    return f"{loc}: {msg} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"


def parse_spec(raw: dict[str, Any], source: str = "spec") -> JobSpec:
    """Validate a raw dict; raise SpecError naming the first bad field."""
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        extra = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SpecError(f"{source}: {_describe(errors[0])}{extra}") from None


def load_spec(url: str, overrides: list[str] | None = None) -> JobSpec:
    """Load a YAML spec from a path or URL, apply ``--set`` overrides, validate."""
    try:
        raw = yaml.safe_load(storage.read_bytes(url).decode())
    except FileNotFoundError:
        raise SpecError(f"{url}: no such spec file") from None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise SpecError(f"{url}: cannot read the spec ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise SpecError(f"{url}: not a text file (a YAML spec is UTF-8 text)") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{url}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{url}: a job spec is a YAML mapping of sections")
    return parse_spec(apply_overrides(raw, overrides or []), source=url)
