"""Loss weighting. Importing this package registers the built-in strategies in :data:`WEIGHTINGS`."""

from multitune.weighting import strategies  # noqa: F401
from multitune.weighting.base import WEIGHTINGS, LossWeighting, WeightingConfig

__all__ = ["WEIGHTINGS", "LossWeighting", "WeightingConfig"]
