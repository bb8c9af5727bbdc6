"""The stage graph without training: which keys a spec change moves, the plan's status and its "why".

The end-to-end tests (tests/test_service.py) show the same behaviour on real runs; these pin the
rules down exactly and in seconds. Which stages a change makes again is derived from the graph
(the stages that read the field, and everything after them), so a new stage needs no edit here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from raptor import storage
from raptor.service import stages
from raptor.service.engine.graph import Stage, content_key, downstream, inputs, registry
from raptor.service.engine.pipeline import plan, write_index
from raptor.service.spec import JobSpec, apply_overrides, parse_spec
from raptor.service.stages import BY_NAME, NOT_INPUTS, STAGES

ROOT = Path(__file__).resolve().parents[1]
ORDER = [s.name for s in STAGES]


def _spec(tmp_path: Path, *overrides: str) -> JobSpec:
    raw = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    raw["storage"]["url"] = str(tmp_path / "run")
    raw["data"].update(train=str(tmp_path / "data" / "train"), val=str(tmp_path / "data" / "val"))
    return parse_spec(apply_overrides(raw, list(overrides)))


def _keys(spec: JobSpec) -> dict[str, str]:
    return {s.name: s.key for s in plan(spec)[0]}


def _moved(tmp_path: Path, *overrides: str) -> list[str]:
    before, after = _keys(_spec(tmp_path)), _keys(_spec(tmp_path, *overrides))
    return [name for name in after if before[name] != after[name]]  # in the order the stages run


def _readers(before: JobSpec, after: JobSpec) -> list[str]:
    """The stages whose own inputs differ between the two specs (not counting their upstream)."""
    return [s.name for s in STAGES if inputs(s, before) != inputs(s, after)]


@pytest.mark.parametrize(
    "overrides, readers",
    [
        (["stage2.lr=0.002"], ["stage2"]),
        (["teacher.drop_path_rate=0.2"], ["teacher"]),
        (["stage1.lambda_rho=0.5"], ["stage1"]),
        (["discovery.k=4"], ["discovery"]),  # the distances are shared over k
        (["discovery.metric=cka"], ["distances"]),
        (["scaling.num_workers=4"], ["stage1", "stage2"]),  # the effective batch; not the teacher
        (["probe.epochs=2"], ["probe"]),
        (["data.distill_transform=centre"], ["stage1", "stage2"]),  # the teacher keeps its augmentation
        (["teacher.train.seed=7"], ["teacher"]),
        (["data.seed=3"], ["teacher", "stage1", "stage2", "probe"]),  # seeds the teacher too
        (["logging.log_interval=7", "logging.val_interval=9", "storage.keep=5", "storage.checkpoint_interval=3",
          "name=renamed", "deepspeed.zero_stage=3", "scaling.max_failures=0", "cluster.gpus_per_node=4",
          "storage.patience=30", "stage1.max_nonfinite_steps=0", "stage2.max_nonfinite_steps=3"], []),
    ],
)
def test_a_change_moves_exactly_the_keys_of_the_stages_that_read_it(tmp_path, overrides, readers):
    """Catches a stage that misses an input (stale artifact reused) or reads one it should not (needless
    recompute): exactly ``readers`` see the change in their own inputs, and exactly they and the stages
    downstream of them (derived from the graph) get new keys."""
    assert _readers(_spec(tmp_path), _spec(tmp_path, *overrides)) == readers
    assert _moved(tmp_path, *overrides) == downstream(STAGES, readers)


def test_a_teacher_with_its_own_seed_is_shared_across_data_seeds(tmp_path):
    """Catches a teacher keyed on data.seed after teacher.train.seed took over its seeding (a sweep over
    student seeds would retrain one identical teacher per seed)."""
    base, seeded = _spec(tmp_path, "teacher.train.seed=0"), _spec(tmp_path, "teacher.train.seed=0", "data.seed=3")
    before, after = _keys(base), _keys(seeded)
    assert _readers(base, seeded) == ["stage1", "stage2", "probe"]
    assert [n for n in ORDER if before[n] != after[n]] == downstream(STAGES, ["stage1", "stage2", "probe"])


def test_explicit_defaults_and_implicit_ones_give_the_same_keys(tmp_path):
    """Catches keys over the YAML text instead of the validated values: writing a default out must not recompute."""
    spelled = _spec(tmp_path, "stage2.weight_decay=0.0001", "stage2.token_weights={cls: 0.45, reg: 0.1, patch: 0.45}",
                    "discovery.method=dp", "student.mlp=swiglu", "data.error_budget=0.01")
    assert _keys(spelled) == _keys(_spec(tmp_path))


def test_a_global_batch_keys_the_training_stages_instead_of_the_worker_count(tmp_path):
    """Catches data.global_batch_size ignored by the keys (a changed optimizer batch would reuse a student
    trained with another); with it, a key that still follows scaling.num_workers (a stage re-run on
    fewer workers after a node loss would start again instead of resuming); and, unset, keys that
    move from the ones every existing store was made with."""
    base = _spec(tmp_path)
    assert "data.global_batch_size" not in BY_NAME["stage1"].fields(base)
    batched = _spec(tmp_path, f"data.global_batch_size={2 * base.effective_batch}")
    assert [n for n in ORDER if _keys(base)[n] != _keys(batched)[n]] == downstream(STAGES, ["stage1"])
    resized = _spec(tmp_path, f"data.global_batch_size={2 * base.effective_batch}",
                    f"scaling.num_workers={2 * base.scaling.num_workers}")
    assert _keys(resized) == _keys(batched)
    assert _keys(_spec(tmp_path, f"scaling.num_workers={2 * base.scaling.num_workers}"))["stage1"] != _keys(base)["stage1"]


def test_a_given_teacher_checkpoint_is_its_own_identity(tmp_path):
    """Catches a given teacher keyed by training settings it never used (drop-path would recompute everything)."""
    base = _spec(tmp_path, f"teacher.checkpoint={tmp_path}/t.safetensors")
    assert _keys(base) == _keys(_spec(tmp_path, f"teacher.checkpoint={tmp_path}/t.safetensors", "teacher.drop_path_rate=0.3"))
    assert _keys(base)["teacher"] != _keys(_spec(tmp_path, f"teacher.checkpoint={tmp_path}/other.safetensors"))["teacher"]


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = next((t for t in (field.annotation, *typing.get_args(field.annotation))
                    if isinstance(t, type) and issubclass(t, BaseModel)), None)
        out += _leaves(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return out


def test_every_spec_field_is_an_input_or_says_why_not(tmp_path):
    """Catches a new spec field that no stage keys on and nobody decided about: its changes would be silently ignored."""
    read: set[str] = set()
    for spec in (_spec(tmp_path), _spec(tmp_path, f"teacher.checkpoint={tmp_path}/t.safetensors"),
                 _spec(tmp_path, "data.global_batch_size=64")):
        for stage in STAGES:
            read |= set(stage.fields(spec)) | set(stage.ignores)
    covered = read | set(NOT_INPUTS)
    missing = [f for f in _leaves(JobSpec) if not any(f == c or f.startswith(c + ".") for c in covered)]
    assert missing == []
    assert all(reason for s in STAGES for reason in s.ignores.values()) and all(NOT_INPUTS.values())


def test_key_is_over_inputs_and_upstream_keys():
    """Catches a key that ignores its upstream: a new teacher must move the distances' key though their own fields agree."""
    stage = BY_NAME["distances"]
    values = {"discovery.metric": "cosine"}
    assert content_key(stage, values, {"teacher": "a"}) != content_key(stage, values, {"teacher": "b"})
    assert content_key(stage, values, {"teacher": "a"}) == content_key(stage, dict(values), {"teacher": "a"})
    assert len(content_key(stage, values, {})) == 16


