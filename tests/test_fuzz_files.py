"""Bad file contents, fuzzed: every command that reads a user's file turns a bad one into one line naming it.

tests/test_fuzz.py fuzzes specs, overrides and arguments; this file fuzzes what is INSIDE the files
the commands read: distance matrices (``raptor maxcut``), dataset info files, sample-count caches and
tar shards (``raptor shards info``, ``raptor data bench``), list files (``raptor shards list``),
teacher checkpoints and student exports (the loaders every stage and ``raptor analyze`` use), and a
finished run's index, markers and artifacts (``raptor analyze``). Property-based (hypothesis,
derandomized): random bytes, truncated valid files, valid JSON of the wrong shape, ``.npy`` arrays
with NaN/inf/the wrong dims or dtype, safetensors headers that lie, a ``.pth`` that is not a state
dict. The invariant is the CLI contract: exit code 0, or 2 with ONE line that names the file, never
a traceback (exit code 1).
"""

from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raptor import storage
from raptor.errors import UserError
from tests.inprocess import run_cli


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**20) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


def _check(argv: list[str], *names: str) -> str:
    """The contract for one input: exit 0, or 2 with one error line naming one of ``names``."""
    code, out, err = run_cli(argv)
    printed = out + err
    assert "Traceback" not in printed, f"{argv}: a traceback\n{printed[-3000:]}"
    assert code in (0, 2), f"{argv}: exit code {code}\n{printed[-3000:]}"
    if code == 0:
        return ""
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and re.match(r"raptor( [\w-]+)*: error: \S", errors[0]), f"{argv}: {err[-2000:]}"
    assert any(n in errors[0] for n in names), f"{argv}: the error does not name {names}: {errors[0]}"
    return errors[0]


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def _mangled(valid: bytes) -> st.SearchStrategy[bytes]:
    """``valid`` truncated, with bytes overwritten, or replaced by random bytes."""
    cut = st.integers(0, len(valid)).map(lambda n: valid[:n])
    flip = st.tuples(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=8)).map(
        lambda p: valid[: p[0]] + p[1] + valid[p[0] + len(p[1]):])
    return st.one_of(cut, flip, st.binary(max_size=300))


# ---------------------------------------------------------------- raptor maxcut


def test_maxcut_nan_matrix_is_one_line_naming_the_file(tmp_path):
    """Catches the reported bug: a NaN in the matrix reached the user as segment()'s
    ``ValueError: distances contain NaN or inf`` traceback (exit 1), not one line naming the file."""
    d = np.random.default_rng(0).random((6, 6))
    d[1, 2] = np.nan
    path = tmp_path / "D.npy"
    np.save(path, d)
    code, _, err = run_cli(["maxcut", str(path), "--k", "3"])
    assert code == 2 and err.strip() == f"raptor maxcut: error: {path}: the distances contain NaN or infinity"


@pytest.mark.parametrize("array", [np.array([["a", "b"], ["c", "d"]]), np.ones((3, 3), complex), np.zeros((0, 0)),
                                   np.full((4, 4), 1e308)], ids=["strings", "complex", "empty", "overflow"])
def test_maxcut_rejects_matrices_it_cannot_segment(tmp_path, array):
    """Catches a string matrix crashing in float conversion (ValueError traceback), a complex one
    silently losing its imaginary part, an empty one blamed on --k, and values whose sums overflow
    printed as ``objective nan`` (or crashing the report's plot)."""
    path = tmp_path / "D.npy"
    path.write_bytes(_npy(array))
    assert _check(["maxcut", str(path), "--k", "1"], str(path))


def test_maxcut_npz_archive_is_one_line(tmp_path):
    """Catches an .npz archive (np.load returns an NpzFile) crashing with AttributeError on ``.ndim``."""
    path = tmp_path / "D.npy"
    buf = io.BytesIO()
    np.savez(buf, d=np.zeros((3, 3)))
    path.write_bytes(buf.getvalue())
    assert "an .npz archive" in _check(["maxcut", str(path), "--k", "2"], str(path))


ARRAYS = st.one_of(
    st.tuples(st.integers(0, 5), st.integers(0, 5)).flatmap(
        lambda s: st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e308]),
                           min_size=s[0] * s[1], max_size=s[0] * s[1]).map(lambda v: np.array(v).reshape(s))),
    st.sampled_from([np.zeros(4), np.zeros((2, 2, 2)), np.float64(1.0), np.ones((3, 3), bool), np.ones((3, 3), np.int8),
                     np.array([[1, "a"], [2, 3]], dtype=object), np.zeros((3, 3), dtype=[("a", "f4")]),
                     np.array([[np.datetime64("2024-01-01")]]), np.ones((2, 2), np.float16)]),
)


