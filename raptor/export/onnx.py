"""ONNX export of a self-contained student: one image size, a dynamic batch, the recurrence unrolled.

The position embeddings are resampled once for the chosen size (:meth:`RaptorViT.at_resolution`),
so the graph holds no interpolation (DINOv2's dynamic interpolation is what breaks its ONNX exports);
the L block applications are traced as L copies of the k shared blocks' operations over the same
weights. Outputs: ``features`` (the 2D readout ``[cls, mean patch]``) and, when the model has a
head, ``logits``. :func:`check_onnx` runs the file in onnxruntime against PyTorch.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from raptor import storage
from raptor.models import RaptorViT

log = logging.getLogger(__name__)

PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the export extra


def require_onnx() -> None:
    """Fail in one line, before anything is written, when the export extra is not installed."""
    import importlib.util

    from raptor.errors import UserError

    absent = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if absent:
        raise UserError(f"an ONNX export needs {', '.join(absent)} (pip install 'raptor[export]')")


class _Outputs(nn.Module):
    """images -> (features, logits) or (features,): what the ONNX graph returns."""

    def __init__(self, model: RaptorViT):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.features(images)
        return (features, self.model.head(features)) if self.model.head_name is not None else (features,)


def output_names(model: RaptorViT) -> list[str]:
    return ["features", "logits"] if model.head_name is not None else ["features"]


def export_onnx(model: RaptorViT, url: str, size: int) -> str:
    """Write the model for ``size`` px images (a multiple of the patch size) to ``url`` (any fsspec URL)."""
    fixed = model.at_resolution(size).float().eval()  # ValueError naming the size when it is not a multiple
    example = torch.zeros(2, 3, size, size)  # batch 2: a batch of 1 would be specialised away
    batch = torch.export.Dim("batch", min=1, max=65536)
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            torch.onnx.export(_Outputs(fixed).eval(), (example,), str(path), input_names=["images"],
                              output_names=output_names(model), dynamic_shapes={"images": {0: batch}},
                              dynamo=True, external_data=False, verbose=False)
            storage.write_bytes(url, path.read_bytes())
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    log.info("onnx: %s (%d px, dynamic batch)", url, size)
    return url


def check_onnx(url: str, model: RaptorViT, size: int, batches: Sequence[int] = (1, 8), seed: int = 0) -> float:
    """The largest absolute difference between onnxruntime's outputs and PyTorch's on random images."""
    import onnxruntime as ort

    session = ort.InferenceSession(storage.read_bytes(url), providers=["CPUExecutionProvider"])
    fixed = _Outputs(model.at_resolution(size).float()).eval()
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batches:
        images = torch.randn(b, 3, size, size, generator=g)
        got = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            want = fixed(images)
        worst = max(worst, *(float(abs(o - w.numpy()).max()) for o, w in zip(got, want)))
    return worst
