"""``raptor run``: plan the stage graph for a spec, then make exactly the artifacts that are missing.

The plan (:func:`plan`) gives every stage its content key (``raptor.service.engine.graph``), its artifact
folder (in the store, or where the stage says it lives) and a status: done (an artifact with this
key exists, made by this run or by any other that points at the same store), will resume (a
resumable stage with checkpoints under its key), will run, or missing (an artifact the spec gives
that is not there). The run then executes the stages that are not done, in order; each writes its
files into its folder and the pipeline writes the folder's ``stage.json`` last, so a folder with a
marker holds a complete artifact and a crash leaves no half-artifact that counts as done.

Every stage is treated alike: what differs between them (where the artifact lives, how its status is
decided, whether it resumes, what is published) is declared by the stage (:class:`~raptor.service.engine.graph.Stage`),
so this module names none of them.

Every file a stage writes is hashed as it is written (``raptor.storage.recording``; the training
stages' workers hash the student files they write) and ``stage.json`` lists the checksums. Before a stage
runs, the artifacts it reads are checked against them: one that was truncated, bit-flipped or
replaced is never loaded; the plan says so (``will run  corrupt: ...``) and the run makes it again.

The run folder keeps what a person opens: ``spec.yaml``, ``run.json`` (stage -> key -> URL, the
inputs, with the spec that ran; secrets redacted) and a copy of each artifact a stage publishes.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Collection

import yaml

from raptor import storage
from raptor.errors import UserError
from raptor.service import stages as stage_defs
from raptor.service.spec.translate import absolute_paths
from raptor.service.engine.graph import Stage, Step, StageContext, changed_fields, content_key, explain, inputs, render_table
from raptor.service.engine.artifacts import MARKER_FILE, RunFolder, corrupt_file
from raptor.service.spec import JobSpec
from raptor.train.export import MANIFEST_FILE
from raptor.train.registered import CHECKPOINTS, resume_step

log = logging.getLogger(__name__)

# Holds the right to make one artifact (a step's stage and key) while the pipeline makes it; runs that
# share a store concurrently (sweep trials) pass one, so no artifact is ever made twice at once.
Guard = Callable[[Step], AbstractContextManager[Any]]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _location(stage: Stage, key: str, spec: JobSpec, run_folder: RunFolder) -> str:
    """Where the stage says its artifact lives, else its keyed folder in the store."""
    where = stage.location(spec)
    return where if where is not None else run_folder.keyed(stage.name, key)


def _status(step: Step, spec: JobSpec, previous: dict[str, Any] | None, rebuilt: set[str]) -> tuple[str, str]:
    stage = step.stage
    if stage.given(spec):
        if (problem := stage.missing(spec, step.url)) is not None:
            return "missing", problem
        before = (previous or {}).get(step.name) or {}
        changed = changed_fields(before.get("inputs", {}), step.inputs) if before.get("key") not in (None, step.key) else ""
        return "done", f"given: {step.url}" + (f"; changed since this run's last start: {changed}" if changed else "")
    if stage.complete is not None:  # an artifact outside the store, without a marker
        return ("done", "") if stage.complete(spec) else ("will run", f"writes {step.url}")
    marker = storage.join(step.url, MARKER_FILE)
    if storage.exists(marker):
        made = storage.read_json(marker).get("made_by", {})
        other = made.get("run") not in (None, spec.storage.url)
        return "done", f"shared: made by run {made.get('name')} ({made.get('run')})" if other else ""
    if stage.resumable and (at := resume_step(storage.join(step.url, CHECKPOINTS))) is not None:
        return "will resume", f"from its checkpoint at step {at}"
    return "will run", explain(step, previous, rebuilt)


def _marked(step: Step, spec: JobSpec) -> bool:
    """The artifact gets a ``stage.json``: it is made here, into the store (not given, not complete by itself)."""
    return not step.stage.given(spec) and step.stage.complete is None


def previous_index(spec: JobSpec) -> dict[str, Any] | None:
    """The stages of this run folder's last ``run.json``: what the run used before, for the plan's "why"."""
    url = storage.join(spec.storage.url, "run.json")
    return storage.read_json(url).get("stages") if storage.exists(url) else None


def plan(spec: JobSpec) -> tuple[list[Step], RunFolder]:
    """Every stage's key, artifact URL and status; nothing is written."""
    previous = previous_index(spec)
    run_folder = RunFolder(run_url=spec.storage.url, store_url=spec.storage.store_url)
    keys: dict[str, str] = {}
    steps: list[Step] = []
    rebuilt: set[str] = set()
    for stage in stage_defs.STAGES:
        values = inputs(stage, spec)
        upstream = {u: keys[u] for u in stage.upstream}
        key = keys[stage.name] = content_key(stage, values, upstream)
        step = Step(stage, key, values, upstream, _location(stage, key, spec, run_folder))
        run_folder.record(stage.name, step.url, given=stage.given(spec))
        step.status, step.why = _status(step, spec, previous, rebuilt)
        if not step.done:
            rebuilt.add(stage.name)
        steps.append(step)
    check_inputs(steps)
    return steps, run_folder


