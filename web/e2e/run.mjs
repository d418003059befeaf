// End-to-end tests of the web page in headless Chromium (Debian's, driven by playwright-core),
// against a real relay, real daemons and the real Ollama that tests/tests/web_browser.rs starts.
// Usage: node e2e/run.mjs CONFIG.json — the config names the relay, the tokens and what each
// device serves. Prints one line per check and "N passed, N failed" last; exits 1 on a failure.
// Screenshots of the main states go to the config's `screenshots` folder. What every run
// shares (Chromium, checks, screenshots) is in harness.mjs, what a person does in the chat in
// chat.mjs; the chat's other features have their own run, features.mjs.

import { createServer } from 'node:http';
import { readFileSync, statSync } from 'node:fs';
import { STEP, assert, check, expectCount, finish, freshPage, launch, shot } from './harness.mjs';
import { choose, finished, send, signIn as signInAt } from './chat.mjs';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const relay = config.relay.replace(/\/$/, '');
await launch(config);
const signIn = (page, token) => signInAt(page, relay, token);

const alice = await freshPage();

await check('the sign-in page explains where a token comes from, behind a strict CSP', async () => {
  const response = await alice.goto(`${relay}/`);
  const csp = response.headers()['content-security-policy'] ?? '';
  assert(csp.includes("script-src 'self'") && !csp.includes('unsafe'), `CSP: ${csp}`);
  assert(csp.includes("frame-ancestors 'none'"), `CSP: ${csp}`);
  assert(response.headers()['x-content-type-options'] === 'nosniff', 'nosniff');
  await alice.getByText('Where do I get a client token?').click();
  await alice.getByText('cloudllm-relay token issue').waitFor();
  await shot(alice, 'signin');
});

await check('a pasted agent token is refused with the reason', async () => {
  await alice.getByLabel(/client token/i).fill(config.alice_agent);
  await alice.getByRole('button', { name: 'Sign in with this token' }).click();
  await alice.getByText('This is an agent token').waitFor({ timeout: STEP });
});

await check('sign in with a pasted client token', async () => {
  await signIn(alice, config.alice);
  const stored = await alice.evaluate(() => localStorage.getItem('cloudllm.session'));
  assert(stored && stored.includes(config.alice), 'the session is kept for reloads');
  assert(!alice.url().includes(config.alice), 'the token is never in the URL');
});

await check('the model picker shows each model with its device, and a device picker', async () => {
  await choose(alice, 'model', new RegExp(`${config.real_model}.*${config.real_device}`));
  const devices = await alice.getByTestId('device').locator('option').allInnerTexts();
  assert(devices.includes(config.real_device) && devices.includes(config.fake_device), `devices: ${devices}`);
  await alice.getByText('2 devices online').waitFor();
});

await check('tokens of the real Ollama arrive one by one', async () => {
  await alice.evaluate(() => localStorage.setItem('cloudllm.options', JSON.stringify({ num_predict: 24, temperature: 0 })));
  await choose(alice, 'device', new RegExp(`^${config.real_device}$`));
  await choose(alice, 'model', new RegExp(config.real_model));
  await send(alice, 'Count from one to twenty.');
  // Sample the answer's length as it grows: several distinct lengths before the end means the
  // page rendered tokens as they came, not the whole answer at once.
  const lengths = await alice.evaluate(
    (step) =>
      new Promise((resolve, reject) => {
        const seen = [];
        const started = Date.now();
        const tick = () => {
          const answers = document.querySelectorAll('[data-testid="answer"]');
          const text = answers[answers.length - 1]?.textContent ?? '';
          if (seen[seen.length - 1] !== text.length) seen.push(text.length);
          if (document.querySelector('[data-testid="send"]') && seen.length > 1) return resolve(seen);
          if (Date.now() - started > step) return reject(new Error(`no answer: ${seen}`));
          requestAnimationFrame(tick);
        };
        tick();
      }),
    STEP,
  );
  // Paints are at most every 50 ms, so a fast short answer shows few steps; at least one
  // partial answer between the empty one and the last means it streamed (a page that rendered
  // the whole answer at once would show two).
  assert(lengths.length >= 3, `the answer grew in ${lengths.length} steps: ${lengths}`);
  const answer = await finished(alice);
  assert(answer.trim().length > 0, 'an answer');
  await shot(alice, 'chat');
});

