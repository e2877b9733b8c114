"""`LocalPromptTimes`: first-seen times answered from memory, written to the store in
batches (never on the request path), loaded back after a restart."""

from __future__ import annotations

from pathlib import Path

from proxy.runtime.prompt_times import LocalPromptTimes
from proxy.runtime.store import Store

DAY_MS = 86_400_000.0
NOW = 1_795_830_000_000.0


async def open_times(path: Path, now_ms: float = NOW) -> tuple[Store, LocalPromptTimes]:
    store = await Store.open(path)
    times = LocalPromptTimes(store, ttl_ms=DAY_MS)
    await times.start(now_ms)
    return store, times


async def test_a_new_prompt_is_written_only_when_the_batch_is_flushed(tmp_path: Path) -> None:
    store, times = await open_times(tmp_path / "s.db")
    assert await times.first_seen(b"k" * 16, NOW) == NOW
    assert await store.load_prompt_times(0, 10) == []  # nothing written on the request path
    await times.flush(NOW)
    assert await store.load_prompt_times(0, 10) == [(b"k" * 16, round(NOW), round(NOW))]
    await times.close()
    await store.close()


async def test_a_known_prompt_keeps_its_first_time_and_writes_nothing(tmp_path: Path) -> None:
    store, times = await open_times(tmp_path / "s.db")
    await times.first_seen(b"a", NOW)
    await times.flush(NOW)
    assert await times.first_seen(b"a", NOW + 5_000) == NOW
    await times.flush(NOW + 5_000)
    assert await store.load_prompt_times(0, 10) == [(b"a", round(NOW), round(NOW))]
    await times.close()
    await store.close()


async def test_close_writes_the_last_batch_and_a_restart_reads_it_back(tmp_path: Path) -> None:
    store, times = await open_times(tmp_path / "s.db")
    await times.first_seen(b"prompt", NOW)
    times.remember(b"response", NOW - 1_000, NOW)
    await times.close()
    await store.close()

    store, times = await open_times(tmp_path / "s.db", NOW + 60_000)
    assert await times.first_seen(b"prompt", NOW + 60_000) == NOW
    assert await times.known(b"response", NOW + 60_000) == NOW - 1_000
    await times.close()
    await store.close()


async def test_known_never_records(tmp_path: Path) -> None:
    store, times = await open_times(tmp_path / "s.db")
    assert await times.known(b"nobody", NOW) is None
    assert await times.known(b"nobody", NOW + 1) is None
    await times.close()
    assert await store.load_prompt_times(0, 10) == []
    await store.close()


async def test_entries_unused_for_the_memory_time_are_not_loaded(tmp_path: Path) -> None:
    store, times = await open_times(tmp_path / "s.db")
    await times.first_seen(b"old", NOW)
    await times.first_seen(b"fresh", NOW + DAY_MS / 2)
    await times.close()
    await store.close()

    store, times = await open_times(tmp_path / "s.db", NOW + DAY_MS + 1)
    assert await times.known(b"old", NOW + DAY_MS + 1) is None
    assert await times.known(b"fresh", NOW + DAY_MS + 1) == NOW + DAY_MS / 2
    await times.close()
    await store.close()


async def test_a_store_that_fails_loses_the_batch_but_not_the_request(tmp_path: Path) -> None:
    store, times = await open_times(tmp_path / "s.db")
    await store.close()  # every write now fails
    assert await times.first_seen(b"k", NOW) == NOW
    await times.flush(NOW)  # logged, not raised
    assert await times.first_seen(b"k", NOW + 1) == NOW  # memory still answers
    await times.close()
