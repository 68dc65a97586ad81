"""Backbones: where a pretrained model comes from, its family (encoder, encoder-decoder, decoder-only),
and how token states become sentence embeddings."""

from multitune.backbones.architectures import ARCHITECTURES, BackboneArchitecture, architecture_for
from multitune.backbones.loading import PACKAGED_BACKBONES, load_backbone, resolve_backbone
from multitune.backbones.pooling import POOLERS, pool

__all__ = ["ARCHITECTURES", "PACKAGED_BACKBONES", "POOLERS", "BackboneArchitecture", "architecture_for",
           "load_backbone", "pool", "resolve_backbone"]