/** Go's duration as GIN prints it ("93.629µs", "1.000906192s", "1m2.5s") in seconds. */
function goSeconds(text) {
  const units = { h: 3600, m: 60, s: 1, ms: 1e-3, 'µs': 1e-6, us: 1e-6, ns: 1e-9 };
  let total = 0;
  for (const [, value, unit] of text.matchAll(/([\d.]+)(h|ms|m|s|µs|us|ns)/g)) total += Number(value) * units[unit];
  return total;
}

/** The real Ollama's `/api/chat` requests that ended after byte `from` of its log, with how
 * long each took (GIN writes one line when a handler returns). */
function ollamaChatsEnded(log, from) {
  const text = readFileSync(log).subarray(from).toString('utf8');
  return [...text.matchAll(/^\[GIN\][^|]*\|\s*(\d+)\s*\|\s*(\S+)\s*\|[^|]*\|\s*POST\s+"\/api\/chat"/gm)].map((m) => ({
    status: Number(m[1]),
    seconds: goSeconds(m[2]),
  }));
}

/** How soon after Stop Ollama must end the request: cancellation takes well under a second;
 * the rest is room for a loaded machine. The uncancelled generation runs for minutes. */
const CANCEL_SECONDS = 5;

await check('Stop on the real Ollama: Ollama ends the generation at once', async () => {
  // A generation that runs for minutes on this CPU unless Stop cancels it at Ollama: a large
  // num_predict, and a repeat penalty, because Ollama itself ends a stream that repeats one
  // token 30 times (which this small model soon does).
  await alice.evaluate(() => localStorage.setItem('cloudllm.options', JSON.stringify({ num_predict: 100000, repeat_penalty: 1.8 })));
  await choose(alice, 'device', new RegExp(`^${config.real_device}$`));
  await choose(alice, 'model', new RegExp(config.real_model));
  const log = config.real_ollama_log;
  const from = log ? statSync(log).size : 0;
  const sent = Date.now();
  await send(alice, 'Tell me a very long story.');
  await alice.waitForFunction(() => {
    const answers = document.querySelectorAll('[data-testid="answer"]');
    return (answers[answers.length - 1]?.textContent ?? '').length > 0;
  }, null, { timeout: STEP });
  const firstToken = Date.now();
  // Let it stream a while, so that the request Ollama ends is told apart from short ones.
  await alice.waitForTimeout(3000);
  await alice.getByTestId('stop').click();
  const stopped = Date.now();
  await alice.getByText('Stopped.').waitFor({ timeout: STEP });
  await alice.getByTestId('send').waitFor({ timeout: STEP });
  await shot(alice, 'stopped');
  if (!log) {
    console.log('note: the real Ollama was started elsewhere (no log): its side of Stop is not checked');
  } else {
    // GIN logs each request when its handler returns: the stopped one must have run at least
    // from the first token to Stop, and ended within CANCEL_SECONDS of Stop.
    const lower = (stopped - firstToken) / 1000;
    const upper = (stopped - sent) / 1000 + CANCEL_SECONDS;
    const ours = () => ollamaChatsEnded(log, from).filter((r) => r.seconds >= lower && r.seconds <= upper);
    const deadline = stopped + CANCEL_SECONDS * 1000;
    while (!ours().length && Date.now() < deadline) await alice.waitForTimeout(100);
    const ended = ours();
    assert(
      ended.length === 1,
      `Ollama did not end the stopped request within ${CANCEL_SECONDS} s (between ${lower} and ${upper} s long): ${JSON.stringify(ollamaChatsEnded(log, from))}`,
    );
    console.log(`  Ollama ended the request after ${ended[0].seconds.toFixed(2)} s, Stop came ${(stopped - sent) / 1000} s after sending`);
  }
  await alice.evaluate(() => localStorage.setItem('cloudllm.options', JSON.stringify({ num_predict: 24, temperature: 0 })));
  await alice.getByTestId('new-chat').click();
});

