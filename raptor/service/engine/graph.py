"""The stage graph: every artifact is named by what it was made from, like a build system's cache.

Each :class:`Stage` declares the spec fields it reads and the stages it consumes. Its artifact's
identity is a short content key: a hash of the canonical JSON of those fields' values (after
validation, so a default written out and a default left implicit are the same) and of the upstream
stages' keys. Fields that do not change the result are listed, each with the reason, in
``ignores`` next to the stage; ``raptor.service.stages.NOT_INPUTS`` lists the spec fields no stage
reads. A stage is
done when the artifact for ITS key exists, so re-running a changed spec redoes exactly the stages
whose inputs changed, and runs or sweep trials whose inputs agree share one artifact.

A stage also says where its artifact lives, how its status is decided and whether it resumes (the
hooks of :class:`Stage`), so the engine (``raptor.service.engine.pipeline``) treats every stage alike:
adding one is a module that declares it and a line in the registry (``raptor.service.stages``).

:func:`plan` computes every key up front (keys depend on inputs, never on outputs) and says for each
stage: done, will run, or will resume, and why (which field differs from the artifact this run
used before), like ``make -n``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Sequence

from raptor.service.spec import JobSpec

if TYPE_CHECKING:
    from raptor.service.engine.artifacts import RunFolder

KEY_LENGTH = 16  # hex digits: 64 bits, no collision among any realistic number of artifacts

@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: what its artifact is made from, where it lives, when it is done, how it is made.

    What goes into the key (:func:`content_key`):

    ``reads``: dotted spec paths (a section name covers the whole section), or a function of the
    spec when the inputs depend on it (an artifact the spec gives vs one made here).
    ``upstream``: the stages whose artifacts it consumes (their keys are part of its key).
    ``ignores``: fields the stage uses (or that lie under ``reads``) that do not change its
    artifact, each with the reason.
    ``given``: the spec supplies the artifact itself; it is checked, never made. ``content``: for a
    given artifact, what its files are by content (``raptor.storage.identity``), as extra inputs: a
    file replaced at the same URL changes this key and every key downstream.
    ``version``: bumped when the stage computes something else from the same inputs.

    Where the artifact lives and how its status is decided (none of these changes the key):

    ``location``: where the artifact is when it is not a keyed folder of the store (the URL the spec
    gives, or a folder the spec names); ``None``: ``{store}/{name}/{key}/``.
    ``missing``: for a given artifact at ``location``, why it is not usable (``None``: it is); the
    plan then says ``missing`` and the run stops before anything starts.
    ``complete``: an artifact outside the store that gets no ``stage.json`` says itself whether it is
    complete; ``None``: it is done when its folder holds the ``stage.json`` written last.
    ``resumable``: an unfinished artifact continues from the Ray Train checkpoints under its folder.
    ``publish``: a copy of the finished artifact goes to this folder of the run (what a person opens).
    ``check``: validates the spec before anything runs (one line naming the field, not a failure mid-run).
    ``run``: makes the artifact into ``StageContext.folder``; returns the summary kept in ``stage.json``.
    """

    name: str
    reads: tuple[str, ...] | Callable[[JobSpec], tuple[str, ...]]
    upstream: tuple[str, ...]
    run: Callable[["StageContext"], dict[str, Any]]
    ignores: Mapping[str, str] = field(default_factory=dict)
    given: Callable[[JobSpec], bool] = lambda spec: False
    content: Callable[[JobSpec], dict[str, str]] = lambda spec: {}
    version: int = 1
    location: Callable[[JobSpec], str | None] = lambda spec: None
    missing: Callable[[JobSpec, str], str | None] = lambda spec, url: None
    complete: Callable[[JobSpec], bool] | None = None
    resumable: bool = False
    publish: str | None = None
    check: Callable[[JobSpec], None] = lambda spec: None

    def fields(self, spec: JobSpec) -> tuple[str, ...]:
        return self.reads(spec) if callable(self.reads) else self.reads


def registry(stages: Sequence[Stage]) -> tuple[Stage, ...]:
    """``stages`` as the pipeline runs them, checked: names unique, each stage after the ones it consumes."""
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise ValueError(f"stage {stage.name!r} is declared twice")
        if unknown := [u for u in stage.upstream if u not in seen]:
            raise ValueError(f"stage {stage.name!r} consumes {', '.join(unknown)}, which no stage before it makes")
        seen.add(stage.name)
    return tuple(stages)


def downstream(stages: Sequence[Stage], names: Collection[str]) -> list[str]:
    """``names`` and every stage that consumes one of them, directly or not, in the order of ``stages``:
    the stages a change to what ``names`` read makes again."""
    out: set[str] = set(names)
    for stage in stages:
        if out & set(stage.upstream):
            out.add(stage.name)
    return [s.name for s in stages if s.name in out]


def _lookup(tree: Any, path: str) -> Any:
    node = tree
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k in sorted(value):
            out.update(_flatten(value[k], f"{prefix}.{k}"))
        return out
    return {prefix: value}


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def inputs(stage: Stage, spec: JobSpec) -> dict[str, Any]:
    """The values of the fields ``stage`` reads, flattened to dotted leaves, without its ``ignores``;
    for a given artifact, also what its files are (``stage.content``)."""
    raw = spec.model_dump(mode="json")
    out: dict[str, Any] = {}
    for path in stage.fields(spec):
        out.update(_flatten(_lookup(raw, path), path))
    if stage.given(spec):
        out.update(stage.content(spec))
    return {k: v for k, v in sorted(out.items()) if not any(_under(k, ig) for ig in stage.ignores)}


def content_key(stage: Stage, values: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """sha256 of the canonical JSON of (stage, version, inputs, upstream keys), shortened."""
    payload = {"stage": stage.name, "version": stage.version, "inputs": dict(values), "upstream": dict(upstream)}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_LENGTH]


@dataclass
class Step:
    """One stage of a plan: its key, inputs, where its artifact is, and whether it needs to run."""

    stage: Stage
    key: str
    inputs: dict[str, Any]
    upstream: dict[str, str]
    url: str
    status: str = "will run"  # "done" | "will run" | "will resume" | "missing" (a given artifact that is not there)
    why: str = ""

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def done(self) -> bool:
        return self.status == "done"


@dataclass
class StageContext:
    """What a running stage gets: the spec, every artifact path, and its own step of the plan."""

    spec: JobSpec
    run_folder: "RunFolder"
    step: Step
    report_interval: int | None = None  # how often training stages send metrics (a sweep trial's scheduler)

    @property
    def folder(self) -> str:
        """Where this stage writes its artifact."""
        return self.step.url


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 3) -> str:
    """``section.field: 0.001 -> 0.002, ...`` for the fields whose values differ."""
    diffs = [f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def explain(step: Step, previous: Mapping[str, Any] | None, rebuilt: set[str]) -> str:
    """Why ``step`` will run: the fields that differ from what this run used before, or its upstream."""
    before = (previous or {}).get(step.name)
    if before is None:
        return "not made yet"
    if before.get("key") == step.key:
        return "artifact missing or unfinished"
    fields = changed_fields(before.get("inputs", {}), step.inputs)
    if fields:
        return fields
    ups = [u for u in step.stage.upstream if u in rebuilt or (before.get("upstream") or {}).get(u) != step.upstream.get(u)]
    return f"upstream {', '.join(ups)} changed" if ups else "stage version changed"


def render_table(steps: list[Step]) -> str:
    """The plan as a table a person reads before anything starts (and ``--dry-run`` prints)."""
    rows = [("stage", "key", "status", "why")] + [(s.name, s.key[:12], s.status, s.why) for s in steps]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows)
