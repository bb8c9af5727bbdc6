"""The pipeline's stages, in order, with what each one's artifact is made from.

    data       the generated shards (data.generate), in the data folders the spec names
    teacher    teacher.safetensors + metrics.json: trained here, or the spec's checkpoint (given)
    distances  distances.npy: the layer-distance matrix of the teacher on the val images
    discovery  segmentation.json + distances.png: the max-cut boundaries (or the spec's fixed ones)
    stage1     student.safetensors + manifest.json + history.json: all k blocks on their segments
    stage2     the same for the chained student, rolled out over all L layers
    probe      results.json: linear probes, teacher vs student (same head init) and fine-tuned student
    report     report.json, index.md, index.html, plots/ (copied into the run folder)

Each declaration names the spec fields the stage reads; the ``ignores`` beside it say which of
those cannot change its artifact and why; :data:`NOT_INPUTS` says why the rest of the spec is read by
no stage.
"""

from __future__ import annotations

from raptor import storage
from raptor.service.engine.graph import Stage
from raptor.service.spec import JobSpec
from raptor.service.stages import data, discovery, distill, probe, report, teacher

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
    "storage.patience": "decides only how long an unreachable object store is waited for before the run stops",
    "scaling.cpus_per_worker": "a resource request; the work per rank is the same",
    "scaling.gpus_per_worker": "a resource request; the work per rank is the same",
    "scaling.resources_per_worker": "a resource request; the work per rank is the same",
    "scaling.placement_strategy": "where the ranks are placed, not what they compute",
    "scaling.max_failures": "how often a failed worker group is restarted from its checkpoint",
    "data.error_budget": "decides only whether bad data stops the run",
    "sweep": "which trials a sweep runs; each trial is a spec of its own, keyed by the fields it reads",
}


# the shards a stage reads, and how: the layout split, labels, counts, augmentation, decoding
_TRAIN_DATA = ("data.train", "data.train_split", "data.train_samples", "data.label_key", "data.num_classes",
               "data.seed", "data.crop_scale", "data.decode")
_EVAL_DATA = ("data.val", "data.val_split", "data.train", "data.train_split", "data.label_key", "data.num_classes")
# what every stage that trains the student on the shards reads (beside its own section)
_TRAINING = ("student", *_TRAIN_DATA, "data.distill_transform", "data.batch_size", "data.num_workers",
             "teacher.precision", "scaling.num_workers", "scaling.use_gpu", "deepspeed")
_TRAINING_IGNORES = {
    "deepspeed.zero_stage": "sharding reorders float sums only: ZeRO 0-3 agree to 1e-4 after training steps",
    "deepspeed.offload_optimizer": "where optimizer states live, not their values",
    "deepspeed.offload_param": "where parameters live, not their values",
    "deepspeed.activation_checkpointing": "recomputation gives the same activations",
    "deepspeed.compile": "inductor reorders and fuses float ops only: compiled and eager losses agree to 1e-4",
    "stage1.max_nonfinite_steps": "decides only whether a diverging stage stops; a finished stage is the same",
    "stage2.max_nonfinite_steps": "decides only whether a diverging stage stops; a finished stage is the same",
}
# version 2: deepspeed.precision bf16 means bf16 autocast in an fp32 engine with fp32 targets
# (version 1: DeepSpeed's bf16 mode, bf16 weights and trajectories)
_TRAINING_VERSION = 2


def _teacher_reads(spec: JobSpec) -> tuple[str, ...]:
    if spec.teacher.checkpoint is not None:  # given: the file and how to build the model around it
        return ("teacher.checkpoint", "teacher.name", "teacher.img_size", "teacher.model_kwargs")
    # data.seed seeds the teacher only while teacher.train.seed leaves it open (then a sweep over data.seed keeps one teacher)
    seed = ("data.seed",) if spec.teacher.train is not None and spec.teacher.train.seed is None else ()
    return ("teacher", *(f for f in _TRAIN_DATA if f != "data.seed"), *_EVAL_DATA, "data.generate", *seed,
            "scaling.use_gpu")


def _data_content(spec: JobSpec) -> dict[str, str]:
    """Given shards by content: every shard of each split and its info file, by size and version."""
    from raptor.data import Shards
    from raptor.data.shards import INFO

    out = {}
    for field, url, split in (("data.train", spec.data.train, spec.data.train_split),
                              ("data.val", spec.data.val, spec.data.val_split)):
        if url is not None:
            shards = Shards.resolve(url, split=split)
            out[f"{field} (content)"] = storage.identity([*shards.urls, storage.join(shards.folder, INFO)])
    return out


def _teacher_content(spec: JobSpec) -> dict[str, str]:
    """A given teacher checkpoint (official .pth, timm/HF safetensors or a raptor export) by content."""
    assert spec.teacher.checkpoint is not None
    return {"teacher.checkpoint (content)": storage.identity([spec.teacher.checkpoint])}


STAGES: tuple[Stage, ...] = (
    Stage("data", reads=("data.train", "data.val", "data.generate"), upstream=(),
          run=data.run, given=lambda spec: spec.data.generate is None, content=_data_content),
    Stage("teacher", reads=_teacher_reads, upstream=("data",), run=teacher.run,
          given=lambda spec: spec.teacher.checkpoint is not None, content=_teacher_content),
    Stage("distances",
          reads=("discovery.metric", "discovery.num_images", *_EVAL_DATA, "teacher.precision", "scaling.use_gpu"),
          upstream=("teacher",), run=discovery.run_distances,
          ignores={"data.batch_size": "batches only group the images; the average over them is the same"}),
    Stage("discovery", reads=("discovery.k", "discovery.method", "discovery.boundaries"),
          upstream=("distances",), run=discovery.run_discovery),
    Stage("stage1", reads=("stage1",) + _TRAINING, upstream=("discovery",),
          run=distill.runner("stage1"), ignores=_TRAINING_IGNORES, version=_TRAINING_VERSION),
    Stage("stage2", reads=("stage2",) + _TRAINING, upstream=("stage1",),
          run=distill.runner("stage2"), ignores=_TRAINING_IGNORES, version=_TRAINING_VERSION),
    Stage("probe", reads=("probe", *_EVAL_DATA, "data.seed", "teacher.precision", "scaling.use_gpu"),
          upstream=("stage2",), run=probe.run),
    Stage("report", reads=(*_EVAL_DATA, "teacher.precision", "scaling.use_gpu"),
          upstream=("distances", "discovery", "stage2", "probe"), run=report.run,
          ignores={"data.batch_size": "batches only group the analysed images"}),
)

BY_NAME = {s.name: s for s in STAGES}
