import { useState } from 'preact/hooks';

/** The system prompt of one conversation, edited in place. */
export function SystemPrompt(props: { value: string; onSave: (text: string) => void }) {
  const [text, setText] = useState(props.value);
  return (
    <form
      class="system"
      onSubmit={(e) => {
        e.preventDefault();
        props.onSave(text);
      }}
    >
      <label for="system">System prompt for this conversation</label>
      <textarea id="system" rows={3} value={text} onInput={(e) => setText((e.target as HTMLTextAreaElement).value)} />
      <button type="submit">Save</button>
    </form>
  );
}
