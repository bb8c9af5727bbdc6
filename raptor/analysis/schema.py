"""The report's shape as pydantic models; ``report.schema.json`` (JSON Schema 2020-12) is generated from them.

One model per section of ``report.json``. :func:`validate_report` checks a report dict exactly as it
will be written (through its JSON), strictly (no coercion of strings to numbers) and with no
undocumented fields, so a report that does not fit is a bug caught before anything is written, and
the schema beside every report cannot drift from the code. Sections a run may lack are null
(``discovery`` without a discovery stage, ``fidelity`` without a student, ``probe`` without a
head or probe stage) or absent (the optional studies, ``probe.student_finetuned``).
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

Layer = Annotated[int, Field(ge=1, description="1-based layer")]
Curve = list[float]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# --------------------------------------------------------------------------- run, teacher, discovery
class RunSection(_Section):
    """Which run the report describes."""

    name: str | None = Field(description="the spec's run name (null for a report built outside a run)")
    url: str | None = Field(description="the run's storage URL (null for a report built outside a run)")
    created: datetime = Field(description="when the report was built (ISO 8601, UTC)")
    student_stage: Literal["stage1", "stage2"] | None = Field(
        None, description="the stage whose student was analysed (stage1 when stage 2 has not run; null: teacher only)"
    )


class TeacherSection(_Section):
    """The frozen teacher ViT and its token geometry."""

    name: str = Field(description="timm model name")
    depth: int = Field(ge=1, description="number of transformer blocks L")
    width: int = Field(ge=1, description="embedding width D")
    num_registers: int = Field(ge=0, description="register tokens after the cls token")
    num_patches: int = Field(ge=1, description="patch tokens per image")


class DiscoverySection(_Section):
    """Block discovery: the layer-distance matrix and the max-cut boundaries (METHOD.md section 3)."""

    metric: str | None = Field(description="distance between layer representations (e.g. cosine)")
    distances: list[Curve] = Field(description="L x L distances between the teacher's layers")
    boundaries: list[Layer] = Field(description="1-based last layer of every block but the last")

    @model_validator(mode="after")
    def _square(self) -> DiscoverySection:
        if any(len(row) != len(self.distances) for row in self.distances):
            raise ValueError(f"distances must be a square matrix (got {len(self.distances)} rows of lengths {sorted({len(r) for r in self.distances})})")
        return self


# --------------------------------------------------------------------------- probe
class Accuracy(_Section):
    """Classification accuracy of one linear head on the validation split."""

    top1: Fraction = Field(description="top-1 accuracy")
    top5: Fraction | None = Field(None, description="top-5 accuracy (k capped at the number of classes)")


class ProbeSection(_Section):
    """Linear probes on the final readout ([cls, mean patch]) of teacher and student.

    ``teacher`` and ``student`` start from the same head init, so ``student_share`` compares like
    with like; ``student_finetuned`` (the paper's last step) starts from the teacher's trained head
    and is reported as its own row, never in the share.
    """

    source: Literal["teacher head", "probe stage"] = Field(
        description="teacher head: the teacher's own classifier on both readouts (analysis); probe stage: "
        "probes trained by the probe stage (DINOv2 protocol)"
    )
    teacher: Accuracy = Field(title="teacher", description="the teacher's probe")
    student: Accuracy = Field(title="student", description="the student's probe, from the same head init as the teacher's")
    student_finetuned: Accuracy | None = Field(
        None, title="student, head fine-tuned from the teacher's",
        description="the student's probe fine-tuned from the teacher's trained probe head (present when the probe stage trained it)",
    )
    student_share: float | None = Field(
        description="student top-1 / teacher top-1 (same head init; null when the teacher's top-1 is 0)"
    )

    @model_validator(mode="after")
    def _like_for_like(self) -> ProbeSection:
        """The share must be the student row over the teacher row, never the fine-tuned row's."""
        t, s = self.teacher.top1, self.student.top1
        expected = s / t if t > 0 else None
        if (expected is None) != (self.student_share is None) or (
            expected is not None and not math.isclose(self.student_share, expected, rel_tol=1e-9)
        ):
            raise ValueError(f"student_share {self.student_share} is not student top-1 / teacher top-1 = {expected}")
        return self


PROBE_ROWS = ("teacher", "student", "student_finetuned")  # the probe section's accuracy rows, in table and plot order


# --------------------------------------------------------------------------- fidelity
class FidelitySection(_Section):
    """The student's states against the teacher's, all tokens, per layer (:mod:`raptor.distill.fidelity`)."""

    layers: list[Layer] = Field(description="1-based layers the curves below are measured at")
    r2: Curve = Field(description="R^2 of the student's state against the teacher's")
    cosine: Curve = Field(description="mean cosine of the student's tokens to the teacher's")
    update_r2: Curve = Field(description="R^2 of the per-layer updates x_l - x_{l-1} (the paper's fidelity measure)")
    rel_error: Curve = Field(description="||student - teacher|| / ||teacher||")

    @model_validator(mode="after")
    def _one_value_per_layer(self) -> FidelitySection:
        n = len(self.layers)
        if any(len(getattr(self, m)) != n for m in ("r2", "cosine", "update_r2", "rel_error")):
            raise ValueError(f"every fidelity curve needs one value per layer ({n})")
        return self


# --------------------------------------------------------------------------- dynamics
class GroupCurves(_Section):
    """One curve per token group (a group the model lacks, e.g. registers, is absent)."""

    cls: Curve | None = Field(None, description="the cls token")
    registers: Curve | None = Field(None, description="mean over the register tokens")
    patches: Curve = Field(description="mean over the patch tokens")


class SpeedJump(_Section):
    """Mean |change of angular speed| at block boundaries versus inside blocks (:func:`raptor.analysis.dynamics.boundary_jumps`)."""

    at_boundaries: float | None = Field(description="mean jump where one block hands over to the next")
    inside_blocks: float | None = Field(description="mean jump between steps of one block")
    ratio: float | None = Field(description="at_boundaries / inside_blocks (> 1: the speed changes at the boundaries)")


class BasinRow(_Section):
    """One perturbation: noise at a layer, dynamics continued to depth L, compared with the clean run."""

    layer: int = Field(ge=0, description="layer whose state is perturbed (0 = the input tokens)")
    scale: float = Field(ge=0, description="noise norm relative to each token's norm")
    cos_cls: float = Field(description="final cls cosine to the unperturbed run")
    cos_all: float = Field(description="final cosine to the unperturbed run, mean over all tokens")
    prediction_held: Fraction | None = Field(description="fraction of samples whose head prediction is unchanged (null without a head)")


class ModelDynamics(_Section):
    """Dynamics of one model's trajectories, depth as time (METHOD.md section 8)."""

    depth: int = Field(ge=1, description="layers L of the trajectory")
    num_samples: int = Field(ge=1, description="validation images the measures are exact over")
    gamma: GroupCurves = Field(description="directional convergence <x^_l, x^_L>, layers 0..L")
    gamma_midpoint: dict[str, float | None] = Field(description="per group, the layer where gamma first reaches 0.5 (null: never)")
    speed: GroupCurves = Field(description="angular speed arccos <x^_{l+1}, x^_l> in radians, steps producing layers 1..L")
    speed_deg: GroupCurves = Field(description="the angular speed in degrees")
    patch_stable_rank: Curve = Field(description="||U||_F^2 / ||U||_2^2 of the patch updates, per step")
    patch_coherence: Curve | None = Field(description="mean pairwise cosine of the patch updates, per step (null with one patch)")
    speed_jumps: dict[str, SpeedJump] | None = Field(None, description="per group, speed jumps at the boundaries (absent without boundaries)")
    silhouette: float | None = Field(description="class-basin separation of the final cls directions (cosine silhouette; null with < 2 classes)")
    basin: list[BasinRow] = Field(description="basin robustness: one row per perturbed layer and noise scale")


class DynamicsSection(_Section):
    """Dynamics of the teacher and of the student's autoregressive rollout."""

    teacher: ModelDynamics = Field(description="the teacher's trajectories")
    student: ModelDynamics | None = Field(description="null when the run has no student yet")


# --------------------------------------------------------------------------- studies
class SwapSummary(_Section):
    """Swaps of two layers inside one block versus across blocks (pairs i < j)."""

    within_change: float | None = Field(description="mean top-1 change (cosine - 1 without a head) of swaps inside a block")
    within_cosine: float | None = Field(description="mean readout cosine to the unswapped teacher, swaps inside a block")
    within_pairs: int = Field(ge=0, description="swapped pairs inside a block")
    across_change: float | None = Field(description="mean top-1 change (cosine - 1 without a head) of swaps across blocks")
    across_cosine: float | None = Field(description="mean readout cosine to the unswapped teacher, swaps across blocks")
    across_pairs: int = Field(ge=0, description="swapped pairs across blocks")


class LayerSwap(_Section):
    """The teacher run with two layers traded, for every pair (:func:`raptor.eval.structure.layer_swap_study`)."""

    layers: list[Layer] = Field(description="the swapped layers' numbers, rows and columns of the matrices")
    cosine: list[Curve] = Field(description="L x L mean readout cosine to the unswapped teacher")
    top1: list[Curve] | None = Field(description="L x L top-1 of the teacher's head (null without a head)")
    base_top1: float | None = Field(description="top-1 of the unswapped teacher (null without a head)")
    within_across: SwapSummary | None = Field(description="summary by block membership (null without boundaries)")


class StudentEval(_Section):
    """A distilled student's fidelity (layer means and per layer) and head accuracy (:func:`raptor.eval.structure.evaluate_student`)."""

    r2_mean: float = Field(description="R^2 of the states, mean over layers")
    cosine_mean: float = Field(description="cosine of the states, mean over layers")
    update_r2_mean: float = Field(description="R^2 of the updates, mean over layers")
    rel_error_mean: float = Field(description="relative error of the states, mean over layers")
    per_layer: FidelitySection = Field(description="the same measures per layer")
    top1: Fraction | None = Field(description="top-1 of the teacher's head on the student's readout (null without a head)")


class PartitionRun(StudentEval):
    """One student of the partition study."""

    kind: Literal["max-cut", "random"] = Field(description="the discovered partition or a random one")
    boundaries: list[Layer] = Field(description="this student's boundaries")


class VsRandom(_Section):
    """A metric of the max-cut student against the random partitions' students."""

    value: float = Field(description="the max-cut student's value")
    random_mean: float = Field(description="mean over the random partitions' students")
    random_std: float = Field(description="standard deviation over the random partitions' students")
    z: float | None = Field(description="(value - random_mean) / random_std (null when random_std is 0)")


class Partition(_Section):
    """Max-cut boundaries against random partitions with the same k and budget (:func:`raptor.eval.structure.partition_study`)."""

    boundaries: list[Layer] = Field(description="the max-cut boundaries")
    n_random: int = Field(ge=1, description="random partitions drawn")
    runs: list[PartitionRun] = Field(description="the max-cut student first, then the random ones")
    summary: dict[str, VsRandom] = Field(description="per metric (update_r2_mean, r2_mean, cosine_mean, rel_error_mean, top1)")


class AblationRow(StudentEval):
    """One cumulative row of the paper's ablation table (:func:`raptor.eval.structure.ablation_study`)."""

    row: str = Field(description="the ingredient this row adds to the previous ones")


class SegmentationLr(_Section):
    """One learning rate of the segmentation probe's grid."""

    lr: float = Field(description="peak learning rate")
    miou: Fraction = Field(description="validation mIoU")
    pixel_acc: Fraction = Field(description="validation pixel accuracy")


class Segmentation(_Section):
    """The best segmentation probe of the learning-rate grid, by validation mIoU."""

    miou: Fraction = Field(description="mean intersection over union over the classes present")
    pixel_acc: Fraction = Field(description="fraction of labelled pixels classified correctly")
    per_class_iou: list[float | None] = Field(description="IoU per class (null: class in neither labels nor predictions)")
    best_lr: float = Field(description="learning rate of the kept head")
    per_lr: list[SegmentationLr] = Field(description="every head of the grid")


class DepthLr(_Section):
    """One learning rate of the depth probe's grid."""

    lr: float = Field(description="peak learning rate")
    rmse: float = Field(ge=0, description="validation RMSE")


class Depth(_Section):
    """The best depth probe of the learning-rate grid, by validation RMSE."""

    rmse: float = Field(ge=0, description="root mean squared depth error over valid pixels")
    best_lr: float = Field(description="learning rate of the kept head")
    per_lr: list[DepthLr] = Field(description="every head of the grid")


class DenseProbes(_Section):
    """Linear dense probes on one model's final patch tokens (:func:`raptor.eval.dense.dense_probes`)."""

    segmentation: Segmentation = Field(description="per-patch class probe, upsampled to the masks")
    depth: Depth = Field(description="per-patch depth probe, upsampled to the depth maps")


class StudiesSection(_Section):
    """The optional studies of ``raptor analyze`` (each absent unless asked for)."""

    layer_swap: LayerSwap | None = Field(None, description="raptor analyze --layer-swap")
    partition: Partition | None = Field(None, description="raptor analyze --partition N")
    ablation: list[AblationRow] | None = Field(None, description="raptor analyze --ablation: the rows in order")
    dense: dict[str, DenseProbes] | None = Field(None, description="per model (teacher, student)")


# --------------------------------------------------------------------------- the report
PlotPath = Annotated[str, Field(pattern=r"^plots/[A-Za-z0-9_.-]+\.png$")]


class Report(_Section):
    """raptor analysis report: every number of a run's report, written as ``report.json``."""

    model_config = ConfigDict(
        title="raptor analysis report", json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"}
    )

    schema_version: Literal[1] = Field(description="bumped when a field changes meaning or goes away")
    run: RunSection = Field(description="which run this is")
    teacher: TeacherSection = Field(description="the frozen teacher")
    boundaries: list[Layer] = Field(description="1-based last layer of every block but the last")
    k: int = Field(ge=1, description="number of student blocks")
    discovery: DiscoverySection | None = Field(description="null when the discovery stage has not run")
    probe: ProbeSection | None = Field(description="null without a student, or without a head and probe stage")
    fidelity: FidelitySection | None = Field(description="null without a student")
    dynamics: DynamicsSection = Field(description="depth-as-time measures of teacher and student")
    studies: StudiesSection = Field(description="the optional studies ({} when none ran)")
    plots: dict[str, PlotPath] = Field(description="figure name -> PNG path relative to the report folder")


REPORT_SCHEMA: dict[str, Any] = Report.model_json_schema()


def validate_report(report: dict[str, Any]) -> Report:
    """Validate a report dict as it will be written (its JSON); raises pydantic's ValidationError naming the field."""
    return Report.model_validate_json(json.dumps(report))
