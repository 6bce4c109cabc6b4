// The demo chat and the status page in a real headless Chromium (Debian's,
// driven by playwright-core), against a real two-node cluster that
// tests/all/browser.rs starts on one Redis, with a word filter that drops
// "darn". Two pages chat through node 0, a third through node 1. Screenshots
// go to $ARTIFACTS (target/browser-artifacts).
//
// Environment: IMHOST_NODES (two base URLs, comma-separated), IMHOST_API_KEY,
// ARTIFACTS, CHROMIUM (default /usr/bin/chromium).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import path from "node:path";

import { chromium } from "playwright-core";

const [NODE0, NODE1] = (process.env.IMHOST_NODES ?? "").split(",");
const API_KEY = process.env.IMHOST_API_KEY;
const ARTIFACTS = process.env.ARTIFACTS ?? "artifacts";
const WAIT = { timeout: 15_000 };

let browser;
before(async () => {
  assert.ok(NODE0 && NODE1 && API_KEY, "IMHOST_NODES and IMHOST_API_KEY are set by tests/all/browser.rs");
  mkdirSync(ARTIFACTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    // As root in a container, without the network Chromium would phone.
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});
// Pages by artifact name: whatever happens, a picture of each is kept.
const pages = new Map();
after(async () => {
  for (const [name, page] of pages) await shot(page, name).catch(() => {});
  await browser?.close();
});

const shot = (page, name) => page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });

/** A page of `base`'s demo, signed in as `name` and in #lobby; its client id. */
async function signIn(base, name) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (error) => errors.push(error));
  await page.goto(base + "/");
  await page.fill("#name", name);
  await page.click("#login button");
  await page.locator("#status.open").waitFor(WAIT);
  const who = await page.textContent("#who");
  const id = Number(who.match(/id (\d+)/)[1]);
  await page.click("#joinf button");
  await page.locator("#log", { hasText: "joined #lobby" }).waitFor(WAIT);
  return { page, id, errors };
}

async function send(page, mode, text, to) {
  await page.selectOption("#mode", mode);
  if (to !== undefined) await page.fill("#to", String(to));
  await page.fill("#text", text);
  await page.click("#send button");
}

const logHas = (page, text) => page.locator("#log .msg", { hasText: text }).first().waitFor(WAIT);

test("three pages chat across two nodes, with receipts, and the status page shows the cluster", async () => {
  const alice = await signIn(NODE0, "alice");
  const bob = await signIn(NODE0, "bob");
  const carol = await signIn(NODE1, "carol");
  pages.set("chat-alice", alice.page).set("chat-bob", bob.page).set("chat-carol", carol.page);
  assert.equal(new Set([alice.id, bob.id, carol.id]).size, 3, "distinct client ids across nodes");

  // The online count is the cluster's.
  for (const { page } of [alice, bob, carol]) {
    await page.waitForFunction(() => Number(document.getElementById("online").textContent) === 3, null, WAIT);
  }
  await alice.page.locator("#chans li[data-channel=lobby] .n", { hasText: "3" }).waitFor(WAIT);

  // A channel message reaches the others, wherever their sockets are.
  await send(alice.page, "chan", "hello from alice");
  await logHas(bob.page, "hello from alice");
  await logHas(carol.page, "hello from alice");

  // A direct message across nodes, with its receipt.
  await send(carol.page, "direct", "hi alice, carol here", alice.id);
  await logHas(alice.page, "hi alice, carol here");
  await carol.page.locator(".msg.dm", { hasText: "hi alice, carol here" }).locator(".receipt.delivered").waitFor(WAIT);

  // The filter plugin drops this one: the sender's receipt says so, and why.
  await send(bob.page, "direct", "darn it", alice.id);
  const blocked = bob.page.locator(".msg.dm", { hasText: "darn it" }).locator(".receipt.filtered");
  await blocked.waitFor(WAIT);
  assert.match(await blocked.textContent(), /blocked/);

  // Broadcast reaches every page.
  await send(bob.page, "all", "everyone, hello");
  await logHas(alice.page, "everyone, hello");
  await logHas(carol.page, "everyone, hello");
  assert.equal(await alice.page.locator("#log .msg", { hasText: "darn it" }).count(), 0, "the dropped message never arrived");

  // The status page: the key goes in the form, never in the URL.
  const status = await (await browser.newContext({ viewport: { width: 1200, height: 800 } })).newPage();
  pages.set("status", status);
  await status.goto(NODE0 + "/status");
  await status.fill("#key", "wrong key");
  await status.click("#login button");
  await status.locator("#error", { hasText: "wrong API key" }).waitFor(WAIT);
  await status.fill("#key", API_KEY);
  await status.click("#login button");
  await status.locator("#live.on").waitFor(WAIT);
  await status.waitForFunction(
    () => {
      const rows = [...document.querySelectorAll("#nodes tbody tr[data-server]")];
      const total = rows.reduce((sum, r) => sum + Number(r.children[1].textContent), 0);
      return rows.length === 2 && total === 3;
    },
    null,
    WAIT,
  );
  await status.locator("#plugins tr[data-plugin=word-filter] .state-active").first().waitFor(WAIT);
  assert.ok(!status.url().includes(API_KEY), "the key is not in the URL");
  // Let the sparklines draw a few points before the picture.
  await status.waitForFunction(
    () => document.querySelector("#nodes svg.spark polyline")?.getAttribute("points").split(" ").length >= 3,
    null,
    WAIT,
  );
  for (const { errors } of [alice, bob, carol]) assert.deepEqual(errors, []);
});
