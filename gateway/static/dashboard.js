// Presence dashboard: a team board, a churn-risk view and a node panel. No build step.
//
// Settings come from the URL fragment
//   #token=JWT&ws=ws://host:8765/ws&admin=http://host:9090&team=team:w1&org=acme
// or from the settings form. Auto-away is on: `idle=<seconds>` (default 300) sets the idle
// time, `autoaway=0` turns it off, `format=msgpack` speaks the msgpack subprotocol. The token never leaves the page except to the gateway.
//
// A lost connection resumes on its own (the client keeps the resume token). The token is
// refreshed in place before it expires when the page is given a new one: either a new
// `#token=` in the fragment (only the token changed), or a provider set from outside,
// `window.presenceDashboard.tokenProvider = async () => jwt`, which the client calls at
// 80 % of the token's remaining life (see docs/client.md, "The dashboard").

import { PresenceClient, overallStatus } from "/static/client.js";

const $ = (id) => document.getElementById(id);
const STATUS_ORDER = { online: 0, busy: 1, away: 2, offline: 3 };
const IDLE_DEFAULT_S = 300;
const AUTO_TEXT = { hidden: "Shown as away while this page is hidden.", idle: "Shown as away: idle. Move or type to come back." };
const NODE_POLL_MS = 15000; // the admin API allows 10 requests a minute; we make 2 per poll
const reduceMotion = window.matchMedia("(prefers-reduced-motion: reduce)").matches;

const state = {
  cfg: {},
  client: null,
  claims: null,
  team: null, // view {user: {status, metas, last_seen}}
  churn: [],
  expanded: new Set(),
  myStatus: "online",
  nodeTimer: null,
  nodeAbort: null,
};

// -- settings ---------------------------------------------------------------------------

function defaults() {
  const wsProto = location.protocol === "https:" ? "wss:" : "ws:";
  return {
    token: "", ws: location.host ? `${wsProto}//${location.host}/ws` : "", admin: "", team: "", org: "",
    idle: String(IDLE_DEFAULT_S), autoaway: "1", format: "json",
  };
}

function readFragment() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const cfg = defaults();
  for (const key of Object.keys(cfg)) {
    const v = params.get(key);
    if (v !== null) cfg[key] = v.trim();
  }
  return cfg;
}

function fillForm(cfg) {
  $("f-token").value = cfg.token;
  $("f-ws").value = cfg.ws;
  $("f-admin").value = cfg.admin;
  $("f-team").value = cfg.team;
  $("f-org").value = cfg.org;
}

function readForm() {
  // The form has no fields for these; keep what the fragment said.
  const { idle, autoaway, format } = { ...defaults(), ...state.cfg };
  return {
    idle, autoaway, format,
    token: $("f-token").value.trim(),
    ws: $("f-ws").value.trim(),
    admin: $("f-admin").value.trim().replace(/\/+$/, ""),
    team: $("f-team").value.trim(),
    org: $("f-org").value.trim().replace(/^churn:/, ""),
  };
}

/** The token's claims, decoded without verification (for display only). */
function decodeClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(part + "=".repeat((4 - (part.length % 4)) % 4));
    const bytes = Uint8Array.from(binary, (ch) => ch.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch (_) {
    return null;
  }
}

function showSettings(show) {
  $("settings").hidden = !show;
  $("settings-toggle").setAttribute("aria-expanded", String(show));
}

// -- formatting -------------------------------------------------------------------------

