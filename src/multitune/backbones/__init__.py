"""Backbones: where a pretrained model comes from, and how token states become sentence embeddings."""

from multitune.backbones.loading import load_backbone, resolve_backbone
from multitune.backbones.pooling import POOLERS, pool

__all__ = ["POOLERS", "load_backbone", "pool", "resolve_backbone"]
