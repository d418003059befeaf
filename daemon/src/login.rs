//! Logging in to an OpenID Connect identity provider: discovery, the device authorization grant
//! (RFC 8628, for machines without a browser), the authorization code grant with PKCE and a
//! loopback redirect (RFC 8252, for desktops), and the refresh grant.
//!
//! The daemon runs these flows, not the CLI, because the daemon owns the credentials and
//! refreshes them while the tunnel is up; the CLI only shows the user a link or a code. The
//! protocol work is the `oauth2` crate's; this module adds what it leaves to its caller: an
//! HTTP client bounded in time and size that follows no redirects, the loopback listener for the
//! browser's redirect, and errors that tell a user what happened and what to do.
//!
//! No token, code or verifier ever appears in an error or a log line: errors carry the
//! provider's `error` code and description, the failing URL, or a transport failure.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cloudllm_proto::Secret;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use oauth2::basic::{BasicClient, BasicTokenResponse, BasicTokenType};
use oauth2::{
    AsyncHttpClient, AuthUrl, AuthorizationCode, ClientId, CsrfToken, DeviceAuthorizationUrl,
    ErrorResponseType, HttpRequest, HttpResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl,
    RefreshToken, RequestTokenError, Scope, StandardDeviceAuthorizationResponse,
    StandardErrorResponse, TokenResponse, TokenUrl,
};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::timeout;
use tracing::{Instrument, debug, debug_span, info, warn};
use url::{Host, Url};

/// Time for one request to the identity provider, body included: 30 s covers a slow link and a
/// provider under load, and a user waiting at a prompt still hears back within the minute.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Time for the TCP and TLS connect alone, so an unreachable provider fails fast.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer read from the provider: discovery documents (Keycloak's, among the largest,
/// is about 10 KiB) and token responses carrying an ID token (a few KiB) fit with room to spare.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// How long the browser login waits for the redirect: 5 minutes lets a user sign in, find a
/// second factor and consent, and a forgotten login does not hold a port for long.
pub const BROWSER_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The longest a device login is waited for, whatever the provider allows: 30 minutes is the
/// most common providers give (Microsoft 15, Google 30), enough to fetch a phone and sign in.
const MAX_DEVICE_WAIT: Duration = Duration::from_secs(30 * 60);

/// Shortest pause between polls of the token endpoint in the device grant, whatever the
/// provider says: RFC 8628's default interval, so a provider answering 0 is not hammered.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Connections the loopback listener serves at once: a browser opens a few (page, favicon,
/// speculative preconnects); more is not a browser. When all are taken, the oldest one that has
/// not sent its request yet makes room for the newcomer (see [`CallbackConnections`]), so idle
/// connections opened by another local process cannot keep the browser out.
const MAX_CALLBACK_CONNECTIONS: usize = 16;

/// Time a connection to the loopback listener has to send its request headers: a browser sends
/// them at once; 10 s also covers a browser busy starting up, and a silent connection does not
/// hold one of the [`MAX_CALLBACK_CONNECTIONS`] for long.
const CALLBACK_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head (request line with the query, and headers) the loopback listener
/// reads: a redirect's query is a code, a state and an issuer (under 2 KiB even for providers
/// with long codes) and a browser's headers a few KiB more.
const MAX_CALLBACK_HEAD_BYTES: usize = 16 * 1024;

/// Time one connection to the loopback listener may stay open: the callback's answer waits for
/// the code exchange, which is bounded by [`HTTP_TIMEOUT`].
const CALLBACK_CONNECTION_TIMEOUT: Duration = Duration::from_secs(45);

/// Time given to the page that ends the browser login to reach the browser before the listener
/// closes.
const PAGE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest provider-supplied text (error descriptions) repeated to the user.
const MAX_PROVIDER_TEXT: usize = 300;

/// The path of the loopback redirect URI.
const CALLBACK_PATH: &str = "/callback";

