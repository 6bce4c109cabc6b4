// A real imhost node for the client's tests: the binary cargo built
// (IMHOST_BIN, default target/debug/imhost), on a free loopback port, started,
// stopped, paused and restarted by its PID.

import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
export const IMHOST_BIN = process.env.IMHOST_BIN ?? path.resolve(here, "../../../target/debug/imhost");
const API_KEY = "js-client-test-key";

/** A free loopback port (bound, then released for the node to take). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Polls `check` until it returns a truthy value, failing after `withinMs`. */
export async function eventually(what, check, withinMs = 10_000) {
  const deadline = Date.now() + withinMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export class Node {
  constructor(port, args = []) {
    this.port = port;
    this.args = args;
    this.base = `http://127.0.0.1:${port}`;
    this.child = null;
    this.output = "";
  }

  static async start(args = []) {
    const node = new Node(await freePort(), args);
    await node.start();
    return node;
  }

  async start() {
    this.child = spawn(
      IMHOST_BIN,
      ["--listen", `127.0.0.1:${this.port}`, "--api-key", API_KEY, ...this.args],
      { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: "" } },
    );
    const child = this.child;
    const keep = (chunk) => {
      this.output = (this.output + chunk).slice(-20_000);
    };
    child.stdout.on("data", keep);
    child.stderr.on("data", keep);
    this.exited = new Promise((resolve) => child.on("exit", resolve));
    await eventually(`imhost serving on ${this.port}\n${this.output}`, async () => {
      if (child.exitCode !== null) throw new Error(`imhost exited: ${this.output}`);
      try {
        return (await fetch(`${this.base}/readyz`)).ok;
      } catch {
        return false;
      }
    });
  }

  /** Sends `signal` to the node by its PID. */
  signal(signal) {
    process.kill(this.child.pid, signal);
  }

  /** Stops the node (SIGTERM: a graceful shutdown) and waits for it to exit. */
  async stop() {
    if (!this.child || this.child.exitCode !== null) return;
    this.signal("SIGCONT");
    this.signal("SIGTERM");
    await Promise.race([
      this.exited,
      new Promise((_, reject) => setTimeout(() => reject(new Error("imhost did not stop")), 15_000)),
    ]).catch((error) => {
      this.signal("SIGKILL");
      throw error;
    });
  }

  async api(method, route, body) {
    const response = await fetch(`${this.base}/api/v1/${route}`, {
      method,
      headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const json = await response.json();
    if (!response.ok) throw new Error(`${method} ${route}: ${response.status} ${JSON.stringify(json)}`);
    return json;
  }

  /** What an application backend does: a connect URL for `clientId`. */
  async connectUrl(clientId) {
    return (await this.api("POST", "connect-url", { client_id: clientId })).url;
  }

  async stats() {
    return this.api("GET", "stats");
  }
}
