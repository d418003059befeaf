import { describe, expect, it } from 'vitest';
import { ndjson } from './ndjson';

function streamOf(pieces: string[]): ReadableStream<Uint8Array> {
  const encoder = new TextEncoder();
  return new ReadableStream({
    start(controller) {
      for (const piece of pieces) controller.enqueue(encoder.encode(piece));
      controller.close();
    },
  });
}

async function all(body: ReadableStream<Uint8Array>): Promise<unknown[]> {
  const out: unknown[] = [];
  for await (const value of ndjson(body)) out.push(value);
  return out;
}

describe('ndjson', () => {
  it('yields each line as soon as it is complete, across chunk boundaries', async () => {
    const values = await all(streamOf(['{"a":', '1}\n{"b"', ':2}\n\n{"c":3}']));
    expect(values).toEqual([{ a: 1 }, { b: 2 }, { c: 3 }]);
  });

  it('decodes UTF-8 split inside a character', async () => {
    const bytes = new TextEncoder().encode('{"t":"é😀"}\n');
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        for (const b of bytes) controller.enqueue(new Uint8Array([b]));
        controller.close();
      },
    });
    expect(await all(body)).toEqual([{ t: 'é😀' }]);
  });

  it('fails on a line that is not JSON, naming it', async () => {
    await expect(all(streamOf(['{"ok":1}\n', 'oops\n']))).rejects.toThrow(/not JSON: oops/);
  });
});
