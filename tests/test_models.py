"""Teachers, checkpoints (official DINOv2 geometry, exports, S3), the Raptor student and its export."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import timm
import torch

from raptor import storage
from raptor.models import (
    CheckpointError,
    Raptor,
    RaptorBlock,
    Teacher,
    load_student,
    rebuild_student,
    save_student,
)
from tests.planted import NAME, build_teacher, images

SMALL = dict(embed_dim=32, depth=4, num_heads=2)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _timm(name=NAME, img_size=28, **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, img_size=img_size, num_classes=0, **{**SMALL, **kw})
    with torch.no_grad():  # make LayerScale and tokens non-trivial
        for n, p in m.named_parameters():
            if n.endswith("gamma") or "token" in n or "pos_embed" in n:
                p.copy_(torch.randn_like(p) * 0.5)
    return m.eval()


def to_official(sd: dict[str, torch.Tensor], chunks: int = 0) -> dict[str, torch.Tensor]:
    """timm DINOv2 keys -> facebookresearch/dinov2 geometry (the inverse of timm's conversion)."""
    sd = {k: v.clone() for k, v in sd.items()}
    out = {}
    D = sd["cls_token"].shape[-1]
    if "reg_token" in sd:
        c0 = torch.randn(1, 1, D)
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - c0
        out["pos_embed"] = torch.cat([c0, sd.pop("pos_embed")], dim=1)
    out["mask_token"] = torch.zeros(1, D)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    per = -(-depth // chunks) if chunks else 0
    swiglu = _is_swiglu(sd)
    for k, v in sd.items():
        if swiglu:  # DINOv2's SwiGLUFFNFused: w12 (packed D -> 2H), w3 (H -> D)
            k = k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        if chunks and k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // per}.{k[len('blocks.'):]}"
        out[k] = v
    return out


def _is_swiglu(sd):
    return sd["blocks.0.mlp.fc1.weight"].shape[0] == 2 * sd["blocks.0.mlp.fc2.weight"].shape[1]


def _save_pth(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(str(path), buf.getvalue())


def test_teacher_trajectory_embed_readout():
    m = _timm()
    t = Teacher.from_model(copy.deepcopy(m))
    lay = t.geometry
    assert (lay.num_prefix, lay.num_registers, lay.num_patches, lay.depth, lay.width) == (5, 4, 4, 4, 32)
    assert lay.num_tokens == 9 and lay.has_cls
    x = images(3, 28)
    tr = t.trajectory(x)
    assert tr.shape == (3, 5, 9, 32) and tr.dtype == torch.float32
    assert torch.equal(tr[:, 0], t.embed(x))
    assert torch.allclose(tr[:, 3], t.run_blocks(tr[:, 1], 1, 3), atol=1e-6)
    assert torch.allclose(t.model.norm(tr[:, -1]), m.forward_features(x), atol=1e-6)
    feats = t.readout(tr[:, -1])
    n = m.norm(tr[:, -1])
    assert torch.allclose(feats, torch.cat([n[:, 0], n[:, 5:].mean(1)], -1), atol=1e-6)
    amp = t.trajectory(x, amp=True)
    assert amp.dtype == torch.float32
    assert (amp - tr).norm() / tr.norm() < 0.05
    assert not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not t.model.training


def test_teacher_bad_inputs():
    with pytest.raises(ValueError, match="not divisible by the patch size 14"):
        Teacher.from_timm(NAME, img_size=30, **SMALL)
    t = Teacher.from_timm(NAME, img_size=28, **SMALL)
    with pytest.raises(ValueError, match="built for 28x28"):
        t.trajectory(torch.randn(1, 3, 42, 42))
    with pytest.raises(ValueError, match="unknown timm model"):
        Teacher.from_timm("vit_nonexistent_patch14", img_size=28)


@pytest.mark.parametrize("chunks", [0, 2])
def test_official_dinov2_pth_loads_like_direct_weights(tmp_path, chunks):
    m = _timm()
    direct = Teacher.from_model(copy.deepcopy(m))
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    _save_pth(to_official(m.state_dict(), chunks), path)
    t = Teacher.from_timm(NAME, img_size=28, checkpoint=str(path), **SMALL)
    x = images(2, 28)
    assert torch.allclose(t.trajectory(x), direct.trajectory(x), atol=1e-5)
    # a DINOv2 training checkpoint nests the backbone under teacher/backbone.
    _save_pth({"teacher": {f"backbone.{k}": v for k, v in to_official(m.state_dict()).items()}}, path)
    t2 = Teacher.from_timm(NAME, img_size=28, checkpoint=str(path), **SMALL)
    assert torch.allclose(t2.trajectory(x), direct.trajectory(x), atol=1e-5)


def test_official_swiglu_no_registers_layout(tmp_path):
    name = "vit_giant_patch14_dinov2"
    kw = dict(embed_dim=48, depth=2, num_heads=2)
    m = _timm(name, **kw)
    direct = Teacher.from_model(copy.deepcopy(m), model_kwargs=kw)
    assert direct.mlp_kind == "swiglu"
    sd = to_official(m.state_dict())
    assert "blocks.0.mlp.w12.weight" in sd and "blocks.1.mlp.w3.bias" in sd and "register_tokens" not in sd
    path = tmp_path / "g.pth"
    _save_pth(sd, path)
    t = Teacher.from_timm(name, img_size=28, checkpoint=str(path), **kw)
    x = images(2, 28)
    assert torch.allclose(t.trajectory(x), direct.trajectory(x), atol=1e-5)
    s = Raptor.from_teacher(t, [1], init="teacher", depth_scaling=False)
    tr = t.trajectory(x)
    assert torch.allclose(s.rollout(tr[:, 1], 1, 2)[:, 0], tr[:, 2], atol=1e-5)  # copied SwiGLU block


def test_official_pth_from_s3(s3_bucket):
    m = _timm()
    direct = Teacher.from_model(copy.deepcopy(m))
    url = f"{s3_bucket}/teachers/dinov2_reg4.pth"
    _save_pth(to_official(m.state_dict()), url)
    t = Teacher.from_timm(NAME, img_size=28, checkpoint=url, **SMALL)
    x = images(2, 28)
    assert torch.allclose(t.trajectory(x), direct.trajectory(x), atol=1e-5)
    # the project's own export and a student export round-trip through S3 too
    t.set_head(torch.randn(5, 64), torch.randn(5))
    t.save(f"{s3_bucket}/teachers/t.safetensors")
    t3 = Teacher.load(f"{s3_bucket}/teachers/t.safetensors")
    assert torch.equal(t3.trajectory(x), t.trajectory(x))
    assert torch.equal(t3.head.weight, t.head.weight)
    s = Raptor.from_teacher(t3, [2], seed=0)
    save_student(s, f"{s3_bucket}/students/s.safetensors")
    s2, t4, man = rebuild_student(f"{s3_bucket}/students/s.safetensors")
    assert man["teacher"]["checkpoint"] == f"{s3_bucket}/teachers/t.safetensors"
    assert torch.equal(s2.logits(x), s.logits(x))


def test_wrong_checkpoints_fail_clearly(tmp_path):
    m = _timm()
    path = tmp_path / "wide.pth"
    other = _timm(embed_dim=48)
    _save_pth(to_official(other.state_dict()), path)
    with pytest.raises(CheckpointError, match="shape mismatches: .*blocks.0"):
        Teacher.from_timm(NAME, img_size=28, checkpoint=str(path), **SMALL)
    sd = dict(m.state_dict())
    sd.pop("blocks.1.attn.qkv.weight")
    sd["blocks.9.extra"] = torch.zeros(1)
    _save_pth(sd, path)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks.1.attn.qkv.weight.*unexpected keys: blocks.9.extra"):
        Teacher.from_timm(NAME, img_size=28, checkpoint=str(path), **SMALL)
    # an arbitrary pickle is refused, never executed
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": _Evil()}))
    with pytest.raises(CheckpointError, match="weights_only"):
        Teacher.from_timm(NAME, img_size=28, checkpoint=str(evil), **SMALL)
    with pytest.raises(FileNotFoundError):
        Teacher.from_timm(NAME, img_size=28, checkpoint=str(tmp_path / "nope.pth"), **SMALL)
    with pytest.raises(CheckpointError, match="not a raptor teacher export"):
        Teacher.load(str(path))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_teacher_export_roundtrip_and_timm_head(tmp_path):
    torch.manual_seed(0)
    m = timm.create_model(NAME, img_size=28, num_classes=7, **SMALL).eval()
    x = images(2, 28)
    want = m(x)
    t = Teacher.from_model(torch.compile(m))  # trained-here path: timm head over cls -> 2D readout head
    assert m.num_classes == 7 and all(p.requires_grad for p in m.parameters())  # a copy was frozen
    assert t.head is not None and t.head.in_features == 64
    assert torch.allclose(t.logits(t.trajectory(x)[:, -1]), want, atol=1e-5)
    url = str(tmp_path / "teacher.safetensors")
    t.save(url, metadata={"epochs": 3})
    t2 = Teacher.load(url)
    assert (t2.name, t2.img_size, t2.model_kwargs["embed_dim"]) == (NAME, 28, 32)
    assert torch.equal(t2.trajectory(x), t.trajectory(x))
    assert torch.allclose(t2.logits(t2.trajectory(x)[:, -1]), want, atol=1e-5)
    t3 = Teacher.from_timm(NAME, img_size=28, checkpoint=url, **t2.model_kwargs)
    assert torch.equal(t3.trajectory(x), t.trajectory(x)) and t3.head is not None
    with pytest.raises(CheckpointError, match="teacher export of"):
        Teacher.from_timm(NAME, img_size=28, checkpoint=url, embed_dim=48, depth=4, num_heads=2)


def test_student_structure_and_errors():
    t = build_teacher((2, 2, 2), width=32, heads=2, img_size=28)
    s = Raptor.from_teacher(t, [2, 4])
    assert s.k == 3 and s.segments == [(0, 2), (2, 4), (4, 6)] and s.owner == [0, 0, 1, 1, 2, 2]
    own = {n for n, _ in s.named_parameters()}
    assert all(n.startswith("blocks.") for n in own) and len(s.state_dict()) == len(own)
    assert sum(p.numel() for p in s.parameters()) == 3 * sum(p.numel() for p in s.blocks[0].parameters())
    for bad, msg in [([1, 2, 3, 4, 5, 6], "k = 7 blocks > depth"), ([3, 3], "strictly increasing"),
                     ([4, 2], "strictly increasing"), ([0, 3], "1..5"), ([6], "1..5")]:
        with pytest.raises(ValueError, match=msg):
            Raptor.from_teacher(t, bad)
    with pytest.raises(ValueError, match="init must be"):
        Raptor.from_teacher(t, [2], init="zeros")
    with pytest.raises(ValueError, match="block width 16 != teacher width 32"):
        Raptor([RaptorBlock(16, 2) for _ in range(2)], [3], t.geometry)
    other = build_teacher((3, 3), width=48, heads=2, img_size=28)
    with pytest.raises(ValueError, match="does not match"):
        s.attach(other)
    with pytest.raises(ValueError, match="mlp must be"):
        RaptorBlock(32, 2, mlp="relu")


def test_rollout_semantics_and_teacher_init():
    pattern = (3, 2, 1)
    t = build_teacher(pattern, width=32, heads=2, img_size=28)
    x = images(2, 28)
    tr = t.trajectory(x)
    s = Raptor.from_teacher(t, [3, 5], init="teacher", depth_scaling=False)
    # planted teacher + copied blocks: the student IS the teacher
    assert torch.allclose(s.rollout(tr[:, 0]), tr[:, 1:], atol=1e-5)
    assert torch.allclose(s.teacher_forcing(tr[:, 0:6], 0), tr[:, 1:], atol=1e-5)
    assert s.rollout(tr[:, 2], 2, 4).shape == (2, 2, 9, 32)
    assert torch.allclose(s.rollout(tr[:, 2], 2, 4), tr[:, 3:5], atol=1e-5)
    # depth scaling starts near identity: g ~ 1
    s2 = Raptor.from_teacher(t, [3, 5], init="teacher")
    assert (s2.rollout(tr[:, 0]) - tr[:, 1:]).norm() / tr[:, 1:].norm() < 1e-2
    # t is the layer number: block 1 sees t = 4, 5 in its segment
    seen = []
    s2.blocks[1].depth_mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].flatten().tolist()))
    s2.rollout(tr[:, 0])
    assert seen == [[4.0], [5.0]]
    seen.clear()
    s2.teacher_forcing(tr[:, 0:6], 0)
    assert seen == [[4.0, 5.0, 4.0, 5.0]]
    with pytest.raises(ValueError, match="start"):
        s.rollout(tr[:, 0], 3, 2)
    assert torch.allclose(s(tr[:, 0]), s.rollout(tr[:, 0]))
    assert s.features(x).shape == (2, 64)


