"""Micro-benchmark of the admission core: `Limiter.acquire` plus `Permit.release`.

The pure limiter runs on a fake clock with a scheduler that schedules nothing, so
the figures are the core's own cost per request, without an event loop:

- fast path: 0 waiters; acquire admits at once, release frees the slot;
- queue path with N waiters: each iteration queues one more request (at the back:
  prompts arrive in time order) and releases the running permit, which grants the
  head of the queue, so the queue stays at N. Cooldown is 0 here, so the release
  grants at once instead of through the cooldown timer.
- queue path with client caps: the same with limit 2 and ten clients each capped at
  one slot, requests arriving round robin: every release re-offers the released
  client's turn and grants the oldest waiter whose client is under its cap.

Run: `python -m bench.admission [--quick]` (prints JSON).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from proxy.admission import Limiter, Permit, Policy, Rejection, Timer


class _NoTimer:
    def cancel(self) -> None:
        pass


_NO_TIMER = _NoTimer()


def _schedule(delay_s: float, callback: Callable[[], None]) -> Timer:
    return _NO_TIMER


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _limiter(
    limit: int | None,
    cooldown_ms: int,
    clock: FakeClock,
    clients: tuple[tuple[str, int | None], ...] = (),
) -> Limiter:
    policy = Policy(
        limit=limit, cooldown_ms=cooldown_ms, max_queue=1 << 30, client_max_in_flight=clients
    )
    return Limiter("bench", policy, clock=clock, scheduler=_schedule)


def _ignore(outcome: Permit | Rejection) -> None:
    pass


def fast_path(iterations: int, *, limit: int | None, cooldown_ms: int) -> float:
    """ns per acquire+release with nobody waiting. With a cooldown the clock moves
    1 ms per iteration, so the cooling heap holds `cooldown_ms` slots in steady state."""
    clock = FakeClock()
    limiter = _limiter(limit, cooldown_ms, clock)
    acquire = limiter.acquire
    step = 0.001 if cooldown_ms else 0.0
    start = time.perf_counter_ns()
    for _ in range(iterations):
        clock.now += step
        permit = acquire(clock.now, _ignore)
        assert isinstance(permit, Permit)
        permit.release()
    return (time.perf_counter_ns() - start) / iterations


def queue_path(waiters: int, iterations: int) -> float:
    """ns per (one acquire that queues + one release that grants the head) with
    `waiters` queued."""
    clock = FakeClock()
    limiter = _limiter(1, 0, clock)
    held: list[Permit] = []

    def granted(outcome: Permit | Rejection) -> None:
        assert isinstance(outcome, Permit)
        held.append(outcome)

    first = limiter.acquire(0.0, granted)
    assert isinstance(first, Permit)
    held.append(first)
    for i in range(waiters):
        limiter.acquire(1.0 + i, granted)
    assert limiter.status().queued == waiters
    acquire = limiter.acquire
    t = float(waiters + 1)
    start = time.perf_counter_ns()
    for _ in range(iterations):
        t += 1.0
        acquire(t, granted)
        held.pop().release()
    elapsed = time.perf_counter_ns() - start
    assert limiter.status().queued == waiters
    assert len(held) == 1
    return elapsed / iterations


def queue_path_clients(waiters: int, iterations: int, clients: int = 10) -> float:
    """ns per (one acquire that queues + one release that grants) with `waiters`
    queued across `clients` clients capped at one slot each, limit 2."""
    clock = FakeClock()
    ids = [f"c{i}" for i in range(clients)]
    limiter = _limiter(2, 0, clock, tuple((cid, 1) for cid in ids))
    held: list[Permit] = []

    def granted(outcome: Permit | Rejection) -> None:
        assert isinstance(outcome, Permit)
        held.append(outcome)

    for i in range(2):
        first = limiter.acquire(0.0, granted, client_id=ids[i])
        assert isinstance(first, Permit)
        held.append(first)
    for i in range(waiters):
        limiter.acquire(1.0 + i, granted, client_id=ids[i % clients])
    assert limiter.status().queued == waiters
    acquire = limiter.acquire
    t = float(waiters + 1)
    n = waiters
    start = time.perf_counter_ns()
    for _ in range(iterations):
        t += 1.0
        acquire(t, granted, client_id=ids[n % clients])
        n += 1
        held.pop(0).release()
    elapsed = time.perf_counter_ns() - start
    assert limiter.status().queued == waiters
    assert len(held) == 2
    return elapsed / iterations


def _median_of(repeats: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(repeats))


def run(quick: bool = False) -> dict[str, Any]:
    """Median µs per acquire+release pair of a few repeats, per scenario."""
    fast_n = 50_000 if quick else 200_000
    queue_n = 20_000 if quick else 100_000
    repeats = 3 if quick else 5
    gc.disable()
    try:
        results = {
            "fast_unlimited_us": _median_of(
                repeats, lambda: fast_path(fast_n, limit=None, cooldown_ms=0)
            ),
            "fast_limited_us": _median_of(
                repeats, lambda: fast_path(fast_n, limit=1_000, cooldown_ms=0)
            ),
            "fast_cooldown_us": _median_of(
                repeats, lambda: fast_path(fast_n, limit=1_000, cooldown_ms=350)
            ),
            "queued_10k_us": _median_of(repeats, lambda: queue_path(10_000, queue_n)),
            "queued_100k_us": _median_of(repeats, lambda: queue_path(100_000, queue_n)),
            "queued_100k_clients_us": _median_of(
                repeats, lambda: queue_path_clients(100_000, queue_n)
            ),
        }
    finally:
        gc.enable()
    return {key: value / 1000 for key, value in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    json.dump(run(args.quick), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
