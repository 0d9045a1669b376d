"""Structured logging: JSON lines for journald, readable output on a terminal.

Redaction is a processor like any other, so it runs on every line whatever
logger produced it: secret-named fields are replaced and anything shaped like
an API key is masked wherever it appears.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from provisiond.config import LogConfig

SECRET_FIELDS = frozenset(
    {
        "api_key",
        "authorization",
        "key",
        "password",
        "secret",
        "session_key",
        "token",
        "grant_blob",
        "private_key",
    }
)
_API_KEY = re.compile(r"sk_live_[A-Za-z0-9]+")
_BEARER = re.compile(r"(?i)bearer\s+\S+")
REDACTED = "[redacted]"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        if "sk_live_" in value or "earer" in value:
            return _BEARER.sub("Bearer " + REDACTED, _API_KEY.sub("sk_live_" + REDACTED, value))
        return value
    if isinstance(value, MutableMapping):
        return {k: REDACTED if k in SECRET_FIELDS else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    for name in list(event_dict):
        if name in SECRET_FIELDS:
            event_dict[name] = REDACTED
        else:
            event_dict[name] = _scrub(event_dict[name])
    return event_dict


def setup(config: LogConfig, *, stream: Any = None) -> None:
    """(Re)configure structlog; called at start and again on SIGHUP."""
    stream = stream or sys.stdout
    use_json = config.format == "json" or (config.format == "auto" and not stream.isatty())
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[config.level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries (asyncio, bumble) log through the standard library; keep them quiet but visible.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str) -> FilteringBoundLogger:
    return cast(FilteringBoundLogger, structlog.get_logger(name))
