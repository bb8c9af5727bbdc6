"""Performance models and tools: FLOPs, MFU, the per-GPU memory plan, the compiled hot path.

Plain PyTorch (no Ray, no DeepSpeed, no job spec), so benchmarks, ``raptor plan`` and the
runner's logs all use the same FLOP model. The memory plan takes the engine's settings as the runner
does (:class:`raptor.execution.DeepSpeedSettings`), not a copy of them.
"""

from raptor.perf.compile import CompileCounter, CompiledLoss, compile_blocks, compile_trajectory
from raptor.perf.devices import DEVICES, DeviceSpec, UnknownDeviceError, current_device, lookup, mfu, peak_tflops
from raptor.perf.flops import BlockShape, CallGroup, StudentShape, TeacherShape, flops_per_sample, stage_terms
from raptor.perf.memory import Activations, Plan, PlanError, Setup, Suggestion, activation_bytes, plan

__all__ = [
    "DEVICES",
    "Activations",
    "BlockShape",
    "CallGroup",
    "CompileCounter",
    "CompiledLoss",
    "DeviceSpec",
    "Plan",
    "PlanError",
    "Setup",
    "StudentShape",
    "Suggestion",
    "TeacherShape",
    "UnknownDeviceError",
    "activation_bytes",
    "compile_blocks",
    "compile_trajectory",
    "current_device",
    "flops_per_sample",
    "lookup",
    "mfu",
    "peak_tflops",
    "plan",
    "stage_terms",
]