function ago(ms) {
  if (ms == null) return "a while ago";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

function initials(user) {
  const parts = user.split(/[\s._@-]+/).filter(Boolean);
  const s = parts.length > 1 ? parts[0][0] + parts[1][0] : user.slice(0, 2);
  return s.toUpperCase();
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function fmt(n, digits = 1) {
  return typeof n === "number" && Number.isFinite(n) ? n.toFixed(digits) : "–";
}

function setMsg(id, text, warn = false) {
  const m = $(id);
  m.textContent = text || "";
  m.classList.toggle("warn", Boolean(warn));
}

// -- team board -------------------------------------------------------------------------

function renderTeam() {
  const list = $("team-list");
  const view = state.team;
  if (!view) {
    list.replaceChildren();
    $("team-counts").textContent = "";
    return;
  }
  const me = state.claims && state.claims.sub;
  const rows = Object.entries(view).sort(
    ([ua, a], [ub, b]) => STATUS_ORDER[a.status] - STATUS_ORDER[b.status] || ua.localeCompare(ub),
  );
  const counts = { online: 0, away: 0, busy: 0, offline: 0 };
  const items = rows.map(([user, info]) => {
    counts[info.status] = (counts[info.status] || 0) + 1;
    let detail;
    if (info.status === "offline") {
      detail = `left · last seen ${ago(info.last_seen)}`;
    } else {
      const devices = [...new Set(info.metas.map((m) => m.device))].join(", ");
      const note = info.metas.map((m) => m.note).filter(Boolean).pop() || "";
      detail = note ? `${devices} · ${note}` : devices;
    }
    return el(
      "li",
      { class: `member st-${info.status}`, "data-user": user, "data-status": info.status },
      el("span", { class: "avatar", "aria-hidden": "true", text: initials(user) }),
      el(
        "div",
        { class: "who" },
        el("div", { class: "name", text: user === me ? `${user} (you)` : user }),
        el("div", { class: "detail", text: detail }),
      ),
      el("span", { class: `badge ${info.status}`, text: info.status }),
    );
  });
  list.replaceChildren(...items);
  const parts = ["online", "busy", "away"].filter((s) => counts[s]).map((s) => `${counts[s]} ${s}`);
  $("team-counts").textContent = parts.join(" · ") || "nobody online";
  setMsg("team-msg", rows.length ? "" : "Nobody here yet.");
}

function renderMe() {
  for (const b of document.querySelectorAll("#me [data-status]")) {
    b.setAttribute("aria-pressed", String(b.dataset.status === state.myStatus));
  }
  const reason = state.client ? state.client.autoAwayReason : null;
  $("me").dataset.auto = reason || "";
  $("me-auto").textContent = reason && state.myStatus !== "away" ? AUTO_TEXT[reason] : "";
}

/** Auto-away options from the settings, or false when turned off. */
function autoAwayOptions(cfg) {
  if (cfg.autoaway === "0" || cfg.autoaway === "false") return false;
  const idle = Number(cfg.idle);
  return { idle: Number.isFinite(idle) && idle >= 0 ? idle * 1000 : IDLE_DEFAULT_S * 1000 };
}

async function setMyMeta(patch) {
  if (!state.client || !state.cfg.team) return;
  try {
    await state.client.update(patch);
  } catch (err) {
    setMsg("team-msg", `Could not update: ${err.message}`, true);
  }
}

// -- churn view -------------------------------------------------------------------------

function churnItem(r) {
  const li = el("li", { "data-supplier": r.supplier });
  const btn = el("button", { type: "button", class: "rec", "aria-expanded": "false" });
  li.append(btn);
  btn.addEventListener("click", () => {
    const sup = li.dataset.supplier;
    if (state.expanded.has(sup)) state.expanded.delete(sup);
    else state.expanded.add(sup);
    fillChurnItem(li, li._record);
  });
  return li;
}

/** The bar's fill, sized through the CSSOM: the page's policy refuses style="" attributes. */
function barFill(r) {
  const fill = el("span", { class: `b-${r.band}` });
  fill.style.width = `${Math.round(r.score * 100)}%`;
  return fill;
}

function fillChurnItem(li, r) {
  li._record = r;
  const open = state.expanded.has(r.supplier);
  const btn = li.firstChild;
  btn.setAttribute("aria-expanded", String(open));
  const moved = r.prev_band && r.prev_band !== r.band ? ` · was ${r.prev_band}` : "";
  btn.replaceChildren(
    el("span", { class: "sup", text: r.supplier }),
    el("span", {}, el("span", { class: `band b-${r.band}`, text: r.band }), " ",
      el("span", { class: "score", text: r.score.toFixed(2) })),
    el("span", { class: "bar", "aria-hidden": "true" },
      barFill(r)),
    el("span", { class: "sub", text: `model ${r.model} · ${ago(r.at)}${moved}` }),
  );
  const old = li.querySelector(".factors");
  if (old) old.remove();
  if (open) {
    const dl = el("dl", { class: "factors" });
    const entries = Object.entries(r.factors || {}).sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]));
    if (!entries.length) dl.append(el("dt", { text: "no factors" }), el("dd", { text: "" }));
    for (const [k, v] of entries) dl.append(el("dt", { text: k }), el("dd", { text: fmt(v, 2) }));
    li.append(dl);
  }
}

