// The web page's figures, measured in headless Chromium through the DevTools protocol:
// first-load bytes (compressed, as sent), time to open a 500-message conversation, and main-
// thread time per token while a 2,000-token answer streams in. Run by `cloudllm-bench web`.
//
// Protocol: starts a fake Ollama (a fake: it streams TOKENS canned tokens) on 127.0.0.1:0 and
// prints `ollama http://127.0.0.1:PORT`; then reads one JSON line on stdin with the relay's
// URL and a client token, measures, and prints one JSON line of figures.

import { createServer } from 'node:http';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const TOKENS = 2000;
const MESSAGES = 500;
/** Pause between streamed tokens: 2 ms, faster than any model, so rendering is the bottleneck. */
const TOKEN_GAP_MS = 2;

const WORDS = ['The', ' quick', ' **brown**', ' fox', ' jumps', ' over', ' the', ' `lazy`', ' dog', '.\n\n', '- item', ' one\n', '```js\n', 'const x = 1;\n', '```\n'];

const fake = createServer((req, res) => {
  let body = '';
  req.on('data', (c) => (body += c));
  req.on('end', () => {
    const json = (value) => {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(value));
    };
    if (req.url === '/api/version') return json({ version: '0.0.0-fake' });
    if (req.url === '/api/tags') return json({ models: [{ name: 'bench:latest', model: 'bench:latest', size: 1 }] });
    if (req.url === '/api/show') return json({ capabilities: ['completion'] });
    if (req.url === '/api/chat') {
      res.setHeader('content-type', 'application/x-ndjson');
      let n = 0;
      const timer = setInterval(() => {
        if (n >= TOKENS) {
          clearInterval(timer);
          res.end(`${JSON.stringify({ model: 'bench:latest', done: true, done_reason: 'stop' })}\n`);
          return;
        }
        const content = WORDS[n % WORDS.length];
        res.write(`${JSON.stringify({ model: 'bench:latest', message: { role: 'assistant', content }, done: false })}\n`);
        n += 1;
      }, TOKEN_GAP_MS);
      res.on('close', () => clearInterval(timer));
      return;
    }
    res.statusCode = 404;
    res.end('404 page not found');
  });
});
await new Promise((resolve) => fake.listen(0, '127.0.0.1', resolve));
console.log(`ollama http://127.0.0.1:${fake.address().port}`);

const lines = createInterface({ input: process.stdin });
const first = await new Promise((resolve) => lines.once('line', resolve));
const { relay, token, chromium: executablePath } = JSON.parse(first);

const browser = await chromium.launch({
  executablePath: executablePath ?? '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const context = await browser.newContext({ viewport: { width: 1100, height: 800 } });
const page = await context.newPage();
const cdp = await context.newCDPSession(page);
await cdp.send('Network.enable');
await cdp.send('Performance.enable');

// 1. First load: every byte the page's own files took on the wire, compressed.
const bytes = new Map();
cdp.on('Network.loadingFinished', (e) => bytes.set(e.requestId, e.encodedDataLength));
const urls = new Map();
cdp.on('Network.responseReceived', (e) => urls.set(e.requestId, e.response.url));
await page.goto(`${relay}/`, { waitUntil: 'networkidle' });
let firstLoad = 0;
for (const [id, size] of bytes) if (!urls.get(id)?.includes('/cloudllm/')) firstLoad += size;

// 2. A 500-message conversation, opened from the list.
await page.getByLabel(/client token/i).fill(token);
await page.getByRole('button', { name: 'Sign in with this token' }).click();
await page.getByTestId('new-chat').waitFor();
await page.evaluate(
  async ({ count }) => {
    const session = JSON.parse(localStorage.getItem('cloudllm.session'));
    const messages = Array.from({ length: count }, (_, i) =>
      i % 2
        ? { role: 'assistant', content: `Answer ${i} with **bold**, a list:\n\n- one\n- two\n\n\`\`\`python\nprint(${i})\n\`\`\`\n`, model: 'bench:latest' }
        : { role: 'user', content: `Question ${i}: how does this work?` },
    );
    const db = await new Promise((resolve, reject) => {
      const open = indexedDB.open('cloudllm', 1);
      open.onsuccess = () => resolve(open.result);
      open.onerror = () => reject(open.error);
    });
    const tx = db.transaction(['conversations', 'messages'], 'readwrite');
    const now = Date.now();
    tx.objectStore('conversations').put({ id: 'bench-500', user: session.user, title: 'Bench 500', systemPrompt: '', model: 'bench:latest', device: '', createdAt: now, updatedAt: now, messageCount: count });
    tx.objectStore('messages').put({ id: 'bench-500', user: session.user, messages });
    await new Promise((resolve) => (tx.oncomplete = resolve));
    db.close();
  },
  { count: MESSAGES },
);
await page.reload();
await page.getByTestId('conversation').first().waitFor();
const openMs = await page.evaluate(
  (count) =>
    new Promise((resolve) => {
      const start = performance.now();
      document.querySelector('[data-testid="conversation"]').click();
      const done = () => {
        if (document.querySelectorAll('article.msg').length >= count)
          // Two frames: the one that lays the messages out, and its paint.
          requestAnimationFrame(() => requestAnimationFrame(() => resolve(performance.now() - start)));
        else requestAnimationFrame(done);
      };
      done();
    }),
  MESSAGES,
);

// 3. A 2,000-token answer streamed into a new chat: main-thread busy time per token.
await page.getByTestId('new-chat').click();
const metric = async () => {
  const { metrics } = await cdp.send('Performance.getMetrics');
  return Object.fromEntries(metrics.map((m) => [m.name, m.value]));
};
const before = await metric();
const started = Date.now();
await page.getByTestId('input').fill('Stream a long answer.');
await page.getByTestId('input').press('Enter');
await page.getByTestId('stop').waitFor();
try {
  await page.getByTestId('send').waitFor({ timeout: 120_000 });
} catch (err) {
  await page.screenshot({ path: '/tmp/bench-fail.png' });
  const text = await page.evaluate(() => document.body.innerText.slice(-500));
  throw new Error(`the stream did not end: ${err}\n${text}`);
}
const after = await metric();
const streamMs = Date.now() - started;
const taskMs = (after.TaskDuration - before.TaskDuration) * 1000;
const scriptMs = (after.ScriptDuration - before.ScriptDuration) * 1000;

console.log(
  JSON.stringify({
    first_load_bytes: firstLoad,
    open_500_ms: Math.round(openMs * 10) / 10,
    stream_tokens: TOKENS,
    stream_ms: streamMs,
    main_thread_ms_per_token: Math.round((taskMs / TOKENS) * 1000) / 1000,
    script_ms_per_token: Math.round((scriptMs / TOKENS) * 1000) / 1000,
  }),
);
await browser.close();
fake.close();
process.exit(0);
