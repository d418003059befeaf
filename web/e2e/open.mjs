// `cloudllm open` in headless Chromium: the link the real CLI printed (tests in
// cli/tests/open.rs run the relay, the daemon and `cloudllm open --print`) opens the page
// signed in as the daemon's user, takes the one-time code out of the address, and works once.
// Usage: node e2e/open.mjs CONFIG.json — `link` (what the CLI printed), `user`, `device`.

import { readFileSync } from 'node:fs';
import { STEP, assert, check, finish, freshPage, launch, shot } from './harness.mjs';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
await launch(config);
const page = await freshPage();

await check('the link from `cloudllm open` opens the page signed in as the user', async () => {
  await page.goto(config.link);
  await page.getByTestId('new-chat').waitFor({ timeout: STEP });
  assert(!page.url().includes('open='), `the code is left in the address: ${page.url()}`);
  await page.locator('.who').getByText(config.user, { exact: true }).waitFor({ timeout: STEP });
  await page.getByText(`${config.device} online`).waitFor({ timeout: STEP });
  const session = JSON.parse(await page.evaluate(() => localStorage.getItem('cloudllm.session')));
  assert(session.source === 'open' && !session.refresh, `session: ${session.source}`);
  await shot(page, 'open-signed-in');
});

await check('the same link a second time is refused with the reason', async () => {
  const again = await freshPage();
  await again.goto(config.link);
  const reason = await again.getByTestId('signin-reason').innerText({ timeout: STEP });
  assert(/expired or was already used/.test(reason), reason);
  assert((await again.evaluate(() => localStorage.getItem('cloudllm.session'))) === null, 'signed in anyway');
  assert(!again.url().includes('open='), `the code is left in the address: ${again.url()}`);
  await again.context().close();
});

await check('no script error on the page', async () => {
  assert(page.errors.length === 0, page.errors.join('\n'));
});

await finish();
