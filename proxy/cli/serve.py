"""`sluice serve`: load the config, configure logging, run uvicorn until a signal.

`--workers N` (N > 1) runs N processes through uvicorn's process manager; each loads
the same config (its path passed on in `SLUICE_CONFIG`) and builds its app in
`worker_app`. It needs `cluster.redis_url`: without shared state every worker would
enforce the whole limit on its own.
"""

from __future__ import annotations

import errno
import gc
import ipaddress
import logging
import math
import os
import signal
import socket
import sys
import threading
from typing import Any

import structlog
import uvicorn
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from proxy.edge import logs
from proxy.edge.app import Sluice
from proxy.edge.protocol import edge_protocol
from proxy.errors import ConfigError
from proxy.settings import (
    ServerSettings,
    Settings,
    config_path,
    load,
    resolve_clients,
    resolve_providers,
    secrets,
)

log = structlog.get_logger("sluice")


class _QuietAbort(logging.Filter):
    """uvicorn logs any exception leaving the app as an error with a traceback. An
    upstream cut mid-stream is reported by us already; the exception only tells
    uvicorn to drop the client connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        from proxy.edge.relay import UpstreamCut

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, UpstreamCut)


def run(
    config: str | None = None,
    host: str | None = None,
    port: int | None = None,
    workers: int = 1,
) -> int:
    try:
        settings = load(config_path(config))
        settings = with_address(settings, host, port)
        resolve_providers(settings)  # reads the keys: a missing one is a config error
        resolve_clients(settings)
        check_cluster(settings, workers)
        check_exposure(settings.server)
        # Bound before anything is built or logged: a port in use is one line, not a
        # "sluice started" followed by uvicorn's error.
        sock = listen(settings.server.host, settings.server.port)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    server = settings.server
    _configure_logging(settings)
    _warn_about_status_variables(settings)
    if open_admin(server):
        structlog.get_logger("sluice").warning(
            "admin routes are open: no admin_token on a non-loopback host "
            "(server.allow_open_admin = true); anyone who reaches this port can change the limits",
            host=server.host,
        )
    if workers > 1:
        return serve_workers(settings, config, workers, sock)
    return serve(
        _Server(
            uvicorn.Config(
                Sluice(settings), host=server.host, port=server.port, **_uvicorn_options(server)
            )
        ),
        [sock],
    )


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once started, as it does when it
    binds the socket itself (it is silent about a socket it is handed)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            tune_gc()
        if self.started and sockets:
            _log_listening(sockets[0])


def tune_gc() -> None:
    """Once the app has started, everything built so far lives as long as the process:
    keep it out of the garbage collector's generations so collections stay short under
    load. And collect less often: with a thousand open streams a full collection walks
    ~100,000 live objects and stalls every stream at once (measured: chunk delay p99 at
    1,024 streams 155 ms with the default thresholds, 61 ms with these)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _log_listening(sock: socket.socket) -> None:
    host, port = sock.getsockname()[:2]
    address = f"[{host}]" if ":" in host else host
    logging.getLogger("uvicorn.error").info(
        "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", address, port
    )


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound as uvicorn would bind it (IPv6 when the host has a
    colon), or a `ConfigError` saying why it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = " (another process listens there: stop it, or choose a port with --port)"
        raise ConfigError(
            f"sluice serve: cannot listen on {host}:{port}: {exc.strerror or exc}{hint}"
        ) from None
    sock.set_inheritable(True)  # --workers: the worker processes share it
    return sock


def _warn_about_status_variables(settings: Settings) -> None:
    """`SLUICE_ADMIN_TOKEN` is what `sluice status` sends, not the proxy's own token:
    say so when it is set and the proxy has none, rather than run open unnoticed."""
    if os.environ.get("SLUICE_ADMIN_TOKEN") and not settings.server.admin_token:
        log.warning(
            "SLUICE_ADMIN_TOKEN is read by `sluice status` only; the proxy's admin token "
            "is server.admin_token (SLUICE_SERVER__ADMIN_TOKEN), which is empty: the "
            "admin routes are open"
        )


def _uvicorn_options(server: ServerSettings) -> dict[str, Any]:
    return {
        "loop": "uvloop",
        # uvicorn's httptools protocol with the edge limits (a partial:
        # picklable into --workers processes).
        "http": edge_protocol(server),
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        "proxy_headers": False,  # no X-Forwarded-* rewriting: one less layer per request
        "date_header": False,  # the upstream's Date passes through
        "log_config": None,
        "timeout_graceful_shutdown": math.ceil(server.shutdown_grace_s),
    }


