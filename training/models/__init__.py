"""Backbones: the one ViT of the house, its named sizes, and checkpoint loading/export."""

from training.models.checkpoints import (
    BackboneInfo,
    CheckpointError,
    export_backbone,
    load_backbone,
)
from training.models.config import MODEL_SIZES, ViTConfig
from training.models.vit import VisionTransformer

__all__ = [
    "MODEL_SIZES",
    "BackboneInfo",
    "CheckpointError",
    "ViTConfig",
    "VisionTransformer",
    "export_backbone",
    "load_backbone",
]
