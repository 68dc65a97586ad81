"""Task samplers. Importing this package registers the built-in strategies in :data:`SAMPLERS`."""

from multitune.sampling import adaptive, annealed, strategies  # noqa: F401
from multitune.sampling.base import SAMPLERS, SamplerConfig, TaskSampler

__all__ = ["SAMPLERS", "SamplerConfig", "TaskSampler"]
