"""``raptor plan SPEC``: the spec mapped onto raptor.perf's memory plan, verdicts and fixes (seconds, no GPU).

The plan's own numbers (activations against live bytes, FLOPs against FlopCounterMode, ZeRO
bookkeeping) are tested in tests/test_perf_memory.py and tests/test_perf_flops.py; these tests
check that the command plans what the runner would run and that its advice is right.
"""

from __future__ import annotations

import json

import pytest

from raptor.cli import main
from raptor.execution import DeepSpeedSettings
from raptor.perf import Setup, StudentShape, TeacherShape, plan
from raptor.service.deploy.sizing import even_boundaries, plan_spec
from raptor.service.spec import load_spec

GIB = 2**30
VITL, VITG = "jobs/distill_vitl14_k3.yaml", "jobs/distill_vitg14_k3.yaml"


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    rc = main(["plan", *argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_distill_k3_fits_and_plans_what_the_runner_runs(capsys):
    """Catches a spec field lost in the mapping (batch, workers, ZeRO stage, precision, buckets): the
    command's stage totals must equal raptor.perf.plan of the setup the runner trains with."""
    rc, out = run_json(capsys, "jobs/distill_k3.yaml", "--device", "H100")
    assert rc == 0 and out["fits"] and out["boundaries"] == [4, 8] and out["boundaries_from"].startswith("an even split")
    t = TeacherShape.from_timm("vit_base_patch14_reg4_dinov2")
    s = StudentShape.from_teacher(t, [4, 8], mlp="swiglu")
    engine = DeepSpeedSettings(zero_stage=2, precision="bf16")  # the spec's deepspeed section
    for stage in (1, 2):
        want = plan(t, s, batch=64, device="H100", world_size=16, deepspeed=engine, stage=stage,
                    reduce_bucket_elems=s.params())
        assert want.setup.precision == "amp"  # bf16 autocast in the fp32 engine, not DeepSpeed's bf16 mode
        got = out["stages"][f"stage{stage}"]
        assert got["setup"] == Setup(batch=64, world_size=16, deepspeed=engine, stage=stage,
                                     reduce_bucket_elems=s.params()).to_dict()
        assert got["total_gib"] == round(want.total / GIB, 3) and got["samples_per_s"] == round(want.samples_per_s, 1)
    zero = out["student_state_gib_by_zero_stage"]
    assert zero["0"] > zero["1"] > zero["2"]  # sharding optimizer states, then gradients
    acts = out["activations_gib"]
    assert acts["no checkpointing"]["stage1"] > acts["every block checkpointed"]["stage1"] > 0
    text = (main(["plan", "jobs/distill_k3.yaml"]), capsys.readouterr().out)[1]
    for needle in ("teacher weights (fp32)", "student gradients (fp32)", "AdamW states (fp32)", "ZeRO-3",
                   "every block checkpointed", "samples/s per GPU", "MFU", "fits: every stage"):
        assert needle in text, needle


def test_a_spec_that_does_not_fit_names_the_switches_that_make_it_fit(capsys):
    """Catches a verdict that misses a stage over budget, or advice (as --set overrides) that does not
    make EVERY stage fit when the changed spec is planned again."""
    overrides = ["--set", "data.batch_size=64", "--set", "deepspeed.gradient_accumulation_steps=1"]
    assert main(["plan", VITG, *overrides]) == 3
    text = capsys.readouterr().out
    assert "DOES NOT FIT: stage 1 needs" in text and "it fits with" in text
    rc, out = run_json(capsys, VITG, *overrides)
    assert rc == 3 and not out["fits"] and out["fixes"]
    for fix in out["fixes"]:
        sets = [o for s in fix["set"] for o in ("--set", s)]
        assert run_json(capsys, VITG, *overrides, *sets)[1]["fits"], fix["set"]
    assert any(f["set"] == ["data.batch_size=32", "deepspeed.gradient_accumulation_steps=2"] for f in out["fixes"])
    assert any(f["set"] == ["deepspeed.activation_checkpointing=true"] for f in out["fixes"])
    speeds = [sum(1 / r for r in f["samples_per_s"].values()) for f in out["fixes"]]
    assert speeds == sorted(speeds)  # fastest first


def test_fixes_are_engines_the_spec_accepts(capsys):
    """Catches advice the spec's own rules reject (ZeRO-3 under the ViT-g spec's compiled blocks stopped
    `raptor plan` with a validation error instead of advising), and --set switches printed out of order."""
    assert load_spec(VITG).deepspeed.compile == "blocks"  # compile=blocks needs ZeRO <= 2
    overrides = ["--set", "deepspeed.zero_stage=0", "--set", "data.batch_size=1",
                 "--set", "deepspeed.gradient_accumulation_steps=1", "--memory-gib", "8"]
    rc, out = run_json(capsys, VITG, *overrides)
    sets = [f["set"] for f in out["fixes"]]
    assert rc == 3 and sets and not any("deepspeed.zero_stage=3" in f for f in sets), sets
    offload = ["deepspeed.zero_stage=1", "deepspeed.offload_optimizer=cpu", "deepspeed.activation_checkpointing=true"]
    assert offload in sets


@pytest.mark.parametrize("spec", [VITL, VITG])
def test_large_teacher_specs_load_and_fit_an_h100(spec, capsys):
    """Catches a ViT-L/g spec that no longer validates, or whose batch / ZeRO / checkpointing choice
    (explained in its header) no longer fits an H100 by the plan, for even and discovered-like boundaries."""
    loaded = load_spec(spec)
    assert loaded.teacher.depth() in (24, 40) and loaded.discovery.boundaries is None  # boundaries from discovery
    for bounds in (None, "20,30" if spec == VITG else "12,18"):
        extra = ["--boundaries", bounds] if bounds else []
        rc, out = run_json(capsys, spec, "--device", "H100", *extra)
        assert rc == 0 and out["fits"], out["stages"]["stage1"]["total_gib"]
    assert plan_spec(loaded, device="H100").stages[2].mfu == pytest.approx(0.35)  # no recomputation in the choice


def test_selective_checkpointing_is_planned_per_block(capsys):
    """Catches a spec's block list planned as all or nothing: its activations lie strictly between."""
    rc, out = run_json(capsys, VITG, "--set", "deepspeed.activation_checkpointing=[0]")
    acts = out["activations_gib"]
    spec_row = next(k for k in acts if k.startswith("blocks [0]"))
    for stage in ("stage1", "stage2"):
        assert acts["every block checkpointed"][stage] < acts[spec_row][stage] < acts["no checkpointing"][stage]
    assert out["stages"]["stage2"]["mfu"] < 0.35  # block 0's recomputed forward


def test_bad_plan_arguments_are_one_line_errors(capsys):
    """Catches a traceback for a user's typo (unknown device, boundaries outside the teacher)."""
    assert main(["plan", "jobs/distill_k3.yaml", "--device", "Voodoo 5"]) == 2
    assert "unknown device 'Voodoo 5'" in capsys.readouterr().err
    assert main(["plan", "jobs/distill_k3.yaml", "--boundaries", "7,14"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--boundaries" in err
    assert main(["plan", "jobs/distill_k3.yaml", "--boundaries", "a,b"]) == 2


def test_even_split():
    """Catches an even split that leaves a segment empty or misses the depth."""
    assert even_boundaries(12, 3) == [4, 8] and even_boundaries(40, 3) == [13, 26] and even_boundaries(12, 1) == []
