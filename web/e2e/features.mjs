// The chat's features beyond sending and stopping, in headless Chromium against the real relay
// and daemon that tests/tests/web_browser.rs starts, the daemon in front of its fake chat
// backend (a fake: `fake-echo` answers "Answer N to: QUESTION (saw K images)", N counting the
// backend's requests; `fake-vision` is the same with the `vision` capability).
// Usage: node e2e/features.mjs CONFIG.json — `relay`, `alice` (a client token), `alice_tight`
// (her token on a tier with a `tight_body_bytes` body limit and a few requests a minute),
// `fake_device`, `image` (a PNG file to attach). The Rust test checks afterwards that the image
// reached the backend. Prints one line per check and "N passed, N failed" last.

import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { STEP, assert, check, expectCount, finish, freshPage, launch, shot } from './harness.mjs';
import { choose, finished, send, signIn } from './chat.mjs';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const relay = config.relay.replace(/\/$/, '');
await launch(config);
const page = await freshPage();
await signIn(page, relay, config.alice);
await choose(page, 'device', new RegExp(`^${config.fake_device}$`));

/** The texts of the messages of `role` on screen. */
const texts = (role) => page.getByTestId(`msg-${role}`).locator('.plain, .md').allInnerTexts();

/** Waits until the picked model's capabilities are known: `true` when it takes images. */
async function vision(expected) {
  await page.locator(`[data-vision="${expected}"]`).waitFor({ state: 'attached', timeout: STEP });
}

await check('a model without vision refuses an image, with the reason', async () => {
  await choose(page, 'model', /fake-echo/);
  await vision(false);
  await page.getByTestId('attach').setInputFiles(config.image);
  const reason = await page.getByTestId('banner-error').innerText({ timeout: STEP });
  assert(/fake-echo\S* cannot see images/.test(reason) && reason.includes('vision'), `reason: ${reason}`);
  assert((await page.locator('.attached img').count()) === 0, 'the image was attached anyway');
  await page.getByRole('button', { name: 'Dismiss' }).click();
});

await check('a vision model takes an image, and the request carries it', async () => {
  await choose(page, 'model', /fake-vision/);
  await vision(true);
  await page.getByTestId('attach').setInputFiles(config.image);
  await page.locator('.attached img').waitFor({ timeout: STEP });
  await send(page, 'What is in this picture?');
  const answer = await finished(page);
  // The backend counted the image in the request; the Rust test compares its bytes.
  assert(/to: What is in this picture\? \(saw 1 images\)/.test(answer), `answer: ${answer}`);
  assert((await page.getByTestId('msg-user').locator('img').count()) === 1, 'the sent image is not shown');
  assert((await page.locator('.attached img').count()) === 0, 'the composer kept the sent image');
  await shot(page, 'vision');
});

await check('regenerate asks again and replaces the answer', async () => {
  await page.getByTestId('new-chat').click();
  await choose(page, 'model', /fake-echo/);
  await send(page, 'first question');
  const first = await finished(page);
  const n = Number(/Answer (\d+) to: first question/.exec(first)?.[1]);
  assert(n > 0, `answer: ${first}`);
  await page.getByTestId('regenerate').click();
  await page.waitForFunction(
    (before) => {
      const answers = document.querySelectorAll('[data-testid="answer"]');
      const text = answers[answers.length - 1]?.textContent ?? '';
      return document.querySelector('[data-testid="send"]') && text.includes('to: first question') && !text.includes(before);
    },
    `Answer ${n} `,
    { timeout: STEP },
  );
  const answers = await texts('assistant');
  assert(answers.length === 1 && answers[0].includes(`Answer ${n + 1} to: first question`), `answers: ${JSON.stringify(answers)}`);
});

await check('edit a message and resend: it replaces the message and what followed', async () => {
  await page.getByTestId('msg-user').getByRole('button', { name: 'Edit' }).click();
  const box = page.getByTestId('input');
  // The box takes the message in an effect, after the next paint: wait for it.
  await page
    .waitForFunction(() => document.querySelector('[data-testid="input"]')?.value === 'first question', null, { timeout: STEP })
    .catch(async () => assert(false, `the box holds: ${await box.inputValue()}`));
  await page.getByText('Editing a message').waitFor();
  await send(page, 'edited question');
  const answer = await finished(page);
  assert(answer.includes('to: edited question'), `answer: ${answer}`);
  const questions = await texts('user');
  const answers = await texts('assistant');
  assert(JSON.stringify(questions) === '["edited question"]', `questions: ${JSON.stringify(questions)}`);
  assert(answers.length === 1, `answers: ${JSON.stringify(answers)}`);
  await shot(page, 'edited');
});

