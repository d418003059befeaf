import { describe, expect, it } from 'vitest';
import { claimsOf, expiredReason, forgetSession, loadSession, saveSession, sessionFor } from './token';

function jwt(claims: object): string {
  const b64 = (v: object) => btoa(JSON.stringify(v)).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  return `${b64({ alg: 'HS256' })}.${b64(claims)}.signature`;
}

class Memory implements Storage {
  private map = new Map<string, string>();
  get length() {
    return this.map.size;
  }
  clear() {
    this.map.clear();
  }
  getItem(key: string) {
    return this.map.get(key) ?? null;
  }
  key(i: number) {
    return [...this.map.keys()][i] ?? null;
  }
  removeItem(key: string) {
    this.map.delete(key);
  }
  setItem(key: string, value: string) {
    this.map.set(key, value);
  }
}

const now = 1_700_000_000_000;
const future = now / 1000 + 3600;

describe('tokens', () => {
  it('reads a JWT and keeps its user, label and expiry', () => {
    const made = sessionFor(`  Bearer ${jwt({ sub: 'alice', iss: 'cloudllm-relay', scope: 'client', exp: future })} `, 'paste', now);
    expect('session' in made && made.session).toMatchObject({ user: 'cloudllm-relay|alice', label: 'alice', expiresAt: future * 1000 });
    expect(claimsOf('nope')).toBeNull();
  });

  it('refuses what is no client token, saying why', () => {
    const error = (token: string) => {
      const made = sessionFor(token, 'paste', now);
      return 'error' in made ? made.error : '';
    };
    expect(error('')).toMatch(/Paste a token/);
    expect(error('abc def')).toMatch(/one line/);
    expect(error('not-a-jwt')).toMatch(/not a cloudllm token/);
    expect(error(jwt({ sub: 'a', scope: 'agent', exp: future }))).toMatch(/agent token/);
    expect(error(jwt({ sub: 'a', scope: 'client', exp: now / 1000 - 1 }))).toMatch(/expired/);
  });

  it('keeps users apart and forgets the token on sign-out', () => {
    const storage = new Memory();
    const a = sessionFor(jwt({ sub: 'alice', exp: future }), 'paste', now);
    const b = sessionFor(jwt({ sub: 'bob', exp: future }), 'paste', now);
    if (!('session' in a) || !('session' in b)) throw new Error('sessions');
    expect(a.session.user).not.toBe(b.session.user);
    saveSession(a.session, storage);
    expect(loadSession(storage)?.token).toBe(a.session.token);
    forgetSession(storage);
    expect(loadSession(storage)).toBeNull();
    storage.setItem('cloudllm.session', '{broken');
    expect(loadSession(storage)).toBeNull();
  });

  it('tells how to sign in again, by how the person signed in', () => {
    const base = { token: 't', user: 'u', label: 'u', expiresAt: now - 1 };
    expect(expiredReason({ ...base, source: 'open' }, 'token expired', now)).toMatch(/expired.*cloudllm open/);
    expect(expiredReason({ ...base, source: 'paste', expiresAt: 0 }, 'invalid token', now)).toMatch(
      /refused your sign-in \(invalid token\).*new client token/,
    );
  });
});
