// What every browser run of web/e2e shares: headless Chromium (Debian's, driven by
// playwright-core), named checks that report one line each, screenshots that are checks too,
// and fresh pages that share nothing. A run script imports it, runs its checks and calls
// `finish()`, which prints "N passed, N failed" last and exits 1 on a failure.

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

/** Every wait for the page is bounded: a real model on a loaded CPU takes a few seconds. */
export const STEP = 60_000;

let passed = 0;
let failed = 0;
const problems = [];
let browser = null;
let shots = null;

/** Starts Chromium for the run described by `config` (`chromium`, `screenshots`). */
export async function launch(config) {
  shots = config.screenshots ?? null;
  if (shots) mkdirSync(shots, { recursive: true });
  browser = await chromium.launch({
    executablePath: config.chromium ?? '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    // playwright-core gives each launch a fresh, temporary --user-data-dir of its own.
  });
  return browser;
}

/** Runs one named check; a failure is reported and the run goes on. */
export async function check(name, body) {
  try {
    await body();
    passed += 1;
    console.log(`ok: ${name}`);
  } catch (err) {
    failed += 1;
    problems.push(name);
    console.log(`FAILED: ${name}: ${err?.stack ?? err}`);
  }
}

export function assert(condition, message) {
  if (!condition) throw new Error(message);
}

/** Waits until `locator` matches exactly `n` elements: the page updates lists after storing,
 * so a count read once right after an action can be the one before it. */
export async function expectCount(locator, n, message) {
  const deadline = Date.now() + STEP;
  let count = await locator.count();
  while (count !== n && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 50));
    count = await locator.count();
  }
  assert(count === n, `${message} (${count}, not ${n})`);
}

/** Saves a screenshot named `name`; also a check that something is on screen. */
export async function shot(page, name) {
  if (shots) await page.screenshot({ path: join(shots, `${name}.png`) });
  const text = await page.evaluate(() => document.body.innerText.trim().length);
  assert(text > 0, `${name}: the page shows nothing`);
}

/** A page in a fresh context (its own storage, like another browser). */
export async function freshPage(options = {}) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 }, ...options });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(String(err)));
  page.errors = errors;
  return page;
}

/** Closes the browser, prints the tally and exits (1 on a failure). */
export async function finish() {
  await browser?.close();
  if (problems.length) console.log(`failed checks: ${problems.join('; ')}`);
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}
