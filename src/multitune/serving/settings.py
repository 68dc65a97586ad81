"""The server's typed settings: micro-batching, input limits, authentication, timeouts and connection limits
(``multitune serve`` flags)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from multitune.config.parse import check_field, from_dict
from multitune.errors import ConfigError, shown

MIN_API_KEY_CHARS = 16
API_KEY_VARIABLE = "MULTITUNE_API_KEY"


def field(default: Any, *, help: str, **checks: Any) -> Any:
    """A field with its help text and checks, as :func:`multitune.config.parse.field` makes them. Repeated
    here because ``multitune.config`` imports torch, and the ``multitune`` command reads these fields for its
    flags whatever it runs."""
    return dataclasses.field(default=default, metadata={"help": help, **checks})


@dataclass
class ServerSettings:
    """How ``multitune serve`` batches requests, which requests it refuses and how long it waits for clients.

    Every field is a flag of ``multitune serve`` (``max_batch_size`` is ``--max-batch-size``); there,
    ``api_key`` defaults to the environment variable ``MULTITUNE_API_KEY`` (see :func:`settings_from_flags`).
    Call :meth:`validate` after building one by hand (:func:`~multitune.serving.create_app` does).
    """

    max_batch_size: int = field(32, help="most inputs in one model batch (a larger request runs in several)",
                                min=1)
    max_wait_ms: float = field(5.0, help="how long the first request of a batch waits for others to join it",
                               min=0.0)
    max_inputs: int = field(64, help="most inputs in one request (more: 413)", min=1)
    max_chars: int = field(4000, help="most characters in one text of an input (more: 413)", min=1)
    max_body_bytes: int = field(1_000_000, help="largest request body in bytes (more: 413)", min=64)
    max_queue: int = field(4096, help="most inputs waiting for the model; a request beyond it gets 429", min=1)
    # kept out of repr(), so that a printed or logged settings object never shows the key
    api_key: str | None = dataclasses.field(default=None, repr=False, metadata={
        "help": "when set, every endpoint but /health needs the header 'Authorization: Bearer KEY' (else 401)"})
    header_timeout: float = field(10.0, help="seconds a client has to send its request line and headers, from "
                                             "connecting or from its first byte (later: 408, connection closed)",
                                  gt=0.0)
    body_timeout: float = field(30.0, help="seconds a client has to send the whole request body once its headers "
                                           "are in (later: 408, connection closed)", gt=0.0)
    keep_alive_timeout: float = field(5.0, help="seconds an idle keep-alive connection stays open between "
                                                "requests", gt=0.0)
    max_connections: int = field(512, help="most open connections; one more is answered 503 and closed", min=1)
    max_buffered_bytes: int = field(32_000_000, help="most request-body bytes held in memory at once, over all "
                                                     "requests; a body that does not fit gets 503", min=64)

    def validate(self, path: str = "") -> None:
        """Checks that involve the API key or several fields.

        Raises:
            ConfigError: naming the field.
        """
        where = f"{path}." if path else ""
        if self.api_key is not None:
            key = self.api_key
            if len(key) < MIN_API_KEY_CHARS:
                raise ConfigError(f"{where}api_key", f"must have at least {MIN_API_KEY_CHARS} characters, got "
                                                     f"{len(key)} (--api-key or {API_KEY_VARIABLE}; make one with: "
                                                     f"python -c 'import secrets; print(secrets.token_urlsafe(32))')")
            if not all("!" <= ch <= "~" for ch in key):
                raise ConfigError(f"{where}api_key", f"must be printable ASCII without spaces (--api-key or "
                                                     f"{API_KEY_VARIABLE}; it travels in an HTTP header)")
        if self.max_body_bytes > self.max_buffered_bytes:
            raise ConfigError(f"{where}max_body_bytes", f"{self.max_body_bytes} is more than max_buffered_bytes "
                                                        f"({self.max_buffered_bytes}): no body that large could "
                                                        f"ever be held")


def port_number(text: str) -> int:
    """argparse type of ``--port``: an integer from 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {shown(text)}")
    return port


def _flag_type(tp: type, meta: Mapping[str, Any]) -> Callable[[str], Any]:
    """An argparse type that reads an int or float and applies the field's checks, with one-line errors."""
    def read(text: str) -> Any:
        try:
            value = tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if tp is int else 'a number'}, got "
                                             f"{shown(text)}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {shown(text)}")
        try:
            check_field(value, meta, "")
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return read


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`ServerSettings` field to ``multitune serve`` (``--max-batch-size``...), with the
    field's default, help text and checks."""
    hints = typing.get_type_hints(ServerSettings)
    for f in dataclasses.fields(ServerSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "api_key":
            parser.add_argument(flag, default=None, metavar="KEY", help=f"{f.metadata['help']}; default: the "
                                f"environment variable {API_KEY_VARIABLE}, which is better (a flag shows in "
                                f"the process list)")
        else:
            default = f"{f.default:,}" if isinstance(f.default, int) else f"{f.default:g}"
            parser.add_argument(flag, type=_flag_type(hints[f.name], f.metadata), default=f.default,
                                metavar="N", help=f"{f.metadata['help']} (default: {default})")


def settings_from_flags(args: argparse.Namespace) -> ServerSettings:
    """The settings of parsed ``multitune serve`` flags; the API key falls back to ``$MULTITUNE_API_KEY``.

    Raises:
        ConfigError: settings that do not fit together, or an unusable API key.
    """
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerSettings)}
    if values["api_key"] is None:
        values["api_key"] = os.environ.get(API_KEY_VARIABLE)  # set but empty: refused by validate()
    return from_dict(ServerSettings, values)
