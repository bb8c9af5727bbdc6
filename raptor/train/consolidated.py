"""A stage's training state, whole: what a checkpoint holds so that it resumes at any world size and ZeRO stage.

DeepSpeed's own checkpoints are its partitions: a ZeRO checkpoint made at N data-parallel ranks is
refused at M != N, and one made under ZeRO stage z is read only under z. Here every trained
parameter's fp32 value and both AdamW moments are gathered whole from wherever ZeRO keeps them
(DeepSpeed's ``safe_get_full_*`` fragment API, a collective), with the optimizer's step count, the
learning rates and the LR schedule's position, into one file rank 0 writes. Loading scatters each
tensor back through ``safe_set_full_*`` into whatever partitions the new engine has, so N workers
under ZeRO-z resume at M workers under ZeRO-z' for any N, M >= 1 and z, z' in 0-3.

Why not DeepSpeed's universal checkpoint (``ds_to_universal`` + ``load_universal``): it is an
offline conversion of every rank's shards before a resume, and it does not cover ZeRO-0. The
student is small (ViT-g k=3: 85M parameters, ~1 GB with both moments in fp32), so one consolidated
file costs a gather of that size per checkpoint, which is affordable at checkpoint intervals.
Per-rank state that cannot be consolidated (each rank's RNG) stays in per-rank files beside it.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from raptor.models import Raptor

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-parameter state besides its step count


def trained(student: Raptor) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The parameters the optimizer owns, by their (world-size-independent) names."""
    return ((name, p) for name, p in student.named_parameters() if p.requires_grad)


def _torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch AdamW holding the moments: ZeRO 1-3 wrap it (``.optimizer``); ZeRO-0 uses it as is."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _step_count(optimizer: torch.optim.Optimizer) -> float:
    """AdamW's step count (the same for every parameter: they all step together); 0 before the first step."""
    return next((float(s["step"]) for s in optimizer.state.values() if "step" in s), 0.0)


def gather(engine: Any, student: Raptor) -> dict[str, Any]:
    """The whole training state of ``student`` inside ``engine``; a collective under ZeRO 1-3 (every rank calls).

    Returned on every rank, on the CPU: ``param/NAME`` and ``exp_avg/NAME``, ``exp_avg_sq/NAME``
    (fp32, full shape), ``adam_step``, ``lrs`` (per parameter group) and ``lr_scheduler``.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = _torch_optimizer(engine)
    partitioned = engine.zero_optimization_stage() > 0
    if partitioned:
        _link_moments(engine)
    state: dict[str, Any] = {}
    for name, p in trained(student):
        if partitioned:
            state[f"param/{name}"] = safe_get_full_fp32_param(p).detach().float().cpu()
            for m in MOMENTS:
                state[f"{m}/{name}"] = safe_get_full_optimizer_state(p, m).detach().float().cpu()
        else:
            state[f"param/{name}"] = p.detach().float().cpu().clone()
            own = optimizer.state.get(p, {})
            for m in MOMENTS:
                state[f"{m}/{name}"] = own[m].detach().float().cpu().clone() if m in own else torch.zeros_like(
                    state[f"param/{name}"])
    state["adam_step"] = _step_count(optimizer)
    state["lrs"] = [float(g["lr"]) for g in engine.optimizer.param_groups]
    state["lr_scheduler"] = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else {}
    return state


def scatter(engine: Any, student: Raptor, state: dict[str, Any]) -> None:
    """Load a :func:`gather`-ed state into ``engine`` (any world size, any ZeRO stage); every rank calls it.

    A parameter missing from ``state``, or of another shape, is a ``ValueError`` naming it (a
    checkpoint of another student), raised before anything is changed.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = dict(trained(student))
    for name, p in params.items():
        for kind in ("param", *MOMENTS):
            saved = state.get(f"{kind}/{name}")
            if saved is None or tuple(saved.shape) != tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape):
                raise ValueError(f"its {kind} of {name} is missing or has another shape: a checkpoint of another student")
    extra = sorted(k.split("/", 1)[1] for k in state if k.startswith("param/") and k.split("/", 1)[1] not in params)
    if extra:
        raise ValueError(f"it holds parameters this student lacks ({', '.join(extra[:3])}): a checkpoint of another student")
    optimizer = _torch_optimizer(engine)
    if engine.zero_optimization_stage() > 0:  # the fp32 master partitions and moments this rank keeps
        _link_moments(engine)
        for name, p in params.items():
            safe_set_full_fp32_param(p, state[f"param/{name}"].to(engine.device))
            for m in MOMENTS:
                safe_set_full_optimizer_state(p, state[f"{m}/{name}"].to(engine.device), m)
    else:
        for name, p in params.items():
            own = optimizer.state[p]
            for m in MOMENTS:
                own[m] = state[f"{m}/{name}"].to(p.device, p.dtype).clone()
            own.setdefault("step", _new_step(optimizer, p))
    _set_working_weights(engine, params, state)
    for own in optimizer.state.values():
        if "step" in own:
            own["step"] = torch.full_like(own["step"], state["adam_step"]) if torch.is_tensor(own["step"]) else state["adam_step"]
    for group, lr in zip(engine.optimizer.param_groups, state["lrs"]):
        group["lr"] = lr
    if engine.lr_scheduler is not None and state["lr_scheduler"]:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])


def _link_moments(engine: Any) -> None:
    """Make every master partition's AdamW moments exist and be reachable through the fragment API.

    torch's AdamW creates its moments at the first step, and DeepSpeed's ZeRO 1-2 link them to the
    parameters' fragments once, after the first group's first step, so later groups (here: the
    no-decay group) stay unlinked. A fresh engine has no moments yet: they are created as zeros,
    as the first step would create them, and every group is linked again.
    """
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    optimizer, zero = _torch_optimizer(engine), engine.optimizer
    three = engine.zero_optimization_stage() == 3
    masters = zero.fp32_partitioned_groups_flat if three else zero.single_partition_of_fp32_groups
    for flat in masters:
        own = optimizer.state[flat]
        if "step" not in own:
            own["step"] = _new_step(optimizer, flat)
            for m in MOMENTS:
                own[m] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    if not three:  # ZeRO-3 reads the moments straight from the optimizer's state
        for group, flat in zip(zero.bit16_groups, masters):
            lazy_init_hp_params_optimizer_state(group, flat, optimizer.state)
        zero._hp_optimizer_states_linked = True


def _new_step(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """A step-count tensor where torch's AdamW keeps it: on the parameter's device when fused or capturable."""
    on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    return torch.tensor(0.0, dtype=torch.float32, device=p.device if on_device else "cpu")


def _set_working_weights(engine: Any, params: dict[str, torch.nn.Parameter], state: dict[str, Any]) -> None:
    """The weights the forward pass reads. ZeRO 1-2 keep them apart from the fp32 master partitions
    (each parameter a view into a flat buffer, whole on every rank); ZeRO-3 keeps a partition of each,
    apart from its master, so it is gathered, set and partitioned again."""
    import deepspeed

    values = list(params.values())
    with deepspeed.zero.GatheredParameters(values, modifier_rank=0, enabled=engine.zero_optimization_stage() == 3):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[f"param/{name}"].to(p.device, p.dtype))
