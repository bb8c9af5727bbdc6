"""The export formats and their file names (no torch: the CLI and the job spec name them)."""

FORMATS = ("safetensors", "hf", "onnx")
DEFAULT_FORMATS = ("safetensors", "hf")  # what needs no extra packages
SAFETENSORS_FILE = "student.safetensors"  # one file, the manifest in its metadata
FOLDER = "hf"  # a Hugging Face model folder: config.json, model.safetensors, README.md


def onnx_file(size: int) -> str:
    return f"student-{size}px.onnx"
