// Presence browser client: an ES module with no dependencies (PROTOCOL.md, version 1).
//
//   import { PresenceClient } from "/client.js";
//   const c = new PresenceClient({ url: "ws://host:8765/ws", token });
//   c.on("presence", "team:w1", (state) => render(state));
//   await c.connect();
//   await c.join("team:w1", { status: "online", device: "web" });
//
// The full API is documented in docs/client.md. Only the JSON subprotocol is spoken.

const SUBPROTOCOL = "presence.v1.json";
const STATUS_RANK = { busy: 3, online: 2, away: 1 };
// Close codes after which reconnecting with the same token cannot help.
const FATAL_CODES = new Set([4001, 4000, 1008, 1009]);
const RESTART = 1012; // server draining: reconnect after a random delay
const OVERLOADED = 1013; // try again later

/** An `error` reply, or a request that could not complete. */
export class PresenceError extends Error {
  constructor(code, message, retryAfter = null) {
    super(message);
    this.name = "PresenceError";
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/** Overall status of a user from their metas: busy > online > away. */
export function overallStatus(metas) {
  let best = null;
  for (const m of metas) {
    if (best === null || (STATUS_RANK[m.status] || 0) > (STATUS_RANK[best] || 0)) best = m.status;
  }
  return best === null ? "offline" : best;
}

/** Highest score first, ties by supplier id (the server's snapshot order). */
export function churnOrder(a, b) {
  return b.score - a.score || (a.supplier < b.supplier ? -1 : a.supplier > b.supplier ? 1 : 0);
}

/**
 * The mirror of one presence channel: user -> conn -> meta, plus the users seen leaving.
 * Same rules as presence/state.py: a leave removes a conn, a join keeps the meta with
 * the highest seq for its conn; leaves of a diff are applied before its joins.
 */
export class ChannelMirror {
  constructor(ch) {
    this.ch = ch;
    this.users = new Map(); // user -> Map(conn -> meta)
    this.departed = new Map(); // user -> last_seen (ms) or null when unknown
  }

  /** Replace the state with a `joined` snapshot ({user: [meta, ...]}). */
  applySnapshot(presence) {
    const before = new Set(this.users.keys());
    this.users = new Map();
    for (const [user, metas] of Object.entries(presence || {})) {
      for (const m of metas) this._merge(user, m);
    }
    for (const user of before) {
      // Left while we were not listening: the time is unknown.
      if (!this.users.has(user) && !this.departed.has(user)) this.departed.set(user, null);
    }
    for (const user of this.users.keys()) this.departed.delete(user);
  }

  /** Apply a `diff` frame's leaves, then its joins. */
  applyDiff(diff) {
    for (const [user, entries] of Object.entries(diff.leaves || {})) {
      const conns = this.users.get(user);
      for (const e of entries) {
        if (conns) conns.delete(e.conn);
        if (!conns || conns.size === 0) {
          this.users.delete(user);
          const prev = this.departed.get(user);
          const seen = e.last_seen ?? null;
          this.departed.set(user, prev == null || (seen != null && seen > prev) ? seen : prev);
        }
      }
    }
    for (const [user, metas] of Object.entries(diff.joins || {})) {
      for (const m of metas) this._merge(user, m);
      this.departed.delete(user);
    }
  }

  _merge(user, meta) {
    let conns = this.users.get(user);
    if (!conns) {
      conns = new Map();
      this.users.set(user, conns);
    }
    const cur = conns.get(meta.conn);
    if (!cur || cur.seq < meta.seq) conns.set(meta.conn, meta);
  }

  /** Metas of a user, ordered by conn. */
  metas(user) {
    const conns = this.users.get(user);
    if (!conns) return [];
    return [...conns.values()].sort((a, b) => (a.conn < b.conn ? -1 : a.conn > b.conn ? 1 : 0));
  }

  status(user) {
    return overallStatus(this.metas(user));
  }

  /**
   * A plain view: {user: {status, metas, last_seen}}; users seen leaving appear with
   * status "offline", no metas and their last_seen (null when unknown).
   */
  view() {
    const out = {};
    for (const [user, seen] of this.departed) out[user] = { status: "offline", metas: [], last_seen: seen };
    for (const user of this.users.keys()) {
      const metas = this.metas(user);
      out[user] = { status: overallStatus(metas), metas, last_seen: null };
    }
    return out;
  }
}

/** The latest record per supplier of one churn channel. */
export class ChurnMirror {
  constructor(ch) {
    this.ch = ch;
    this.records = new Map(); // supplier -> record
  }

  applySnapshot(records) {
    this.records = new Map();
    for (const r of records || []) this.records.set(r.supplier, r);
  }

  applyRecords(records) {
    for (const r of records || []) {
      const cur = this.records.get(r.supplier);
      if (!cur || cur.at <= r.at) this.records.set(r.supplier, r);
    }
  }

  /** Records, highest score first. */
  sorted() {
    return [...this.records.values()].sort(churnOrder);
  }
}

export class PresenceClient {
  /**
   * @param {object} opts
   * @param {string} opts.url            ws(s)://host:port/ws
   * @param {string} opts.token          the JWT
   * @param {string} [opts.format]       "json" (the only one spoken here)
   * @param {boolean} [opts.reconnect]   reconnect after a lost connection (default true)
   * @param {number} [opts.backoffInitial] first reconnect delay bound, ms (default 500)
   * @param {number} [opts.backoffMax]   largest reconnect delay bound, ms (default 30000)
   * @param {number} [opts.restartJitter] delay bound after a 1012 close, ms (default 5000)
   * @param {number} [opts.overloadedDelay] least delay after a 1013 close, ms (default 10000)
   * @param {number} [opts.requestTimeout] ms before a request's promise rejects (default 10000)
   * @param {Function} [opts.WebSocket]  WebSocket constructor (default: the global one)
   */
  constructor(opts) {
    const o = opts || {};
    if (!o.url) throw new TypeError("PresenceClient needs a url");
    if ((o.format || "json") !== "json") throw new TypeError("only the json format is supported");
    this.url = o.url;
    this.token = o.token || "";
    this.format = "json";
    this.reconnect = o.reconnect !== false;
    this.backoffInitial = o.backoffInitial ?? 500;
    this.backoffMax = o.backoffMax ?? 30000;
    this.restartJitter = o.restartJitter ?? 5000;
    this.overloadedDelay = o.overloadedDelay ?? 10000;
    this.requestTimeout = o.requestTimeout ?? 10000;
    this._WS = o.WebSocket || globalThis.WebSocket;
    this.status = "idle"; // idle | connecting | connected | reconnecting | closed
    this.welcome = null;
    this.lastClose = null; // {code, reason} of the last close
    this.mirrors = new Map(); // presence channel -> ChannelMirror
    this.churn = new Map(); // churn channel -> ChurnMirror
    this._channels = new Map(); // channel -> {meta, joined}
    this._handlers = new Map(); // event -> Set({ch, fn})
    this._pending = new Map(); // ref -> {resolve, reject, timer}
    this._ref = 0;
    this._ws = null;
    this._attempt = 0;
    this._timer = null;
    this._pingTimer = null;
    this._readyWaiters = [];
    this._stopped = false;
    this._onOnline = () => {
      if (this.status === "reconnecting") this._reconnectNow();
    };
    if (globalThis.addEventListener) globalThis.addEventListener("online", this._onOnline);
  }

  // -- events ---------------------------------------------------------------------------

  /**
   * Subscribe to an event; returns a function that unsubscribes.
   *   on("presence", ch?, (view, ch, change) => ...)  change: the diff, or {snapshot: true}
   *   on("churn", ch?, (records, ch, changed) => ...)   changed: null for a snapshot
   *   on("status", (status, info) => ...)
   *   on("welcome", (welcome) => ...)  on("error", (err) => ...)
   */
  on(event, chOrFn, maybeFn) {
    const ch = typeof chOrFn === "function" ? null : chOrFn;
    const fn = typeof chOrFn === "function" ? chOrFn : maybeFn;
    if (typeof fn !== "function") throw new TypeError("on() needs a handler");
    const entry = { ch, fn };
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(entry);
    return () => this._handlers.get(event).delete(entry);
  }

  _emit(event, ch, ...args) {
    for (const { ch: want, fn } of this._handlers.get(event) || []) {
      if (want !== null && want !== ch) continue;
      try {
        fn(...args);
      } catch (err) {
        // A failing handler must not break the client; report it asynchronously.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }

  _setStatus(status, info = {}) {
    if (this.status === status) return;
    this.status = status;
    this._emit("status", null, status, info);
  }

  // -- connection -----------------------------------------------------------------------

  /** Open the connection; resolves with the welcome frame (rejects on a fatal close). */
  connect() {
    this._stopped = false;
    if (this.status === "connected") return Promise.resolve(this.welcome);
    const ready = this._waitReady(this.requestTimeout * 2, true);
    if (!this._ws) this._open(this.status === "idle" || this.status === "closed" ? "connecting" : this.status);
    return ready;
  }

  /** Replace the token; after a fatal close (4001, ...) this reconnects with it. */
  setToken(token) {
    this.token = token;
    if (this.status === "closed" && !this._stopped) {
      this._attempt = 0;
      this._open("connecting");
    }
  }

  /** Close for good (no reconnect). Channels are forgotten. */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    this._stopPing();
    if (globalThis.removeEventListener) globalThis.removeEventListener("online", this._onOnline);
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
      try {
        ws.close(1000, "client closed");
      } catch (_) {
        /* already closed */
      }
    }
    this._failPending(new PresenceError("closed", "the client was closed"));
    this._channels.clear();
    this._failReady(new PresenceError("closed", "the client was closed"));
    this._setStatus("closed", { code: 1000, reason: "client closed" });
  }

  _open(status) {
    clearTimeout(this._timer);
    this._setStatus(status);
    let ws;
    try {
      ws = new this._WS(this.url, [SUBPROTOCOL]);
    } catch (err) {
      this._fatal({ code: 0, reason: String(err) });
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._send({ t: "hello", token: this.token });
    ws.onmessage = (ev) => this._onMessage(ev.data);
    ws.onerror = () => {}; // followed by onclose, which decides
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._stopPing();
    this.lastClose = { code, reason };
    this._failPending(new PresenceError("disconnected", `connection closed (${code})`));
    if (this._stopped) return;
    if (FATAL_CODES.has(code) || !this.reconnect) {
      this._fatal({ code, reason });
      return;
    }
    this._schedule(this._delayFor(code, reason), { code, reason });
  }

  _fatal(info) {
    this._failReady(new PresenceError(info.code === 4001 ? "unauthorized" : "closed",
      `connection closed (${info.code}${info.reason ? ": " + info.reason : ""})`));
    this._setStatus("closed", info);
  }

  /**
   * Reconnect delay in ms for a close: after 1012 the server's own jittered hint
   * ("reconnect in 2.5s") or a random delay; otherwise full jitter over an exponential
   * bound, at least `overloadedDelay`-ish after 1013.
   */
  _delayFor(code, reason = "") {
    if (code === RESTART) {
      const hint = /reconnect in ([0-9.]+) ?s/.exec(reason || "");
      const seconds = hint ? Number(hint[1]) : NaN;
      return Number.isFinite(seconds) ? seconds * 1000 : Math.random() * this.restartJitter;
    }
    const bound = Math.min(this.backoffMax, this.backoffInitial * 2 ** this._attempt);
    this._attempt += 1;
    const delay = Math.random() * bound;
    return code === OVERLOADED ? Math.max(this.overloadedDelay * (0.5 + Math.random()), delay) : delay;
  }

  _schedule(delay, info) {
    this._setStatus("reconnecting", { ...info, delay });
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._open("reconnecting"), delay);
  }

  _reconnectNow() {
    clearTimeout(this._timer);
    if (!this._ws && !this._stopped) this._open("reconnecting");
  }

  _send(frame) {
    if (!this._ws || this._ws.readyState !== 1) throw new PresenceError("disconnected", "not connected");
    this._ws.send(JSON.stringify(frame));
  }

  _onMessage(data) {
    let f;
    try {
      f = JSON.parse(data);
    } catch (_) {
      return;
    }
    if (!f || typeof f.t !== "string") return;
    switch (f.t) {
      case "welcome":
        this._onWelcome(f);
        return;
      case "diff":
        this._onDiff(f);
        return;
      case "churn":
        this._onChurn(f);
        return;
      default:
        break;
    }
    if (typeof f.ref === "number" && this._pending.has(f.ref)) {
      const p = this._pending.get(f.ref);
      this._pending.delete(f.ref);
      clearTimeout(p.timer);
      if (f.t === "error") p.reject(new PresenceError(f.code, f.message, f.retry_after ?? null));
      else p.resolve(f);
    } else if (f.t === "error") {
      this._emit("error", null, new PresenceError(f.code, f.message, f.retry_after ?? null));
    }
  }

  _onWelcome(f) {
    this.welcome = f;
    this._attempt = 0;
    this._setStatus("connected", { welcome: f });
    this._emit("welcome", null, f);
    this._startPing((f.ping_interval || 20) * 1000);
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    for (const w of waiters) w.resolve(f);
    this._rejoin();
  }

  async _rejoin() {
    for (const [ch, entry] of this._channels) {
      if (!entry.joined) continue;
      try {
        await this._joinNow(ch, entry.meta);
      } catch (err) {
        if (err.code === "disconnected") return; // the next welcome retries
        this._channels.delete(ch);
        this.mirrors.delete(ch);
        this.churn.delete(ch);
        this._emit("error", ch, err);
      }
    }
  }

  _startPing(interval) {
    this._stopPing();
    // A ping request detects a dead link (mobile networks) sooner than TCP would.
    this._pingTimer = setInterval(() => {
      this.ping().catch((err) => {
        if (err.code === "timeout" && this._ws) this._ws.close(4100, "ping timeout");
      });
    }, interval);
  }

  _stopPing() {
    clearInterval(this._pingTimer);
    this._pingTimer = null;
  }

  _waitReady(timeout, connecting = false) {
    if (this.status === "connected") return Promise.resolve(this.welcome);
    if (this.status === "closed" && !connecting) {
      return Promise.reject(new PresenceError("closed", "the client is closed"));
    }
    return new Promise((resolve, reject) => {
      const w = { resolve, reject };
      w.timer = setTimeout(() => {
        this._readyWaiters = this._readyWaiters.filter((x) => x !== w);
        reject(new PresenceError("timeout", "not connected in time"));
      }, timeout);
      const done = (fn) => (v) => {
        clearTimeout(w.timer);
        fn(v);
      };
      w.resolve = done(resolve);
      w.reject = done(reject);
      this._readyWaiters.push(w);
    });
  }

  _failReady(err) {
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    for (const w of waiters) w.reject(err);
  }

  _failPending(err) {
    const pending = this._pending;
    this._pending = new Map();
    for (const p of pending.values()) {
      clearTimeout(p.timer);
      p.reject(err);
    }
  }

  // -- requests -------------------------------------------------------------------------

  /**
   * Send a request frame with a fresh ref; resolves with the reply frame, rejects with
   * a PresenceError (the server's `error` reply, "timeout" or "disconnected"). Waits for
   * the connection when it is being (re)established.
   */
  async request(frame, { timeout = this.requestTimeout } = {}) {
    const deadline = Date.now() + timeout;
    await this._waitReady(timeout);
    const ref = ++this._ref;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(ref);
        reject(new PresenceError("timeout", `no reply to ${frame.t} in ${timeout} ms`));
      }, Math.max(0, deadline - Date.now()));
      this._pending.set(ref, { resolve, reject, timer });
      try {
        this._send({ ...frame, ref });
      } catch (err) {
        this._pending.delete(ref);
        clearTimeout(timer);
        reject(err);
      }
    });
  }

  /** Join a channel; kept joined (and rejoined after reconnects) until leave(). */
  async join(ch, meta = undefined) {
    const entry = this._channels.get(ch) || { meta, joined: false };
    if (meta !== undefined) entry.meta = meta;
    this._channels.set(ch, entry);
    try {
      const reply = await this._joinNow(ch, entry.meta);
      entry.joined = true;
      return reply;
    } catch (err) {
      if (!entry.joined) this._channels.delete(ch);
      throw err;
    }
  }

  async _joinNow(ch, meta) {
    const frame = { t: "join", ch };
    if (meta) frame.meta = meta;
    const reply = await this.request(frame);
    if (Array.isArray(reply.churn)) {
      const m = this.churn.get(ch) || new ChurnMirror(ch);
      m.applySnapshot(reply.churn);
      this.churn.set(ch, m);
      this._emit("churn", ch, m.sorted(), ch, null);
    } else {
      const m = this.mirrors.get(ch) || new ChannelMirror(ch);
      m.applySnapshot(reply.presence);
      this.mirrors.set(ch, m);
      this._emit("presence", ch, m.view(), ch, { snapshot: true });
    }
    return reply;
  }

  async leave(ch) {
    this._channels.delete(ch);
    try {
      return await this.request({ t: "leave", ch });
    } finally {
      this.mirrors.delete(ch);
      this.churn.delete(ch);
    }
  }

  /** Change this connection's meta in every joined presence channel. */
  async update(meta) {
    const reply = await this.request({ t: "update", meta });
    for (const [ch, entry] of this._channels) {
      if (!ch.startsWith("churn:")) entry.meta = { ...(entry.meta || {}), ...meta };
    }
    return reply;
  }

  /** Presence of users anywhere (role csm/admin/service); resolves with `result.users`. */
  async query(users) {
    return (await this.request({ t: "query", users })).users;
  }

  /** Round trip; resolves with the pong frame. */
  ping() {
    return this.request({ t: "ping" });
  }

  /** The view of a presence channel ({user: {status, metas, last_seen}}), or null. */
  presence(ch) {
    const m = this.mirrors.get(ch);
    return m ? m.view() : null;
  }

  /** The churn records of a churn channel, highest score first ([] when not joined). */
  churnRecords(ch) {
    const m = this.churn.get(ch);
    return m ? m.sorted() : [];
  }

  _onDiff(f) {
    const m = this.mirrors.get(f.ch);
    if (!m) return;
    m.applyDiff(f);
    this._emit("presence", f.ch, m.view(), f.ch, f);
  }

  _onChurn(f) {
    const m = this.churn.get(f.ch);
    if (!m) return;
    m.applyRecords(f.records);
    this._emit("churn", f.ch, m.sorted(), f.ch, f.records);
  }
}

export default PresenceClient;
