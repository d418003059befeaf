import { describe, expect, it } from 'vitest';
import { accumulate, conversationFor, FAILED, UNTITLED, wireMessages } from './chat';
import type { Conversation } from './store/db';
import { splitThinking } from './render/think';
import { openCode } from './auth/open';

describe('thinking', () => {
  it('splits a leading <think> block, also while it streams', () => {
    expect(splitThinking('<think>hmm</think>Answer')).toEqual({ thinking: 'hmm', answer: 'Answer', open: false });
    expect(splitThinking('<think>still thinking')).toEqual({ thinking: 'still thinking', answer: '', open: true });
    expect(splitThinking('<thi')).toEqual({ thinking: '', answer: '', open: true });
    expect(splitThinking('no thinking <think>here</think>').answer).toBe('no thinking <think>here</think>');
  });

  it('accumulates chunks with thinking in the text or in its own field', () => {
    const state = { raw: '', fieldThinking: '', tokens: 0 };
    accumulate(state, { message: { content: '<think>a' } });
    accumulate(state, { message: { content: 'b</think>Hi' } });
    const live = accumulate(state, { message: { content: ' there' } });
    expect(live).toMatchObject({ content: 'Hi there', thinking: 'ab', thinkingOpen: false, tokens: 3 });
    const other = { raw: '', fieldThinking: '', tokens: 0 };
    accumulate(other, { message: { thinking: 'plan' } });
    expect(accumulate(other, { message: { content: 'Done' } })).toMatchObject({ content: 'Done', thinking: 'plan' });
  });

  it('never sends thinking back; the system prompt goes first', () => {
    const wire = wireMessages('Be brief.', [
      { role: 'user', content: 'Q', images: ['aGk='] },
      { role: 'assistant', content: 'A', thinking: 'secret reasoning' },
      { role: 'assistant', content: '' },
    ]);
    expect(wire).toEqual([
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'Q', images: ['aGk='] },
      { role: 'assistant', content: 'A' },
    ]);
    expect(JSON.stringify(wire)).not.toContain('secret reasoning');
  });

  it('leaves out a question that failed with no answer, but Regenerate sends it again', () => {
    const big = { role: 'user' as const, content: 'x'.repeat(100) };
    const refused = { role: 'assistant' as const, content: '', note: `${FAILED}the message is too large` };
    const stopped = { role: 'assistant' as const, content: '', note: 'Stopped.' };
    expect(wireMessages('', [big, refused, { role: 'user', content: 'short' }])).toEqual([{ role: 'user', content: 'short' }]);
    // Regenerate: the history ends with the failed question.
    expect(wireMessages('', [big])).toEqual([big]);
    // Stopped before any word: the question stays (the person chose to stop, not the relay).
    expect(wireMessages('', [big, stopped, { role: 'user', content: 'more' }])).toHaveLength(2);
  });
});

describe('the conversation a message goes to', () => {
  const base: Conversation = {
    id: 'c1', user: 'alice', title: UNTITLED, systemPrompt: 'Be a pirate.', model: 'm', device: '',
    createdAt: 1, updatedAt: 1, messageCount: 0,
  };
  const fresh = () => ({ ...base, id: 'new', systemPrompt: '' });

  it('names a new conversation after its first message', () => {
    expect(conversationFor(null, true, 'Plan a trip\nto Rome', fresh)).toMatchObject({ id: 'new', title: 'Plan a trip' });
  });

  it('names one whose system prompt was set first after its first message, keeping the prompt', () => {
    expect(conversationFor(base, true, 'Ahoy', fresh)).toMatchObject({ id: 'c1', title: 'Ahoy', systemPrompt: 'Be a pirate.' });
  });

  it('keeps a title once there are messages, or once the person gave one', () => {
    expect(conversationFor({ ...base, title: 'First words' }, false, 'later', fresh).title).toBe('First words');
    expect(conversationFor(base, false, 'later', fresh).title).toBe(UNTITLED);
    expect(conversationFor({ ...base, title: 'My pirate' }, true, 'Ahoy', fresh).title).toBe('My pirate');
  });
});

describe('cloudllm open', () => {
  it('takes only a well-formed code from the fragment', () => {
    expect(openCode(`#open=${'ab'.repeat(32)}`)).toBe('ab'.repeat(32));
    expect(openCode('#open=<script>')).toBeNull();
    expect(openCode('#other')).toBeNull();
  });
});

import { splitBlocks } from './render/blocks';

describe('streaming blocks', () => {
  it('splits at blank lines but never inside a code fence, and loses nothing', () => {
    const text = 'Para one\nstill one\n\n```js\na\n\nb\n```\n\n- x\n- y\n\nTail';
    const blocks = splitBlocks(text);
    expect(blocks.join('')).toBe(text);
    expect(blocks).toEqual(['Para one\nstill one\n\n', '```js\na\n\nb\n```\n\n', '- x\n- y\n\n', 'Tail']);
  });
});