await check('Stop (Esc) ends the answer and the request', async () => {
  await choose(alice, 'device', new RegExp(`^${config.fake_device}$`));
  await choose(alice, 'model', /fake-slow/);
  await send(alice, 'Count forever.');
  await alice.waitForFunction(() => {
    const answers = document.querySelectorAll('[data-testid="answer"]');
    return (answers[answers.length - 1]?.textContent ?? '').split('tick').length > 3;
  }, null, { timeout: STEP });
  await alice.getByTestId('stop').waitFor();
  await alice.keyboard.press('Escape');
  await alice.getByText('Stopped.').waitFor({ timeout: STEP });
  await alice.getByTestId('send').waitFor({ timeout: STEP });
  // tests/tests/web_browser.rs checks that the backend saw the request cancelled.
});

await check('Markdown from the model cannot run script; code gets highlighted with a copy button', async () => {
  await choose(alice, 'model', /fake-md/);
  await send(alice, 'Show me some markdown.');
  await finished(alice);
  const state = await alice.evaluate(() => ({
    pwned: window.__pwned ?? null,
    onerror: document.querySelectorAll('[onerror]').length,
    scripts: document.querySelectorAll('.md script').length,
    images: document.querySelectorAll('.md img').length,
    jsLinks: document.querySelectorAll('.md a[href^="javascript"]').length,
    copy: document.querySelectorAll('.md pre button.copy').length,
    highlighted: document.querySelectorAll('.md pre code.hljs span').length,
    bold: document.querySelector('.md strong')?.textContent ?? '',
  }));
  assert(state.pwned === null, `script ran: ${state.pwned}`);
  assert(state.onerror === 0 && state.scripts === 0 && state.images === 0 && state.jsLinks === 0, `dangerous markup kept: ${JSON.stringify(state)}`);
  assert(state.copy >= 1 && state.highlighted > 0, `code not decorated: ${JSON.stringify(state)}`);
  assert(state.bold === 'bold', `markdown not rendered: ${JSON.stringify(state)}`);
  await alice.waitForTimeout(300);
  const again = await alice.evaluate(() => window.__pwned ?? null);
  assert(again === null, 'an image error handler ran');
  await shot(alice, 'markdown');
});

await check('the conversations are still there after a reload', async () => {
  const before = await alice.getByTestId('conversation').count();
  assert(before >= 1, 'conversations listed');
  await alice.reload();
  await alice.getByTestId('new-chat').waitFor({ timeout: STEP });
  await alice.getByTestId('conversation').first().waitFor({ timeout: STEP });
  await expectCount(alice.getByTestId('conversation'), before, 'same count after reload');
  await alice.getByTestId('conversation').first().click();
  await alice.getByTestId('msg-user').first().waitFor({ timeout: STEP });
});

await check('dark theme and a phone-sized screen', async () => {
  await alice.emulateMedia({ colorScheme: 'dark' });
  await shot(alice, 'chat-dark');
  const bg = await alice.evaluate(() => getComputedStyle(document.body).backgroundColor);
  assert(bg !== 'rgb(255, 255, 255)', `dark background: ${bg}`);
  await alice.emulateMedia({ colorScheme: 'light' });
  await alice.setViewportSize({ width: 390, height: 800 });
  try {
    // The conversation list slides away (a 0.2 s transition) and the chat takes the screen.
    await alice.waitForFunction(() => {
      const box = document.querySelector('.sidebar')?.getBoundingClientRect();
      return !box || box.right <= 1;
    }, null, { timeout: STEP });
    const input = await alice.getByTestId('input').boundingBox();
    assert(input && input.x >= 0 && input.x + input.width <= 390, `the message box does not fit: ${JSON.stringify(input)}`);
    await shot(alice, 'phone');
  } finally {
    await alice.setViewportSize({ width: 1100, height: 760 });
  }
});

