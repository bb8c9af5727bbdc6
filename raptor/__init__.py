"""raptor: distil Vision Transformers into block-recurrent students (Raptor, ICLR 2026)."""

__version__ = "0.1.0"
