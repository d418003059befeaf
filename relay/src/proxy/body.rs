//! A caller's request body on its way to the device: bounded in size (the tier's
//! `max_body_bytes`) and in time (`client_read_timeout` between pieces), and read for the
//! model it names.
//!
//! The body streams; nothing is buffered but what routing by model needs (a small JSON
//! document, read whole by [`crate::proxy::route`]). When the caller sends too much or stops
//! sending, the request fails with 413 or 408 rather than a generic tunnel error, and the rest
//! of an oversized upload is read and thrown away so the caller can read the answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tracing::debug;

use super::Api;

/// Most of an oversized upload the relay reads and discards so the caller gets its 413.
const DRAIN_BYTES: u64 = 64 * 1024 * 1024;
/// Longest the relay spends discarding an oversized upload.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// The `model` of a JSON request body, if it is one.
pub(super) fn model_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<String>,
    }
    serde_json::from_slice::<Named>(body).ok()?.model
}

/// The length a request declares in `Content-Length`, if it declares one.
pub(super) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The answer to a caller whose request body is over the tier's `limit`.
pub(super) fn too_large(api: Api<'_>, limit: u64) -> Response {
    api.error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body is larger than this relay's limit of {limit} bytes"),
    )
}

/// The answer to a caller whose request body stopped arriving for `read_timeout`.
pub(super) fn stalled(api: Api<'_>, read_timeout: Duration) -> Response {
    debug!(?read_timeout, "request body stalled: giving up on it");
    api.error(
        StatusCode::REQUEST_TIMEOUT,
        &format!("the request body stopped arriving for {read_timeout:?}"),
    )
}

/// What a [`CappedBody`] tells the relay once the request has been sent or has failed.
#[derive(Default)]
pub(super) struct Watch {
    /// More than the limit arrived: answer 413.
    over_limit: Arc<AtomicBool>,
    /// The caller stopped sending for `read_timeout`: answer 408.
    stalled: Arc<AtomicBool>,
    /// The model named by the body's first chunk, when asked to look.
    model: Arc<OnceLock<String>>,
}

impl Watch {
    /// Whether the body failed for being over its limit.
    pub(super) fn over_limit(&self) -> bool {
        self.over_limit.load(Ordering::Relaxed)
    }

    /// Whether the body failed because the caller stopped sending it.
    pub(super) fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// The model the body's first chunk named, if it was looked for and found.
    pub(super) fn model(&self) -> Option<&String> {
        self.model.get()
    }
}

/// What a [`Metered`] body does besides passing its frames on: the bookkeeping of a request
/// body ([`Capped`]) or of a response body ([`Tracked`](super::accounting::Tracked)). Any error
/// it returns ends the body: the caller or the device sees that error, and the rest of the
/// inner body is dropped unless the meter took it.
pub(super) trait Meter: Send + Unpin + 'static {
    /// Before each look at the body.
    fn check(&mut self, _cx: &mut Context<'_>) -> Result<(), axum::Error> {
        Ok(())
    }

    /// The body had nothing ready; the waker is set on it.
    fn waiting(&mut self, _cx: &mut Context<'_>) -> Result<(), axum::Error> {
        Ok(())
    }

    /// A data frame is about to pass; `rest` is the body it came from.
    fn passing(&mut self, data: &Bytes, rest: &mut Option<Body>) -> Result<(), axum::Error>;
}

/// A body with a [`Meter`] on its frames.
pub(super) struct Metered<M> {
    inner: Option<Body>,
    meter: M,
}

impl<M: Meter> Metered<M> {
    /// `inner` with `meter` on it.
    pub(super) fn metering(inner: Body, meter: M) -> Self {
        Metered {
            inner: Some(inner),
            meter,
        }
    }

    /// Ends the body with `err`, dropping what is left of the inner one.
    fn fail(&mut self, err: axum::Error) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.inner = None;
        Poll::Ready(Some(Err(err)))
    }
}

