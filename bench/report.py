"""Turn one run's raw phase results into the table, the target checks, the plot and
`bench/RESULTS.md`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.targets import LOAD_CORE, PROXY_CORE

Value = float | None

FOREIGN_LIMIT_PCT = 15.0
"""A phase during which other processes took more than this share of a core is re-run."""


def foreign_pct(result: dict[str, Any], pinned: bool, *, proxy: bool) -> float | None:
    """The largest share of a core in use by the run that processes outside it took
    meanwhile: the load core always, the proxy core when a proxy is under test."""
    cores: list[float] = result.get("cores_busy_s") or []
    wall: float = result.get("wall_s", 0.0)
    if not pinned or len(cores) < 2 or wall < 1.0:
        return None  # too short for clock-tick accounting to say anything
    pids: list[float] = result["pids_cpu_s"]
    loadgen: float = result["loadgen_cpu_s"]
    load_side = cores[LOAD_CORE] - loadgen - pids[0]
    proxy_side = cores[PROXY_CORE] - pids[1] if proxy else 0.0
    return round(100 * max(load_side, proxy_side, 0.0) / wall, 1)


@dataclass
class Run:
    """Everything one `python -m bench` measured."""

    profile: str
    machine: dict[str, Any]
    placement: str
    params: dict[str, Any]
    targets: dict[str, dict[str, Any]]
    admission: dict[str, Any]
    notes: list[str]
    elapsed_s: float
    memory: dict[str, Any] = field(default_factory=dict)  # bench/memory.py's breakdown

    def get(self, target: str, phase: str, name: str) -> Value:
        """A numeric figure, or None when the target, phase or figure is missing."""
        result = self.phase(target, phase)
        if result is None:
            return None
        value = result.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            return None
        return float(value)

    def phase(self, target: str, phase: str) -> dict[str, Any] | None:
        """A phase's results, or None when it is missing or failed."""
        result = self.targets.get(target, {}).get(phase)
        if not isinstance(result, dict) or "error" in result:
            return None
        return result

    def added(self, target: str, phase: str, name: str) -> Value:
        """`name` of `target` minus the same figure measured direct."""
        value, direct = self.get(target, phase, name), self.get("direct", phase, name)
        return None if value is None or direct is None else value - direct

    def cpu_per_request_us(self, target: str) -> Value:
        """CPU µs per request at 64 connections of the process under test (direct:
        the upstream)."""
        result = self.phase(target, "rps")
        if result is None or not result.get("requests"):
            return None
        cpu = result["pids_cpu_s"][-1]
        return float(cpu / result["requests"] * 1e6)

    def capacity_rps(self, target: str) -> Value:
        """Requests per CPU-second of the process under test: what it would serve with
        a core to itself. Unlike requests/s, other load on the machine hardly moves it."""
        cpu = self.cpu_per_request_us(target)
        return None if not cpu else 1e6 / cpu

    def core_share_pct(self, target: str, phase: str) -> Value:
        """The share of its core the process under test used during `phase`."""
        result = self.phase(target, phase)
        if result is None or not result.get("wall_s"):
            return None
        return float(100 * result["pids_cpu_s"][-1] / result["wall_s"])

    @property
    def target_keys(self) -> list[str]:
        return list(self.targets)


# ------------------------------------------------------------------ formatting


def num(value: Value) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio(value: Value, base: Value) -> str:
    if value is None or base is None or base == 0:
        return ""
    r = value / base
    if abs(r) >= 10:
        return f"{r:.0f}×"
    if abs(r) >= 0.1:
        return f"{r:.1f}×"
    return f"{r:.2f}×"


def brief_memory(memory: dict[str, Any]) -> str:
    """One progress line for the memory profile."""
    if "error" in memory:
        return f"ERROR {memory['error']}"
    owners = ", ".join(f"{name} {num(kib)}" for name, kib in memory["by_owner_kib"].items())
    return f"{num(memory['traced_kib_per_stream'])} KiB per open stream: {owners}"


