// The signed-in session: the bearer token, who it names and until when, kept in localStorage so
// a reload stays signed in. Reading a JWT's claims here is for display and partitioning only:
// the relay verifies every token.

/** Where the session is kept. Signing out removes it. */
export const SESSION_KEY = 'cloudllm.session';

/** How a session was made: it decides what "expired" tells the person to do. */
export type Source = 'paste' | 'oidc' | 'open';

export interface Session {
  token: string;
  /** `iss` + `sub` of the token: conversations are kept per user. */
  user: string;
  /** A short name to show (the `sub`, or `email`/`name` when the token has one). */
  label: string;
  /** Expiry in ms since the epoch, 0 when the token does not say. */
  expiresAt: number;
  /** When the token was issued (its `iat`, else when the page got it), ms since the epoch:
   * with `expiresAt`, its lifetime, which bounds how early a refresh may come. */
  issuedAt?: number;
  source: Source;
  /** With OIDC: what refreshing the token needs. */
  refresh?: { token: string; tokenEndpoint: string; clientId: string };
}

export interface Claims {
  sub?: unknown;
  iss?: unknown;
  exp?: unknown;
  iat?: unknown;
  scope?: unknown;
  email?: unknown;
  name?: unknown;
}

/** The claims of a JWT (unverified), or null when `token` is not one. */
export function claimsOf(token: string): Claims | null {
  const parts = token.split('.');
  if (parts.length !== 3 || !parts[1]) return null;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const value = JSON.parse(new TextDecoder().decode(bytes)) as unknown;
    return value && typeof value === 'object' ? (value as Claims) : null;
  } catch {
    return null;
  }
}

/** Whether a scope claim (a space-separated string or a list) holds `want`. */
export function hasScope(scope: unknown, want: string): boolean {
  if (typeof scope === 'string') return scope.split(/\s+/).includes(want);
  if (Array.isArray(scope)) return scope.includes(want);
  return false;
}

/** A session for a pasted (or otherwise obtained) token, or the reason it cannot be used. */
export function sessionFor(
  raw: string,
  source: Source,
  now = Date.now(),
): { session: Session } | { error: string } {
  const token = raw.trim().replace(/^Bearer\s+/i, '');
  if (!token) return { error: 'Paste a token first.' };
  if (/\s/.test(token)) return { error: 'A token is one line with no spaces: copy it again, whole.' };
  const claims = claimsOf(token);
  if (!claims || typeof claims.sub !== 'string' || !claims.sub)
    return { error: 'This is not a cloudllm token (it should look like eyJ….eyJ….…, three parts with dots).' };
  if (source === 'paste' && hasScope(claims.scope, 'agent') && !hasScope(claims.scope, 'client'))
    return {
      error:
        'This is an agent token (for the daemon on your machine). The page needs a client token: ask for one with --scope client.',
    };
  const expiresAt = typeof claims.exp === 'number' ? claims.exp * 1000 : 0;
  if (expiresAt && expiresAt <= now) return { error: 'This token has expired: get a new one.' };
  const iss = typeof claims.iss === 'string' ? claims.iss : '';
  const label =
    (typeof claims.email === 'string' && claims.email) ||
    (typeof claims.name === 'string' && claims.name) ||
    claims.sub;
  const issuedAt = typeof claims.iat === 'number' && claims.iat * 1000 <= now ? claims.iat * 1000 : now;
  return { session: { token, user: `${iss}|${claims.sub}`, label, expiresAt, issuedAt, source } };
}

export function loadSession(storage: Storage = localStorage): Session | null {
  try {
    const raw = storage.getItem(SESSION_KEY);
    if (!raw) return null;
    const value = JSON.parse(raw) as Session;
    return typeof value.token === 'string' && typeof value.user === 'string' ? value : null;
  } catch {
    return null;
  }
}

export function saveSession(session: Session, storage: Storage = localStorage): void {
  storage.setItem(SESSION_KEY, JSON.stringify(session));
}

/** Signing out: the token is forgotten. */
export function forgetSession(storage: Storage = localStorage): void {
  storage.removeItem(SESSION_KEY);
}

/** What to tell the person when the relay refused the token (401), by how they signed in. */
export function expiredReason(session: Session | null, message: string, now = Date.now()): string {
  const expired = !!session?.expiresAt && session.expiresAt <= now;
  const what = expired ? 'Your sign-in has expired.' : `The relay refused your sign-in (${message}).`;
  switch (session?.source) {
    case 'open':
      return `${what} Run \`cloudllm open\` on your computer again.`;
    case 'oidc':
      return `${what} Sign in again.`;
    default:
      return `${what} Paste a new client token.`;
  }
}
