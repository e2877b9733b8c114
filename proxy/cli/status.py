"""`sluice status`: the `/concurrency/status` of a running proxy as a table."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, TextIO

import httpx

COLUMNS = ("provider", "limit", "inFlight", "queued", "paused", "cooldownMs", "autoReduced")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # SLUICE_URL and SLUICE_ADMIN_TOKEN are not config keys; `sluice serve` knows to
    # leave them alone (proxy.settings.NOT_CONFIG_VARIABLES). Where the proxy's own
    # token is in the environment (in its container, say), that one works too.
    parser.add_argument(
        "--url",
        default=os.environ.get("SLUICE_URL", "http://127.0.0.1:8080"),
        help="the proxy's address (default: $SLUICE_URL or http://127.0.0.1:8080)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("SLUICE_ADMIN_TOKEN")
        or os.environ.get("SLUICE_SERVER__ADMIN_TOKEN", ""),
        help="the admin token, if the proxy has one "
        "(default: $SLUICE_ADMIN_TOKEN, else $SLUICE_SERVER__ADMIN_TOKEN)",
    )


def render(providers: list[dict[str, Any]], now_ms: float | None = None) -> str:
    """A fixed-width table, then one line per provider with a notice. A pause shows
    the seconds it has left (`now_ms`: epoch ms, default now)."""
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    rows = [COLUMNS]
    for p in providers:
        limit = "none" if p["limit"] is None else str(p["limit"])
        paused = "yes" if p["paused"] else "no"
        if p["paused"] and p.get("pausedUntil") is not None:
            paused = f"yes ({max(0, math.ceil((p['pausedUntil'] - now_ms) / 1000))}s left)"
        rows.append(
            (
                p["providerId"],
                limit,
                str(p["inFlight"]),
                str(p["queued"]),
                paused,
                str(p["cooldownMs"]),
                f"yes (from {p['autoReducedFrom']})" if p["autoReduced"] else "no",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    for p in providers:
        if p.get("notice"):
            lines.append(f"{p['providerId']}: {p['notice']}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    url = args.url.rstrip("/") + "/concurrency/status"
    try:
        response = httpx.get(url, headers=headers, timeout=5)
    except httpx.HTTPError as exc:
        print(f"sluice status: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(
            f"sluice status: {url} answered {response.status_code}: {response.text}",
            file=sys.stderr,
        )
        return 1
    out.write(render(response.json()["providers"]))
    return 0
