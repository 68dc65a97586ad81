"""multitune: one config, many tasks, one shared-backbone model."""

__version__ = "0.1.0"
__all__ = ["__version__"]
