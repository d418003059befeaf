//! Which Ollama endpoints remote callers may reach.
//!
//! By default only inference and listing pass. Model management would let anyone with a client
//! token fill the owner's disk or delete their models, so it is refused unless the owner sets
//! `allow_model_management = true`. Anything not named here is refused too: a new Ollama
//! endpoint is not exposed until it has been looked at.

/// Inference and listing endpoints, open by default.
const INFERENCE: &[&str] = &[
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/tags",
    "/api/show",
    "/api/ps",
    "/api/version",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
];

/// Model management endpoints, open only with `allow_model_management`.
const MANAGEMENT: &[&str] = &[
    "/api/pull",
    "/api/push",
    "/api/delete",
    "/api/create",
    "/api/copy",
];

/// Model management endpoints with a parameter in the path.
const MANAGEMENT_PREFIXES: &[&str] = &["/api/blobs/"];

/// Listing endpoints with a parameter in the path (`/v1/models/{model}`).
const INFERENCE_PREFIXES: &[&str] = &["/v1/models/"];

/// The verdict on one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it.
    Allow,
    /// Model management, disabled on this device.
    ManagementDisabled,
    /// Not an endpoint cloudllm exposes.
    NotExposed,
}

/// Decides whether `path` (without the query) may be forwarded.
pub fn check(path: &str, allow_management: bool) -> Verdict {
    let under = |prefixes: &[&str]| {
        prefixes.iter().any(|p| {
            path.strip_prefix(p)
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
        })
    };
    if INFERENCE.contains(&path) || under(INFERENCE_PREFIXES) {
        Verdict::Allow
    } else if MANAGEMENT.contains(&path) || under(MANAGEMENT_PREFIXES) {
        if allow_management {
            Verdict::Allow
        } else {
            Verdict::ManagementDisabled
        }
    } else {
        Verdict::NotExposed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_passes_management_needs_the_switch_and_the_rest_is_closed() {
        for path in INFERENCE {
            assert_eq!(check(path, false), Verdict::Allow, "{path}");
        }
        assert_eq!(check("/v1/models/smollm2:135m", false), Verdict::Allow);
        for path in [
            "/api/pull",
            "/api/delete",
            "/api/blobs/sha256:abc",
            "/api/create",
        ] {
            assert_eq!(check(path, false), Verdict::ManagementDisabled, "{path}");
            assert_eq!(check(path, true), Verdict::Allow, "{path}");
        }
        for path in [
            "/",
            "/api/",
            "/api/chat/",
            "/api/../api/pull",
            "/api/blobs/",
            "/api/blobs/a/b",
            "/.cloudllm/drain",
            "/v1/models/a/../../x",
            "/API/CHAT",
        ] {
            assert_eq!(check(path, true), Verdict::NotExposed, "{path}");
        }
    }
}
