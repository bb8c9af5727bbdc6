"""The docs stay true to the code: README.md and docs/*.md.

Every command shown in a ``bash`` block, or after ``$ `` in a plain block, is checked against today's
code: a ``raptor`` command must parse with the real CLI and its spec (with its ``--set`` overrides)
must validate; ``make`` targets, scripts, modules, kustomize folders and every repository path it names
must exist. Each kind of command must be run by a named test (``RUN_BY``) or say why no test can run
it (``NOT_RUN``: a real cluster, registry or cloud account). The cheap ones are run here as shown:
``raptor plan`` (its printed lines compared with the page's), ``raptor submit`` against a recording
job client, ``raptor k8s render`` into a scratch folder, and the dry-runs. Relative links and their
anchors must resolve, and the python blocks must import names that exist.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path
from typing import Any

from tests.jobclient import RecordingClient

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^( {0,3})```(\w*)\n(.*?)^\1```", re.S | re.M)  # list items indent theirs
REPO_PATH = re.compile(r"^(?:jobs|cluster|k8s|scripts|docs|tests|raptor)/[\w./-]*$")
# example paths a page uses for the reader's own files, not files of this repository
PLACEHOLDERS = {"jobs/my_job.yaml"}
SEPARATORS = {"|", "||", "&", "&&", ";"}

# kind of command (see _kind) -> the test that runs it
RUN_BY: dict[str, str] = {
    "make test": ".ci/run",
    "make test-faults": ".ci/run",
    "raptor shards generate": "tests/test_data.py::test_cli_generate_info_bench_and_errors",
    "raptor shards imagefolder": "tests/test_data.py::test_imagefolder_to_s3_keeps_labels_and_bytes",
    "raptor shards list": "tests/test_fuzz_files.py::test_list_files_fail_in_one_line",
    "raptor shards info": "tests/test_data_layouts.py::test_shards_info_reports_each_layout",
    "raptor data bench": "tests/test_data_decode.py::test_bench_prints_loader_bare_loop_and_ratio",
    "raptor run": "tests/test_service.py::test_interrupted_run_resumes_on_s3_and_matches_the_uninterrupted_one",
    "raptor run --dry-run": "tests/test_docs.py::test_docs_dry_runs_run_as_shown",
    "raptor plan": "tests/test_docs.py::test_docs_plan_output_is_what_raptor_plan_prints",
    "raptor sweep": "tests/test_sweep_e2e.py::test_killed_sweep_resumes_without_redoing_finished_trials",
    "raptor sweep --dry-run": "tests/test_docs.py::test_docs_dry_runs_run_as_shown",
    "raptor submit": "tests/test_docs.py::test_docs_submit_commands_send_what_they_say",
    "raptor submit --sweep": "tests/test_docs.py::test_docs_submit_commands_send_what_they_say",
    "raptor k8s render": "tests/test_docs.py::test_docs_k8s_render_commands_render",
    "raptor analyze": "tests/test_analysis_report.py::test_raptor_analyze_runs_the_studies",
    "raptor export": "tests/test_service.py::test_the_runs_model_loads_alone_and_is_the_student_the_report_measured",
    "raptor bench-model": "tests/test_export.py::test_bench_model_measures_student_and_teacher_each_way",
    "kubectl apply -k": "tests/test_deploy_k8s.py::test_kubectl_kustomize_builds_each_overlay",
    "ray up": "tests/test_deploy_cluster.py::test_launcher_config_passes_ray_up_preparation",
}
# kind of command -> why no test runs it (what checks it instead)
NOT_RUN: dict[str, str] = {
    "ray job submit": "needs a Ray cluster's job server; `raptor submit` sends the same entrypoint through the same "
                      "job API (tests/test_service.py::test_submit_runs_the_spec_as_a_ray_job), the part after `--` is checked here",
    "ray dashboard": "forwards a port from a launched VM cluster; its config is checked by tests/test_deploy_cluster.py",
    "ray down": "tears down a launched VM cluster; its config is checked by tests/test_deploy_cluster.py",
    "export": "sets an environment variable",
    "make check": "the edit-test loop: scripts/test.sh with a marker filter, a subset of what `make test` runs in CI",
    "make quickstart": "9 minutes on 2 cores, too long for the suite: the Makefile runs `raptor run jobs/quickstart.yaml`, "
                       "whose plan test_docs_dry_runs_run_as_shown runs and whose pipeline tests/test_service.py runs on "
                       "a smaller spec",
    "docker build": "needs a Docker daemon and CUDA base images; tests/test_deploy_cluster.py checks the Dockerfile statically",
    "docker push": "needs a registry account",
    "helm repo add": "needs a Kubernetes cluster and network",
    "helm install": "needs a Kubernetes cluster",
    "kubectl create": "needs a Kubernetes cluster (creates Secrets)",
    "kubectl get": "needs a Kubernetes cluster",
    "kubectl logs": "needs a Kubernetes cluster",
    "kubectl port-forward": "needs a Kubernetes cluster",
    "kubectl apply -f": "needs a Kubernetes cluster; what it applies is `raptor k8s render`'s output, run here",
    "kubectl ray job submit": "needs a Kubernetes cluster and the kubectl ray plugin; the part after `--` is checked here",
}


# ---- reading the pages ------------------------------------------------------------------------------


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def _fences(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, an indented one's body dedented."""
    return [(lang, re.sub(rf"^{indent}", "", body, flags=re.M)) for indent, lang, body in FENCE.findall(text)]