/// Why a login or refresh failed. The messages are shown to users as they are.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The user declined at the identity provider.
    #[error("the login was declined at the identity provider; run `cloudllm login` again to retry")]
    Denied,
    /// The device code expired before the user approved it.
    #[error(
        "the login code expired before it was approved; run `cloudllm login` again and approve it sooner"
    )]
    Expired,
    /// The provider has no device authorization endpoint.
    #[error(
        "this identity provider does not offer the device login (RFC 8628); use the browser login instead"
    )]
    NoDeviceFlow,
    /// The browser's redirect carried a `state` that is not this login's: a forged or stale
    /// answer, refused. [`browser_finish`] answers such a redirect with HTTP 400 and keeps
    /// waiting for the real one, so it never ends a login with this error.
    #[error(
        "the browser came back with an answer that belongs to no login in progress (state mismatch), so it was refused; run `cloudllm login` again"
    )]
    StateMismatch,
    /// The redirect came from another issuer than the one the login started with (RFC 9207).
    #[error(
        "the browser's answer came from issuer {0}, not from the one this login started with, so it was refused; run `cloudllm login` again"
    )]
    WrongIssuer(String),
    /// The provider no longer accepts the refresh token: the user must log in again.
    #[error(
        "the identity provider no longer accepts this machine's saved login (expired or revoked); run `cloudllm login` again"
    )]
    Revoked,
    /// The provider answered with an OAuth error: its `error` code and description.
    #[error("the identity provider refused: {0}")]
    Provider(String),
    /// The provider could not be reached, or answered with a server error.
    #[error(
        "could not reach the identity provider: {0}; check the network connection and the issuer URL"
    )]
    Network(String),
    /// A request to the provider took too long.
    #[error(
        "the identity provider did not answer within {} s; check the network connection and try again",
        HTTP_TIMEOUT.as_secs()
    )]
    Timeout,
    /// The browser never came back to the loopback redirect.
    #[error(
        "no answer from the browser within {} minutes; run `cloudllm login` again and finish signing in in the browser",
        BROWSER_TIMEOUT.as_secs() / 60
    )]
    BrowserTimeout,
    /// The provider's OpenID configuration is missing, malformed, insecure or for another issuer.
    #[error("the identity provider's configuration is unusable: {0}; check the issuer URL")]
    Discovery(String),
    /// The provider's answer is not one the protocol allows.
    #[error("the identity provider sent an answer cloudllm cannot use: {0}")]
    InvalidResponse(String),
    /// The loopback listener for the browser's redirect could not be opened.
    #[error("could not listen on 127.0.0.1 for the browser's answer: {0}")]
    Listen(String),
}

/// An identity provider as the login flows need it, from its OpenID configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// The issuer identifier, as configured and as the provider names itself.
    pub issuer: Url,
    /// Where the browser login starts.
    pub authorization_endpoint: Url,
    /// Where codes and refresh tokens are exchanged for tokens.
    pub token_endpoint: Url,
    /// Where the device login starts, if the provider offers it.
    pub device_authorization_endpoint: Option<Url>,
    /// This application's (public) client id at the provider.
    pub client_id: String,
    /// The scopes requested at login.
    pub scopes: Vec<String>,
}

/// The tokens a login or refresh produced. `Debug` shows no secret.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// The bearer token for the relay.
    pub access_token: Secret,
    /// The token that gets the next access token, if the provider issued one.
    pub refresh_token: Option<Secret>,
    /// When the access token expires, in Unix seconds, if the provider said.
    pub expires_at: Option<u64>,
}

/// A device login in progress: what to show the user, and what to poll with.
pub struct DeviceLogin {
    /// The page where the user enters [`user_code`](Self::user_code).
    pub verification_uri: String,
    /// The same page with the code filled in (for a link or a QR code), if the provider has one.
    pub verification_uri_complete: Option<String>,
    /// The code the user enters; short-lived and useless without approval, so shown freely.
    pub user_code: String,
    /// When the code expires, in Unix seconds (at most [`MAX_DEVICE_WAIT`] from the start).
    pub expires_at: u64,
    details: StandardDeviceAuthorizationResponse,
}

impl fmt::Debug for DeviceLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceLogin")
            .field("verification_uri", &self.verification_uri)
            .field("verification_uri_complete", &self.verification_uri_complete)
            .field("user_code", &self.user_code)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A browser login in progress: the page to open, and the loopback listener waiting for the
/// browser to come back.
pub struct BrowserLogin {
    /// The page to open in the user's browser.
    pub authorize_url: Url,
    listener: TcpListener,
    verifier: PkceCodeVerifier,
    state: CsrfToken,
    redirect_uri: Url,
}

impl BrowserLogin {
    /// Where the provider sends the browser back: `http://127.0.0.1:PORT/callback`.
    pub fn redirect_uri(&self) -> &Url {
        &self.redirect_uri
    }
}

impl fmt::Debug for BrowserLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrowserLogin")
            .field("authorize_url", &self.authorize_url.as_str())
            .field("redirect_uri", &self.redirect_uri.as_str())
            .finish_non_exhaustive()
    }
}

/// The part of an OpenID configuration the login flows use (OpenID Connect Discovery 1.0 §3).
#[derive(Deserialize)]
struct Metadata {
    issuer: String,
    authorization_endpoint: Url,
    token_endpoint: Url,
    #[serde(default)]
    device_authorization_endpoint: Option<Url>,
}

