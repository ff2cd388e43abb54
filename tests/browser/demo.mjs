// End-to-end test of megasock's demo page in headless Chromium (Debian's /usr/bin/chromium,
// driven by playwright-core; no browser is downloaded).
//
//   node tests/browser/demo.mjs http://127.0.0.1:8080 /tmp/demo.png
//
// Opens the page twice on one fresh room (`/?room=e2e-<random>`), waits until both are
// connected, sends a message from each, and checks that both pages show both messages, that
// each page's own message carries a round-trip time, and that the member count reads 2.
// Writes a PNG screenshot of the first page. Exits 0 on success, 1 with a FAIL line otherwise,
// all within 30 s.
import { existsSync } from "node:fs";
import { chromium } from "playwright-core";

const CHROMIUM = "/usr/bin/chromium";
const OVERALL_MS = 30_000;
const STEP_MS = 10_000;

const [base, shot] = process.argv.slice(2);
if (!base || !shot || !/^https?:\/\//.test(base)) {
  console.error("usage: node demo.mjs http://HOST:PORT SCREENSHOT.png");
  process.exit(2);
}
if (!existsSync(CHROMIUM)) {
  console.error(`FAIL: ${CHROMIUM} is missing (.ci/run installs it: apt-get install chromium)`);
  process.exit(1);
}

const started = Date.now();
let current = "start";
let browser = null;
const pageErrors = [];

function log(msg) {
  console.log(`[demo ${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}`);
}

let failed = false;
async function fail(msg) {
  if (failed) return; // the first failure is the one to report
  failed = true;
  console.error(`FAIL (step: ${current}): ${msg}`);
  for (const e of pageErrors) console.error(`  page error: ${e}`);
  // Do not let a stuck browser hold the exit.
  if (browser) await Promise.race([browser.close().catch(() => {}), sleep(3000)]);
  process.exit(1);
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

const overall = setTimeout(() => fail(`timed out after ${OVERALL_MS / 1000} s overall`), OVERALL_MS);

async function step(name, fn) {
  current = name;
  log(name);
  return fn();
}

/** What a page shows: every `.msg` with its classes, name, text and RTT. */
function shown(page) {
  return page.$$eval("#messages .msg", (els) =>
    els.map((e) => ({
      mine: e.classList.contains("mine"),
      who: e.querySelector(".who")?.textContent ?? null,
      rtt: e.querySelector(".rtt")?.textContent ?? null,
      text: e.textContent,
    })),
  );
}

async function main() {
  const room = "e2e-" + Math.random().toString(36).slice(2, 10);
  const url = new URL(`/?room=${room}`, base).href;

  browser = await step("launch chromium", () =>
    chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      timeout: STEP_MS,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        // Extra flags from the test, e.g. the test certificate's key for an https:// page.
        ...(process.env.DEMO_CHROMIUM_ARGS || "").split(" ").filter(Boolean),
      ],
    }),
  );
  log(`chromium ${browser.version()}`);

  // Two separate contexts: two users, nothing shared (storage, connections). The texts are
  // long and repetitive (as chat often is) so megasock compresses them on their way out:
  // tests/browser.rs checks on /metrics that permessage-deflate carried them both ways.
  const users = [
    { name: "alice", text: `hello from alice ${room}: ${"la ".repeat(40)}la` },
    { name: "bob", text: `hi alice, bob here ${room}: ${"na ".repeat(40)}na` },
  ];
  for (const u of users) {
    const ctx = await browser.newContext({ viewport: { width: 820, height: 560 } });
    u.page = await ctx.newPage();
    u.page.setDefaultTimeout(STEP_MS);
    u.page.on("pageerror", (e) => pageErrors.push(`${u.name}: ${e.message}`));
    u.page.on("console", (m) => {
      if (m.type() === "error") pageErrors.push(`${u.name} console: ${m.text()}`);
    });
  }

  for (const u of users) {
    await step(`${u.name}: open ${url}`, async () => {
      const res = await u.page.goto(url, { waitUntil: "load" });
      if (!res || res.status() !== 200) throw new Error(`GET / answered ${res && res.status()}`);
    });
  }
  for (const u of users) {
    await step(`${u.name}: wait for #status = connected`, () =>
      u.page
        .waitForFunction(() => document.querySelector("#status")?.textContent === "connected")
        .catch(async () => {
          const s = await u.page.textContent("#status").catch(() => "?");
          const w = await u.page.textContent("#where").catch(() => "");
          throw new Error(`#status stayed "${s}" ${w}`);
        }),
    );
    await u.page.fill("#name", u.name);
  }

  await step("alice sends with Enter", async () => {
    await users[0].page.fill("#text", users[0].text);
    await users[0].page.press("#text", "Enter");
  });
  await step("bob sends with the button", async () => {
    await users[1].page.fill("#text", users[1].text);
    await users[1].page.click("#send");
  });

  const texts = users.map((u) => u.text);
  for (const u of users) {
    await step(`${u.name}: wait for both messages`, () =>
      u.page
        .waitForFunction(
          (want) => {
            const got = Array.from(document.querySelectorAll("#messages .msg"), (e) => e.textContent);
            return want.every((t) => got.some((g) => g.includes(t)));
          },
          texts,
        )
        .catch(async () => {
          throw new Error(`messages shown: ${JSON.stringify(await shown(u.page))}`);
        }),
    );
  }

  for (const [i, u] of users.entries()) {
    const other = users[1 - i];
    await step(`${u.name}: check own and other's message`, async () => {
      const msgs = await shown(u.page);
      const own = msgs.filter((m) => m.text.includes(u.text));
      const theirs = msgs.filter((m) => m.text.includes(other.text));
      if (own.length !== 1 || theirs.length !== 1) {
        throw new Error(`each message should show once: ${JSON.stringify(msgs)}`);
      }
      if (!own[0].mine) throw new Error(`own message lacks class "mine": ${JSON.stringify(own[0])}`);
      if (!/^\d+ ms$/.test(own[0].rtt ?? "")) {
        throw new Error(`own message has no "N ms" round-trip time: ${JSON.stringify(own[0])}`);
      }
      if (theirs[0].mine || theirs[0].rtt !== null) {
        throw new Error(`the other's message is shown as own: ${JSON.stringify(theirs[0])}`);
      }
      if (theirs[0].who !== other.name) {
        throw new Error(`the other's message should name "${other.name}": ${JSON.stringify(theirs[0])}`);
      }
      u.rtt = own[0].rtt;
    });
  }

  for (const u of users) {
    await step(`${u.name}: wait for #members = 2 members`, () =>
      u.page
        .waitForFunction(() => document.querySelector("#members")?.textContent.trim() === "2 members")
        .catch(async () => {
          throw new Error(`#members shows "${await u.page.textContent("#members").catch(() => "?")}"`);
        }),
    );
  }

  current = "page errors";
  if (pageErrors.length) throw new Error("the page logged errors");

  await step(`screenshot of alice's page to ${shot}`, () => users[0].page.screenshot({ path: shot }));
  await browser.close();
  clearTimeout(overall);
  log(`ok: room ${room}, both pages saw both messages, RTT alice ${users[0].rtt}, bob ${users[1].rtt}`);
}

main().catch((e) => fail(e && e.message ? e.message : String(e)));
