"""Each setting is declared once: the job spec is composed of the settings the runner and the libraries take.

Every field of the spec is walked, and every model the runner and the libraries are handed (a
:class:`~raptor.train.job.StageJob` and its parts, the memory plan's :class:`~raptor.perf.memory.Setup`)
is searched for a second declaration of it: the same name, type and default, declared in a class that
neither is nor extends the spec's own declaration. Fields that share all three by coincidence while
meaning different things are listed in :data:`DISTINCT`, each with what tells them apart.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Iterator

import pytest
from pydantic import BaseModel

from raptor.distill import StageConfig
from raptor.perf.memory import Setup
from raptor.service.spec import JobSpec
from raptor.train.job import StageJob

# The library's own API, kept on purpose, with one tested translation (spec.translate.stage_config,
# tests/test_service_build.py): a notebook user builds a StageConfig without a job spec.
LIBRARY_APIS = {StageConfig: "raptor.distill's stage hyperparameters; translated once by spec.translate.stage_config"}
# (spec field, Model.field): the same name, type and default, two different settings
DISTINCT = {
    ("data.generate.seed", "LoaderSettings.seed"): "the generator's seed, not the loader's shuffling seed",
    ("sweep.seed", "LoaderSettings.seed"): "the seed of the sweep's search, not of a trial's loader",
    ("deepspeed.precision", "TeacherSettings.precision"): "the student step's precision, not the frozen teacher's",
    ("teacher.precision", "DeepSpeedSettings.precision"): "the frozen teacher's precision, not the student step's",
    ("teacher.train.batch_size", "LoaderSettings.batch_size"): "teacher training's batch, not the distillation batch",
    ("teacher.train.num_workers", "ScalingSettings.num_workers"): "teacher training's loader workers, not Ray workers",
    ("storage.url", "ShardSource.url"): "the run's folder, not a split's shards",
}
_NO_DEFAULT = object()


def _default(cls: type, name: str) -> Any:
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        info = cls.model_fields[name]
        return info.default_factory() if info.default_factory else _NO_DEFAULT if info.is_required() else info.default
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else (
        _NO_DEFAULT if f.default is dataclasses.MISSING else f.default)


def _is_section(annotation: Any) -> bool:
    return any(isinstance(a, type) and issubclass(a, BaseModel) for a in (annotation, *typing.get_args(annotation)))


def _own_fields(cls: type) -> dict[str, Any]:
    """The fields ``cls`` itself declares (not inherited), with their resolved types."""
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in vars(cls).get("__annotations__", {}) if name in hints
            and not typing.get_origin(hints[name]) is typing.ClassVar}


def _declaring_class(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in vars(c).get("__annotations__", {}))


def spec_fields(model: type[BaseModel] = JobSpec, prefix: str = "") -> Iterator[tuple[str, type, Any]]:
    """(dotted name, the class that declares it, its type) of every field of the spec, sections walked."""
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        yield dotted, _declaring_class(model, name), info.annotation
        for arg in (info.annotation, *typing.get_args(info.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from spec_fields(arg, f"{dotted}.")


def consumed_models(root: type = StageJob, seen: set[type] | None = None) -> set[type]:
    """``root`` and every dataclass or pydantic model reachable through its fields' types."""
    seen = set() if seen is None else seen
    if root in seen:
        return seen
    seen.add(root)
    hints = typing.get_type_hints(root)
    for t in hints.values():
        for arg in (t, *typing.get_args(t)):
            if isinstance(arg, type) and (dataclasses.is_dataclass(arg) or issubclass(arg, BaseModel)):
                consumed_models(arg, seen)
    return seen


def copies(models: set[type]) -> list[str]:
    """'spec field -> Model.field' for every second declaration of a spec field among ``models``."""
    found = []
    for dotted, owner, annotation in spec_fields():
        name = dotted.rsplit(".", 1)[-1]
        if _is_section(annotation):
            continue  # a section is composed of its model, not a setting of its own
        for model in models - set(LIBRARY_APIS):
            if issubclass(owner, model) or issubclass(model, owner):
                continue  # the spec's section is (or extends) this model: one declaration
            declared = _own_fields(model)
            if (name in declared and declared[name] == annotation and _default(model, name) == _default(owner, name)
                    and (dotted, f"{model.__name__}.{name}") not in DISTINCT):
                found.append(f"{dotted} -> {model.__module__}.{model.__qualname__}.{name}")
    return sorted(set(found))


def test_every_spec_field_is_declared_once():
    """Catches a setting declared in the spec and again in what the runner or a library takes (the old
    DeepSpeedPlan/ScalingPlan/LogPlan/CheckpointPlan mirrors, ShardSource's data fields, perf.Setup's
    ZeRO stage): two defaults and two sets of rules that drift apart, and a copy step between them."""
    models = consumed_models() | {Setup}
    assert {StageJob, Setup} <= models and len(models) > 5, models  # the walk reached the job's parts
    assert copies(models) == []


def test_the_copy_check_sees_a_mirror():
    """Catches a check that cannot fail: a mirror of the deepspeed section (the shape DeepSpeedPlan had)
    and a copy of the data seed elsewhere are both reported."""

    @dataclasses.dataclass
    class DeepSpeedMirror:
        zero_stage: int = 2
        gradient_clipping: float = 1.0

    class SeedCopy(BaseModel):
        seed: int = 0

    found = copies({DeepSpeedMirror, SeedCopy})
    assert "deepspeed.zero_stage -> " + f"{__name__}.test_the_copy_check_sees_a_mirror.<locals>.DeepSpeedMirror.zero_stage" in found
    assert any(f.startswith("data.seed -> ") and f.endswith("SeedCopy.seed") for f in found)


@pytest.mark.parametrize("section", ["deepspeed", "scaling", "logging", "student"])
def test_the_runner_gets_the_spec_sections_themselves(section):
    """Catches a section rebuilt field by field on its way to the runner (a copy step that can drop a field):
    the job's part is the spec section's model, not a look-alike."""
    assert typing.get_type_hints(StageJob)[section] is JobSpec.model_fields[section].annotation


def test_the_loader_takes_its_settings_object():
    """Catches the loader's signature restating its settings as keywords with defaults of their own
    (the loader's num_workers default differed from the spec's): a setting is a LoaderSettings field only."""
    import inspect

    from raptor.data import LoaderSettings, loader

    params = inspect.signature(loader).parameters
    assert params["settings"].annotation in (LoaderSettings, "LoaderSettings")
    assert sorted(set(params) & set(LoaderSettings.model_fields)) == []
    assert set(LoaderSettings.model_fields) <= set(JobSpec.model_fields["data"].annotation.model_fields)
