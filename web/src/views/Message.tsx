// One message. Markdown is rendered (and code highlighted) only once the message is near the
// screen: a long conversation opens with plain text for the messages out of view.

import { memo } from 'preact/compat';
import { useEffect, useMemo, useRef, useState } from 'preact/hooks';
import { splitBlocks } from '../render/blocks';
import { decorateCode, renderMarkdown } from '../render/markdown';
import type { Message as Stored } from '../store/db';

let observer: IntersectionObserver | null = null;
const seen = new WeakMap<Element, () => void>();

function watch(element: Element, onSeen: () => void): () => void {
  observer ??= new IntersectionObserver(
    (entries) => {
      for (const entry of entries)
        if (entry.isIntersecting) {
          seen.get(entry.target)?.();
          observer?.unobserve(entry.target);
        }
    },
    { rootMargin: '800px 0px' },
  );
  seen.set(element, onSeen);
  observer.observe(element);
  return () => observer?.unobserve(element);
}

/** One finished block of a streaming answer: rendered once, kept while later blocks grow. */
const Block = memo(function Block(props: { text: string }) {
  const html = useMemo(() => renderMarkdown(props.text), [props.text]);
  // Sanitized by DOMPurify in renderMarkdown; the CSP forbids inline script besides.
  return <div class="block" dangerouslySetInnerHTML={{ __html: html }} />;
});

export interface MessageProps {
  message: Stored;
  index: number;
  streaming?: boolean;
  thinkingOpen?: boolean;
  eager?: boolean;
  onEdit?: (index: number) => void;
  onRegenerate?: () => void;
}

export const MessageView = memo(function MessageView(props: MessageProps) {
  const { message, streaming } = props;
  const [visible, setVisible] = useState(!!props.eager || !!streaming);
  const root = useRef<HTMLElement>(null);
  const body = useRef<HTMLDivElement>(null);
  useEffect(() => {
    if (visible || !root.current) return;
    return watch(root.current, () => setVisible(true));
  }, [visible]);
  const html = useMemo(
    () => (!streaming && visible && message.role === 'assistant' ? renderMarkdown(message.content) : null),
    [visible, message.content, message.role, streaming],
  );
  const blocks = streaming && message.role === 'assistant' ? splitBlocks(message.content) : null;
  useEffect(() => {
    if (!streaming && html !== null && body.current) decorateCode(body.current);
  }, [html, streaming]);
  return (
    <article ref={root} class={`msg ${message.role}`} data-testid={`msg-${message.role}`}>
      {message.thinking !== undefined && message.thinking !== '' && (
        <details class="thinking" open={props.thinkingOpen}>
          <summary>{props.thinkingOpen ? 'Thinking…' : 'Thought'}</summary>
          <div class="thinking-text">{message.thinking}</div>
        </details>
      )}
      {message.images?.length ? (
        <div class="images">
          {message.images.map((image, i) => (
            <img key={i} src={`data:image/*;base64,${image}`} alt={`attached image ${i + 1}`} />
          ))}
        </div>
      ) : null}
      {blocks ? (
        <div class="md" data-testid="answer">
          {blocks.map((text, i) => (
            <Block key={i} text={text} />
          ))}
        </div>
      ) : html !== null ? (
        // Sanitized by DOMPurify in renderMarkdown; the CSP forbids inline script besides.
        <div ref={body} class="md" data-testid="answer" dangerouslySetInnerHTML={{ __html: html }} />
      ) : (
        <div class="plain" data-testid={message.role === 'assistant' ? 'answer' : 'question'}>
          {message.content}
        </div>
      )}
      {streaming && <span class="cursor" aria-hidden="true" />}
      {message.note && <p class="note">{message.note}</p>}
      {!streaming && (
        <div class="actions">
          {message.role === 'user' && props.onEdit && (
            <button type="button" onClick={() => props.onEdit?.(props.index)}>
              Edit
            </button>
          )}
          {message.role === 'assistant' && props.onRegenerate && (
            <button type="button" onClick={props.onRegenerate} data-testid="regenerate">
              Regenerate
            </button>
          )}
          {message.role === 'assistant' && message.model && <span class="model-tag">{message.model}</span>}
        </div>
      )}
    </article>
  );
});
