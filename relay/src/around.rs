//! [`AroundLayer`]: a tower layer that does something to each request before the inner service
//! and to its response after, in place.
//!
//! `axum::middleware::from_fn` boxes two futures and a service per request; on the relay's
//! request path that was measurable (issue 19). A layer built on [`Around`] wraps the inner
//! future without boxing, and can answer a request itself (a CORS preflight) without calling
//! the inner service at all. The request id ([`crate::request_id`]) and CORS ([`crate::cors`])
//! are its two uses.

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::Request;
use axum::response::Response;

/// What a layer does around the inner service.
pub trait Around: Clone {
    /// What the request leaves for its response.
    type Note;

    /// Before the inner service: go on with a note for the response, or stop at the layer's
    /// own answer (the inner service is then not called).
    fn request(&self, req: &mut Request) -> ControlFlow<Response, Self::Note>;

    /// After: the inner service's response, completed as `note` says.
    fn response(note: Self::Note, response: &mut Response);
}

/// The layer of an [`Around`].
#[derive(Clone)]
pub struct AroundLayer<A>(pub A);

impl<A: Around, S> tower_layer::Layer<S> for AroundLayer<A> {
    type Service = AroundService<A, S>;

    fn layer(&self, inner: S) -> AroundService<A, S> {
        AroundService {
            around: self.0.clone(),
            inner,
        }
    }
}

/// A service behind an [`AroundLayer`].
#[derive(Clone)]
pub struct AroundService<A, S> {
    around: A,
    inner: S,
}

impl<A, S> tower_service::Service<Request> for AroundService<A, S>
where
    A: Around,
    S: tower_service::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = AroundFuture<A, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        match self.around.request(&mut req) {
            ControlFlow::Continue(note) => AroundFuture::Inner {
                inner: self.inner.call(req),
                note: Some(note),
            },
            ControlFlow::Break(response) => AroundFuture::Answered {
                response: Some(response),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of an [`AroundService`].
    #[project = AroundFutureProjection]
    pub enum AroundFuture<A: Around, F> {
        /// The inner service's answer, to be completed with `note`.
        Inner {
            #[pin]
            inner: F,
            note: Option<A::Note>,
        },
        /// The layer's own answer.
        Answered { response: Option<Response> },
    }
}

impl<A, F, E> Future for AroundFuture<A, F>
where
    A: Around,
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AroundFutureProjection::Inner { inner, note } => {
                let mut response = ready!(inner.poll(cx))?;
                if let Some(note) = note.take() {
                    A::response(note, &mut response);
                }
                Poll::Ready(Ok(response))
            }
            // Polled once, at once: the answer is there.
            AroundFutureProjection::Answered { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Pending,
            },
        }
    }
}
