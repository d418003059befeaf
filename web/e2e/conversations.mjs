// Choosing where a message goes, the conversation list, the system prompt and reasoning models,
// in headless Chromium against the real relay and the two real daemons of one user that
// tests/tests/web_browser.rs starts, each in front of a fake chat backend of its own (a fake:
// `fake-echo` and `fake-vision` answer "Answer N to: QUESTION (saw K images) — MODEL on LABEL";
// `fake-think` thinks first in Ollama's `message.thinking` field, `fake-r1` in `<think>…</think>`
// at the start of its text). Each fake lists the chat requests it received at `/fake/requests`:
// the checks read there what reached which backend.
// Usage: node e2e/conversations.mjs CONFIG.json — `relay`, `alice` (a client token), `fakes`
// (device name → its fake's URL), `labels` (device name → its fake's label). Prints one line per
// check and "N passed, N failed" last.

import { readFileSync } from 'node:fs';
import { STEP, assert, check, finish, freshPage, launch, shot } from './harness.mjs';
import { choose, finished, send, signIn } from './chat.mjs';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const relay = config.relay.replace(/\/$/, '');
const [first, second] = Object.keys(config.fakes).sort();
await launch(config);
const page = await freshPage();
await signIn(page, relay, config.alice);

/** The chat requests the fake behind `device` has received, oldest first. */
async function received(device) {
  const response = await fetch(new URL('/fake/requests', config.fakes[device]));
  assert(response.ok, `the fake of ${device} answered ${response.status}`);
  return response.json();
}

/** The request of `device`'s fake whose last message is the question `text`. */
async function requestFor(device, text) {
  const all = await received(device);
  return all.find((r) => r.messages?.at(-1)?.role === 'user' && r.messages.at(-1).content === text);
}

/** The titles in the conversation list, as shown. */
const titles = () => page.getByTestId('conversation').allInnerTexts();

/** Types `text` in the conversation search and waits until the list shows `expected` (the
 * titles, in order, or only how many). */
async function search(text, expected) {
  await page.getByLabel('Search conversations').fill(text);
  const want = JSON.stringify(expected);
  try {
    await page.waitForFunction(
      (want) => {
        const shown = [...document.querySelectorAll('[data-testid="conversation"]')].map((e) => e.textContent);
        return JSON.stringify(typeof JSON.parse(want) === 'number' ? shown.length : shown) === want;
      },
      want,
      { timeout: STEP / 4 },
    );
  } catch {
    throw new Error(`searching "${text}" lists ${JSON.stringify(await titles())}, not ${want}`);
  }
}

/** Accepts the next dialog (prompt or confirm) with `answer`. */
function acceptNext(answer) {
  page.once('dialog', (dialog) => void dialog.accept(answer));
}

await check('the device and model picked are the device and model that answer', async () => {
  await page.getByText('2 devices online').waitFor({ timeout: STEP });
  for (const [device, model, question] of [
    [first, /fake-echo/, 'Which device are you?'],
    [second, /fake-vision/, 'And which one are you?'],
  ]) {
    await choose(page, 'device', new RegExp(`^${device}$`));
    const [picked] = await choose(page, 'model', model);
    await send(page, question);
    const answer = await finished(page);
    assert(answer.includes(`to: ${question}`) && answer.includes(`${picked} on ${config.labels[device]}`), `answer: ${answer}`);
    const request = await requestFor(device, question);
    assert(request?.model === picked, `${device}'s backend saw ${JSON.stringify(request?.model)}, not ${picked}`);
    const other = device === first ? second : first;
    assert(!(await requestFor(other, question)), `the question also reached ${other}`);
  }
  await shot(page, 'devices');
});

await check('search finds conversations by title and by text; rename; delete, still gone after a reload', async () => {
  await page.getByTestId('new-chat').click();
  await choose(page, 'model', /fake-echo/);
  await send(page, 'Recipes for apple pie');
  await finished(page);
  await page.getByTestId('new-chat').click();
  await send(page, 'Packing list\nand do not forget the zebra costume');
  await finished(page);
  // The list shows a new conversation once it is stored: wait for it rather than read it once.
  await search('', 3);
  await search('APPLE', ['Recipes for apple pie']);
  // Found by a word of its text, not of its title.
  await search('zebra', ['Packing list']);
  await shot(page, 'search');
  await search('no such words anywhere', []);
  await page.getByText('Nothing found.').waitFor({ timeout: STEP });
  await search('', 3);

  acceptNext('Trip to the zoo');
  await page.getByRole('button', { name: 'Rename Packing list' }).click();
  await page.getByTestId('conversation').filter({ hasText: 'Trip to the zoo' }).waitFor({ timeout: STEP });
  await search('zoo', ['Trip to the zoo']);
  await search('', 3);

  acceptNext();
  await page.getByRole('button', { name: 'Delete Recipes for apple pie' }).click();
  await page.waitForFunction(() => document.querySelectorAll('[data-testid="conversation"]').length === 2, null, { timeout: STEP });
  await page.reload();
  await page.getByTestId('conversation').first().waitFor({ timeout: STEP });
  const after = await titles();
  assert(after.length === 2 && after.includes('Trip to the zoo') && !after.some((t) => t.includes('apple')), `after a reload: ${after}`);
});

