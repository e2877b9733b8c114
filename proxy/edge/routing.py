"""Which provider a request is for, and the path to forward (README, "Routing").

`/v1/{path}` goes to the default provider, `/{provider_id}/v1/{path}` to that
provider. Routing works on the raw (still percent-encoded) path split at its
literal slashes, so an encoded slash (`%2F`) can never move the split point, and
the rest is forwarded exactly as the client wrote it. Dot segments are refused,
encoded or not, so a client cannot climb out of the provider's `base_url` path
with the provider's key attached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import quote, unquote

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
        raw = raw_path if raw_path is not None else quote(path).encode()
        segments = raw.split(b"/")  # ["", first, second, ...]
        if _decode(segments, 1) == "v1":
            provider = self._default
            if provider is None:
                raise NotFound(f"no default provider; use a provider prefix: {self._prefixes()}")
            rest = 2
        elif _decode(segments, 2) == "v1":
            provider_id = _decode(segments, 1)
            found = self._providers.get(provider_id)
            if found is None:
                raise NotFound(f"unknown provider {provider_id!r}; configured: {self._prefixes()}")
            provider = found
            rest = 3
        else:
            return None
        raw_rest = b"/" + b"/".join(segments[rest:]) if len(segments) > rest else b""
        decoded = unquote(raw_rest.decode("latin-1"))
        parts = decoded.split("/")
        if "." in parts or ".." in parts:
            raise BadRequest("path must not contain '.' or '..' segments")
        return Route(provider, raw_rest, decoded)

    def _prefixes(self) -> str:
        return ", ".join(f"/{pid}/v1/" for pid in self._providers)


def _decode(segments: list[bytes], index: int) -> str:
    return unquote(segments[index].decode("latin-1")) if index < len(segments) else ""