function renderChurn(changed = []) {
  const list = $("churn-list");
  const byKey = new Map([...list.children].map((li) => [li.dataset.supplier, li]));
  const before = new Map();
  if (!reduceMotion) for (const [k, li] of byKey) before.set(k, li.getBoundingClientRect().top);
  const items = state.churn.map((r) => {
    const li = byKey.get(r.supplier) || churnItem(r);
    fillChurnItem(li, r);
    return li;
  });
  list.replaceChildren(...items);
  const changedSet = new Set(changed.map((r) => r.supplier));
  for (const li of items) {
    // FLIP: slide rows from where they were to where they are now.
    const top0 = before.get(li.dataset.supplier);
    if (top0 !== undefined) {
      const dy = top0 - li.getBoundingClientRect().top;
      if (dy) {
        li.animate([{ transform: `translateY(${dy}px)` }, { transform: "none" }], { duration: 300, easing: "ease-out" });
      }
    }
    if (changedSet.has(li.dataset.supplier)) {
      li.classList.add("flash");
      setTimeout(() => li.classList.remove("flash"), 900);
    }
  }
  const counts = {};
  for (const r of state.churn) counts[r.band] = (counts[r.band] || 0) + 1;
  $("churn-counts").textContent = ["critical", "high", "medium", "low"]
    .filter((b) => counts[b]).map((b) => `${counts[b]} ${b}`).join(" · ");
  if (state.cfg.org) setMsg("churn-msg", state.churn.length ? "" : "No scores for this org yet.");
}

// -- node panel -------------------------------------------------------------------------

async function adminGet(path, signal) {
  const res = await fetch(state.cfg.admin + path, {
    headers: { Authorization: `Bearer ${state.cfg.token}` },
    signal,
    cache: "no-store",
  });
  let body = null;
  try {
    body = await res.json();
  } catch (_) {
    /* not JSON */
  }
  return { res, body };
}

function stat(label, value) {
  return el("div", {}, el("dt", { text: label }), el("dd", { text: value }));
}

function renderStats(s) {
  const p = s.propagation_seconds || {};
  const mb = typeof s.rss_bytes === "number" ? `${(s.rss_bytes / 1048576).toFixed(0)} MB` : "–";
  const backend = s.backend ? `${s.backend.type || "?"} ${s.backend.healthy ? "ok" : "DOWN"}` : "–";
  $("node-name").textContent = s.node || "";
  $("node-stats").replaceChildren(
    stat("Connections", String(s.connections ?? "–")),
    stat("Channels", String(s.channels ?? "–")),
    stat("Frames in /s", fmt(s.frames_in_per_second)),
    stat("Frames out /s", fmt(s.frames_out_per_second)),
    stat("Propagation p95", p.p95 == null ? "–" : `${(p.p95 * 1000).toFixed(0)} ms`),
    stat("Loop lag", s.event_loop_lag_seconds == null ? "–" : `${(s.event_loop_lag_seconds * 1000).toFixed(0)} ms`),
    stat("Memory", mb),
    stat("Backend", s.draining ? `${backend} · draining` : backend),
  );
}

function renderScaling(body) {
  const box = $("node-scaling");
  const cur = body && body.current;
  if (!cur) {
    box.replaceChildren(el("p", { class: "muted", text: "Autoscaler: no decision yet." }));
    return;
  }
  const hist = (body.history || []).slice(-5).reverse()
    .map((d) => el("li", { text: `${d.at}: ${d.desired} replicas (${d.reason})` }));
  box.replaceChildren(
    el("div", { class: "muted", text: "Autoscaler decision" }),
    el("div", { class: "decision", text: `${cur.desired} replicas · ${cur.reason}` }),
    hist.length ? el("ol", {}, ...hist) : null,
  );
}

