// The line above the messages that says what went wrong or what happened: the device is
// offline, a rate limit (with the wait, counted down, gone when it is over), an error, an
// import done. The chat decides what to say; this shows it.

import { useEffect, useState } from 'preact/hooks';

/** How often a rate limit's wait is counted down: twice a second keeps the whole seconds shown
 * right. */
const COUNTDOWN_MS = 500;

export interface BannerState {
  kind: 'offline' | 'rate' | 'error' | 'info';
  text: string;
  /** When a rate limit's wait ends (ms since the epoch): the banner goes away then. */
  until?: number;
}

export function Banner(props: { banner: BannerState; onDismiss: () => void }) {
  const { banner, onDismiss } = props;
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const until = banner.until;
    if (!until) return;
    const timer = setInterval(() => {
      setNow(Date.now());
      if (Date.now() >= until) onDismiss();
    }, COUNTDOWN_MS);
    return () => clearInterval(timer);
  }, [banner, onDismiss]);
  const waitSeconds = banner.until ? Math.max(0, Math.ceil((banner.until - now) / 1000)) : 0;
  return (
    <div class={`banner ${banner.kind}`} role="alert" data-testid={`banner-${banner.kind}`}>
      <span>
        {banner.text}
        {banner.kind === 'rate' && ` — try again in ${waitSeconds} s.`}
      </span>
      <button type="button" class="icon" aria-label="Dismiss" onClick={onDismiss}>
        ✕
      </button>
    </div>
  );
}
