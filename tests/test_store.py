"""The durable store: round trips, migrations, atomicity, serialization, trimming, SIGKILL."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.errors import StoreError
from proxy.runtime import store as store_mod
from proxy.runtime.store import CooldownOverride, Event, LimitOverride, ProviderOverrides, Store

PROJECT_ROOT = Path(__file__).resolve().parents[1]

REDUCED = LimitOverride(
    limit=3,
    config_basis=5,
    auto_reduced=True,
    auto_reduced_from=5,
    notice="Concurrency limit auto-reduced to 3 after a 429 — restore manually when ready.",
)
MANUAL = LimitOverride(
    limit=7, config_basis=5, auto_reduced=False, auto_reduced_from=None, notice=None
)
REMOVED = LimitOverride(
    limit=None, config_basis=4, auto_reduced=False, auto_reduced_from=None, notice=None
)


def limit_of(n: int) -> LimitOverride:
    return LimitOverride(
        limit=n, config_basis=None, auto_reduced=False, auto_reduced_from=None, notice=None
    )


def event(provider_id: str, kind: str = "limit_set", detail: str = "", at_ms: int = 1) -> Event:
    return Event(at_ms=at_ms, provider_id=provider_id, kind=kind, detail=detail)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sluice.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(db_path)
    try:
        yield opened
    finally:
        await opened.close()


def sqlite_scalar(path: Path, sql: str) -> object:
    """Read one value with a plain sqlite3 connection, independent of the Store."""
    conn = sqlite3.connect(path)
    try:
        value: object = conn.execute(sql).fetchone()[0]
        return value
    finally:
        conn.close()


# -- opening, pragmas, migrations ---------------------------------------------------------


async def test_open_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "sluice.db"
    opened = await Store.open(path)
    await opened.close()
    assert path.is_file()


async def test_wal_and_full_sync_are_on(store: Store, db_path: Path) -> None:
    assert sqlite_scalar(db_path, "PRAGMA journal_mode") == "wal"
    # synchronous is per connection: ask the store's own (private) connection.
    assert store._conn is not None
    rows = await store._conn.execute_fetchall("PRAGMA synchronous")
    assert [tuple(row) for row in rows] == [(2,)]  # FULL


async def test_user_version_counts_the_migrations(store: Store, db_path: Path) -> None:
    assert sqlite_scalar(db_path, "PRAGMA user_version") == len(store_mod.MIGRATIONS)


async def test_reopening_does_not_rerun_migrations(db_path: Path) -> None:
    first = await Store.open(db_path)
    await first.save_limit("p", MANUAL)
    await first.close()
    # Re-running step 1 would fail on CREATE TABLE of an existing table.
    second = await Store.open(db_path)
    try:
        assert (await second.load())["p"].limit == MANUAL
    finally:
        await second.close()
    assert sqlite_scalar(db_path, "PRAGMA user_version") == len(store_mod.MIGRATIONS)


async def test_older_schema_gets_only_the_missing_steps(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    current = await Store.open(db_path)
    await current.save_limit("p", MANUAL)
    await current.close()
    known = len(store_mod.MIGRATIONS)

    step = "CREATE TABLE extra (x TEXT); INSERT INTO extra VALUES ('a;b');"
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*store_mod.MIGRATIONS, step))
    newer = await Store.open(db_path)
    try:
        assert (await newer.load())["p"].limit == MANUAL
    finally:
        await newer.close()
    assert sqlite_scalar(db_path, "PRAGMA user_version") == known + 1
    # Applied exactly once, with the quoted semicolon intact.
    assert sqlite_scalar(db_path, "SELECT group_concat(x) FROM extra") == "a;b"


async def test_failed_migration_step_leaves_the_older_version(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await (await Store.open(db_path)).close()
    known = len(store_mod.MIGRATIONS)
    broken = "CREATE TABLE extra (x TEXT); INSERT INTO no_such_table VALUES (1);"
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*store_mod.MIGRATIONS, broken))
    with pytest.raises(StoreError, match="no_such_table"):
        await Store.open(db_path)
    assert sqlite_scalar(db_path, "PRAGMA user_version") == known
    tables = sqlite_scalar(db_path, "SELECT count(*) FROM sqlite_master WHERE name = 'extra'")
    assert tables == 0


async def test_newer_schema_than_the_code_is_refused(db_path: Path) -> None:
    await (await Store.open(db_path)).close()
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99, newer than"):
        await Store.open(db_path)
    assert sqlite_scalar(db_path, "PRAGMA user_version") == 99


async def test_unopenable_path_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError):
        await Store.open(blocker / "sluice.db")
    with pytest.raises(StoreError):
        await Store.open(tmp_path)  # a directory


async def test_in_memory_store_works() -> None:
    memory = await Store.open(":memory:")
    try:
        await memory.save_limit("p", REDUCED, event("p"))
        assert (await memory.load())["p"].limit == REDUCED
    finally:
        await memory.close()


# -- overrides --------------------------------------------------------------------------


async def test_overrides_survive_close_and_reopen(db_path: Path) -> None:
    first = await Store.open(db_path)
    await first.save_limit("reduced", REDUCED)
    await first.save_cooldown("reduced", CooldownOverride(cooldown_ms=250, config_basis=100))
    await first.save_limit("removed", REMOVED)
    await first.save_cooldown("cool", CooldownOverride(cooldown_ms=0, config_basis=1000))
    await first.close()

    second = await Store.open(db_path)
    try:
        assert await second.load() == {
            "reduced": ProviderOverrides(
                "reduced", REDUCED, CooldownOverride(cooldown_ms=250, config_basis=100)
            ),
            "removed": ProviderOverrides("removed", REMOVED, None),
            "cool": ProviderOverrides("cool", None, CooldownOverride(0, 1000)),
        }
    finally:
        await second.close()


async def test_empty_store_loads_nothing(store: Store) -> None:
    assert await store.load() == {}
    assert await store.events() == []


async def test_each_save_touches_only_its_own_columns(store: Store) -> None:
    await store.save_cooldown("p", CooldownOverride(500, 0))
    await store.save_limit("p", REDUCED)
    await store.save_limit("p", MANUAL)  # a manual set replaces the auto-reduce state
    await store.save_cooldown("p", CooldownOverride(750, 0))
    assert await store.load() == {"p": ProviderOverrides("p", MANUAL, CooldownOverride(750, 0))}


# -- failures and atomicity -------------------------------------------------------------


async def test_save_with_a_failing_event_writes_nothing(store: Store) -> None:
    await store.save_limit("p", MANUAL, event("p", detail="first"))
    await store.save_cooldown("p", CooldownOverride(100, 0))
    before = await store.load()

    # An empty kind violates the events table's CHECK, after the override was written.
    with pytest.raises(StoreError, match="CHECK constraint failed"):
        await store.save_limit("p", REDUCED, event("p", kind=""))
    with pytest.raises(StoreError, match="CHECK constraint failed"):
        await store.save_cooldown("p", CooldownOverride(999, 0), event("p", kind=""))
    with pytest.raises(StoreError, match="CHECK constraint failed"):
        await store.save_limit("new", REDUCED, event("", kind="limit_reduced"))

    assert await store.load() == before
    assert await store.events() == [event("p", detail="first")]
    # The failed transactions were rolled back: the next write goes through.
    await store.save_limit("p", REDUCED, event("p", kind="limit_reduced"))
    assert (await store.load())["p"].limit == REDUCED


@pytest.mark.parametrize(
    "override",
    [limit_of(0), limit_of(2**70)],
    ids=["check-constraint", "integer-overflow"],
)
async def test_a_failed_write_raises_store_error_and_the_store_still_works(
    store: Store, override: LimitOverride
) -> None:
    with pytest.raises(StoreError) as info:
        await store.save_limit("p", override)
    assert info.value.__cause__ is not None
    await store.save_limit("p", MANUAL, event("p"))
    assert (await store.load())["p"].limit == MANUAL


async def test_cancelled_saves_leave_the_store_usable(store: Store) -> None:
    """A caller cancelled mid-transaction must not leave the connection inside it."""
    for delay in range(12):
        task = asyncio.create_task(
            store.save_limit("p", limit_of(100 + delay), event("p", detail=str(delay)))
        )
        for _ in range(delay):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.save_limit("q", limit_of(delay + 1), event("q"))
        assert (await store.load())["q"].limit == limit_of(delay + 1)
    # Each cancelled save landed whole (override and event) or not at all.
    landed = [int(e.detail) for e in await store.events("p")]
    saved = (await store.load()).get("p")
    if landed:
        assert saved is not None
        assert saved.limit == limit_of(100 + max(landed))
    else:
        assert saved is None


async def test_closed_store_raises_store_error(db_path: Path) -> None:
    closed = await Store.open(db_path)
    await closed.close()
    await closed.close()  # idempotent
    assert "closed" in repr(closed)
    with pytest.raises(StoreError, match="closed"):
        await closed.load()
    with pytest.raises(StoreError, match="closed"):
        await closed.save_limit("p", MANUAL)
    with pytest.raises(StoreError, match="closed"):
        await closed.save_cooldown("p", CooldownOverride(1, 1))
    with pytest.raises(StoreError, match="closed"):
        await closed.add_event(event("p"))
    with pytest.raises(StoreError, match="closed"):
        await closed.events()


# -- concurrency ------------------------------------------------------------------------


async def test_concurrent_saves_all_land_and_never_interleave(store: Store) -> None:
    assert store._conn is not None
    statements: list[str] = []
    await store._conn.set_trace_callback(statements.append)  # runs on the worker thread

    async def write(i: int) -> None:
        pid = f"p{i % 20}"
        if i % 3 == 0:
            await store.save_limit(pid, limit_of(i + 1), event(pid, detail=f"w{i}"))
        elif i % 3 == 1:
            await store.save_cooldown(pid, CooldownOverride(i, 0), event(pid, detail=f"w{i}"))
        else:
            await store.add_event(event(pid, detail=f"w{i}"))

    await asyncio.gather(*(write(i) for i in range(200)))
    trace = list(statements)  # every write has committed; later reads add no BEGIN

    events = await store.events(limit=1000)
    assert sorted(e.detail for e in events) == sorted(f"w{i}" for i in range(200))
    # The lock is FIFO, so transactions commit in gather order: the last write wins.
    loaded = await store.load()
    for j in range(20):
        last_limit = max(i for i in range(200) if i % 3 == 0 and i % 20 == j)
        last_cooldown = max(i for i in range(200) if i % 3 == 1 and i % 20 == j)
        assert loaded[f"p{j}"].limit == limit_of(last_limit + 1)
        assert loaded[f"p{j}"].cooldown == CooldownOverride(last_cooldown, 0)

    # The trace shows 200 back-to-back BEGIN ... COMMIT blocks, each about one write.
    blocks: list[list[str]] = []
    for sql in trace:
        if sql == "BEGIN IMMEDIATE":
            assert not blocks or blocks[-1][-1] == "COMMIT", "a transaction began inside another"
            blocks.append([sql])
        else:
            assert blocks, f"statement outside any transaction: {sql}"
            assert blocks[-1][-1] != "COMMIT", f"statement after COMMIT: {sql}"
            blocks[-1].append(sql)
    assert len(blocks) == 200
    for block in blocks:
        assert block[-1] == "COMMIT"
        details = {d for d in (f"'w{i}'" for i in range(200)) if any(d in s for s in block)}
        assert len(details) == 1, block


# -- events -----------------------------------------------------------------------------


async def test_events_newest_first_filtered_and_limited(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(6):
        await store.add_event(event("a" if i % 2 == 0 else "b", "rate_limited", f"e{i}", 1000 + i))
    assert [e.detail for e in await store.events()] == ["e5", "e4", "e3", "e2", "e1", "e0"]
    assert [e.detail for e in await store.events("a")] == ["e4", "e2", "e0"]
    assert [e.detail for e in await store.events("b", limit=2)] == ["e5", "e3"]
    assert await store.events("nobody") == []
    assert (await store.events())[0] == Event(1005, "b", "rate_limited", "e5")
    # The limit is clamped, whatever the caller forgot to validate.
    assert len(await store.events(limit=0)) == 1
    assert len(await store.events(limit=-5)) == 1
    monkeypatch.setattr(store_mod, "EVENTS_LIMIT_MAX", 4)
    assert len(await store.events(limit=10**9)) == 4


async def test_events_are_trimmed_per_provider(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "MAX_EVENTS_PER_PROVIDER", 5)
    monkeypatch.setattr(store_mod, "TRIM_EVERY", 3)
    first = await Store.open(db_path)
    for i in range(20):
        await first.add_event(event("busy", detail=str(i)))
    await first.save_limit("quiet", MANUAL, event("quiet", detail="q0"))
    await first.add_event(event("quiet", detail="q1"))

    kept = [e.detail for e in await first.events("busy", limit=100)]
    assert kept[:5] == ["19", "18", "17", "16", "15"]  # the newest always survive
    assert 5 <= len(kept) <= 5 + 3 - 1
    assert [e.detail for e in await first.events("quiet")] == ["q1", "q0"]
    await first.close()

    # Opening trims every provider to the cap exactly.
    second = await Store.open(db_path)
    try:
        assert [e.detail for e in await second.events("busy")] == ["19", "18", "17", "16", "15"]
        assert len(await second.events("quiet")) == 2
    finally:
        await second.close()


# -- durability -------------------------------------------------------------------------

WRITER = """
import asyncio, sys
from proxy.runtime.store import CooldownOverride, Event, LimitOverride, Store

