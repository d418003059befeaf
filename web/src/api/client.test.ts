import { afterEach, describe, expect, it, vi } from 'vitest';
import { Client, errorOf, retryAfter } from './client';
import { ApiError } from './types';

afterEach(() => vi.unstubAllGlobals());

function ndjsonResponse(lines: object[]): Response {
  return new Response(lines.map((l) => `${JSON.stringify(l)}\n`).join(''), {
    headers: { 'content-type': 'application/x-ndjson' },
  });
}

describe('errors', () => {
  it('maps statuses to what the page shows', async () => {
    const err = (status: number, body: string, headers: Record<string, string> = {}) =>
      errorOf(new Response(body, { status, headers }));
    expect((await err(401, '{"error":"token expired: get a new one"}')).kind).toBe('unauthorized');
    expect((await err(401, '{"error":"token expired: get a new one"}')).message).toContain('expired');
    const limited = await err(429, '{"error":"too many requests"}', { 'retry-after': '7' });
    expect(limited.kind).toBe('rate-limited');
    expect(limited.retryAfter).toBe(7);
    const relayText = '{"error":"rate limit: the free tier allows 60 requests per minute; try again in 15 s"}';
    expect((await err(429, relayText, { 'retry-after': '15' })).message).toBe(
      'rate limit: the free tier allows 60 requests per minute',
    );
    expect((await err(413, '{"error":"body over 1 MiB"}')).message).toMatch(/too large.*body over 1 MiB/);
    const offline = await err(503, '{"error":"your device is offline: start cloudllmd"}');
    expect(offline.kind).toBe('offline');
    expect(offline.message).toContain('start cloudllmd');
    // OpenAI-shaped errors too.
    expect((await err(500, '{"error":{"message":"boom"}}')).message).toBe('boom');
    expect((await err(502, 'plain text')).message).toBe('plain text');
  });

  it('reads Retry-After as seconds or a date', () => {
    expect(retryAfter(new Response('', { headers: { 'retry-after': '2.2' } }))).toBe(3);
    const date = new Date(Date.now() + 5000).toUTCString();
    expect(retryAfter(new Response('', { headers: { 'retry-after': date } }))).toBeGreaterThanOrEqual(4);
    expect(retryAfter(new Response(''))).toBe(1);
  });
});

describe('Client', () => {
  it('sends the token and the device, and streams the chat', async () => {
    const fetch = vi.fn(async (_url: string, _init: RequestInit) =>
      ndjsonResponse([
        { message: { content: 'Hel' }, done: false },
        { message: { content: 'lo' }, done: false },
        { done: true },
      ]),
    );
    vi.stubGlobal('fetch', fetch);
    const client = new Client('tok', 'http://relay');
    const chunks = [];
    for await (const chunk of client.chat({ model: 'm', messages: [{ role: 'user', content: 'hi' }], device: 'laptop' }))
      chunks.push(chunk);
    expect(chunks).toHaveLength(3);
    const [url, init] = fetch.mock.calls[0] ?? [];
    expect(url).toBe('http://relay/api/chat');
    const headers = new Headers(init?.headers);
    expect(headers.get('authorization')).toBe('Bearer tok');
    expect(headers.get('x-cloudllm-device')).toBe('laptop');
    expect(JSON.parse(String(init?.body))).toMatchObject({ model: 'm', stream: true });
  });

  it('turns an error line mid-stream into a server error', async () => {
    vi.stubGlobal('fetch', async () => ndjsonResponse([{ message: { content: 'a' } }, { error: 'model crashed' }]));
    const run = async () => {
      for await (const _ of new Client('t').chat({ model: 'm', messages: [] })) {
        // consume
      }
    };
    await expect(run()).rejects.toMatchObject({ kind: 'server', message: 'model crashed' });
  });

  it('reports Stop as aborted and an unreachable relay as a network error', async () => {
    vi.stubGlobal('fetch', async () => {
      throw new DOMException('aborted', 'AbortError');
    });
    await expect(new Client('t').tags()).rejects.toMatchObject({ kind: 'aborted' });
    vi.stubGlobal('fetch', async () => {
      throw new TypeError('failed to fetch');
    });
    const err = await new Client('t').tags().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ApiError);
    expect((err as ApiError).kind).toBe('network');
  });
});
