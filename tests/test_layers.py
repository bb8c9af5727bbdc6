"""The layers: libraries never reach up into the runner or the service, and the README's map is the code's.

libraries (plain PyTorch) <- runner (Ray Train + DeepSpeed) <- service (the job spec, stages, CLI).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "raptor"
LIBRARIES = ["data", "models", "discovery", "distill", "eval", "analysis"]
LIBRARY_FILES = ["storage.py", "errors.py", "recipe.py"]
HEAVY = ("ray", "deepspeed", "wandb")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
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
    assert _offending(_files(*LIBRARIES, *LIBRARY_FILES), banned) == []


def test_the_runner_does_not_read_the_spec():
    """Catches the runner reaching up into the service (it gets a typed StageJob instead)."""
    assert _offending(_files("train"), ("raptor.service", "raptor.cli", "yaml")) == []


def test_importing_the_libraries_loads_no_ray_deepspeed_or_wandb():
    """Catches a transitive import (e.g. through a package __init__) that the AST check cannot see."""
    code = ("import sys\nimport raptor.models, raptor.data, raptor.distill, raptor.discovery, raptor.eval\n"
            "import raptor.analysis.analyze, raptor.analysis.report\n"
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
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    dists = packages_distributions()
    third_party = {m.split(".")[0] for f in _files(*LIBRARIES, *LIBRARY_FILES) for m in _imports(f)}
    third_party -= set(sys.stdlib_module_names) | {"raptor"}
    missing = {m: dists.get(m) for m in third_party if not {d.lower() for d in dists.get(m, [m])} & core}
    # packages that arrive with a core dependency (torch brings typing_extensions, pydantic annotated_types,
    # webdataset braceexpand, s3fs botocore and aiohttp, whose connection errors raptor.storage retries, ...)
    transitive = {"typing_extensions", "annotated_types", "braceexpand", "packaging", "botocore", "aiohttp"}
    assert {m: d for m, d in missing.items() if m not in transitive} == {}
