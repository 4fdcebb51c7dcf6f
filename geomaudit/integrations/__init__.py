"""Auditing from inside training loops: ``GeometryCallback`` for the Hugging Face ``Trainer``."""

from .trainer import GeometryCallback

__all__ = ["GeometryCallback"]
