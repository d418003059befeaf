// The chat of a signed-in user: the conversation list, the model and device pickers, the
// messages and the composer. State lives here; requests go through the API client and the chat
// logic, storage through the store.

import type { ComponentChildren } from 'preact';
import { useCallback, useEffect, useMemo, useRef, useState } from 'preact/hooks';
import { Client } from '../api/client';
import { ApiError, type DeviceInfo, type ModelTag } from '../api/types';
import { expiredReason, type Session } from '../auth/token';
import { conversationFor, FAILED, type Live, storedOptions, streamAnswer, UNTITLED, wireMessages } from '../chat';
import { onCopyClick } from '../render/markdown';
import { type Conversation, type Message, newId, Store } from '../store/db';
import { exportJson, parseImport } from '../store/transfer';
import { Banner, type BannerState } from './Banner';
import { Composer } from './Composer';
import { MessageView } from './Message';
import { Sidebar } from './Sidebar';
import { SystemPrompt } from './SystemPrompt';

const LAST_MODEL_KEY = 'cloudllm.model';
/** How often the device list is asked again while the page is open: a device that comes
 * online shows up within this. */
const DEVICE_POLL_MS = 15_000;
/** Messages rendered as Markdown at once when a conversation opens; older ones when scrolled
 * near. */
const EAGER_MESSAGES = 12;
/** Least time between two renders of a streaming answer: 50 ms (20 a second) reads as smooth
 * and leaves the main thread free for typing. */
const STREAM_PAINT_MS = 50;
/** How near the bottom (in pixels) the view must be to keep following a streaming answer: a
 * few lines, so that a small scroll back is not taken as reading back. */
const FOLLOW_PX = 120;