async def main(path, provider):
    store = await Store.open(path)
    print("open", flush=True)
    i = 0
    while True:
        i += 1
        await store.save_limit(
            provider,
            LimitOverride(i, None, False, None, None),
            Event(i, provider, "limit_set", str(i)),
        )
        print(i, flush=True)
        await store.save_cooldown(provider, CooldownOverride(i, 0))
        print(-i, flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_every_acknowledged_write_survives_sigkill(db_path: Path) -> None:
    rng = random.Random(1234)
    acknowledged: dict[str, tuple[int, int]] = {}
    for round_ in range(12):
        provider = f"p{round_}"
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db_path), provider],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Timed from spawn, so some kills land while the file is opened or migrated.
        time.sleep(rng.uniform(0.05, 0.5))
        proc.kill()
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL, err
        lines = [line for line in out.splitlines(keepends=True) if line.endswith("\n")]
        numbers = [int(line) for line in lines[1:]]  # lines[0] is "open"
        last_limit = max((n for n in numbers if n > 0), default=0)
        last_cooldown = max((-n for n in numbers if n < 0), default=0)
        acknowledged[provider] = (last_limit, last_cooldown)

    asyncio.run(check_acknowledged(db_path, acknowledged))
    assert sum(1 for limit, _ in acknowledged.values() if limit) >= 3, acknowledged


async def check_acknowledged(db_path: Path, acknowledged: dict[str, tuple[int, int]]) -> None:
    """Every acknowledged value is stored; only the one in flight at the kill may be newer."""
    reopened = await Store.open(db_path)
    try:
        loaded = await reopened.load()
        for provider, (last_limit, last_cooldown) in acknowledged.items():
            if last_limit:
                limit = loaded[provider].limit
                assert limit is not None
                assert limit.limit in (last_limit, last_limit + 1)
                # events() returns at most 1000; the newest 999 acknowledged must be there.
                details = {int(e.detail) for e in await reopened.events(provider, limit=1000)}
                assert set(range(max(1, last_limit - 998), last_limit + 1)) <= details
            if last_cooldown:
                cooldown = loaded[provider].cooldown
                assert cooldown is not None
                assert cooldown.cooldown_ms in (last_cooldown, last_cooldown + 1)
    finally:
        await reopened.close()
