// The conversation list beside the chat: new, search, open, rename, delete, export and import,
// and signing out. It holds no state of its own; the chat passes what to show and what to do.

import type { Conversation } from '../store/db';

export interface SidebarProps {
  query: string;
  onQuery: (query: string) => void;
  /** The conversations matching the query, newest first. */
  shown: Conversation[];
  currentId?: string;
  /** Who is signed in, as the session names them. */
  who: string;
  onNew: () => void;
  onOpen: (c: Conversation) => void;
  onRename: (c: Conversation) => void;
  onRemove: (c: Conversation) => void;
  onExport: () => void;
  onImport: (file: File) => void;
  /** `true`: also delete this browser's conversations. */
  onSignOut: (deleteHere: boolean) => void;
}

export function Sidebar(props: SidebarProps) {
  return (
  <aside class="sidebar" aria-label="Conversations">
    <button type="button" class="primary wide" onClick={props.onNew} data-testid="new-chat">
      New chat
    </button>
    <input
      type="search"
      placeholder="Search conversations"
      aria-label="Search conversations"
      value={props.query}
      onInput={(e) => props.onQuery((e.target as HTMLInputElement).value)}
    />
    <ul class="conversations" data-testid="conversations">
      {props.shown.map((c) => (
        <li key={c.id} class={c.id === props.currentId ? 'current' : ''}>
          <button type="button" class="title" onClick={() => props.onOpen(c)} data-testid="conversation">
            {c.title}
          </button>
          <button type="button" class="icon" aria-label={`Rename ${c.title}`} title="Rename" onClick={() => props.onRename(c)}>
            ✎
          </button>
          <button type="button" class="icon" aria-label={`Delete ${c.title}`} title="Delete" onClick={() => props.onRemove(c)}>
            ✕
          </button>
        </li>
      ))}
      {!props.shown.length && <li class="empty">{props.query ? 'Nothing found.' : 'No conversations yet.'}</li>}
    </ul>
    <div class="sidebar-foot">
      <button type="button" onClick={props.onExport}>
        Export
      </button>
      <label class="button">
        Import
        <input
          type="file"
          accept="application/json,.json"
          hidden
          onChange={(e) => {
            const input = e.target as HTMLInputElement;
            const file = input.files?.[0];
            if (file) props.onImport(file);
            input.value = '';
          }}
        />
      </label>
      <span class="who" title={props.who}>
        {props.who}
      </span>
      <button type="button" onClick={() => props.onSignOut(false)} data-testid="sign-out">
        Sign out
      </button>
      <button type="button" class="subtle" onClick={() => props.onSignOut(true)}>
        Sign out and delete conversations here
      </button>
    </div>
  </aside>
  );
}
