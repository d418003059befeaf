//! The `x-request-id` of every request and response: the caller's own if it is a sane token,
//! else a fresh UUID. Set in the router's outermost layer, so responses the relay makes itself
//! (401, 429, 404, the tunnel's refusals) carry one too, and the proxy passes the same id to
//! the device, its logs and the audit log.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::Request;
use axum::response::Response;
use cloudllm_proto as proto;
use http::{HeaderMap, HeaderValue};

/// Longest caller-chosen id kept; a longer one is replaced (it ends up in logs).
const MAX_ID_BYTES: usize = 128;

/// The layer that gives every request an id (the caller's, or a new one) and puts it on the
/// response. A plain tower layer rather than `axum::middleware::from_fn`, which boxes two
/// futures and a service per request: this one wraps the inner future in place.
#[derive(Clone, Copy, Default)]
pub struct Tag;

impl<S> tower_layer::Layer<S> for Tag {
    type Service = Tagged<S>;

    fn layer(&self, inner: S) -> Tagged<S> {
        Tagged { inner }
    }
}

/// A service behind [`Tag`].
#[derive(Clone)]
pub struct Tagged<S> {
    inner: S,
}

impl<S> tower_service::Service<Request> for Tagged<S>
where
    S: tower_service::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = TaggedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let id = request_id(req.headers());
        req.headers_mut()
            .insert(proto::HEADER_REQUEST_ID, id.clone());
        TaggedFuture {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of a [`Tagged`] service, with the request's id put on it.
    pub struct TaggedFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, E> Future for TaggedFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            response.headers_mut().insert(proto::HEADER_REQUEST_ID, id);
        }
        Poll::Ready(Ok(response))
    }
}

/// The caller's `x-request-id` if it is a sane token, else a fresh UUID.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(proto::HEADER_REQUEST_ID)
        .filter(|v| {
            let bytes = v.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= MAX_ID_BYTES
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                .unwrap_or(HeaderValue::from_static("unknown"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_caller_id_is_kept_and_anything_else_replaced() {
        let with = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(proto::HEADER_REQUEST_ID, HeaderValue::from_str(v).unwrap());
            request_id(&headers)
        };
        assert_eq!(with("trace-42:a.b_c"), "trace-42:a.b_c");
        for bad in ["", "has space", "quote\"", &"x".repeat(MAX_ID_BYTES + 1)] {
            let id = with(bad);
            assert_ne!(id, bad);
            assert!(
                uuid::Uuid::parse_str(id.to_str().unwrap()).is_ok(),
                "{id:?}"
            );
        }
        assert!(uuid::Uuid::parse_str(request_id(&HeaderMap::new()).to_str().unwrap()).is_ok());
    }
}