await check('sign out forgets the token', async () => {
  await alice.getByTestId('sign-out').click();
  await alice.getByLabel(/client token/i).waitFor({ timeout: STEP });
  const stored = await alice.evaluate(() => localStorage.getItem('cloudllm.session'));
  assert(stored === null, 'the token is gone');
});

await check('another user on the same browser sees nothing of the first; an offline device is a banner', async () => {
  await signIn(alice, config.bob);
  await alice.getByTestId('banner-offline').waitFor({ timeout: STEP });
  assert((await alice.getByTestId('conversation').count()) === 0, "bob sees alice's conversations");
  await shot(alice, 'offline');
  await alice.getByTestId('sign-out').click();
});

await check('an expired or revoked token sends back to sign-in with the reason', async () => {
  // A token the relay did not sign (like a revoked one): accepted by the page, refused by the
  // relay at the first request, and the page returns to sign-in saying so.
  await alice.getByLabel(/client token/i).fill(config.forged);
  await alice.getByRole('button', { name: 'Sign in with this token' }).click();
  await alice.getByTestId('signin-reason').waitFor({ timeout: STEP });
  const reason = await alice.getByTestId('signin-reason').innerText();
  assert(/refused your sign-in/.test(reason), reason);
  await alice.getByLabel(/client token/i).fill(config.expired);
  await alice.getByRole('button', { name: 'Sign in with this token' }).click();
  await alice.getByText('This token has expired').waitFor({ timeout: STEP });
});

await check('cloudllm open signs the browser in from a one-time code', async () => {
  const minted = await (
    await fetch(`${relay}/cloudllm/open`, { method: 'POST', headers: { authorization: `Bearer ${config.alice_agent}` } })
  ).json();
  const page = await freshPage();
  await page.goto(relay + minted.path);
  await page.getByTestId('new-chat').waitFor({ timeout: STEP });
  assert(!page.url().includes('open='), `the code is left in the address: ${page.url()}`);
  // Signed in as alice: her two devices answer.
  await page.getByText('2 devices online').waitFor({ timeout: STEP });
  // The code worked once: opening the same link again is refused with the reason.
  const again = await freshPage();
  await again.goto(relay + minted.path);
  await again.getByTestId('signin-reason').waitFor({ timeout: STEP });
  await page.context().close();
  await again.context().close();
});

await check('a page on an allowed origin calls the API through CORS; another origin cannot', async () => {
  const app = `<!doctype html><title>other app</title><p>other app</p>`;
  const serve = (port) =>
    new Promise((resolve) => {
      const server = createServer((_req, res) => {
        res.setHeader('content-type', 'text/html');
        res.end(app);
      });
      server.listen(port, '127.0.0.1', () => resolve(server));
    });
  const allowed = await serve(config.cors_port);
  const other = await serve(0);
  const call = async (port) => {
    const page = await freshPage();
    await page.goto(`http://127.0.0.1:${port}/`);
    const result = await page.evaluate(
      async ({ relay, token }) => {
        try {
          const r = await fetch(`${relay}/api/tags`, { headers: { authorization: `Bearer ${token}` } });
          return { status: r.status, models: (await r.json()).models.length };
        } catch (err) {
          return { error: String(err) };
        }
      },
      { relay, token: config.alice },
    );
    await page.context().close();
    return result;
  };
  const ok = await call(config.cors_port);
  assert(ok.status === 200 && ok.models >= 1, `allowed origin: ${JSON.stringify(ok)}`);
  const refused = await call(other.address().port);
  assert(refused.error, `another origin read the API: ${JSON.stringify(refused)}`);
  allowed.close();
  other.close();
});

await check('no script error on the page', async () => {
  assert(alice.errors.length === 0, alice.errors.join('\n'));
});

await finish();
