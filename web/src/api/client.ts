// The API client: every request the page makes to the relay, with the bearer token, streaming
// and Stop. It maps HTTP failures to ApiError kinds and holds no DOM.

import { ndjson } from './ndjson';
import {
  ApiError,
  type ChatChunk,
  type DevicesResponse,
  type ShowResponse,
  type TagsResponse,
  type WebConfig,
  type WireMessage,
} from './types';

/** The header that picks a device (name or id). */
export const DEVICE_HEADER = 'x-cloudllm-device';

export interface ChatRequest {
  model: string;
  messages: WireMessage[];
  device?: string;
  options?: Record<string, number>;
  signal?: AbortSignal;
}

export class Client {
  constructor(
    private readonly token: string,
    private readonly base = '',
  ) {}

  private async request(path: string, init: RequestInit = {}, device?: string): Promise<Response> {
    const headers = new Headers(init.headers);
    headers.set('authorization', `Bearer ${this.token}`);
    if (device) headers.set(DEVICE_HEADER, device);
    let response: Response;
    try {
      response = await fetch(this.base + path, { ...init, headers, cache: 'no-store' });
    } catch (err) {
      if (isAbort(err)) throw new ApiError('aborted', 'stopped');
      throw new ApiError('network', 'cannot reach the relay: check your connection');
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async tags(device?: string): Promise<TagsResponse> {
    const body = (await (await this.request('/api/tags', {}, device)).json()) as TagsResponse;
    return { models: Array.isArray(body.models) ? body.models : [] };
  }

  async devices(): Promise<DevicesResponse> {
    const body = (await (await this.request('/cloudllm/devices')).json()) as DevicesResponse;
    return { devices: Array.isArray(body.devices) ? body.devices : [] };
  }

  async show(model: string, device?: string): Promise<ShowResponse> {
    const response = await this.request(
      '/api/show',
      { method: 'POST', body: JSON.stringify({ model }), headers: { 'content-type': 'application/json' } },
      device,
    );
    return (await response.json()) as ShowResponse;
  }

  /** Streams `/api/chat`: yields each chunk as it arrives. Aborting `signal` cancels the
   * request, which the relay and daemon carry to Ollama (the generation stops). */
  async *chat(req: ChatRequest): AsyncGenerator<ChatChunk> {
    const response = await this.request(
      '/api/chat',
      {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: req.model, messages: req.messages, stream: true, options: req.options }),
        signal: req.signal ?? null,
      },
      req.device,
    );
    if (!response.body) throw new ApiError('server', 'the relay sent no answer body');
    try {
      for await (const value of ndjson(response.body)) {
        const chunk = value as ChatChunk;
        if (typeof chunk.error === 'string') throw new ApiError('server', chunk.error);
        yield chunk;
      }
    } catch (err) {
      if (err instanceof ApiError) throw err;
      if (isAbort(err) || req.signal?.aborted) throw new ApiError('aborted', 'stopped');
      throw new ApiError('network', `the answer was cut off: ${(err as Error).message}`);
    }
  }
}

/** The page's sign-in settings (public: no token needed). */
export async function webConfig(base = ''): Promise<WebConfig> {
  try {
    const response = await fetch(`${base}/cloudllm/web`, { cache: 'no-store' });
    return response.ok ? ((await response.json()) as WebConfig) : {};
  } catch {
    return {};
  }
}

function isAbort(err: unknown): boolean {
  return err instanceof DOMException && err.name === 'AbortError';
}

/** The ApiError for a failed response: its status and the relay's `{"error": ...}` text. */
export async function errorOf(response: Response): Promise<ApiError> {
  let message = '';
  try {
    const text = await response.text();
    try {
      const body = JSON.parse(text) as { error?: unknown };
      if (typeof body.error === 'string') message = body.error;
      else if (body.error && typeof body.error === 'object' && 'message' in body.error)
        message = String((body.error as { message: unknown }).message);
    } catch {
      message = text.slice(0, 300);
    }
  } catch {
    // No body: the status says it all.
  }
  const status = response.status;
  switch (status) {
    case 401:
      return new ApiError('unauthorized', message || 'your sign-in is no longer valid', status);
    case 403:
      return new ApiError('forbidden', message || 'this token may not do that', status);
    case 404:
      return new ApiError('not-found', message || 'not found', status);
    case 413:
      return new ApiError(
        'too-large',
        `the message is too large for your plan${message ? ` (${message})` : ''}: send a shorter text or smaller images`,
        status,
      );
    case 429:
      // The page counts the wait down itself: a fixed "try again in N s" in the text would
      // soon be wrong.
      return new ApiError(
        'rate-limited',
        message.replace(/[;,.]?\s*try again in \d+(\.\d+)? ?s\.?$/i, '') || 'too many requests',
        status,
        retryAfter(response),
      );
    case 503:
      return new ApiError('offline', message || 'your device is offline', status);
    default:
      return new ApiError('server', message || `the relay answered ${status}`, status);
  }
}

/** `Retry-After` in seconds (delta or HTTP date), at least 1. */
export function retryAfter(response: Response): number {
  const value = response.headers.get('retry-after');
  if (!value) return 1;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(1, Math.ceil(seconds));
  const date = Date.parse(value);
  return Number.isFinite(date) ? Math.max(1, Math.ceil((date - Date.now()) / 1000)) : 1;
}
