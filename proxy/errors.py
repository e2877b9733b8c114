"""Every error sluice reports, and the one HTTP answer each becomes.

    SluiceError
    ├── ConfigError            bad configuration: one line naming the key, exit code 2
    ├── StoreError             the SQLite store could not read or write
    ├── ClientError            the client sent something we cannot act on (4xx)
    │   ├── BadRequest         400, e.g. a malformed X-Prompt-Started-At
    │   ├── Unauthorized       401, no client key or an unknown one ([[clients]] set)
    │   ├── NotFound           404, unknown provider or route
    │   ├── BodyTooLarge       413, over server.max_body_bytes
    │   ├── RequestTimeout     408, a client's head or body stalled (the edge protocol)
    │   └── HeadTooLarge       431, over max_header_bytes or max_headers
    ├── TooManyConnections     503, over server.max_connections (at accept)
    ├── UpstreamError          the provider could not be reached or went silent
    │   ├── UpstreamUnavailable  502, connect failure or timeout, reset before the headers
    │   ├── UpstreamTimeout      504, no byte for read_timeout_s
    │   └── UpstreamStatus       an upstream error status after a queued stream's early 200
    └── AdmissionRejected      503 with Retry-After: the queue is full or the wait timed out

Lower-layer exceptions (httpx, sqlite3) are mapped to these once, at the edge that
catches them, with ``raise ... from exc``.
"""

from __future__ import annotations

import json


class SluiceError(Exception):
    """Base of every error sluice raises on purpose."""


class ConfigError(SluiceError):
    """Invalid configuration; `str(err)` is the single line shown to the user."""


class StoreError(SluiceError):
    """The SQLite store failed; the write it was asked for did not happen."""


class HTTPError(SluiceError):
    """An error that becomes an OpenAI-style JSON answer with `status`."""

    status: int = 500
    type: str = "sluice_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def body(self) -> bytes:
        """`{"error": {"message", "type", "code"}}`, as the OpenAI API shapes its errors."""
        error = {"message": self.message, "type": self.type, "code": self.code}
        return json.dumps({"error": error}).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after_s is not None:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        return headers


class ClientError(HTTPError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class BadRequest(ClientError):
    pass


class Unauthorized(ClientError):
    status = 401
    type = "sluice_unauthorized"
    code = "unauthorized"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"www-authenticate", b"Bearer")]


class NotFound(ClientError):
    status = 404
    code = "not_found"


class BodyTooLarge(ClientError):
    status = 413
    code = "body_too_large"


class RequestTimeout(ClientError):
    """The client's head or body stalled past client_header/body_timeout_s."""

    status = 408
    code = "request_timeout"


class HeadTooLarge(ClientError):
    """A request head over max_header_bytes or max_headers."""

    status = 431
    code = "request_header_fields_too_large"


class TooManyConnections(HTTPError):
    """Over server.max_connections open client connections."""

    status = 503
    type = "sluice_overloaded"
    code = "too_many_connections"


class UpstreamError(HTTPError):
    status = 502
    type = "sluice_upstream_error"
    code = "upstream_unavailable"


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamStatus(UpstreamError):
    """The upstream answered `status` to a request whose 200 already went out while it
    was queued (the keepalive): it can only be told inside the stream. `native` says
    whether `type` came from the upstream's own error body."""

    def __init__(
        self, status: int, message: str, *, type_: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.native = type_ is not None
        self.type = type_ or "sluice_upstream_error"
        self.code = code or f"upstream_{status}"


class AdmissionRejected(HTTPError):
    status = 503


class QueueFull(AdmissionRejected):
    type = "sluice_queue_full"
    code = "queue_full"


class QueueTimeout(AdmissionRejected):
    type = "sluice_queue_timeout"
    code = "queue_timeout"