impl<M: Meter> HttpBody for Metered<M> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Err(err) = this.meter.check(cx) {
            return this.fail(err);
        }
        let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) else {
            return match this.meter.waiting(cx) {
                Ok(()) => Poll::Pending,
                Err(err) => this.fail(err),
            };
        };
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref))
            && let Some(data) = data
            && let Err(err) = this.meter.passing(data, &mut this.inner)
        {
            return this.fail(err);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(HttpBody::size_hint)
            .unwrap_or_default()
    }
}

/// A request body capped at the tier's limit and `read_timeout` between pieces.
pub(super) type CappedBody = Metered<Capped>;

/// The meter of a request body: it fails once more than `remaining` bytes have passed, and
/// says so in `tripped` so the relay can answer 413 rather than a generic tunnel error. It
/// also fails when the caller sends nothing for `read_timeout` (a slow-body attack, or a
/// client that died mid-upload), and says so in `stalled` for a 408.
///
/// When it trips, the rest of the caller's upload is read and thrown away in the background
/// (bounded by [`DRAIN_BYTES`] and [`DRAIN_TIME`]): closing a socket with unread data makes the
/// kernel send a reset, and the caller would see "connection reset" instead of the 413.
pub(super) struct Capped {
    remaining: u64,
    tripped: Arc<AtomicBool>,
    /// Fires when the caller has sent nothing for `read_timeout` while the body was wanted;
    /// armed at the first wait, so time queued behind the tunnel's flow control never counts.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    read_timeout: Duration,
    stalled: Arc<AtomicBool>,
    /// Bytes passed so far, for the audit log.
    received: Arc<AtomicU64>,
    /// Where to note the model named by the first chunk, when it is a whole JSON document.
    sniff: Option<Arc<OnceLock<String>>>,
}

impl Metered<Capped> {
    /// `body` capped at `limit` bytes and `read_timeout` between pieces, counting the bytes
    /// passed into `received`; with `sniff`, the model its first chunk names is noted. The
    /// [`Watch`] says afterwards what happened.
    pub(super) fn new(
        body: Body,
        (limit, read_timeout): (u64, Duration),
        received: &Arc<AtomicU64>,
        sniff: bool,
    ) -> (CappedBody, Watch) {
        let watch = Watch::default();
        let meter = Capped {
            remaining: limit,
            tripped: watch.over_limit.clone(),
            idle: None,
            read_timeout,
            stalled: watch.stalled.clone(),
            received: received.clone(),
            sniff: sniff.then(|| watch.model.clone()),
        };
        (Metered::metering(body, meter), watch)
    }
}

impl Meter for Capped {
    fn waiting(&mut self, cx: &mut Context<'_>) -> Result<(), axum::Error> {
        let read_timeout = self.read_timeout;
        let idle = self
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(read_timeout)));
        if idle.as_mut().poll(cx).is_ready() {
            self.stalled.store(true, Ordering::Relaxed);
            return Err(axum::Error::new("request body stalled"));
        }
        Ok(())
    }

    fn passing(&mut self, data: &Bytes, rest: &mut Option<Body>) -> Result<(), axum::Error> {
        self.idle = None;
        let len = data.len() as u64;
        if len > self.remaining {
            self.tripped.store(true, Ordering::Relaxed);
            if let Some(rest) = rest.take() {
                tokio::spawn(discard(rest));
            }
            return Err(axum::Error::new("request body over the limit"));
        }
        self.remaining -= len;
        self.received.fetch_add(len, Ordering::Relaxed);
        if let Some(sniff) = self.sniff.take()
            && let Some(model) = model_of(data)
        {
            let _ = sniff.set(model);
        }
        Ok(())
    }
}

/// Reads and drops the rest of an oversized upload, within bounds.
pub(super) async fn discard(body: Body) {
    use http_body_util::BodyExt;
    let mut body = http_body_util::Limited::new(body, DRAIN_BYTES as usize);
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}
