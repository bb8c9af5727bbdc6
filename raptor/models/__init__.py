"""Teachers (frozen timm ViTs) and block-recurrent students (Raptor)."""

from raptor.models.checkpoints import CheckpointError, read_checkpoint, to_timm_state_dict
from raptor.models.saving import load_student, rebuild_student, save_student, student_manifest
from raptor.models.vit import RaptorViT, load_folder, save_folder
from raptor.models.student import Raptor, RaptorBlock, check_boundaries, segments_of
from raptor.models.teacher import Teacher, TokenGeometry

__all__ = [
    "CheckpointError",
    "Raptor",
    "RaptorBlock",
    "RaptorViT",
    "Teacher",
    "TokenGeometry",
    "check_boundaries",
    "load_folder",
    "load_student",
    "read_checkpoint",
    "rebuild_student",
    "save_folder",
    "save_student",
    "segments_of",
    "student_manifest",
    "to_timm_state_dict",
]
