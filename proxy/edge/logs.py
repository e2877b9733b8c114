"""Logging: structlog for our lines, the same renderer for uvicorn's, secrets redacted.

Console rendering for development, one JSON object per line for production
(`server.log_format`). Every record passes the redactor, which blanks the values
of secret-looking keys, any `Bearer ...` credential, and every configured secret
(provider keys, the admin token) wherever it appears in the text.

The access line, one per proxied request, is the exception to the structlog path:
`AccessLog` formats it directly, as the same renderer would, and writes it to the
same stream. Through structlog and the stdlib handler a line cost ~56 µs (half the
requests a core could serve); written directly it costs ~5 µs.
"""

from __future__ import annotations

import datetime
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, Protocol

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


class AccessRecord(Protocol):
    """The fields of an access line (the relay's `Exchange`)."""

    @property
    def provider(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def queue_ms(self) -> int | None: ...
    @property
    def upstream_ms(self) -> int | None: ...
    @property
    def bytes(self) -> int: ...
    @property
    def client(self) -> str | None: ...
    @property
    def conversation_id(self) -> str | None: ...
    @property
    def prompt_started_at(self) -> int | None: ...
    @property
    def prompt_source(self) -> str | None: ...


_UTC = datetime.UTC
_CONSOLE_QUOTED = frozenset(" \t=\r\n\"'")  # ConsoleRenderer repr()s a string holding any


def _console(value: str | None) -> str:
    if value is None:
        return "None"
    return value if _CONSOLE_QUOTED.isdisjoint(value) else repr(value)


def _json(value: str | None) -> str:
    return "null" if value is None else _json_str(value)


def _int(value: int | None) -> str:
    return "null" if value is None else str(value)


class AccessLog:
    """Writes the `sluice.access` line of one request, byte for byte what structlog's
    renderer (console or JSON, as configured) would have made of the same fields,
    redacted the same way, without the processor chain and the stdlib round trip.

    The line goes to the handler's stream under the handler's lock, in one `write`,
    so it never interleaves with a line logged from another thread."""

    def __init__(self, log_format: str, redactor: Redactor, handler: logging.StreamHandler[Any]):
        self._json = log_format == "json"
        self._redactor = redactor
        self._handler = handler
        self._enabled = logging.getLogger("sluice.access").isEnabledFor
        # One search says whether a client-sent value needs the redactor at all.
        needles = [re.escape(secret) for secret in redactor.secrets]
        self._suspect = re.compile("|".join([*needles, r"(?i:bearer\s)"])).search

    def _clean(self, value: str | None) -> str | None:
        if value is not None and self._suspect(value):
            return self._redactor.text(value)
        return value

    def line(self, r: AccessRecord) -> str:
        now = datetime.datetime.now(tz=_UTC).isoformat().replace("+00:00", "Z")
        method, path = self._clean(r.method), self._clean(r.path)
        conversation_id = self._clean(r.conversation_id)
        if self._json:
            return (
                f'{{"bytes": {r.bytes}, "client": {_json(r.client)}, '
                f'"conversation_id": {_json(conversation_id)}, '
                f'"method": {_json(method)}, "path": {_json(path)}, '
                f'"prompt_source": {_json(r.prompt_source)}, '
                f'"prompt_started_at": {_int(r.prompt_started_at)}, '
                f'"provider": {_json(r.provider)}, "queue_ms": {_int(r.queue_ms)}, '
                f'"status": {r.status}, "upstream_ms": {_int(r.upstream_ms)}, '
                f'"event": "request", "level": "info", "logger": "sluice.access", '
                f'"timestamp": "{now}"}}\n'
            )
        return (
            f"{now} [info     ] request                        [sluice.access] "
            f"bytes={r.bytes} client={_console(r.client)} "
            f"conversation_id={_console(conversation_id)} "
            f"method={_console(method)} path={_console(path)} "
            f"prompt_source={_console(r.prompt_source)} prompt_started_at={r.prompt_started_at} "
            f"provider={_console(r.provider)} "
            f"queue_ms={r.queue_ms} status={r.status} upstream_ms={r.upstream_ms}\n"
        )

    def write(self, record: AccessRecord) -> None:
        if not self._enabled(logging.INFO):
            return
        line = self.line(record)
        handler = self._handler
        with handler.lock:  # type: ignore[union-attr]  # created in Handler.__init__
            try:
                handler.stream.write(line)
                handler.flush()
            except (OSError, ValueError):
                pass  # as the stdlib handler does: a log that cannot be written fails no request


access: AccessLog | None = None
"""The access log `configure` set up; None (no access lines) until it runs."""


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
    global access
    access = AccessLog(log_format, redactor, handler)
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