def check_cluster(settings: Settings, workers: int) -> None:
    """`--workers` needs a Redis to share the limit through; the URL must parse."""
    if workers < 1:
        raise ConfigError("sluice serve: --workers must be at least 1")
    url = settings.cluster.redis_url
    if workers > 1 and not url:
        raise ConfigError(
            "sluice serve: --workers N (N > 1) needs cluster.redis_url: without a shared "
            "Redis every worker would enforce the whole limit on its own"
        )
    if url:
        from proxy.cluster.hub import check_url

        if (problem := check_url(url)) is not None:
            raise ConfigError(f"config error: cluster.redis_url: {problem}")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`. `0.0.0.0` and `::` are every
    interface, and any other name may resolve anywhere: neither is loopback."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def open_admin(server: ServerSettings) -> bool:
    """Listening beyond this machine with the admin routes unauthenticated."""
    return not server.admin_token.get_secret_value() and not is_loopback(server.host)


def check_exposure(server: ServerSettings) -> None:
    """Refuse to serve the admin routes without a token to the network, unless the
    operator said so (`allow_open_admin`): anyone who reaches the port could set every
    limit. Checked on the effective host, after the environment and `--host`."""
    if open_admin(server) and not server.allow_open_admin:
        raise ConfigError(
            f"config error: server.admin_token: required when listening on {server.host}, "
            "which is not loopback (set SLUICE_SERVER__ADMIN_TOKEN, listen on 127.0.0.1, "
            "or set server.allow_open_admin = true)"
        )


def serve_workers(
    settings: Settings, config: str | None, workers: int, sock: socket.socket | None = None
) -> int:
    """Run `workers` processes on one listening socket (`sock`, else bound here) until
    SIGTERM/SIGINT."""
    path = config_path(config)
    if path is not None:
        os.environ["SLUICE_CONFIG"] = str(path.resolve())
    server = settings.server
    uv_config = uvicorn.Config(
        "proxy.cli.serve:worker_app",
        factory=True,
        workers=workers,
        host=server.host,
        port=server.port,
        **_uvicorn_options(server),
    )
    if sock is None:
        sock = uv_config.bind_socket()
    else:
        _log_listening(sock)
    supervisor = Multiprocess(uv_config, sockets=[sock])
    supervisor.run()
    failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
    return 3 if failed else 0


def worker_app() -> Sluice:
    """The app of one `--workers` process (uvicorn calls this factory in each)."""
    settings = load(config_path(None))
    cluster = settings.cluster
    if cluster.instance_id:
        # Workers share the config; their instance ids must still differ.
        unique = cluster.model_copy(update={"instance_id": f"{cluster.instance_id}:{os.getpid()}"})
        settings = settings.model_copy(update={"cluster": unique})
    _configure_logging(settings)
    app = Sluice(settings)
    # uvicorn builds each worker's server itself: tune here, before the app starts.
    tune_gc()
    return app


def _configure_logging(settings: Settings) -> None:
    logs.configure(settings.server.log_format, settings.server.log_level, secrets(settings))
    logging.getLogger("uvicorn.error").addFilter(_QuietAbort())


def with_address(settings: Settings, host: str | None, port: int | None) -> Settings:
    """Apply `--host`/`--port`, validated like the config file's values."""
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if not overrides:
        return settings
    try:
        server = ServerSettings.model_validate(settings.server.model_dump() | overrides)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise ConfigError(f"config error: --{error['loc'][0]}: {error['msg']}") from None
    return settings.model_copy(update={"server": server})


def serve(server: uvicorn.Server, sockets: list[socket.socket] | None = None) -> int:
    """Run `server` until SIGTERM/SIGINT; 0 after a clean shutdown, 3 if startup failed.

    uvicorn re-raises the signal that stopped it, into the handler installed before
    it started; with the default handler a SIGTERM would end the process with -15.
    Installing uvicorn's own handler first makes that re-raise harmless.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, server.handle_exit)
    server.run(sockets)
    return 0 if server.started else 3


__all__ = ["Settings", "run", "serve", "serve_workers", "worker_app"]
