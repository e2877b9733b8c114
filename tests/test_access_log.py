"""The access line (issue 16): written directly, it reads exactly as structlog's renderer
would have written the same fields, secrets redacted the same way, in both formats."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import structlog

from proxy.edge import logs

SECRET = "sk-provider-key-31337"
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


@dataclass
class Record:
    provider: str = "umans"
    method: str = "POST"
    path: str = "/v1/chat/completions"
    status: int = 200
    queue_ms: int | None = 12
    upstream_ms: int | None = 345
    bytes: int = 6789
    conversation_id: str | None = None
    client: str | None = None
    prompt_started_at: int | None = 1795830000123
    prompt_source: str | None = "derived"

    def fields(self) -> dict[str, object]:
        return {
            "bytes": self.bytes,
            "client": self.client,
            "conversation_id": self.conversation_id,
            "method": self.method,
            "path": self.path,
            "prompt_source": self.prompt_source,
            "prompt_started_at": self.prompt_started_at,
            "provider": self.provider,
            "queue_ms": self.queue_ms,
            "status": self.status,
            "upstream_ms": self.upstream_ms,
        }


RECORDS = [
    Record(),
    Record(conversation_id="conv-9", queue_ms=None),
    Record(conversation_id='a "quoted" = value\twith\nspaces', status=499, upstream_ms=None),
    Record(conversation_id="Bearer sk-client-key-1 and more"),
    Record(conversation_id=f"leaked {SECRET}!", path=f"/v1/{SECRET}/x"),
    Record(conversation_id="café ☕ \\ backslash", path="/v1/a=b"),
    Record(method="GET", path="/v1/models", queue_ms=None, bytes=0, prompt_started_at=None),
    Record(prompt_source=None, prompt_started_at=None),
    Record(client="team-a"),
]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs.access = None
    structlog.reset_defaults()


def _without_time(text: str) -> list[str]:
    return [_TIMESTAMP.sub("<time>", line) for line in text.splitlines()]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("log_format", ["console", "json"])
def test_the_direct_line_is_what_structlog_writes(log_format: str) -> None:
    via_structlog, direct = io.StringIO(), io.StringIO()
    logs.configure(log_format, "info", [SECRET], stream=via_structlog)
    for record in RECORDS:
        structlog.get_logger("sluice.access").info("request", **record.fields())
    logs.configure(log_format, "info", [SECRET], stream=direct)
    assert logs.access is not None
    for record in RECORDS:
        logs.access.write(record)
    assert _without_time(direct.getvalue()) == _without_time(via_structlog.getvalue())
    assert len(direct.getvalue().splitlines()) == len(RECORDS)
    assert SECRET not in direct.getvalue()
    assert "sk-client-key-1" not in direct.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_no_access_line_above_info() -> None:
    out = io.StringIO()
    logs.configure("json", "warning", [], stream=out)
    assert logs.access is not None
    logs.access.write(Record())
    assert out.getvalue() == ""


@pytest.mark.usefixtures("restore_logging")
def test_a_log_that_cannot_be_written_fails_no_request() -> None:
    out = io.StringIO()
    logs.configure("console", "info", [], stream=out)
    out.close()
    assert logs.access is not None
    logs.access.write(Record())  # no exception
