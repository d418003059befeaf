// The page: sign-in (a pasted token, the identity provider, or a `cloudllm open` link) and the
// session's lifetime, or, once signed in, the chat (./Chat.tsx).

import { useCallback, useEffect, useState } from 'preact/hooks';
import { webConfig } from '../api/client';
import { type WebConfig } from '../api/types';
import { completeSignIn, refreshDelay, refreshSession, startSignIn } from '../auth/oidc';
import { exchangeCode, openCode } from '../auth/open';
import { forgetSession, loadSession, type Session, saveSession, sessionFor } from '../auth/token';
import { SignIn } from './SignIn';

import { Chat } from './Chat';

export function App() {
  const [config, setConfig] = useState<WebConfig>({});
  const [session, setSession] = useState<Session | null>(null);
  const [ready, setReady] = useState(false);
  const [reason, setReason] = useState('');

  useEffect(() => {
    void (async () => {
      setConfig(await webConfig());
      try {
        const code = openCode(location.hash);
        if (code) {
          history.replaceState(null, '', location.pathname + location.search);
          const made = sessionFor(await exchangeCode(code), 'open');
          if ('error' in made) throw new Error(made.error);
          saveSession(made.session);
        }
        const fromProvider = await completeSignIn();
        if (fromProvider) saveSession(fromProvider);
      } catch (err) {
        setReason((err as Error).message);
      }
      setSession(loadSession());
      setReady(true);
    })();
  }, []);

  const signOut = useCallback((why = '') => {
    forgetSession();
    setSession(null);
    setReason(why);
  }, []);

  // Refresh an identity provider's token before it expires.
  useEffect(() => {
    if (!session) return;
    const delay = refreshDelay(session);
    if (delay === null) return;
    const timer = setTimeout(() => {
      refreshSession(session)
        .then((next) => {
          saveSession(next);
          setSession(next);
        })
        .catch((err: Error) => signOut(`Your sign-in could not be renewed (${err.message}). Sign in again.`));
    }, delay);
    return () => clearTimeout(timer);
  }, [session, signOut]);

  if (!ready) return <main class="loading">Loading…</main>;
  if (!session)
    return (
      <SignIn
        config={config}
        reason={reason}
        onToken={(token) => {
          const made = sessionFor(token, 'paste');
          if ('error' in made) return made.error;
          saveSession(made.session);
          setReason('');
          setSession(made.session);
          return null;
        }}
        onProvider={() => {
          if (config.oidc) startSignIn(config.oidc).catch((err: Error) => setReason(err.message));
        }}
      />
    );
  return <Chat key={session.user} session={session} onSignOut={signOut} />;
}
