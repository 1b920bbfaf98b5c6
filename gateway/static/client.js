// Presence browser client: an ES module with no dependencies (PROTOCOL.md, version 1).
//
//   import { PresenceClient } from "/client.js";
//   const c = new PresenceClient({ url: "ws://host:8765/ws", token });
//   c.on("presence", "team:w1", (state) => render(state));
//   await c.connect();
//   await c.join("team:w1", { status: "online", device: "web" });
//
// The full API is documented in docs/client.md. JSON is the default wire format;
// `format: "msgpack"` speaks presence.v1.msgpack through the vendored @msgpack/msgpack
// build (gateway/static/msgpack.min.js, see config/dev/fetch-vendor.sh).

const SUBPROTOCOL_JSON = "presence.v1.json";
const SUBPROTOCOL_MSGPACK = "presence.v1.msgpack";
const FORMATS = new Set(["json", "msgpack"]);
// Where the vendored msgpack build is served by the gateway (flat /static/<name>).
const MSGPACK_PATH = "/static/msgpack.min.js";
// Input that shows someone is at the page (capture phase: nothing can swallow it).
const ACTIVITY_EVENTS = ["pointerdown", "pointermove", "keydown", "wheel", "touchstart", "scroll"];
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

let msgpackLoading = null;

/**
 * The msgpack codec ({encode, decode}): the vendored @msgpack/msgpack browser build,
 * which defines `window.MessagePack` when run as a classic script. Loaded once, on first
 * use, by adding a <script> element (allowed by a `script-src 'self'` policy); resolves at
 * once when `MessagePack` is already defined (a page may include the script itself).
 */
export function loadMsgpack(src = new URL(MSGPACK_PATH, import.meta.url).href) {
  if (globalThis.MessagePack) return Promise.resolve(globalThis.MessagePack);
  if (!msgpackLoading) {
    msgpackLoading = new Promise((resolve, reject) => {
      if (typeof document === "undefined") {
        reject(new PresenceError("codec", "no document to load msgpack into; pass opts.codec"));
        return;
      }
      const script = document.createElement("script");
      script.src = src;
      script.onload = () => {
        if (globalThis.MessagePack) resolve(globalThis.MessagePack);
        else reject(new PresenceError("codec", `${src} did not define MessagePack`));
      };
      script.onerror = () => reject(new PresenceError("codec", `could not load ${src}`));
      document.head.append(script);
    }).catch((err) => {
      msgpackLoading = null; // a later connect may try again
      throw err;
    });
  }
  return msgpackLoading;
}

/**
 * Watches a page for absence: calls `onAway(reason)` when the page is hidden
 * (Page Visibility API; reason "hidden") or after `idle` ms without input (reason
 * "idle"), and `onBack()` on the first input or when the page is visible again. Each
 * transition is reported once: no onAway while away, no onBack while present.
 */
export class AutoAway {
  /**
   * @param {object} opts
   * @param {number} [opts.idle]    ms without input before "idle" (default 300000; 0: never)
   * @param {boolean} [opts.hidden] a hidden page is away (default true)
   * @param {Function} opts.onAway  (reason) => void
   * @param {Function} opts.onBack  () => void
   * @param {Document} [opts.document] the page to watch (default: the global document)
   */
  constructor(opts) {
    this.idle = opts.idle ?? 300000;
    this.hidden = opts.hidden !== false;
    this.onAway = opts.onAway;
    this.onBack = opts.onBack;
    this.doc = opts.document || globalThis.document;
    this.away = null; // null (present), "hidden" or "idle"
    this._lastInput = Date.now();
    this._timer = null;
    this._onInput = () => this._activity();
    this._onVisibility = () => {
      if (this.doc.visibilityState === "hidden") {
        if (this.hidden) this._goAway("hidden");
      } else {
        this._activity(); // coming back to the tab is activity
      }
    };
  }

