"""The durable store: per-provider overrides and the events journal, in one SQLite file.

What is stored (docs/design.md, "Durability"): per provider, the limit set through
the admin API or by a 429 reduction (or its removal), the auto-reduce state, and the
cooldown set through the admin API, each with the config file's value at the time it
was written (its *basis*), so that on start the caller can tell whether the operator changed the
config file since. Plus a journal of events for ``GET /concurrency/events``. The
store never receives provider keys or the admin token and has no API that could
take one.

Durability. One aiosqlite connection for the Store's life, in WAL mode with
``synchronous=FULL``: every commit fsyncs the WAL before it returns, so a write
that returned survives a SIGKILL at any moment and, as far as the disk honours
fsync, a power loss. Every save returns only after its COMMIT.

Concurrency. All statements go through the one connection, whose worker thread
runs them in FIFO order. An ``asyncio.Lock`` is held around each transaction (and
each read) so statements of two coroutines never interleave. Transactions start
with ``BEGIN IMMEDIATE``: the write lock is taken up front, so another process on
the same file waits out ``busy_timeout`` instead of failing to upgrade a read
lock. A transaction that fails, or whose caller is cancelled, is rolled back
before the lock is released, so the next write starts clean.

Errors. Any sqlite3/aiosqlite failure, and any use of a closed store, is raised
as :class:`~proxy.errors.StoreError`; the write it was asked for did not happen.
(A caller cancelled at the moment of COMMIT cannot know whether it landed; either
way it landed whole or not at all.)

Schema. ``PRAGMA user_version`` counts the :data:`MIGRATIONS` applied. Each step
runs in its own transaction together with its version bump, and re-reads the
version inside that transaction, so two processes opening one new file at once
cannot apply a step twice. A file newer than this code is refused.

Events retention. The journal keeps at most :data:`MAX_EVENTS_PER_PROVIDER` newest
events per provider. Trimming one provider is a single indexed DELETE; it runs
inside the insert's transaction every :data:`TRIM_EVERY` inserts for that
provider, and for every provider on open. So a provider holds at most
``MAX_EVENTS_PER_PROVIDER + TRIM_EVERY - 1`` events between trims: a few MB at
worst, while every insert stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from proxy.errors import StoreError

__all__ = [
    "MAX_EVENTS_PER_PROVIDER",
    "MIGRATIONS",
    "TRIM_EVERY",
    "CooldownOverride",
    "Event",
    "LimitOverride",
    "ProviderOverrides",
    "Store",
]

MAX_EVENTS_PER_PROVIDER = 10_000
"""Newest events kept per provider; older ones are trimmed."""

TRIM_EVERY = 100
"""Inserts for one provider between two trims of that provider's events."""

EVENTS_LIMIT_MAX = 1000
"""Most events one `Store.events` call returns."""

BUSY_TIMEOUT_MS = 5000
"""How long a write waits for another process's write lock before failing."""

MIGRATIONS: tuple[str, ...] = (
    # 1: overrides and the events journal.
    """
    CREATE TABLE provider_overrides (
        provider_id           TEXT    PRIMARY KEY NOT NULL CHECK (length(provider_id) > 0),
        -- has_limit = 1 with limit_value NULL: the limit was removed (unlimited).
        has_limit             INTEGER NOT NULL DEFAULT 0 CHECK (has_limit IN (0, 1)),
        limit_value           INTEGER CHECK (limit_value IS NULL OR limit_value >= 1),
        limit_config_basis    INTEGER,
        auto_reduced          INTEGER NOT NULL DEFAULT 0 CHECK (auto_reduced IN (0, 1)),
        auto_reduced_from     INTEGER,
        notice                TEXT,
        -- cooldown_ms NULL: no cooldown override.
        cooldown_ms           INTEGER CHECK (cooldown_ms IS NULL OR cooldown_ms >= 0),
        cooldown_config_basis INTEGER,
        updated_at_ms         INTEGER NOT NULL,
        CHECK ((cooldown_ms IS NULL) = (cooldown_config_basis IS NULL))
    );
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY,
        at_ms       INTEGER NOT NULL,
        provider_id TEXT    NOT NULL CHECK (length(provider_id) > 0),
        kind        TEXT    NOT NULL CHECK (length(kind) > 0),
        detail      TEXT    NOT NULL
    );
    CREATE INDEX events_by_provider ON events (provider_id, id);
    """,
    # 2: first-seen times of prompts and relayed responses (digests only; "Task age").
    """
    CREATE TABLE prompt_times (
        key           BLOB    PRIMARY KEY NOT NULL,
        started_at_ms INTEGER NOT NULL,
        used_at_ms    INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX prompt_times_by_use ON prompt_times (used_at_ms);
    """,
)
"""Ordered schema steps; step ``i`` (0-based) takes the file to ``user_version = i + 1``.
Append only: a released step is never edited."""

