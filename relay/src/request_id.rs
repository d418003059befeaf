//! The `x-request-id` of every request and response: the caller's own if it is a sane token,
//! else a fresh UUID. Set in the router's outermost layer, so responses the relay makes itself
//! (401, 429, 404, the tunnel's refusals) carry one too, and the proxy passes the same id to
//! the device, its logs and the audit log.

use std::ops::ControlFlow;

use axum::extract::Request;
use axum::response::Response;
use cloudllm_proto as proto;
use http::{HeaderMap, HeaderValue};

use crate::around::Around;

/// Longest caller-chosen id kept; a longer one is replaced (it ends up in logs).
const MAX_ID_BYTES: usize = 128;

/// What gives every request an id (the caller's, or a new one) and puts it on the response,
/// as an in-place layer: `AroundLayer(Tag)`.
#[derive(Clone, Copy, Default)]
pub struct Tag;

impl Around for Tag {
    type Note = HeaderValue;

    fn request(&self, req: &mut Request) -> ControlFlow<Response, HeaderValue> {
        let id = request_id(req.headers());
        req.headers_mut()
            .insert(proto::HEADER_REQUEST_ID, id.clone());
        ControlFlow::Continue(id)
    }

    fn response(id: HeaderValue, response: &mut Response) {
        response.headers_mut().insert(proto::HEADER_REQUEST_ID, id);
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
            // Encoded on the stack: no formatting machinery on every request (issue 19).
            let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
            HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("unknown"))
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
