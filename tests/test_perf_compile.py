"""raptor.perf.compile: the compiled teacher trajectory and stage loss equal the eager ones.

Graph capture is checked with the cheap ``aot_eager`` backend (fullgraph=True: any graph break
fails); the numerics with inductor on a tiny model (slow: C++ compilation of three graphs, ~2 min
cold on 2 shared cores, seconds once inductor's cache holds them). Stated tolerances: fp32
compiled vs eager losses and gradients within 1e-4 relative (reassociation only; measured 5e-8);
bf16 autocast compiled vs eager within 2e-2 relative (inductor fuses and rounds bf16
intermediates differently; measured 3e-3).
"""

from __future__ import annotations

import pytest
import torch

from raptor.distill import StageConfig, distill_loss
from raptor.models import Raptor, Teacher
from raptor.perf.compile import CompileCounter, CompiledLoss, compile_blocks, compile_trajectory


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny(depth: int = 4, boundaries=(1, 3), mlp: str = "swiglu"):
    torch.manual_seed(0)
    t = Teacher.from_timm("vit_base_patch14_reg4_dinov2", img_size=28, embed_dim=32, depth=depth, num_heads=2)
    return t, Raptor.from_teacher(t, list(boundaries), mlp=mlp, seed=0), torch.randn(2, 3, 28, 28)


def loss_and_grads(loss_fn, student, traj, cfg, step, amp=False):
    student.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss, metrics = loss_fn(student, traj, cfg, step)
    loss.backward()
    return loss.detach(), metrics, torch.cat([p.grad.flatten() for p in student.parameters()])


def test_stage1_anneal_compiles_one_graph_per_phase_without_breaks():
    """Catches lambda baked into the graph (a recompile every anneal step, then silent eager
    fallback), a graph break anywhere in the losses or rollouts (fullgraph raises), and compiled
    losses or metrics that differ from eager ones."""
    teacher, student, images = tiny()
    counter = CompileCounter()
    traj = compile_trajectory(teacher, counter=counter, backend="aot_eager")(images)
    torch.testing.assert_close(traj, teacher.trajectory(images))
    compiled = CompiledLoss(counter, backend="aot_eager")
    cfg = StageConfig.paper_stage1(steps=12)  # lambda 1 at step 0, annealed over steps 1-2, 0 from 3
    for step in range(6):
        got, metrics, grads = loss_and_grads(compiled, student, traj, cfg, step)
        want, ref_metrics, ref_grads = loss_and_grads(distill_loss, student, traj, cfg, step)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grads, ref_grads)
        assert metrics.keys() == ref_metrics.keys()
        torch.testing.assert_close(metrics["lambda"], ref_metrics["lambda"])
    assert counter.graphs == {"trajectory": 1, "stage1/tf": 1, "stage1/tf+ar": 1, "stage1/ar": 1}
    assert counter.recompiles == 0
    compiled(student, teacher.trajectory(images[:1]), cfg, 6)  # a new batch shape is a recompile
    assert counter.recompiles == 1
    assert counter.as_dict()["compile/recompiles"] == 1


def test_compiled_stage2_with_checkpointing_and_autocast_matches_eager():
    """Catches activation checkpointing or autocast breaking graph capture or the gradients."""
    teacher, student, images = tiny()
    traj = teacher.trajectory(images)
    cfg = StageConfig.paper_stage2(steps=4)
    want = loss_and_grads(distill_loss, student, traj, cfg, 0, amp=True)
    student.set_checkpointing(True)
    compiled = CompiledLoss(backend="aot_eager")
    got = loss_and_grads(compiled, student, traj, cfg, 0, amp=True)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[2], want[2])
    assert compiled.counter.graphs == {"stage2": 1}


def test_regional_compilation_shares_one_graph_across_blocks():
    """Catches per-block compilation that compiles every block separately (compile time growing
    with depth, and dynamo's cache limit falling back to eager past 8 blocks) or changes results."""
    teacher, student, images = tiny(depth=10, boundaries=(3, 6))
    traj = teacher.trajectory(images)
    cfg = StageConfig.paper_stage2(steps=4)
    want = loss_and_grads(distill_loss, student, traj, cfg, 0)
    counter = compile_blocks(teacher.blocks, "teacher", backend="aot_eager")
    compile_blocks(student.blocks, "student", counter=counter, backend="aot_eager")
    torch.testing.assert_close(teacher.trajectory(images), traj)
    got = loss_and_grads(distill_loss, student, traj, cfg, 0)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[2], want[2])
    assert counter.graphs == {"teacher": 1, "student": 2}  # a_0 does not require grad, later inputs do
    assert counter.recompiles == 0
    assert list(student.state_dict()) == list(Raptor.from_teacher(teacher, [3, 6]).state_dict())


@pytest.mark.slow
def test_inductor_matches_eager():
    """Catches inductor miscompiling the hot path: the teacher's trajectory, the stage-2 loss and
    gradients in fp32 (1e-4), and stage 1 during the anneal under bf16 autocast (2e-2)."""
    teacher, student, images = tiny(depth=3, boundaries=(1,))
    counter = CompileCounter()
    traj = compile_trajectory(teacher, amp=True, counter=counter)(images)
    assert traj.dtype == torch.float32
    torch.testing.assert_close(traj, teacher.trajectory(images, amp=True), rtol=1e-4, atol=1e-5)
    compiled = CompiledLoss(counter)
    for cfg, step, amp, tol in [(StageConfig.paper_stage2(steps=4), 0, False, 1e-4),
                                (StageConfig.paper_stage1(steps=8), 1, True, 2e-2)]:
        got = loss_and_grads(compiled, student, traj, cfg, step, amp=amp)
        want = loss_and_grads(distill_loss, student, traj, cfg, step, amp=amp)
        torch.testing.assert_close(got[0], want[0], rtol=tol, atol=0)
        assert (got[2] - want[2]).abs().max() <= tol * want[2].abs().max()
    assert counter.graphs == {"trajectory": 1, "stage2": 1, "stage1/tf+ar": 1}
