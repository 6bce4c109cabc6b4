// imhost terminal client: one WebSocket to an imhost node, kept open.
//
// The application gives it a function that asks its own backend for a connect
// URL (the backend calls imhost's POST /api/v1/connect-url with its API key).
// Connect tokens are single use, so every attempt fetches a fresh URL.
//
// What it does for the application:
// - reconnects with jittered exponential backoff after the socket closes or
//   the URL cannot be had, and never after 1008 (policy: forced offline);
// - backs off at least `overloadDelayMs` after 1013 (the node found this
//   terminal too slow, or is overloaded);
// - notices a dead link itself: browsers hide WebSocket pings, so it sends
//   imhost's keep-alive probe (an empty text frame, answered by an empty one)
//   and reconnects when nothing at all arrives within `probeTimeoutMs`;
// - tells receipts from messages, and raises typed events: open, message,
//   receipt, close, reconnecting.
//
// No dependencies and no build step: browsers and Node 20+ (Node 20 needs
// `--experimental-websocket`, or pass `WebSocket` from the `ws` package).

/** Close codes a terminal may see (docs/http-api.md). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  ABNORMAL: 1006,
  INVALID_DATA: 1007,
  POLICY: 1008,
  TOO_BIG: 1009,
  TRY_AGAIN_LATER: 1013,
  /** Raised by this client: no frame arrived in answer to a keep-alive probe. */
  NO_ANSWER: 4000,
});

/** The receipt texts imhost (like FreeIM) sends, and what they mean. */
export const ReceiptStatus = Object.freeze({
  "发送成功": "delivered",
  "用户不在线": "offline",
  "消息被拦截": "filtered",
});

const DEFAULTS = Object.freeze({
  initialDelayMs: 500,
  maxDelayMs: 30_000,
  overloadDelayMs: 5_000,
  probeIntervalMs: 25_000,
  probeTimeoutMs: 10_000,
  connectTimeoutMs: 15_000,
});

const EVENTS = ["open", "message", "receipt", "close", "reconnecting"];