def _finish(spec: JobSpec, upto: str) -> None:
    """Pretend a run finished every stage up to ``upto``: each keyed folder gets its marker, the generated
    data folders their info files, and run.json is written."""
    steps, run_folder = plan(spec)
    for step in steps:
        if step.stage.complete is not None:  # the data folders: complete with their _info.json
            for folder in ("train", "val"):
                storage.write_json(str(Path(spec.data.train).parent / folder / "_info.json"), {})
        elif not step.done:
            storage.write_json(storage.join(step.url, "stage.json"), {"made_by": {"name": spec.name, "run": spec.storage.url}})
            step.status = "done"
        if step.name == upto:
            break
    write_index(spec, run_folder, plan(spec)[0])


def _plan(spec: JobSpec) -> dict[str, tuple[str, str]]:
    return {s.name: (s.status, s.why) for s in plan(spec)[0]}


def test_plan_says_what_runs_and_which_field_changed(tmp_path):
    """Catches a dry-run that cannot say why a stage runs (the "make -n" of a run)."""
    spec = _spec(tmp_path)
    assert _plan(spec)["teacher"] == ("will run", "not made yet")
    _finish(spec, ORDER[-1])
    assert {s for s, (status, _) in _plan(spec).items()} == set(ORDER)
    assert all(status == "done" for status, _ in _plan(spec).values())

    changed = _plan(_spec(tmp_path, "stage2.lr=0.002"))
    assert changed["stage1"][0] == "done"
    assert changed["stage2"] == ("will run", "stage2.lr: 0.001 -> 0.002")
    assert changed["probe"] == ("will run", "upstream stage2 changed")
    assert changed["report"] == ("will run", "upstream stage2, probe changed")

    teacher = _plan(_spec(tmp_path, "teacher.drop_path_rate=0.3"))
    assert teacher["teacher"] == ("will run", "teacher.drop_path_rate: 0.1 -> 0.3")
    assert [s for s, (status, _) in teacher.items() if status != "done"] == downstream(STAGES, ["teacher"])


