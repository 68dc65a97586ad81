"""Loss weighting and gradient methods. Importing this package registers the built-in strategies in
:data:`WEIGHTINGS`: sum, static, uncertainty, dwa, gradnorm, famo (loss level), pcgrad, cagrad (gradient
level)."""

from multitune.weighting import cagrad, dwa, famo, gradnorm, pcgrad, strategies  # noqa: F401
from multitune.weighting.base import WEIGHTINGS, LossWeighting, WeightingConfig

__all__ = ["WEIGHTINGS", "LossWeighting", "WeightingConfig"]
