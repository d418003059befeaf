// The chat's logic, apart from the views: which messages go to the model (thinking never does),
// one streamed answer accumulated from its chunks, and the model options kept in this browser.
// No DOM here.

import type { Client } from './api/client';
import type { WireMessage } from './api/types';
import { splitThinking } from './render/think';
import { type Conversation, type Message, titleFrom } from './store/db';

/** Whether `reply` is a failure with nothing of an answer (the relay refused the request:
 * too large, rate-limited, offline). */
function failedEmpty(reply: Message | undefined): boolean {
  return reply?.role === 'assistant' && !reply.content && !!reply.note?.startsWith(FAILED);
}

/** The messages sent for the next answer: the system prompt, then the conversation without
 * any thinking, notes or empty answers. A question that failed with no answer is left out
 * too: a message refused as too large would otherwise make every later one too large;
 * Regenerate (whose history ends with that question) still sends it again. */
export function wireMessages(systemPrompt: string, messages: Message[]): WireMessage[] {
  const wire: WireMessage[] = [];
  if (systemPrompt.trim()) wire.push({ role: 'system', content: systemPrompt });
  for (const [i, m] of messages.entries()) {
    if (m.role === 'assistant' && !m.content) continue;
    if (m.role === 'user' && failedEmpty(messages[i + 1])) continue;
    const out: WireMessage = { role: m.role, content: m.content };
    if (m.images?.length) out.images = m.images;
    wire.push(out);
  }
  return wire;
}

/** The title of a conversation before its first message (one made by setting its system
 * prompt first). */
export const UNTITLED = 'New chat';

/** The conversation the message `text` goes to: `current`, or else `fresh()`; named after `text`
 * when it is the first message (`first`) of a conversation still untitled, so that one whose
 * system prompt was set first is not listed as "New chat" forever. */
export function conversationFor(
  current: Conversation | null,
  first: boolean,
  text: string,
  fresh: () => Conversation,
): Conversation {
  const conversation = current ?? fresh();
  return first && (!current || conversation.title === UNTITLED) ? { ...conversation, title: titleFrom(text) } : conversation;
}

/** How the note of a failed answer starts. */
export const FAILED = 'Failed: ';

/** An answer as it streams in. */
export interface Live {
  content: string;
  thinking: string;
  thinkingOpen: boolean;
  tokens: number;
}

/** Folds one chunk into the answer so far. `raw` keeps the text as sent, `<think>` and all. */
export function accumulate(
  state: { raw: string; fieldThinking: string; tokens: number },
  chunk: { message?: { content?: string; thinking?: string } },
): Live {
  state.raw += chunk.message?.content ?? '';
  state.fieldThinking += chunk.message?.thinking ?? '';
  if (chunk.message?.content || chunk.message?.thinking) state.tokens += 1;
  const split = splitThinking(state.raw);
  const thinking = [state.fieldThinking.trim(), split.thinking].filter(Boolean).join('\n\n');
  return {
    content: split.answer,
    thinking,
    thinkingOpen: split.open || (!!state.fieldThinking && !split.answer),
    tokens: state.tokens,
  };
}

/** Streams one answer: calls `onUpdate` with the answer so far after each chunk; returns the
 * final message. Throws ApiError (kind `aborted` after Stop, with the partial answer kept by
 * the caller through `onUpdate`). */
export async function streamAnswer(
  client: Client,
  request: { model: string; device?: string; messages: WireMessage[]; options?: Record<string, number> },
  onUpdate: (live: Live) => void,
  signal: AbortSignal,
): Promise<Message> {
  const state = { raw: '', fieldThinking: '', tokens: 0 };
  let live: Live = { content: '', thinking: '', thinkingOpen: false, tokens: 0 };
  const chatRequest = {
    model: request.model,
    messages: request.messages,
    signal,
    ...(request.device ? { device: request.device } : {}),
    ...(request.options ? { options: request.options } : {}),
  };
  for await (const chunk of client.chat(chatRequest)) {
    live = accumulate(state, chunk);
    onUpdate(live);
    if (chunk.done) break;
  }
  const message: Message = { role: 'assistant', content: live.content, model: request.model };
  if (live.thinking) message.thinking = live.thinking;
  return message;
}

/** Model options (Ollama's `options`, e.g. `{"num_predict": 64}`) kept in this browser, for
 * people who want them; none by default. */
const OPTIONS_KEY = 'cloudllm.options';

export function storedOptions(): Record<string, number> | null {
  try {
    const value = JSON.parse(localStorage.getItem(OPTIONS_KEY) ?? 'null') as unknown;
    if (!value || typeof value !== 'object') return null;
    const entries = Object.entries(value).filter((e): e is [string, number] => typeof e[1] === 'number');
    return entries.length ? Object.fromEntries(entries) : null;
  } catch {
    return null;
  }
}