def _commands(text: str) -> list[str]:
    """The command lines of a page: each line of a ``bash`` block (continuations joined) and each
    ``$ `` line of a plain block."""
    out = []
    for lang, body in _fences(text):
        if lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    out.append(line.strip())
        elif lang == "":
            out += [line[2:].strip() for line in body.splitlines() if line.startswith("$ ")]
    return out


def _split(line: str) -> list[list[str]]:
    """A command line as argv lists: comments dropped, split at pipes and ``&``; ``[--flag]`` (an
    optional flag, as usage lines write it) becomes ``--flag``."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    argvs: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            argvs.append([])
        else:
            argvs[-1].append(re.sub(r"^\[(--[\w-]+)\]$", r"\1", token))
    return [a for a in argvs if a]


def _after_dashes(argv: list[str]) -> list[str]:
    return argv[argv.index("--") + 1:] if "--" in argv else []


def _docs_argvs() -> list[tuple[str, list[str]]]:
    """(page, argv) of every command the pages show, commands run by other commands (``ray job submit
    ... -- raptor run ...``) included."""
    out = []
    for page in PAGES:
        for line in _commands(page.read_text()):
            for argv in _split(line):
                while argv:
                    out.append((_rel(page), argv))
                    argv = _after_dashes(argv) if argv[0] in ("ray", "kubectl") else []
    return out


def _kind(argv: list[str]) -> str:
    """What a command is, for RUN_BY / NOT_RUN: the tool and its (sub)command words, plus the flags
    that make it another command (``--dry-run``, ``submit --sweep``, ``apply -k`` / ``-f``)."""
    tool, rest = Path(argv[0]).name, argv[1:]
    if tool == "export":
        return "export"
    words = []
    skip = False
    for a in rest:
        if skip:
            skip = False
        elif a in ("-n", "--namespace"):
            skip = True
        elif a == "--":
            break
        elif not a.startswith("-"):
            words.append(a)
    depth = {"raptor": 2 if words[:1] and words[0] in ("shards", "data", "teacher", "k8s") else 1,
             "make": 1, "docker": 1, "helm": 2 if words[:1] == ["repo"] else 1, "ray": 2 if words[:1] == ["job"] else 1,
             "kubectl": 3 if words[:1] == ["ray"] else 1}.get(tool, 1)
    kind = " ".join([tool, *words[:depth]])
    if tool == "raptor":
        kind += " --dry-run" * ("--dry-run" in rest) + " --sweep" * (words[:1] == ["submit"] and "--sweep" in rest)
    if kind == "kubectl apply":
        kind += " -k" if "-k" in rest else " -f"
    return kind


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))


# ---- checking one command ----------------------------------------------------------------------------


def _parse_raptor(argv: list[str]) -> tuple[Any, str]:
    """(argparse namespace or None, argparse's error message) of ``raptor ARGV`` with the real parser."""
    from raptor.cli import _command_of, build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser(_command_of(argv)).parse_args(argv), ""
    except SystemExit:
        return None, err.getvalue().strip()


def _problems(argv: list[str]) -> list[str]:
    """What is wrong with one documented command, as today's code and repository see it."""
    from raptor.service.spec import SpecError, load_spec

    problems = [f"{a} does not exist" for a in argv if REPO_PATH.match(a.rstrip(":"))
                and a not in PLACEHOLDERS and not (ROOT / a).exists()]
    tool, rest = Path(argv[0]).name, argv[1:]
    if tool == "raptor":
        args, error = _parse_raptor(rest)
        if args is None:
            return [*problems, f"does not parse: {error}"]
        spec = getattr(args, "spec", None)
        if spec and spec not in PLACEHOLDERS and "://" not in spec:
            try:
                loaded = load_spec(str(ROOT / spec), args.overrides)
            except SpecError as e:
                return [*problems, f"its spec does not validate: {e}"]
            if (args.command == "sweep" or getattr(args, "sweep", False)) and loaded.sweep is None:
                problems.append(f"{spec} has no sweep section")
    elif tool == "make":
        problems += [f"no make target {t!r}" for t in rest if not t.startswith("-") and t not in _makefile_targets()]
    elif tool == "python":
        if rest[:1] == ["-m"]:
            if importlib.util.find_spec(rest[1]) is None:
                problems.append(f"no module {rest[1]}")
        elif not (ROOT / rest[0]).is_file():
            problems.append(f"no script {rest[0]}")
    elif tool == "kubectl" and "-k" in rest:
        folder = ROOT / rest[rest.index("-k") + 1]
        if not (folder / "kustomization.yaml").is_file():
            problems.append(f"{folder} holds no kustomization.yaml")
    elif tool == "docker" and "-f" in rest:
        if not (ROOT / rest[rest.index("-f") + 1]).is_file():
            problems.append(f"no Dockerfile {rest[rest.index('-f') + 1]}")
    return problems


# ---- the tests ---------------------------------------------------------------------------------------


def test_the_pages_show_commands():
    """Catches the command extraction going blind (a fence syntax it no longer reads): every check below
    would pass on no commands at all."""
    kinds = {_kind(argv) for _, argv in _docs_argvs()}
    assert {"make quickstart", "make test", "raptor run --dry-run", "raptor plan", "raptor sweep --dry-run",
            "raptor submit", "raptor k8s render", "kubectl apply -k"} <= kinds
    readme = {_kind(argv) for page, argv in _docs_argvs() if page == "README.md"}
    assert {"raptor run --dry-run", "raptor plan", "raptor sweep", "raptor submit"} <= readme  # one example each
    assert _split("raptor shards generate s3://b --size 112 [--dense]   # a comment | not a pipe") == \
        [["raptor", "shards", "generate", "s3://b", "--size", "112", "--dense"]]
    assert _split("raptor k8s render s.yaml | kubectl apply -f -") == [["raptor", "k8s", "render", "s.yaml"],
                                                                     ["kubectl", "apply", "-f", "-"]]


def test_every_docs_command_parses_and_names_what_exists():
    """Catches a command in the README or docs/ that today's code refuses: a renamed or removed subcommand
    or flag, a spec in jobs/ that moved or no longer validates with the page's --set overrides, a make
    target, script, module, kustomize overlay or Dockerfile that is gone."""
    failures = [f"{page}: `{shlex.join(argv)}`: {p}" for page, argv in _docs_argvs() for p in _problems(argv)]
    assert failures == []


def test_the_command_check_catches_broken_commands():
    """Catches the check above passing everything (a parser that no longer exits on bad input, a spec
    check that never runs)."""
    assert _problems(["raptor", "run", "jobs/quickstart.yaml", "--dry-runn"])
    assert _problems(["raptor", "run", "jobs/quickstart.yaml", "--set", "stage2.steps=-5"])
    assert _problems(["raptor", "sweep", "jobs/quickstart.yaml"])  # no sweep section
    assert _problems(["raptor", "run", "jobs/no_such_spec.yaml"])
    assert _problems(["raptor", "shards", "generatee", "out"])
    assert _problems(["make", "quickstartt"]) and _problems(["python", "scripts/nope.py"])
    assert _problems(["kubectl", "apply", "-k", "k8s/overlays/nope"])
    assert not _problems(["raptor", "plan", "jobs/distill_k3.yaml", "--device", "H100"])


def test_every_docs_command_is_run_by_a_named_test():
    """Catches a command added to the docs that no test runs (and no reason given why none can), and a
    RUN_BY entry naming a test that was renamed or deleted, so the claim "run by a test" went stale."""
    kinds = {_kind(argv) for _, argv in _docs_argvs()}
    assert sorted(kinds - RUN_BY.keys() - NOT_RUN.keys()) == []
    assert not RUN_BY.keys() & NOT_RUN.keys()
    for kind, where in RUN_BY.items():
        path, _, name = where.partition("::")
        text = (ROOT / path).read_text()
        assert not name or re.search(rf"^def {name}\(", text, re.M), f"{kind}: {where} does not exist"
        assert name or kind in text, f"{kind}: {path} does not run it"
    assert sorted(RUN_BY.keys() - kinds) == [] and sorted(NOT_RUN.keys() - kinds) == []  # no stale entries


def _shown_commands(kind: str) -> list[tuple[str, list[str]]]:
    return [(page, argv) for page, argv in _docs_argvs() if _kind(argv) == kind]


def _raptor(argv: list[str], cwd: Path, monkeypatch) -> tuple[int, str]:
    """``raptor ARGV`` in this process with ``cwd`` as the working directory: exit code, stdout + stderr."""
    from raptor.cli import main

    monkeypatch.chdir(cwd)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue()


def test_docs_plan_output_is_what_raptor_plan_prints(monkeypatch):
    """Catches a page showing `raptor plan` output that the command no longer prints: a changed memory
    model, batch, spec or suggestion would leave the shown GiB, samples/s or switches stale."""
    shown = 0
    for page in PAGES:
        for lang, body in _fences(page.read_text()):
            blocks = re.split(r"^\$ ", body, flags=re.M)[1:] if lang == "" else []
            for block in blocks:
                command, *lines = block.splitlines()
                if not command.startswith("raptor plan "):
                    continue
                code, out = _raptor(shlex.split(command)[1:], ROOT, monkeypatch)
                assert code in (0, 3), out
                printed = [" ".join(line.split()) for line in out.splitlines()]
                for line in lines:
                    if line.strip() and line.strip() != "...":
                        assert " ".join(line.split()) in printed, f"{_rel(page)}: `{command}` no longer prints {line!r}"
                shown += 1
    assert shown >= 2


def test_docs_dry_runs_run_as_shown(tmp_path, monkeypatch):
    """Catches a documented `raptor run ... --dry-run` or `raptor sweep ... --dry-run` that fails on its own
    spec (a spec the stage graph cannot plan, a sweep whose trials do not validate). Run in a scratch
    folder: the specs' relative run folders land there, and a dry-run writes nothing."""
    ran = 0
    for kind in ("raptor run --dry-run", "raptor sweep --dry-run"):
        for page, argv in _shown_commands(kind):
            argv = [str(ROOT / a) if (ROOT / a).is_file() else a for a in argv[1:]]
            code, out = _raptor(argv, tmp_path, monkeypatch)
            assert code == 0, f"{page}: `raptor {shlex.join(argv)}`: {out[-2000:]}"
            ran += 1
    assert ran >= 2 and not any(tmp_path.rglob("stage.json"))


def test_docs_k8s_render_commands_render(tmp_path, monkeypatch):
    """Catches a documented `raptor k8s render` that fails on the spec it names (a spec that does not fill
    whole pods, a secret in its runtime_env). Output goes to a scratch folder, never the committed k8s/."""
    ran = 0
    for page, argv in _shown_commands("raptor k8s render"):
        spec = argv[3]
        if spec in PLACEHOLDERS or "://" in spec:
            continue
        argv = [*argv[1:], "--out", str(tmp_path / str(ran))] if "--out" not in argv else \
            [*argv[1:argv.index("--out")], "--out", str(tmp_path / str(ran)), *argv[argv.index("--out") + 2:]]
        code, out = _raptor(argv, ROOT, monkeypatch)
        assert code == 0, f"{page}: `raptor {shlex.join(argv)}`: {out[-2000:]}"
        assert list((tmp_path / str(ran)).rglob("kustomization.yaml")), out
        ran += 1
    assert ran >= 1


def test_docs_submit_commands_send_what_they_say(monkeypatch):
    """Catches a documented `raptor submit` that no longer submits the run (or with --sweep, the sweep) of
    the spec it names with its overrides: a refused spec, a dropped --set, `run` where `sweep` was meant."""
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", RecordingClient)
    ran = 0
    for kind in ("raptor submit", "raptor submit --sweep"):
        for page, argv in _shown_commands(kind):
            RecordingClient.sent.clear()
            code, out = _raptor([*argv[1:], "--no-wait"], ROOT, monkeypatch)
            assert code == 0, f"{page}: `{shlex.join(argv)}`: {out[-2000:]}"
            (job,) = RecordingClient.sent
            entry = shlex.split(job["entrypoint"])
            args, _ = _parse_raptor(argv[1:])
            assert entry[:3] == ["raptor", "sweep" if args.sweep else "run", args.spec], job["entrypoint"]
            assert all(f"--set {o}" in shlex.join(entry) for o in args.overrides), job["entrypoint"]
            ran += 1
    assert ran >= 3


# ---- links, paths, inline commands and python blocks -------------------------------------------------


def _prose(text: str) -> str:
    """A page without its fenced blocks (their ``#`` lines are comments, not headings)."""
    return FENCE.sub("", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page: lower case, punctuation dropped, spaces to hyphens, -1, -2
    for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _prose(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: Path) -> list[str]:
    prose = re.sub(r"`[^`\n]*`", "", _prose(page.read_text()))
    return re.findall(r"\[[^\]\n]*\]\(([^)\s]+)\)", prose)


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
    return broken


def test_relative_links_and_anchors_resolve():
    """Catches a link in the README or docs/ to a page, file or heading that moved or was renamed (the
    README's sections that went to docs/, a heading reworded so its #anchor no longer exists)."""
    assert {f"{_rel(page)}: {b}" for page in PAGES for b in _broken_links(page)} == set()


def test_the_link_check_catches_a_broken_link(tmp_path):
    """Catches the link check going blind: a missing file, a missing anchor and a heading inside a code
    block (a python comment, not an anchor)."""
    (tmp_path / "a.md").write_text("# A page\n\n## Where it is\n\n```python\n# not a heading\n```\n")
    (tmp_path / "b.md").write_text("[ok](a.md#where-it-is) [gone](c.md) [bad](a.md#not-a-heading) "
                                   "[ok too](#b) `[code](d.md)`\n\n# B\n")
    broken = _broken_links(tmp_path / "b.md")
    assert [b.split(":")[0] for b in broken] == ["c.md", "a.md#not-a-heading"]


def test_every_docs_page_is_linked_from_the_readme():
    """Catches a docs page nobody can find: added to docs/ but missing from the README's table."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    assert sorted(_rel(p) for p in PAGES[1:] if p.resolve() not in linked) == []


def test_readme_stays_short():
    """Catches the README growing back into the manual (it was 1,048 lines): the pitch, the code map, the
    quick start, one library example and one example per command stay; the rest belongs in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_paths_and_commands_named_in_prose_exist():
    """Catches prose that names a file, script, module, make target or raptor (sub)command that moved or
    was renamed (e.g. `python -m raptor.service.reference` after the module went to raptor.service.spec)."""
    from raptor.cli import COMMANDS, build_parser

    commands = set()
    for name in COMMANDS:
        sub = next(a for a in build_parser(name)._actions if a.dest == "command").choices[name]
        nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        commands |= {f"{name} {c}" for a in nested for c in a.choices} or {name}
    failures = []
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", _prose(page.read_text())):
            words = span.split()
            for word in words:
                path = word.rstrip(":,;")
                if REPO_PATH.match(path) and path not in PLACEHOLDERS and not (ROOT / path).exists():
                    failures.append(f"{_rel(page)}: `{span}`: {path} does not exist")
            if Path(words[0]).name == "raptor" and len(words) > 1:
                said = [w for w in words[1:] if not w.startswith("-")][:2]
                if said and said[0] in ("shards", "data", "teacher", "k8s") and len(said) > 1 and said[1].islower():
                    ok = " ".join(said) in commands
                else:
                    ok = not said or said[0] in COMMANDS or not said[0].islower()
                if not ok:
                    failures.append(f"{_rel(page)}: `{span}`: no such raptor command")
            elif words[0] == "make" and len(words) > 1 and not words[1].startswith("-"):
                if words[1] not in _makefile_targets():
                    failures.append(f"{_rel(page)}: `{span}`: no make target {words[1]}")
            elif words[0] == "python" and len(words) > 1:
                failures += [f"{_rel(page)}: `{span}`: {p}" for p in _problems(words)]
    assert failures == []


def _python_blocks() -> list[tuple[str, str]]:
    return [(_rel(page), body) for page in PAGES for lang, body in _fences(page.read_text()) if lang == "python"]


def test_docs_python_blocks_compile_and_import_what_exists():
    """Catches a python example in the README or docs/ that is no longer valid Python, or imports a
    raptor name that was renamed or moved (only the README's library example is run end to end)."""
    import ast

    failures = []
    for page, code in _python_blocks():
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "raptor":
                module = importlib.import_module(node.module)
                failures += [f"{page}: from {node.module} import {a.name}: no such name"
                             for a in node.names if not hasattr(module, a.name)
                             and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert len(_python_blocks()) >= 3 and failures == []
