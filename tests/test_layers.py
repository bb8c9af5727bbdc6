"""The layers: libraries never reach up into the runner or the service, and the README's map is the code's.

libraries (plain PyTorch) <- runner (Ray Train + DeepSpeed) <- service (the job spec, stages, CLI).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "raptor"
ABOVE = ("train", "service")  # the runner and the service: the layers above the libraries
# the command line: cli.py dispatches to every layer's commands, console.py routes Ray workers' output
CLI_MODULES = ("cli.py", "console.py")
# every package and top-level module under raptor/ that is neither above nor the command line, so a
# new library package is covered without editing this list
LIBRARIES = sorted(p.name for p in PKG.iterdir()
                   if ((p / "__init__.py").exists() and p.name not in ABOVE)
                   or (p.suffix == ".py" and p.name not in CLI_MODULES))
HEAVY = ("ray", "deepspeed", "wandb")


def _module_name(path: Path) -> str:
    """``raptor/eval/probe.py`` -> ``raptor.eval.probe``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (also inside functions), relative imports made absolute.

    ``from a import b`` counts as ``a`` and ``a.b``: ``from raptor import service`` imports the service.
    """
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names |= {module, *(f"{module}.{a.name}" for a in node.names if a.name != "*")}
    return names


def _files(*parts: str) -> list[Path]:
    out = []
    for part in parts:
        p = PKG / part
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def _offending(files: list[Path], banned: tuple[str, ...]) -> list[str]:
    return [f"{f.relative_to(ROOT)} imports {m}" for f in files for m in sorted(_imports(f))
            if any(m == b or m.startswith(b + ".") for b in banned)]


def test_libraries_import_neither_ray_deepspeed_wandb_nor_the_spec_or_runner():
    """Catches a library that would drag Ray or DeepSpeed into a notebook, or read the job spec."""
    banned = (*HEAVY, "yaml", "raptor.service", "raptor.train", "raptor.cli", "raptor.console")
    assert _offending(_files(*LIBRARIES), banned) == []


def test_the_runner_does_not_read_the_spec():
    """Catches the runner reaching up into the service (it gets a typed StageJob instead)."""
    assert _offending(_files("train"), ("raptor.service", "raptor.cli", "yaml")) == []


def test_relative_imports_count_as_the_modules_they_name(tmp_path, monkeypatch):
    """Catches the AST checks going blind to ``from ..service import spec`` (relative imports were skipped)."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "raptor" / "perf").mkdir(parents=True)
    module, init = tmp_path / "raptor" / "perf" / "x.py", tmp_path / "raptor" / "perf" / "__init__.py"
    module.write_text("from ..service import spec\nfrom . import flops\n")
    init.write_text("from .memory import plan\n")
    assert _imports(module) == {"raptor.service", "raptor.service.spec", "raptor.perf", "raptor.perf.flops"}
    assert _imports(init) == {"raptor.perf.memory", "raptor.perf.memory.plan"}


