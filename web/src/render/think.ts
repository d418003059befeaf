// Reasoning models write their thinking before the answer: inside `<think>…</think>` in the
// text (DeepSeek-R1, Qwen3 on older Ollama) or in a separate `thinking` field (newer Ollama).
// The page shows it folded, apart from the answer, and never sends it back to the model.

export interface Split {
  thinking: string;
  answer: string;
  /** The thinking has not ended yet (a stream mid-thought). */
  open: boolean;
}

const OPEN = '<think>';
const CLOSE = '</think>';

/** Splits a (possibly partial) text into thinking and answer. Only a leading block counts. */
export function splitThinking(text: string): Split {
  const start = text.trimStart();
  if (!start.startsWith(OPEN)) {
    // A stream that has so far sent only part of "<think>" is not answer text yet.
    if (start.length < OPEN.length && OPEN.startsWith(start) && start.length > 0)
      return { thinking: '', answer: '', open: true };
    return { thinking: '', answer: text, open: false };
  }
  const body = start.slice(OPEN.length);
  const end = body.indexOf(CLOSE);
  if (end < 0) return { thinking: body.trim(), answer: '', open: true };
  return { thinking: body.slice(0, end).trim(), answer: body.slice(end + CLOSE.length).trimStart(), open: false };
}
