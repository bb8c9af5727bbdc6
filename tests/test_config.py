"""The job spec: both job files load, --set overrides are typed, bad specs fail in one line naming the field."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from raptor import storage
from raptor.service.spec import reference as spec_reference
from raptor.service.spec import JobSpec, SpecError, apply_overrides, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
DISTILL = str(ROOT / "jobs" / "distill_k3.yaml")
QUICKSTART = str(ROOT / "jobs" / "quickstart.yaml")


def _raw(path: str = DISTILL) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _error(overrides: list[str], path: str = DISTILL) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg, "spec errors are one line"
    return msg


def test_distill_k3_is_the_papers_recipe_scaled_to_16_gpus():
    spec = load_spec(DISTILL)
    assert spec.teacher.name == "vit_base_patch14_reg4_dinov2" and spec.teacher.depth() == 12
    assert spec.discovery.k == 3 and spec.discovery.boundaries is None  # boundaries come from max-cut
    assert spec.data.train == "s3://raptor-data/imagenet/train-{000000..001023}.tar"
    # the file's comment: 16 workers x 64 = 1,024; same 20M samples -> 19,532 steps; sqrt LR scaling
    assert spec.effective_batch == 1024
    assert spec.stage1.steps == spec.stage2.steps == math.ceil(312_500 * 64 / 1024)
    assert spec.stage1.lr == pytest.approx(3e-4 * (1024 / 64) ** 0.5)
    assert spec.stage2.token_weights.model_dump() == {"cls": 0.45, "reg": 0.10, "patch": 0.45}
    assert spec.scaling.use_gpu and spec.scaling.num_workers == 16


def test_quickstart_is_the_embedded_cpu_default():
    spec = load_spec(QUICKSTART)
    assert spec.teacher.checkpoint is None and spec.teacher.train is not None  # trains its own teacher
    assert spec.teacher.depth() == 12  # from model_kwargs
    assert not spec.scaling.use_gpu and spec.scaling.num_workers == 2
    assert spec.deepspeed.zero_stage == 2 and spec.discovery.k == 3
    assert storage.scheme(spec.storage.url) == "file" and spec.data.generate is not None


def test_overrides_are_parsed_as_typed_yaml_values():
    spec = load_spec(
        DISTILL,
        [
            "stage2.steps=2000",
            "stage1.lr=5e-4",
            "scaling.use_gpu=false",
            "discovery.boundaries=[7, 10]",
            "probe.lrs=[0.001]",
            "logging.wandb_entity=my-team",
            "deepspeed.zero_stage=3",
            "deepspeed.offload_param=cpu",
            "cluster.gpus_per_node=4",  # a section the file does not have is created
        ],
    )
    assert spec.stage2.steps == 2000 and isinstance(spec.stage2.steps, int)
    assert spec.stage1.lr == 5e-4 and isinstance(spec.stage1.lr, float)
    assert spec.scaling.use_gpu is False
    assert spec.discovery.boundaries == [7, 10]
    assert spec.probe.lrs == [0.001]
    assert spec.logging.wandb_entity == "my-team"
    assert (spec.deepspeed.zero_stage, spec.deepspeed.offload_param) == (3, "cpu")
    assert spec.cluster.gpus_per_node == 4
    # everything not overridden is the file's value
    assert spec.stage1.steps == load_spec(DISTILL).stage1.steps


def test_override_syntax_errors_name_the_argument():
    assert "expected section.field=value" in _error(["stage2.steps"])
    assert "'name' is not a section" in _error(["name.first=x"])
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    ("overrides", "field", "detail"),
    [
        (["stage2.stepz=10"], "stage2.stepz", "unknown field"),
        (["colour=blue"], "colour", "unknown field"),
        (["stage2.steps=-5"], "stage2.steps", "greater than 0 (got -5)"),
        (["stage1.steps=0"], "stage1.steps", "greater than 0 (got 0)"),
        (["stage2.steps=many"], "stage2.steps", "valid integer"),
        (["discovery.k=13"], "discovery.k=13", "depth L=12"),
        (["storage.url=ftp://host/runs"], "storage.url", "unsupported URL scheme 'ftp'"),
        (["data.train=ftp://host/train-{0..9}.tar"], "data.train", "unsupported URL scheme 'ftp'"),
        (["teacher.checkpoint=smb://share/vit.pth"], "teacher.checkpoint", "unsupported URL scheme 'smb'"),
        (["discovery.boundaries=[10, 7]"], "discovery: boundaries", "increasing"),
        (["discovery.boundaries=[0, 7]"], "discovery: boundaries", "increasing positive"),
        (["discovery.boundaries=[7]"], "discovery: 1 boundaries", "k=2 blocks, but k=3"),
        (["discovery.boundaries=[7, 12]"], "discovery.boundaries [7, 12]", "1..11"),
        (["deepspeed.offload_param=cpu"], "deepspeed: offload_param", "zero_stage 3 (got zero_stage=2)"),
        (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=cpu"], "deepspeed: offload_optimizer", "zero_stage >= 1"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage", "(got 4)"),
        (["stage1.warmup_steps=20000"], "stage1: warmup_steps (20000)", "below steps (19532)"),
        (["scaling.placement_strategy=RANDOM"], "scaling.placement_strategy", "'RANDOM'"),
        (["name=no spaces"], "name", "pattern"),
        (["cluster.namespace=Raptor_NS"], "cluster.namespace", "pattern"),
    ],
)
def test_invalid_spec_fails_naming_the_field(overrides, field, detail):
    msg = _error(overrides)
    assert msg.startswith(f"{DISTILL}: "), msg
    assert field in msg and detail in msg, msg


def test_missing_section_and_bad_files(tmp_path):
    raw = _raw()
    del raw["storage"]
    with pytest.raises(SpecError, match=r"^spec: storage: required field is missing$"):
        parse_spec(raw)
    assert "no such spec file" in _error([], str(tmp_path / "absent.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "a YAML mapping of sections" in _error([], str(tmp_path / "list.yaml"))
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    assert "not valid YAML" in _error([], str(tmp_path / "broken.yaml"))


def test_several_errors_report_the_first_and_count_the_rest():
    msg = _error(["stage1.steps=-1", "stage2.steps=-1"])
    assert "stage1.steps" in msg and "(and 1 more)" in msg


@pytest.mark.parametrize("path", [DISTILL, QUICKSTART])
def test_to_yaml_round_trips(path, tmp_path):
    spec = load_spec(path, ["stage2.steps=1234"])
    text = spec.to_yaml()
    again = parse_spec(yaml.safe_load(text))
    assert again == spec
    assert again.to_yaml() == text  # a saved spec is a fixed point
    (tmp_path / "spec.yaml").write_text(text)
    assert load_spec(str(tmp_path / "spec.yaml")) == spec


def test_spec_loads_from_s3_with_overrides(s3_bucket):
    url = f"{s3_bucket}/specs/distill_k3.yaml"
    storage.write_bytes(url, Path(DISTILL).read_bytes())
    spec = load_spec(url, ["scaling.num_workers=8"])
    assert isinstance(spec, JobSpec) and spec.scaling.num_workers == 8 and spec.effective_batch == 512
    with pytest.raises(SpecError, match=r"stage2\.steps"):
        load_spec(url, ["stage2.steps=-1"])


def test_docs_spec_reference_matches_the_model():
    """Catches a spec field added, renamed or given a new default or description without refreshing the
    reference in docs/spec.md (the page would document a spec that no longer exists)."""
    page = (ROOT / spec_reference.DOCS_FILE).read_text()
    assert page.count(spec_reference.BEGIN) == 1, f"{spec_reference.DOCS_FILE} lost its spec reference block"
    block = page[page.index(spec_reference.BEGIN) : page.index(spec_reference.END) + len(spec_reference.END)]
    assert block == spec_reference.reference_markdown(), (
        f"{spec_reference.DOCS_FILE} spec reference is stale: python -m raptor.service.spec.reference --update")
    for other in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if other != ROOT / spec_reference.DOCS_FILE:
            assert spec_reference.BEGIN not in other.read_text(), f"a second, unchecked spec reference in {other}"


def test_reference_update_rewrites_only_the_block_of_docs_spec_md(tmp_path, monkeypatch):
    """Catches `--update` without a file writing anywhere but docs/spec.md (where the staleness test looks),
    or touching the page around the block."""
    page = tmp_path / "docs" / "spec.md"
    page.parent.mkdir()
    page.write_text(f"# before\n\n{spec_reference.BEGIN}\nold\n{spec_reference.END}\n\nafter\n")
    monkeypatch.chdir(tmp_path)
    assert spec_reference.main(["--update"]) == 0
    assert page.read_text() == f"# before\n\n{spec_reference.reference_markdown()}\n\nafter\n"


def test_every_spec_field_has_a_description():
    """Catches a new spec field without Field(description=...): the reference in docs/spec.md would show an empty meaning."""
    assert spec_reference.undocumented() == [], "give these fields a description= in raptor/service/spec/__init__.py"


def test_reference_shows_types_bounds_and_defaults():
    ref = spec_reference.reference_markdown()
    assert "| `steps` | int > 0 | required |" in ref
    assert '| `zero_stage` | int >= 0 <= 3 | `2` |' in ref
    assert '| `token_weights.cls` | float >= 0 | `0.45` |' in ref  # stage 2's own default, not the class default
    assert '| `metric` | "cosine" \\| "mse" \\| "cka" \\| "swap" | `"cosine"` |' in ref
    with pytest.raises(ValueError, match="no .* block"):
        spec_reference.replace_block("# a README without the markers\n")