def test_maxcut_file_contents_fail_in_one_line(tmp_path):
    """Catches any .npy content (NaN/inf, wrong dims or dtype, object arrays, truncated or random
    bytes) that crashes ``raptor maxcut`` instead of one line naming the file."""
    path = tmp_path / "D.npy"
    valid = _npy(np.random.default_rng(1).random((5, 5)))

    @fuzz(40)
    @given(st.one_of(ARRAYS.map(_npy), _mangled(valid)), st.integers(1, 3), st.sampled_from(["dp", "bisection"]))
    def prop(data: bytes, k: int, method: str) -> None:
        path.write_bytes(data)
        _check(["maxcut", str(path), "--k", str(k), "--method", method, "--baseline", "2"], str(path))

    prop()


# ---------------------------------------------------------------- shard sets


def _tar(n: int = 2) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for ext, data in (("jpg", b"not a jpeg"), ("cls", b"1")):
                member = tarfile.TarInfo(f"s{i}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return buf.getvalue()


def _info_files() -> st.SearchStrategy[Any]:
    """Info files that are nearly right: raptor's and timm's shapes with one value replaced, or any JSON."""
    raptor = {"format": "raptor-shards/1", "prefix": "train", "num_classes": 2, "total": 2,
              "shards": [{"name": "train-0000.tar", "samples": 2}]}
    timm = {"splits": [{"name": "train", "filenames": ["train-0000.tar"], "shard_lengths": [2], "num_samples": 2}],
            "num_classes": 2}

    def mutate(base: dict, draw_key: str, value: Any) -> dict:
        out = json.loads(json.dumps(base))
        out[draw_key] = value
        return out

    return st.one_of(
        JSON,
        st.tuples(st.sampled_from(list(raptor)), JSON).map(lambda kv: mutate(raptor, *kv)),
        st.tuples(st.sampled_from(list(timm)), JSON).map(lambda kv: mutate(timm, *kv)),
        JSON.map(lambda v: mutate(raptor, "shards", [{"name": v, "samples": 2}])),
        JSON.map(lambda v: mutate(timm, "splits", {"train": v})),
    )


def test_shard_set_files_fail_in_one_line(tmp_path):
    """Catches an ``_info.json``, ``_raptor_counts.json`` or tar shard whose content crashes
    ``raptor shards info`` (a TypeError on an unchecked num_classes, a ShardUnavailableError after
    seconds of retries for a listed shard that is not there) instead of one line naming the file."""
    folder = tmp_path / "ds"
    folder.mkdir()
    tar = _tar()

    @fuzz(40)
    @given(st.one_of(st.none(), _info_files().map(lambda v: json.dumps(v).encode()), st.binary(max_size=40)),
           st.one_of(st.none(), JSON.map(lambda v: json.dumps({"format": "raptor-counts/1", "shards": v}).encode()),
                     st.binary(max_size=20)),
           _mangled(tar), st.booleans())
    def prop(info: bytes | None, counts: bytes | None, shard: bytes, count: bool) -> None:
        for name, data in (("_info.json", info), ("_raptor_counts.json", counts)):
            (folder / name).unlink(missing_ok=True)
            if data is not None:
                (folder / name).write_bytes(data)
        (folder / "train-0000.tar").write_bytes(shard)
        _check(["shards", "info", str(folder), "--json", *(["--count"] if count else [])], str(folder))

    prop()


@pytest.mark.parametrize("case", ["missing shard", "no usable sample", "num_classes text"])
def test_data_bench_bad_shard_sets_fail_in_one_line(tmp_path, case):
    """Catches ``raptor data bench`` ending in a traceback for a listed shard that is not there
    (ShardUnavailableError, after seconds of retries), shards with no usable sample
    (ErrorBudgetExceeded) and a timm info file whose num_classes is not a number."""
    folder = tmp_path / "ds"
    folder.mkdir()
    info: dict[str, Any] = {"splits": [{"name": "train", "filenames": ["train-0000.tar"], "num_samples": 2}]}
    if case != "missing shard":
        (folder / "train-0000.tar").write_bytes(_tar())
    if case == "num_classes text":
        info["num_classes"] = "ten"
    (folder / "_info.json").write_text(json.dumps(info))
    assert _check(["data", "bench", str(folder), "--batches", "1", "--batch-size", "1", "--workers", "0",
                   "--size", "16"], str(folder))


def test_list_files_fail_in_one_line(tmp_path):
    """Catches a list file that is not UTF-8 text (a UnicodeDecodeError traceback), lines that are
    not ``path<TAB>label``, and images that cannot be re-encoded (PIL's UnidentifiedImageError)."""
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "b.txt").write_bytes(b"text")
    listfile = tmp_path / "files.tsv"
    lines = st.sampled_from(["a.jpg\t1", "b.txt\tcat", "a.jpg", "\t1", "missing.jpg\t0", "a.jpg\t\t", "", "a.jpg\t0"])

    @fuzz(30)
    @given(st.one_of(st.lists(lines, max_size=4).map(lambda ls: "\n".join(ls).encode()), st.binary(max_size=30)),
           st.booleans())
    def prop(data: bytes, reencode: bool) -> None:
        listfile.write_bytes(data)
        _check(["shards", "list", str(listfile), str(tmp_path / "out"), "--overwrite", "--workers", "1",
                *(["--reencode", "80"] if reencode else [])], str(listfile), str(tmp_path))

    prop()


