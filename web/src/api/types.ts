// The API's shapes, written once: Ollama's native API (NDJSON) as the relay passes it through,
// the relay's own endpoints, and the errors the page tells apart.

/** One model of `GET /api/tags` (the relay merges every device's list). */
export interface ModelTag {
  name: string;
  model?: string;
  size?: number;
  details?: { family?: string; families?: string[] | null; parameter_size?: string };
}

export interface TagsResponse {
  models: ModelTag[];
}

/** One connected device, from the relay's `GET /cloudllm/devices`. */
export interface DeviceInfo {
  name: string;
  id: string;
  models: string[];
  busy: number;
}

export interface DevicesResponse {
  devices: DeviceInfo[];
}

/** `POST /api/show`: what the page needs of it. */
export interface ShowResponse {
  capabilities?: string[];
  details?: { family?: string; families?: string[] | null };
}

export type Role = 'system' | 'user' | 'assistant';

/** A message as Ollama's `/api/chat` takes it. */
export interface WireMessage {
  role: Role;
  content: string;
  /** Base64 images (no `data:` prefix), for vision models. */
  images?: string[];
}

/** One NDJSON line of a streamed `/api/chat` answer. */
export interface ChatChunk {
  model?: string;
  message?: { role?: string; content?: string; thinking?: string };
  done?: boolean;
  done_reason?: string;
  error?: string;
  eval_count?: number;
}

/** What the relay tells the page at `GET /cloudllm/web`: how people sign in. */
export interface WebConfig {
  /** OpenID Connect sign-in in the page, when the operator set it up. */
  oidc?: { issuer: string; client_id: string; scopes: string[] };
}

/** The kinds of failure the page shows differently. */
export type ApiErrorKind =
  | 'unauthorized' // 401: expired, revoked or wrong token
  | 'forbidden' // 403: e.g. an agent token pasted instead of a client token
  | 'rate-limited' // 429: wait `retryAfter` seconds
  | 'too-large' // 413
  | 'offline' // 503: the device is not connected
  | 'not-found' // 404: e.g. no device has the model
  | 'server' // other 5xx, or an error line mid-stream
  | 'network' // fetch failed: the relay is unreachable
  | 'aborted'; // the person pressed Stop

export class ApiError extends Error {
  constructor(
    readonly kind: ApiErrorKind,
    message: string,
    readonly status = 0,
    /** Seconds to wait, from `Retry-After` on a 429. */
    readonly retryAfter?: number,
  ) {
    super(message);
    this.name = 'ApiError';
  }
}