def brief(key: str, result: dict[str, Any]) -> str:
    """One progress line for a finished phase."""
    if "error" in result:
        return f"ERROR {result['error']}"
    note = f"  (re-run {result['attempts'] - 1}x)" if result.get("attempts", 1) > 1 else ""
    if key.startswith("latency"):
        text = f"p50 {num(result['p50_ms'])} ms  p99 {num(result['p99_ms'])} ms"
    elif key == "rps":
        text = f"{num(result['rps'])} req/s  p50 {num(result['p50_ms'])} ms"
        if result["errors"]:
            text += f"  errors {result['errors']}"
    elif key == "stream":
        text = (
            f"TTFB p50 {num(result['ttfb_p50_ms'])} ms  relay p50/p99 "
            f"{num(result['relay_p50_ms'])}/{num(result['relay_p99_ms'])} ms"
        )
    else:
        text = (
            f"{result['completed']} ok {result['failed']} failed {result['stalled']} stalled  "
            f"delay p50/p99 {num(result['behind_p50_ms'])}/{num(result['behind_p99_ms'])} ms  "
            f"RSS {num(result['rss_kib_per_stream'])} KiB/stream"
        )
        if result["errors"]:
            text += f"  {result['errors']}"
    return text + note


# ------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Row:
    label: str
    value: Callable[[Run, str], Value | str]
    vs_direct: bool = True  # show the ratio to direct in each cell
    vs_naive: bool = False  # add sluice ÷ naive in the last column


def _field(phase: str, name: str) -> Callable[[Run, str], Value]:
    return lambda run, target: run.get(target, phase, name)


def _added(phase: str, name: str) -> Callable[[Run, str], Value]:
    return lambda run, target: None if target == "direct" else run.added(target, phase, name)


def _share(phase: str) -> Callable[[Run, str], Value]:
    return lambda run, target: run.core_share_pct(target, phase)


def _outcome(phase: str) -> Callable[[Run, str], str]:
    def cell(run: Run, target: str) -> str:
        result = run.phase(target, phase)
        if result is None:
            error = run.targets.get(target, {}).get(phase)
            return "error" if isinstance(error, dict) else "—"
        return f"{result['completed']} / {result['failed']} / {result['stalled']}"

    return cell


def rows(run: Run) -> list[tuple[str, list[Row]]]:
    sections: list[tuple[str, list[Row]]] = [
        (
            "sequential non-streaming, 1 connection",
            [
                Row("latency p50 (ms)", _field("latency", "p50_ms")),
                Row("latency p99 (ms)", _field("latency", "p99_ms")),
                Row("added latency p50 (ms)", _added("latency", "p50_ms"), False, True),
            ],
        ),
        (
            f"non-streaming, {run.params['rps_connections']} connections",
            [
                Row("requests/s", _field("rps", "rps"), True, True),
                Row("latency p50 (ms)", _field("rps", "p50_ms")),
                Row("added latency p50 (ms)", _added("rps", "p50_ms"), False, True),
                Row(
                    "CPU per request (µs; direct: the upstream)",
                    lambda run, t: run.cpu_per_request_us(t),
                    False,
                    True,
                ),
                Row(
                    "requests per CPU-second (capacity on a core of its own)",
                    lambda run, t: run.capacity_rps(t),
                    True,
                    True,
                ),
                Row("errors", _field("rps", "errors"), False),
            ],
        ),
        (
            f"sequential streams ({run.params['stream_chunks']} chunks "
            f"{run.params['stream_interval_ms']} ms apart)",
            [
                Row("time to first chunk p50 (ms)", _field("stream", "ttfb_p50_ms")),
                Row("added time to first chunk p50 (ms)", _added("stream", "ttfb_p50_ms"), False),
                Row("chunk relay delay p50 (ms)", _field("stream", "relay_p50_ms")),
                Row("chunk relay delay p99 (ms)", _field("stream", "relay_p99_ms")),
            ],
        ),
    ]
    for n in run.params["concurrency"]:
        phase = f"streams_{n}"
        sections.append(
            (
                f"{n:,} concurrent streams ({run.params['long_chunks']} chunks "
                f"{run.params['long_interval_ms']} ms apart)",
                [
                    Row("completed / failed / stalled", _outcome(phase), False),
                    Row("time to first chunk p99 (ms)", _field(phase, "ttfb_p99_ms")),
                    Row("chunk delay vs schedule p50 (ms)", _field(phase, "behind_p50_ms")),
                    Row("chunk delay vs schedule p99 (ms)", _field(phase, "behind_p99_ms")),
                    Row(
                        "chunk delay p99 once all streams flow (ms)",
                        _field(phase, "steady_p99_ms"),
                    ),
                    Row(
                        "proxy RSS per open stream (KiB)",
                        _field(phase, "rss_kib_per_stream"),
                        False,
                    ),
                    Row("CPU of the process under test (% of its core)", _share(phase), False),
                ],
            )
        )
    return sections


