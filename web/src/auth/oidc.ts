// Sign-in with the relay's identity provider in the page: OpenID Connect authorization code with
// PKCE (a public client: no secret in the page), then refresh before expiry when the provider
// gave a refresh token. The verifier and state live in sessionStorage for the one round trip.

import type { Session } from './token';
import { sessionFor } from './token';

const PENDING_KEY = 'cloudllm.oidc';
/** Refresh this long before the token expires: covers a slow provider and a clock skew. For
 * tokens that live less than twice this, half their lifetime instead: a margin longer than the
 * lifetime would refresh again the moment each new token arrives, in a loop. */
export const REFRESH_MARGIN_MS = 60_000;

export interface OidcConfig {
  issuer: string;
  client_id: string;
  scopes: string[];
}

interface Discovery {
  authorization_endpoint: string;
  token_endpoint: string;
}

interface Pending {
  issuer: string;
  verifier: string;
  state: string;
  tokenEndpoint: string;
  clientId: string;
  redirectUri: string;
}

function base64url(bytes: Uint8Array): string {
  let text = '';
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function random(bytes = 32): string {
  return base64url(crypto.getRandomValues(new Uint8Array(bytes)));
}

/** The PKCE S256 challenge of `verifier`. */
export async function challengeOf(verifier: string): Promise<string> {
  const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier));
  return base64url(new Uint8Array(digest));
}

async function discover(issuer: string): Promise<Discovery> {
  const response = await fetch(`${issuer.replace(/\/$/, '')}/.well-known/openid-configuration`);
  if (!response.ok) throw new Error(`the identity provider did not answer (${response.status})`);
  const body = (await response.json()) as Partial<Discovery>;
  if (typeof body.authorization_endpoint !== 'string' || typeof body.token_endpoint !== 'string')
    throw new Error('the identity provider published no authorization or token endpoint');
  return { authorization_endpoint: body.authorization_endpoint, token_endpoint: body.token_endpoint };
}

/** The redirect URI registered for the page: the relay's own root. */
export function redirectUri(): string {
  return `${location.origin}/`;
}

/** Starts a sign-in: sends the browser to the provider. */
export async function startSignIn(config: OidcConfig): Promise<void> {
  const discovery = await discover(config.issuer);
  const pending: Pending = {
    issuer: config.issuer,
    verifier: random(48),
    state: random(16),
    tokenEndpoint: discovery.token_endpoint,
    clientId: config.client_id,
    redirectUri: redirectUri(),
  };
  sessionStorage.setItem(PENDING_KEY, JSON.stringify(pending));
  const url = new URL(discovery.authorization_endpoint);
  url.searchParams.set('response_type', 'code');
  url.searchParams.set('client_id', config.client_id);
  url.searchParams.set('redirect_uri', pending.redirectUri);
  url.searchParams.set('scope', config.scopes.join(' '));
  url.searchParams.set('state', pending.state);
  url.searchParams.set('code_challenge', await challengeOf(pending.verifier));
  url.searchParams.set('code_challenge_method', 'S256');
  location.assign(url.toString());
}

interface TokenAnswer {
  access_token?: unknown;
  refresh_token?: unknown;
  error?: unknown;
  error_description?: unknown;
}

async function tokenRequest(endpoint: string, form: Record<string, string>): Promise<TokenAnswer> {
  const response = await fetch(endpoint, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams(form).toString(),
  });
  const body = (await response.json().catch(() => ({}))) as TokenAnswer;
  if (!response.ok || typeof body.access_token !== 'string') {
    const why = typeof body.error_description === 'string' ? body.error_description : String(body.error ?? response.status);
    throw new Error(`the identity provider refused the sign-in: ${why}`);
  }
  return body;
}

function toSession(answer: TokenAnswer, pending: { tokenEndpoint: string; clientId: string }): Session {
  const made = sessionFor(String(answer.access_token), 'oidc');
  if ('error' in made) throw new Error(`the identity provider's token cannot be used: ${made.error}`);
  if (typeof answer.refresh_token === 'string')
    made.session.refresh = { token: answer.refresh_token, tokenEndpoint: pending.tokenEndpoint, clientId: pending.clientId };
  return made.session;
}

/** Completes a sign-in when the page is the provider's redirect (`?code=…&state=…`): the
 * session, or null when this load is no redirect. Removes the code from the address bar. */
export async function completeSignIn(): Promise<Session | null> {
  const params = new URLSearchParams(location.search);
  const code = params.get('code');
  const state = params.get('state');
  const error = params.get('error');
  if (!code && !error) return null;
  history.replaceState(null, '', location.pathname);
  const raw = sessionStorage.getItem(PENDING_KEY);
  sessionStorage.removeItem(PENDING_KEY);
  if (error) throw new Error(`the identity provider refused the sign-in: ${params.get('error_description') ?? error}`);
  if (!raw) throw new Error('this sign-in was not started here: sign in again');
  const pending = JSON.parse(raw) as Pending;
  if (state !== pending.state) throw new Error('the sign-in answer does not match: sign in again');
  // RFC 9207: a provider that names itself must be the one the sign-in went to (mix-up defence).
  const iss = params.get('iss');
  if (iss !== null && !sameIssuer(iss, pending.issuer))
    throw new Error('the sign-in answer came from another identity provider: sign in again');
  const answer = await tokenRequest(pending.tokenEndpoint, {
    grant_type: 'authorization_code',
    code: code ?? '',
    redirect_uri: pending.redirectUri,
    client_id: pending.clientId,
    code_verifier: pending.verifier,
  });
  return toSession(answer, pending);
}

/** A fresh session from the refresh token, or throws. */
export async function refreshSession(session: Session): Promise<Session> {
  if (!session.refresh) throw new Error('no refresh token');
  const answer = await tokenRequest(session.refresh.tokenEndpoint, {
    grant_type: 'refresh_token',
    refresh_token: session.refresh.token,
    client_id: session.refresh.clientId,
  });
  const next = toSession(answer, session.refresh);
  if (!next.refresh) next.refresh = session.refresh;
  return next;
}

/** Whether two issuer URLs name the same provider (a trailing `/` aside). */
export function sameIssuer(a: string, b: string): boolean {
  return a.replace(/\/+$/, '') === b.replace(/\/+$/, '');
}

/** Milliseconds until `session` should be refreshed (0: now), or null when it cannot be:
 * [`REFRESH_MARGIN_MS`] before it expires, or half its lifetime before for a short-lived one. */
export function refreshDelay(session: Session, now = Date.now()): number | null {
  if (!session.refresh || !session.expiresAt) return null;
  const lifetime = session.expiresAt - (session.issuedAt ?? now);
  const margin = Math.min(REFRESH_MARGIN_MS, Math.max(0, lifetime / 2));
  return Math.max(0, session.expiresAt - margin - now);
}
