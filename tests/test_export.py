"""The student as a product: RaptorViT's interfaces (timm, DINOv2), its files (safetensors, model folder,
fsspec URLs), timm's registry and data config, ONNX, bad files, the model card and the benchmark."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raptor.models import Raptor, RaptorViT, Teacher, load_student, save_folder, save_student
from raptor.models.checkpoints import CheckpointError, save_safetensors

ROOT = Path(__file__).resolve().parents[1]


def _perturbed(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Random offsets on every parameter: zero-initialised tokens, LayerScale and depth-scaling layers
    would otherwise hide a wrong index or a missing term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    torch.manual_seed(0)
    t = Teacher.from_timm("vit_small_patch14_reg4_dinov2", img_size=28, embed_dim=32, depth=6, num_heads=2)
    _perturbed(t.model, 1)
    t.set_head(torch.randn(5, 64), torch.randn(5))
    return t


@pytest.fixture(scope="module")
def model(teacher) -> RaptorViT:
    """A k=3 student with depth scaling, every parameter non-trivial, and a probe head besides the teacher's."""
    student = Raptor.from_teacher(teacher, [2, 4], seed=0)
    _perturbed(student, 2)
    return RaptorViT.from_student(student, teacher, heads={"probe": (torch.randn(4, 64), torch.randn(4))})