async function pollNode() {
  clearTimeout(state.nodeTimer);
  if (!state.cfg.admin) {
    setMsg("node-msg", "Set the admin API URL (and use an admin token) to see node figures.");
    return;
  }
  if (state.claims && state.claims.role !== "admin") {
    setMsg("node-msg", `The node panel needs an admin token; this one has the role "${state.claims.role}".`, true);
    return;
  }
  state.nodeAbort = new AbortController();
  const timeout = setTimeout(() => state.nodeAbort.abort(), 5000);
  let next = NODE_POLL_MS;
  try {
    const stats = await adminGet("/admin/stats", state.nodeAbort.signal);
    if (stats.res.status === 401 || stats.res.status === 403) {
      const why = stats.body && stats.body.message ? ` (${stats.body.message})` : "";
      setMsg("node-msg", `The admin API refused this token${why}. The node panel needs an admin token.`, true);
      return; // polling again cannot help without a new token
    }
    if (stats.res.status === 429) {
      next = 1000 * Number(stats.res.headers.get("Retry-After") || 30);
      setMsg("node-msg", `Rate limited by the admin API; retrying in ${Math.round(next / 1000)} s.`, true);
    } else if (!stats.res.ok) {
      setMsg("node-msg", `The admin API answered ${stats.res.status}.`, true);
    } else {
      renderStats(stats.body || {});
      const scaling = await adminGet("/admin/scaling", state.nodeAbort.signal);
      if (scaling.res.ok) renderScaling(scaling.body);
      setMsg("node-msg", "");
      $("node-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    }
  } catch (err) {
    setMsg("node-msg", `The admin API at ${state.cfg.admin} is unreachable (${err.name === "AbortError" ? "timeout" : "network or CORS error"}).`, true);
  } finally {
    clearTimeout(timeout);
  }
  state.nodeTimer = setTimeout(pollNode, next);
}

// -- connection -------------------------------------------------------------------------

const STATUS_TEXT = { idle: "not connected", connecting: "connecting…", connected: "live", reconnecting: "reconnecting…", closed: "disconnected" };

function onStatus(status, info) {
  const pill = $("conn");
  pill.dataset.state = status;
  pill.textContent = STATUS_TEXT[status] || status;
  pill.dataset.resumed = status === "connected" && info && info.resumed ? "true" : "false";
  if (status === "closed" && info && info.code === 4001) {
    pill.textContent = info.reason === "token expired" ? "token expired" : "token refused";
    showSettings(true);
  }
}

/** The token for a refresh: from the provider set on window.presenceDashboard, if any. */
async function provideToken() {
  const provider = window.presenceDashboard && window.presenceDashboard.tokenProvider;
  if (typeof provider !== "function") return null;
  const token = await provider();
  if (token) useToken(token);
  return token || null;
}

/** Keep a new token for the page (form, admin API calls, claims shown). */
function useToken(token) {
  state.cfg = { ...state.cfg, token };
  state.claims = decodeClaims(token);
  $("f-token").value = token;
}

/** A new `#token=` in the fragment, nothing else changed: refresh in place. */
async function onHashChange() {
  const cfg = readFragment();
  const cur = { ...defaults(), ...state.cfg };
  const others = ["ws", "admin", "team", "org", "idle", "autoaway", "format"];
  if (!cfg.token || cfg.token === cur.token || others.some((k) => cfg[k] !== cur[k])) return;
  useToken(cfg.token);
  const client = state.client;
  if (!client || client.status === "closed" || client.status === "idle") {
    start(state.cfg);
    return;
  }
  try {
    await client.refresh(cfg.token);
  } catch (err) {
    if (err.code === "disconnected") client.setToken(cfg.token); // the next hello uses it
    else setMsg("team-msg", `The new token was refused: ${err.message}`, true);
  }
}

async function start(cfg) {
  if (state.client) state.client.close();
  clearTimeout(state.nodeTimer);
  if (state.nodeAbort) state.nodeAbort.abort();
  state.cfg = cfg;
  state.claims = decodeClaims(cfg.token);
  state.team = null;
  state.churn = [];
  $("team-list").replaceChildren();
  $("churn-list").replaceChildren();
  $("team-name").textContent = cfg.team;
  $("org-name").textContent = cfg.org;
  $("whoami").textContent = state.claims
    ? `Signed in as ${state.claims.sub} (role ${state.claims.role || "member"})` : "";
  $("me").hidden = !cfg.team;
  setMsg("team-msg", cfg.team ? "Joining…" : "Set a team channel to see the team.");
  setMsg("churn-msg", cfg.org ? "Joining…" : "Set an org to watch its churn-risk scores.");
  if (!cfg.token || !cfg.ws) {
    showSettings(true);
    onStatus("idle");
    pollNode();
    return;
  }
  const client = new PresenceClient({
    url: cfg.ws, token: cfg.token, format: cfg.format === "msgpack" ? "msgpack" : "json",
    autoAway: autoAwayOptions(cfg),
    getToken: provideToken,
  });
  state.client = client;
  client.on("status", onStatus);
  client.on("autoaway", renderMe);
  client.on("error", (err) => setMsg("team-msg", err.message, true));
  const churnCh = cfg.org ? `churn:${cfg.org}` : null;
  if (cfg.team) {
    client.on("presence", cfg.team, (view) => {
      state.team = view;
      renderTeam();
    });
  }
  if (churnCh) {
    client.on("churn", churnCh, (records, _ch, changed) => {
      state.churn = records;
      renderChurn(changed || []);
    });
  }
  try {
    await client.connect();
  } catch (err) {
    setMsg("team-msg", `Could not connect: ${err.message}`, true);
    showSettings(true);
    pollNode();
    return;
  }
  showSettings(false);
  if (cfg.team) {
    const device = window.matchMedia("(pointer: coarse)").matches ? "mobile" : "web";
    client.join(cfg.team, { status: state.myStatus, device }).catch((err) => {
      setMsg("team-msg", `Cannot join ${cfg.team}: ${err.message}`, true);
      $("me").hidden = true;
    });
  }
  if (churnCh) {
    client.join(churnCh).catch((err) => {
      const hint = err.code === "forbidden" ? " (churn needs a csm, admin or service token)" : "";
      setMsg("churn-msg", `Cannot watch ${churnCh}: ${err.message}${hint}`, true);
    });
  }
  pollNode(); // after connecting, so that the first figures count this connection
}

// -- wiring -----------------------------------------------------------------------------

function selectTab(name) {
  for (const b of document.querySelectorAll(".tabs [data-tab]")) {
    b.setAttribute("aria-selected", String(b.dataset.tab === name));
  }
  for (const p of document.querySelectorAll(".panel")) {
    p.dataset.hidden = String(p.dataset.panel !== name);
  }
}

function init() {
  const cfg = readFragment();
  fillForm(cfg);
  selectTab("team");
  for (const b of document.querySelectorAll(".tabs [data-tab]")) {
    b.addEventListener("click", () => selectTab(b.dataset.tab));
  }
  $("settings-toggle").addEventListener("click", () => showSettings($("settings").hidden));
  $("settings").addEventListener("submit", (ev) => {
    ev.preventDefault();
    start(readForm());
  });
  for (const b of document.querySelectorAll("#me [data-status]")) {
    b.addEventListener("click", () => {
      state.myStatus = b.dataset.status;
      renderMe();
      setMyMeta({ status: state.myStatus });
    });
  }
  $("my-note").addEventListener("change", (ev) => setMyMeta({ note: ev.target.value.slice(0, 128) }));
  window.addEventListener("hashchange", () => {
    onHashChange();
  });
  renderMe();
  // Relative times ("3 min ago") age: refresh them now and then.
  setInterval(() => {
    if (state.team) renderTeam();
  }, 30000);
  start(cfg);
}

// Exposed for debugging in the console and for tests.
// `tokenProvider` (async () => jwt) may be set by a host page or an extension that can
// get fresh tokens; the client calls it before the token expires.
window.presenceDashboard = { state, overallStatus, tokenProvider: null };
init();
