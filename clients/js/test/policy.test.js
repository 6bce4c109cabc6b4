// The client's decisions on close codes no real node can be made to send on
// demand (1013), its backoff arithmetic and its argument checks. A scripted
// WebSocket stands in for the network here; everything else is real.

import { test } from "node:test";
import assert from "node:assert/strict";

import { ImhostClient, CloseCode } from "../imhost.js";

/** A WebSocket whose open and close the test decides. */
class ScriptedSocket {
  static made = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    ScriptedSocket.made.push(this);
  }
  send(text) {
    this.sent.push(text);
  }
  close() {}
  open() {
    this.onopen?.({});
  }
  closeWith(code, reason = "") {
    this.onclose?.({ code, reason, wasClean: true });
  }
}

function until(what, check, withinMs = 5_000) {
  const deadline = Date.now() + withinMs;
  return new Promise((resolve, reject) => {
    const poll = () => {
      if (check()) return resolve();
      if (Date.now() > deadline) return reject(new Error(`timed out waiting for: ${what}`));
      setTimeout(poll, 5);
    };
    poll();
  });
}

test("after 1013 the client waits at least overloadDelayMs, then fetches a fresh URL", async () => {
  ScriptedSocket.made = [];
  let n = 0;
  const client = new ImhostClient({
    connectUrl: () => `ws://127.0.0.1:1/ws?token=${++n}`,
    WebSocket: ScriptedSocket,
    initialDelayMs: 10,
    overloadDelayMs: 300,
  });
  const reconnecting = [];
  client.on("reconnecting", (r) => reconnecting.push(r));
  client.start();
  await until("first socket", () => ScriptedSocket.made.length === 1);
  ScriptedSocket.made[0].open();
  const closedAt = Date.now();
  ScriptedSocket.made[0].closeWith(CloseCode.TRY_AGAIN_LATER, "outbound queue full");
  assert.equal(reconnecting[0].reason, "overloaded");
  assert.ok(reconnecting[0].delayMs >= 300, `${reconnecting[0].delayMs}`);
  await until("second socket", () => ScriptedSocket.made.length === 2);
  assert.ok(Date.now() - closedAt >= 290, "waited out the overload delay");
  assert.equal(ScriptedSocket.made[1].url, "ws://127.0.0.1:1/ws?token=2");
  client.stop();
});

test("a closed socket's late events are ignored after a reconnect", async () => {
  ScriptedSocket.made = [];
  const client = new ImhostClient({
    connectUrl: () => "ws://127.0.0.1:1/ws",
    WebSocket: ScriptedSocket,
    initialDelayMs: 1,
  });
  const messages = [];
  client.on("message", (m) => messages.push(m.text));
  client.start();
  await until("first socket", () => ScriptedSocket.made.length === 1);
  const first = ScriptedSocket.made[0];
  const firstOnMessage = first.onmessage;
  first.open();
  first.closeWith(CloseCode.ABNORMAL);
  await until("second socket", () => ScriptedSocket.made.length === 2);
  ScriptedSocket.made[1].open();
  firstOnMessage?.({ data: "stale" });
  ScriptedSocket.made[1].onmessage({ data: '"fresh"' });
  assert.deepEqual(messages, ['"fresh"']);
  client.stop();
});

test("backoff doubles from initialDelayMs to maxDelayMs, jittered into the upper half", () => {
  const at = (r) =>
    new ImhostClient({
      connectUrl: () => null,
      WebSocket: ScriptedSocket,
      initialDelayMs: 100,
      maxDelayMs: 1_000,
      random: () => r,
    });
  assert.deepEqual([1, 2, 3, 4, 5, 6].map((a) => at(0).backoff(a)), [50, 100, 200, 400, 500, 500]);
  assert.deepEqual([1, 2, 3, 4, 5, 6].map((a) => at(0.999999).backoff(a)), [100, 200, 400, 800, 1000, 1000]);
});

test("a connectUrl answering null stops the client without a socket", async () => {
  ScriptedSocket.made = [];
  const client = new ImhostClient({ connectUrl: async () => null, WebSocket: ScriptedSocket });
  client.start();
  await until("stopped", () => client.state === "stopped");
  assert.equal(ScriptedSocket.made.length, 0);
});

test("bad options are refused with a clear error", () => {
  assert.throws(() => new ImhostClient({}), /connectUrl must be a function/);
  assert.throws(
    () => new ImhostClient({ connectUrl: () => "", WebSocket: ScriptedSocket, maxDelayMs: -1 }),
    /maxDelayMs must be a number >= 0/,
  );
  const client = new ImhostClient({ connectUrl: () => "", WebSocket: ScriptedSocket });
  assert.throws(() => client.on("mesage", () => {}), /unknown event "mesage"/);
});
