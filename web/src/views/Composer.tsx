// The message box: Enter sends, Shift+Enter starts a new line, Esc (or the button) stops.
// Images can be attached for vision models; for others the page says why not.

import { useEffect, useRef, useState } from 'preact/hooks';

/** Largest image attached, before base64: 10 MiB (bigger ones exceed most tiers' body limit). */
const MAX_IMAGE_BYTES = 10 * 1024 * 1024;

function toBase64(file: File): Promise<string> {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ''));
    reader.onerror = () => reject(new Error('the image could not be read'));
    reader.readAsDataURL(file);
  });
}

export function Composer(props: {
  busy: boolean;
  editing: string | null;
  vision: boolean | null;
  model: string;
  onSend: (text: string, images: string[]) => Promise<boolean>;
  onStop: () => void;
  onCancelEdit: () => void;
  onRefuse: (why: string) => void;
}) {
  const [text, setText] = useState('');
  const [images, setImages] = useState<string[]>([]);
  const box = useRef<HTMLTextAreaElement>(null);

  useEffect(() => {
    if (props.editing !== null) {
      setText(props.editing);
      box.current?.focus();
    }
  }, [props.editing]);

  const submit = async () => {
    if (props.busy || !text.trim()) return;
    if (await props.onSend(text, images)) {
      setText('');
      setImages([]);
    }
  };

  const attach = async (files: FileList | null) => {
    if (!files?.length) return;
    if (props.vision !== true) {
      props.onRefuse(
        props.vision === null
          ? 'Still checking whether this model can see images: try again in a moment.'
          : `${props.model || 'This model'} cannot see images (it does not list the "vision" capability): choose a vision model to attach images.`,
      );
      return;
    }
    const added: string[] = [];
    for (const file of Array.from(files)) {
      if (!file.type.startsWith('image/')) {
        props.onRefuse(`${file.name} is not an image.`);
        continue;
      }
      if (file.size > MAX_IMAGE_BYTES) {
        props.onRefuse(`${file.name} is larger than 10 MiB: use a smaller image.`);
        continue;
      }
      added.push(await toBase64(file));
    }
    setImages((list) => [...list, ...added]);
  };

  return (
    <form
      class="composer"
      onSubmit={(e) => {
        e.preventDefault();
        void submit();
      }}
    >
      {props.editing !== null && (
        <p class="editing">
          Editing a message: sending replaces it and everything after it.{' '}
          <button type="button" class="subtle" onClick={props.onCancelEdit}>
            Cancel
          </button>
        </p>
      )}
      {images.length > 0 && (
        <div class="attached">
          {images.map((image, i) => (
            <button type="button" key={i} class="thumb" title="Remove" onClick={() => setImages(images.filter((_, j) => j !== i))}>
              <img src={`data:image/*;base64,${image}`} alt={`attachment ${i + 1}`} />
            </button>
          ))}
        </div>
      )}
      <div class="row">
        <label
          class="button attach"
          title={props.vision === false ? `${props.model || 'This model'} cannot see images` : 'Attach images'}
          data-vision={String(props.vision)}
        >
          <svg aria-hidden="true" width="18" height="18" viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2">
            <path d="M21 11.5l-8.5 8.5a5 5 0 0 1-7-7L14 4.5a3.5 3.5 0 0 1 5 5l-8.5 8.5a2 2 0 0 1-3-3L15 7.5" />
          </svg>
          <span class="sr">Attach images</span>
          <input
            type="file"
            accept="image/*"
            multiple
            hidden
            data-testid="attach"
            onChange={(e) => {
              const input = e.target as HTMLInputElement;
              void attach(input.files).finally(() => (input.value = ''));
            }}
          />
        </label>
        <textarea
          ref={box}
          rows={1}
          value={text}
          aria-label="Message"
          placeholder="Message (Enter sends, Shift+Enter new line, Esc stops)"
          data-testid="input"
          onInput={(e) => setText((e.target as HTMLTextAreaElement).value)}
          onKeyDown={(e) => {
            if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
              e.preventDefault();
              void submit();
            }
          }}
        />
        {props.busy ? (
          <button type="button" class="stop" onClick={props.onStop} data-testid="stop">
            Stop
          </button>
        ) : (
          <button type="submit" class="primary" data-testid="send" disabled={!text.trim()}>
            Send
          </button>
        )}
      </div>
    </form>
  );
}
