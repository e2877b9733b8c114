"""Which upstream 429s lower the limit (`reduce_on_429`; docs/design.md, "The admission core").

Every 429 pauses the provider; whether it also costs a step of the limit is the
provider's rule: `"always"` (the default), `"never"`, or `"match"`, where the
regular expression `reduce_on_429_match` is searched in the 429's body and in each
of its header lines, written `name: value` with the name in lower case. A provider
whose 429s mean several things (a concurrency cap, a tokens-per-minute budget) can
so reduce only on the one its concurrency limit can fix.

Pure: the edge reads the answer (its headers, and for `"match"` the first
`ANSWER_HEAD_BYTES` of its body), the single-process limiter and the cluster
admission both ask `judge`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final, Literal

ReduceRule = Literal["always", "never", "match"]

ANSWER_HEAD_BYTES: Final = 65_536
"""The most of a 429's body the rule reads (and the edge reads ahead to give it)."""


@dataclass(frozen=True)
class Answer:
    """What the edge read of one upstream 429."""

    headers: tuple[tuple[str, str], ...] = ()
    """(name, value) in the order received; names in lower case."""
    body: bytes = b""
    """The body's first bytes, at most `ANSWER_HEAD_BYTES` (empty when not read)."""

    @classmethod
    def from_raw(cls, raw_headers: list[tuple[bytes, bytes]], body: bytes = b"") -> Answer:
        """From the bytes on the wire: names lower-cased, both read as Latin-1 (what
        HTTP header bytes are), the body cut to `ANSWER_HEAD_BYTES`."""
        headers = tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw_headers
        )
        return cls(headers, body[:ANSWER_HEAD_BYTES])

    def header_lines(self) -> list[str]:
        return [f"{name}: {value}" for name, value in self.headers]


@dataclass(frozen=True)
class Verdict:
    """Whether a 429 may lower the limit, and which rule said so."""

    reduce: bool
    note: str
    """For the `rate_limited` event: empty under `"always"` (today's wording), else
    which rule applied."""


ALWAYS: Final = Verdict(True, "")
NEVER: Final = Verdict(False, "limit kept: reduce_on_429 = never")
MATCHED: Final = Verdict(True, "matched reduce_on_429_match")
NOT_MATCHED: Final = Verdict(False, "limit kept: no match for reduce_on_429_match")


def judge(rule: ReduceRule, pattern: str, answer: Answer | None) -> Verdict:
    """The verdict on one 429. Under `"match"` an answer the edge did not read (None)
    matches nothing; so does an empty pattern (which the config refuses anyway)."""
    if rule == "always":
        return ALWAYS
    if rule == "never":
        return NEVER
    if answer is None or not pattern:
        return NOT_MATCHED
    return MATCHED if matches(pattern, answer) else NOT_MATCHED


def matches(pattern: str, answer: Answer) -> bool:
    """`pattern` found (re.search) in the body, read as UTF-8 with undecodable bytes
    replaced, or in any one header line."""
    regex = compiled(pattern)
    if regex.search(answer.body[:ANSWER_HEAD_BYTES].decode("utf-8", "replace")):
        return True
    return any(regex.search(line) for line in answer.header_lines())


@functools.lru_cache(maxsize=64)
def compiled(pattern: str) -> re.Pattern[str]:
    """The pattern compiled once (settings validate it at load, so this never raises
    for a configured one)."""
    return re.compile(pattern)
