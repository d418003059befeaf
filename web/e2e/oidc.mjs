// Sign-in through the relay's identity provider, in headless Chromium: the page runs OpenID
// Connect's authorization code flow with PKCE against the real `oidc-provider` that
// tests/tests/web_oidc.rs starts (its development login and consent pages, played here as a
// person would), comes back signed in, chats through the relay with the provider's token, and
// renews that token before it expires (the provider issues short-lived ones for this run).
// Usage: node e2e/oidc.mjs CONFIG.json — `relay`, `issuer`, `user` (the login to type),
// `access_ttl` (seconds), `device` (the user's one device) and `model` (a fake-md model).

import { readFileSync } from 'node:fs';
import { STEP, assert, check, finish, freshPage, launch, shot } from './harness.mjs';
import { finished, send } from './chat.mjs';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const relay = config.relay.replace(/\/$/, '');
const issuer = config.issuer.replace(/\/$/, '');
const ttlMs = config.access_ttl * 1000;
await launch(config);

/** The claims of a JWT, unverified: to tell one token from the next. */
function claims(token) {
  return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString());
}

async function session(page) {
  return JSON.parse((await page.evaluate(() => localStorage.getItem('cloudllm.session'))) ?? 'null');
}

/** Sends `text` as a person would and returns the finished answer. */
async function ask(page, text) {
  await send(page, text);
  return finished(page);
}

const page = await freshPage();
// What the page sends: the bearer token of each chat request to the relay, and each grant it
// asks the provider's token endpoint for.
const chats = [];
const grants = [];
page.on('request', (request) => {
  if (request.url() === `${relay}/api/chat`) chats.push(request.headers().authorization ?? '');
  if (request.url().startsWith(issuer) && request.method() === 'POST' && /grant_type=/.test(request.postData() ?? ''))
    grants.push({ grant: new URLSearchParams(request.postData()).get('grant_type'), at: Date.now() });
});
let signedInAt = 0;
let first = null;

await check('the sign-in page offers the identity provider; the CSP lets the page reach it and nothing else', async () => {
  const response = await page.goto(`${relay}/`);
  const csp = response.headers()['content-security-policy'] ?? '';
  assert(csp.includes(`connect-src 'self' ${new URL(issuer).origin};`), `CSP: ${csp}`);
  await page.getByTestId('signin-provider').waitFor({ timeout: STEP });
});

await check("Sign in goes through the provider's login and consent and comes back signed in", async () => {
  const discovery = await (await fetch(`${issuer}/.well-known/openid-configuration`)).json();
  const authorizing = page.waitForRequest((r) => r.url().startsWith(discovery.authorization_endpoint), { timeout: STEP });
  await page.getByTestId('signin-provider').click();
  const authorize = new URL((await authorizing).url());
  await page.locator('input[name="login"]').fill(config.user);
  await page.locator('input[name="password"]').fill('any password works here');
  await page.getByRole('button', { name: 'Sign-in' }).click();
  await page.getByRole('button', { name: 'Continue' }).click({ timeout: STEP });
  await page.getByTestId('new-chat').waitFor({ timeout: STEP });
  signedInAt = Date.now();
  assert(page.url() === `${relay}/`, `the code or state is left in the address: ${page.url()}`);
  const pending = await page.evaluate(() => sessionStorage.getItem('cloudllm.oidc'));
  assert(pending === null, 'the PKCE verifier outlived the sign-in');
  first = await session(page);
  assert(first?.source === 'oidc' && first.refresh?.token, `no refreshable session: ${JSON.stringify(first && { ...first, token: '…', refresh: !!first.refresh })}`);
  assert(claims(first.token).sub === config.user, `signed in as ${claims(first.token).sub}`);
  assert(claims(first.token).client_id === config.client_id, `a token of client ${claims(first.token).client_id}`);
  assert(grants.length === 1 && grants[0].grant === 'authorization_code', `grants: ${JSON.stringify(grants)}`);
  const asked = Object.fromEntries(authorize.searchParams);
  assert(asked.code_challenge_method === 'S256' && asked.code_challenge?.length === 43, `PKCE: ${authorize.search}`);
  assert(asked.redirect_uri === `${relay}/` && asked.client_id === config.client_id, `client: ${authorize.search}`);
  assert(asked.state?.length >= 16 && asked.scope?.split(' ').includes('client'), `state and scope: ${authorize.search}`);
  await page.locator('.who').getByText(config.user).waitFor({ timeout: STEP });
  await page.getByText(`${config.device} online`).waitFor({ timeout: STEP });
  await shot(page, 'oidc-signed-in');
});

