"""Which 429s lower the limit (`reduce_on_429`, SPEC section 12): the pure verdict,
one rule per test."""

from __future__ import annotations

from proxy.admission.reduce import ANSWER_HEAD_BYTES, Answer, judge

CONCURRENCY_BODY = b'{"error": {"type": "rate_limit_error", "code": "concurrency_limit"}}'
TOKENS_BODY = b'{"error": {"type": "rate_limit_error", "code": "rate_limit_exceeded"}}'


def answer(body: bytes = b"", **headers: str) -> Answer:
    return Answer(tuple((name.replace("_", "-"), value) for name, value in headers.items()), body)


def test_always_reduces_whatever_the_answer_and_adds_no_note() -> None:
    verdict = judge("always", "", None)
    assert verdict.reduce
    assert verdict.note == ""  # the rate_limited event keeps today's wording
    assert judge("always", "never-there", answer(TOKENS_BODY)).reduce


def test_never_keeps_the_limit_and_says_so() -> None:
    verdict = judge("never", "concurrency", answer(CONCURRENCY_BODY))
    assert not verdict.reduce
    assert verdict.note == "limit kept: reduce_on_429 = never"


def test_match_reduces_when_the_pattern_is_found_in_the_body() -> None:
    verdict = judge("match", r'"code":\s*"concurrency_limit"', answer(CONCURRENCY_BODY))
    assert verdict.reduce
    assert verdict.note == "matched reduce_on_429_match"


def test_match_keeps_the_limit_when_nothing_matches() -> None:
    verdict = judge("match", "concurrency_limit", answer(TOKENS_BODY, retry_after="7"))
    assert not verdict.reduce
    assert verdict.note == "limit kept: no match for reduce_on_429_match"


def test_match_tries_each_header_line_as_name_colon_value() -> None:
    found = answer(TOKENS_BODY, x_ratelimit_scope="concurrent", retry_after="7")
    assert judge("match", r"^x-ratelimit-scope: concurrent$", found).reduce
    assert not judge("match", r"^x-ratelimit-scope: concurrent$", answer(TOKENS_BODY)).reduce


def test_header_names_from_the_wire_are_lower_cased() -> None:
    read = Answer.from_raw([(b"X-RateLimit-Scope", b"Concurrent")], b"")
    assert read.headers == (("x-ratelimit-scope", "Concurrent"),)
    assert judge("match", "x-ratelimit-scope: Concurrent", read).reduce


def test_a_pattern_does_not_span_two_header_lines() -> None:
    both = answer(b"", a="1", b="2")
    assert not judge("match", r"1\nb", both).reduce
    assert not judge("match", r"a: 1.*b: 2", both).reduce


def test_only_the_first_answer_head_bytes_of_the_body_are_searched() -> None:
    late = b" " * ANSWER_HEAD_BYTES + b"concurrency"
    assert not judge("match", "concurrency", Answer((), late)).reduce
    assert len(Answer.from_raw([], late).body) == ANSWER_HEAD_BYTES


def test_a_body_that_is_not_utf8_is_still_searched() -> None:
    assert judge("match", "concurrency", answer(b"\xff\xfe concurrency \xc3")).reduce


def test_match_without_a_read_answer_or_with_an_empty_pattern_keeps_the_limit() -> None:
    assert not judge("match", "concurrency", None).reduce
    assert not judge("match", "", answer(CONCURRENCY_BODY)).reduce
