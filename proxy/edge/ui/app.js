// sluice operator's view: polls the admin routes and draws what they say.
// No framework, no build step. Every value from the server goes into the page as
// text (textContent), never as markup: conversation ids and event details are
// client-controlled.
"use strict";

(() => {
  const POLL_MS = 2000;
  const WINDOW_MS = 15 * 60 * 1000;
  const EVENTS_SHOWN = 20;
  const WAITERS_SHOWN = 10;
  const QUEUE_RETRY_MS = 30000; // re-probe GET /concurrency/queue/{id} this often after a miss
  const TOKEN_KEY = "sluice-admin-token";

  // The page may sit behind a path prefix: the admin routes are siblings of /concurrency/ui.
  const base = location.pathname.replace(/\/concurrency\/ui\/?$/, "");
  const $ = (selector, root = document) => root.querySelector(selector);

  const cards = new Map(); // provider id -> {root, samples: [[t, inFlight, queued, limit]]}
  const queueRoute = { ok: true, retryAt: 0 };
  let timer = 0;
  let lastOk = 0;
  let polls = 0;

  // --- the token: from #token=..., or typed in; kept for this tab only -------------------

  function takeTokenFromFragment() {
    const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (match) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
      // Out of the address bar and the history: the fragment was never sent, keep it so.
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function askForToken(message) {
    $("#auth").hidden = false;
    $("#auth-message").textContent = message;
    $("#auth-message").className = "error";
    $("#token-input").focus();
  }

  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("#token-input").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    $("#token-input").value = "";
    $("#auth").hidden = true;
    pollNow();
  });

  $("#change-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("#auth").hidden = false;
    $("#token-input").focus();
  });

  // --- talking to sluice ---------------------------------------------------------------

  class Unauthorized extends Error {}

  async function call(path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    const secret = token();
    if (secret) headers.Authorization = "Bearer " + secret;
    const response = await fetch(base + path, { cache: "no-store", ...options, headers });
    if (response.status === 401) throw new Unauthorized();
    return response;
  }

  async function json(path) {
    const response = await call(path);
    if (!response.ok) throw new Error(path + " answered " + response.status);
    return response.json();
  }

  async function waiters(status) {
    if (status.queued === 0) return [];
    if (!queueRoute.ok && Date.now() < queueRoute.retryAt) return null;
    const id = encodeURIComponent(status.providerId);
    const response = await call(`/concurrency/queue/${id}?limit=${WAITERS_SHOWN}`);
    queueRoute.ok = response.status === 200;
    if (!queueRoute.ok) {
      queueRoute.retryAt = Date.now() + QUEUE_RETRY_MS;
      return null;
    }
    const body = await response.json();
    return Array.isArray(body.waiters) ? body.waiters : null;
  }

  async function poll() {
    const [status, events] = await Promise.all([
      json("/concurrency/status"),
      json(`/concurrency/events?limit=${EVENTS_SHOWN}`),
    ]);
    const lists = await Promise.all(status.providers.map((p) => waiters(p).catch(() => null)));
    const now = Date.now();
    status.providers.forEach((p, i) => renderProvider(p, lists[i], now));
    for (const id of cards.keys()) {
      if (!status.providers.some((p) => p.providerId === id)) {
        cards.get(id).root.remove();
        cards.delete(id);
      }
    }
    renderEvents(events.events);
  }

  async function pollNow() {
    clearTimeout(timer);
    try {
      await poll();
      lastOk = Date.now();
      polls += 1;
      document.body.dataset.polls = String(polls);
      setState("live · updated " + clock(lastOk), false);
      $("#change-token").hidden = !token();
    } catch (error) {
      if (error instanceof Unauthorized) {
        setState("the admin token is missing or wrong", true);
        askForToken(
          token() ? "sluice refused this token: type the right one." : "This sluice needs its admin token.",
        );
        return; // no more polling until a token is given
      }
      const since = lastOk ? " since " + clock(lastOk) : "";
      setState("sluice unreachable" + since + " · retrying", true);
      markGap();
    }
    timer = setTimeout(pollNow, POLL_MS);
  }

  function setState(text, down) {
    const state = $("#state");
    state.textContent = text;
    state.classList.toggle("down", down);
  }

  // --- drawing -------------------------------------------------------------------------

  function card(id) {
    let entry = cards.get(id);
    if (!entry) {
      const root = $("#provider-card").content.firstElementChild.cloneNode(true);
      root.dataset.provider = id;
      $(".name", root).textContent = id;
      $(".restore", root).addEventListener("click", () => restore(id));
      $("#providers").append(root);
      entry = { root, samples: [], status: null };
      cards.set(id, entry);
    }
    return entry;
  }

  function renderProvider(s, list, now) {
    const entry = card(s.providerId);
    const root = entry.root;
    entry.status = s;
    entry.samples.push([now, s.inFlight, s.queued, s.limit]);
    while (entry.samples.length && entry.samples[0][0] < now - WINDOW_MS) entry.samples.shift();

    $(".limit", root).textContent = s.limit === null ? "none" : String(s.limit);
    $(".in-flight", root).textContent = String(s.inFlight);
    $(".split", root).textContent =
      "running" in s ? `${s.running} running\n${s.cooling} cooling` : "";
    $(".queued", root).textContent = String(s.queued);
    $(".cooldown", root).textContent = `cooldown ${s.cooldownMs} ms`;
    const left = s.paused && s.pausedUntil ? Math.max(0, Math.ceil((s.pausedUntil - now) / 1000)) : 0;
    $(".paused", root).textContent = s.paused ? `${left} s left` : "no";
    const pausedBadge = $(".badge-paused", root);
    pausedBadge.hidden = !s.paused;
    pausedBadge.textContent = `paused · ${left} s`;
    $(".badge-reduced", root).hidden = !s.autoReduced;
    const cluster = $(".badge-cluster", root);
    cluster.hidden = !s.cluster;
    if (s.cluster) cluster.textContent = `cluster: ${s.cluster.mode}, ${s.cluster.replicas} replicas`;
    $(".usage", root).hidden = !s.usageGate;
    $(".sessions", root).textContent = s.upstreamSessions == null ? "—" : String(s.upstreamSessions);

    const notice = $(".notice", root);
    notice.hidden = !s.autoReduced;
    if (s.autoReduced) {
      $(".notice-text", root).textContent = s.notice || `Limit auto-reduced from ${s.autoReducedFrom}.`;
      const button = $(".restore", root);
      button.textContent = `Restore to ${s.autoReducedFrom}`;
      button.dataset.limit = String(s.autoReducedFrom);
    } else {
      $(".restore-error", root).hidden = true;
    }
    renderWaiters(root, s, list, now);
    drawChart(entry, now);
  }

  function renderWaiters(root, s, list, now) {
    const table = $(".waiters", root);
    const summary = $(".waiting-summary", root);
    const body = $("tbody", table);
    body.replaceChildren();
    if (s.queued === 0) {
      summary.textContent = "Nobody is waiting.";
      table.hidden = true;
      return;
    }
    if (list === null) {
      summary.textContent = `${s.queued} waiting (this sluice does not list them).`;
      table.hidden = true;
      return;
    }
    const more = s.queued - list.length;
    summary.textContent = `${s.queued} waiting` + (more > 0 ? `; the first ${list.length}:` : ":");
    for (const w of list) {
      const started = typeof w.promptStartedAt === "number" ? ago(now - w.promptStartedAt) + " ago" : "";
      const source = w.promptSource ? ` (${w.promptSource})` : "";
      row(body, [
        [String(w.position), "num"],
        [seconds(w.waitedMs), "num"],
        [started + source, ""],
        [w.conversationId || "—", ""],
        [w.clientId || "—", ""],
      ]);
    }
    table.hidden = false;
  }

  function renderEvents(events) {
    const body = $("#events tbody");
    body.replaceChildren();
    for (const e of events) {
      row(body, [
        [clock(e.at), "num"],
        [e.providerId, ""],
        [e.kind, ""],
        [e.detail, ""],
      ]);
    }
    $("#events-empty").hidden = events.length > 0;
  }

  function row(body, cells) {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.append(td);
    }
    body.append(tr);
  }

  function markGap() {
    // A failed poll breaks the chart's lines instead of joining across the gap.
    const now = Date.now();
    for (const entry of cards.values()) {
      entry.samples.push([now, null, null, null]);
      drawChart(entry, now);
    }
  }

  function drawChart(entry, now) {
    const canvas = $("canvas", entry.root);
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    const ratio = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);

    const css = getComputedStyle(document.documentElement);
    const color = (name) => css.getPropertyValue(name).trim();
    const left = 28;
    const bottom = height - 16;
    const top = 6;
    const samples = entry.samples;
    let peak = 1;
    for (const [, a, b, c] of samples) peak = Math.max(peak, a || 0, b || 0, c || 0);
    const yMax = niceCeil(peak * 1.1);
    // The last 15 minutes; until the page has watched that long, what it has seen
    // (at least a minute), so a fresh page's chart is not a sliver at the right edge.
    const span = Math.min(WINDOW_MS, Math.max(60000, samples.length ? now - samples[0][0] : 0));
    const x = (t) => left + ((t - (now - span)) / span) * (width - left - 4);
    const y = (v) => bottom - (v / yMax) * (bottom - top);

    g.font = "11px system-ui, sans-serif";
    g.fillStyle = color("--muted");
    g.strokeStyle = color("--line");
    g.lineWidth = 1;
    for (const v of [0, yMax / 2, yMax]) {
      g.beginPath();
      g.moveTo(left, Math.round(y(v)) + 0.5);
      g.lineTo(width, Math.round(y(v)) + 0.5);
      g.stroke();
      g.fillText(String(Math.round(v * 10) / 10), 2, y(v) + 4);
    }
    for (const part of [1, 2 / 3, 1 / 3, 0]) {
      const back = span * part;
      const label = back ? "−" + ago(back) : "now";
      const at = x(now - back);
      g.fillText(label, Math.min(Math.max(at - 14, left), width - 24), height - 3);
    }
    line(g, samples, 3, x, y, color("--limit"), [5, 4], true);
    line(g, samples, 2, x, y, color("--queued"), [], false);
    line(g, samples, 1, x, y, color("--in-flight"), [], false);
  }

  function line(g, samples, index, x, y, stroke, dash, step) {
    g.strokeStyle = stroke;
    g.setLineDash(dash);
    g.lineWidth = 2;
    g.beginPath();
    let open = false;
    let last = 0;
    for (const sample of samples) {
      const v = sample[index];
      if (v === null || v === undefined) {
        open = false;
        continue;
      }
      const px = x(sample[0]);
      if (!open) {
        g.moveTo(px, y(v));
      } else {
        if (step) g.lineTo(px, y(last)); // the limit holds until it changes
        g.lineTo(px, y(v));
      }
      open = true;
      last = v;
    }
    g.stroke();
    g.setLineDash([]);
  }

  function niceCeil(v) {
    const power = Math.pow(10, Math.floor(Math.log10(v)));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= v) return step * power;
    return 10 * power;
  }

  // --- the restore button ----------------------------------------------------------------

  async function restore(id) {
    const entry = cards.get(id);
    const limit = Number($(".restore", entry.root).dataset.limit);
    const error = $(".restore-error", entry.root);
    error.hidden = true;
    if (!limit || !confirm(`Set the limit of ${id} back to ${limit}? Do it once the cause of the 429 is gone.`)) return;
    try {
      const response = await call(`/concurrency/limits/${encodeURIComponent(id)}`, {
        method: "PUT",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ limit }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(body.error || `sluice answered ${response.status}`);
      }
    } catch (err) {
      error.textContent = err instanceof Unauthorized ? "The admin token was refused." : String(err.message || err);
      error.hidden = false;
    }
    pollNow();
  }

  // --- small formatting helpers ------------------------------------------------------------

  function clock(ms) {
    return new Date(ms).toLocaleTimeString([], { hour12: false });
  }

  function seconds(ms) {
    return typeof ms === "number" ? (ms / 1000).toFixed(1) + " s" : "";
  }

  function ago(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 120) return `${s} s`;
    if (s < 7200) return `${Math.round(s / 60)} min`;
    return `${Math.round(s / 3600)} h`;
  }

  window.addEventListener("resize", () => {
    const now = Date.now();
    for (const entry of cards.values()) drawChart(entry, now);
  });

  window.addEventListener("hashchange", () => {
    takeTokenFromFragment();
    pollNow();
  });

  takeTokenFromFragment();
  pollNow();
})();