  start() {
    if (!this.doc) return this;
    const win = this.doc.defaultView || globalThis;
    for (const name of ACTIVITY_EVENTS) {
      win.addEventListener(name, this._onInput, { capture: true, passive: true });
    }
    this.doc.addEventListener("visibilitychange", this._onVisibility);
    this._lastInput = Date.now();
    if (this.hidden && this.doc.visibilityState === "hidden") this._goAway("hidden");
    this._arm(this.idle);
    return this;
  }

  stop() {
    clearTimeout(this._timer);
    if (!this.doc) return;
    const win = this.doc.defaultView || globalThis;
    for (const name of ACTIVITY_EVENTS) {
      win.removeEventListener(name, this._onInput, { capture: true });
    }
    this.doc.removeEventListener("visibilitychange", this._onVisibility);
  }

  _activity() {
    this._lastInput = Date.now();
    if (this.away !== null && !(this.away === "hidden" && this.doc.visibilityState === "hidden")) {
      this.away = null;
      this.onBack();
    }
    // One timer that re-arms itself from the last input, rather than one per input
    // event: pointermove fires many times a second.
    if (this._timer === null) this._arm(this.idle);
  }

  _arm(delay) {
    clearTimeout(this._timer);
    this._timer = null;
    if (!(this.idle > 0)) return;
    this._timer = setTimeout(() => {
      this._timer = null;
      const left = this._lastInput + this.idle - Date.now();
      if (left > 0) this._arm(left);
      else this._goAway("idle");
    }, delay);
  }

