// The client against a real imhost node: restarts, force-offline, receipts,
// the keep-alive probe and a node that stops answering (SIGSTOP).

import { test, after } from "node:test";
import assert from "node:assert/strict";

import { ImhostClient, CloseCode } from "../imhost.js";
import { Node, eventually } from "./node.js";

const nodes = [];
after(async () => {
  for (const node of nodes) await node.stop().catch(() => {});
});

async function startNode(args) {
  const node = await Node.start(args);
  nodes.push(node);
  return node;
}

/** A client for `clientId` on `node`, recording every event and URL it used. */
function recordingClient(node, clientId, options = {}) {
  const seen = { urls: [], open: [], message: [], receipt: [], close: [], reconnecting: [] };
  const client = new ImhostClient({
    connectUrl: async () => {
      const url = await node.connectUrl(clientId);
      seen.urls.push(url);
      return url;
    },
    initialDelayMs: 100,
    maxDelayMs: 1_600,
    ...options,
  });
  for (const type of ["open", "message", "receipt", "close", "reconnecting"]) {
    client.on(type, (event) => seen[type].push(event));
  }
  return { client, seen };
}

test("reconnects after the node restarts: a fresh URL each time, backoff between attempts, no duplicate events", async () => {
  const node = await startNode();
  const { client, seen } = recordingClient(node, 7);
  client.start();
  await eventually("first open", () => seen.open.length === 1);
  await node.api("POST", "messages", { sender: 0, receivers: [7], message: { n: 1 } });
  await eventually("first message", () => seen.message.length === 1);
  assert.deepEqual(seen.message[0].json, { n: 1 });

  await node.stop();
  await eventually("close seen", () => seen.close.length === 1);
  assert.equal(seen.close[0].code, CloseCode.GOING_AWAY);
  assert.equal(seen.close[0].willReconnect, true);
  // While the node is down the backend call fails: the client keeps trying,
  // each wait longer than the one before until the cap (equal jitter keeps
  // every wait in [d/2, d] of a doubling d).
  await eventually("four failed attempts", () => seen.reconnecting.length >= 4, 15_000);
  const delays = seen.reconnecting.map((r) => r.delayMs);
  for (let i = 1; i < delays.length; i++) {
    assert.ok(delays[i] >= delays[i - 1] || delays[i] >= 800, `backoff grows: ${delays}`);
  }
  assert.deepEqual(
    seen.reconnecting.map((r) => r.attempt),
    delays.map((_, i) => i + 1),
  );
  assert.ok(seen.reconnecting.slice(1).every((r) => r.reason === "url-failed"), JSON.stringify(seen.reconnecting));

  await node.start();
  await eventually("second open", () => seen.open.length === 2, 10_000);
  assert.equal(client.state, "open");
  assert.equal(new Set(seen.urls).size, seen.urls.length, "every attempt used a fresh URL");
  assert.notEqual(seen.open[0].url, seen.open[1].url);

  await node.api("POST", "messages", { sender: 0, receivers: [7], message: { n: 2 } });
  await node.api("POST", "messages", { sender: 0, receivers: [7], message: { n: 3 } });
  await eventually("messages after the restart", () => seen.message.length >= 3);
  assert.deepEqual(
    seen.message.map((m) => m.json.n),
    [1, 2, 3],
    "each message raised exactly one event",
  );
  client.stop();
  assert.equal(client.state, "stopped");
});

test("does not reconnect after force-offline (1008)", async () => {
  const node = await startNode();
  const { client, seen } = recordingClient(node, 8);
  client.start();
  await eventually("open", () => seen.open.length === 1);
  await node.api("POST", "clients/8/force-offline", {});
  await eventually("close", () => seen.close.length === 1);
  assert.equal(seen.close[0].code, CloseCode.POLICY);
  assert.equal(seen.close[0].willReconnect, false);
  assert.equal(client.state, "stopped");
  assert.equal(seen.reconnecting.length, 0);
  assert.equal(seen.urls.length, 1);
});

test("receipts are told from messages: delivered and offline", async () => {
  const node = await startNode();
  const alice = recordingClient(node, 21);
  const bob = recordingClient(node, 22);
  alice.client.start();
  bob.client.start();
  await eventually("both open", () => alice.seen.open.length === 1 && bob.seen.open.length === 1);
  await node.api("POST", "messages", { sender: 21, receivers: [22, 23], message: { hi: "bob" }, receipt: true });
  await eventually("two receipts", () => alice.seen.receipt.length === 2);
  const byStatus = Object.fromEntries(alice.seen.receipt.map((r) => [r.status, r]));
  assert.deepEqual(byStatus.delivered.content, { hi: "bob" });
  assert.equal(byStatus.offline.text, "用户不在线");
  assert.deepEqual(bob.seen.message.map((m) => m.json), [{ hi: "bob" }]);
  assert.equal(alice.seen.message.length, 0, "receipts are not messages");
  alice.client.stop();
  bob.client.stop();
});

test("the keep-alive probe is answered, and a node that stops answering is noticed", async () => {
  const node = await startNode();
  const { client, seen } = recordingClient(node, 31, { probeIntervalMs: 100, probeTimeoutMs: 600 });
  client.start();
  await eventually("open", () => seen.open.length === 1);
  await eventually("three probes answered", async () => (await node.stats()).keepalive_probes >= 3);
  assert.equal(seen.close.length, 0, "answered probes keep the socket open");
  assert.equal(seen.message.length, 0, "probe answers are not messages");

  // A paused node keeps its TCP connections (the kernel still ACKs) but
  // answers nothing: only the probe can tell.
  node.signal("SIGSTOP");
  try {
    await eventually("dead link noticed", () => seen.close.length === 1, 5_000);
    assert.equal(seen.close[0].code, CloseCode.NO_ANSWER);
    await eventually("reconnecting", () => seen.reconnecting.length >= 1);
    assert.equal(seen.reconnecting[0].reason, "dead");
  } finally {
    node.signal("SIGCONT");
  }
  await eventually("open again", () => seen.open.length === 2, 10_000);
  client.stop();
});
