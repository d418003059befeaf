//! The Ollama endpoints cloudllm carries, in one table that both ends read.
//!
//! The daemon's allowlist forwards only what is listed here, with the methods listed, and only
//! management endpoints when their owner allows it; the relay's router reads which endpoints
//! name a model in their JSON body (it may pick the device that has the model) and which list
//! a device's models (it may merge every device's list). One table keeps the two from drifting:
//! an endpoint added for forwarding is known to routing at once, and the other way round.
//!
//! Plain data and a lookup, no I/O. The checks of a path parameter (a model name, a blob
//! digest) belong to the daemon, which forwards it; the table only says which kind it is.

/// Who may reach an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Inference and listing: open to every client of the device's owner.
    Inference,
    /// Model management: open only where the device's owner sets `allow_model_management`.
    Management,
}

/// What an endpoint's last path segment carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// Nothing: the path is matched exactly.
    None,
    /// A model name (`/v1/models/{name}`).
    ModelName,
    /// A blob digest, `sha256:` and 64 hex digits (`/api/blobs/{digest}`).
    BlobDigest,
}

/// How the relay picks among a user's devices for a request to an endpoint (a device named by
/// the `x-cloudllm-device` header comes first whatever the endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// The least busy device.
    AnyDevice,
    /// The request body is a JSON object whose `"model"` names a model: a device that has it,
    /// least busy first.
    ByModel,
    /// The answer lists the device's models: a `GET` gets every device's list, merged.
    ModelList,
}

/// One Ollama endpoint cloudllm carries.
#[derive(Debug)]
pub struct Endpoint {
    /// The path; with a parameter, the prefix before it (ending in `/`).
    pub path: &'static str,
    /// The methods Ollama serves it with, as `Allow` lists them.
    pub methods: &'static [&'static str],
    /// Who may reach it.
    pub class: Class,
    /// What follows `path`, if anything.
    pub param: Param,
    /// How the relay routes it.
    pub routing: Routing,
}

impl Endpoint {
    /// Whether Ollama serves this endpoint with `method` (exact, upper case).
    pub fn takes(&self, method: &str) -> bool {
        self.methods.contains(&method)
    }
}

const fn endpoint(
    path: &'static str,
    methods: &'static [&'static str],
    class: Class,
    routing: Routing,
) -> Endpoint {
    Endpoint {
        path,
        methods,
        class,
        param: Param::None,
        routing,
    }
}

const POST: &[&str] = &["POST"];
const GET: &[&str] = &["GET"];
/// Ollama's router serves `/api/tags` and `/api/version` to HEAD as well (a liveness check).
const GET_HEAD: &[&str] = &["GET", "HEAD"];

use Class::{Inference, Management};
use Routing::{AnyDevice, ByModel, ModelList};

/// An endpoint that runs a model: a POST, routed to a device that has the model it names.
const fn model_call(path: &'static str) -> Endpoint {
    endpoint(path, POST, Inference, ByModel)
}

/// An endpoint that changes the models on a device (`allow_model_management`): any device.
const fn management(path: &'static str, methods: &'static [&'static str]) -> Endpoint {
    endpoint(path, methods, Management, AnyDevice)
}

/// Every endpoint cloudllm carries, with the methods of Ollama's own router (0.5.x).
pub const ENDPOINTS: &[Endpoint] = &[
    model_call("/api/chat"),
    model_call("/api/generate"),
    model_call("/api/embed"),
    model_call("/api/embeddings"),
    model_call("/api/show"),
    model_call("/v1/chat/completions"),
    model_call("/v1/completions"),
    model_call("/v1/embeddings"),
    endpoint("/api/tags", GET_HEAD, Inference, ModelList),
    endpoint("/v1/models", GET, Inference, ModelList),
    endpoint("/api/ps", GET, Inference, AnyDevice),
    endpoint("/api/version", GET_HEAD, Inference, AnyDevice),
    Endpoint {
        path: "/v1/models/",
        methods: GET,
        class: Inference,
        param: Param::ModelName,
        routing: AnyDevice,
    },
    management("/api/pull", POST),
    management("/api/push", POST),
    management("/api/create", POST),
    management("/api/copy", POST),
    management("/api/delete", &["DELETE"]),
    Endpoint {
        path: "/api/blobs/",
        methods: &["HEAD", "POST"],
        class: Management,
        param: Param::BlobDigest,
        routing: AnyDevice,
    },
];

/// The endpoint `path` (without the query) names, and its raw parameter (empty without one).
pub fn find(path: &str) -> Option<(&'static Endpoint, &str)> {
    ENDPOINTS.iter().find_map(|endpoint| match endpoint.param {
        Param::None => (path == endpoint.path).then_some((endpoint, "")),
        Param::ModelName | Param::BlobDigest => path
            .strip_prefix(endpoint.path)
            .filter(|rest| !rest.is_empty())
            .map(|rest| (endpoint, rest)),
    })
}

/// How the relay routes `method` on `path`: the endpoint's [`Routing`] when it is one with that
/// method, else [`Routing::AnyDevice`] (the daemon refuses it anyway).
pub fn routing(method: &str, path: &str) -> Routing {
    match find(path) {
        Some((endpoint, _)) if endpoint.takes(method) => endpoint.routing,
        _ => Routing::AnyDevice,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_requests_that_route_by_model_are_the_inference_posts_the_readme_lists() {
        let by_model: Vec<&str> = ENDPOINTS
            .iter()
            .filter(|e| e.routing == Routing::ByModel)
            .map(|e| e.path)
            .collect();
        assert_eq!(
            by_model,
            [
                "/api/chat",
                "/api/generate",
                "/api/embed",
                "/api/embeddings",
                "/api/show",
                "/v1/chat/completions",
                "/v1/completions",
                "/v1/embeddings",
            ]
        );
        for path in by_model {
            assert_eq!(routing("POST", path), Routing::ByModel, "{path}");
            assert_eq!(routing("GET", path), Routing::AnyDevice, "{path}");
            assert_eq!(find(path).map(|(e, _)| e.class), Some(Class::Inference));
        }
        for path in ["/api/tags", "/v1/models"] {
            assert_eq!(routing("GET", path), Routing::ModelList, "{path}");
        }
        for (method, path) in [
            ("POST", "/api/chat/"),
            ("POST", "/API/CHAT"),
            ("POST", "/api/pull"),
            ("GET", "/v1/models/smollm2:135m"),
            ("POST", "/v1/models"),
        ] {
            assert_eq!(routing(method, path), Routing::AnyDevice, "{method} {path}");
        }
    }

    #[test]
    fn a_parameter_follows_its_prefix_and_is_never_empty() {
        let (endpoint, param) = find("/v1/models/a/b:c").unwrap();
        assert_eq!((endpoint.param, param), (Param::ModelName, "a/b:c"));
        let (endpoint, param) = find("/api/blobs/sha256:00").unwrap();
        assert_eq!((endpoint.param, param), (Param::BlobDigest, "sha256:00"));
        assert!(find("/v1/models/").is_none());
        assert!(find("/api/blobs/").is_none());
        assert!(find("/api/").is_none());
        assert!(find("/v1/models").is_some_and(|(e, p)| e.param == Param::None && p.is_empty()));
    }
}
