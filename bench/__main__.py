"""`python -m bench` (`make bench`): measure sluice against direct and the baselines.

One invocation starts the fake upstream, then each target in turn (direct, the naive
Starlette + httpx proxy, sluice as users get it by default, with its access log on,
sluice with a limited provider, sluice with the access log off, nginx if installed),
runs every phase against it with the load generator, runs the admission
micro-benchmark, and prints the table and the issue's targets. Writes
`bench/out/bench.png`, `bench/out/results.json` and, for a full run, `bench/RESULTS.md`
(`--quick` writes `bench/out/RESULTS-quick.md` instead).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import report
from bench.targets import (
    LOAD_CORE,
    PROXY_CORE,
    Placement,
    TargetSpec,
    machine,
    pin_self,
    placement,
    start_target,
    wait_idle,
)
from bench.upstream import raise_fd_limit
from proxy.tools.process import ROOT, Process, free_port, python, start

FOREIGN_LIMIT_PCT = report.FOREIGN_LIMIT_PCT


@dataclass(frozen=True)
class Profile:
    """How much of each phase to run."""

    name: str
    latency_n: int
    latency_warmup: int
    rps_duration_s: float
    rps_warmup_s: float
    rps_connections: int
    stream_n: int
    stream_warmup: int
    stream_chunks: int
    stream_interval_ms: int
    long_chunks: int
    long_interval_ms: int
    concurrency: tuple[int, ...]
    grace_s: float
    retries: int  # re-runs of a phase that other processes disturbed
    idle_wait_s: float  # how long to wait for other load to pass, at start and before a re-run
    retry_budget_s: float  # waiting plus re-running, over the whole run


FULL = Profile(
    name="full",
    latency_n=2000,
    latency_warmup=200,
    rps_duration_s=5.0,
    rps_warmup_s=1.0,
    rps_connections=64,
    stream_n=200,
    stream_warmup=10,
    stream_chunks=10,
    stream_interval_ms=10,
    long_chunks=100,
    long_interval_ms=50,
    concurrency=(16, 256, 1024),
    grace_s=15.0,
    retries=2,
    idle_wait_s=30.0,
    retry_budget_s=150.0,
)
QUICK = Profile(
    name="quick",
    latency_n=300,
    latency_warmup=100,
    rps_duration_s=2.0,
    rps_warmup_s=0.5,
    rps_connections=64,
    stream_n=20,
    stream_warmup=3,
    stream_chunks=10,
    stream_interval_ms=10,
    long_chunks=20,
    long_interval_ms=50,
    concurrency=(16, 256, 1024),
    grace_s=10.0,
    retries=0,
    idle_wait_s=0.0,
    retry_budget_s=0.0,
)

TARGETS = [
    TargetSpec("direct", "direct"),
    TargetSpec("naive", "naive Starlette+httpx"),
    TargetSpec("sluice", "sluice"),
    TargetSpec(
        "sluice_limited",
        "sluice, limited provider",
        frozenset({"latency", "rps", "latency_big"}),
    ),
    TargetSpec("sluice_quiet", "sluice, access log off", frozenset({"latency", "rps"})),
    TargetSpec("nginx", "nginx, proxy_buffering off"),
]


class Runner:
    """Runs the load generator's phases against one target at a time."""

    def __init__(self, profile: Profile, place: Placement, upstream: Process, work: Path) -> None:
        self.profile = profile
        self.place = place
        self.upstream = upstream
        self.work = work
        self.notes: list[str] = []
        # Other sessions share this machine: the seconds that waiting for their load to
        # pass and re-running disturbed phases may add to the whole run.
        self.retry_budget_s = profile.retry_budget_s

    def say(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def loadgen(self, phase: str, port: int, args: list[str], timeout: float) -> dict[str, Any]:
        command = self.place.prefix(LOAD_CORE) + python(
            "bench.loadgen", phase, "--port", str(port), *args
        )
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, cwd=ROOT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"load generator timed out after {timeout:g}s"}
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            return {"error": f"load generator exited with {done.returncode}: {tail}"}
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def attempt(
        self, phase: str, port: int, args: list[str], *, proxy_pid: int | None, timeout: float
    ) -> dict[str, Any]:
        """One run of a phase, with the share of a core other processes took meanwhile."""
        pids = [self.upstream.pid] + ([proxy_pid] if proxy_pid else [])
        result = self.loadgen(
            phase, port, [*args, "--pids", ",".join(str(p) for p in pids)], timeout
        )
        if "error" not in result:
            result["foreign_pct"] = report.foreign_pct(
                result, self.place.pinned, proxy=proxy_pid is not None
            )
        return result

    def retry(self, result: dict[str, Any], attempt: int) -> bool:
        """Whether to re-run a phase that other processes disturbed, after waiting for
        them to finish. Waiting and re-running draw on one budget for the whole run."""
        foreign = result.get("foreign_pct")
        if foreign is None or foreign <= FOREIGN_LIMIT_PCT:
            return False
        if attempt >= self.profile.retries or self.retry_budget_s <= 0:
            return False
        self.say(f"    other processes used {foreign:.0f}% of a core meanwhile; re-running")
        wait_idle(min(self.profile.idle_wait_s, self.retry_budget_s))
        return True

    def plan(self, spec: TargetSpec) -> list[tuple[str, str, list[str], float]]:
        """(result key, load generator phase, its arguments, timeout) for each phase."""
        p = self.profile
        plan: list[tuple[str, str, list[str], float]] = []
        if "latency" in spec.phases:
            args = ["-n", str(p.latency_n), "--warmup", str(p.latency_warmup)]
            plan.append(("latency", "latency", args, 300.0))
        if "latency_big" in spec.phases:
            # Task age: the same agent conversation without and with the header.
            args = ["-n", str(p.latency_n), "--warmup", str(p.latency_warmup), "--big"]
            plan.append(("latency_big", "latency", args, 300.0))
            plan.append(("latency_big_header", "latency", [*args, "--prompt-header"], 300.0))
        if "rps" in spec.phases:
            args = [
                "--connections", str(p.rps_connections),
                "--duration", str(p.rps_duration_s),
                "--warmup-s", str(p.rps_warmup_s),
            ]  # fmt: skip
            plan.append(("rps", "rps", args, p.rps_duration_s + p.rps_warmup_s + 60))
        if "stream" in spec.phases:
            args = [
                "-n", str(p.stream_n),
                "--warmup", str(p.stream_warmup),
                "--chunks", str(p.stream_chunks),
                "--interval-ms", str(p.stream_interval_ms),
            ]  # fmt: skip
            plan.append(("stream", "stream", args, 600.0))
        if "streams" in spec.phases:
            for n in p.concurrency:
                args = [
                    "-n", str(n),
                    "--warmup", "5",
                    "--chunks", str(p.long_chunks),
                    "--interval-ms", str(p.long_interval_ms),
                    "--grace", str(p.grace_s),
                ]  # fmt: skip
                duration = p.long_chunks * p.long_interval_ms / 1000
                plan.append((f"streams_{n}", "streams", args, duration + p.grace_s + 60))
        return plan

    def measure(self, spec: TargetSpec) -> dict[str, Any]:
        """Every phase of `spec`. A proxy is started fresh for each run of a
        concurrent-streams phase, so memory an earlier run left cannot hide its RSS per
        stream. A disturbed phase is re-run; the least disturbed attempt is kept."""
        out: dict[str, Any] = {"label": spec.label}
        launches = 0
        proxy: Process | None = None
        try:
            for key, phase, args, timeout in self.plan(spec):
                started = time.monotonic()
                best: dict[str, Any] | None = None
                for attempt in range(self.profile.retries + 1):
                    if spec.key != "direct" and (proxy is None or phase == "streams"):
                        if proxy is not None:
                            self.stop(spec, proxy)
                            proxy = None
                        try:
                            proxy = start_target(
                                spec, self.place, self.upstream.port, self.work, launches
                            )
                        except RuntimeError as exc:
                            best = {"error": f"could not start: {exc}"}
                            break
                        launches += 1
                    if proxy is not None and not proxy.alive():
                        best = {"error": f"{spec.key} died: {proxy.log_tail(5)}"}
                        break
                    run_from = time.monotonic()
                    result = self.attempt(
                        phase,
                        proxy.port if proxy else self.upstream.port,
                        [*args, "--rss-pid", str(proxy.pid)] if proxy else args,
                        proxy_pid=proxy.pid if proxy else None,
                        timeout=timeout,
                    )
                    result["attempts"] = attempt + 1
                    if attempt:
                        self.retry_budget_s -= time.monotonic() - run_from
                    if "error" in result:
                        best = result
                        break
                    if best is None or (result["foreign_pct"] or 0) < (best["foreign_pct"] or 0):
                        best = result
                    waited_from = time.monotonic()
                    again = self.retry(result, attempt)
                    self.retry_budget_s -= time.monotonic() - waited_from
                    if not again:
                        break
                assert best is not None
                out[key] = best
                took = time.monotonic() - started
                self.say(f"  {key:<14} {took:5.1f}s  {report.brief(key, best)}")
                time.sleep(0.3)  # let closed sockets settle before the next phase
        finally:
            if proxy is not None:
                self.stop(spec, proxy)
        return out

    def stop(self, spec: TargetSpec, proxy: Process) -> None:
        """Stop `proxy`; note an unclean exit and any warning or error it logged."""
        proxy.stop()
        # uvicorn re-raises the SIGTERM it handled, so -15 is a clean exit too.
        if proxy.proc.returncode not in (0, -signal.SIGTERM):
            self.notes.append(
                f"{spec.label} exited with {proxy.proc.returncode} when stopped: "
                f"{proxy.log_tail(3)}"
            )
        problems = _log_problems(proxy.log_path)
        if problems:
            self.notes.append(f"{spec.label} ({proxy.name}) logged {problems}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--only", help="comma-separated target keys (default: all); 'direct' always runs"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: rewrite the table, plot and RESULTS.md from a results.json",
    )
    args = parser.parse_args(argv)
    if args.render:
        return _render(report.Run(**json.loads(args.render.read_text())), args.out)
    profile = QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop every child process.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    began = time.monotonic()

    fd_limit = raise_fd_limit()  # inherited by every child process
    place = placement()
    pin_self(place)
    notes: list[str] = []
    if profile.idle_wait_s:
        print("waiting for the machine to be idle ...", file=sys.stderr, flush=True)
        if wait_idle(profile.idle_wait_s) is None:
            notes.append(
                f"Other processes kept a core busy for the {profile.idle_wait_s:g} s "
                "waited before the run."
            )
    host = machine(fd_limit)
    if not place.pinned:
        notes.append(f"Processes were not pinned ({place.note}).")
    busy = [b for b in host.busy_before_pct if b > 10]
    if busy:
        notes.append(
            f"The machine was not idle at the start (per-core busy {host.busy_before_pct} %, "
            f"load {host.load_before}); a phase during which other processes took more than "
            f"{FOREIGN_LIMIT_PCT:g}% of a core is re-run up to {profile.retries} times."
        )
    wanted = set(args.only.split(",")) | {"direct"} if args.only else None
    specs = [t for t in TARGETS if wanted is None or t.key in wanted]
    if shutil.which("nginx") is None:
        specs = [t for t in specs if t.key != "nginx"]
        notes.append("nginx is not installed: the nginx baseline was skipped.")

    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        work = Path(tmp)
        upstream_port = free_port()
        upstream = start(
            "upstream",
            place.prefix(LOAD_CORE) + python("bench.upstream", "--port", str(upstream_port)),
            upstream_port,
            work,
        )
        runner = Runner(profile, place, upstream, work)
        try:
            for spec in specs:
                runner.say(f"{spec.label}:")
                results[spec.key] = runner.measure(spec)
        finally:
            upstream.stop()
        notes += runner.notes
        runner.say("admission micro-benchmark:")
        admission = _admission(place, profile)
        runner.say(f"  {admission}")
        memory: dict[str, Any] = {}
        if "sluice" in results:
            runner.say("memory per open stream (tracemalloc, 256 streams):")
            memory = _memory()
            runner.say(f"  {report.brief_memory(memory)}")

    run = report.Run(
        profile=profile.name,
        machine=asdict(host),
        placement=place.note,
        params=asdict(profile),
        targets=results,
        admission=admission,
        notes=notes,
        elapsed_s=time.monotonic() - began,
        memory=memory,
    )
    (args.out / "results.json").write_text(json.dumps(asdict(run), indent=2, default=str))
    return _render(run, args.out)


