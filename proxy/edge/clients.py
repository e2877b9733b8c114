"""Client keys (README, "Client keys and shares"): with `[[clients]]` configured, every
provider route needs one, in `Authorization: Bearer <key>` or `x-api-key: <key>`; it says which
client is calling, and it never travels on to the upstream."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from proxy.errors import Unauthorized
from proxy.settings import ClientConfig
from proxy.upstream.client import CREDENTIALS

_MISSING = (
    "a client key is required: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
)
_UNKNOWN = "unknown client key"


class ClientKeys:
    """The configured clients, found by the SHA-256 digest of their key."""

    __slots__ = ("_by_digest",)

    def __init__(self, clients: Sequence[ClientConfig]) -> None:
        self._by_digest = {c.key_sha256: c.id for c in clients}

    def identify(self, headers: list[tuple[bytes, bytes]]) -> tuple[str, list[tuple[bytes, bytes]]]:
        """The calling client's id, and the request's headers without any credential
        header. Raises `Unauthorized` when no header holds a configured key."""
        presented: list[bytes] = []
        kept: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            if name not in CREDENTIALS:
                kept.append((name, value))
            elif name == b"authorization":
                scheme, _, credential = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented.append(credential.strip())
            elif name == b"x-api-key":
                presented.append(value.strip())
        for key in presented:
            # Not a timing leak of the key: what the lookup compares is the SHA-256
            # digest of what the caller sent, never the key itself. How long the dict
            # takes can at most hint how far that digest matches a stored one, and
            # choosing a key whose digest matches a stored one better is a preimage
            # attack on SHA-256. (Keys are long random strings, not passwords: a plain
            # digest needs no salt or slow hash.)
            client_id = self._by_digest.get(hashlib.sha256(key).digest()) if key else None
            if client_id is not None:
                return client_id, kept
        raise Unauthorized(_UNKNOWN if any(presented) else _MISSING)

    def __len__(self) -> int:
        return len(self._by_digest)

    def __repr__(self) -> str:
        return f"<ClientKeys {len(self._by_digest)} clients>"
