"""The operator's routes: `/concurrency/*`, `/healthz`, `/metrics`.

Every route but `/healthz` and the operator's page (`/concurrency/ui`, static files
that hold no data; `proxy.edge.ui`) requires the admin token when one is configured;
the check wraps the whole route table, so a route added later cannot slip past it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route

from proxy.admission import LimiterStatus
from proxy.edge import ui
from proxy.edge.metrics import CONTENT_TYPE
from proxy.errors import StoreError
from proxy.runtime.control import Control
from proxy.runtime.provider import Provider
from proxy.runtime.seam import ClusterView
from proxy.settings import MAX_COOLDOWN_MS, MAX_LIMIT

PUBLIC_PATHS = frozenset({"/healthz", "/concurrency/ui", "/concurrency/ui/{name}"})
MAX_OFFSET = 1_000_000
Endpoint = Callable[[Request], Awaitable[Response]]


class AdminError(Exception):
    """An admin request we refuse: `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def status_json(status: LimiterStatus, cluster: ClusterView | None = None) -> dict[str, Any]:
    """A `Status` object of the README's admin API (camelCase; optional keys only when they apply).

    In cluster mode the figures are cluster-wide, plus `cluster` (this replica's mode)
    and `instances` (the per-replica breakdown)."""
    body: dict[str, Any] = {
        "providerId": status.provider_id,
        "limit": status.limit,
        "inFlight": status.in_flight,
        "queued": status.queued,
        "paused": status.paused,
        "cooldownMs": status.cooldown_ms,
        "autoReduced": status.auto_reduced,
    }
    if status.paused_until is not None:
        loop_now = asyncio.get_running_loop().time()
        body["pausedUntil"] = round((time.time() + status.paused_until - loop_now) * 1000)
    if status.auto_reduced:
        body["autoReducedFrom"] = status.auto_reduced_from
        body["notice"] = status.notice
    body["running"] = status.running
    body["cooling"] = status.cooling
    body["usageGate"] = status.usage_gate
    body["upstreamSessions"] = status.upstream_sessions
    if status.clients:  # only with [[clients]] configured
        body["clients"] = [
            {
                "clientId": c.client_id,
                "inFlight": c.in_flight,
                "queued": c.queued,
                "maxInFlight": c.max_in_flight,
            }
            for c in status.clients
        ]
    if cluster is not None:
        mode: dict[str, Any] = {
            "mode": cluster.mode,
            "instanceId": cluster.instance_id,
            "replicas": cluster.replicas,
        }
        if cluster.mode == "fallback":
            mode["localLimit"] = cluster.local_limit
        body["cluster"] = mode
        body["instances"] = [
            {"instanceId": i.instance_id, "inFlight": i.in_flight, "queued": i.queued}
            for i in cluster.instances
        ]
    return body


def _int_field(body: Any, field: str, low: int, high: int) -> int:
    if not isinstance(body, dict):
        raise AdminError(400, f'body must be a JSON object like {{"{field}": {low}}}')
    unknown = sorted(set(body) - {field})
    if unknown:
        raise AdminError(400, f"unknown field {unknown[0]!r}; expected only {field!r}")
    if field not in body:
        raise AdminError(400, f"missing field {field!r}")
    value = body[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdminError(400, f"{field} must be an integer from {low} to {high}")
    if not low <= value <= high:
        raise AdminError(400, f"{field} must be an integer from {low} to {high}, got {value}")
    return value


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise AdminError(400, "body must be valid JSON") from None


def routes(
    providers: Mapping[str, Provider],
    control: Callable[[], Control],
    metrics_text: Callable[[], bytes],
    admin_token: str,
) -> list[BaseRoute]:
    """The admin route table. `providers` is the app's live mapping (filled at start);
    `control` gives the durable-writes object, which exists only once started."""

    def provider(request: Request) -> Provider:
        provider_id = request.path_params["provider_id"]
        found = providers.get(provider_id)
        if found is None:
            raise AdminError(404, f"unknown provider {provider_id!r}")
        return found

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(metrics_text(), media_type=CONTENT_TYPE)

    async def status_of(p: Provider) -> dict[str, Any]:
        # Read fresh (from Redis in cluster mode), then the view that read refreshed.
        status = await p.admission.status()
        return status_json(status, p.admission.cluster())

    async def all_status(request: Request) -> Response:
        return JSONResponse({"providers": [await status_of(p) for p in providers.values()]})

    async def one_status(request: Request) -> Response:
        return JSONResponse(await status_of(provider(request)))

    async def all_limits(request: Request) -> Response:
        statuses = [await p.admission.status() for p in providers.values()]
        limits = [
            {"providerId": s.provider_id, "limit": s.limit} for s in statuses if s.limit is not None
        ]
        return JSONResponse({"limits": limits})

    async def get_limit(request: Request) -> Response:
        p = provider(request)
        limit = (await p.admission.status()).limit
        if limit is None:
            raise AdminError(404, f"provider {p.id!r} has no limit")
        return JSONResponse({"providerId": p.id, "limit": limit})

    async def put_limit(request: Request) -> Response:
        p = provider(request)
        limit = _int_field(await _json_body(request), "limit", 1, MAX_LIMIT)
        await control().set_limit(p, limit)
        return JSONResponse({"providerId": p.id, "limit": limit})

    async def delete_limit(request: Request) -> Response:
        p = provider(request)
        await control().set_limit(p, None)
        return JSONResponse({"ok": True, "providerId": p.id})

    async def get_cooldown(request: Request) -> Response:
        p = provider(request)
        cooldown_ms = (await p.admission.status()).cooldown_ms
        return JSONResponse({"providerId": p.id, "cooldownMs": cooldown_ms})

    async def put_cooldown(request: Request) -> Response:
        p = provider(request)
        cooldown_ms = _int_field(await _json_body(request), "cooldownMs", 0, MAX_COOLDOWN_MS)
        await control().set_cooldown(p, cooldown_ms)
        return JSONResponse({"providerId": p.id, "cooldownMs": cooldown_ms})

    async def queue(request: Request) -> Response:
        p = provider(request)
        limit = _query_int(request, "limit", 100, 1, 1000)
        offset = _query_int(request, "offset", 0, 0, MAX_OFFSET)
        found = await p.admission.waiters(offset, limit)
        return JSONResponse(
            {
                "provider": p.id,
                "waiters": [
                    {
                        "position": w.position,
                        "promptStartedAt": round(w.prompt_started_at),
                        "promptSource": w.prompt_source,
                        "conversationId": w.conversation_id,
                        "clientId": w.client_id,
                        "waitedMs": round(w.waited_s * 1000),
                    }
                    for w in found
                ],
            }
        )

    async def events(request: Request) -> Response:
        provider_id = request.query_params.get("provider")
        if provider_id is not None and provider_id not in providers:
            raise AdminError(404, f"unknown provider {provider_id!r}")
        raw_limit = request.query_params.get("limit", "100")
        if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= 1000:
            raise AdminError(400, "limit must be an integer from 1 to 1000")
        found = await control().store.events(provider_id, int(raw_limit))
        return JSONResponse(
            {
                "events": [
                    {"at": e.at_ms, "providerId": e.provider_id, "kind": e.kind, "detail": e.detail}
                    for e in found
                ]
            }
        )

    token = admin_token.encode()

    def guarded(endpoint: Endpoint, public: bool = False) -> Endpoint:
        async def handle(request: Request) -> Response:
            if token and not public and not _authorized(request, token):
                return JSONResponse(
                    {"error": "missing or wrong admin token (Authorization: Bearer <token>)"},
                    status_code=401,
                    headers={"www-authenticate": "Bearer"},
                )
            try:
                return await endpoint(request)
            except AdminError as err:
                return JSONResponse({"error": err.message}, status_code=err.status)
            except StoreError as err:
                return JSONResponse(
                    {"error": f"the change could not be stored, nothing changed: {err}"},
                    status_code=500,
                )

        return handle

    table: list[tuple[str, Endpoint, list[str]]] = [
        ("/concurrency/status", all_status, ["GET"]),
        ("/concurrency/status/{provider_id}", one_status, ["GET"]),
        ("/concurrency/limits", all_limits, ["GET"]),
        ("/concurrency/limits/{provider_id}", get_limit, ["GET"]),
        ("/concurrency/limits/{provider_id}", put_limit, ["PUT"]),
        ("/concurrency/limits/{provider_id}", delete_limit, ["DELETE"]),
        ("/concurrency/cooldown/{provider_id}", get_cooldown, ["GET"]),
        ("/concurrency/cooldown/{provider_id}", put_cooldown, ["PUT"]),
        ("/concurrency/events", events, ["GET"]),
        ("/concurrency/queue/{provider_id}", queue, ["GET"]),
        ("/metrics", metrics, ["GET"]),
    ]
    public: list[BaseRoute] = [
        Route("/healthz", guarded(healthz, public=True), methods=["GET"]),
        *ui.routes(),
    ]
    return public + [
        Route(path, guarded(endpoint), methods=methods) for path, endpoint, methods in table
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route: 404; a route that exists, another
    method: 405, with `Allow`) in the admin shape instead of plain text."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path}"
    elif exc.status_code == 405:
        # Starlette names the methods of the first route with this path only; a path
        # may have a route per method (GET, PUT, DELETE /concurrency/limits/{id}).
        allowed = ", ".join(_allowed_methods(request))
        message = f"method {request.method} not allowed on {request.url.path} (allowed: {allowed})"
        return JSONResponse({"error": message}, status_code=405, headers={"Allow": allowed})
    else:
        message = exc.detail
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        matched = isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE
        if matched and route.methods:
            methods |= route.methods
    return sorted(methods)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette still logs the exception and re-raises it after this answer.
    return JSONResponse({"error": "internal error"}, status_code=500)


# For the Starlette app that serves these routes: every admin answer that is an
# error is `{"error": "..."}`, whoever refused.
EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    HTTPException: _http_error,
    500: _internal_error,
}


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise AdminError(400, f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _authorized(request: Request, token: bytes) -> bool:
    given = request.headers.get("authorization", "")
    scheme, _, credential = given.partition(" ")
    # compare_digest takes time independent of where the strings differ.
    return scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), token)