def check_inputs(steps: list[Step]) -> None:
    """Verify the finished artifacts that the stages about to run will read (their upstream, transitively).

    A corrupt one is never loaded: it is marked to be made again (a training stage writes its student
    again from its last checkpoint), with a warning naming the file. Artifacts nothing will read are not read.
    """
    by_name = {s.name: s for s in steps}
    read = {u.name for s in steps if not s.done for u in _upstream_closure(s, by_name)}  # transitive already
    for up in steps:
        if up.name in read and up.done and (problem := corrupt_file(up.url)) is not None:
            log.warning("stage %s: %s; it is made again", up.name, problem)
            up.status, up.why = "will run", f"corrupt: {problem}"


def _upstream_closure(step: Step, by_name: dict[str, Step]) -> list[Step]:
    seen: set[str] = set()
    todo = list(step.stage.upstream)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += by_name[name].stage.upstream
    return [by_name[name] for name in seen]


def write_index(spec: JobSpec, run_folder: RunFolder, steps: list[Step], made: Collection[str] = ()) -> None:
    """``run.json``: stage -> key -> artifact URL (with its inputs and status), and the spec that ran.

    ``made_here``: this invocation made the artifact (``made``), rather than finding it done; runs
    sharing a store (sweep trials) can tell from it which one made a shared artifact.
    """
    storage.write_json(run_folder.index, {
        "name": spec.name,
        "updated": _now(),
        **run_folder.header(),
        "spec": spec.public_dump(),
        "stages": {s.name: {"key": s.key, "url": s.url, "status": "done" if s.done else "pending",
                            "made_here": s.name in made, "inputs": s.inputs, "upstream": s.upstream} for s in steps},
    })


def save_spec(spec: JobSpec, run_folder: RunFolder) -> None:
    """``spec.yaml`` beside the index (secrets redacted). A changed spec replaces it; the old one is kept as
    ``spec.<UTC time>.yaml``."""
    url, text = run_folder.spec_file, spec.to_yaml(public=True)
    if storage.exists(url):
        old = storage.read_bytes(url)
        if yaml.safe_load(old) == yaml.safe_load(text):  # the same values, whatever the order of the fields
            return
        kept = run_folder.run(f"spec.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.yaml")
        storage.write_bytes(kept, old)
        log.info("the spec changed since this run's last start; the old one is kept as %s", kept)
    storage.write_bytes(url, text.encode())


def publish(run_folder: RunFolder, steps: list[Step]) -> None:
    """Copy each artifact its stage publishes from the store into the run folder, where a person looks for it."""
    for step in steps:
        if step.stage.publish is not None:
            target = run_folder.run(step.stage.publish)
            storage.remove(target)
            storage.copy_tree(step.url, target)


def _checksums(folder: str, written: dict[str, str]) -> dict[str, str]:
    """name -> sha256 of every file of the artifact: as written here, as a training stage's worker
    wrote them (listed in its manifest, which is hashed here), and, for a file whose
    checksum did not come back from the process that wrote it, as stored now (with a warning):
    a file without one would never be checked for corruption. The checkpoints are not part of the
    artifact (each carries its own checksums)."""
    prefix = folder.rstrip("/") + "/"
    files = {url[len(prefix):]: digest for url, digest in written.items() if url.startswith(prefix)}
    manifest = storage.join(folder, MANIFEST_FILE)
    if MANIFEST_FILE not in files and storage.exists(manifest):
        listed = storage.read_bytes(manifest)
        files |= {**json.loads(listed).get("files", {}), MANIFEST_FILE: storage.sha256(listed)}
    unrecorded = [name for name in storage.files(folder) if name not in files and name != MARKER_FILE
                  and not name.startswith(CHECKPOINTS + "/")]
    if unrecorded:
        log.warning("%s: no checksum came back for %s as it was written; hashing it as stored", folder, ", ".join(unrecorded))
        files |= {name: storage.checksum(storage.join(folder, name)) for name in unrecorded}
    return dict(sorted(files.items()))


