"""The operator's page (issue 16, SPEC 13) in a real browser: headless Chromium driven
over the Chrome DevTools Protocol, against `sluice serve` in front of `sluice sim`.

The CDP client is the few lines below (a websocket, JSON messages with ids, events in
between): no driver to install. Without `/usr/bin/chromium` (Debian's `chromium`
package; `.ci/run` installs it where it can) the browser tests are skipped; the
packaging and header tests run everywhere.

`UI_SCREENSHOT=docs/ui.png pytest tests/test_ui_browser.py` also writes the
screenshot of the page under load that the README shows.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from proxy.edge import ui
from tests.conftest import ProxyFactory, chat, sim_provider
from tests.servers import Server
from tests.waiting import wait_until

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "ui-admin-token-5e7a91"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
SCREENSHOT_MAX_BYTES = 200 * 1024

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="no /usr/bin/chromium (Debian's chromium package): the page is not tested in a browser",
)


# --- the page's files and headers (no browser needed) ----------------------------------------


def test_the_page_files_ship_in_the_package() -> None:
    folder = files("proxy.edge.ui")
    for name in ui.ASSETS:
        assert folder.joinpath(name).read_bytes(), name
    # Every file of the page matches a package-data pattern, so a wheel includes it.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["proxy.edge.ui"]
    shipped = {p.name for p in (ROOT / "proxy" / "edge" / "ui").iterdir() if p.suffix != ".py"}
    shipped.discard("__pycache__")
    assert shipped == set(ui.ASSETS)
    for name in shipped:
        assert any(Path(name).match(pattern) for pattern in patterns), name


def test_the_page_has_no_inline_script_or_style() -> None:
    html = ui.read("index.html").decode()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "an inline script"
    assert " style=" not in html
    assert "<style" not in html
    assert not re.search(r"\son[a-z]+=", html), "an inline event handler"
    script = ui.read("app.js").decode()
    assert "innerHTML" not in script, "server data goes into the page as text only"
    assert "eval(" not in script


@pytest.fixture
def secured(make_proxy: ProxyFactory, sim_clean: Server) -> Server:
    return make_proxy(
        sim_provider(sim_clean, "sim", limit=3, default=True) + sim_provider(sim_clean, "backup"),
        server=f'admin_token = "{ADMIN_TOKEN}"',
        admission="cooldown_ms = 0\nretry_on_429 = 0",
    )


@pytest.mark.e2e
def test_the_page_needs_no_token_and_is_locked_down(secured: Server) -> None:
    with httpx.Client(base_url=secured.url, timeout=5) as client:
        page = client.get("/concurrency/ui")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "script-src 'self';" in csp
        assert "unsafe" not in csp
        assert "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert ADMIN_TOKEN not in page.text
        script = client.get("/concurrency/ui/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert script.headers["x-content-type-options"] == "nosniff"
        assert (
            client.get("/concurrency/ui/style.css").headers["content-type"].startswith("text/css")
        )
        assert client.get("/concurrency/ui/index.html").status_code == 404
        assert client.get("/concurrency/ui/../status").status_code in (401, 404)
        assert client.get("/concurrency/status").status_code == 401  # the data stays guarded


# --- a small Chrome DevTools Protocol client --------------------------------------------------


@dataclass
class Page:
    """One browser tab over CDP. Events that arrive while waiting for an answer are
    kept; a JavaScript dialog (the restore button's confirm) is accepted at once."""

    ws: ClientConnection
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    events: list[dict[str, Any]] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == message_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self._event(message)

    def _event(self, message: dict[str, Any]) -> None:
        self.events.append(message)
        if message["method"] == "Page.javascriptDialogOpening":
            self.dialogs.append(message["params"]["message"])
            accept = {"accept": True}
            self.ws.send(
                json.dumps(
                    {
                        "id": next(self.ids),
                        "method": "Page.handleJavaScriptDialog",
                        "params": accept,
                    }
                )
            )

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, within: float = 10.0) -> Any:
        """Poll `expression` in the page until it is truthy; that value."""
        return wait_until(lambda: self.evaluate(expression), within)

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait("document.readyState === 'complete'")

    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )

    def errors(self, allowed: re.Pattern[str] | None = None) -> list[str]:
        """Console errors, uncaught exceptions and error log entries so far (a failed
        request whose URL matches `allowed` excepted)."""
        found = []
        for event in self.events:
            method, params = event["method"], event["params"]
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(json.dumps(params["args"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                url = entry.get("url", "")
                if entry["source"] == "network" and allowed is not None and allowed.search(url):
                    continue
                found.append(f"{entry['source']}: {entry['text']} {url}")
        return found


# Until GET /concurrency/queue/{id} exists the page probes it and falls back to counts;
# the browser logs that probe's 404 as a failed request.
QUEUE_PROBE = re.compile(r"/concurrency/queue/")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Headless Chromium; yields the DevTools HTTP address."""
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium")
    profile = tmp_path_factory.mktemp("chromium")
    log = (profile / "chromium.log").open("wb")
    proc = subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its helper processes go with it
    )
    try:
        port_file = profile / "DevToolsActivePort"
        wait_until(lambda: port_file.exists() and port_file.read_text().strip(), within=30)
        yield f"127.0.0.1:{port_file.read_text().split()[0]}"
    finally:
        with_group = proc.pid
        try:
            os.killpg(with_group, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(with_group, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.fixture
def page(browser: str) -> Iterator[Page]:
    """A fresh tab (its own session storage), closed afterwards."""
    target = httpx.put(f"http://{browser}/json/new?about:blank", timeout=10).json()
    try:
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            tab = Page(ws)
            for domain in ("Page", "Runtime", "Log"):
                tab.send(f"{domain}.enable")
            tab.viewport(1000, 1000)
            yield tab
    finally:
        httpx.get(f"http://{browser}/json/close/{target['id']}", timeout=10)


# --- the page, live ---------------------------------------------------------------------------


def shown(page: Page, provider: str) -> dict[str, Any]:
    """What the page shows of `provider`."""
    card = f"document.querySelector('[data-provider=\"{provider}\"]')"
    value: dict[str, Any] = page.evaluate(
        f"""(() => {{
            const card = {card};
            if (!card) return null;
            const text = (s) => card.querySelector(s).textContent;
            return {{
                limit: text('.limit'), inFlight: text('.in-flight'), queued: text('.queued'),
                paused: text('.paused'), split: text('.split'),
                notice: card.querySelector('.notice').hidden ? null : text('.notice-text'),
                restore: text('.restore'), waiting: text('.waiting-summary'),
                polls: Number(document.body.dataset.polls || 0),
            }};
        }})()"""
    )
    return value


def status_of(proxy: Server, provider: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(
        f"{proxy.url}/concurrency/status/{provider}", headers=ADMIN, timeout=5
    ).json()
    return body


def matches_status(page: Page, proxy: Server, provider: str) -> bool:
    """The page shows what /concurrency/status says (read after the page's last poll)."""
    before = shown(page, provider)
    status = status_of(proxy, provider)
    after = shown(page, provider)
    if before is None or before["polls"] == after["polls"]:
        return False  # wait for a poll that started after this status was read
    limit = "none" if status["limit"] is None else str(status["limit"])
    return (after["limit"], after["inFlight"], after["queued"]) == (
        limit,
        str(status["inFlight"]),
        str(status["queued"]),
    )


class Load:
    """Streams held open through the proxy, each in a thread, until `close`."""

    def __init__(self, url: str, count: int, headers: dict[str, str]) -> None:
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._stream, args=(url, headers), daemon=True)
            for _ in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def _stream(self, url: str, headers: dict[str, str]) -> None:
        try:
            with (
                httpx.Client(timeout=60) as client,
                client.stream("POST", url, json=chat(stream=True), headers=headers) as response,
            ):
                for _ in response.iter_bytes():
                    if self._stop.is_set():
                        return
        except httpx.HTTPError:
            return

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


@needs_chromium
@pytest.mark.e2e
def test_the_page_follows_status_a_429_and_restores_the_limit(
    page: Page, secured: Server, tmp_path: Path
) -> None:
    page.goto(f"{secured.url}/concurrency/ui#token={ADMIN_TOKEN}")
    page.wait("Number(document.body.dataset.polls) >= 1")
    # The token left the address bar and stays in this tab only.
    assert page.evaluate("location.hash") == ""
    assert page.evaluate("sessionStorage.getItem('sluice-admin-token')") == ADMIN_TOKEN
    assert page.evaluate("document.querySelector('#auth').hidden") is True
    wait_until(lambda: matches_status(page, secured, "sim"), within=10)
    assert shown(page, "backup")["limit"] == "none"

    # A 429: the limit goes 3 -> 2, and the page says so within 3 s.
    rate_limit = {"x-sim-fault": "rate-limit"}
    answer = httpx.post(f"{secured.url}/v1/chat/completions", json=chat(), headers=rate_limit)
    assert answer.status_code == 429
    seen_at = time.monotonic()
    page.wait(
        "(() => { const c = document.querySelector('[data-provider=\"sim\"]');"
        " return c.querySelector('.limit').textContent === '2'"
        " && !c.querySelector('.notice').hidden; })()",
        within=5,
    )
    assert time.monotonic() - seen_at < 3.0
    view = shown(page, "sim")
    assert view["notice"] == status_of(secured, "sim")["notice"]
    assert view["restore"] == "Restore to 3"
    page.wait(
        "[...document.querySelectorAll('#events td')]"
        ".some(td => td.textContent === 'limit_reduced')"
    )

    # Under load: two streams run, three wait; the page shows the same figures.
    slow = {"x-sim-tokens": "400", "x-sim-token-delay-ms": "50"}
    load = Load(f"{secured.url}/v1/chat/completions", 5, slow)
    try:
        wait_until(lambda: status_of(secured, "sim")["queued"] == 3, within=10)
        wait_until(lambda: matches_status(page, secured, "sim"), within=10)
        assert shown(page, "sim")["inFlight"] == "2"
        assert "3 waiting" in shown(page, "sim")["waiting"]
        # The chart has drawn something.
        assert (
            page.evaluate(
                "(() => { const c = document.querySelector('[data-provider=\"sim\"] canvas');"
                " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; })()"
            )
            > 500
        )
        time.sleep(2.5)  # a few more points on the chart
        page.viewport(1000, page.evaluate("document.documentElement.scrollHeight"))
        shot = base64.b64decode(page.send("Page.captureScreenshot", format="png")["data"])
        page.viewport(1000, 1000)
        (tmp_path / "ui.png").write_bytes(shot)
        assert len(shot) < SCREENSHOT_MAX_BYTES
        if target := os.environ.get("UI_SCREENSHOT"):
            shutil.copyfile(tmp_path / "ui.png", ROOT / target)

        # Restore: confirmed, then PUT /concurrency/limits/sim {"limit": 3}.
        page.evaluate("document.querySelector('[data-provider=\"sim\"] .restore').click()")
        assert len(page.dialogs) == 1
        assert "back to 3" in page.dialogs[0]
        wait_until(lambda: status_of(secured, "sim")["limit"] == 3, within=5)
        assert status_of(secured, "sim")["autoReduced"] is False
        page.wait(
            "(() => { const c = document.querySelector('[data-provider=\"sim\"]');"
            " return c.querySelector('.limit').textContent === '3'"
            " && c.querySelector('.notice').hidden; })()",
            within=5,
        )
        wait_until(lambda: matches_status(page, secured, "sim"), within=10)
    finally:
        load.close()
    assert page.errors(allowed=QUEUE_PROBE) == []


@needs_chromium
@pytest.mark.e2e
def test_a_token_typed_into_the_page(page: Page, secured: Server) -> None:
    page.goto(f"{secured.url}/concurrency/ui")
    page.wait("!document.querySelector('#auth').hidden")
    page.evaluate(
        "(() => { document.querySelector('#token-input').value = 'wrong';"
        " document.querySelector('#token-form').requestSubmit(); })()"
    )
    page.wait("document.querySelector('#auth-message').textContent.includes('refused')")
    page.evaluate(
        f"(() => {{ document.querySelector('#token-input').value = '{ADMIN_TOKEN}';"
        " document.querySelector('#token-form').requestSubmit(); })()"
    )
    page.wait("document.querySelector('[data-provider=\"sim\"]') !== null")
    assert page.evaluate("document.querySelector('#auth').hidden") is True
    wait_until(lambda: matches_status(page, secured, "sim"), within=10)
    # The refused attempts show as failed requests (401), nothing else.
    unauthorized = re.compile(r"/concurrency/(status|events)")
    assert page.errors(allowed=unauthorized) == []


@needs_chromium
@pytest.mark.e2e
def test_the_page_fits_a_phone(page: Page, secured: Server) -> None:
    page.viewport(390, 844, mobile=True)
    page.goto(f"{secured.url}/concurrency/ui#token={ADMIN_TOKEN}")
    page.wait("document.querySelector('[data-provider=\"sim\"]') !== null")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    card_width = page.evaluate(
        "document.querySelector('[data-provider=\"sim\"]').getBoundingClientRect().width"
    )
    assert 300 < card_width <= 390
    if target := os.environ.get("UI_SCREENSHOT_PHONE"):
        shot = page.send("Page.captureScreenshot", format="png")["data"]
        Path(target).write_bytes(base64.b64decode(shot))
    assert page.errors(allowed=QUEUE_PROBE) == []
