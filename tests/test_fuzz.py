"""Bad input, fuzzed: mutated job specs and command lines give one line and exit code 2, never a traceback.

Property-based (hypothesis): each property draws mutations of a valid spec (a field given the wrong
type, a value out of range, NaN, infinity or a huge number; an unknown field; a required one
deleted; a section nested wrongly; the YAML text broken) or an argument list for every command,
and runs the real ``raptor`` entry point in this process. The invariant is the CLI contract:
exit code 0 (the input happened to be valid) or 2 with the error on ONE line that names the
field or argument (``raptor run: error: ...``), never a traceback (exit code 1). Commands that
would start real work when the draw is valid are kept cheap: ``run`` always gets ``--dry-run``,
``submit`` an address where nothing listens, ``teacher train``/``analyze`` only inputs that
cannot start training. Every draw runs in a scratch directory, so nothing lands in the repo.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.inprocess import run_cli

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None)
STATS = {"inputs": 0, "rejected": 0, "accepted": 0}  # reported by the table in docs/reliability.md

# values of every wrong kind a YAML spec can hold
BAD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.just("x" * 5000),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from(["-1", "1e999", ".nan", "[1, 2]", "{a: 1}", "s3://", "ftp://x/y", "", " ", "\x00", "../../etc"]),
)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    """What the properties fed in, for the table in docs/reliability.md (``pytest -s``); printed whichever of them ran."""
    yield
    print(f"fuzzed inputs: {STATS['inputs']}, rejected in one line: {STATS['rejected']}, valid: {STATS['accepted']}")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> dict[str, Any]:
    """A valid spec (the quickstart's, pointing into a scratch folder) and files of every broken kind."""
    root = tmp_path_factory.mktemp("fuzz")
    raw = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    raw["storage"]["url"] = str(root / "run")
    raw["data"].update(train=str(root / "data" / "train"), val=str(root / "data" / "val"))
    files = {"valid": root / "valid.yaml", "broken": root / "broken.yaml", "list": root / "list.yaml",
             "empty": root / "empty.yaml", "missing": root / "missing.yaml"}
    files["valid"].write_text(yaml.safe_dump(raw))
    files["broken"].write_text("name: [unclosed\nteacher: {")
    files["list"].write_text("- 1\n- 2\n")
    files["empty"].write_text("")
    (root / "run-empty").mkdir()
    (root / "run-broken").mkdir()
    (root / "run-broken" / "run.json").write_text("{not json")
    (root / "run-stageless").mkdir()
    (root / "run-stageless" / "run.json").write_text(json.dumps({"store": str(root / "store"), "stages": {}}))
    np.save(root / "square.npy", np.random.default_rng(0).random((6, 6)))
    np.save(root / "flat.npy", np.zeros(5))
    (root / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    return {"root": root, "raw": raw, "files": {k: str(v) for k, v in files.items()},
            "runs": [str(root / n) for n in ("run-empty", "run-broken", "run-stageless", "no-such-run")],
            "npy": [str(root / n) for n in ("square.npy", "flat.npy", "corrupt.npy", "none.npy")]}


def _check(argv: list[str], cwd: Path, *names: str) -> str:
    """The CLI contract for one input; returns the error line ('' when the input was valid)."""
    code, out, err = run_cli(argv, cwd)
    printed = out + err
    STATS["inputs"] += 1
    assert "Traceback" not in printed, f"{argv}: a traceback\n{printed[-3000:]}"
    assert code in (0, 2), f"{argv}: exit code {code}\n{printed[-3000:]}"
    if code == 0:
        STATS["accepted"] += 1
        return ""
    STATS["rejected"] += 1
    last = printed.rstrip("\n").splitlines()[-1] if printed.strip() else ""
    assert re.match(r"raptor( [\w-]+)*: error: \S", last), f"{argv}: {printed[-2000:]}"
    if names:
        assert any(n in last for n in names), f"{argv}: the error does not name {names}: {last}"
    return last


def _paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a spec, sections and leaves."""
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    return out


def _node(tree: dict, path: tuple[str, ...]) -> dict:
    for k in path:
        tree = tree[k]
    return tree


@st.composite
def mutated_specs(draw, raw: dict) -> tuple[dict, tuple[str, ...]]:
    """A spec with one structural mutation; returns (spec, the top-level names the error may name)."""
    spec = copy.deepcopy(raw)
    paths = _paths(spec)
    kind = draw(st.sampled_from(["value", "unknown", "delete", "nest"]))
    path = draw(st.sampled_from(paths))
    parent = _node(spec, path[:-1])
    if kind == "value":
        parent[path[-1]] = draw(BAD_VALUES)
    elif kind == "unknown":
        target = parent[path[-1]] if isinstance(parent[path[-1]], dict) else parent
        where = path if target is not parent else path[:-1]
        target[f"bogus_{draw(st.text('abcxyz_', min_size=1, max_size=6))}"] = draw(BAD_VALUES)
        path = (*where, "bogus") if where else ("bogus",)
    elif kind == "delete":
        del parent[path[-1]]
    else:  # wrong nesting: a section (or leaf) wrapped in a list, or moved under another section
        if draw(st.booleans()):
            parent[path[-1]] = [parent[path[-1]]]
        else:
            other = draw(st.sampled_from([k for k, v in spec.items() if isinstance(v, dict) and k != path[0]]))
            spec[other][path[-1]] = parent.pop(path[-1])
            return spec, (path[0], other)
    return spec, (path[0],)


def test_mutated_specs_fail_in_one_line_naming_the_field(scratch):
    """Catches a spec mutation that crashes (a traceback: a validator raising TypeError/OverflowError,
    a NaN or infinity accepted, a YAML type pydantic cannot coerce) or an error that does not name
    the section it is about."""

    @FUZZ
    @given(mutated_specs(scratch["raw"]))
    def prop(case: tuple[dict, str]) -> None:
        spec, sections = case
        path = scratch["root"] / "mutated.yaml"
        path.write_text(yaml.safe_dump(spec, allow_unicode=True))
        _check(["run", str(path), "--dry-run"], scratch["root"], *sections, "bogus")

    prop()


def test_broken_yaml_text_fails_in_one_line(scratch):
    """Catches YAML the parser cannot read (tabs, unclosed brackets, anchors, tags, binary) surfacing
    as a yaml.YAMLError or ConstructorError traceback instead of one line naming the file."""
    text = Path(scratch["files"]["valid"]).read_text()

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, len(text)), st.integers(0, 30),
                              st.text(alphabet=":-[]{}\t'\"&*!|>#%@`,?\n \x00\x85\ufeffa1", max_size=8)),
                    min_size=1, max_size=4))
    def prop(edits: list[tuple[int, int, str]]) -> None:
        broken = text
        for at, cut, insert in edits:
            broken = broken[:at] + insert + broken[at + cut:]
        path = scratch["root"] / "broken-text.yaml"
        path.write_text(broken, errors="surrogatepass")
        _check(["run", str(path), "--dry-run"], scratch["root"], str(path))

    prop()


def test_set_overrides_fail_in_one_line_naming_the_argument(scratch):
    """Catches a ``--set`` value that is not valid YAML, a key path through a list or scalar, an
    empty key, or a type the field cannot take, surfacing as a traceback."""
    keys = [".".join(p) for p in _paths(scratch["raw"])] + ["", ".", "stage1..lr", "stage1.lr.x", "teacher.train.0",
                                                           "x.y.z", "runtime_env.env_vars.A"]

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(keys), st.sampled_from(["=", "", "=="]),
                              st.one_of(st.text(max_size=12), st.sampled_from(["[", "{a:", "!!python/object:os.system x",
                                                                               "*x", ".inf", "1e400", "null", "[1, 2]"]))),
                    min_size=1, max_size=3))
    def prop(sets: list[tuple[str, str, str]]) -> None:
        argv = ["run", scratch["files"]["valid"], "--dry-run"]
        for key, eq, value in sets:
            argv += ["--set", f"{key}{eq}{value}"]
        _check(argv, scratch["root"], "--set", *(k for k, _, _ in sets if k), scratch["files"]["valid"])

    prop()


def _tokens(flags: list[str], pool: list[str], small_ints: bool = False) -> st.SearchStrategy[list[str]]:
    numbers = st.integers(-5, 40) if small_ints else st.integers(-(10**12), 10**12)
    return st.lists(st.one_of(
        st.sampled_from(flags + ["--bogus", "-x", "--", "-"]), st.sampled_from(pool),
        numbers.map(str), st.sampled_from(["nan", "inf", "-1", "0", "", "=", "a=b", "1.5", "stage2.steps=-1"]),
        st.text(alphabet="abc-=./:", max_size=10),
    ), max_size=6)


def _commands(s: dict[str, Any]) -> dict[str, tuple[list[str], st.SearchStrategy[list[str]], list[str]]]:
    """command -> (argv prefix, token strategy, argv suffix that keeps a valid draw cheap)."""
    specs = [s["files"][k] for k in ("valid", "broken", "list", "empty", "missing")]
    return {
        "run": (["run"], _tokens(["--set", "--dry-run"], specs), ["--dry-run"]),
        "submit": (["submit"], _tokens(["--set", "--no-wait", "--address"], specs), ["--address", "http://127.0.0.1:9"]),
        "teacher train": (["teacher", "train"], _tokens(["--set", "--out"], specs), ["--set", "teacher.train=null"]),
        "analyze": (["analyze"], _tokens(["--out", "--samples", "--layer-swap", "--partition", "--ablation", "--dense",
                                          "--study-samples", "--study-steps", "--device", "--seed"], s["runs"]), []),
        "k8s render": (["k8s", "render"], _tokens(["--set", "--overlay", "--out", "dev", "multinode"], specs), []),
        "maxcut": (["maxcut"], _tokens(["--k", "--method", "--json", "--plot", "--baseline", "dp", "bisection"], s["npy"],
                                       small_ints=True), []),
        "shards info": (["shards", "info"], _tokens([], [str(s["root"] / "nothing")]), []),
        "shards generate": (["shards", "generate"], _tokens(["--samples", "--classes", "--size", "--bogus-flag"],
                                                             [str(s["root"] / "shards")]),
                            ["--samples", "not-a-number"]),
        "data bench": (["data", "bench"], _tokens(["--size", "--batch-size", "--batches", "--workers", "--eval"],
                                                  [str(s["root"] / "nothing")], small_ints=True), ["--workers", "x"]),
    }


@pytest.mark.parametrize("command", ["run", "submit", "teacher train", "analyze", "k8s render", "maxcut",
                                     "shards info", "shards generate", "data bench"])
def test_every_command_rejects_bad_arguments_in_one_line(scratch, command):
    """Catches a command whose bad arguments (unknown flags, missing or mistyped values, files that do
    not exist or do not parse, out-of-range numbers) end in a traceback or a multi-line usage dump."""
    prefix, tokens, suffix = _commands(scratch)[command]

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(tokens)
    def prop(args: list[str]) -> None:
        _check(prefix + args + suffix, scratch["root"])

    prop()