/// Fetches `{issuer}/.well-known/openid-configuration` (bounded size/time) and checks the issuer
/// matches, and that every endpoint is `https://` (or `http://` on a loopback address, for
/// tests and self-hosted providers on the same machine).
pub async fn discover(
    issuer: &Url,
    client_id: &str,
    scopes: &[String],
) -> Result<Provider, LoginError> {
    require_secure(issuer, "the issuer")?;
    let base = issuer.as_str().trim_end_matches('/');
    let url = Url::parse(&format!("{base}/.well-known/openid-configuration"))
        .map_err(|e| LoginError::Discovery(format!("{issuer} cannot be an issuer: {e}")))?;
    let http = Http::new()?;
    let request = http::Request::get(url.as_str())
        .header(http::header::ACCEPT, "application/json")
        .body(Vec::new())
        .map_err(|e| LoginError::Discovery(format!("{url}: {e}")))?;
    let response = http.send(request).await.map_err(|e| match e {
        HttpError::Timeout => LoginError::Timeout,
        e => LoginError::Network(e.to_string()),
    })?;
    if response.status() != StatusCode::OK {
        return Err(LoginError::Discovery(format!(
            "{url} answered HTTP {}",
            response.status().as_u16()
        )));
    }
    let metadata: Metadata = serde_json::from_slice(response.body())
        .map_err(|e| LoginError::Discovery(format!("{url} is not an OpenID configuration: {e}")))?;
    if !same_issuer(&metadata.issuer, issuer.as_str()) {
        return Err(LoginError::Discovery(format!(
            "{url} names issuer {}, not {issuer}",
            clean(&metadata.issuer)
        )));
    }
    require_secure(
        &metadata.authorization_endpoint,
        "the authorization endpoint",
    )?;
    require_secure(&metadata.token_endpoint, "the token endpoint")?;
    if let Some(endpoint) = &metadata.device_authorization_endpoint {
        require_secure(endpoint, "the device authorization endpoint")?;
    }
    debug!(%issuer, device = metadata.device_authorization_endpoint.is_some(), "discovered the identity provider");
    Ok(Provider {
        issuer: issuer.clone(),
        authorization_endpoint: metadata.authorization_endpoint,
        token_endpoint: metadata.token_endpoint,
        device_authorization_endpoint: metadata.device_authorization_endpoint,
        client_id: client_id.to_owned(),
        scopes: scopes.to_vec(),
    })
}

/// Starts a device login (RFC 8628 §3.1): the provider hands out a user code to enter at its
/// verification page.
pub async fn device_start(provider: &Provider) -> Result<DeviceLogin, LoginError> {
    let endpoint = provider
        .device_authorization_endpoint
        .clone()
        .ok_or(LoginError::NoDeviceFlow)?;
    let client = BasicClient::new(ClientId::new(provider.client_id.clone()))
        .set_device_authorization_url(DeviceAuthorizationUrl::from_url(endpoint));
    let http = Http::new()?;
    let details: StandardDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scopes(scopes(provider))
        .request_async(&http)
        .await
        .map_err(|e| http.token_error(e, Grant::Other))?;
    let wait = details.expires_in().min(MAX_DEVICE_WAIT);
    let login = DeviceLogin {
        verification_uri: details.verification_uri().to_string(),
        verification_uri_complete: details
            .verification_uri_complete()
            .map(|uri| uri.secret().clone()),
        user_code: details.user_code().secret().clone(),
        expires_at: now_unix().saturating_add(wait.as_secs()),
        details,
    };
    info!(issuer = %provider.issuer, expires_in = wait.as_secs(), "device login started");
    Ok(login)
}

/// Polls until the user approves (honouring interval and slow_down), denies, or the code expires.
pub async fn device_finish(provider: &Provider, login: &DeviceLogin) -> Result<Tokens, LoginError> {
    let client = BasicClient::new(ClientId::new(provider.client_id.clone()))
        .set_token_uri(TokenUrl::from_url(provider.token_endpoint.clone()));
    let http = Http::new()?;
    let wait = Duration::from_secs(login.expires_at.saturating_sub(now_unix()));
    // The crate's loop stops at `wait` between polls; this bounds the last poll and any
    // slow_down pauses beyond it too.
    let bound = wait + HTTP_TIMEOUT + MIN_POLL_INTERVAL;
    let polled = timeout(
        bound,
        client
            .exchange_device_access_token(&login.details)
            .request_async(
                &http,
                |pause: Duration| tokio::time::sleep(pause.max(MIN_POLL_INTERVAL)),
                Some(wait),
            ),
    )
    .await;
    let response = match polled {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            return Err(match http.token_error(e, Grant::Other) {
                // The crate retries through transport failures until the code expires; the
                // failure says more than the expiry it ended in.
                LoginError::Expired => match http.last_failure() {
                    Some(failure) => LoginError::Network(failure),
                    None => LoginError::Expired,
                },
                other => other,
            });
        }
        Err(_) => return Err(LoginError::Expired),
    };
    info!(issuer = %provider.issuer, "device login approved");
    tokens(response, None)
}