export class ImhostClient {
  /**
   * @param {import("./imhost").ImhostClientOptions} options
   */
  constructor(options) {
    if (!options || typeof options.connectUrl !== "function") {
      throw new TypeError("ImhostClient: options.connectUrl must be a function returning a connect URL");
    }
    const WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WebSocketImpl !== "function") {
      throw new TypeError(
        "ImhostClient: no WebSocket here; on Node 20 run with --experimental-websocket or pass options.WebSocket",
      );
    }
    this._WebSocket = WebSocketImpl;
    this._connectUrl = options.connectUrl;
    this._random = options.random ?? Math.random;
    this._o = { ...DEFAULTS };
    for (const key of Object.keys(DEFAULTS)) {
      if (options[key] !== undefined) {
        if (!(Number.isFinite(options[key]) && options[key] >= 0)) {
          throw new RangeError(`ImhostClient: ${key} must be a number >= 0`);
        }
        this._o[key] = options[key];
      }
    }
    this._listeners = new Map(EVENTS.map((type) => [type, new Set()]));
    this._state = "idle";
    this._ws = null;
    this._attempt = 0;
    this._timers = new Set();
    this._probe = null;
    this._generation = 0;
  }

  /** "idle" | "connecting" | "open" | "waiting" | "stopped" */
  get state() {
    return this._state;
  }

  /**
   * Listens for `type`; returns a function that stops listening. Listeners
   * belong to the client, not to a socket: they fire once per event across
   * reconnects.
   */
  on(type, listener) {
    const set = this._listeners.get(type);
    if (!set) throw new TypeError(`ImhostClient: unknown event "${type}" (one of ${EVENTS.join(", ")})`);
    set.add(listener);
    return () => set.delete(listener);
  }

  off(type, listener) {
    this._listeners.get(type)?.delete(listener);
  }

  /** Starts connecting (and reconnecting); a second call does nothing. */
  start() {
    if (this._state === "idle" || this._state === "stopped") {
      this._attempt = 0;
      this._connect();
    }
    return this;
  }

  /** Closes the socket and stops reconnecting. */
  stop(code = CloseCode.NORMAL, reason = "client stopped") {
    this._state = "stopped";
    this._clearTimers();
    const ws = this._detach();
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        ws.close();
      }
      this._emit("close", { code, reason, wasClean: true, willReconnect: false });
    }
  }

  /**
   * Sends a text frame to the node (its `inbound` plugins handle it; without
   * one it is ignored). Returns false when no socket is open.
   */
  send(text) {
    if (this._state !== "open" || typeof text !== "string" || text === "") return false;
    this._ws.send(text);
    return true;
  }

  async _connect() {
    const generation = ++this._generation;
    this._state = "connecting";
    let url;
    try {
      const answer = await this._connectUrl();
      url = typeof answer === "string" ? answer : answer?.url;
    } catch (error) {
      if (generation !== this._generation || this._state === "stopped") return;
      return this._retry({ reason: "url-failed", error });
    }
    if (generation !== this._generation || this._state === "stopped") return;
    if (url === null || url === undefined) {
      // The backend says this terminal should not connect (signed out).
      this._state = "stopped";
      return;
    }
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (error) {
      return this._retry({ reason: "url-failed", error });
    }
    this._ws = ws;
    const opening = this._timer(() => {
      if (this._ws !== ws) return;
      this._detach();
      ws.close();
      this._closed(ws, { code: CloseCode.ABNORMAL, reason: "connect timed out", wasClean: false });
    }, this._o.connectTimeoutMs);
    ws.onopen = () => {
      if (this._ws !== ws) return;
      this._cancel(opening);
      this._state = "open";
      this._attempt = 0;
      this._heard();
      this._emit("open", { url });
    };
    ws.onmessage = (event) => {
      if (this._ws !== ws) return;
      this._heard();
      if (typeof event.data !== "string" || event.data === "") return;
      this._dispatch(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._cancel(opening);
      this._detach();
      this._closed(ws, { code: event.code, reason: event.reason, wasClean: event.wasClean });
    };
    ws.onerror = () => {
      // Always followed by close, which decides what happens next.
    };
  }

  _dispatch(text) {
    let json;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    if (json && typeof json === "object" && typeof json.receipt === "string" && typeof json.content === "string") {
      let content;
      try {
        content = JSON.parse(json.content);
      } catch {
        content = json.content;
      }
      this._emit("receipt", {
        status: ReceiptStatus[json.receipt] ?? "other",
        text: json.receipt,
        content,
        reason: typeof json.reason === "string" ? json.reason : undefined,
        raw: text,
      });
      return;
    }
    this._emit("message", { text, json });
  }

  _closed(ws, { code, reason, wasClean }) {
    if (this._state === "stopped") return;
    const willReconnect = code !== CloseCode.POLICY;
    this._emit("close", { code, reason, wasClean, willReconnect });
    if (!willReconnect) {
      this._state = "stopped";
      return;
    }
    this._retry({
      reason: code === CloseCode.TRY_AGAIN_LATER ? "overloaded" : code === CloseCode.NO_ANSWER ? "dead" : "closed",
      code,
    });
  }

  _retry({ reason, code, error }) {
    if (this._state === "stopped") return;
    this._state = "waiting";
    const attempt = ++this._attempt;
    let delayMs = this.backoff(attempt);
    if (reason === "overloaded") delayMs = Math.max(delayMs, this._o.overloadDelayMs);
    this._emit("reconnecting", { attempt, delayMs, reason, code, error });
    this._timer(() => {
      if (this._state === "waiting") this._connect();
    }, delayMs);
  }

  /**
   * The wait before attempt `attempt` (1, 2, …): exponential from
   * `initialDelayMs`, capped at `maxDelayMs`, then "equal jitter": a random
   * point in its upper half, so a node's terminals do not all return at once.
   */
  backoff(attempt) {
    const exp = Math.min(this._o.maxDelayMs, this._o.initialDelayMs * 2 ** Math.max(0, attempt - 1));
    return Math.round(exp / 2 + (this._random() * exp) / 2);
  }

  // Something arrived: the link is alive. Schedules the next probe.
  _heard() {
    if (this._probe) this._cancel(this._probe);
    if (!this._o.probeIntervalMs) return;
    const ws = this._ws;
    this._probe = this._timer(() => {
      if (this._ws !== ws || this._state !== "open") return;
      ws.send("");
      this._probe = this._timer(() => {
        if (this._ws !== ws) return;
        this._detach();
        try {
          ws.close(CloseCode.NO_ANSWER, "no answer to keep-alive probe");
        } catch {
          ws.close();
        }
        this._closed(ws, { code: CloseCode.NO_ANSWER, reason: "no answer to keep-alive probe", wasClean: false });
      }, this._o.probeTimeoutMs);
    }, this._o.probeIntervalMs);
  }

  // Forgets the current socket: its late events are ignored from here on.
  _detach() {
    const ws = this._ws;
    this._ws = null;
    if (this._probe) {
      this._cancel(this._probe);
      this._probe = null;
    }
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    }
    return ws;
  }

  _timer(fn, ms) {
    const id = setTimeout(() => {
      this._timers.delete(id);
      fn();
    }, ms);
    this._timers.add(id);
    return id;
  }

  _cancel(id) {
    clearTimeout(id);
    this._timers.delete(id);
  }

  _clearTimers() {
    for (const id of this._timers) clearTimeout(id);
    this._timers.clear();
    this._probe = null;
  }

  _emit(type, detail) {
    for (const listener of [...this._listeners.get(type)]) {
      try {
        listener(detail);
      } catch (error) {
        // One listener's bug must not stop the others or the client.
        if (typeof globalThis.reportError === "function") globalThis.reportError(error);
        else console.error(error);
      }
    }
  }
}
