"""Writing a self-contained student in each format (:data:`~raptor.export.formats.FORMATS`)."""

from __future__ import annotations

import logging
from typing import Any, Iterable

from raptor import storage
from raptor.errors import UserError
from raptor.export.formats import FOLDER, FORMATS, SAFETENSORS_FILE, onnx_file
from raptor.models import RaptorViT, save_folder, save_student

log = logging.getLogger(__name__)

ONNX_TOLERANCE = 1e-4  # onnxruntime vs PyTorch, fp32: what a correct graph stays within


def write_exports(model: RaptorViT, out_url: str, formats: Iterable[str], *, extra: dict[str, Any] | None = None,
                  resolution: int | None = None) -> dict[str, str]:
    """Write ``model`` to ``out_url`` (a folder: path or fsspec URL) in each of ``formats`` -> format -> URL.

    ``extra``: the manifest's provenance sections (teacher, run, spec, report, stats), kept in every
    format and rendered into the model card; ``resolution``: the ONNX graph's image size (default:
    the model's own). Everything is checked before anything is written: the formats, the ONNX packages
    and the resolution (a :class:`UserError` naming it). An ONNX file is run by onnxruntime against
    PyTorch once written, and one that differs by more than :data:`ONNX_TOLERANCE` fails the export.
    """
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"export formats {unknown} are not among {list(FORMATS)}")
    size = resolution or model.geometry.img_size
    if "onnx" in formats:
        from raptor.export.onnx import require_onnx

        require_onnx()
        p = model.patch_embed.patch_size
        if size <= 0 or size % p:
            raise UserError(f"the ONNX resolution {size} is not a positive multiple of the patch size {p} "
                            "(--resolution, export.resolution)")
    written: dict[str, str] = {}
    if "safetensors" in formats:
        written["safetensors"] = storage.join(out_url, SAFETENSORS_FILE)
        save_student(model, written["safetensors"], extra)
    if "hf" in formats:
        written["hf"] = storage.join(out_url, FOLDER)
        save_folder(model, written["hf"], extra)
    if "onnx" in formats:
        from raptor.export.onnx import check_onnx, export_onnx

        written["onnx"] = export_onnx(model, storage.join(out_url, onnx_file(size)), size)
        worst = check_onnx(written["onnx"], model, size)
        if worst > ONNX_TOLERANCE:
            raise RuntimeError(f"{written['onnx']}: onnxruntime differs from PyTorch by {worst:.2e} (> {ONNX_TOLERANCE})")
        log.info("onnx: onnxruntime vs PyTorch at batch 1 and 8: max |difference| %.1e", worst)
    for fmt, url in written.items():
        log.info("export: %s -> %s", fmt, url)
    return written
