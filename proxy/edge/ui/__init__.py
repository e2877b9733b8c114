"""The operator's page, `GET /concurrency/ui` (README, "The operator's page"): static files shipped
in this package (`index.html`, `app.js`, `style.css`; package data in pyproject.toml).

The page holds no data, so it is served without the admin token; its script reads the
admin routes with the token, which it takes from the URL fragment (`#token=...`, never
sent to the server) or from the operator, and keeps in the tab's session storage.
The headers let the page run nothing but its own script and talk to no one but this
sluice, and keep the page's address out of any Referer.
"""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
"""Every file the page is made of, with its content type."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}


def read(name: str) -> bytes:
    """One of the page's files, as the installed package holds it."""
    return files(__name__).joinpath(name).read_bytes()


def routes() -> list[Route]:
    """`/concurrency/ui` (the page) and `/concurrency/ui/<file>` (its script and style).
    The files are read once, when the routes are built."""
    bodies = {name: read(name) for name in ASSETS}

    def serve(name: str) -> Response:
        return Response(bodies[name], media_type=ASSETS[name], headers=HEADERS)

    async def page(request: Request) -> Response:
        return serve("index.html")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in bodies or name == "index.html":
            return Response("not found", status_code=404, media_type="text/plain")
        return serve(name)

    return [
        Route("/concurrency/ui", page, methods=["GET"]),
        Route("/concurrency/ui/{name}", asset, methods=["GET"]),
    ]