  _goAway(reason) {
    if (this.away !== null) return;
    this.away = reason;
    this.onAway(reason);
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
   * @param {string} [opts.format]       "json" (default) or "msgpack"
   * @param {object} [opts.codec]        {encode, decode} for msgpack (default: loadMsgpack())
   * @param {boolean|object} [opts.autoAway] set `away` while the page is hidden or idle:
   *                                     true, or {idle: ms, hidden: bool} (default off)
   * @param {boolean} [opts.reconnect]   reconnect after a lost connection (default true)
   * @param {number} [opts.backoffInitial] first reconnect delay bound, ms (default 500)
   * @param {number} [opts.backoffMax]   largest reconnect delay bound, ms (default 30000)
   * @param {number} [opts.restartJitter] delay bound after a 1012 close, ms (default 5000)
   * @param {number} [opts.overloadedDelay] least delay after a 1013 close, ms (default 10000)
   * @param {number} [opts.requestTimeout] ms before a request's promise rejects (default 10000)
   * @param {Function} [opts.getToken]   async () => JWT: called to refresh the token before
   *                                     its exp (and after a 4001); a falsy result means none
   * @param {number} [opts.refreshAt]    fraction of the token's remaining life after which
   *                                     it is refreshed (default 0.8)
   * @param {boolean} [opts.resume]      resume after a lost connection (default true)
   * @param {Function} [opts.WebSocket]  WebSocket constructor (default: the global one)
   */
  constructor(opts) {
    const o = opts || {};
    if (!o.url) throw new TypeError("PresenceClient needs a url");
    const format = o.format || "json";
    if (!FORMATS.has(format)) throw new TypeError(`unknown format ${format} (json or msgpack)`);
    this.url = o.url;
    this.token = o.token || "";
    this.format = format; // asked for; `wire` is what the server agreed to
    this.wire = null;
    this._codec = o.codec || null;
    this.reconnect = o.reconnect !== false;
    this.backoffInitial = o.backoffInitial ?? 500;
    this.backoffMax = o.backoffMax ?? 30000;
    this.restartJitter = o.restartJitter ?? 5000;
    this.overloadedDelay = o.overloadedDelay ?? 10000;
    this.requestTimeout = o.requestTimeout ?? 10000;
    this.getToken = typeof o.getToken === "function" ? o.getToken : null;
    this.refreshAt = o.refreshAt ?? 0.8;
    this.resume = o.resume !== false;
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
    this._chosenStatus = null; // the status the user last set (join meta or update)
    this._autoAway = null;
    // Resume (PROTOCOL.md "Resume"): the token of the last welcome, the conn it resumes,
    // and the channels whose snapshots (joined, ref null) came on this connection.
    this._resumeToken = null;
    this._resumeConn = null;
    this._snapshots = new Set();
    this._onSnapshot = null;
    this._lostInfo = null; // {code, reason} of the close that led to this reconnection
    this._refreshTimer = null;
    this._tokenRetried = false; // one fresh token after a 4001, then give up
    this._needToken = false; // fetch a token with getToken() before the next hello
    this._refreshPoint = null; // ms: when the current token is due for refresh
    this.exp = null; // the token's exp (s), from welcome / refreshed
    this._onOnline = () => {
      if (this.status === "reconnecting") this._reconnectNow();
    };
    if (globalThis.addEventListener) globalThis.addEventListener("online", this._onOnline);
    if (o.autoAway) this.setAutoAway(o.autoAway === true ? {} : o.autoAway);
  }

  // -- events ---------------------------------------------------------------------------

  /**
   * Subscribe to an event; returns a function that unsubscribes.
   *   on("presence", ch?, (view, ch, change) => ...)  change: the diff, {snapshot: true}
   *                                     or {own: true} (this connection's accepted update)
   *   on("churn", ch?, (records, ch, changed) => ...)   changed: null for a snapshot
   *   on("status", (status, info) => ...)
   *   on("welcome", (welcome) => ...)  on("error", (err) => ...)
   *   on("autoaway", (reason) => ...)   reason: "hidden", "idle", or null when back
   *   on("reconnect", (info) => ...)   info: {resumed, code, reason, conn}, once the channels
   *                                     are resumed or rejoined
   *   on("left", (ch) => ...)           the server left a channel (a refresh took it away)
   *   on("refreshed", (exp) => ...)     the token was refreshed; its new exp (s)
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
    clearTimeout(this._refreshTimer);
    this._resumeToken = null;
    this._resumeConn = null;
    this._lostInfo = null;
    this._stopPing();
    if (globalThis.removeEventListener) globalThis.removeEventListener("online", this._onOnline);
    if (this._autoAway) this._autoAway.stop();
    this._autoAway = null;
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
    if (this._needToken) {
      // Past the refresh point (or refused with 4001): a fresh token for this hello.
      this._needToken = false;
      this._fetchToken().then(
        (token) => {
          if (token) this.token = token;
          if (!this._stopped && !this._ws) this._open(status);
        },
        () => {
          if (!this._stopped && !this._ws) this._open(status);
        },
      );
      return;
    }
    if (this.format === "msgpack" && !this._codec) {
      loadMsgpack().then(
        (codec) => {
          this._codec = codec;
          if (!this._stopped && !this._ws) this._open(status);
        },
        (err) => this._fatal({ code: 0, reason: err.message }),
      );
      return;
    }
    let ws;
    try {
      // Offering JSON second lets a server without msgpack still answer; the frames then
      // follow what it selected (ws.protocol), not what was asked for.
      const offer = this.format === "msgpack" ? [SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON] : [SUBPROTOCOL_JSON];
      ws = new this._WS(this.url, offer);
    } catch (err) {
      this._fatal({ code: 0, reason: String(err) });
      return;
    }
    this._ws = ws;
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      this.wire = ws.protocol === SUBPROTOCOL_MSGPACK ? "msgpack" : "json";
      this._snapshots = new Set();
      const hello = { t: "hello", token: this.token };
      if (this._resumeToken) hello.resume = this._resumeToken;
      this._send(hello);
    };
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
    clearTimeout(this._refreshTimer);
    if (code === 4001 && this.getToken && this.reconnect && !this._tokenRetried) {
      // Expired or refused: one more try, at once, if getToken() has another token.
      this._tokenRetried = true;
      this._setStatus("reconnecting", { code, reason, delay: 0 });
      const giveUp = () => {
        if (!this._stopped && !this._ws) this._fatal({ code, reason });
      };
      this._fetchToken().then((token) => {
        if (this._stopped || this._ws) return;
        if (!token || token === this.token) return giveUp();
        this.token = token;
        if (!this._lostInfo) this._lostInfo = { code, reason };
        this._open("reconnecting");
      }, giveUp);
      return;
    }
    if (FATAL_CODES.has(code) || !this.reconnect) {
      this._fatal({ code, reason });
      return;
    }
    if (this._refreshDue()) this._needToken = true;
    if (!this._lostInfo) this._lostInfo = { code, reason };
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
    if (this.wire === "msgpack") {
      // ignoreUndefined: a field set to undefined is left out, as JSON.stringify does.
      this._ws.send(this._codec.encode(frame, { ignoreUndefined: true }));
    } else {
      this._ws.send(JSON.stringify(frame));
    }
  }

  _onMessage(data) {
    let f;
    try {
      f = typeof data === "string" ? JSON.parse(data) : this._codec.decode(new Uint8Array(data));
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
      case "joined":
        if (f.ref == null) {
          this._onResumedSnapshot(f);
          return;
        }
        break;
      case "left":
        if (f.ref == null) {
          this._onServerLeft(f.ch);
          return;
        }
        break;
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
    const resumed = f.resumed === true && this._resumeConn !== null && f.conn === this._resumeConn;
    this.welcome = f;
    this._attempt = 0;
    this._tokenRetried = false;
    this._resumeToken = this.resume && f.resume_ttl !== 0 && typeof f.resume === "string" ? f.resume : null;
    this._resumeConn = this._resumeToken ? f.conn : null;
    this._planRefresh(f.exp);
    this._setStatus("connected", { welcome: f, resumed });
    this._emit("welcome", null, f);
    this._startPing((f.ping_interval || 20) * 1000);
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    for (const w of waiters) w.resolve(f);
    const lost = this._lostInfo;
    this._lostInfo = null;
    const settled = resumed ? this._settleResumed() : this._rejoin();
    if (lost) {
      settled.then(() => {
        if (this.welcome === f) this._emit("reconnect", null, { resumed, conn: f.conn, ...lost });
      });
    }
  }

  /** A snapshot a resume sends (joined, ref null): replace what was missed. */
  _onResumedSnapshot(f) {
    this._snapshots.add(f.ch);
    if (this._channels.has(f.ch)) this._applySnapshot(f.ch, f);
    if (this._onSnapshot) this._onSnapshot();
  }

  /** The server left a channel for us (a refresh took its grant away): forget it. */
  _onServerLeft(ch) {
    this._channels.delete(ch);
    this.mirrors.delete(ch);
    this.churn.delete(ch);
    this._emit("left", ch, ch);
  }

  /**
   * After `resumed: true`: the server sends one snapshot per channel still held, before
   * it reads the next request, so a ping's reply means they have all come (a short grace
   * covers a server that sends them later). Then a channel joined while the connection
   * was being lost is joined, one left meanwhile is left, and if this connection's meta
   * differs from what the user last set (an update lost on the way), one update sends it.
   */
  async _settleResumed() {
    const want = () => [...this._channels.keys()];
    const all = () => want().every((ch) => this._snapshots.has(ch));
    const arrived = new Promise((resolve) => {
      this._onSnapshot = () => {
        if (all()) resolve();
      };
      if (all()) resolve();
    });
    try {
      await Promise.race([arrived, this.ping()]);
      if (!all()) await Promise.race([arrived, new Promise((r) => setTimeout(r, 1000))]);
    } catch (err) {
      if (err.code === "disconnected") return; // lost again: the next welcome settles
    } finally {
      this._onSnapshot = null;
    }
    for (const ch of this._snapshots) {
      if (!this._channels.has(ch)) this.request({ t: "leave", ch }).catch(() => {});
    }
    for (const [ch, entry] of this._channels) {
      if (this._snapshots.has(ch)) {
        entry.joined = true;
        continue;
      }
      try {
        await this._joinNow(ch, entry.meta);
        entry.joined = true;
      } catch (err) {
        if (err.code === "disconnected") return;
        this._dropChannel(ch, err);
      }
    }
    this._restoreMeta();
  }

  _restoreMeta() {
    const me = this.welcome;
    const patch = {};
    for (const [ch, entry] of this._channels) {
      const cur = this.mirrors.get(ch)?.users.get(me.user)?.get(me.conn);
      if (!cur || !entry.meta) continue;
      for (const key of ["status", "device", "note"]) {
        if (entry.meta[key] !== undefined && entry.meta[key] !== cur[key]) patch[key] = entry.meta[key];
      }
    }
    if (Object.keys(patch).length) this._update(patch).catch(() => {});
  }

  _dropChannel(ch, err) {
    this._channels.delete(ch);
    this.mirrors.delete(ch);
    this.churn.delete(ch);
    this._emit("error", ch, err);
  }

  // -- token refresh --------------------------------------------------------------------

  /**
   * Arm the refresh timer for a token expiring at `exp` (s): after `refreshAt` of its
   * remaining life, at least a second away unless it expires sooner.
   */
  _planRefresh(exp) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    this.exp = typeof exp === "number" ? exp : null;
    this._refreshPoint = null;
    if (this.exp === null || !this.getToken) return;
    const remaining = Math.max(0, this.exp * 1000 - Date.now());
    const delay = Math.max(this.refreshAt * remaining, Math.min(remaining, 1000));
    this._refreshPoint = Date.now() + delay;
    this._refreshTimer = setTimeout(() => this._autoRefresh(), delay);
  }