export function Chat(props: { session: Session; onSignOut: (why?: string) => void }) {
  const { session, onSignOut } = props;
  const client = useMemo(() => new Client(session.token), [session.token]);
  const [store, setStore] = useState<Store | null>(null);
  const [conversations, setConversations] = useState<Conversation[]>([]);
  const [query, setQuery] = useState('');
  const [hits, setHits] = useState<Set<string> | null>(null);
  const [current, setCurrent] = useState<Conversation | null>(null);
  const [messages, setMessages] = useState<Message[]>([]);
  const [live, setLive] = useState<Live | null>(null);
  const [models, setModels] = useState<ModelTag[]>([]);
  const [devices, setDevices] = useState<DeviceInfo[]>([]);
  const [model, setModel] = useState(localStorage.getItem(LAST_MODEL_KEY) ?? '');
  const [device, setDevice] = useState('');
  const [vision, setVision] = useState<boolean | null>(null);
  const [banner, setBanner] = useState<BannerState | null>(null);
  const [busy, setBusy] = useState<AbortController | null>(null);
  const [editing, setEditing] = useState<number | null>(null);
  const [showSystem, setShowSystem] = useState(false);
  const [menuOpen, setMenuOpen] = useState(false);
  const scroller = useRef<HTMLDivElement>(null);
  /** Whether the view keeps to the newest message: until the person scrolls up. */
  const following = useRef(true);
  const dismiss = useCallback(() => setBanner(null), []);
  const user = session.user;

  const fail = useCallback(
    (err: unknown) => {
      if (!(err instanceof ApiError)) {
        setBanner({ kind: 'error', text: (err as Error).message });
        return;
      }
      switch (err.kind) {
        case 'unauthorized':
          onSignOut(expiredReason(session, err.message));
          return;
        case 'offline':
          setBanner({ kind: 'offline', text: `Your device is offline. ${err.message}` });
          return;
        case 'rate-limited':
          setBanner({ kind: 'rate', text: err.message, until: Date.now() + (err.retryAfter ?? 1) * 1000 });
          return;
        case 'aborted':
          return;
        default:
          setBanner({ kind: 'error', text: err.message });
      }
    },
    [onSignOut, session],
  );

  // The store and the conversation list.
  useEffect(() => {
    let opened: Store | null = null;
    Store.open()
      .then(async (s) => {
        opened = s;
        setStore(s);
        setConversations(await s.list(user));
      })
      .catch((err: Error) => setBanner({ kind: 'error', text: `This browser cannot keep conversations: ${err.message}` }));
    return () => opened?.close();
  }, [user]);

  // Models and devices, asked again every DEVICE_POLL_MS and when the page comes back.
  const refreshDevices = useCallback(async () => {
    try {
      const [tags, list] = await Promise.all([client.tags(), client.devices()]);
      setModels(tags.models);
      setDevices(list.devices);
      setBanner((b) => (b?.kind === 'offline' ? null : b));
    } catch (err) {
      if (err instanceof ApiError && err.kind === 'offline') {
        setModels([]);
        setDevices([]);
      }
      fail(err);
    }
  }, [client, fail]);
  useEffect(() => {
    void refreshDevices();
    const timer = setInterval(() => void refreshDevices(), DEVICE_POLL_MS);
    const onFocus = () => void refreshDevices();
    window.addEventListener('focus', onFocus);
    return () => {
      clearInterval(timer);
      window.removeEventListener('focus', onFocus);
    };
  }, [refreshDevices]);

  // The models the chosen device has (or every device's).
  const choices = useMemo(() => {
    const byModel = new Map<string, string[]>();
    for (const d of devices) for (const m of d.models) byModel.set(m, [...(byModel.get(m) ?? []), d.name]);
    const names = device
      ? (devices.find((d) => d.name === device)?.models ?? [])
      : models.map((m) => m.name).filter((n, i, all) => all.indexOf(n) === i);
    return names.map((name) => ({ name, devices: byModel.get(name) ?? [] }));
  }, [models, devices, device]);

  useEffect(() => {
    if (choices.length && !choices.some((c) => c.name === model)) setModel(choices[0]?.name ?? '');
  }, [choices, model]);
  useEffect(() => {
    if (device && devices.length && !devices.some((d) => d.name === device)) setDevice('');
  }, [devices, device]);

  // Whether the model takes images.
  useEffect(() => {
    setVision(null);
    if (!model) return;
    let stale = false;
    client
      .show(model, device || undefined)
      .then((show) => {
        const families = show.details?.families ?? [];
        const can = show.capabilities?.includes('vision') || families.includes('clip') || families.includes('mllama');
        if (!stale) setVision(!!can);
      })
      .catch(() => !stale && setVision(false));
    return () => {
      stale = true;
    };
  }, [client, model, device]);

  // Esc stops, anywhere on the page.
  useEffect(() => {
    const onKey = (event: KeyboardEvent) => {
      if (event.key === 'Escape' && busy) {
        event.preventDefault();
        busy.abort();
      }
    };
    window.addEventListener('keydown', onKey);
    return () => window.removeEventListener('keydown', onKey);
  }, [busy]);

  // Search over titles and texts.
  useEffect(() => {
    if (!store || !query.trim()) {
      setHits(null);
      return;
    }
    let stale = false;
    void store.search(user, query).then((found) => !stale && setHits(found));
    return () => {
      stale = true;
    };
  }, [store, user, query, conversations]);

  const scrollDown = () => {
    const el = scroller.current;
    if (!el) return;
    following.current = true;
    el.scrollTop = el.scrollHeight;
    // Messages out of view count with an estimated height (content-visibility): the last one,
    // drawn now that it is in view, may move the bottom further.
    requestAnimationFrame(() => (el.scrollTop = el.scrollHeight));
  };

  const open = async (conversation: Conversation) => {
    if (!store || busy) return;
    setCurrent(conversation);
    setEditing(null);
    setLive(null);
    setMessages(await store.messages(user, conversation.id));
    if (conversation.model) setModel(conversation.model);
    setDevice(conversation.device);
    setMenuOpen(false);
    requestAnimationFrame(scrollDown);
  };

  const newChat = () => {
    if (busy) return;
    setCurrent(null);
    setMessages([]);
    setEditing(null);
    setLive(null);
    setMenuOpen(false);
  };

  /** A conversation not saved yet, with the model and device picked now. */
  const fresh = (): Conversation => {
    const now = Date.now();
    return { id: newId(), user, title: UNTITLED, systemPrompt: '', model, device, createdAt: now, updatedAt: now, messageCount: 0 };
  };

  const persist = async (conversation: Conversation, list: Message[]) => {
    if (!store) return;
    await store.save(conversation, list);
    setConversations(await store.list(user));
  };

  /** Asks for an answer to `history` (which ends with the person's message). */
  const answer = async (conversation: Conversation, history: Message[]) => {
    const controller = new AbortController();
    setBusy(controller);
    setBanner((b) => (b?.kind === 'rate' ? b : null));
    setMessages(history);
    setLive({ content: '', thinking: '', thinkingOpen: false, tokens: 0 });
    let latest: Live = { content: '', thinking: '', thinkingOpen: false, tokens: 0 };
    let frame = 0;
    let ended = false;
    const paint = () => {
      frame = 0;
      if (ended) return;
      setLive(latest);
      const el = scroller.current;
      if (el && following.current) el.scrollTop = el.scrollHeight;
    };
    let reply: Message;
    try {
      const options = storedOptions();
      const request = {
        model,
        messages: wireMessages(conversation.systemPrompt, history),
        ...(device ? { device } : {}),
        ...(options ? { options } : {}),
      };
      reply = await streamAnswer(
        client,
        request,
        (next) => {
          latest = next;
          // At most one render per STREAM_PAINT_MS: smooth to the eye, cheap for the page.
          frame ||= window.setTimeout(() => requestAnimationFrame(paint), STREAM_PAINT_MS);
        },
        controller.signal,
      );
    } catch (err) {
      reply = { role: 'assistant', content: latest.content, model };
      if (latest.thinking) reply.thinking = latest.thinking;
      reply.note = err instanceof ApiError && err.kind === 'aborted' ? 'Stopped.' : `${FAILED}${(err as Error).message}`;
      fail(err);
    }
    ended = true;
    if (frame) clearTimeout(frame);
    const list = [...history, reply];
    setLive(null);
    setMessages(list);
    setBusy(null);
    if (following.current) requestAnimationFrame(scrollDown);
    const saved = { ...conversation, model, device, updatedAt: Date.now() };
    setCurrent(saved);
    await persist(saved, list);
  };

  const send = async (text: string, images: string[]) => {
    if (!model) {
      setBanner({ kind: 'error', text: 'No model to talk to: is Ollama running on your computer, with a model pulled?' });
      return false;
    }
    if (images.length && vision === false) {
      setBanner({ kind: 'error', text: `${model} cannot see images: choose a vision model (one that lists "vision").` });
      return false;
    }
    localStorage.setItem(LAST_MODEL_KEY, model);
    const message: Message = { role: 'user', content: text };
    if (images.length) message.images = images;
    const conversation = conversationFor(current, !messages.length, text, fresh);
    let history: Message[];
    if (editing !== null) {
      history = [...messages.slice(0, editing), message];
      setEditing(null);
    } else {
      history = [...messages, message];
    }
    setCurrent(conversation);
    requestAnimationFrame(scrollDown);
    void answer(conversation, history);
    return true;
  };

  const regenerate = () => {
    if (!current || busy) return;
    let end = messages.length;
    while (end > 0 && messages[end - 1]?.role === 'assistant') end -= 1;
    if (end > 0) void answer(current, messages.slice(0, end));
  };

  const setSystemPrompt = async (text: string) => {
    const next = { ...(current ?? fresh()), systemPrompt: text };
    setCurrent(next);
    await persist(next, messages);
  };

  const rename = async (conversation: Conversation) => {
    const title = prompt('New name for this conversation', conversation.title);
    if (title === null || !store) return;
    await store.rename(user, conversation.id, title);
    setConversations(await store.list(user));
    if (current?.id === conversation.id) setCurrent({ ...conversation, title: title.trim() || conversation.title });
  };

  const remove = async (conversation: Conversation) => {
    if (!store || !confirm(`Delete "${conversation.title}"? This cannot be undone.`)) return;
    await store.remove(user, conversation.id);
    setConversations(await store.list(user));
    if (current?.id === conversation.id) newChat();
  };

  const exportAll = async () => {
    if (!store) return;
    const items = await Promise.all(
      conversations.map(async (conversation) => ({ conversation, messages: await store.messages(user, conversation.id) })),
    );
    const blob = new Blob([exportJson(items)], { type: 'application/json' });
    const link = document.createElement('a');
    link.href = URL.createObjectURL(blob);
    link.download = `cloudllm-conversations-${new Date().toISOString().slice(0, 10)}.json`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  };

  const importFile = async (file: File) => {
    if (!store) return;
    const parsed = parseImport(await file.text(), user);
    if ('error' in parsed) {
      setBanner({ kind: 'error', text: parsed.error });
      return;
    }
    for (const item of parsed.items) await store.save(item.conversation, item.messages);
    setConversations(await store.list(user));
    setBanner({ kind: 'info', text: `Imported ${parsed.items.length} conversation(s).` });
  };

  const signOut = async (wipe: boolean) => {
    busy?.abort();
    if (wipe && store) await store.removeAll(user);
    onSignOut(wipe ? 'Signed out; this browser no longer has your conversations.' : '');
  };

  const shown = hits ? conversations.filter((c) => hits.has(c.id)) : conversations;
  const streamingMessage: Message | null = live
    ? { role: 'assistant', content: live.content, thinking: live.thinking, model }
    : null;

  return (
    <div class={`layout ${menuOpen ? 'menu-open' : ''}`}>
      <Sidebar
        query={query}
        onQuery={setQuery}
        shown={shown}
        currentId={current?.id}
        who={session.label}
        onNew={newChat}
        onOpen={(c) => void open(c)}
        onRename={(c) => void rename(c)}
        onRemove={(c) => void remove(c)}
        onExport={() => void exportAll()}
        onImport={(file) => void importFile(file)}
        onSignOut={(deleteHere) => void signOut(deleteHere)}
      />
      <main class="chat">
        <header class="bar">
          <button type="button" class="icon menu" aria-label="Conversations" onClick={() => setMenuOpen(!menuOpen)}>
            ☰
          </button>
          <Picker label="Model" testid="model" value={model} onChange={setModel} disabled={!!busy}>
            {!choices.length && <option value="">no models</option>}
            {choices.map((c) => (
              <option key={c.name} value={c.name}>
                {c.devices.length && !device ? `${c.name} — ${c.devices.join(', ')}` : c.name}
              </option>
            ))}
          </Picker>
          {devices.length > 1 && (
            <Picker label="Device" testid="device" value={device} onChange={setDevice} disabled={!!busy}>
              <option value="">any device</option>
              {devices.map((d) => (
                <option key={d.id} value={d.name}>
                  {d.name}
                </option>
              ))}
            </Picker>
          )}
          <span class={`status ${devices.length ? 'online' : 'offline'}`} data-testid="device-status">
            {devices.length ? (devices.length === 1 ? `${devices[0]?.name} online` : `${devices.length} devices online`) : 'offline'}
          </span>
          <button type="button" class="subtle" onClick={() => setShowSystem(!showSystem)} aria-expanded={showSystem}>
            System prompt
          </button>
        </header>
        {showSystem && (
          <SystemPrompt key={current?.id ?? 'new'} value={current?.systemPrompt ?? ''} onSave={(t) => void setSystemPrompt(t)} />
        )}
        {banner && <Banner banner={banner} onDismiss={dismiss} />}
        <div
          class="messages"
          ref={scroller}
          onClick={(e) => void onCopyClick(e)}
          onScroll={(e) => {
            const el = e.currentTarget;
            following.current = el.scrollHeight - el.scrollTop - el.clientHeight < FOLLOW_PX;
          }}
          data-testid="messages"
        >
          {!messages.length && !live && (
            <div class="welcome">
              <h2>What can I help with?</h2>
              <p>Your messages go to the models on your own computer. Conversations stay in this browser.</p>
            </div>
          )}
          {messages.map((m, i) => (
            <MessageView
              key={`${current?.id}-${i}`}
              message={m}
              index={i}
              eager={i >= messages.length - EAGER_MESSAGES}
              {...(busy ? {} : { onEdit: setEditing })}
              {...(!busy && i === messages.length - 1 && m.role === 'assistant' ? { onRegenerate: regenerate } : {})}
            />
          ))}
          {streamingMessage && live && (
            <MessageView message={streamingMessage} index={messages.length} streaming thinkingOpen={live.thinkingOpen} />
          )}
        </div>
        <Composer
          busy={!!busy}
          editing={editing !== null ? (messages[editing]?.content ?? '') : null}
          vision={vision}
          model={model}
          onSend={send}
          onStop={() => busy?.abort()}
          onCancelEdit={() => setEditing(null)}
          onRefuse={(text) => setBanner({ kind: 'error', text })}
        />
      </main>
    </div>
  );
}

/** One of the bar's pickers (model, device): a `<select>` named for screen readers, which
 * cannot change while an answer streams. */
function Picker(props: {
  label: string;
  testid: string;
  value: string;
  onChange: (value: string) => void;
  disabled: boolean;
  children: ComponentChildren;
}) {
  return (
    <label class="picker">
      <span class="sr">{props.label}</span>
      <select
        value={props.value}
        onChange={(e) => props.onChange((e.target as HTMLSelectElement).value)}
        data-testid={props.testid}
        disabled={props.disabled}
      >
        {props.children}
      </select>
    </label>
  );
}
