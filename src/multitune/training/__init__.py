"""The training loop, batching and checkpoints."""

from multitune.training.trainer import train

__all__ = ["train"]