def images(batch: int = 3, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _outputs(m: RaptorViT, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"rollout": m.rollout(m.embed(x)), "features": m.features(x), "logits": m(x)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- interfaces


def test_a_student_of_the_teachers_own_layers_is_the_teacher(teacher):
    """k = L blocks copied from the teacher, no depth scaling: every interface must give the teacher's numbers
    (timm's forward_features and forward_intermediates on the teacher itself, DINOv2's get_intermediate_layers
    semantics built from them), also at another image size against timm's dynamic-size ViT. Catches a stem that
    differs from timm's (positions, registers, order, resampling), an off-by-one layer index, registers kept in
    the patch tokens, a norm applied or left out, layers returned out of order."""
    L = teacher.depth
    student = Raptor.from_teacher(teacher, list(range(1, L)), init="teacher", depth_scaling=False)
    m = RaptorViT.from_student(student, teacher)
    x = images()
    vit = teacher.model
    with torch.no_grad():
        assert torch.allclose(m.forward_features(x), vit.forward_features(x), atol=1e-5)
        assert torch.allclose(m.features(x), teacher(x), atol=1e-5)
        assert torch.allclose(m(x), teacher.logits(teacher.run_blocks(teacher.embed(x))), atol=1e-5)
        for indices in (None, 2, [0, -1], (1, 3, 5)):
            for fmt in ("NCHW", "NLC"):
                for norm in (False, True):
                    final, mine = m.forward_intermediates(x, indices=indices, norm=norm, output_fmt=fmt,
                                                          return_prefix_tokens=True)
                    want_final, want = vit.forward_intermediates(x, indices=indices, norm=norm, output_fmt=fmt,
                                                                 return_prefix_tokens=True)
                    assert torch.allclose(final, want_final, atol=1e-5)
                    assert len(mine) == len(want)
                    for (a, pa), (b, pb) in zip(mine, want):
                        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5) and torch.allclose(pa, pb, atol=1e-5)
        only = m.forward_intermediates(x, indices=[1], intermediates_only=True, stop_early=True)
        assert len(only) == 1 and torch.allclose(only[0], vit.forward_intermediates(x, indices=[1], intermediates_only=True)[0], atol=1e-5)

        # DINOv2: the last n layers (or the listed ones), normed by default, patch tokens only, cls beside them
        for n, norm, reshape in ((1, True, False), (2, False, True), ([0, 3], True, True)):
            idx = list(range(L - n, L)) if isinstance(n, int) else n
            _, ref = vit.forward_intermediates(x, indices=idx, norm=norm, output_fmt="NCHW" if reshape else "NLC",
                                               return_prefix_tokens=True)
            got = m.get_intermediate_layers(x, n, reshape=reshape, return_class_token=True, norm=norm)
            assert len(got) == len(idx)
            for (patches, cls), (want_patches, prefix) in zip(got, ref):
                assert torch.allclose(patches, want_patches, atol=1e-5) and torch.allclose(cls, prefix[:, 0], atol=1e-5)
        plain = m.get_intermediate_layers(x, 2)
        assert isinstance(plain, tuple) and plain[0].shape == (3, 4, 32)
        assert all(torch.equal(a, b) for a, b in zip(m.get_intermediate_layers(x, [3, 0]), m.get_intermediate_layers(x, [0, 3])))

        # another image size: the position embeddings resampled as timm's dynamic-size ViT resamples them
        import timm

        dynamic = timm.create_model(teacher.name, img_size=28, num_classes=0, dynamic_img_size=True, **teacher.model_kwargs)
        dynamic.load_state_dict(vit.state_dict())
        big = images(2, 42)
        assert torch.allclose(m.forward_features(big), dynamic.forward_features(big), atol=1e-5)
        assert torch.allclose(m.at_resolution(42).forward_features(big), dynamic.forward_features(big), atol=1e-5)


def test_intermediates_are_the_rollout_and_other_sizes_resample_the_positions(model):
    """Catches forward_intermediates reading other states than the rollout's (layer l is index l-1), a
    features path that differs from the rollout's last state, positions baked for a size that differ from
    those resampled on the fly, and a rollout torch.compile cannot capture in one graph."""
    x = images()
    with torch.no_grad():
        states = model.rollout(model.embed(x))
        out = model.forward_intermediates(x, indices=None, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
        assert len(out) == model.depth
        for l, (patches, prefix) in enumerate(out):
            assert torch.equal(torch.cat([prefix, patches], dim=1), states[:, l])
        assert torch.equal(model.final_state(model.embed(x)), states[:, -1])
        assert torch.equal(model.forward_features(x), model.norm(states[:, -1]))
        big = images(2, 42)
        assert model.forward_features(big).shape == (2, 5 + 9, 32)
        assert torch.allclose(model.at_resolution(42)(big), model(big), atol=1e-6)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # the whole rollout in one graph
        assert torch.allclose(compiled(x), model(x), atol=1e-6)
    with pytest.raises(ValueError, match="resolution 40 is not a positive multiple of the patch size 14"):
        model.at_resolution(40)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model(images(1, 30))


def test_heads_choose_what_forward_returns(model):
    """Catches forward ignoring the chosen head, and a head switch that changes the features."""
    x = images()
    with torch.no_grad():
        feats = model.features(x)
        assert model.head_name == "probe" and torch.equal(model(x), model.heads["probe"](feats))
        m = copy.deepcopy(model)
        m.set_head("teacher")
        assert m.num_classes == 5 and torch.equal(m(x), m.heads["teacher"](feats))
        m.reset_classifier(0)
        assert torch.equal(m(x), feats) and m.num_classes == 0
    with pytest.raises(ValueError, match="'nope' is not one of"):
        model.set_head("nope")


# ---------------------------------------------------------------- files


def test_the_file_and_the_folder_load_alone_anywhere(model, tmp_path):
    """One safetensors file and a model folder, on a path and on an fsspec URL, through load_student,
    RaptorViT.from_pretrained, save_pretrained and timm: each gives the same numbers. Catches a tensor left
    out of the file (the stem, a head, the positions), a manifest that does not rebuild the architecture, and
    a loader that needs the teacher."""
    x = images()
    want = _outputs(model, x)
    save_student(model, str(tmp_path / "student.safetensors"), {"teacher": {"name": "t", "checkpoint": "/gone.safetensors"}})
    save_folder(model, str(tmp_path / "hf"), {"teacher": {"name": "t"}})
    save_folder(model, "memory://exports/hf")
    loaded = {
        "file": load_student(str(tmp_path / "student.safetensors"))[0],
        "folder": load_student(str(tmp_path / "hf"))[0],
        "url": load_student("memory://exports/hf")[0],
        "from_pretrained": RaptorViT.from_pretrained(str(tmp_path / "hf")),
        "from_pretrained_url": RaptorViT.from_pretrained("memory://exports/hf"),
    }
    loaded["from_pretrained"].save_pretrained(tmp_path / "again")
    loaded["save_pretrained"] = RaptorViT.from_pretrained(str(tmp_path / "again"))
    for how, m in loaded.items():
        assert isinstance(m, RaptorViT) and m.teacher is None, how
        _equal(_outputs(m, x), want)
        assert m.head_name == "probe" and sorted(m.heads) == ["probe", "teacher"], how
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for folder in ("hf", "again"):  # the model card, also through save_pretrained (not the mixin's generic one)
        assert (tmp_path / folder / "README.md").read_text().startswith("---\nlicense: other\n")
        assert "# Raptor student of t, k = 3" in (tmp_path / folder / "README.md").read_text()
    assert loaded["save_pretrained"].manifest["teacher"] == {"name": "t"}  # provenance kept through a re-save
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["student"]["stem"] == {"no_embed_class": True, "norm_eps": 1e-6}


def test_timm_builds_it_by_name_and_resolves_the_eval_transform(model, tmp_path):
    """Catches a registration timm cannot find, a file/folder it cannot take, and a data config that is not
    the one raptor evaluates with (short side to size * 256/224, bicubic, centre crop, ImageNet mean/std):
    timm's transform from that config gives about the image raptor's eval transform gives."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from raptor.data import image_transform

    save_student(model, str(tmp_path / "student.safetensors"))
    save_folder(model, str(tmp_path / "hf"))
    x = images()
    for source in ("student.safetensors", "hf"):
        m = timm.create_model("raptor_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / source)))
        _equal(_outputs(m, x), _outputs(model, x))
    resized = timm.create_model("raptor_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "hf")),
                                num_classes=7, img_size=42)
    assert resized(images(2, 42)).shape == (2, 7)
    config = resolve_data_config({}, model=m)
    assert config == {"input_size": (3, 28, 28), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                      "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 61), torch.linspace(0, 1, 83), indexing="ij")  # smooth: resamplers agree
    pixels = torch.stack([xx, yy, (torch.sin(6 * xx) * torch.cos(4 * yy) + 1) / 2], dim=-1)
    image = Image.fromarray((pixels * 255).round().to(torch.uint8).numpy())
    raptor_view = image_transform(28, train=False)(image)
    gap = {crop: (create_transform(**{**config, "crop_pct": crop})(image) - raptor_view).abs().mean().item()
           for crop in (config["crop_pct"], 1.0)}
    assert gap[config["crop_pct"]] < 0.06 < gap[1.0], gap  # the same view; another crop is not
    with pytest.raises(ValueError, match="pretrained=True, pretrained_cfg_overlay=dict"):
        timm.create_model("raptor_vit")


def test_bad_files_are_one_line_naming_the_file(model, tmp_path):
    """A truncated file, a foreign safetensors file, a config.json that does not match the weights, a folder
    with a file missing, a block-only student given to timm: each a CheckpointError (a UserError: one line,
    exit code 2) naming the file and what is wrong."""
    import timm

    good = tmp_path / "student.safetensors"
    save_student(model, str(good))
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_safetensors(str(tmp_path / "foreign.safetensors"), {"w": torch.zeros(2)}, {"format": "pt"})
    save_folder(model, str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["student"]["block"]["num_heads"] = 4  # the same shapes: only the weights' own manifest can tell
    save_folder(model, str(tmp_path / "lying"))
    (tmp_path / "lying" / "config.json").write_text(json.dumps(config))
    save_folder(model, str(tmp_path / "partial"))
    (tmp_path / "partial" / "model.safetensors").unlink()
    blocks = Raptor.from_teacher(Teacher.from_timm("vit_small_patch14_reg4_dinov2", img_size=28, embed_dim=32, depth=6,
                                                   num_heads=2), [2, 4])
    save_student(blocks, str(tmp_path / "blocks.safetensors"))
    cases = {
        "truncated.safetensors": "not a readable safetensors file",
        "foreign.safetensors": "is not a raptor student export",
        "lying": r"lying/config.json does not describe .*lying/model.safetensors: student.block.num_heads is 4 there, 2 in",
        "partial": "partial/model.safetensors: missing",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as e:
            load_student(str(tmp_path / name))
        assert "\n" not in str(e.value) and str(tmp_path / name) in str(e.value)
    with pytest.raises(CheckpointError, match="blocks.safetensors: a block-only student"):
        timm.create_model("raptor_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "blocks.safetensors")))


# ---------------------------------------------------------------- without the train extra, without the teacher

# What a user's notebook without the train extra has: importing Ray, DeepSpeed, wandb or the service fails,
# and so does opening any file under BLOCKED (the teacher's checkpoint, deleted or out of reach).
CLEAN_LOAD = r"""
import importlib.abc, json, os, sys
BLOCKED = os.environ["BLOCKED"]

class TrainExtraMissing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "deepspeed", "wandb") or name.startswith(("raptor.service", "raptor.train")):
            raise ImportError(f"{name} is not installed here")

def no_teacher(event, args):
    if event == "open" and isinstance(args[0], str) and os.path.abspath(args[0]).startswith(BLOCKED):
        raise PermissionError(f"the teacher's file was opened: {args[0]}")

sys.meta_path.insert(0, TrainExtraMissing())
sys.addaudithook(no_teacher)
import torch
from raptor.models import RaptorViT, load_student
x = torch.load(sys.argv[1])
for url in sys.argv[3:]:
    m = load_student(url)[0] if not url.startswith("pretrained:") else RaptorViT.from_pretrained(url[11:])
    with torch.no_grad():
        out = {"rollout": m.rollout(m.embed(x)), "features": m.features(x), "logits": m(x)}
    torch.save(out, sys.argv[2] + "." + str(sys.argv.index(url)))
"""


def load_cleanly(tmp_path: Path, x: torch.Tensor, urls: list[str], blocked: str) -> list[dict[str, torch.Tensor]]:
    """Each of ``urls`` loaded in a fresh process without the train extra and without access to ``blocked``
    -> its rollout, features and logits on ``x``."""
    torch.save(x, tmp_path / "x.pt")
    out = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(tmp_path / "x.pt"), str(tmp_path / "out"), *urls],
                         capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ, "BLOCKED": blocked})
    assert out.returncode == 0, out.stderr[-3000:]
    return [torch.load(tmp_path / f"out.{i + 3}") for i in range(len(urls))]


def test_an_export_of_a_block_only_student_loads_without_the_train_extra_or_the_teacher(teacher, tmp_path):
    """`raptor export` of a training stage's block-only student (whose manifest points at the teacher's file),
    then the teacher's file out of reach and the train extra's packages unimportable: the file and the folder
    still load and give the numbers of the student rebuilt with its teacher, within 1e-6. Catches an export
    that still reads the teacher (its stem or head not copied in) or needs Ray/DeepSpeed/wandb to load."""
    from raptor.cli import main
    from raptor.models import rebuild_student

    teacher_dir = tmp_path / "teacher"
    teacher.save(str(teacher_dir / "teacher.safetensors"))
    student = Raptor.from_teacher(teacher, [2, 4], seed=0)
    _perturbed(student, 2)
    save_student(student, str(tmp_path / "blocks.safetensors"), {"teacher": {"checkpoint": str(teacher_dir / "teacher.safetensors")}})
    assert main(["export", str(tmp_path / "blocks.safetensors"), "--to", str(tmp_path / "out")]) == 0
    rebuilt, t, _ = rebuild_student(str(tmp_path / "blocks.safetensors"))
    x = images(4)
    with torch.no_grad():
        a0 = t.embed(x)
        want = {"rollout": rebuilt.rollout(a0), "features": t.readout(rebuilt.rollout(a0)[:, -1])}
        want["logits"] = t.head(want["features"])
    got = load_cleanly(tmp_path, x, [str(tmp_path / "out" / "student.safetensors"), str(tmp_path / "out" / "hf"),
                                     f"pretrained:{tmp_path / 'out' / 'hf'}"], str(teacher_dir))
    for outputs in got:
        for k in want:
            assert (outputs[k] - want[k]).abs().max() <= 1e-6, k


def test_the_model_card_states_the_runs_numbers_and_says_what_is_missing(model):
    """Catches a card that invents numbers it was not given, or drops the ones it was (fidelity per layer,
    probe top-1 and share, parameters and FLOPs, license)."""
    from raptor.models.card import model_card
    from raptor.models.checkpoints import manifest_of

    bare = model_card(manifest_of(model.describe()))
    assert "Not measured in this export (no report)." in bare and "license: other" in bare
    report = {"num_samples": 64, "fidelity": {"layers": [1, 2], "update_r2": [0.91, 0.5], "r2": [0.99, 0.9], "cosine": [0.98, 0.97]},
              "probe": {"teacher": {"top1": 0.6}, "student": {"top1": 0.58}, "student_share": 0.9667}}
    card = model_card(manifest_of(model.describe(), teacher={"name": "vit_small_patch14_reg4_dinov2", "license": "apache-2.0",
                                                                  "params": 21_000_000, "flops_per_image": 9_200_000_000},
                                       stats={"params": 7_500_000, "flops_per_image": 9_200_000_000}, report=report))
    assert card.startswith("---\nlicense: apache-2.0\n")
    assert "| 1 | 0.910 | 0.990 | 0.980 |" in card and "| student | 0.580 |" in card and "96.7% of the teacher's" in card
    assert "| parameters | 7.50 M | 21.00 M |" in card and "| FLOPs per image (28 px) | 9.200 GFLOPs | 9.200 GFLOPs |" in card
    assert "- `probe`: 4 classes (used by `forward`)" in card
    assert "Its FLOPs per image are the teacher's (1.00x" in card
    wider = model_card(manifest_of(model.describe(), teacher={"flops_per_image": 6e7}, stats={"flops_per_image": 7.8e7}))
    assert "Its FLOPs per image are 1.30x the teacher's because its blocks are shaped otherwise" in wider


def test_export_flags_and_fields_out_of_range_are_one_line(model, tmp_path, capsys):
    """Catches a resolution the patch does not divide reaching the exporter (a traceback mid-export), from the
    command line and from the spec."""
    import yaml

    from raptor.cli import main

    save_student(model, str(tmp_path / "student.safetensors"))
    assert main(["export", str(tmp_path / "student.safetensors"), "--to", str(tmp_path / "o"), "--format", "onnx",
                 "--resolution", "30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("raptor export: error: the ONNX resolution 30 is not a positive multiple of the patch size 14 "
                   "(--resolution, export.resolution)")
    assert not (tmp_path / "o").exists()  # refused before anything was written
    spec = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    spec["storage"]["url"] = str(tmp_path / "run")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "spec.yaml"), "--dry-run", "--set", "export.resolution=30"]) == 2
    assert capsys.readouterr().err.strip().endswith("export.resolution: 30 is not a multiple of the teacher's patch size 14")


# ---------------------------------------------------------------- ONNX and the benchmark


@pytest.mark.parametrize("size", [pytest.param(224, marks=pytest.mark.slow), 112])
def test_onnx_matches_pytorch_at_its_resolution_for_any_batch(model, tmp_path, size):
    """Two resolutions, each exported on its own, run by onnxruntime at batch 1 and 8: within 1e-4 of PyTorch.
    Catches an interpolation left in the graph, a batch fixed at export, and the recurrence traced wrongly."""
    from raptor.export import onnx_file
    from raptor.export.write import write_exports
    from raptor.export.onnx import check_onnx

    written = write_exports(model, str(tmp_path), ["onnx"], resolution=size)
    assert written == {"onnx": str(tmp_path / onnx_file(size))}
    assert check_onnx(written["onnx"], model, size, batches=(1, 8)) < 1e-4


@pytest.mark.slow
def test_bench_model_measures_student_and_teacher_each_way(model, tmp_path, capsys):
    """Catches a benchmark row that goes missing or measures nothing, and ratios not taken against the teacher
    of the same mode."""
    from raptor.cli import main

    save_student(model, str(tmp_path / "student.safetensors"), {"teacher": {"name": "vit_small_patch14_reg4_dinov2",
                                                                            "model_kwargs": {"embed_dim": 32, "depth": 6, "num_heads": 2}}})
    assert main(["bench-model", str(tmp_path / "student.safetensors"), "--batch", "16", "--iters", "3", "--warmup", "2",
                 "--json", str(tmp_path / "bench.json")]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["model"], r["mode"]) for r in rows] == [("student", "eager"), ("teacher", "eager"), ("student", "compiled"),
                                                       ("teacher", "compiled")]
    for r in rows:
        assert r["images_per_s"] > 0 and r["peak_mib"] > 0 and r["batch"] == 16 and r["size"] == 28
    for s, t in (rows[0:2], rows[2:4]):
        assert s["params"] < t["params"] and s["speed_vs_teacher"] == pytest.approx(s["images_per_s"] / t["images_per_s"])
    assert "student  eager" in capsys.readouterr().out
