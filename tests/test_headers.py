"""The admission headers: `X-Prompt-Started-At` (SPEC section 5, priority) and the
pause a 429 asks for (`retry-after-ms`, `Retry-After`)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.edge.headers import prompt_started_at_ms, retry_after_s
from proxy.errors import BadRequest

# 2026-11-28T09:30:00Z, and "now" one hour later, so that time is in the past.
PROMPT_MS = 1_795_858_200_000.0
NOW_MS = PROMPT_MS + 3_600_000

# 2023-11-14T22:13:20Z; the HTTP dates below are 30 s later.
NOW_S = 1_700_000_000.0


# --- prompt_started_at_ms ---------------------------------------------------------------


def test_absent_prompt_start_is_now() -> None:
    assert prompt_started_at_ms(None, NOW_MS) == NOW_MS


def test_epoch_milliseconds_integer() -> None:
    assert prompt_started_at_ms("1795858200000", NOW_MS) == PROMPT_MS


@pytest.mark.parametrize("value", ["0", "1795858200", "99999999999"])
def test_an_integer_below_1e11_is_refused_as_epoch_seconds(value: str) -> None:
    with pytest.raises(BadRequest, match="looks like epoch seconds") as err:
        prompt_started_at_ms(value, NOW_MS)
    assert f"e.g. {value}000" in err.value.message


def test_1e11_is_the_smallest_epoch_milliseconds() -> None:
    assert prompt_started_at_ms("100000000000", NOW_MS) == 10**11


def test_surrounding_whitespace_is_ignored() -> None:
    assert prompt_started_at_ms(" 1795858200000 ", NOW_MS) == PROMPT_MS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("2026-11-28T09:30:00Z", PROMPT_MS, id="utc-Z"),
        pytest.param("2026-11-28T09:30:00z", PROMPT_MS, id="utc-lowercase-z"),
        pytest.param("2026-11-28T09:30:00+00:00", PROMPT_MS, id="utc-offset"),
        pytest.param("2026-11-28T11:30:00+02:00", PROMPT_MS, id="plus-two-hours"),
        pytest.param("2026-11-28T04:30:00-05:00", PROMPT_MS, id="minus-five-hours"),
        pytest.param("2026-11-28T09:30:00.250Z", PROMPT_MS + 250, id="fraction-ms"),
        pytest.param("2026-11-28T11:30:00.5+02:00", PROMPT_MS + 500, id="fraction-offset"),
        pytest.param("2026-11-28T09:30:00.123456Z", PROMPT_MS + 123.456, id="fraction-us"),
    ],
)
def test_rfc3339_timestamp(value: str, expected: float) -> None:
    assert prompt_started_at_ms(value, NOW_MS) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(str(int(NOW_MS) + 1), id="epoch-one-ms-ahead"),
        pytest.param("9999999999999999", id="epoch-far-future"),
        pytest.param("2027-01-01T00:00:00Z", id="rfc3339-future"),
        pytest.param("9999-12-31T23:59:59-12:00", id="rfc3339-end-of-time"),
    ],
)
def test_future_time_counts_as_now(value: str) -> None:
    assert prompt_started_at_ms(value, NOW_MS) == NOW_MS


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("abc", id="letters"),
        pytest.param("-5", id="negative"),
        pytest.param("+5", id="signed"),
        pytest.param("1.5", id="fractional-number"),
        pytest.param("1e12", id="exponent"),
        pytest.param("1_000", id="underscore"),
        pytest.param("2026-11-28T09:30:00", id="naive-no-offset"),
        pytest.param("2026-11-28", id="date-only"),
        pytest.param("2026-11-28T25:00:00Z", id="hour-out-of-range"),
        pytest.param("2026-11-28T09:30:00+24:00", id="offset-out-of-range"),
        pytest.param("1" * 40, id="forty-digits"),
        pytest.param("١٢٣", id="arabic-indic-digits"),
        pytest.param("１２３", id="fullwidth-digits"),
        pytest.param("Sat, 28 Nov 2026 09:30:00 GMT", id="http-date"),
    ],
)
def test_malformed_prompt_start_is_bad_request(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        prompt_started_at_ms(value, NOW_MS)
    assert caught.value.status == 400


def test_bad_request_message_says_what_format_is_expected() -> None:
    with pytest.raises(BadRequest) as caught:
        prompt_started_at_ms("yesterday", NOW_MS)
    message = caught.value.message
    assert "X-Prompt-Started-At" in message
    assert "epoch milliseconds" in message
    assert "RFC 3339" in message


@given(st.text())
def test_prompt_start_of_any_text_is_a_time_not_after_now_or_bad_request(value: str) -> None:
    try:
        at = prompt_started_at_ms(value, NOW_MS)
    except BadRequest:
        return
    assert at <= NOW_MS


@given(st.integers(min_value=10**11, max_value=10**16 - 1))
def test_prompt_start_epoch_round_trip(ms: int) -> None:
    assert prompt_started_at_ms(str(ms), NOW_MS) == min(ms, NOW_MS)


# RFC 3339 offsets are whole minutes, strictly between -24:00 and +24:00.
OFFSETS = st.builds(
    lambda minutes: timezone(timedelta(minutes=minutes)),
    st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1),
)


@given(
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1), timezones=OFFSETS)
)
def test_prompt_start_rfc3339_round_trip(moment: datetime) -> None:
    expected_ms = (moment - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(milliseconds=1)
    at = prompt_started_at_ms(moment.isoformat(), NOW_MS)
    assert at == pytest.approx(min(expected_ms, NOW_MS), abs=1e-3)


# --- retry_after_s ----------------------------------------------------------------------


def test_retry_after_ms_wins_over_retry_after() -> None:
    headers = {"retry-after-ms": "1500", "retry-after": "30"}
    assert retry_after_s(headers, NOW_S) == 1.5


def test_retry_after_ms_alone() -> None:
    assert retry_after_s({"retry-after-ms": "250"}, NOW_S) == 0.25


@pytest.mark.parametrize(
    ("value", "expected"),
    [("30", 30.0), ("0", 0.0), ("1.5", 1.5), (" 7 ", 7.0)],
)
def test_retry_after_delta_seconds(value: str, expected: float) -> None:
    assert retry_after_s({"retry-after": value}, NOW_S) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Tue, 14 Nov 2023 22:13:50 GMT", id="imf-fixdate"),
        pytest.param("Tuesday, 14-Nov-23 22:13:50 GMT", id="rfc850"),
    ],
)
def test_retry_after_http_date_is_relative_to_now(value: str) -> None:
    assert retry_after_s({"retry-after": value}, NOW_S) == pytest.approx(30.0)


def test_retry_after_http_date_uses_the_given_now() -> None:
    date = "Tue, 14 Nov 2023 22:13:50 GMT"
    assert retry_after_s({"retry-after": date}, NOW_S + 10) == pytest.approx(20.0)


def test_retry_after_past_http_date_is_zero() -> None:
    assert retry_after_s({"retry-after": "Tue, 14 Nov 2023 22:00:00 GMT"}, NOW_S) == 0.0


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": "application/json"}],
)
def test_retry_after_absent_is_none(headers: dict[str, str]) -> None:
    assert retry_after_s(headers, NOW_S) is None


@pytest.mark.parametrize(
    "value",
    ["", "soon", "30s", "Tue, 99 Nov 2023 22:13:50 GMT", "Mon, 01 Jan 2020 00:00:00 +2400"],
)
def test_retry_after_garbage_is_none(value: str) -> None:
    assert retry_after_s({"retry-after": value}, NOW_S) is None


@pytest.mark.parametrize("value", ["-1", "-0.5", "nan", "NaN", "inf", "-inf", "Infinity"])
def test_retry_after_negative_or_not_finite_is_none(value: str) -> None:
    assert retry_after_s({"retry-after": value}, NOW_S) is None
    assert retry_after_s({"retry-after-ms": value}, NOW_S) is None


@pytest.mark.parametrize("bad_ms", ["", "abc", "-5", "nan", "inf", "-inf"])
def test_bad_retry_after_ms_falls_back_to_retry_after(bad_ms: str) -> None:
    assert retry_after_s({"retry-after-ms": bad_ms, "retry-after": "7"}, NOW_S) == 7.0


@given(st.text(), st.one_of(st.none(), st.text()))
def test_retry_after_of_any_text_is_none_or_a_finite_non_negative_delay(
    value: str, ms: str | None
) -> None:
    headers = {"retry-after": value}
    if ms is not None:
        headers["retry-after-ms"] = ms
    delay = retry_after_s(headers, NOW_S)
    assert delay is None or (math.isfinite(delay) and delay >= 0)


@pytest.fixture
def five_hours_west_of_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the test with the process's local time zone at UTC-5 (a POSIX TZ string,
    so no tz database is needed)."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is not available on this platform")
    monkeypatch.setenv("TZ", "EST5")
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.usefixtures("five_hours_west_of_utc")
def test_retry_after_imf_fixdate_ignores_the_local_time_zone() -> None:
    assert retry_after_s({"retry-after": "Tue, 14 Nov 2023 22:13:50 GMT"}, NOW_S) == 30.0


@pytest.mark.usefixtures("five_hours_west_of_utc")
@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Tue Nov 14 22:13:50 2023", id="asctime"),
        pytest.param("Tue, 14 Nov 2023 22:13:50 -0000", id="minus-zero-zone"),
    ],
)
def test_retry_after_zoneless_http_date_is_gmt(value: str) -> None:
    # RFC 9110 section 5.6.7: recipients must accept asctime dates, which are in GMT.
    assert retry_after_s({"retry-after": value}, NOW_S) == 30.0