/// Starts a browser login: binds the loopback listener on `127.0.0.1:0` and builds the
/// authorization URL with PKCE (S256), a fresh `state`, and the redirect URI
/// `http://127.0.0.1:PORT/callback`.
pub async fn browser_start(provider: &Provider) -> Result<BrowserLogin, LoginError> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| LoginError::Listen(e.to_string()))?;
    let port = listener
        .local_addr()
        .map_err(|e| LoginError::Listen(e.to_string()))?
        .port();
    let redirect_uri = Url::parse(&format!("http://127.0.0.1:{port}{CALLBACK_PATH}"))
        .map_err(|e| LoginError::Listen(e.to_string()))?;
    let client = BasicClient::new(ClientId::new(provider.client_id.clone()))
        .set_auth_uri(AuthUrl::from_url(provider.authorization_endpoint.clone()))
        .set_redirect_uri(RedirectUrl::from_url(redirect_uri.clone()));
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (authorize_url, state) = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(scopes(provider))
        .set_pkce_challenge(challenge)
        .url();
    info!(issuer = %provider.issuer, %redirect_uri, "browser login started");
    Ok(BrowserLogin {
        authorize_url,
        listener,
        verifier,
        state,
        redirect_uri,
    })
}

/// Waits for the redirect (at most [`BROWSER_TIMEOUT`]), checks `state` (and `iss`, when the
/// provider sends it), exchanges the code, and answers the browser with a small page saying how
/// it went.
///
/// The listener is reachable by every local process and by any page the browser loads, so a
/// redirect whose `state` is not this login's is answered with HTTP 400 and ignored: the login
/// keeps waiting for the real one until [`BROWSER_TIMEOUT`]. Only a redirect with the right
/// `state` (a secret that only the browser the login was started in has seen) ends the login,
/// whether it carries a code or the provider's error.
pub async fn browser_finish(
    provider: &Provider,
    login: BrowserLogin,
) -> Result<Tokens, LoginError> {
    let BrowserLogin {
        listener,
        verifier,
        state,
        redirect_uri,
        ..
    } = login;
    let (callbacks, mut received) = mpsc::channel::<Callback>(MAX_CALLBACK_CONNECTIONS);
    let gate = Arc::new(Gate {
        state: state.secret().clone(),
        refused: AtomicUsize::new(0),
    });
    let mut connections = CallbackConnections::default();
    let mut verifier = Some(verifier);
    let waited = timeout(BROWSER_TIMEOUT, async {
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let span = debug_span!("login_callback", %peer);
                        let requested = Arc::new(AtomicBool::new(false));
                        let serve = serve_callback_connection(
                            stream,
                            callbacks.clone(),
                            gate.clone(),
                            requested.clone(),
                        );
                        connections.admit(serve.instrument(span), requested);
                    }
                    Err(e) => {
                        // Transient (e.g. out of file descriptors): pause instead of spinning.
                        warn!(error = %e, "accepting a connection for the browser login");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.set.join_next(), if !connections.set.is_empty() => {}
                Some(callback) = received.recv() => {
                    let outcome = match verifier.take() {
                        Some(verifier) => {
                            redeem(provider, &state, &redirect_uri, verifier, &callback.params).await
                        }
                        None => Err(LoginError::StateMismatch),
                    };
                    // The browser waits for its page; a closed tab is no reason to fail.
                    let _ = callback.page.send(page(&outcome));
                    return outcome;
                }
            }
        }
    })
    .await;
    // Let the page reach the browser before the connections are dropped.
    let _ = timeout(PAGE_FLUSH_TIMEOUT, async {
        while connections.set.join_next().await.is_some() {}
    })
    .await;
    let refused = gate.refused.load(Ordering::Relaxed);
    match &waited {
        Ok(Ok(_)) => info!(issuer = %provider.issuer, refused, "browser login completed"),
        Ok(Err(e)) => info!(issuer = %provider.issuer, refused, error = %e, "browser login failed"),
        Err(_) => info!(issuer = %provider.issuer, refused, "browser login timed out"),
    }
    waited.unwrap_or(Err(LoginError::BrowserTimeout))
}

/// Refresh grant (RFC 6749 §6). A provider that does not rotate refresh tokens returns none:
/// the one passed in then stays valid and is returned again.
pub async fn refresh(
    provider_token_endpoint: &Url,
    client_id: &str,
    refresh_token: &Secret,
) -> Result<Tokens, LoginError> {
    let client = BasicClient::new(ClientId::new(client_id.to_owned()))
        .set_token_uri(TokenUrl::from_url(provider_token_endpoint.clone()));
    let http = Http::new()?;
    let token = RefreshToken::new(refresh_token.expose().to_owned());
    let response = client
        .exchange_refresh_token(&token)
        .request_async(&http)
        .await
        .map_err(|e| http.token_error(e, Grant::Refresh))?;
    debug!(endpoint = %provider_token_endpoint, "access token refreshed");
    tokens(response, Some(refresh_token))
}

