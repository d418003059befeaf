// A real OpenID Provider on loopback for cloudllm's login tests: `oidc-provider` (a certified
// implementation), configured with its development login/consent pages, the device
// authorization grant (RFC 8628), PKCE, refresh tokens and JWT access tokens, so the daemon's
// login code is tested against the protocol as a real identity provider speaks it.
//
// Usage: node provider.mjs [PORT]
//   PORT (argument or env PORT, default 0 = any free port) on 127.0.0.1.
//   The first line on stdout is the issuer URL, e.g. `http://127.0.0.1:41234`; logs go to stderr.
//   The process exits when stdin closes, so a test that dies cannot leave it running.
// Env:
//   ACCESS_TTL   access token lifetime in seconds (default 3600)
//   DEVICE_TTL   device code lifetime in seconds (default 600)
//   CLIENT_ID    the one public client's id (default `cloudllmd`)
//   AUDIENCE     `aud` of the access tokens (default `cloudllm`)
//   TIER         value of the `tier` claim in access tokens (default `free`)
//   WEB_CLIENT_ID when set, a second client with this id for the relay's web page (below)
//
// The client is a native public client (`application_type: 'native'`,
// `token_endpoint_auth_method: 'none'`). Its redirect URI is registered as
// `http://127.0.0.1/callback`; oidc-provider lets native clients use any port on a loopback
// redirect URI (RFC 8252 section 7.3), so the daemon may bind port 0.
//
// The web page's client (with WEB_CLIENT_ID) is a browser-based public client
// (`application_type: 'web'`, no secret, authorization code + PKCE and refresh tokens) whose one
// redirect URI is the relay's root URL. The relay starts after the provider (its config names
// the issuer), so that URL is known only then: the provider reads it as the first line on
// stdin, and answers requests once it has it (requests that come earlier wait). Its token
// endpoint lets the relay's origin (the redirect URI's) call it from the page: CORS per
// client, `clientBasedCORS` below.
//
// Access tokens are JWTs (RS256, key in `{issuer}/jwks`, regenerated at each start) for the
// resource server `urn:cloudllm:relay`, which every grant gets by default (resource indicators,
// RFC 8707). Claims: iss, sub (the login name typed in), aud (AUDIENCE), scope (granted
// resource scopes among `agent client`), client_id, iat, exp, jti, tier.

import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { createInterface } from 'node:readline';

import Provider from 'oidc-provider';

const port = Number(process.argv[2] ?? process.env.PORT ?? 0);
const accessTtl = Number(process.env.ACCESS_TTL ?? 3600);
const deviceTtl = Number(process.env.DEVICE_TTL ?? 600);
const clientId = process.env.CLIENT_ID ?? 'cloudllmd';
const audience = process.env.AUDIENCE ?? 'cloudllm';
const tier = process.env.TIER ?? 'free';
const webClientId = process.env.WEB_CLIENT_ID;

/** The resource server (the relay) every access token is issued for. */
const RESOURCE = 'urn:cloudllm:relay';
/** The scopes the relay understands: `agent` opens a tunnel, `client` sends requests. */
const RESOURCE_SCOPES = 'agent client';

if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`invalid port: ${process.argv[2] ?? process.env.PORT}`);
  process.exit(2);
}
for (const [name, value] of [['ACCESS_TTL', accessTtl], ['DEVICE_TTL', deviceTtl]]) {
  if (!Number.isInteger(value) || value <= 0) {
    console.error(`invalid ${name}: ${process.env[name]}`);
    process.exit(2);
  }
}

// A fresh signing key per run: nothing secret is committed, and no test can depend on a key.
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = {
  ...privateKey.export({ format: 'jwk' }),
  kid: randomUUID(),
  use: 'sig',
  alg: 'RS256',
};

// stdin: the web client's redirect URI (first line, with WEB_CLIENT_ID); its end stops us.
const stdin = createInterface({ input: process.stdin });
stdin.on('close', () => process.exit(0));
const firstLine = new Promise((resolve) => stdin.once('line', resolve));

/** The relay's root URL, read from stdin: an absolute http(s) URL. */
async function webRedirectUri() {
  const line = (await firstLine).trim();
  const url = URL.parse(line);
  if (!url || !['http:', 'https:'].includes(url.protocol)) {
    console.error(`the web client's redirect URI must be an http(s) URL, got ${JSON.stringify(line)}`);
    process.exit(2);
  }
  return url.href;
}

/** Lets a browser page call the token endpoint only from its own client's redirect origin. */
function clientBasedCORS(_ctx, origin, client) {
  return client.clientAuthMethod === 'none'
    && client.redirectUris.some((uri) => URL.parse(uri)?.origin === origin);
}

let handle = null;
const waiting = [];
const server = createServer((req, res) => {
  if (handle) handle(req, res);
  else waiting.push([req, res]);
});
server.listen(port, '127.0.0.1', async () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  // The tests read this line: nothing may be printed on stdout before it.
  console.log(issuer);
  const webClients = webClientId
    ? [
        {
          client_id: webClientId,
          application_type: 'web',
          token_endpoint_auth_method: 'none',
          grant_types: ['authorization_code', 'refresh_token'],
          response_types: ['code'],
          redirect_uris: [await webRedirectUri()],
        },
      ]
    : [];
  const provider = new Provider(issuer, {
    clientBasedCORS,
    clients: [
      ...webClients,
      {
        client_id: clientId,
        application_type: 'native',
        token_endpoint_auth_method: 'none',
        grant_types: [
          'authorization_code',
          'refresh_token',
          'urn:ietf:params:oauth:grant-type:device_code',
        ],
        response_types: ['code'],
        redirect_uris: ['http://127.0.0.1/callback'],
      },
    ],
    jwks: { keys: [signingKey] },
    cookies: { keys: [randomUUID()] },
    // Any login name is an account; its id is the `sub`.
    findAccount: (_ctx, sub) => ({ accountId: sub, claims: () => ({ sub }) }),
    features: {
      devInteractions: { enabled: true },
      deviceFlow: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => RESOURCE,
        useGrantedResource: () => true,
        getResourceServerInfo: (_ctx, resourceIndicator) => {
          if (resourceIndicator !== RESOURCE) {
            throw new Provider.errors.InvalidTarget();
          }
          return {
            audience,
            scope: RESOURCE_SCOPES,
            accessTokenTTL: accessTtl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    // Refresh tokens for every grant of a client allowed to use them, with or without
    // `offline_access` (which oidc-provider drops from authorization requests without
    // `prompt=consent`): the daemon must refresh in any case.
    issueRefreshToken: (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    extraTokenClaims: () => ({ tier }),
    ttl: {
      AccessToken: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? accessTtl,
      DeviceCode: deviceTtl,
      Grant: 3600,
      IdToken: 3600,
      Interaction: 600,
      RefreshToken: 3600,
      Session: 3600,
    },
  });
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  handle = provider.callback();
  for (const [req, res] of waiting.splice(0)) handle(req, res);
});

process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