  _refreshDue() {
    return this._refreshPoint != null && Date.now() >= this._refreshPoint;
  }

  async _fetchToken() {
    return this.getToken ? await this.getToken() : null;
  }

  async _autoRefresh() {
    this._refreshTimer = null;
    let token;
    try {
      token = await this._fetchToken();
    } catch (err) {
      this._emit("error", null, new PresenceError("token", `getToken failed: ${err.message || err}`));
      token = null;
    }
    if (!token) {
      // No token now: ask again later (halfway to exp), unless the token is gone.
      const left = this.exp === null ? 0 : this.exp * 1000 - Date.now();
      if (left > 2000) this._refreshTimer = setTimeout(() => this._autoRefresh(), left / 2);
      return;
    }
    try {
      await this.refresh(token);
    } catch (err) {
      if (err.code === "disconnected" || this._stopped) return; // the next welcome plans again
      this._emit("error", null, err);
      const left = this.exp === null ? 0 : this.exp * 1000 - Date.now();
      if (left > 2000) this._refreshTimer = setTimeout(() => this._autoRefresh(), Math.min(5000, left / 2));
    }
  }

  /**
   * Replace the connection's token in place (`refresh`); resolves with the `refreshed`
   * frame. The new token is also used by later hellos. Rejects with `forbidden` when the
   * server refuses it (the connection keeps its current token).
   */
  async refresh(token) {
    const reply = await this.request({ t: "refresh", token });
    this.token = token;
    this._planRefresh(reply.exp);
    this._emit("refreshed", null, reply.exp);
    return reply;
  }