/// The query parameters of the browser's redirect (RFC 6749 §4.1.2, RFC 9207).
#[derive(Debug, Default)]
struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    iss: Option<String>,
}

impl CallbackParams {
    fn parse(query: &str) -> CallbackParams {
        let mut params = CallbackParams::default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let slot = match key.as_ref() {
                "code" => &mut params.code,
                "state" => &mut params.state,
                "error" => &mut params.error,
                "error_description" => &mut params.error_description,
                "iss" => &mut params.iss,
                _ => continue,
            };
            // A repeated parameter is ambiguous; the first one counts, like most servers.
            slot.get_or_insert_with(|| value.into_owned());
        }
        params
    }
}

/// A redirect that reached the loopback listener, and where to send the page the browser shows.
struct Callback {
    params: CallbackParams,
    page: oneshot::Sender<String>,
}

/// What the loopback listener's connections check a redirect against.
struct Gate {
    /// This login's `state`.
    state: String,
    /// Redirects refused for a wrong or missing `state` (for the log).
    refused: AtomicUsize,
}

/// The loopback listener's connections: at most [`MAX_CALLBACK_CONNECTIONS`], each bounded by
/// [`CALLBACK_CONNECTION_TIMEOUT`].
#[derive(Default)]
struct CallbackConnections {
    set: JoinSet<()>,
    /// Oldest first: each connection's task, and whether it has sent its request.
    order: VecDeque<(AbortHandle, Arc<AtomicBool>)>,
}

impl CallbackConnections {
    /// Starts serving a new connection. When all slots are taken, the oldest connection still
    /// waiting for its request is closed to make room: a browser sends its request as soon as
    /// it connects, so only a connection kept idle on purpose (or a browser's unused
    /// preconnect) loses its place. With no such connection the new one is dropped.
    fn admit(
        &mut self,
        serve: impl Future<Output = ()> + Send + 'static,
        requested: Arc<AtomicBool>,
    ) {
        self.order.retain(|(task, _)| !task.is_finished());
        if self.order.len() >= MAX_CALLBACK_CONNECTIONS {
            let idle = self
                .order
                .iter()
                .position(|(_, requested)| !requested.load(Ordering::Acquire));
            match idle.and_then(|index| self.order.remove(index)) {
                Some((task, _)) => {
                    debug!("the login listener is full: closing its oldest idle connection");
                    task.abort();
                }
                None => {
                    debug!("the login listener is full: one connection dropped");
                    return;
                }
            }
        }
        let task = self.set.spawn(serve);
        self.order.push_back((task, requested));
    }
}

/// Serves one browser connection to the loopback listener: `GET /callback` with this login's
/// `state` is handed to [`browser_finish`], which answers with the final page; one with another
/// `state` gets a 400, anything else a 404. The request head is bounded in size
/// ([`MAX_CALLBACK_HEAD_BYTES`]) and time ([`CALLBACK_HEADER_TIMEOUT`]); the whole connection
/// by [`CALLBACK_CONNECTION_TIMEOUT`].
async fn serve_callback_connection(
    stream: tokio::net::TcpStream,
    callbacks: mpsc::Sender<Callback>,
    gate: Arc<Gate>,
    requested: Arc<AtomicBool>,
) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        requested.store(true, Ordering::Release);
        let callbacks = callbacks.clone();
        let gate = gate.clone();
        async move {
            Ok::<_, std::convert::Infallible>(answer_callback(request, callbacks, &gate).await)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(CALLBACK_HEADER_TIMEOUT)
        .max_header_size(MAX_CALLBACK_HEAD_BYTES)
        .max_buf_size(MAX_CALLBACK_HEAD_BYTES * 2)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    match timeout(CALLBACK_CONNECTION_TIMEOUT, connection).await {
        Ok(Ok(())) => debug!("login listener connection closed"),
        Ok(Err(e)) => debug!(error = %e, "login listener connection failed"),
        Err(_) => debug!("login listener connection timed out"),
    }
}

