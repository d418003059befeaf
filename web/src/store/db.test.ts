import 'fake-indexeddb/auto';
import { describe, expect, it } from 'vitest';
import { exportJson, parseImport } from './transfer';
import { type Conversation, Store, titleFrom } from './db';

let n = 0;
const fresh = () => Store.open(`test-${n++}`);

function conversation(user: string, id: string, updatedAt: number, title = id): Conversation {
  return { id, user, title, systemPrompt: '', model: 'm', device: '', createdAt: 0, updatedAt, messageCount: 0 };
}

describe('the conversation store', () => {
  it('keeps each user to their own conversations, newest first', async () => {
    const store = await fresh();
    await store.save(conversation('alice', 'a1', 1), [{ role: 'user', content: 'hello' }]);
    await store.save(conversation('alice', 'a2', 2), []);
    await store.save(conversation('bob', 'b1', 3), [{ role: 'user', content: 'secret' }]);
    expect((await store.list('alice')).map((c) => c.id)).toEqual(['a2', 'a1']);
    expect(await store.messages('bob', 'a1')).toEqual([]);
    expect(await store.get('bob', 'a1')).toBeUndefined();
    await store.remove('bob', 'a1');
    expect(await store.messages('alice', 'a1')).toHaveLength(1);
    expect([...(await store.search('alice', 'HELLO'))]).toEqual(['a1']);
    expect([...(await store.search('alice', 'secret'))]).toEqual([]);
  });

  it('renames, deletes, and opens a 500-message conversation', async () => {
    const store = await fresh();
    const many = Array.from({ length: 500 }, (_, i) => ({ role: i % 2 ? 'assistant' : 'user', content: `m${i}` }) as const);
    await store.save(conversation('alice', 'big', 1), [...many]);
    await store.rename('alice', 'big', '  Long one ');
    expect((await store.get('alice', 'big'))?.title).toBe('Long one');
    expect((await store.get('alice', 'big'))?.messageCount).toBe(500);
    expect(await store.messages('alice', 'big')).toHaveLength(500);
    await store.remove('alice', 'big');
    expect(await store.list('alice')).toEqual([]);
  });

  it('exports and imports, checking what it imports', async () => {
    const text = exportJson([
      {
        conversation: conversation('alice', 'x', 5, 'Trip'),
        messages: [
          { role: 'user', content: 'hi' },
          { role: 'assistant', content: 'yo', thinking: 't' },
        ],
      },
    ]);
    expect(text).not.toContain('"user": "alice"');
    const parsed = parseImport(text, 'bob');
    if ('error' in parsed) throw new Error(parsed.error);
    expect(parsed.items[0]?.conversation).toMatchObject({ user: 'bob', title: 'Trip', messageCount: 2 });
    expect(parsed.items[0]?.conversation.id).not.toBe('x');
    const hostile = JSON.stringify({
      format: 'cloudllm-conversations',
      version: 1,
      conversations: [{ title: 7, messages: [{ role: 'tool', content: 'x' }, { role: 'user', content: 'ok', images: ['not base64!'] }] }],
    });
    const cleaned = parseImport(hostile, 'bob');
    if ('error' in cleaned) throw new Error(cleaned.error);
    expect(cleaned.items[0]?.messages).toEqual([{ role: 'user', content: 'ok', images: [] }]);
    expect('error' in parseImport('nope', 'bob')).toBe(true);
    expect('error' in parseImport('{"format":"other"}', 'bob')).toBe(true);
    expect('error' in parseImport('{"format":"cloudllm-conversations","version":9,"conversations":[]}', 'bob')).toBe(true);
  });

  it('titles a conversation from its first line', () => {
    expect(titleFrom('  What is\nthe answer')).toBe('What is');
    expect(titleFrom('x'.repeat(80))).toHaveLength(61);
    expect(titleFrom('')).toBe('New chat');
  });
});
