"""HTTP serving of a trained model: every task from one backbone pass per batch (needs ``multitune[serve]``)."""

from multitune.serving.app import create_app, serve
from multitune.serving.settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]
