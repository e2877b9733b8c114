"""PromptMemory: first-seen times by digest, least recently used first out, expiring
by last use. Times are plain numbers (epoch ms); nothing sleeps."""

from __future__ import annotations

import math

import pytest

from proxy.prompts import PromptMemory

TTL = 1_000.0


def test_a_new_key_is_recorded_at_now() -> None:
    memory = PromptMemory(ttl_ms=TTL)
    assert memory.first_seen(b"a", 100.0) == (100.0, True)
    assert len(memory) == 1


def test_a_known_key_keeps_its_first_time() -> None:
    memory = PromptMemory(ttl_ms=TTL)
    memory.first_seen(b"a", 100.0)
    assert memory.first_seen(b"a", 700.0) == (100.0, False)
    assert memory.first_seen(b"a", 1_300.0) == (100.0, False)
    assert len(memory) == 1


def test_a_key_unused_for_the_ttl_is_forgotten_and_starts_again() -> None:
    memory = PromptMemory(ttl_ms=TTL)
    memory.first_seen(b"a", 100.0)
    assert memory.first_seen(b"a", 100.0 + TTL) == (100.0 + TTL, True)


def test_use_refreshes_a_key_so_expiry_counts_from_the_last_use() -> None:
    memory = PromptMemory(ttl_ms=TTL)
    memory.first_seen(b"a", 0.0)
    memory.first_seen(b"a", 900.0)  # a tool round
    assert memory.get(b"a", 1_899.0) == 0.0  # 999 ms after the last use
    assert memory.get(b"a", 1_899.0 + TTL) is None


def test_get_does_not_insert() -> None:
    memory = PromptMemory(ttl_ms=TTL)
    assert memory.get(b"a", 5.0) is None
    assert len(memory) == 0
    assert memory.first_seen(b"a", 9.0) == (9.0, True)


def test_get_drops_an_expired_key() -> None:
    memory = PromptMemory(ttl_ms=TTL)
    memory.put(b"a", 0.0, 0.0)
    assert memory.get(b"a", TTL) is None
    assert len(memory) == 0


def test_put_records_a_given_start_and_replaces_what_was_known() -> None:
    memory = PromptMemory(ttl_ms=TTL)
    memory.put(b"resp", 50.0, 400.0)  # a response id: its request's prompt time
    assert memory.get(b"resp", 500.0) == 50.0
    memory.put(b"resp", 70.0, 600.0)
    assert memory.get(b"resp", 700.0) == 70.0
    assert memory.first_seen(b"resp", 800.0) == (70.0, False)


def test_put_counts_as_a_use() -> None:
    memory = PromptMemory(ttl_ms=TTL)
    memory.put(b"a", 0.0, 500.0)
    assert memory.get(b"a", 500.0 + TTL - 1) == 0.0


def test_beyond_max_entries_the_least_recently_used_goes_first() -> None:
    memory = PromptMemory(max_entries=3, ttl_ms=TTL)
    for t, k in enumerate([b"a", b"b", b"c"]):
        memory.first_seen(k, float(t))
    memory.first_seen(b"a", 10.0)  # a is now the most recently used
    memory.first_seen(b"d", 11.0)
    assert len(memory) == 3
    assert memory.get(b"b", 12.0) is None
    assert memory.get(b"a", 12.0) == 0.0
    assert memory.get(b"c", 12.0) == 2.0
    assert memory.get(b"d", 12.0) == 11.0


def test_get_refreshes_the_eviction_order_too() -> None:
    memory = PromptMemory(max_entries=2, ttl_ms=TTL)
    memory.first_seen(b"a", 0.0)
    memory.first_seen(b"b", 1.0)
    memory.get(b"a", 2.0)
    memory.put(b"c", 3.0, 3.0)
    assert [key for key, _, _ in memory.items()] == [b"a", b"c"]


def test_expire_drops_entries_unused_for_the_ttl_and_counts_them() -> None:
    memory = PromptMemory(ttl_ms=TTL)
    memory.first_seen(b"old", 0.0)
    memory.first_seen(b"mid", 300.0)
    memory.first_seen(b"new", 600.0)
    memory.first_seen(b"old", 650.0)  # used again: no longer the oldest
    assert memory.expire(1_300.0) == 1  # mid: unused since 300
    assert [key for key, _, _ in memory.items()] == [b"new", b"old"]
    assert memory.expire(1_300.0) == 0
    assert memory.expire(1_650.0) == 2
    assert len(memory) == 0


def test_expire_on_an_empty_memory_drops_nothing() -> None:
    assert PromptMemory().expire(1e15) == 0


def test_items_give_start_and_last_use_oldest_use_first() -> None:
    memory = PromptMemory(ttl_ms=TTL)
    memory.first_seen(b"a", 0.0)
    memory.first_seen(b"b", 10.0)
    memory.first_seen(b"a", 20.0)
    assert list(memory.items()) == [(b"b", 10.0, 10.0), (b"a", 0.0, 20.0)]


def test_a_memory_reloaded_from_its_items_keeps_times_and_eviction_order() -> None:
    saved = PromptMemory(max_entries=3, ttl_ms=TTL)
    for t, k in enumerate([b"a", b"b", b"c"]):
        saved.first_seen(k, float(t))
    saved.first_seen(b"a", 5.0)
    loaded = PromptMemory(max_entries=3, ttl_ms=TTL)
    for key, started, last_used in saved.items():
        loaded.put(key, started, last_used)
    assert list(loaded.items()) == list(saved.items())
    loaded.first_seen(b"d", 6.0)
    assert loaded.get(b"b", 7.0) is None


def test_the_default_bounds_are_the_spec_defaults() -> None:
    memory = PromptMemory()
    memory.first_seen(b"a", 0.0)
    assert memory.get(b"a", 86_400_000.0 - 1) == 0.0
    assert memory.get(b"a", 2 * 86_400_000.0 - 2) == 0.0
    assert memory.get(b"a", 3 * 86_400_000.0) is None
    assert "max_entries=100000" in repr(memory)


@pytest.mark.parametrize("max_entries", [0, -1])
def test_max_entries_below_one_is_refused(max_entries: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PromptMemory(max_entries=max_entries)


@pytest.mark.parametrize("ttl_ms", [0.0, -1.0, math.inf, math.nan])
def test_a_ttl_that_is_not_a_positive_finite_number_is_refused(ttl_ms: float) -> None:
    with pytest.raises(ValueError, match="finite number above 0"):
        PromptMemory(ttl_ms=ttl_ms)


def test_repr_shows_live_state() -> None:
    memory = PromptMemory(max_entries=5, ttl_ms=TTL)
    memory.first_seen(b"a", 0.0)
    assert repr(memory) == "<PromptMemory entries=1 max_entries=5 ttl_ms=1000>"
