"""The student as a product: the self-contained model written in the formats people load.

    safetensors   student.safetensors: one file, the manifest in its metadata (raptor.models.load_student,
                  timm.create_model("raptor_vit", pretrained=True, pretrained_cfg_overlay=dict(file=...)))
    hf            hf/: config.json, model.safetensors, README.md (the model card); RaptorViT.from_pretrained
    onnx          student-<size>px.onnx: one resolution, dynamic batch, the recurrence unrolled (onnxruntime)

:func:`raptor.export.write.write_exports` writes them (the model card comes from :mod:`raptor.models.card`);
:mod:`raptor.export.bench` measures the student against its teacher for inference.
Loading any of them needs ``raptor.models`` only (no Ray, DeepSpeed, wandb, job spec or teacher file).
"""

from __future__ import annotations

from raptor.export.formats import DEFAULT_FORMATS, FOLDER, FORMATS, SAFETENSORS_FILE, onnx_file

__all__ = ["DEFAULT_FORMATS", "FOLDER", "FORMATS", "SAFETENSORS_FILE", "onnx_file"]
