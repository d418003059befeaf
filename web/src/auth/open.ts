// `cloudllm open`: the daemon on the person's own machine opens `RELAY/#open=CODE`. The one-time
// code sits in the fragment (never sent to a server, so in no log); the page removes it from
// the address bar at once and trades it, once, for a short-lived client token.

import { errorOf } from '../api/client';

/** The code in `hash` (`#open=…`), if any. */
export function openCode(hash: string): string | null {
  const match = /^#open=([0-9a-f]{16,128})$/.exec(hash);
  return match?.[1] ?? null;
}

/** Trades `code` for a token, or throws the relay's reason. */
export async function exchangeCode(code: string, base = ''): Promise<string> {
  const response = await fetch(`${base}/cloudllm/open/exchange`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ code }),
    cache: 'no-store',
  });
  if (!response.ok) throw await errorOf(response);
  const body = (await response.json()) as { token?: unknown };
  if (typeof body.token !== 'string') throw new Error('the relay sent no token');
  return body.token;
}