/** Sets the system prompt of the conversation on screen. */
async function setSystemPrompt(text) {
  await page.getByRole('button', { name: 'System prompt' }).click();
  const box = page.getByLabel('System prompt for this conversation');
  await box.fill(text);
  await page.getByRole('button', { name: 'Save' }).click();
  await page.getByRole('button', { name: 'System prompt' }).click();
  await box.waitFor({ state: 'detached', timeout: STEP });
}

await check("a conversation's system prompt goes first in its requests, and in no other conversation's", async () => {
  // Whatever the search above left in the box, list every conversation again.
  await page.getByLabel('Search conversations').fill('');
  const pirate = 'You are a pirate. Answer in pirate speak.';
  await page.getByTestId('new-chat').click();
  await choose(page, 'device', new RegExp(`^${first}$`));
  await choose(page, 'model', /fake-echo/);
  await setSystemPrompt(pirate);
  const asked = ['Ahoy, who goes there?', 'Where is the treasure?'];
  for (const question of asked) {
    await send(page, question);
    await finished(page);
  }
  await page.getByTestId('new-chat').click();
  await send(page, 'A plain question');
  await finished(page);
  // The list shows the new conversation once it is saved, a moment after its answer ends.
  await page.getByTestId('conversation').first().filter({ hasText: 'A plain question' }).waitFor({ timeout: STEP });
  // Back to the first conversation (the second most recent): its prompt is still sent.
  await page.getByTestId('conversation').nth(1).click();
  await page.getByTestId('msg-user').filter({ hasText: asked[1] }).waitFor({ timeout: STEP });
  asked.push('Which ship is yours?');
  await send(page, asked[2]);
  await finished(page);
  for (const question of asked) {
    const request = await requestFor(first, question);
    const roles = request?.messages?.map((m) => m.role);
    assert(request?.messages[0].role === 'system' && request.messages[0].content === pirate, `"${question}": ${JSON.stringify(request?.messages)}`);
    assert(roles.filter((r) => r === 'system').length === 1, `"${question}": roles ${roles}`);
  }
  const plain = await requestFor(first, 'A plain question');
  assert(plain && !plain.messages.some((m) => m.role === 'system'), `the other conversation: ${JSON.stringify(plain?.messages)}`);
  await page.getByRole('button', { name: 'System prompt' }).click();
  const shown = await page.getByLabel('System prompt for this conversation').inputValue();
  assert(shown === pirate, `the prompt shown: ${shown}`);
  await shot(page, 'system-prompt');
  await page.getByRole('button', { name: 'System prompt' }).click();
  const listed = await titles();
  assert(listed.includes(asked[0]), `a conversation with a system prompt is named after its first message: ${listed}`);
});

await check("a reasoning model's thinking is folded apart from the answer, and never sent back", async () => {
  await choose(page, 'device', new RegExp(`^${second}$`));
  for (const model of [/fake-think/, /fake-r1/]) {
    await page.getByTestId('new-chat').click();
    await choose(page, 'model', model);
    const question = `Why is the sky blue, ${model.source}?`;
    const thought = `Pondering ${question} step by step.`;
    await send(page, question);
    const answer = await finished(page);
    assert(answer.includes(`to: ${question}`) && !answer.includes('Pondering') && !answer.includes('think>'), `the answer: ${answer}`);
    const block = page.getByTestId('msg-assistant').last().locator('details.thinking');
    assert(!(await block.evaluate((d) => d.open)), 'the thinking is not folded');
    assert((await block.locator('summary').innerText()) === 'Thought', 'the summary');
    await block.locator('summary').click();
    const text = await block.locator('.thinking-text').innerText({ timeout: STEP });
    assert(text.trim() === thought, `the thinking: ${text}`);
    if (model.source === 'fake-think') await shot(page, 'thinking');
    const next = `And at sunset, ${model.source}?`;
    await send(page, next);
    await finished(page);
    const request = await requestFor(second, next);
    const sent = JSON.stringify(request?.messages);
    assert(request?.messages.length === 3 && request.messages[1].role === 'assistant', `messages: ${sent}`);
    assert(request.messages[1].content.includes(`to: ${question}`), `the answer was not sent back: ${sent}`);
    assert(!sent.includes('Pondering') && !sent.includes('think>') && !sent.includes('"thinking"'), `the thinking was sent back: ${sent}`);
  }
});

await check('no script error on the page', async () => {
  assert(page.errors.length === 0, page.errors.join('\n'));
});

await finish();
