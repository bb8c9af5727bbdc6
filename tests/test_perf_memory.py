"""raptor.perf.memory: the activation model against real steps on CPU, and the plan's bookkeeping.

Measured: the bytes autograd saves (saved_tensors_hooks) and the live-tensor peak of a real
``distill_loss`` step. Stated tolerances: saved bytes within 1% (fp32 and autocast; DeepSpeed-style
bf16 saves LayerNorm statistics in bf16 on CPU, fp32 on CUDA: within 1% too); the peak within 2%
without checkpointing and within 15% with it (backward's temporaries of one recomputed block).
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from raptor.distill import StageConfig, stage1_loss, stage2_loss
from raptor.errors import UserError
from raptor.execution import DEEPSPEED_BUCKET, DeepSpeedSettings
from raptor.models import Raptor, Teacher
from raptor.perf.flops import StudentShape, TeacherShape
from raptor.perf.memory import PlanError, Setup, activation_bytes, plan, teacher_working_bytes
from tests.memtrack import LiveBytes, saved_bytes

BASE = "vit_base_patch14_reg4_dinov2"
GIANT = "vit_giant_patch14_reg4_dinov2"
GIB = 2**30


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def setup_step(mlp: str, precision: str, *, depth: int = 6, batch: int = 6, img: int = 70):
    """A small real teacher/student pair and its trajectory, in the precision's dtypes."""
    torch.manual_seed(0)
    t = Teacher.from_timm(BASE, img_size=img, embed_dim=32, depth=depth, num_heads=2)
    s = Raptor.from_teacher(t, [depth // 3, 2 * depth // 3], mlp=mlp, seed=0)
    traj = t.trajectory(torch.randn(batch, 3, img, img))
    if precision == "bf16":  # DeepSpeed's bf16 mode: bf16 weights and inputs
        s, traj = s.to(torch.bfloat16), traj.bfloat16()
    for p in s.parameters():  # gradients exist before the step, as in training
        p.grad = torch.zeros_like(p)
    external = [traj, *s.parameters(), *s.buffers(), *(p.grad for p in s.parameters())]
    return s, traj, external


def loss_fn(s, traj, stage: int, precision: str):
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "amp"):
            if stage == 2:
                return stage2_loss(s, traj, StageConfig.paper_stage2(steps=10))[0]
            return stage1_loss(s, traj, StageConfig.paper_stage1(steps=10), lam=0.5)[0]
    return run


def estimate(s, batch, stage, precision, checkpointing=False):
    tf, ar = (False, True) if stage == 2 else (True, True)
    return activation_bytes(StudentShape.from_student(s), batch, stage=stage, precision=precision,
                            checkpointing=checkpointing, tf=tf, ar=ar)


@pytest.mark.parametrize("stage", [2, 1])
@pytest.mark.parametrize("precision", ["fp32", "amp", "bf16"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_saved_activations_equal_saved_tensor_hooks(stage, precision, mlp):
    """Catches a miscounted saved tensor per block application (residual stream, matmul operands,
    MLP hidden, norm statistics), the per-layer depth-scaling rows, the autocast weight copies, or
    stage 1's terms (teacher forcing and AR during the anneal)."""
    s, traj, external = setup_step(mlp, precision)
    measured, loss = saved_bytes(loss_fn(s, traj, stage, precision), external)
    assert loss.requires_grad
    assert estimate(s, 6, stage, precision).saved == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("stage,precision,mlp", [(2, "fp32", "gelu"), (2, "amp", "swiglu"), (1, "amp", "gelu"),
                                                 (2, "bf16", "swiglu")])
@pytest.mark.parametrize("checkpointing", [False, True, (1,), (0, 2)])
def test_activation_peak_equals_live_bytes(stage, precision, mlp, checkpointing):
    """Catches a peak model that misses the loss's transients, the recomputed block under
    checkpointing, that checkpointing keeps only each application's input, or that selective
    checkpointing (some blocks) keeps the wrong applications or autocast weight copies."""
    s, traj, external = setup_step(mlp, precision, depth=4, batch=8)
    s.set_checkpointing(checkpointing)
    with LiveBytes(external) as live:
        loss = loss_fn(s, traj, stage, precision)()
        after_forward = live.current
        loss.backward()
    est = estimate(s, 8, stage, precision, checkpointing)
    assert est.saved == pytest.approx(after_forward, rel=0.01)
    assert est.peak == pytest.approx(live.peak, rel=0.15 if checkpointing else 0.02)
    if checkpointing not in (False, True):  # between none and all
        assert estimate(s, 8, stage, precision, True).saved < est.saved < estimate(s, 8, stage, precision).saved
    assert all(torch.count_nonzero(p.grad) for p in s.parameters() if p.ndim > 1)


def test_checkpointing_recomputes_the_same_gradients():
    """Catches set_checkpointing changing the math (it must only trade memory for compute)."""
    grads = []
    for enabled in (False, True, [1]):
        s, traj, _ = setup_step("swiglu", "fp32")
        s.set_checkpointing(enabled)
        loss_fn(s, traj, 2, "fp32")().backward()
        grads.append(torch.cat([p.grad.flatten() for p in s.parameters()]))
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(grads[2], grads[0])
    with pytest.raises(ValueError, match="out of range"):
        s.set_checkpointing([5])


@pytest.mark.parametrize("name,amp", [(BASE, False), (GIANT, True)])
def test_teacher_working_set_equals_live_bytes(name, amp):
    """Catches a wrong transient of the teacher's no-grad forward (GELU vs SwiGLU, autocast)."""
    t = Teacher.from_timm(name, img_size=70, embed_dim=48, depth=3, num_heads=4)
    x = torch.randn(5, 3, 70, 70)
    with LiveBytes([x, *t.parameters(), *t.buffers()]) as live:
        traj = t.trajectory(x, amp=amp)
    working = teacher_working_bytes(TeacherShape.from_teacher(t), 5, "amp" if amp else "fp32")
    assert working == pytest.approx(live.peak - traj.nbytes, rel=0.01)


def vit_g():
    t = TeacherShape.from_timm(GIANT)
    return t, StudentShape.from_teacher(t, [20, 30])


def test_zero_stages_partition_what_they_should():
    """Catches ZeRO bookkeeping errors: stage 1 shards AdamW states, 2 also gradients, 3 also
    parameters; offload moves the optimizer to host memory; bf16 mode halves parameters."""
    t, s = vit_g()
    P = s.params()
    mem = {z: plan(t, s, batch=8, world_size=8, deepspeed=DeepSpeedSettings(zero_stage=z)).memory for z in range(4)}
    assert mem[0]["AdamW states (fp32)"] == 8 * P and mem[1]["AdamW states (fp32)"] == 8 * P // 8
    assert mem[1]["student gradients (fp32)"] == 4 * P and mem[2]["student gradients (fp32)"] == 4 * P // 8
    assert mem[2]["student parameters (fp32)"] == 4 * P and mem[3]["student parameters (fp32)"] == 4 * P // 8
    one = plan(t, s, batch=8, deepspeed=DeepSpeedSettings(zero_stage=3)).memory  # one GPU: nothing to shard
    assert one["student parameters (fp32)"] + one["ZeRO-3 gathered parameters"] == 4 * P
    off = plan(t, s, batch=8, world_size=8, deepspeed=DeepSpeedSettings(zero_stage=2, offload_optimizer="cpu"))
    assert off.memory["AdamW states (fp32)"] == 0 and off.cpu_memory
    low = plan(t, s, batch=8, deepspeed_bf16=True)
    assert low.memory["student parameters (bf16)"] == 2 * P
    assert plan(t, s, batch=8, teacher_dtype="bf16").total < plan(t, s, batch=8).total


def test_plan_advice_fits_and_max_batch_is_the_boundary():
    """Catches advice that does not fit when re-planned, a wrong max batch, or a checkpointing
    throughput that ignores the recomputed forward."""
    t, s = vit_g()
    p = plan(t, s, batch=128, device="H100")
    assert not p.fits and p.suggestions
    for sug in p.suggestions:
        again = plan(t, s, device="H100", **vars(sug.setup))
        assert again.fits, sug.change
    assert any("checkpointing" in sug.change for sug in p.suggestions)
    split = [sug.setup.batch for sug in p.suggestions if "accumulation" in sug.change]
    assert split and all(128 % b == 0 and b <= p.max_batch for b in split)  # same effective batch
    assert plan(t, s, batch=p.max_batch).fits and not plan(t, s, batch=p.max_batch + 1).fits
    ckpt = plan(t, s, batch=128, deepspeed=DeepSpeedSettings(activation_checkpointing=True))
    assert ckpt.fits and ckpt.samples_per_s < p.samples_per_s and ckpt.mfu < ckpt.utilisation
    assert not plan(t, s, batch=64).fits and plan(t, s, batch=64, device="H200").fits  # 80 vs 141 GB
    text = p.table()
    assert "DOES NOT FIT" in text and "activation checkpointing" in text and "AdamW" in text
    assert plan(t, s, batch=8).to_dict()["fits"] is True


def test_plan_bad_input_is_one_line_user_error():
    """Catches impossible setups passing silently: a modelling input out of range (batch, stage,
    storage dtype, DeepSpeed's bf16 mode over an fp32 engine) or an unknown device."""
    t, s = vit_g()
    for kw, msg in [(dict(stage=3), "stage"), (dict(teacher_dtype="fp16"), "teacher_dtype"),
                    (dict(deepspeed=DeepSpeedSettings(precision="fp32"), deepspeed_bf16=True), "deepspeed_bf16"),
                    (dict(deepspeed={"zero_stage": 3}), "DeepSpeedSettings")]:
        with pytest.raises(PlanError, match=msg):
            plan(t, s, batch=8, **kw)
    with pytest.raises(UserError, match="unknown device"):
        plan(t, s, batch=8, device="Voodoo 5")
    with pytest.raises(UserError, match="batch"):
        Setup(batch=0)


def test_engine_rules_are_the_settings_own():
    """Catches the plan accepting an engine the runner would reject (ZeRO stage 4, an unknown
    precision, parameter offload without ZeRO-3, optimizer offload without ZeRO): the rules are
    DeepSpeedSettings's validators, and a setup changed by the advice goes through them too."""
    for kw, msg in [(dict(zero_stage=4), "zero_stage"), (dict(precision="fp16"), "precision"),
                    (dict(offload_param="cpu", zero_stage=2), "zero_stage 3"),
                    (dict(offload_optimizer="cpu", zero_stage=0), "zero_stage >= 1")]:
        with pytest.raises(ValidationError, match=msg):
            DeepSpeedSettings(**kw)
    compiled = Setup(batch=8, deepspeed=DeepSpeedSettings(compile="blocks"))
    with pytest.raises(ValidationError, match="zero_stage <= 2"):
        compiled.with_deepspeed(zero_stage=3)
    t, s = vit_g()
    advice = {compile: plan(t, s, batch=1, world_size=16, memory_gib=8, reduce_bucket_elems=s.params(),
                            deepspeed=DeepSpeedSettings(zero_stage=0, compile=compile)).suggestions
              for compile in ("auto", "blocks")}
    assert any(sug.setup.zero_stage == 3 for sug in advice["auto"])
    assert advice["blocks"] and all(sug.setup.zero_stage < 3 for sug in advice["blocks"])


def test_setup_reads_the_engine_settings():
    """Catches a derived value that drifts from the runner's engine: autocast for auto and bf16 (the
    plan is for GPUs), fp32 for fp32, DeepSpeed's bf16 mode only when asked; the block list sorted;
    offload flags from the offload devices; the bucket DeepSpeed allocates by default."""
    ds = DeepSpeedSettings
    modelled = [Setup(batch=1, deepspeed=ds(precision=p)).precision for p in ("auto", "bf16", "fp32")]
    assert modelled == ["amp", "amp", "fp32"]
    assert Setup(batch=1, deepspeed_bf16=True).precision == "bf16"
    ck = Setup(batch=1, deepspeed=ds(activation_checkpointing=[2, 0]))
    assert ck.checkpointing == (0, 2) and ck.checkpointing_label == "blocks [0, 2]"
    assert Setup(batch=1, deepspeed=ds(activation_checkpointing=[])).checkpointing_label == "off"
    assert Setup(batch=1, deepspeed=ds(activation_checkpointing=True)).checkpointing_label == "on"
    off = Setup(batch=1, deepspeed=ds(zero_stage=3, offload_param="nvme", offload_optimizer="cpu"))
    assert off.zero_stage == 3 and off.offload_params and off.offload_optimizer
    assert not Setup(batch=1).offload_params and not Setup(batch=1).offload_optimizer
    assert Setup(batch=1).reduce_bucket_elems == DEEPSPEED_BUCKET
    assert Setup(batch=1, deepspeed=ds(zero_stage=3)).to_dict()["deepspeed"]["zero_stage"] == 3
