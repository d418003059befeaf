//! The API's way in: `/api/…` and `/v1/…` requests go from the connection straight to
//! [`forward`](super::forward), through the request-id and CORS steps every response needs,
//! without axum's router.
//!
//! Why: each API request is the same two steps and one handler, and the router's part in it
//! (matching, its boxed route, the handler's extractor plumbing) was ≈ 1.5 % of the relay's
//! CPU per request (issue 19). Every other path (the web app, health, the tunnel upgrade, the
//! 404 fallback) still goes through the router (`router` in `lib.rs`), which no longer holds
//! the API routes.

use std::ops::ControlFlow;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;

use crate::AppState;
use crate::around::Around;
use crate::cors::Cors;
use crate::request_id;

/// Whether `path` is the API's: a path under `/api/` or `/v1/`.
pub(crate) fn is_api_path(path: &str) -> bool {
    ["/api/", "/v1/"]
        .iter()
        .any(|prefix| path.len() > prefix.len() && path.starts_with(prefix))
}

/// Serves API requests (see the module docs).
#[derive(Clone)]
pub(crate) struct ApiEntry {
    state: Arc<AppState>,
    cors: Arc<Cors>,
}

impl ApiEntry {
    pub(crate) fn new(state: Arc<AppState>, cors: Arc<Cors>) -> ApiEntry {
        ApiEntry { state, cors }
    }

    /// Answers `req`, whose path [`is_api_path`].
    pub(crate) async fn serve(self, mut req: Request) -> Response {
        let id = match request_id::Tag.request(&mut req) {
            ControlFlow::Continue(id) => id,
            ControlFlow::Break(response) => return response,
        };
        let mut response = match self.cors.request(&mut req) {
            // A CORS preflight, answered here.
            ControlFlow::Break(response) => response,
            ControlFlow::Continue(note) => {
                let mut response = super::forward(State(self.state), req).await;
                <Arc<Cors> as Around>::response(note, &mut response);
                response
            }
        };
        request_id::Tag::response(id, &mut response);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_is_what_lies_under_api_and_v1() {
        for path in [
            "/api/chat",
            "/api/tags",
            "/v1/models",
            "/v1/chat/completions",
        ] {
            assert!(is_api_path(path), "{path}");
        }
        for path in [
            "/",
            "/api",
            "/api/",
            "/v1",
            "/v1/",
            "/apix/chat",
            "/tunnel",
            "/assets/api/x",
        ] {
            assert!(!is_api_path(path), "{path}");
        }
    }
}
