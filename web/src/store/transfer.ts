// Export and import of conversations as JSON. An import is untrusted input: every field is
// checked and copied, never stored as given, and gets a new id and the importing user.

import { type Conversation, type Message, newId } from './db';

export const FORMAT = 'cloudllm-conversations';
export const FORMAT_VERSION = 1;
/** Largest file accepted for import: 64 MiB (images make conversations big). */
export const MAX_IMPORT_BYTES = 64 * 1024 * 1024;

export interface Exported {
  format: typeof FORMAT;
  version: number;
  conversations: (Omit<Conversation, 'user' | 'messageCount'> & { messages: Message[] })[];
}

export function exportJson(items: { conversation: Conversation; messages: Message[] }[]): string {
  const body: Exported = {
    format: FORMAT,
    version: FORMAT_VERSION,
    conversations: items.map(({ conversation, messages }) => {
      const { user: _user, messageCount: _count, ...rest } = conversation;
      return { ...rest, messages };
    }),
  };
  return JSON.stringify(body, null, 1);
}

const ROLES = new Set(['system', 'user', 'assistant']);

function str(value: unknown, max = 1_000_000): string {
  return typeof value === 'string' ? value.slice(0, max) : '';
}

function num(value: unknown, fallback: number): number {
  return typeof value === 'number' && Number.isFinite(value) ? value : fallback;
}

function message(value: unknown): Message | null {
  if (!value || typeof value !== 'object') return null;
  const m = value as Record<string, unknown>;
  if (typeof m.role !== 'string' || !ROLES.has(m.role) || typeof m.content !== 'string') return null;
  const out: Message = { role: m.role as Message['role'], content: str(m.content, 10_000_000) };
  if (typeof m.thinking === 'string') out.thinking = str(m.thinking, 10_000_000);
  if (typeof m.model === 'string') out.model = str(m.model, 256);
  if (typeof m.note === 'string') out.note = str(m.note, 1000);
  if (Array.isArray(m.images))
    out.images = m.images.filter((i): i is string => typeof i === 'string' && /^[A-Za-z0-9+/=]*$/.test(i));
  return out;
}

/** The conversations of an exported file, for `user`, or an error in the person's terms. */
export function parseImport(
  text: string,
  user: string,
  now = Date.now(),
): { items: { conversation: Conversation; messages: Message[] }[] } | { error: string } {
  if (text.length > MAX_IMPORT_BYTES) return { error: 'This file is too large to import (64 MiB at most).' };
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    return { error: 'This file is not JSON: choose a file exported from this page.' };
  }
  const root = body as Partial<Exported> | null;
  if (!root || root.format !== FORMAT || !Array.isArray(root.conversations))
    return { error: 'This file is not a cloudllm conversations export.' };
  if (typeof root.version !== 'number' || root.version > FORMAT_VERSION)
    return { error: 'This export comes from a newer version of the page: update the relay first.' };
  const items = root.conversations.flatMap((raw) => {
    if (!raw || typeof raw !== 'object') return [];
    const c = raw as unknown as Record<string, unknown>;
    const messages = (Array.isArray(c.messages) ? c.messages : []).map(message).filter((m): m is Message => !!m);
    const conversation: Conversation = {
      id: newId(),
      user,
      title: str(c.title, 200) || 'Imported chat',
      systemPrompt: str(c.systemPrompt, 100_000),
      model: str(c.model, 256),
      device: str(c.device, 128),
      createdAt: num(c.createdAt, now),
      updatedAt: num(c.updatedAt, now),
      messageCount: messages.length,
    };
    return [{ conversation, messages }];
  });
  return { items };
}