await check("a message goes to the user's device with the provider's token", async () => {
  await page.getByTestId('model').selectOption(config.model);
  const answer = await ask(page, 'Hello through the identity provider.');
  assert(answer.includes('bold'), `answer: ${answer}`);
  assert(chats.length === 1 && chats[0] === `Bearer ${first.token}`, 'the chat did not carry the signed-in token');
});

await check('the token is renewed before it expires (half-way for a short-lived one) and the new one is used', async () => {
  await page.waitForFunction(
    (old) => (JSON.parse(localStorage.getItem('cloudllm.session') ?? 'null')?.token ?? old) !== old,
    first.token,
    { timeout: ttlMs + STEP },
  );
  const renewedAt = Date.now();
  const next = await session(page);
  const refreshes = grants.filter((g) => g.grant === 'refresh_token');
  assert(refreshes.length === 1, `refresh grants: ${refreshes.length}`);
  // Not at once (a refresh loop), not after the expiry: about half the lifetime, counted from
  // the token's issue (`iat`, whole seconds).
  const waited = refreshes[0].at - claims(first.token).iat * 1000;
  assert(waited >= ttlMs / 2 - 1000 && renewedAt - signedInAt < ttlMs, `renewed after ${waited} ms of a ${ttlMs} ms token`);
  assert(claims(next.token).jti !== claims(first.token).jti && claims(next.token).exp > claims(first.token).exp, 'the same token again');
  assert(claims(next.token).sub === config.user, 'another user');
  assert(next.refresh?.token, 'the renewed session lost its refresh token');
  const answer = await ask(page, 'Still there?');
  assert(answer.includes('bold'), `answer: ${answer}`);
  assert(chats.at(-1) === `Bearer ${next.token}`, 'the chat after the refresh used the old token');
});

await check('a sign-in answer this page did not start is refused with the reason', async () => {
  const other = await freshPage();
  await other.goto(`${relay}/?code=forged-code&state=forged-state`);
  const reason = await other.getByTestId('signin-reason').innerText({ timeout: STEP });
  assert(/not started here/.test(reason), reason);
  assert(!other.url().includes('code='), `the code is left in the address: ${other.url()}`);
  assert((await other.evaluate(() => localStorage.getItem('cloudllm.session'))) === null, 'signed in anyway');
  await other.context().close();
});

await check('a sign-in answer naming another provider is refused (RFC 9207)', async () => {
  const other = await freshPage();
  await other.goto(`${relay}/`);
  await other.evaluate(
    ({ issuer }) =>
      sessionStorage.setItem(
        'cloudllm.oidc',
        JSON.stringify({ issuer, verifier: 'v', state: 's1', tokenEndpoint: `${issuer}/token`, clientId: 'x', redirectUri: `${location.origin}/` }),
      ),
    { issuer },
  );
  await other.goto(`${relay}/?code=c&state=s1&iss=${encodeURIComponent('http://127.0.0.1:9/')}`);
  const reason = await other.getByTestId('signin-reason').innerText({ timeout: STEP });
  assert(/another identity provider/.test(reason), reason);
  await other.context().close();
});

await check('sign out forgets the token and the refresh token', async () => {
  await page.getByTestId('sign-out').click();
  await page.getByTestId('signin-provider').waitFor({ timeout: STEP });
  assert((await page.evaluate(() => localStorage.getItem('cloudllm.session'))) === null, 'the session is kept');
});

await check('no script error on the page', async () => {
  assert(page.errors.length === 0, page.errors.join('\n'));
});

await finish();