def test_rollout_compiles_fullgraph_and_bf16_autocast():
    t = build_teacher((2, 2), width=32, heads=2, img_size=28)
    tr = t.trajectory(images(2, 28))
    s = Raptor.from_teacher(t, [2], seed=0)
    with torch.no_grad():
        for b in s.blocks:
            b.ls1.fill_(0.5)
            b.ls2.fill_(0.5)
    ref = s.rollout(tr[:, 0])
    compiled = torch.compile(s.rollout, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(tr[:, 0]), ref, atol=1e-5)
    tf = torch.compile(s.teacher_forcing, fullgraph=True, backend="aot_eager")
    assert torch.allclose(tf(tr[:, :4], 0), s.teacher_forcing(tr[:, :4], 0), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = s.rollout(tr[:, 0])
    assert low.dtype == torch.float32
    assert ((low - ref).norm() / (ref - tr[:, :1]).norm()) < 0.05
    # bf16 parameters without autocast (DeepSpeed bf16): the stream stays bf16 end to end
    s16 = copy.deepcopy(s).to(torch.bfloat16)
    out16 = s16.rollout(tr[:, 0].bfloat16())
    assert out16.dtype == torch.bfloat16
    assert ((out16.float() - ref).norm() / (ref - tr[:, :1]).norm()) < 0.25  # bf16 stream rounding
    tf16 = s16.teacher_forcing(tr[:, :4].bfloat16(), 0)
    assert tf16.dtype == torch.bfloat16


def test_student_export_roundtrip(tmp_path):
    t = build_teacher((2, 2), width=32, heads=2, img_size=28)
    s = Raptor.from_teacher(t, [2], seed=1, mlp="swiglu")
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.01 * torch.randn_like(p))
    url = str(tmp_path / "student.safetensors")
    man = save_student(s, url, {"run": "r1", "teacher": {"checkpoint": None}})
    assert man["student"]["boundaries"] == [2] and man["student"]["block"]["mlp"] == "swiglu"
    s2, man2 = load_student(url)
    assert man2 == man and s2.teacher is None
    tr = t.trajectory(images(2, 28))
    assert torch.equal(s2.rollout(tr[:, 0]), s.rollout(tr[:, 0]))
    with pytest.raises(ValueError, match="no teacher attached"):
        s2.features(images(1, 28))
    with pytest.raises(ValueError, match="names no teacher checkpoint"):
        rebuild_student(url)
    s3, t3, _ = rebuild_student(url, teacher=t)
    assert torch.equal(s3.features(images(1, 28)), s.features(images(1, 28)))
    with pytest.raises(CheckpointError, match="not a raptor student"):
        load_student(str(tmp_path / "nothing.safetensors") if False else _plain(tmp_path))


def _plain(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(p))
    return str(p)
