"""Accelerator peaks and memory, and model FLOP utilisation (MFU) against them.

Peaks are the vendors' datasheet DENSE figures (no 2:4 sparsity) in TFLOP/s, the convention MFU
is usually quoted in (PaLM, torchtitan). Measured matmul peaks are lower (an H100 SXM reaches
~750-800 of its 989 bf16 TFLOP/s in large GEMMs), so pass ``peak_tflops`` to compare against a
measured figure instead. ``fp32`` is the non-tensor-core peak (TF32 off, as the fp32 benches run);
``tf32`` is the tensor-core TF32 peak.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from raptor.errors import UserError

GIB = 2**30


class UnknownDeviceError(UserError):
    """A device name the peak table does not know (pass ``peak_tflops`` / ``memory_gib``)."""


@dataclass(frozen=True)
class DeviceSpec:
    """Dense peaks (TFLOP/s by precision) and memory of one accelerator."""

    name: str
    peaks: dict[str, float] = field(default_factory=dict)  # "bf16" | "fp32" | "tf32" -> TFLOP/s
    memory_gib: float = 0.0  # about what torch.cuda reports as total memory

    def peak(self, precision: str = "bf16") -> float:
        """Dense peak of ``precision`` in TFLOP/s."""
        key = "bf16" if precision in ("amp", "bf16") else precision
        if key not in self.peaks:
            raise UnknownDeviceError(f"{self.name}: no {precision} peak in the table (known: {sorted(self.peaks)})")
        return self.peaks[key]


# name -> (pattern matched against torch.cuda.get_device_name(), bf16, fp32, tf32, memory GiB);
# first match wins, so the specific variants come before the family name
_TABLE: list[tuple[str, str, float, float, float, float]] = [
    ("H100-NVL", r"H100.*NVL", 835.5, 60.0, 417.8, 93.5),
    ("H100-PCIe", r"H100.*PCIe", 756.5, 51.2, 378.0, 79.1),
    ("H100", r"H100", 989.4, 66.9, 494.7, 79.1),  # SXM5
    ("H200-NVL", r"H200.*NVL", 835.5, 60.0, 417.8, 139.8),
    ("H200", r"H200", 989.4, 66.9, 494.7, 139.8),  # SXM
    ("B200", r"B200", 2250.0, 75.0, 1100.0, 178.0),
    ("A100-40GB", r"A100.*40GB", 312.0, 19.5, 156.0, 39.4),
    ("A100", r"A100", 312.0, 19.5, 156.0, 79.1),  # 80 GB, SXM4 and PCIe
    ("L40S", r"L40S", 362.1, 91.6, 183.0, 44.4),
    ("L40", r"L40\b", 181.0, 90.5, 90.5, 44.4),
    ("L4", r"\bL4\b", 121.0, 30.3, 60.0, 22.0),
    ("A10", r"\bA10\b", 125.0, 31.2, 62.5, 22.0),
    ("MI300X", r"MI300X", 1307.4, 163.4, 653.7, 191.5),
]

DEVICES: dict[str, DeviceSpec] = {
    name: DeviceSpec(name, {"bf16": bf16, "fp32": fp32, "tf32": tf32}, mem)
    for name, _, bf16, fp32, tf32, mem in _TABLE
}


def lookup(name: str) -> DeviceSpec:
    """A table entry by its key (``"H100"``) or by a device name as CUDA reports it
    (``"NVIDIA H100 80GB HBM3"``); case-insensitive."""
    for key, spec in DEVICES.items():
        if key.lower() == name.lower():
            return spec
    for key, pattern, *_ in _TABLE:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return DEVICES[key]
    raise UnknownDeviceError(
        f"unknown device {name!r}: known {', '.join(DEVICES)}; pass peak_tflops (--peak-tflops) and memory_gib"
    )


def current_device(index: int | None = None) -> DeviceSpec:
    """The CUDA device in use: the table's peaks with the memory torch reports for it."""
    if not torch.cuda.is_available():
        raise UnknownDeviceError("no CUDA device: pass a device name or peak_tflops")
    idx = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(idx)
    spec = lookup(props.name)
    return DeviceSpec(props.name, dict(spec.peaks), props.total_memory / GIB)


def peak_tflops(
    device: str | DeviceSpec | None = None, precision: str = "bf16", override: float | None = None
) -> float:
    """The peak to divide by: ``override`` (e.g. ``--peak-tflops``) if given, else the table's
    dense peak of ``device`` (a name, a spec, or None = the current CUDA device)."""
    if override is not None:
        if override <= 0:
            raise UserError(f"peak_tflops must be positive, got {override}")
        return float(override)
    spec = device if isinstance(device, DeviceSpec) else current_device() if device is None else lookup(device)
    return spec.peak(precision)


def mfu(samples_per_s: float, flops_per_sample: float, peak: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the peak (``peak`` in TFLOP/s)."""
    return samples_per_s * flops_per_sample / (peak * 1e12)
