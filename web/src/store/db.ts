// The conversation store: IndexedDB in the browser, never the relay. One database, one schema
// version with its migration below; every record carries the user it belongs to, and every
// read filters by it, so another person signing in on the same browser sees none of them.

import { type DBSchema, type IDBPDatabase, openDB } from 'idb';

export const DB_NAME = 'cloudllm';
/** Bump with a new step in `upgrade` when the schema changes. */
export const DB_VERSION = 1;

export interface Message {
  role: 'system' | 'user' | 'assistant';
  content: string;
  /** A reasoning model's thinking: shown folded, never sent back. */
  thinking?: string;
  /** Base64 images the person attached (user messages). */
  images?: string[];
  /** The model that wrote an answer. */
  model?: string;
  /** Why the answer stopped early ("stopped", an error), shown under it. */
  note?: string;
}

export interface Conversation {
  id: string;
  user: string;
  title: string;
  systemPrompt: string;
  model: string;
  device: string;
  createdAt: number;
  updatedAt: number;
  messageCount: number;
}

interface Schema extends DBSchema {
  conversations: { key: string; value: Conversation; indexes: { user: string } };
  messages: { key: string; value: { id: string; user: string; messages: Message[] } };
}

export class Store {
  private constructor(private readonly db: IDBPDatabase<Schema>) {}

  static async open(name = DB_NAME): Promise<Store> {
    const db = await openDB<Schema>(name, DB_VERSION, {
      upgrade(db, oldVersion) {
        if (oldVersion < 1) {
          const conversations = db.createObjectStore('conversations', { keyPath: 'id' });
          conversations.createIndex('user', 'user');
          db.createObjectStore('messages', { keyPath: 'id' });
        }
      },
    });
    return new Store(db);
  }

  close(): void {
    this.db.close();
  }

  /** `user`'s conversations, the most recently changed first. */
  async list(user: string): Promise<Conversation[]> {
    const all = await this.db.getAllFromIndex('conversations', 'user', user);
    return all.sort((a, b) => b.updatedAt - a.updatedAt);
  }

  async get(user: string, id: string): Promise<Conversation | undefined> {
    const found = await this.db.get('conversations', id);
    return found?.user === user ? found : undefined;
  }

  async messages(user: string, id: string): Promise<Message[]> {
    const found = await this.db.get('messages', id);
    return found?.user === user ? found.messages : [];
  }

  /** Writes a conversation and its messages in one transaction. */
  async save(conversation: Conversation, messages: Message[]): Promise<void> {
    const tx = this.db.transaction(['conversations', 'messages'], 'readwrite');
    const stored = { ...conversation, messageCount: messages.length };
    await Promise.all([
      tx.objectStore('conversations').put(stored),
      tx.objectStore('messages').put({ id: conversation.id, user: conversation.user, messages }),
      tx.done,
    ]);
  }

  async rename(user: string, id: string, title: string): Promise<void> {
    const found = await this.get(user, id);
    if (found) await this.db.put('conversations', { ...found, title: title.trim() || found.title });
  }

  async remove(user: string, id: string): Promise<void> {
    const found = await this.get(user, id);
    if (!found) return;
    const tx = this.db.transaction(['conversations', 'messages'], 'readwrite');
    await Promise.all([tx.objectStore('conversations').delete(id), tx.objectStore('messages').delete(id), tx.done]);
  }

  /** Deletes every conversation of `user` (offered on sign-out). */
  async removeAll(user: string): Promise<void> {
    for (const conversation of await this.list(user)) await this.remove(user, conversation.id);
  }

  /** Ids of `user`'s conversations whose title or text contains `query` (any case). */
  async search(user: string, query: string): Promise<Set<string>> {
    const needle = query.trim().toLowerCase();
    const hits = new Set<string>();
    for (const conversation of await this.list(user)) {
      if (!needle || conversation.title.toLowerCase().includes(needle)) {
        hits.add(conversation.id);
        continue;
      }
      const messages = await this.messages(user, conversation.id);
      if (messages.some((m) => m.content.toLowerCase().includes(needle))) hits.add(conversation.id);
    }
    return hits;
  }
}

/** A new conversation's id: random, so imports never collide. */
export function newId(): string {
  return crypto.randomUUID();
}

/** A title from the first words of the first message. */
export function titleFrom(text: string): string {
  const line = text.trim().split('\n')[0] ?? '';
  const words = line.replace(/\s+/g, ' ').slice(0, 60);
  return words.length < line.length ? `${words}…` : words || 'New chat';
}
