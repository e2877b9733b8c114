"""The estimates every admission mode shares (admission/events.py): the measured
admission rate and the Retry-After of a refusal, on fake time."""

from __future__ import annotations

import math

import pytest

from proxy.admission.events import (
    RATE_WINDOW_S,
    AdmissionRate,
    retry_after_s,
    saturating_ahead,
)


def test_rate_of_a_steady_stream_converges_to_that_rate() -> None:
    rate = AdmissionRate(0.0)
    for i in range(1, 2000):
        rate.observe(i * 0.5)  # two admissions a second for 1,000 s
    assert rate.per_s(1000.0) == pytest.approx(2.0, rel=0.02)


def test_rate_right_after_a_start_is_not_read_as_slow() -> None:
    rate = AdmissionRate(100.0)
    for i in range(10):
        rate.observe(100.0 + i * 0.2)  # 10 admissions in the first 2 s
    assert rate.per_s(102.0) == pytest.approx(5.0, rel=0.05)


def test_rate_decays_after_a_quiet_spell() -> None:
    rate = AdmissionRate(0.0)
    for i in range(600):
        rate.observe(i * 1.0)
    busy = rate.per_s(600.0)
    assert rate.per_s(600.0 + RATE_WINDOW_S) == pytest.approx(busy / math.e, rel=0.01)
    assert rate.per_s(600.0 + 20 * RATE_WINDOW_S) < 1e-6


def test_without_a_queue_estimate_it_is_the_rest_of_a_pause_or_a_second() -> None:
    assert retry_after_s(0.0) == 1
    assert retry_after_s(-3.0) == 1
    assert retry_after_s(6.5) == 7


def test_retry_after_grows_with_the_waiters_ahead() -> None:
    answers = [
        retry_after_s(0.0, ahead=n, admissions_per_s=0.5, cap_s=600) for n in range(0, 50, 5)
    ]
    assert answers == sorted(answers)
    assert answers[0] == 2  # itself at 0.5/s
    assert answers[-1] == 92  # 45 ahead + itself at 0.5/s


def test_retry_after_shrinks_with_a_faster_admission_rate() -> None:
    slow = retry_after_s(0.0, ahead=20, admissions_per_s=0.2, cap_s=600)
    fast = retry_after_s(0.0, ahead=20, admissions_per_s=2.0, cap_s=600)
    assert (slow, fast) == (105, 11)


def test_retry_after_bounds_hold() -> None:
    assert retry_after_s(0.0, ahead=0, admissions_per_s=1000.0, cap_s=600) == 1  # at least 1 s
    assert retry_after_s(0.0, ahead=10**6, admissions_per_s=1.0, cap_s=600) == 600  # the cap
    assert retry_after_s(0.0, ahead=3, admissions_per_s=0.0, cap_s=45) == 45  # nothing moves
    # A pause counts in full, even past the cap; the queue comes on top of it.
    assert retry_after_s(30.0, ahead=10, admissions_per_s=1.0, cap_s=20) == 30
    assert retry_after_s(5.0, ahead=9, admissions_per_s=1.0, cap_s=600) == 15


def test_saturating_ahead_is_where_the_estimate_reaches_the_cap() -> None:
    stop = saturating_ahead(5.0, 2.0, 65.0)
    assert stop == 120
    assert retry_after_s(5.0, ahead=stop, admissions_per_s=2.0, cap_s=65.0) == 65
    assert saturating_ahead(0.0, 0.0, 600.0) == 0  # no rate: the cap whatever the count
