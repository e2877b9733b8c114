"""Logging: structlog for our lines, the same renderer for uvicorn's, secrets redacted.

Console rendering for development, one JSON object per line for production
(`server.log_format`). Every record passes the redactor, which blanks the values
of secret-looking keys, any `Bearer ...` credential, and every configured secret
(provider keys, the admin token) wherever it appears in the text.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

REDACTED = "[REDACTED]"
_SECRET_KEY = re.compile(r"authorization|api[_-]?key|token|secret|password", re.IGNORECASE)
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")


class Redactor:
    """A structlog processor (and a helper for plain text) that removes secrets."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is removed whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return _BEARER.sub(rf"\g<1>{REDACTED}", value)

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event_dict.items():
            if _SECRET_KEY.search(key) and value not in (None, "", False):
                event_dict[key] = REDACTED
            elif isinstance(value, str):
                event_dict[key] = self.text(value)
            elif isinstance(value, dict | list | tuple):
                event_dict[key] = self._nested(value)
        return event_dict

    def _nested(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else self._nested(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._nested(v) for v in value]
        return self.text(value) if isinstance(value, str) else value


class _RedactingFormatter(structlog.stdlib.ProcessorFormatter):
    """Also redacts the rendered text: a foreign library may format a secret into
    its message or traceback where no key-based rule can see it."""

    def __init__(self, redactor: Redactor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self._redactor.text(super().format(record))


def configure(
    log_format: str = "console",
    level: str = "info",
    secrets: Iterable[str] = (),
    stream: Any = None,
) -> Redactor:
    """Route structlog and stdlib logging (uvicorn's too) through one redacting renderer."""
    redactor = Redactor(secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redactor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        _RedactingFormatter(
            redactor,
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # httpx logs every request at INFO; our access line already covers it.
    for name in ("httpx", "httpcore", "aiosqlite"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return redactor