def execute(spec: JobSpec, run_folder: RunFolder, step: Step, report_interval: int | None = None) -> float:
    """Run one stage and mark its artifact done (``stage.json``, written last, with its files' checksums); returns seconds."""
    log.info("stage %s: running%s", step.name, f" ({step.why})" if step.why else "")
    marked = _marked(step, spec)
    if marked:
        storage.remove(storage.join(step.url, MARKER_FILE))  # a corrupt artifact being made again is not done meanwhile
    t0 = time.perf_counter()
    with storage.recording() as written:
        summary = step.stage.run(StageContext(spec, run_folder, step, report_interval))
    seconds = time.perf_counter() - t0
    if marked:
        storage.write_json(storage.join(step.url, MARKER_FILE), {
            "stage": step.name, "key": step.key, "version": step.stage.version, "inputs": step.inputs,
            "upstream": step.upstream, "summary": summary, "seconds": round(seconds, 1), "finished": _now(),
            "made_by": {"name": spec.name, "run": spec.storage.url}, "files": _checksums(step.url, written),
        })
    step.status, step.why = "done", ""
    log.info("stage %s: done in %.0fs", step.name, seconds)
    return seconds


def make(spec: JobSpec, run_folder: RunFolder, step: Step, guard: Guard | None = None,
         report_interval: int | None = None) -> float | None:
    """Make ``step``'s artifact under ``guard``; returns seconds, or None when another run made it meanwhile.

    Inside the guard the status is checked again: a run that waited for the guard while another made
    the artifact finds it done and does not make it twice; one whose artifact is there but corrupt
    still makes it.
    """
    with guard(step) if guard is not None else nullcontext():
        if guard is not None:
            step.status, step.why = _status(step, spec, None, set())
            if step.done and (problem := corrupt_file(step.url)) is not None:
                step.status, step.why = "will run", f"corrupt: {problem}"
        if step.done:
            log.info("stage %s: made meanwhile by another run (%s)", step.name, step.why or "this store")
            return None
        return execute(spec, run_folder, step, report_interval)


def run_pipeline(
    spec: JobSpec,
    *,
    dry_run: bool = False,
    before_work: Callable[[], None] | None = None,
    guard: Guard | None = None,
    report_interval: int | None = None,
) -> dict[str, float]:
    """Plan, print the plan, and run every stage that is not done; returns seconds per stage run.

    ``before_work`` is called once, before the first stage that runs (``raptor run`` connects to
    Ray there, so a finished job re-runs without starting a cluster). ``guard``: entered around each
    stage that is not done; inside it the stage's status is checked again, so a stage another run
    made while this one waited is not made twice. ``report_interval``: how often training stages
    send their metrics while they train (a sweep trial's scheduler reads them).
    """
    spec = absolute_paths(spec)
    storage.set_patience(spec.storage.patience)
    for stage in stage_defs.STAGES:
        stage.check(spec)
    steps, run_folder = plan(spec)
    log.info("plan for %s (store %s):\n%s", spec.name, run_folder.store_url, render_table(steps))
    missing = [s for s in steps if s.status == "missing"]
    if missing:
        raise UserError(missing[0].why)
    if dry_run:
        return {}
    storage.makedirs(run_folder.run_url)
    save_spec(spec, run_folder)
    write_index(spec, run_folder, steps)
    timings: dict[str, float] = {}
    for step in steps:
        if step.done:
            continue
        if before_work is not None:
            before_work()
            before_work = None
        if (seconds := make(spec, run_folder, step, guard, report_interval)) is not None:
            timings[step.name] = seconds
        write_index(spec, run_folder, steps, made=timings)
    publish(run_folder, steps)
    return timings
