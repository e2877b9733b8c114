"""Which provider a request is for, and the path to forward (SPEC section 3).

`/v1/{path}` goes to the default provider, `/{provider_id}/v1/{path}` to that
provider. The forwarded path is taken from the raw (still percent-encoded) path so
it reaches the upstream unchanged; dot segments are refused so a client cannot
climb out of the provider's `base_url` path with the provider's key attached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import quote

from proxy.errors import BadRequest, NotFound

P = TypeVar("P")


@dataclass(frozen=True)
class Route(Generic[P]):
    provider: P
    raw_path: bytes  # after `/v1`, percent-encoding kept, e.g. b"/chat/completions"
    path: str  # the same, decoded, for matching admitted_paths


class Router(Generic[P]):
    def __init__(self, providers: dict[str, P], default_id: str | None) -> None:
        self._providers = providers
        self._default = providers[default_id] if default_id is not None else None

    def resolve(self, path: str, raw_path: bytes | None) -> Route[P] | None:
        """The route for a proxied path, or None when the path is not a proxy path
        (the caller serves its own routes then). Raises NotFound or BadRequest."""
        raw = raw_path if raw_path is not None else path.encode()
        if path.startswith("/v1/") or path == "/v1":
            provider = self._default
            if provider is None:
                prefixes = ", ".join(f"/{pid}/v1/" for pid in self._providers)
                raise NotFound(f"no default provider; use a provider prefix: {prefixes}")
            rest, raw_rest = path[3:], _raw_rest(raw, 0, path[3:])
        else:
            head, sep, tail = path[1:].partition("/")
            if not sep or not tail.startswith("v1") or tail[2:3] not in ("", "/"):
                return None
            found = self._providers.get(head)
            if found is None:
                known = ", ".join(f"/{pid}/v1/" for pid in self._providers)
                raise NotFound(f"unknown provider {head!r}; configured: {known}")
            provider = found
            rest = path[len(head) + 4 :]  # "/" + id + "/v1"
            raw_rest = _raw_rest(raw, raw.find(b"/", 1), rest)
        segments = rest.split("/")
        if "." in segments or ".." in segments:
            raise BadRequest("path must not contain '.' or '..' segments")
        return Route(provider, raw_rest, rest)


def _raw_rest(raw: bytes, slash: int, rest: str) -> bytes:
    """The raw bytes after the `/v1` that starts at `slash`; if the client
    percent-encoded the prefix itself, fall back to re-encoding the decoded rest."""
    if slash >= 0 and raw[slash : slash + 3] == b"/v1":
        return raw[slash + 3 :]
    return quote(rest).encode()
