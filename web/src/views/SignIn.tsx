// The sign-in screen: the identity provider's button when the relay has one, and pasting a
// client token, with where such a token comes from.

import { useState } from 'preact/hooks';
import type { WebConfig } from '../api/types';

export function SignIn(props: {
  config: WebConfig;
  reason: string;
  onToken: (token: string) => string | null;
  onProvider: () => void;
}) {
  const [token, setToken] = useState('');
  const [error, setError] = useState('');
  const submit = (event: Event) => {
    event.preventDefault();
    setError(props.onToken(token) ?? '');
  };
  return (
    <main class="signin">
      <h1>cloudllm</h1>
      <p class="lead">Chat with the models on your own computer, from this browser.</p>
      {props.reason && (
        <p class="banner warn" role="alert" data-testid="signin-reason">
          {props.reason}
        </p>
      )}
      {props.config.oidc && (
        <section>
          <button type="button" class="primary wide" onClick={props.onProvider} data-testid="signin-provider">
            Sign in
          </button>
          <p class="hint">With your account at this relay's identity provider.</p>
        </section>
      )}
      <form onSubmit={submit} data-testid="signin-form">
        <label for="token">{props.config.oidc ? 'Or paste a client token' : 'Client token'}</label>
        <textarea
          id="token"
          rows={3}
          value={token}
          spellcheck={false}
          autocomplete="off"
          placeholder="eyJhbGciOi…"
          onInput={(e) => setToken((e.target as HTMLTextAreaElement).value)}
        />
        {error && (
          <p class="error" role="alert">
            {error}
          </p>
        )}
        <button type="submit" class="primary">
          Sign in with this token
        </button>
      </form>
      <details class="help">
        <summary>Where do I get a client token?</summary>
        <ul>
          <li>
            On your own computer, run <code>cloudllm open</code>: it opens this page already signed in, with nothing to copy.
          </li>
          <li>
            On a relay you run yourself: <code>cloudllm-relay token issue --user YOU --scope client</code> prints one.
          </li>
          <li>Otherwise ask the relay's operator for a <em>client</em> token (an <em>agent</em> token is for the daemon, not this page).</li>
        </ul>
        <p>The token stays in this browser only; "Sign out" forgets it.</p>
      </details>
    </main>
  );
}