def _render(run: report.Run, out: Path) -> int:
    """Print the tables; write the plot and the results file (RESULTS.md for a full run)."""
    print(report.render(run))
    try:
        report.plot(run, out / "bench.png")
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
    full = run.profile == FULL.name
    results_md = ROOT / "bench" / "RESULTS.md" if full else out / "RESULTS-quick.md"
    results_md.write_text(report.results_markdown(run))
    print(f"\nwrote {out / 'bench.png'} and {results_md} ({run.elapsed_s:.0f}s)", file=sys.stderr)
    return 0


def _admission(place: Placement, profile: Profile) -> dict[str, Any]:
    """The admission micro-benchmark, on the proxy's core (idle by now)."""
    command = place.prefix(PROXY_CORE) + python("bench.admission")
    if profile is QUICK:
        command.append("--quick")
    return _json_of(command, timeout=600)


def _memory() -> dict[str, Any]:
    """bench/memory.py's breakdown, in a process of its own (it pins itself)."""
    return _json_of(python("bench.memory", "--streams", "256"), timeout=300)


def _json_of(command: list[str], *, timeout: float) -> dict[str, Any]:
    """What `command` prints (one JSON object), or {"error": its last words}."""
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if done.returncode != 0:
        return {"error": " | ".join(done.stderr.strip().splitlines()[-3:])}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# structlog's console format ("[warning  ]") and uvicorn's default one ("WARNING:").
_PROBLEM = re.compile(r"\[(warning|error|critical)\s*\]|\b(WARNING|ERROR|CRITICAL):|Traceback")


def _log_problems(path: Path, limit: int = 3) -> str:
    """How many warning, error or traceback lines a process wrote, and the first few."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    hits = [line.strip() for line in lines if _PROBLEM.search(line)]
    if not hits:
        return ""
    return f"{len(hits)} warning/error lines, first: " + " | ".join(hits[:limit])


if __name__ == "__main__":
    raise SystemExit(main())