def table(run: Run) -> str:
    keys = run.target_keys
    labels = [run.targets[k].get("label", k) for k in keys]
    has_naive = "naive" in keys and "sluice" in keys
    header = ["figure", *labels] + (["sluice ÷ naive"] if has_naive else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for title, section in rows(run):
        lines.append(f"| **{title}** |" + " |" * (len(header) - 1))
        for row in section:
            direct = row.value(run, "direct")
            cells = [row.label]
            for key in keys:
                value = row.value(run, key)
                if isinstance(value, str):
                    cells.append(value)
                    continue
                text = num(value)
                if row.vs_direct and key != "direct" and not isinstance(direct, str):
                    r = ratio(value, direct)
                    text += f" ({r})" if r else ""
                cells.append(text)
            if has_naive:
                sluice, naive = row.value(run, "sluice"), row.value(run, "naive")
                both = not isinstance(sluice, str) and not isinstance(naive, str)
                cells.append(ratio(sluice, naive) if row.vs_naive and both else "")  # type: ignore[arg-type]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def admission_table(run: Run) -> str:
    a = run.admission
    if "error" in a:
        return f"admission micro-benchmark failed: {a['error']}"
    lines = [
        "| admission core (`proxy.admission.Limiter`, fake clock) | µs per acquire + release |",
        "|---|---|",
        f"| fast path, 0 waiters, unlimited | {num(a.get('fast_unlimited_us'))} |",
        f"| fast path, 0 waiters, limit 1,000, no cooldown | {num(a.get('fast_limited_us'))} |",
        f"| fast path, 0 waiters, limit 1,000, cooldown 350 ms | "
        f"{num(a.get('fast_cooldown_us'))} |",
        f"| 10,000 waiters queued | {num(a.get('queued_10k_us'))} |",
        f"| 100,000 waiters queued | {num(a.get('queued_100k_us'))} |",
    ]
    base = run.get("sluice", "latency", "p50_ms")
    limited = run.get("sluice_limited", "latency", "p50_ms")
    through = "not measured" if base is None or limited is None else num((limited - base) * 1000)
    lines.append(
        f"| through the proxy: sequential latency p50, limited provider − unlimited "
        f"({num(limited)} − {num(base)} ms) | {through} |"
    )
    return "\n".join(lines)


def memory_table(run: Run) -> str:
    """Who holds the Python memory of an open stream (tracemalloc, bench/memory.py)."""
    m = run.memory
    if not m:
        return "memory profile not run"
    if "error" in m:
        return f"memory profile failed: {m['error']}"
    total = m["traced_kib_per_stream"]
    lines = [
        f"{m['open_at_snapshot']} of {m['streams']} streams open at the snapshot; "
        f"traced Python memory per open stream: **{num(total)} KiB**.",
        "",
        "| owner | KiB per open stream | share |",
        "|---|---|---|",
        *(
            f"| {owner} | {num(kib)} | {100 * kib / total:.0f} % |"
            for owner, kib in m["by_owner_kib"].items()
        ),
        "",
        "| largest allocation sites | owner | bytes per open stream | blocks |",
        "|---|---|---|---|",
        *(
            f"| `{t['where']}` | {t['owner']} | {t['bytes']:,.0f} | {t['blocks']:.1f} |"
            for t in m["top"]
        ),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Check:
    target: str
    measured: str
    passed: bool | None  # None: not measured
    gap: str = ""  # how far short, when failed


def checks(run: Run) -> list[Check]:
    out: list[Check] = []

    added = run.added("sluice", "latency", "p50_ms")
    naive_added = run.added("naive", "latency", "p50_ms")
    if added is None or naive_added is None:
        out.append(Check("added latency p50 ≤ 0.6× naive's", "not measured", None))
    else:
        limit = 0.6 * naive_added
        out.append(
            Check(
                "added latency p50 ≤ 0.6× naive's",
                f"{num(added)} ms vs naive {num(naive_added)} ms "
                f"({ratio(added, naive_added)}; limit {num(limit)} ms)",
                added <= limit,
                f"{num(added - limit)} ms over",
            )
        )

    rps, naive_rps = run.get("sluice", "rps", "rps"), run.get("naive", "rps", "rps")
    if rps is None or naive_rps is None:
        out.append(Check("requests/s ≥ 3× naive's", "not measured", None))
    else:
        capacity, naive_capacity = run.capacity_rps("sluice"), run.capacity_rps("naive")
        out.append(
            Check(
                "requests/s ≥ 3× naive's",
                f"{num(rps)} vs naive {num(naive_rps)} ({ratio(rps, naive_rps)}; per "
                f"CPU-second {num(capacity)} vs {num(naive_capacity)}, "
                f"{ratio(capacity, naive_capacity)})",
                rps >= 3 * naive_rps,
                f"{num(3 * naive_rps - rps)} req/s short of {num(3 * naive_rps)}",
            )
        )

    ttfb = run.added("sluice", "stream", "ttfb_p50_ms")
    out.append(
        Check("added time to first byte p50 ≤ 2 ms", "not measured", None)
        if ttfb is None
        else Check(
            "added time to first byte p50 ≤ 2 ms",
            f"{num(ttfb)} ms",
            ttfb <= 2.0,
            f"{num(ttfb - 2.0)} ms over",
        )
    )

    for n in (256, 1024):
        phase = f"streams_{n}"
        result = run.phase("sluice", phase)
        if result is None:
            out.append(Check(f"{n:,} streams: all complete", "not measured", None))
            continue
        bad = result["failed"] + result["stalled"]
        out.append(
            Check(
                f"{n:,} streams: none fails or stalls",
                f"{result['completed']} completed, {result['failed']} failed, "
                f"{result['stalled']} stalled",
                bad == 0,
                f"{bad} of {n} did not complete",
            )
        )
        p99, direct_p99 = result["behind_p99_ms"], run.get("direct", phase, "behind_p99_ms")
        steady = run.get("sluice", phase, "steady_p99_ms")
        direct_steady = run.get("direct", phase, "steady_p99_ms")
        if direct_p99 is None or math.isnan(p99):
            out.append(Check(f"{n:,} streams: chunk delay p99 ≤ direct + 50 ms", "—", None))
        else:
            out.append(
                Check(
                    f"{n:,} streams: chunk delay p99 ≤ direct + 50 ms",
                    f"{num(p99)} ms vs direct {num(direct_p99)} ms (once all streams flow: "
                    f"{num(steady)} vs {num(direct_steady)} ms)",
                    p99 <= direct_p99 + 50,
                    f"{num(p99 - direct_p99 - 50)} ms over",
                )
            )
        rss = result["rss_kib_per_stream"]
        out.append(
            Check(
                f"{n:,} streams: RSS ≤ 16 KiB per open stream",
                f"{num(rss)} KiB",
                not math.isnan(rss) and rss <= 16,
                f"{num(rss - 16)} KiB over",
            )
        )

    derived = run.get("sluice_limited", "latency_big", "p50_ms")
    given = run.get("sluice_limited", "latency_big_header", "p50_ms")
    name = "task age: a header-less 100 KiB, 200-message body adds ≤ 0.3 ms p50"
    if derived is None or given is None:
        out.append(Check(name, "not measured", None))
    else:
        more = derived - given
        out.append(
            Check(
                name,
                f"{num(more)} ms more ({num(derived)} vs {num(given)} ms with the header)",
                more <= 0.3,
                f"{num(more - 0.3)} ms over",
            )
        )

    queued = run.admission.get("queued_100k_us")
    out.append(
        Check("admission acquire + release ≤ 20 µs with 100,000 waiters", "not measured", None)
        if not isinstance(queued, int | float)
        else Check(
            "admission acquire + release ≤ 20 µs with 100,000 waiters",
            f"{num(queued)} µs",
            queued <= 20,
            f"{num(queued - 20)} µs over",
        )
    )
    return out


def checks_table(found: list[Check]) -> str:
    lines = ["| target (issue 6) | measured (sluice) | result |", "|---|---|---|"]
    for check in found:
        if check.passed is None:
            verdict = "NOT MEASURED"
        elif check.passed:
            verdict = "PASS"
        else:
            verdict = f"FAIL ({check.gap})"
        lines.append(f"| {check.target} | {check.measured} | {verdict} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ text output


def disturbed(run: Run) -> list[str]:
    """Phases during which other processes still used much of a core the run used."""
    pinned = run.placement.startswith("taskset")
    out = []
    for key, phases in run.targets.items():
        for name, result in phases.items():
            if not isinstance(result, dict) or "error" in result:
                continue
            foreign = foreign_pct(result, pinned, proxy=key != "direct")
            if foreign is not None and foreign > FOREIGN_LIMIT_PCT:
                out.append(f"{key}/{name} ({foreign:.0f}%)")
    return out


def errors(run: Run) -> list[str]:
    out = []
    for key, phases in run.targets.items():
        if "error" in phases:
            out.append(f"{key}: {phases['error']}")
        for name, result in phases.items():
            if isinstance(result, dict) and "error" in result:
                out.append(f"{key}/{name}: {result['error']}")
    return out


def render(run: Run) -> str:
    parts = [
        table(run),
        "",
        admission_table(run),
        "",
        checks_table(checks(run)),
    ]
    problems = errors(run)
    if problems:
        parts += ["", "Errors:", *(f"- {p}" for p in problems)]
    if run.notes:
        parts += ["", "Notes:", *(f"- {n}" for n in run.notes)]
    noisy = disturbed(run)
    if noisy:
        parts += ["", "Disturbed by other processes (share of a core): " + ", ".join(noisy)]
    return "\n".join(parts)


def results_markdown(run: Run) -> str:
    m = run.machine
    p = run.params
    found = checks(run)
    passed = [c for c in found if c.passed]
    failed = [c for c in found if c.passed is False]
    summary = f"{len(passed)} of {len(found)} targets met"
    if failed:
        summary += "; short: " + "; ".join(f"{c.target} ({c.gap})" for c in failed)
    problems = errors(run)
    noisy = disturbed(run)
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`python -m bench`, {run.profile} run, "
        f"{run.elapsed_s:.0f} s) on {m['date']}. The next run overwrites this file.",
        "",
        "## Machine and placement",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores (`nproc`); kernel {m['kernel']}",
        f"- Python {m['python']}; open-file limit {m['fd_limit']}",
        f"- Placement: {run.placement}",
        f"- Load average at start: {m['load_before']}; per-core busy over the second "
        f"before the run: {m['busy_before_pct']} %",
        "",
        "## Targets",
        "",
        f"**{summary}.**",
        "",
        checks_table(found),
        "",
        "## Figures",
        "",
        "Each cell: the figure, then its ratio to direct. *Added* figures are the target's "
        "minus direct's; the last column is sluice's figure divided by the naive baseline's.",
        "",
        table(run),
        "",
        "## Admission core",
        "",
        admission_table(run),
        "",
        "## Memory per open stream",
        "",
        "sluice alone under tracemalloc (`python -m bench.memory`): the objects alive "
        "once every stream flows minus those alive after warm-up, charged to the "
        "innermost frame of sluice or uvicorn that asked for them (an `asyncio.Event` "
        "uvicorn creates is uvicorn's; what uvloop allocates in C while accepting a "
        "client is the event loop's). RSS per stream is higher by the allocators' "
        "rounding and free space.",
        "",
        memory_table(run),
        "",
        "## How it was measured",
        "",
        "- **Upstream**: `bench/upstream.py`, raw asyncio protocol on uvloop with httptools; "
        "a fixed chat.completion JSON, or SSE chunks on an absolute schedule, each stamped "
        "with its send time and its scheduled time.",
        "- **Load generator**: `bench/loadgen.py`, HTTP/1.1 keep-alive on uvloop protocols "
        "with httptools parsing; one process per phase.",
        f"- **Sequential latency**: {p['latency_n']:,} requests on one keep-alive connection "
        f"after {p['latency_warmup']} warm-up requests.",
        f"- **Requests/s**: {p['rps_connections']} connections back to back for "
        f"{p['rps_duration_s']:g} s after {p['rps_warmup_s']:g} s of warm-up.",
        f"- **Streaming**: {p['stream_n']} sequential streams of {p['stream_chunks']} chunks "
        f"{p['stream_interval_ms']} ms apart; time to first chunk from the request write; "
        "relay delay = arrival − the upstream's send stamp (same clock).",
        f"- **Concurrent streams**: N connections at once, one stream each of "
        f"{p['long_chunks']} chunks {p['long_interval_ms']} ms apart (20 chunks/s), all "
        "requests sent at once; delay = arrival − the chunk's scheduled time at the upstream "
        "(the schedule starts when the upstream gets the request, so time spent before that "
        "shows in the time to first chunk); *once all streams flow* counts only chunks "
        "scheduled after every stream had its first chunk; *failed* = connection error, "
        f"non-200 or truncated; *stalled* = not finished {p['grace_s']:g} s after its schedule "
        "ended; the proxy is restarted before each of these phases and RSS per open stream = "
        "(VmRSS once all streams flow − VmRSS after 5 warm-up streams) / streams open then.",
        "- **sluice** runs `python -m proxy serve` with one unlimited provider and the "
        'default `log_level = "info"` (one access line per request, console format, to a '
        "file); *limited provider* sets `limit = 10000` (never queues; default cooldown); "
        '*access log off* uses `log_level = "warning"`.',
        "- **naive**: `bench/baselines/naive.py`, Starlette + httpx (default client limits: "
        "100 connections, 5 s pool timeout) under uvicorn with uvloop and httptools, access "
        "log off.",
        f"- Other sessions may share the machine: a phase during which other processes took "
        f"more than {FOREIGN_LIMIT_PCT:g}% of a core the run uses (from /proc/stat and the "
        f"processes' own CPU times) is re-run up to {p['retries']} times, after waiting for "
        f"the load to pass, while a {p['retry_budget_s']:g} s budget for the whole run "
        "lasts; the least disturbed attempt is kept. *Requests per CPU-second* is the "
        "figure such load disturbs least.",
    ]
    if problems:
        lines += ["", "## Errors", "", *(f"- {e}" for e in problems)]
    if run.notes or noisy:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in run.notes]
        if noisy:
            lines.append(
                "- Still disturbed by other processes after re-runs (share of a core): "
                + ", ".join(noisy)
            )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the plot


def plot(run: Run, path: Path) -> None:
    """Added latency and chunk delay against concurrency, one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, key in enumerate(run.target_keys):
        label = run.targets[key].get("label", key)
        color = colors[index % len(colors)]
        if key != "direct":
            points = [
                (1, run.added(key, "latency", "p50_ms")),
                (run.params["rps_connections"], run.added(key, "rps", "p50_ms")),
            ]
            xs, ys = _positive(points)
            if xs:
                left.plot(xs, ys, marker="o", color=color, label=label)
        if "streams" not in _phase_kinds(run, key):
            continue
        for quantile, style in (("p99", "-"), ("p50", "--")):
            points = [(1, run.get(key, "stream", f"behind_{quantile}_ms"))]
            points += [
                (n, run.get(key, f"streams_{n}", f"behind_{quantile}_ms"))
                for n in run.params["concurrency"]
            ]
            xs, ys = _positive(points)
            if xs:
                right.plot(xs, ys, style, marker="o", color=color, label=f"{label} {quantile}")
    left.set(
        title="added latency p50 (non-streaming)",
        xlabel="concurrent connections",
        ylabel="ms over direct",
        xscale="log",
        yscale="log",
    )
    right.set(
        title="chunk delay vs the upstream's schedule",
        xlabel="concurrent streams",
        ylabel="ms",
        xscale="log",
        yscale="log",
    )
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"sluice bench, {run.machine['date']} ({run.placement})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _positive(points: list[tuple[int, Value]]) -> tuple[list[int], list[float]]:
    kept = [(x, y) for x, y in points if y is not None and y > 0]
    return [x for x, _ in kept], [y for _, y in kept]


def _phase_kinds(run: Run, key: str) -> set[str]:
    return {name.split("_")[0] for name in run.targets.get(key, {}) if name != "label"}