async fn answer_callback(
    request: Request<Incoming>,
    callbacks: mpsc::Sender<Callback>,
    gate: &Gate,
) -> Response<Full<Bytes>> {
    if request.method() != hyper::Method::GET || request.uri().path() != CALLBACK_PATH {
        return html(StatusCode::NOT_FOUND, "Not found".to_owned());
    }
    let params = CallbackParams::parse(request.uri().query().unwrap_or(""));
    if !params
        .state
        .as_deref()
        .is_some_and(|state| same_secret(state, &gate.state))
    {
        // Anyone on this machine can reach the listener: a wrong state is someone else's
        // request, not the login's end. Logged once per login, so a flood does not fill the log.
        if gate.refused.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!(
                "the browser login's listener got a redirect that belongs to no login (state mismatch): answered 400 and still waiting for the real one"
            );
        }
        return html(
            StatusCode::BAD_REQUEST,
            page_html(
                "This answer does not belong to the cloudllm login in progress (state mismatch), \
                 so it was ignored. If you are logging in, finish in the page that \
                 <code>cloudllm login</code> opened.",
            ),
        );
    }
    let (page, ready) = oneshot::channel();
    if callbacks.send(Callback { params, page }).await.is_err() {
        return html(
            StatusCode::GONE,
            page_html("This login is over. Run <code>cloudllm login</code> again if you need to."),
        );
    }
    match ready.await {
        Ok(body) => html(StatusCode::OK, body),
        Err(_) => html(
            StatusCode::GONE,
            page_html("This login is over. Run <code>cloudllm login</code> again if you need to."),
        ),
    }
}