def test_plan_file_of_wrong_shape_is_one_line(tmp_path):
    """Catches an output folder whose ``_plan.json`` is valid JSON but not an object (AttributeError)."""
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "files.tsv").write_text("a.jpg\t0\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_plan.json").write_text("[1, 2]")
    assert "_plan.json" in _check(["shards", "list", str(tmp_path / "files.tsv"), str(tmp_path / "out")], "_plan.json")


# ---------------------------------------------------------------- checkpoints and exports


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Any]:
    """A tiny planted teacher and its student, exported with the real writers."""
    from raptor.models import Raptor, save_student
    from tests import planted

    root = tmp_path_factory.mktemp("models")
    teacher = planted.build_teacher((2, 1), width=32, heads=2, img_size=28)
    teacher.set_head(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), torch.zeros(4))
    student = Raptor.from_teacher(teacher, planted.boundaries_of((2, 1)), init="teacher", seed=0)
    teacher.save(str(root / "teacher.safetensors"))
    save_student(student, str(root / "student.safetensors"))
    return {"root": root, "teacher": teacher, "student": student, "name": planted.NAME,
            "teacher_bytes": (root / "teacher.safetensors").read_bytes(),
            "student_bytes": (root / "student.safetensors").read_bytes()}


def _header(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + n]), data[8 + n:]


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def lying_safetensors(draw, valid: bytes) -> bytes:
    """A valid export whose header lies: a tensor's dtype, shape or offsets, or one metadata value
    (teacher metadata, or a field of the student's manifest) replaced."""
    header, body = _header(valid)
    meta = dict(header.pop("__metadata__"))
    kind = draw(st.sampled_from(["tensor", "metadata", "manifest"] if "manifest" in meta else ["tensor", "metadata"]))
    if kind == "tensor":
        name = draw(st.sampled_from(sorted(header)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name] = {**header[name], field: draw(st.one_of(JSON, st.sampled_from(["I8", "BOOL", "C64", "F64"]),
                                                               st.lists(st.integers(0, 10**6), max_size=3)))}
    elif kind == "metadata":
        meta[draw(st.sampled_from(sorted(meta)))] = draw(st.one_of(st.text(max_size=8), JSON.map(json.dumps)))
    else:
        man = json.loads(meta["manifest"])
        section = draw(st.sampled_from(["student", "layout", "block"]))
        target = man["student"] if section == "student" else man["student"][section]
        key = draw(st.sampled_from(sorted(target)))
        target[key] = draw(st.one_of(JSON, st.integers(-5, 5), st.just(float("inf")), st.just(2**40)))
        meta["manifest"] = json.dumps(man)
    return _with_header({"__metadata__": meta, **header}, body)


def _pth(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


PTH = st.sampled_from([
    _pth({0: torch.zeros(1)}), _pth([torch.zeros(1)]), _pth({"a": 1}), _pth({"model": {"x": 2}}),
    _pth({"mask_token": torch.zeros(1)}), _pth({"weight": torch.zeros(3, 64)}), _pth(torch.zeros(3)),
    _pth({"state_dict": {"module.pos_embed": torch.zeros(1, 2)}}),
])


def test_checkpoint_and_export_contents_raise_user_errors(models):
    """Catches a teacher checkpoint or student export whose content escapes the loaders as a
    non-raptor error (KeyError/TypeError/JSONDecodeError from a lying manifest, AttributeError on a
    ``.pth`` with integer keys, CheckpointError that was a plain ValueError): each must load or raise
    a UserError naming the file, which the CLI shows as one line."""
    from raptor.models import load_student
    from raptor.train.settings import TeacherSettings

    teacher, path = models["teacher"], models["root"] / "fuzzed"
    ref = TeacherSettings(name=models["name"], img_size=28, checkpoint=str(path), model_kwargs=teacher.model_kwargs)

    @fuzz(25)
    @given(st.one_of(lying_safetensors(models["teacher_bytes"]), lying_safetensors(models["student_bytes"]),
                     _mangled(models["student_bytes"]), PTH), st.sampled_from(["teacher", "student"]))
    def prop(data: bytes, reader: str) -> None:
        path.write_bytes(data)
        try:
            ref.load() if reader == "teacher" else load_student(str(path), teacher)
        except UserError as e:
            assert str(path) in str(e), e

    prop()


# ---------------------------------------------------------------- raptor analyze


@pytest.fixture(scope="module")
def run_folder(models, tmp_path_factory) -> dict[str, str]:
    """A finished run (teacher given, distances, discovery, stage 2, probe) written with the real writers."""
    from raptor.data import synthetic_source, write_shards
    from raptor.models import save_student
    from raptor.service.engine.pipeline import plan, save_spec, write_index
    from raptor.service.spec import parse_spec

    root = str(tmp_path_factory.mktemp("analyze"))
    teacher = models["teacher"]
    write_shards(synthetic_source(8, num_classes=4, size=32, seed=1), f"{root}/data", prefix="val", max_samples=8)
    spec = parse_spec({
        "name": "fuzz", "storage": {"url": f"{root}/run"},
        "teacher": {"name": models["name"], "img_size": 28, "checkpoint": str(models["root"] / "teacher.safetensors"),
                    "model_kwargs": teacher.model_kwargs},
        "data": {"train": f"{root}/data", "val": f"{root}/data", "batch_size": 8},
        "discovery": {"k": 2}, "stage1": {"steps": 1}, "stage2": {"steps": 1},
    })
    steps, layout = plan(spec)
    storage.write_bytes(layout.distances, _npy(np.random.default_rng(0).random((3, 3))))
    storage.write_json(layout.segmentation, {"boundaries": [2], "metric": "cosine", "k": 2})
    save_student(models["student"], layout.student("stage2"))
    storage.write_json(layout.probe, {"teacher": {"top1": 0.8, "top5": 0.95}, "student": {"top1": 0.7, "top5": 0.9},
                                      "student_share": 0.7 / 0.8})
    for step in steps:
        if step.name in ("distances", "discovery", "stage2", "probe"):
            step.status = "done"
    save_spec(spec, layout)
    write_index(spec, layout, steps)
    return {"root": root, "run": layout.run_url, "index": layout.index, "distances": layout.distances,
            "segmentation": layout.segmentation, "student": layout.student("stage2"),
            "marker": layout.marker("discovery"), "probe": layout.probe}


def test_analyze_run_files_fail_in_one_line(run_folder, models):
    """Catches a run whose index (run.json with numbers for paths: TypeError), stage marker (a list:
    AttributeError), segmentation (no boundaries: KeyError), probe results (no student_share: a
    pydantic error), distance matrix (pickled or NaN bytes) or student export crashes ``raptor analyze`` instead of one line naming the file. A draw that
    happens to be valid runs the whole (tiny) analysis, so few examples."""
    index = json.loads(Path(run_folder["index"]).read_text())
    stage = next(iter(index["stages"]))

    def index_with(key: str, value: Any) -> bytes:
        out = json.loads(json.dumps(index))
        if key == "stage":
            out["stages"][stage] = value
        else:
            out[key] = value
        return json.dumps(out).encode()

    bad = st.one_of(
        st.tuples(st.just("index"), st.one_of(st.binary(max_size=20), JSON.map(lambda v: json.dumps(v).encode()),
                                              st.tuples(st.sampled_from(["store", "stages", "teacher_checkpoint", "stage"]),
                                                        JSON).map(lambda kv: index_with(*kv)))),
        st.tuples(st.just("marker"), st.one_of(JSON.map(lambda v: json.dumps(v).encode()),
                                               JSON.map(lambda v: json.dumps({"files": v}).encode()))),
        st.tuples(st.just("segmentation"), JSON.map(lambda v: json.dumps(v).encode())),
        st.tuples(st.just("probe"), JSON.map(lambda v: json.dumps(v).encode())),
        st.tuples(st.just("distances"), st.one_of(ARRAYS.map(_npy), st.binary(max_size=30))),
        st.tuples(st.just("student"), st.one_of(_mangled(models["student_bytes"]), PTH)),
    )

    @fuzz(12)
    @given(bad)
    def prop(case: tuple[str, bytes]) -> None:
        which, data = case
        path = Path(run_folder[which])
        kept = path.read_bytes() if path.exists() else None
        path.write_bytes(data)
        try:
            _check(["analyze", run_folder["run"], "--samples", "4", "--out", f"{run_folder['root']}/out",
                    "--device", "cpu"], run_folder["root"], str(models["root"]))
        finally:
            path.unlink() if kept is None else path.write_bytes(kept)

    prop()
