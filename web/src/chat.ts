// The chat's logic, apart from the views: which messages go to the model (thinking never does),
// and one streamed answer accumulated from its chunks. No DOM here.

import type { Client } from './api/client';
import type { WireMessage } from './api/types';
import { splitThinking } from './render/think';
import type { Message } from './store/db';

/** The messages sent for the next answer: the system prompt, then the conversation without
 * any thinking, notes or empty answers. */
export function wireMessages(systemPrompt: string, messages: Message[]): WireMessage[] {
  const wire: WireMessage[] = [];
  if (systemPrompt.trim()) wire.push({ role: 'system', content: systemPrompt });
  for (const m of messages) {
    if (m.role === 'assistant' && !m.content) continue;
    const out: WireMessage = { role: m.role, content: m.content };
    if (m.images?.length) out.images = m.images;
    wire.push(out);
  }
  return wire;
}

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