await check('export the conversations as JSON, then import them in another browser', async () => {
  const count = await page.getByTestId('conversation').count();
  assert(count === 2, `conversations: ${count}`);
  const [download] = await Promise.all([
    page.waitForEvent('download', { timeout: STEP }),
    page.getByRole('button', { name: 'Export' }).click(),
  ]);
  const file = join(tmpdir(), `cloudllm-export-${process.pid}.json`);
  await download.saveAs(file);
  const exported = JSON.parse(readFileSync(file, 'utf8'));
  assert(exported.format === 'cloudllm-conversations' && exported.conversations.length === 2, `export: ${JSON.stringify(exported).slice(0, 300)}`);
  const all = JSON.stringify(exported);
  assert(all.includes('edited question') && all.includes('What is in this picture?'), 'the export lacks the messages');
  assert(exported.conversations.some((c) => c.messages.some((m) => m.images?.length === 1)), 'the export lacks the image');
  assert(!all.includes(config.alice), 'the token is in the export');

  const other = await freshPage();
  await signIn(other, relay, config.alice);
  assert((await other.getByTestId('conversation').count()) === 0, 'a new browser has no conversations');
  await other.locator('input[type="file"][accept*="json"]').setInputFiles(file);
  await other.getByText('Imported 2 conversation(s).').waitFor({ timeout: STEP });
  await expectCount(other.getByTestId('conversation'), 2, 'the imported conversations are not listed');
  await other.getByTestId('conversation').filter({ hasText: 'first question' }).click();
  await other.getByTestId('msg-user').getByText('edited question').waitFor({ timeout: STEP });
  await shot(other, 'imported');
  assert(other.errors.length === 0, other.errors.join('\n'));
  await other.context().close();
});

const tight = await freshPage();

await check('a message larger than the plan allows is a 413, explained', async () => {
  // Start on the echo model, so that no request goes to another model's capabilities: the
  // tier allows only a few requests a minute.
  await tight.goto(`${relay}/`);
  await tight.evaluate(() => localStorage.setItem('cloudllm.model', 'fake-echo:latest'));
  await signIn(tight, relay, config.alice_tight);
  await send(tight, 'x'.repeat(config.tight_body_bytes + 1000));
  const text = await tight.getByTestId('banner-error').innerText({ timeout: STEP });
  assert(text.includes('too large for your plan') && text.includes(`${config.tight_body_bytes} bytes`), `banner: ${text}`);
  await tight.getByTestId('send').waitFor({ timeout: STEP });
  const note = await tight.locator('.note').last().innerText();
  assert(note.startsWith('Failed:'), `note: ${note}`);
  // The view followed the long message down to the reason, below it.
  const inView = await tight.locator('.note').last().evaluate((el) => {
    const box = el.getBoundingClientRect();
    const view = document.querySelector('[data-testid="messages"]').getBoundingClientRect();
    return box.top >= view.top && box.bottom <= view.bottom;
  });
  assert(inView, 'the reason is out of view: the page did not scroll down to it');
  await shot(tight, 'too-large');
  // The refused message is not sent again with the next one, which gets its answer.
  await send(tight, 'a short question');
  const answer = await finished(tight);
  assert(answer.includes('to: a short question'), `answer: ${answer}`);
});

await check('a 429 shows the wait, counts it down, and goes away when it is over', async () => {
  let banner = '';
  for (let i = 0; i < 8 && !banner; i++) {
    await send(tight, `question ${i}`);
    await tight.getByTestId('send').waitFor({ timeout: STEP });
    if (await tight.getByTestId('banner-rate').count()) banner = await tight.getByTestId('banner-rate').innerText();
  }
  assert(banner, 'no 429 after 8 messages on a tier of a few a minute');
  assert(/rate limit: the tight tier allows \d+ requests per minute/.test(banner), `banner: ${banner}`);
  const waits = [...banner.matchAll(/try again in (\d+) s/gi)];
  assert(waits.length === 1, `one wait, counted down by the page: ${banner}`);
  const wait = Number(waits[0][1]);
  assert(wait >= 2 && wait <= 60, `wait: ${banner}`);
  await shot(tight, 'rate-limited');
  await tight.waitForFunction(
    (first) => {
      const m = /try again in (\d+) s/.exec(document.querySelector('[data-testid="banner-rate"]')?.textContent ?? '');
      return m && Number(m[1]) < first;
    },
    wait,
    { timeout: STEP },
  );
  await tight.getByTestId('banner-rate').waitFor({ state: 'detached', timeout: (wait + 5) * 1000 });
});

await check('no script error on the pages', async () => {
  assert(page.errors.length === 0 && tight.errors.length === 0, [...page.errors, ...tight.errors].join('\n'));
});

await finish();
