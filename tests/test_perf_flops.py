"""raptor.perf.flops and devices: parameter and FLOP counts exactly equal to real modules'.

FLOPs are checked against ``torch.utils.flop_counter.FlopCounterMode`` on real teachers and students.
On CPU, SDPA runs a fused kernel the counter has no formula for, so the counted runs use the MATH
backend, which computes attention as the two batched products the model counts (QK^T and AV).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from raptor.distill import StageConfig, stage1_loss, stage2_loss
from raptor.models import Raptor, Teacher
from raptor.perf import devices
from raptor.perf.flops import StudentShape, TeacherShape, flops_per_sample

DINOV2 = [f"vit_{s}_patch14_reg4_dinov2" for s in ("small", "base", "large", "giant")]
BASE, GIANT = DINOV2[1], DINOV2[3]
SMALL = dict(img_size=42, embed_dim=32, depth=6, num_heads=2)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def counted(fn) -> int:
    """Matmul FLOPs of ``fn()`` as FlopCounterMode counts them (attention through its matmuls)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def small_teacher(name: str = BASE, **kw) -> Teacher:
    torch.manual_seed(0)
    return Teacher.from_timm(name, **{**SMALL, **kw})


@pytest.mark.parametrize("name", DINOV2 + ["vit_base_patch14_dinov2", "vit_small_patch16_224"])
def test_teacher_params_equal_timm_module_sizes(name):
    """Catches a wrong count of any part (pos_embed rows, registers, SwiGLU's packed fc1, LayerScale,
    qkv bias) for the real DINOv2 S/B/L/g sizes (built on the meta device) and other timm ViTs."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, img_size=224, num_classes=0)
    assert TeacherShape.from_timm(name).params() == sum(p.numel() for p in model.parameters())


def test_dinov2_shapes_are_the_papers():
    """Catches reading the wrong attributes: METHOD.md's dims, depths, heads, MLP kinds, N = 261."""
    got = [(s.block.width, s.depth, s.block.num_heads, s.block.mlp, s.num_tokens)
           for s in map(TeacherShape.from_timm, DINOV2)]
    assert got == [(384, 12, 6, "gelu", 261), (768, 12, 12, "gelu", 261), (1024, 24, 16, "gelu", 261),
                   (1536, 40, 24, "swiglu", 261)]
    assert TeacherShape.from_timm(GIANT).block.mlp_hidden == 4096


def test_teacher_with_head_and_student_params_equal_real_modules():
    """Catches a miscounted linear head, depth-scaling MLP, or SwiGLU student over a GELU teacher."""
    t = small_teacher()
    t.set_head(torch.randn(7, 64))
    assert TeacherShape.from_teacher(t).params() == sum(p.numel() for p in t.parameters())
    for kw in (dict(), dict(mlp="swiglu"), dict(depth_scaling=False), dict(mlp="gelu", mlp_hidden=48)):
        s = Raptor.from_teacher(t, [2, 4], seed=0, **kw)
        real = sum(p.numel() for p in s.parameters())
        assert StudentShape.from_student(s).params() == real, kw
        built = StudentShape.from_teacher(TeacherShape.from_teacher(t), [2, 4], **kw)
        assert built == StudentShape.from_student(s), kw


@pytest.mark.parametrize("name", [BASE, GIANT])
def test_teacher_trajectory_flops_equal_flop_counter(name):
    """Catches a wrong patch-embedding, attention (QK^T, AV) or GELU/SwiGLU MLP term."""
    t = small_teacher(name)
    images = torch.randn(3, 3, 42, 42)
    assert TeacherShape.from_teacher(t).forward_flops(3) == counted(lambda: t.trajectory(images))


def _step(loss_fn):
    def run():
        loss, _ = loss_fn()
        loss.backward()
    return run


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_stage2_step_flops_equal_flop_counter(mlp):
    """Catches a wrong backward factor, a missing depth-scaling term or a per-sample/per-batch mix-up
    (the rollout evaluates the gains once per layer for the whole batch)."""
    t = small_teacher()
    traj = t.trajectory(torch.randn(3, 3, 42, 42))
    for depth_scaling in (True, False):
        s = Raptor.from_teacher(t, [2, 4], mlp=mlp, depth_scaling=depth_scaling, seed=0)
        cfg = StageConfig.paper_stage2(steps=10)
        shape = StudentShape.from_student(s)
        assert shape.step_flops(2, 3) == counted(_step(lambda: stage2_loss(s, traj, cfg)))
        with torch.no_grad():
            assert shape.step_flops(2, 3, backward=False) == counted(lambda: stage2_loss(s, traj, cfg))


@pytest.mark.parametrize("lam,horizon,blocks", [(1.0, None, None), (0.0, None, None), (0.5, None, None),
                                                 (0.5, 2, None), (0.3, 1, [0, 2])])
def test_stage1_step_flops_equal_flop_counter(lam, horizon, blocks):
    """Catches miscounting teacher forcing (n layers in one call), AR (S starts x H steps), the
    anneal (both terms) or trained-block subsets."""
    t = small_teacher()
    traj = t.trajectory(torch.randn(2, 3, 42, 42))
    s = Raptor.from_teacher(t, [1, 4], mlp="swiglu", seed=0)  # segments of 1, 3 and 2 layers
    cfg = StageConfig.paper_stage1(steps=10, horizon=horizon)
    want = counted(_step(lambda: stage1_loss(s, traj, cfg, lam=lam, blocks=blocks)))
    got = StudentShape.from_student(s).step_flops(1, 2, tf=lam > 0, ar=lam < 1, horizon=horizon, blocks=blocks)
    assert got == want


def test_reference_mfu_of_the_issue():
    """Issue 11: the compiled ViT-B/14-reg k=3 SwiGLU stage-2 student step at 1,904 samples/s is ~45%
    MFU against 790 TFLOP/s. Catches a FLOP model off by any constant factor (e.g. forward-only)."""
    t = TeacherShape.from_timm(BASE)
    s = StudentShape.from_teacher(t, [7, 10], mlp="swiglu")
    student_only = flops_per_sample(s)
    assert abs(devices.mfu(1904, student_only, 790) - 0.45) < 0.01
    with_teacher = flops_per_sample(s, t)
    assert with_teacher - student_only == pytest.approx(t.forward_flops(1))


def test_device_table_and_overrides():
    """Catches a table lookup that matches the wrong card (H100 PCIe as SXM, L40S as L4) or an
    override that is ignored."""
    assert devices.lookup("NVIDIA H100 80GB HBM3").name == "H100"
    assert devices.lookup("NVIDIA H100 PCIe").name == "H100-PCIe"
    assert devices.lookup("NVIDIA H200").peak("bf16") == pytest.approx(989.4)
    assert devices.lookup("NVIDIA L40S").name == "L40S"
    assert devices.lookup("NVIDIA L4").name == "L4"
    assert devices.lookup("NVIDIA A100-SXM4-40GB").memory_gib < 40
    assert devices.lookup("a100").peak("fp32") == pytest.approx(19.5)
    assert devices.peak_tflops("H100", override=790) == 790
    assert devices.peak_tflops("H100", precision="amp") == devices.peak_tflops("H100", precision="bf16")
    with pytest.raises(devices.UnknownDeviceError, match="--peak-tflops"):
        devices.lookup("Voodoo 5")
    with pytest.raises(ValueError, match="positive"):
        devices.peak_tflops("H100", override=0)