/// Compares a received `state` with the login's in time that depends only on their lengths,
/// so a local process timing the listener's answers learns nothing about the secret.
fn same_secret(received: &str, expected: &str) -> bool {
    let (a, b) = (received.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Checks the redirect against this login and exchanges its code.
async fn redeem(
    provider: &Provider,
    state: &CsrfToken,
    redirect_uri: &Url,
    verifier: PkceCodeVerifier,
    params: &CallbackParams,
) -> Result<Tokens, LoginError> {
    // The state comes first: an error or an issuer from a forged redirect is not worth reading.
    if params.state.as_deref() != Some(state.secret().as_str()) {
        return Err(LoginError::StateMismatch);
    }
    if let Some(iss) = &params.iss
        && !same_issuer(iss, provider.issuer.as_str())
    {
        return Err(LoginError::WrongIssuer(clean(iss)));
    }
    if let Some(error) = &params.error {
        return Err(match error.as_str() {
            "access_denied" => LoginError::Denied,
            _ => LoginError::Provider(describe(error, params.error_description.as_deref())),
        });
    }
    let code = params.code.as_ref().ok_or_else(|| {
        LoginError::InvalidResponse("the browser came back without an authorization code".into())
    })?;
    let client = BasicClient::new(ClientId::new(provider.client_id.clone()))
        .set_token_uri(TokenUrl::from_url(provider.token_endpoint.clone()))
        .set_redirect_uri(RedirectUrl::from_url(redirect_uri.clone()));
    let http = Http::new()?;
    let response = client
        .exchange_code(AuthorizationCode::new(code.clone()))
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .map_err(|e| http.token_error(e, Grant::Other))?;
    tokens(response, None)
}

/// The page the browser shows at the end of the login.
fn page(outcome: &Result<Tokens, LoginError>) -> String {
    match outcome {
        Ok(_) => page_html("You are logged in to cloudllm. You can close this tab."),
        Err(e) => page_html(&format!(
            "The cloudllm login failed: {}. You can close this tab.",
            escape_html(&e.to_string())
        )),
    }
}

fn page_html(message: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>cloudllm login</title></head>\
         <body style=\"font-family:sans-serif;margin:4em auto;max-width:32em\"><p>{message}</p></body></html>\n"
    )
}

fn html(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Which grant an error came from: an `invalid_grant` means "log in again" only for a refresh.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Grant {
    Refresh,
    Other,
}

/// Turns a token endpoint answer into [`Tokens`].
fn tokens(response: BasicTokenResponse, previous: Option<&Secret>) -> Result<Tokens, LoginError> {
    if *response.token_type() != BasicTokenType::Bearer {
        return Err(LoginError::InvalidResponse(format!(
            "token type `{}` is not supported (only Bearer)",
            clean(response.token_type().as_ref())
        )));
    }
    if response.access_token().secret().is_empty() {
        return Err(LoginError::InvalidResponse(
            "the access token is empty".into(),
        ));
    }
    Ok(Tokens {
        access_token: Secret::new(response.access_token().secret().clone()),
        refresh_token: response
            .refresh_token()
            .map(|token| Secret::new(token.secret().clone()))
            .or_else(|| previous.cloned()),
        expires_at: response
            .expires_in()
            .map(|lifetime| now_unix().saturating_add(lifetime.as_secs())),
    })
}

fn scopes(provider: &Provider) -> impl Iterator<Item = Scope> + '_ {
    provider.scopes.iter().cloned().map(Scope::new)
}

/// Issuers compare as strings (OpenID Connect Discovery §4.3), but `Url` adds a `/` to a bare
/// origin and some providers publish one: a trailing `/` is not a difference.
fn same_issuer(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Tokens travel to and from these URLs: `https://` only, except on this machine.
fn require_secure(url: &Url, what: &str) -> Result<(), LoginError> {
    let loopback = match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        Some(Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    match url.scheme() {
        "https" if url.host().is_some() => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(LoginError::Discovery(format!(
            "{what} {url} is not an https:// URL (plain http:// is allowed only on a loopback address)"
        ))),
    }
}

/// An OAuth error as users see it: the code and the provider's description.
fn describe(error: &str, description: Option<&str>) -> String {
    match description {
        Some(description) => format!("{}: {}", clean(error), clean(description)),
        None => clean(error),
    }
}

/// Provider-supplied text made fit for a terminal and a log line: no control characters, short.
fn clean(text: &str) -> String {
    let mut out: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_PROVIDER_TEXT)
        .collect();
    if text.chars().count() > MAX_PROVIDER_TEXT {
        out.push('…');
    }
    out
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A transport failure talking to the provider.
#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("no answer within {} s", HTTP_TIMEOUT.as_secs())]
    Timeout,
    #[error("{0}")]
    Network(String),
    #[error("HTTP {0}")]
    Status(u16),
    #[error("the answer is larger than {} KiB", MAX_RESPONSE_BYTES / 1024)]
    TooLarge,
}

/// The HTTP client the `oauth2` crate talks through: bounded in time and size, following no
/// redirects (the crate's advice: a redirect could send a code to another host), and
/// remembering whether the latest attempt failed, since the device grant's polling retries
/// through failures.
struct Http {
    client: reqwest::Client,
    last_failure: Mutex<Option<String>>,
    last_status: AtomicU16,
}

impl Http {
    fn new() -> Result<Http, LoginError> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(HTTP_TIMEOUT)
            .tcp_nodelay(true)
            .user_agent(concat!("cloudllmd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| LoginError::Network(format!("setting up HTTPS: {}", chain(&e))))?;
        Ok(Http {
            client,
            last_failure: Mutex::new(None),
            last_status: AtomicU16::new(0),
        })
    }

    /// One request, bounded by [`HTTP_TIMEOUT`] and [`MAX_RESPONSE_BYTES`]. Server errors and
    /// redirects come back as [`HttpError::Status`], so the device grant's polling retries them.
    async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let request = reqwest::Request::try_from(request.map(reqwest::Body::from))
            .map_err(|e| HttpError::Network(chain(&e)))?;
        let exchange = async {
            let mut response =
                self.client
                    .execute(request)
                    .await
                    .map_err(|e| match e.is_timeout() {
                        true => HttpError::Timeout,
                        false => HttpError::Network(chain(&e)),
                    })?;
            let status = response.status();
            self.last_status.store(status.as_u16(), Ordering::Relaxed);
            if status.is_server_error() || status.is_redirection() {
                return Err(HttpError::Status(status.as_u16()));
            }
            if response
                .content_length()
                .is_some_and(|length| length > MAX_RESPONSE_BYTES as u64)
            {
                return Err(HttpError::TooLarge);
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| match e.is_timeout() {
                true => HttpError::Timeout,
                false => HttpError::Network(chain(&e)),
            })? {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(HttpError::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            let mut out = http::Response::new(body);
            *out.status_mut() = status;
            *out.headers_mut() = response.headers().clone();
            Ok(out)
        };
        let result = timeout(HTTP_TIMEOUT, exchange)
            .await
            .unwrap_or(Err(HttpError::Timeout));
        // Only the latest attempt counts: a failure followed by an answer is forgotten.
        if let Ok(mut last) = self.last_failure.lock() {
            *last = result.as_ref().err().map(|e| e.to_string());
        }
        result
    }

    fn last_failure(&self) -> Option<String> {
        self.last_failure.lock().ok().and_then(|last| last.clone())
    }

    /// Maps the `oauth2` crate's error to what the user is told. Never includes a response
    /// body: it may hold tokens.
    fn token_error<T>(
        &self,
        error: RequestTokenError<HttpError, StandardErrorResponse<T>>,
        grant: Grant,
    ) -> LoginError
    where
        T: ErrorResponseType + AsRef<str> + fmt::Display,
    {
        match error {
            RequestTokenError::ServerResponse(response) => {
                match (response.error().as_ref(), grant) {
                    ("access_denied", _) => LoginError::Denied,
                    ("expired_token", _) => LoginError::Expired,
                    ("invalid_grant", Grant::Refresh) => LoginError::Revoked,
                    (code, _) => LoginError::Provider(describe(
                        code,
                        response.error_description().map(String::as_str),
                    )),
                }
            }
            RequestTokenError::Request(HttpError::Timeout) => LoginError::Timeout,
            RequestTokenError::Request(HttpError::TooLarge) => {
                LoginError::InvalidResponse(HttpError::TooLarge.to_string())
            }
            RequestTokenError::Request(e) => LoginError::Network(e.to_string()),
            // Only the JSON path of the problem: serde's message may quote a value.
            RequestTokenError::Parse(e, _body) => LoginError::InvalidResponse(format!(
                "HTTP {} with a malformed or missing `{}`",
                self.last_status.load(Ordering::Relaxed),
                e.path()
            )),
            RequestTokenError::Other(message) => LoginError::InvalidResponse(clean(&message)),
        }
    }
}

impl<'c> AsyncHttpClient<'c> for Http {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

/// An error and its causes on one line (reqwest's own message hides the cause).
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_params_are_parsed_and_first_wins() {
        let p = CallbackParams::parse("code=a%2Bb&state=s&state=t&iss=http%3A%2F%2Fx&other=1");
        assert_eq!(p.code.as_deref(), Some("a+b"));
        assert_eq!(p.state.as_deref(), Some("s"));
        assert_eq!(p.iss.as_deref(), Some("http://x"));
        assert!(p.error.is_none());
    }

    #[test]
    fn only_https_or_loopback_http_is_accepted() {
        let ok = |s: &str| require_secure(&Url::parse(s).unwrap(), "x").is_ok();
        assert!(ok("https://id.example/realms/a"));
        assert!(ok("http://127.0.0.1:8080"));
        assert!(ok("http://127.1.2.3"));
        assert!(ok("http://[::1]:9"));
        assert!(ok("http://localhost:3000"));
        assert!(!ok("http://id.example"));
        assert!(!ok("http://10.0.0.1"));
        assert!(!ok("ftp://127.0.0.1"));
    }

    #[test]
    fn issuers_differ_only_beyond_a_trailing_slash() {
        assert!(same_issuer("https://a.example/", "https://a.example"));
        assert!(same_issuer("https://a.example/r", "https://a.example/r/"));
        assert!(!same_issuer("https://a.example/r", "https://a.example/s"));
        assert!(!same_issuer("https://a.example", "https://b.example"));
    }

    #[test]
    fn provider_text_loses_control_characters_and_length() {
        assert_eq!(clean("bad\x1b[31m\nthing"), "bad[31mthing");
        let long = "x".repeat(1000);
        assert_eq!(clean(&long).chars().count(), MAX_PROVIDER_TEXT + 1);
        assert_eq!(describe("invalid_scope", Some("no")), "invalid_scope: no");
    }

    #[test]
    fn pages_escape_messages() {
        let page = page(&Err(LoginError::Provider("<script>".into())));
        assert!(page.contains("&lt;script&gt;"));
        assert!(!page.contains("<script>"));
    }

    #[test]
    fn tokens_do_not_show_in_debug() {
        let tokens = Tokens {
            access_token: Secret::new("at-secret"),
            refresh_token: Some(Secret::new("rt-secret")),
            expires_at: Some(1),
        };
        let shown = format!("{tokens:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[tokio::test]
    async fn the_wrong_state_is_refused_before_anything_else() {
        let provider = Provider {
            issuer: Url::parse("http://127.0.0.1:1").unwrap(),
            authorization_endpoint: Url::parse("http://127.0.0.1:1/auth").unwrap(),
            token_endpoint: Url::parse("http://127.0.0.1:1/token").unwrap(),
            device_authorization_endpoint: None,
            client_id: "c".into(),
            scopes: vec![],
        };
        let (_, verifier) = PkceCodeChallenge::new_random_sha256();
        let params = CallbackParams::parse("code=c&state=forged&error=access_denied");
        let state = CsrfToken::new("real".into());
        let redirect = Url::parse("http://127.0.0.1:2/callback").unwrap();
        let result = redeem(&provider, &state, &redirect, verifier, &params).await;
        assert!(
            matches!(result, Err(LoginError::StateMismatch)),
            "{result:?}"
        );
    }

    #[test]
    fn states_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("", "abc"));
    }

    #[tokio::test]
    async fn device_start_needs_a_device_endpoint() {
        let provider = Provider {
            issuer: Url::parse("http://127.0.0.1:1").unwrap(),
            authorization_endpoint: Url::parse("http://127.0.0.1:1/auth").unwrap(),
            token_endpoint: Url::parse("http://127.0.0.1:1/token").unwrap(),
            device_authorization_endpoint: None,
            client_id: "c".into(),
            scopes: vec![],
        };
        let result = device_start(&provider).await;
        assert!(
            matches!(result, Err(LoginError::NoDeviceFlow)),
            "{result:?}"
        );
    }
}