# aiosqlite signals a connection closed under it with ValueError; binding an int
# that does not fit in 64 bits raises OverflowError.
_DB_ERRORS = (sqlite3.Error, ValueError, OverflowError)

_MEMORY = ":memory:"


@dataclass(frozen=True)
class LimitOverride:
    """A stored limit for one provider, set by the admin API or a 429 reduction."""

    limit: int | None
    """None: the limit was removed, the provider is unlimited."""
    config_basis: int | None
    """The config file's limit for this provider when the override was written."""
    auto_reduced: bool
    auto_reduced_from: int | None
    notice: str | None


@dataclass(frozen=True)
class CooldownOverride:
    """A cooldown set through the admin API."""

    cooldown_ms: int
    config_basis: int
    """The config file's effective cooldown_ms when the override was written."""


@dataclass(frozen=True)
class ProviderOverrides:
    """Everything stored for one provider; None where nothing is stored."""

    provider_id: str
    limit: LimitOverride | None
    cooldown: CooldownOverride | None


@dataclass(frozen=True)
class Event:
    """One journal entry, as ``GET /concurrency/events`` shows it."""

    at_ms: int
    """Epoch milliseconds."""
    provider_id: str
    kind: str
    """rate_limited, limit_reduced, paused, limit_set, limit_removed, cooldown_set, ..."""
    detail: str


