// Newline-delimited JSON from a streamed response body: one parsed value per line, as soon as
// the line is complete. Bounded: a line longer than MAX_LINE is an error, not a growing buffer.

/** Longest accepted line: an Ollama chunk is ~100 bytes; a final line with context is larger. */
export const MAX_LINE = 8 * 1024 * 1024;

/** Yields each JSON line of `body`. Throws on a malformed or overlong line. */
export async function* ndjson(body: ReadableStream<Uint8Array>): AsyncGenerator<unknown> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline: number;
      while ((newline = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (line) yield parseLine(line);
      }
      if (buffer.length > MAX_LINE) throw new Error('a line of the answer is too long');
    }
    buffer += decoder.decode();
    const last = buffer.trim();
    if (last) yield parseLine(last);
  } finally {
    reader.releaseLock();
  }
}

function parseLine(line: string): unknown {
  try {
    return JSON.parse(line) as unknown;
  } catch {
    throw new Error(`the answer has a line that is not JSON: ${line.slice(0, 80)}`);
  }
}
