"""The pipeline's stages, in order: one module per stage, each declaring itself as ``STAGE``.

    data       the generated shards (data.generate), in the data folders the spec names
    teacher    teacher.safetensors + metrics.json: trained here, or the spec's checkpoint (given)
    distances  distances.npy: the layer-distance matrix of the teacher on the val images
    discovery  segmentation.json + distances.png: the max-cut boundaries (or the spec's fixed ones)
    stage1     student.safetensors + manifest.json + history.json: all k blocks on their segments
    stage2     the same for the chained student, rolled out over all L layers
    probe      results.json + heads.safetensors: linear probes, teacher vs student (same head init) and fine-tuned student
    report     report.json, index.md, index.html, plots/ (copied into the run folder)
    export     student.safetensors, hf/ (a Hugging Face model folder), ONNX: the self-contained student (copied into model/)

A stage module's :class:`~raptor.service.engine.graph.Stage` says everything about it: the spec
fields it reads (with the ``ignores`` that cannot change its artifact and why), the stages it
consumes, where its artifact lives, how its status is decided, whether it resumes, and how it runs.
Adding a stage is a module and a line in :data:`STAGES` (and its spec section); the pipeline
(``raptor.service.engine.pipeline``) names no stage. :data:`NOT_INPUTS` says why the rest of the
spec is read by no stage.
"""

from __future__ import annotations

from raptor.service.engine.graph import Stage, registry
from raptor.service.stages import data, discovery, distances, export, probe, report, stage1, stage2, teacher

# Spec fields that are an input of no stage, and why (a test checks that every field of the spec is
# read by a stage, ignored by one with a reason, or listed here, so a new field forces the decision).
NOT_INPUTS: dict[str, str] = {
    "name": "a label: wandb runs and Kubernetes objects are named after it",
    "runtime_env": "how `raptor submit` ships the code, not what it computes",
    "cluster": "where Kubernetes runs the job, read only by `raptor k8s render`",
    "logging": "what is reported and how often; the weights do not depend on it",
    "storage.url": "where this run's index and report copy live, not what they hold",
    "storage.store": "where artifacts are kept, not what they hold",
    "storage.checkpoint_interval": "a resumed stage continues bit for bit from any checkpoint",
    "storage.keep": "how many checkpoints are kept",
    "storage.upload": "whether training waits for a checkpoint's upload; the checkpoint is the same",
    "storage.preemption_check": "when a checkpoint is taken; a resumed stage continues bit for bit from any checkpoint",
    "storage.patience": "decides only how long an unreachable object store is waited for before the run stops",
    "scaling.cpus_per_worker": "a resource request; the work per rank is the same",
    "scaling.gpus_per_worker": "a resource request; the work per rank is the same",
    "scaling.resources_per_worker": "a resource request; the work per rank is the same",
    "scaling.placement_strategy": "where the ranks are placed, not what they compute",
    "scaling.max_failures": "how often a failed worker group is restarted from its checkpoint",
    "scaling.max_preemptions": "how often a preempted worker group is restarted from its checkpoint",
    "scaling.resize_interval": "how soon an elastic group grows; its stages are the same at any worker count",
    "scaling.min_workers": "how few workers an elastic stage may shrink to; needs data.global_batch_size, whose "
    "stages are the same at any worker count",
    "data.error_budget": "decides only whether bad data stops the run",
    "sweep": "which trials a sweep runs; each trial is a spec of its own, keyed by the fields it reads",
}

# The registry: the stages in the order they run (each after the stages it consumes).
STAGES: tuple[Stage, ...] = registry((
    data.STAGE,
    teacher.STAGE,
    distances.STAGE,
    discovery.STAGE,
    stage1.STAGE,
    stage2.STAGE,
    probe.STAGE,
    report.STAGE,
    export.STAGE,
))

BY_NAME = {s.name: s for s in STAGES}