class Store:
    """The SQLite file (docs/design.md, "Durability"). Create with `await Store.open(path)`;
    close once done."""

    def __init__(self, conn: aiosqlite.Connection, path: str) -> None:
        """Use `Store.open`; this only wraps an already migrated connection."""
        self._conn: aiosqlite.Connection | None = conn
        self._path = path
        self._lock = asyncio.Lock()
        # Inserts per provider since its last trim; only approximate (a rolled back
        # insert still counts), which merely moves a trim a little earlier.
        self._since_trim: dict[str, int] = {}

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"<Store {self._path!r} {state}>"

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open (creating it and its parent directories) and migrate the store at `path`.

        ``":memory:"`` gives a throwaway in-memory store (no WAL there), for tests.
        """
        location = os.fspath(path)
        in_memory = location == _MEMORY
        if not in_memory:
            try:
                await asyncio.to_thread(Path(location).parent.mkdir, parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the directory for {location!r}: {exc}") from exc
        try:
            # isolation_level=None: no implicit transactions; we issue BEGIN/COMMIT.
            conn = await aiosqlite.connect(location, isolation_level=None)
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot open the store {location!r}: {exc}") from exc
        store = cls(conn, location)
        try:
            await store._configure(conn, in_memory)
            await store._migrate(conn)
            await store._trim_all(conn)
        except BaseException as exc:
            await store.close()
            if isinstance(exc, _DB_ERRORS):
                raise StoreError(f"cannot open the store {location!r}: {exc}") from exc
            raise
        if not in_memory:
            # The file's directory entry must survive power loss too; SQLite syncs
            # the directory for the WAL it creates, not for the database file.
            await asyncio.to_thread(_fsync_dir, Path(location).parent)
        return store

    async def close(self) -> None:
        """Close the connection after any write in progress; later calls do nothing."""
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                await conn.close()
            except _DB_ERRORS as exc:
                raise StoreError(f"closing the store failed: {exc}") from exc

    async def load(self) -> dict[str, ProviderOverrides]:
        """Every provider with a stored override, by provider id."""
        rows = await self._read(
            "load overrides",
            """
            SELECT provider_id, has_limit, limit_value, limit_config_basis, auto_reduced,
                   auto_reduced_from, notice, cooldown_ms, cooldown_config_basis
            FROM provider_overrides ORDER BY provider_id
            """,
        )
        result: dict[str, ProviderOverrides] = {}
        for (
            provider_id,
            has_limit,
            limit_value,
            limit_basis,
            auto_reduced,
            auto_reduced_from,
            notice,
            cooldown_ms,
            cooldown_basis,
        ) in rows:
            limit = (
                LimitOverride(
                    limit=limit_value,
                    config_basis=limit_basis,
                    auto_reduced=bool(auto_reduced),
                    auto_reduced_from=auto_reduced_from,
                    notice=notice,
                )
                if has_limit
                else None
            )
            cooldown = (
                CooldownOverride(cooldown_ms=cooldown_ms, config_basis=cooldown_basis)
                if cooldown_ms is not None
                else None
            )
            if limit is not None or cooldown is not None:
                result[provider_id] = ProviderOverrides(provider_id, limit, cooldown)
        return result

    async def save_limit(
        self, provider_id: str, override: LimitOverride, event: Event | None = None
    ) -> None:
        """Store `provider_id`'s limit override (and `event`, in the same transaction).

        Returns once committed; on StoreError neither was written.
        """
        async with self._transaction(f"save the limit of {provider_id!r}") as conn:
            await _run(
                conn,
                """
                INSERT INTO provider_overrides (
                    provider_id, has_limit, limit_value, limit_config_basis,
                    auto_reduced, auto_reduced_from, notice, updated_at_ms)
                VALUES (?, 1, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (provider_id) DO UPDATE SET
                    has_limit = 1,
                    limit_value = excluded.limit_value,
                    limit_config_basis = excluded.limit_config_basis,
                    auto_reduced = excluded.auto_reduced,
                    auto_reduced_from = excluded.auto_reduced_from,
                    notice = excluded.notice,
                    updated_at_ms = excluded.updated_at_ms
                """,
                (
                    provider_id,
                    override.limit,
                    override.config_basis,
                    int(override.auto_reduced),
                    override.auto_reduced_from,
                    override.notice,
                    _now_ms(),
                ),
            )
            if event is not None:
                await self._insert_event(conn, event)

    async def save_cooldown(
        self, provider_id: str, override: CooldownOverride, event: Event | None = None
    ) -> None:
        """Store `provider_id`'s cooldown override (and `event`, in the same transaction).

        Returns once committed; on StoreError neither was written.
        """
        async with self._transaction(f"save the cooldown of {provider_id!r}") as conn:
            await _run(
                conn,
                """
                INSERT INTO provider_overrides (
                    provider_id, cooldown_ms, cooldown_config_basis, updated_at_ms)
                VALUES (?, ?, ?, ?)
                ON CONFLICT (provider_id) DO UPDATE SET
                    cooldown_ms = excluded.cooldown_ms,
                    cooldown_config_basis = excluded.cooldown_config_basis,
                    updated_at_ms = excluded.updated_at_ms
                """,
                (provider_id, override.cooldown_ms, override.config_basis, _now_ms()),
            )
            if event is not None:
                await self._insert_event(conn, event)

    async def add_event(self, event: Event) -> None:
        """Append `event` to the journal; returns once committed."""
        async with self._transaction(f"record a {event.kind!r} event") as conn:
            await self._insert_event(conn, event)

    async def events(self, provider_id: str | None = None, limit: int = 100) -> list[Event]:
        """The newest `limit` events (clamped to 1..1000), newest first, of one or all providers."""
        limit = max(1, min(limit, EVENTS_LIMIT_MAX))
        if provider_id is None:
            rows = await self._read(
                "read events",
                "SELECT at_ms, provider_id, kind, detail FROM events ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        else:
            rows = await self._read(
                "read events",
                """
                SELECT at_ms, provider_id, kind, detail FROM events
                WHERE provider_id = ? ORDER BY id DESC LIMIT ?
                """,
                (provider_id, limit),
            )
        return [Event(at_ms, pid, kind, detail) for at_ms, pid, kind, detail in rows]

    async def load_prompt_times(
        self, used_since_ms: int, limit: int
    ) -> list[tuple[bytes, int, int]]:
        """The newest `limit` prompt times used since `used_since_ms`, as (key,
        started_at_ms, used_at_ms), least recently used first."""
        rows = await self._read(
            "load prompt times",
            """
            SELECT key, started_at_ms, used_at_ms FROM (
                SELECT key, started_at_ms, used_at_ms FROM prompt_times
                WHERE used_at_ms >= ? ORDER BY used_at_ms DESC LIMIT ?
            ) ORDER BY used_at_ms
            """,
            (used_since_ms, limit),
        )
        return [(bytes(key), started, used) for key, started, used in rows]

    async def save_prompt_times(
        self, rows: Sequence[tuple[bytes, int, int]], forget_before_ms: int | None = None
    ) -> None:
        """Insert or refresh (key, started_at_ms, used_at_ms) rows in one transaction;
        with `forget_before_ms`, also delete the rows last used before it."""
        async with self._transaction("save prompt times") as conn:
            await conn.executemany(
                """
                INSERT INTO prompt_times (key, started_at_ms, used_at_ms) VALUES (?, ?, ?)
                ON CONFLICT (key) DO UPDATE SET used_at_ms = excluded.used_at_ms
                """,
                rows,
            )
            if forget_before_ms is not None:
                await _run(
                    conn, "DELETE FROM prompt_times WHERE used_at_ms < ?", (forget_before_ms,)
                )

    # -- internals ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _transaction(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        """Run the body as one write transaction under the lock; commit, or roll back."""
        async with self._lock:
            conn = self._require_open(what)
            try:
                await _run(conn, "BEGIN IMMEDIATE")
                yield conn
                await _run(conn, "COMMIT")
            except BaseException as exc:
                # Also on cancellation: the worker thread runs jobs in FIFO order, so
                # this ROLLBACK runs before the next transaction's BEGIN even if this
                # await is cancelled again and the lock is released early.
                # Connection.rollback is a no-op when no transaction is open (e.g. the
                # COMMIT already went through).
                with contextlib.suppress(*_DB_ERRORS):
                    await conn.rollback()
                if isinstance(exc, _DB_ERRORS):
                    raise StoreError(f"{what} failed: {exc}") from exc
                raise

    async def _read(self, what: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One SELECT under the lock, so it never sees another coroutine's open transaction."""
        async with self._lock:
            conn = self._require_open(what)
            try:
                return await _run(conn, sql, params)
            except _DB_ERRORS as exc:
                raise StoreError(f"{what} failed: {exc}") from exc

    def _require_open(self, what: str) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError(f"cannot {what}: the store is closed")
        return self._conn

    async def _insert_event(self, conn: aiosqlite.Connection, event: Event) -> None:
        """Insert within the caller's transaction; trim that provider every TRIM_EVERY inserts."""
        await _run(
            conn,
            "INSERT INTO events (at_ms, provider_id, kind, detail) VALUES (?, ?, ?, ?)",
            (event.at_ms, event.provider_id, event.kind, event.detail),
        )
        count = self._since_trim.get(event.provider_id, 0) + 1
        if count >= TRIM_EVERY:
            await _trim(conn, event.provider_id)
            count = 0
        self._since_trim[event.provider_id] = count

    async def _configure(self, conn: aiosqlite.Connection, in_memory: bool) -> None:
        """Set the connection's pragmas; refuse a file that cannot do WAL."""
        # busy_timeout first: switching to WAL needs a lock another process may hold.
        await _run(conn, f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_MS)}")
        rows = await _run(conn, "PRAGMA journal_mode = WAL")
        mode = str(rows[0][0]).lower() if rows else ""
        if not in_memory and mode != "wal":
            raise StoreError(f"the store {self._path!r} cannot use WAL (journal_mode={mode!r})")
        # FULL: in WAL mode, every commit fsyncs the WAL (NORMAL would only sync at
        # checkpoints and could lose the last commits on power loss).
        await _run(conn, "PRAGMA synchronous = FULL")
        # macOS only: make fsync reach the platter (F_FULLFSYNC). A no-op elsewhere.
        await _run(conn, "PRAGMA fullfsync = ON")

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        """Apply the MIGRATIONS steps this file lacks, one transaction each."""
        known = len(MIGRATIONS)
        while True:
            await _run(conn, "BEGIN IMMEDIATE")
            try:
                # Read inside the write transaction: another process may have just
                # migrated this file.
                version = int((await _run(conn, "PRAGMA user_version"))[0][0])
                if version > known:
                    raise StoreError(
                        f"the store {self._path!r} has schema version {version}, newer than "
                        f"this sluice knows ({known}); upgrade sluice or use another database"
                    )
                if version == known:
                    await _run(conn, "COMMIT")
                    return
                for statement in _statements(MIGRATIONS[version]):
                    await _run(conn, statement)
                await _run(conn, f"PRAGMA user_version = {version + 1}")
                await _run(conn, "COMMIT")
            except BaseException:
                with contextlib.suppress(*_DB_ERRORS):
                    await conn.rollback()
                raise

    async def _trim_all(self, conn: aiosqlite.Connection) -> None:
        """Trim every provider's events, so restarts cannot dodge the per-insert trim."""
        await _run(conn, "BEGIN IMMEDIATE")
        try:
            for (provider_id,) in await _run(conn, "SELECT DISTINCT provider_id FROM events"):
                await _trim(conn, provider_id)
            await _run(conn, "COMMIT")
        except BaseException:
            with contextlib.suppress(*_DB_ERRORS):
                await conn.rollback()
            raise


async def _run(conn: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """Execute and fetch in one hop to the worker thread, leaving no cursor open."""
    rows: Iterable[Any] = await conn.execute_fetchall(sql, params)
    return list(rows)


async def _trim(conn: aiosqlite.Connection, provider_id: str) -> None:
    """Delete all but the newest MAX_EVENTS_PER_PROVIDER events of one provider."""
    # The subquery finds the oldest id to keep by walking the (provider_id, id) index
    # backwards; NULL (fewer events than the cap) deletes nothing.
    await _run(
        conn,
        """
        DELETE FROM events WHERE provider_id = ?1 AND id < (
            SELECT id FROM events WHERE provider_id = ?1
            ORDER BY id DESC LIMIT 1 OFFSET ?2)
        """,
        (provider_id, max(1, MAX_EVENTS_PER_PROVIDER) - 1),
    )


def _statements(script: str) -> list[str]:
    """Split a migration script into statements; semicolons inside strings or triggers stay."""
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    # What follows the last statement is whitespace (the split re-added one ';').
    rest = pending[:-1].strip()
    if rest:
        statements.append(rest)
    return statements


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory; not every platform can open one."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
