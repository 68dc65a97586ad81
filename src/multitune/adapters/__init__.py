"""Parameter-efficient methods on a frozen backbone, one module per method, registered in ``METHODS``."""

from multitune.adapters import bottleneck, ia3, lora, prompt  # noqa: F401  (registration)
from multitune.adapters.base import METHODS, Router
from multitune.adapters.model import AdapterSet
from multitune.config.adapters import AdapterConfig

__all__ = ["METHODS", "AdapterConfig", "AdapterSet", "Router"]