def test_a_folder_without_its_marker_is_not_done_and_checkpoints_mean_resume(tmp_path):
    """Catches a half-written artifact counted as done, and a resume across changed hyperparameters."""
    spec = _spec(tmp_path)
    _finish(spec, "discovery")
    steps, _ = plan(spec)
    stage1 = next(s for s in steps if s.name == "stage1")
    storage.write_json(storage.join(stage1.url, "manifest.json"), {})  # the export, but no stage.json: a crash
    checkpoints = storage.join(stage1.url, "checkpoints")
    storage.write_json(storage.join(checkpoints, "checkpoint_manager_snapshot.json"),
                       {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_step00000050"}})
    storage.makedirs(storage.join(checkpoints, "checkpoint_step00000070"))  # half-written: Ray never registered it
    assert _plan(spec)["stage1"] == ("will resume", "from its checkpoint at step 50")
    other = _plan(_spec(tmp_path, "stage1.lr=0.005"))  # another key: another folder, no checkpoint to continue
    assert other["stage1"] == ("will run", "stage1.lr: 0.002 -> 0.005")


def test_a_store_shared_by_two_runs_reports_the_maker(tmp_path):
    """Catches the plan hiding that an artifact was made by another run (a sweep trial, a colleague's run)."""
    first = _spec(tmp_path, f"storage.store={tmp_path}/store")
    _finish(first, "distances")
    second = _spec(tmp_path, f"storage.store={tmp_path}/store", f"storage.url={tmp_path}/run2", "stage1.lambda_rho=0.5")
    status = _plan(second)
    assert status["teacher"][0] == "done" and "made by run quickstart" in status["teacher"][1]
    assert status["stage1"] == ("will run", "not made yet")


def test_inputs_list_the_fields_with_their_values(tmp_path):
    """Catches inputs that hide what an artifact was made from (run.json and stage.json show them to people)."""
    values = inputs(BY_NAME["stage2"], _spec(tmp_path))
    assert values["stage2.lr"] == 0.001 and values["scaling.num_workers"] == 2 and values["stage2.token_weights.cls"] == 0.45
    assert not any(k.startswith(("logging", "deepspeed.zero_stage")) for k in values)


def _rewrite(path: Path, data: bytes) -> None:
    """Replace a file in place with other bytes of the same size, its mtime moved on (a re-upload)."""
    assert len(data) == path.stat().st_size
    mtime = path.stat().st_mtime
    path.write_bytes(data)
    os.utime(path, (mtime + 5, mtime + 5))


def test_a_given_teacher_replaced_at_the_same_url_moves_every_key_downstream(tmp_path):
    """Catches a given checkpoint identified by its URL alone: a fine-tuned teacher uploaded over the
    old one would reuse distances, boundaries and students made from the old weights."""
    ckpt = tmp_path / "teacher.safetensors"
    ckpt.write_bytes(b"a" * 64)
    spec = _spec(tmp_path, f"teacher.checkpoint={ckpt}")
    _finish(spec, ORDER[-1])
    before = _keys(spec)
    assert all(status == "done" for status, _ in _plan(spec).values())
    _rewrite(ckpt, b"b" * 64)
    after = _keys(spec)
    assert [n for n in ORDER if before[n] != after[n]] == downstream(STAGES, ["teacher"])
    rows = _plan(spec)
    assert rows["teacher"][0] == "done" and "teacher.checkpoint (content): 1 file, 64 B, " in rows["teacher"][1]
    assert rows["distances"] == ("will run", "upstream teacher changed")


def test_given_shards_rewritten_in_place_move_every_key_downstream(tmp_path):
    """Catches external data.train shards identified by URL alone: shards rewritten in place would keep
    the teacher's, the boundaries' and the students' keys."""
    data = tmp_path / "shards"
    data.mkdir()
    for i in range(3):
        (data / f"train-{i:06d}.tar").write_bytes(bytes([i]) * 512)
    spec = _spec(tmp_path, "data.generate=null", f"data.train={data}", f"data.val={data}", "data.val_split=train",
                 "data.train_split=train")
    before = _keys(spec)
    assert _keys(spec) == before  # listing the same files gives the same keys
    _rewrite(data / "train-000001.tar", b"\xff" * 512)
    after = _keys(spec)
    assert [n for n in ORDER if before[n] != after[n]] == downstream(STAGES, ["data"]), (before, after)


def test_a_teacher_reuploaded_to_s3_with_the_same_size_moves_the_key(tmp_path, s3_bucket):
    """Catches an object-store checkpoint identified by URL or size alone: S3's entity tag changes
    with every upload of other bytes, even of the same size."""
    url = f"{s3_bucket}/teachers/t.safetensors"
    storage.write_bytes(url, b"a" * 64)
    spec = _spec(tmp_path, f"teacher.checkpoint={url}")
    before = _keys(spec)
    assert _keys(spec) == before
    storage.write_bytes(url, b"b" * 64)
    assert _keys(spec)["teacher"] != before["teacher"]


def test_a_data_folder_generated_with_other_settings_is_refused_and_kept(tmp_path):
    """Catches the data stage writing over (or silently reusing) a folder that holds a dataset generated
    with other data.generate settings: the plan stops with one line naming the field and the folder,
    and nothing in the folder changes."""
    from raptor.errors import UserError
    from raptor.service.engine.pipeline import execute

    small = "data.generate={train_samples: 24, val_samples: 8, num_classes: 2, image_size: 16}"
    spec = _spec(tmp_path, small)
    steps, run_folder = plan(spec)
    execute(spec, run_folder, steps[0])
    assert _plan(spec)["data"][0] == "done"
    before = {p: p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=rf"data.train: {tmp_path / 'data' / 'train'} holds a dataset generated with other"):
        plan(_spec(tmp_path, small, "data.generate.seed=1"))
    assert {p: p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file()} == before


def test_a_corrupt_artifact_is_made_again_under_a_sweeps_guard(tmp_path):
    """A sweep trial re-checks a stage's status once it holds the stage's lock (another trial may have
    made it meanwhile). Catches that re-check taking a corrupt artifact (stage.json present, a file
    failing its checksum) for one made meanwhile: it would then be loaded instead of made again."""
    from contextlib import nullcontext

    import numpy as np

    from raptor.service.engine.pipeline import execute, make

    spec = _spec(tmp_path, "discovery.k=3")
    steps, run_folder = plan(spec)
    by_name = {s.name: s for s in steps}
    np.save(tmp_path / "d.npy", np.random.default_rng(0).random((12, 12)))
    storage.write_bytes(run_folder.distances, (tmp_path / "d.npy").read_bytes())
    storage.write_json(storage.join(by_name["distances"].url, "stage.json"), {"files": {}})
    execute(spec, run_folder, by_name["discovery"])
    segmentation = Path(run_folder.segmentation)
    segmentation.write_text(segmentation.read_text().replace("[", "[ "))  # same content for JSON, other bytes
    step = by_name["discovery"]
    assert make(spec, run_folder, step, guard=lambda s: nullcontext()) is not None
    assert step.done and storage.read_json(run_folder.segmentation)["boundaries"]
    assert make(spec, run_folder, step, guard=lambda s: nullcontext()) is None  # now whole: found done


# ---------------------------------------------------------------- a stage is a module and a registry line

# A new stage as its own module, the way the stages in raptor/service/stages/ declare themselves: a
# summary of the stage-2 student, keyed on a field of its own and on stage 2.
SUMMARY_MODULE = '''
from raptor import storage
from raptor.service.engine.graph import Stage


def run(ctx):
    student = ctx.run_folder.student("stage2")
    storage.write_json(storage.join(ctx.folder, "summary.json"), {"student": student, "lr": ctx.spec.stage2.lr})
    return {"summarised": student}


STAGE = Stage("summary", reads=("stage2.lr",), upstream=("stage2",), run=run)
'''


@pytest.fixture
def with_summary(tmp_path, monkeypatch) -> Stage:
    """The registry with one more stage: a module written here and one entry added to ``STAGES``."""
    path = tmp_path / "summary_stage.py"
    path.write_text(SUMMARY_MODULE)
    loaded = importlib.util.spec_from_file_location("summary_stage", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    monkeypatch.setattr(stages, "STAGES", registry((*STAGES, module.STAGE)))
    monkeypatch.setattr(stages, "BY_NAME", {s.name: s for s in stages.STAGES})
    return module.STAGE


def test_a_stage_added_as_a_module_and_a_registry_line_is_planned_keyed_and_run(tmp_path, with_summary, capsys):
    """Catches the engine knowing its stages by name (a branch per stage, a hard-coded list of artifacts):
    a stage declared in a module of its own and added to the registry must get a key over its reads and
    its upstream (leaving every other key as it was), a row in `raptor run --dry-run`, and be made
    (stage.json with its checksums) by `raptor run` exactly once, with nothing else in the engine edited."""
    from raptor.cli import main
    from raptor.service.engine.pipeline import run_pipeline

    spec = _spec(tmp_path)
    keys = _keys(spec)
    assert list(keys) == [*ORDER, "summary"]
    assert {n: k for n, k in keys.items() if n != "summary"} == {s.name: s.key for s in _plan_with(STAGES, spec)}
    steps = {s.name: s for s in plan(spec)[0]}
    summary = steps["summary"]
    assert summary.upstream == {"stage2": keys["stage2"]} and summary.inputs == {"stage2.lr": 0.001}
    assert summary.url == storage.join(spec.storage.store_url, "summary", summary.key)
    assert (summary.status, summary.why) == ("will run", "not made yet")

    graph = stages.STAGES
    assert _moved(tmp_path, "stage2.lr=0.002") == downstream(graph, ["stage2", "summary"])
    assert _moved(tmp_path, "probe.epochs=2") == downstream(graph, ["probe"]) and "summary" not in downstream(graph, ["probe"])
    assert _moved(tmp_path, "teacher.drop_path_rate=0.2")[-1] == "summary"  # everything after the teacher

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    assert main(["run", str(spec_file), "--dry-run"]) == 0
    rows = [line.split() for line in capsys.readouterr().err.splitlines() if line.startswith("summary ")]
    assert rows == [["summary", summary.key[:12], "will", "run", "not", "made", "yet"]]

    _finish(spec, ORDER[-1])
    assert [s.name for s in plan(spec)[0] if not s.done] == ["summary"]
    assert list(run_pipeline(spec)) == ["summary"]
    marker = storage.read_json(storage.join(summary.url, "stage.json"))
    assert marker["stage"] == "summary" and marker["key"] == summary.key and list(marker["files"]) == ["summary.json"]
    assert storage.read_json(storage.join(summary.url, "summary.json"))["lr"] == 0.001
    assert all(s.done for s in plan(spec)[0]) and run_pipeline(spec) == {}
    assert storage.read_json(storage.join(spec.storage.url, "run.json"))["stages"]["summary"]["url"] == summary.url


def _plan_with(graph: tuple[Stage, ...], spec: JobSpec):
    """The plan of ``spec`` over ``graph`` instead of the registry."""
    kept = stages.STAGES
    stages.STAGES = graph
    try:
        return plan(spec)[0]
    finally:
        stages.STAGES = kept


def _stage_names_in(source: str, names: list[str]) -> list[str]:
    """The stage names ``source`` mentions (code, strings and docstrings alike), module paths of imports aside."""
    text = re.sub(r"^\s*(from\s+[\w.]+\s+import|import\s+[\w.]+)", "", source, flags=re.M)
    return [n for n in names if re.search(rf"\b{re.escape(n)}\b", text)]


def test_the_engine_names_no_stage():
    """Catches a stage-name branch back in the engine (``if step.name == "data"``, ``step.name in
    ("stage1", "stage2")``, ``run_folder.report``): what differs between stages must come from their
    declarations, or adding a stage means editing the pipeline again."""
    names = [s.name for s in STAGES]
    assert _stage_names_in('if step.name == "data":\n    return folders["report"]', names) == ["data", "report"]
    assert _stage_names_in("from raptor.data.shards import dataset_folder\n", names) == []
    engine = ROOT / "raptor" / "service" / "engine"
    for module in ("pipeline.py", "graph.py"):
        assert _stage_names_in((engine / module).read_text(), names) == [], module


def test_each_stage_is_one_module_in_the_registry():
    """Catches a module that holds two stages again (as discovery once held the distances too), and a stage
    module left out of the registry (its artifact would never be made): each module of
    raptor/service/stages/ declares at most one stage, named after the module, and the registry holds
    exactly those."""
    declared = {}
    for path in sorted((ROOT / "raptor" / "service" / "stages").glob("*.py")):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"raptor.service.stages.{path.stem}")
        found = [v for v in vars(module).values() if isinstance(v, Stage)]
        assert len(found) <= 1, f"{path.name} declares {len(found)} stages"
        if found:
            assert found[0] is getattr(module, "STAGE") and found[0].name == path.stem, path.name
            declared[path.stem] = found[0]
    assert sorted(declared) == sorted(ORDER) and all(declared[s.name] is s for s in STAGES)


def test_the_registry_refuses_a_stage_before_what_it_consumes():
    """Catches a registry entry put in the wrong place or twice: the plan would key a stage before its
    upstream has a key (a KeyError mid-plan) or make one artifact under two declarations."""
    with pytest.raises(ValueError, match="'distances' consumes teacher, which no stage before it makes"):
        registry([BY_NAME["data"], BY_NAME["distances"], BY_NAME["teacher"]])
    with pytest.raises(ValueError, match="'data' is declared twice"):
        registry([BY_NAME["data"], BY_NAME["data"]])
    assert registry(STAGES) == STAGES