  async _rejoin() {
    for (const [ch, entry] of this._channels) {
      if (!entry.joined) continue;
      try {
        await this._joinNow(ch, entry.meta);
      } catch (err) {
        if (err.code === "disconnected") return; // the next welcome retries
        this._dropChannel(ch, err);
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
    if (!ch.startsWith("churn:")) {
      if (meta && meta.status) this._chosenStatus = meta.status;
      else if (this._chosenStatus === null) this._chosenStatus = "online"; // the server's default
      // Joining while away (hidden or idle) joins as away; the chosen status comes back
      // with activity.
      if (this._autoAway && this._autoAway.away !== null && this._chosenStatus !== "away") {
        entry.meta = { ...(entry.meta || {}), status: "away" };
      }
    }
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
    this._applySnapshot(ch, reply);
    return reply;
  }

  _applySnapshot(ch, reply) {
    if (Array.isArray(reply.churn)) {
      const m = this.churn.get(ch) || new ChurnMirror(ch);
      m.applySnapshot(reply.churn);
      this.churn.set(ch, m);
      this._emit("churn", ch, m.sorted(), ch, null);
    } else {
      const m = this.mirrors.get(ch) || new ChannelMirror(ch);
      m.applySnapshot(reply.presence);
      this.mirrors.set(ch, m);
      this._emit("presence", ch, m.view(), ch, { snapshot: true, resumed: reply.ref == null });
    }
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

  /**
   * Change this connection's meta in every joined presence channel. A `status` given
   * here is the user's choice: auto-away returns to it on activity.
   */
  async update(meta) {
    if (meta && meta.status) this._chosenStatus = meta.status;
    return this._update(meta);
  }

  async _update(meta) {
    // Remember first: a reconnect during the request rejoins with the new meta.
    for (const [ch, entry] of this._channels) {
      if (!ch.startsWith("churn:")) entry.meta = { ...(entry.meta || {}), ...meta };
    }
    const reply = await this.request({ t: "update", meta });
    this._applyOwn(meta);
    return reply;
  }

  /**
   * The server sends no diff about a connection's own changes, so mirror an accepted
   * update here: this connection's meta in each presence mirror, with the next seq (the
   * server's count too). Emits "presence" with change {own: true}.
   */
  _applyOwn(meta) {
    const me = this.welcome;
    if (!me) return;
    const fields = {};
    for (const key of ["status", "device", "note"]) if (meta[key] !== undefined) fields[key] = meta[key];
    for (const [ch, mirror] of this.mirrors) {
      const cur = mirror.users.get(me.user)?.get(me.conn);
      if (!cur) continue;
      mirror._merge(me.user, { ...cur, ...fields, seq: cur.seq + 1 });
      this._emit("presence", ch, mirror.view(), ch, { own: true });
    }
  }

  // -- auto-away ------------------------------------------------------------------------

  /**
   * Turn auto-away on ({idle: ms, hidden: bool}, see AutoAway) or off (false). While on,
   * the client sets `away` when the page is hidden or idle and the status the user chose
   * (join meta or update()) on activity; a user who chose `away` is left alone.
   * Emits "autoaway" with (reason or null).
   */
  setAutoAway(opts) {
    if (this._autoAway) {
      const wasAway = this._autoAway.away !== null;
      this._autoAway.stop();
      this._autoAway = null;
      if (wasAway) this._autoStatus(null);
    }
    if (!opts || typeof document === "undefined") return;
    this._autoAway = new AutoAway({
      ...opts,
      onAway: (reason) => this._autoStatus(reason),
      onBack: () => this._autoStatus(null),
    }).start();
  }

  /** Why auto-away holds the status at `away` ("hidden" or "idle"), or null. */
  get autoAwayReason() {
    return this._autoAway ? this._autoAway.away : null;
  }

  _autoStatus(reason) {
    this._emit("autoaway", null, reason);
    const chosen = this._chosenStatus;
    if (chosen === null || chosen === "away") return; // nothing joined yet, or already away
    const hasPresence = [...this._channels.keys()].some((ch) => !ch.startsWith("churn:"));
    if (!hasPresence) return;
    this._update({ status: reason === null ? chosen : "away" }).catch((err) => {
      // Not connected: the rejoin carries the status (entry.meta). Otherwise, show it.
      if (this.status === "connected" && err.code !== "disconnected") this._emit("error", null, err);
    });
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
