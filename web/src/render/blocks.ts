// Splits Markdown into top-level blocks (at blank lines outside code fences), so a streaming
// answer re-renders only its last, growing block: finished blocks keep their DOM.

/** The blocks of `markdown`, each with its trailing blank line. Joined, they give it back. */
export function splitBlocks(markdown: string): string[] {
  const blocks: string[] = [];
  let current = '';
  let fence: string | null = null;
  for (const line of markdown.split(/(?<=\n)/)) {
    const marker = /^\s{0,3}(`{3,}|~{3,})/.exec(line)?.[1];
    if (marker) {
      if (fence === null) fence = marker[0] ?? null;
      else if (marker[0] === fence) fence = null;
    }
    current += line;
    if (fence === null && line.trim() === '' && current.trim() !== '') {
      blocks.push(current);
      current = '';
    }
  }
  if (current) blocks.push(current);
  return blocks;
}
