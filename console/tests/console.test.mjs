// The console in headless Chromium (Debian's), driven by Playwright, against
// a live control plane that fleetplane/tests/console.rs starts with
// simulated agents. It signs in with the operator token, sees the connected
// agents, opens an agent page, compares two config versions, starts a
// rollout from the form and watches it finish through the event stream, and
// saves a screenshot of each page.
//
// Environment: CONSOLE_URL (admin listener base URL), CONSOLE_TOKEN,
// CONSOLE_AGENTS (how many agents are connected), CONSOLE_ASSIGNMENT and
// CONSOLE_CONFIG (what to roll out), SCREENSHOTS (a directory), CHROMIUM
// (default /usr/bin/chromium).

import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

const url = process.env.CONSOLE_URL;
const token = process.env.CONSOLE_TOKEN;
const agents = Number(process.env.CONSOLE_AGENTS);
const assignment = process.env.CONSOLE_ASSIGNMENT;
const config = process.env.CONSOLE_CONFIG;
const shots = process.env.SCREENSHOTS ?? "screenshots";

let browser;
let page;

before(async () => {
  assert.ok(url && token && agents && assignment && config, "run through fleetplane/tests/console.rs");
  mkdirSync(shots, { recursive: true });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
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
  page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.setDefaultTimeout(30_000);
  page.on("pageerror", (e) => {
    throw e;
  });
});

after(async () => {
  await browser?.close();
});

const shot = (name) => page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });

test("asks for the operator token, then shows the connected agents", async () => {
  await page.goto(`${url}/`);
  await page.waitForSelector("input[name=token]");
  assert.match(await page.textContent("main"), /operator token/);
  await page.fill("input[name=token]", token);
  await page.click("button[type=submit]");
  await page.waitForFunction(
    (n) => document.querySelector("#connected-count")?.textContent === `${n} / ${n}`,
    agents,
  );
  // The event stream is live (it carries the token too).
  await page.waitForFunction(() => document.querySelector("#session .stream")?.textContent === "events: live");
  await shot("overview");
});

test("lists the agents and opens one", async () => {
  await page.click("nav >> text=Agents");
  await page.waitForFunction((n) => document.querySelectorAll("#agents tbody tr").length === n, agents);
  await shot("agents");
  const uid = await page.textContent("#agents tbody tr:first-child td:first-child a");
  await page.click("#agents tbody tr:first-child td:first-child a");
  await page.waitForSelector("section.agent h2 >> text=Capabilities");
  assert.match(await page.textContent("section.agent h1"), new RegExp(uid));
  assert.match(await page.textContent("section.agent"), /AcceptsRemoteConfig/);
  // Its history comes from the event log: it connected, its config applied.
  await page.waitForSelector("#history >> text=agent.connected");
  await page.waitForSelector("#history >> text=agent.config_status");
  await shot("agent");
});

test("compares two versions of a config side by side", async () => {
  await page.goto(`${url}/console/#/configs/${config}`);
  await page.waitForSelector("table.diff tr.added, table.diff tr.changed");
  assert.match(await page.textContent("table.diff"), /hostmetrics/);
  await shot("config-diff");
});

test("starts a rollout and watches it complete through the event stream", async () => {
  await page.click("nav >> text=Rollouts");
  await page.waitForSelector("#start-rollout");
  await page.selectOption("#start-rollout select[name=assignment]", assignment);
  await page.selectOption("#start-rollout select[name=config]", config);
  await page.fill("#start-rollout input[name=stages]", "50,100");
  await page.fill("#start-rollout input[name=bake]", "0.5");
  await page.click("#start-rollout button[type=submit]");
  await page.waitForSelector("section.rollout");
  await page.waitForFunction(() => document.querySelector("#rollout-state")?.textContent === "COMPLETED", null, {
    timeout: 60_000,
  });
  const stages = await page.$$eval(".stage p", (ps) => ps.map((p) => p.textContent));
  assert.ok(stages.length === 2 && stages.every((s) => /^(\d+)\/\1 applied/.test(s)), JSON.stringify(stages));
  await shot("rollout");
});