def test_importing_the_libraries_loads_no_ray_deepspeed_or_wandb():
    """Catches a transitive import (e.g. through a package __init__) that the AST check cannot see, in any
    module of any library package or top-level library module."""
    modules = sorted(_module_name(f) for f in _files(*LIBRARIES))
    assert {"raptor.perf.memory", "raptor.storage", "raptor.eval.probe"} <= set(modules)
    # timm imports wandb itself when it is installed (timm.utils.summary: try/except ImportError), and
    # raptor.models imports timm to register its student: that import of wandb is timm's, so it is refused
    # (timm goes on without it); any other import of a heavy package still shows in sys.modules
    code = ("import importlib, sys, traceback\n"
            "class TimmWithoutWandb:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'wandb' and any('/timm/' in f.filename for f in traceback.extract_stack()):\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, TimmWithoutWandb())\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["k8s", "render", "jobs/distill_k3.yaml"], ["run", "--help"]])
def test_light_commands_do_not_load_torch(argv):
    """Catches `raptor --help` or `raptor k8s render` paying seconds for torch (and Ray) they do not use."""
    code = ("import sys\nfrom raptor.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write(repr(sorted(m for m in ('torch', 'ray') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    assert out.stderr.strip().splitlines()[-1] == "[]", out.stderr[-2000:]


def test_readme_package_map_matches_the_code():
    """Catches a README architecture section that names modules that moved, or misses packages that exist."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("<!-- layout:begin -->"):readme.index("<!-- layout:end -->")]
    named = set(re.findall(r"raptor/[\w/]+(?:\.py)?/?", block))
    assert named, "the README's layout block names no paths"
    missing = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists())
    assert missing == []
    packages = {f"raptor/{p.name}/" for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {f"raptor/service/{p.name}/" for p in (PKG / "service").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert sorted(packages - named) == []


def test_library_imports_are_core_dependencies():
    """Catches a library importing a package only the train extra installs (a plain `pip install raptor` would break)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    dists = packages_distributions()
    third_party = {m.split(".")[0] for f in _files(*LIBRARIES) for m in _imports(f)}
    third_party -= set(sys.stdlib_module_names) | {"raptor"}
    missing = {m: dists.get(m) for m in third_party if not {d.lower() for d in dists.get(m, [m])} & core}
    # packages that arrive with a core dependency (torch brings typing_extensions, pydantic annotated_types,
    # webdataset braceexpand, s3fs botocore and aiohttp, whose connection errors raptor.storage retries, ...)
    transitive = {"typing_extensions", "annotated_types", "braceexpand", "packaging", "botocore", "aiohttp"}
    # the export extra's packages, imported only inside the function that writes or checks an ONNX file
    optional = {m for m in missing if m in {d.lower() for d in project["optional-dependencies"]["export"]}}
    assert {m: d for m, d in missing.items() if m not in transitive | optional} == {}
    top_level = {f"{f.relative_to(ROOT)} imports {a.name if isinstance(node, ast.Import) else node.module}"
                 for f in _files(*LIBRARIES) for node in ast.parse(f.read_text()).body
                 if isinstance(node, (ast.Import, ast.ImportFrom))
                 for a in (node.names if isinstance(node, ast.Import) else [node])
                 if ((a.name if isinstance(node, ast.Import) else node.module) or "").split(".")[0] in optional}
    assert top_level == set()


def _installed_closure(requirements: list[str]) -> set[str]:
    """Canonical names of the installed distributions that ``requirements`` bring, transitively, with their
    markers (extras, platform) evaluated here: what ``pip install`` of them would have installed."""
    dists: set[str] = set()
    done: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        wanted = {(name, extra) for extra in {"", *req.extras}} - done
        if not wanted:
            continue
        done |= wanted
        try:
            deps = [Requirement(d) for d in requires(name) or []]
        except PackageNotFoundError:  # not installed here: an optional dependency another package brings itself
            continue
        dists.add(name)
        todo += [d for d in deps if d.marker is None or any(d.marker.evaluate({"extra": extra}) for _, extra in wanted)]
    return dists


def _train_only() -> tuple[set[str], set[str], set[str]]:
    """(core distributions, distributions only the ``train`` extra installs beyond them, those distributions'
    top-level modules), read off pyproject.toml and this environment's package metadata."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _installed_closure(project["dependencies"])
    train = _installed_closure(project["optional-dependencies"]["train"]) - core
    owners = {m: {canonicalize_name(d) for d in ds} for m, ds in packages_distributions().items()}
    return core, train, {m for m, ds in owners.items() if ds & train and not ds & core}


def test_the_blocked_modules_are_what_only_the_train_extra_installs():
    """Catches the import blocker below drifting from the packaging: a distribution added to the train extra
    (or moved to the core dependencies) changes this set, and the blocker with it.

    pyyaml is in the train extra but not blocked: timm and webdataset (core) require it, so a core
    install has ``yaml``. The libraries still do not import it (the job spec is the service's).
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["train"]}
    core, train, modules = _train_only()
    assert direct - core == {"deepspeed", "ray", "wandb", "optuna"}
    assert direct - core <= train and "pyyaml" in core
    assert {"ray", "deepspeed", "wandb", "optuna"} <= modules and not {"yaml", "torch", "timm", "numpy"} & modules


# The README's library example, made shorter on this shared 2-core machine (7 minutes as written, against
# about one on a laptop): stage 1 trains 20 steps instead of 200, stage 2 5 instead of 50, and the
# export goes to the test's folder instead of /tmp/raptor-demo. Nothing else of the text changes.
README_SHORTENED = {"paper_stage1(200,": "paper_stage1(20,", "paper_stage2(50,": "paper_stage2(5,"}

BLOCKER = """\
import importlib.abc, sys
BLOCKED, ABOVE = {blocked!r}, {above!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, f"imported before the blocker could stop them: {{loaded}}"

class NotInstalled(importlib.abc.MetaPathFinder):
    \"\"\"Wraps a finder: modules only the train extra brings are not found, as in a core install (importing
    one raises ModuleNotFoundError; importlib.util.find_spec, which torch uses to probe, returns None).\"\"\"

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or any(name == a or name.startswith(a + ".") for a in ABOVE):
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def find_distributions(self, *args, **kwargs):  # package metadata (importlib.metadata.version) as before
        find = getattr(self.finder, "find_distributions", None)
        return find(*args, **kwargs) if find else iter(())

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()

sys.meta_path[:] = [NotInstalled(f) for f in sys.meta_path]
"""


def _readme_library_example(out: Path) -> str:
    """The python block of the README's ``## Library`` section, shortened as README_SHORTENED says."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Library\n"):]
    section = section[: section.index("\n## ", 1)]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for old, new in {**README_SHORTENED, "/tmp/raptor-demo": str(out)}.items():
        assert old in code, f"the README's library example no longer has {old!r}"
        code = code.replace(old, new)
    return code


@pytest.mark.slow
def test_readme_library_example_runs_without_the_train_extra(tmp_path):
    """Catches a library (or the README example) that needs Ray, DeepSpeed, wandb, optuna, the runner or the
    service at import or run time: a plain `pip install raptor` would fail where the README says it works.

    Instead of a fresh virtual environment per run (torch alone is ~5.5 GB and minutes to install), the
    example runs in a subprocess whose import system refuses every module only the train extra installs
    (derived from pyproject.toml, see above) and raptor.train / raptor.service.
    """
    *_, blocked = _train_only()
    code = BLOCKER.format(blocked=sorted(blocked), above=[f"raptor.{a}" for a in ABOVE]) + _readme_library_example(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {"config.json", "model.safetensors", "README.md"}


def _edges() -> dict[str, set[str]]:
    """raptor module -> the raptor modules it imports (at any depth, local imports included).

    ``from a import b`` is an edge to ``a.b`` when that is a module, else to ``a``; ``import a.b.c`` to the
    longest prefix that is a module. A package's ``__init__`` is its own node.
    """
    modules = {_module_name(f): f for f in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            if not imported.startswith("raptor"):
                continue
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported:
                targets.add(imported)
        graph[name] = targets - {name}
    # `from a import b` also yields `a`: drop it where `a.b` (a submodule) is what was imported
    return {m: {t for t in ts if not any(u.startswith(t + ".") for u in ts) or t == "raptor"} - {"raptor"}
            for m, ts in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_raptor():
    """Catches two modules that import each other, even when one side hides it in a function-level import
    (as the sweep and its results once did): the layering of the code map would no longer be a tree."""
    assert _cycles(_edges()) == []


def test_the_cycle_check_sees_a_local_import(tmp_path, monkeypatch):
    """Catches the cycle check going blind to a cycle closed by an import inside a function."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path / "raptor")
    (tmp_path / "raptor" / "sweep").mkdir(parents=True)
    for init in ("raptor/__init__.py", "raptor/sweep/__init__.py"):
        (tmp_path / init).write_text("")
    (tmp_path / "raptor/sweep/run.py").write_text("from raptor.sweep.results import cb\ndef go():\n    pass\n")
    (tmp_path / "raptor/sweep/results.py").write_text("def cb():\n    from raptor.sweep import run\n")
    assert _cycles(_edges()) == [["raptor.sweep.results", "raptor.sweep.run"]]
