import { describe, expect, it } from 'vitest';
import { REFRESH_MARGIN_MS, refreshDelay, sameIssuer } from './oidc';
import type { Session } from './token';

const now = 1_700_000_000_000;
const refresh = { token: 'r', tokenEndpoint: 'https://idp.example.com/token', clientId: 'cloudllm-web' };

function session(issuedAt: number, lifetimeMs: number): Session {
  return { token: 't', user: 'i|alice', label: 'alice', expiresAt: issuedAt + lifetimeMs, issuedAt, source: 'oidc', refresh };
}

describe('refreshing a sign-in', () => {
  it('renews a minute before an hour-long token expires', () => {
    expect(refreshDelay(session(now, 3_600_000), now)).toBe(3_600_000 - REFRESH_MARGIN_MS);
  });

  it('renews a short-lived token half-way, not at once and again at once in a loop', () => {
    // A 30 s token: a 60 s margin would ask for a new one immediately, every time.
    expect(refreshDelay(session(now, 30_000), now)).toBe(15_000);
    expect(refreshDelay(session(now, 30_000), now + 10_000)).toBe(5_000);
  });

  it('renews at once a token already past its refresh time, and never one it cannot', () => {
    expect(refreshDelay(session(now, 3_600_000), now + 3_599_000)).toBe(0);
    expect(refreshDelay({ ...session(now, 3_600_000), refresh: undefined }, now)).toBeNull();
    expect(refreshDelay({ ...session(now, 3_600_000), expiresAt: 0 }, now)).toBeNull();
  });

  it('takes the lifetime left when the session does not know when it was issued', () => {
    const old = { ...session(now, 3_600_000), issuedAt: undefined };
    expect(refreshDelay(old, now)).toBe(3_600_000 - REFRESH_MARGIN_MS);
  });
});

describe('the issuer of a sign-in answer', () => {
  it('matches with or without a trailing slash, and nothing else', () => {
    expect(sameIssuer('https://idp.example.com', 'https://idp.example.com/')).toBe(true);
    expect(sameIssuer('https://idp.example.com/realms/a', 'https://idp.example.com/realms/b')).toBe(false);
    expect(sameIssuer('https://evil.example.com', 'https://idp.example.com')).toBe(false);
  });
});
