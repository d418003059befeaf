//! Which Ollama endpoints remote callers may reach, with which methods and which parameters.
//!
//! By default only inference and listing pass. Model management would let anyone with a client
//! token fill the owner's disk or delete their models, so it is refused unless the owner sets
//! `allow_model_management = true`. Anything not in the table is refused too: a new Ollama
//! endpoint is not exposed until it has been looked at.
//!
//! Each endpoint is listed with the methods Ollama's router serves it with (Ollama answers
//! any other method with 404, so nothing a client can do is lost by refusing it here with 405).
//! A path parameter (a model name in `/v1/models/{name}`, a digest in `/api/blobs/{digest}`)
//! is percent-decoded, checked against the characters Ollama itself allows, and forwarded in
//! that decoded form, so what Ollama sees is exactly what was checked: `..%2F..%2Fapi%2Fpull`
//! never reaches it. The table itself is [`cloudllm_proto::endpoints`], which the relay's
//! routing reads too; this module is the daemon's policy over it.

use std::borrow::Cow;

use cloudllm_proto as proto;
use cloudllm_proto::endpoints::{Class, Param, find};

/// The verdict on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Forward it to Ollama at this path (the checked, decoded form; no query).
    Allow(Cow<'a, str>),
    /// Model management, disabled on this device.
    ManagementDisabled,
    /// A known endpoint, but not with this method: these are the ones it takes.
    MethodNotAllowed(&'static [&'static str]),
    /// A known endpoint whose path parameter is not one Ollama could accept.
    BadParam(ParamError),
    /// Not an endpoint cloudllm exposes.
    NotExposed,
}

/// Why a path parameter was refused; the message is the rule, for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A model name that breaks [`model_name`]'s rule.
    #[error(
        "a model name is 1 to {max} bytes of letters, digits and `_ - . :`, in at most three \
         parts separated by `/` (host/namespace/model:tag), each starting with a letter, a digit \
         or `_`, with no `..` and no escaped `/`",
        max = proto::MAX_MODEL_NAME_BYTES
    )]
    ModelName,
    /// A digest that is not `sha256:` and 64 hex digits.
    #[error("a blob digest is `sha256:` followed by 64 hex digits")]
    BlobDigest,
}

/// Decides whether `method` on `path` (without the query) may be forwarded, and to which path.
///
/// Management endpoints are refused as such before their method or parameter is looked at,
/// so that a caller learns which setting to ask the owner for.
pub fn check<'a>(method: &str, path: &'a str, allow_management: bool) -> Verdict<'a> {
    let Some((endpoint, param)) = find(path) else {
        return Verdict::NotExposed;
    };
    if endpoint.class == Class::Management && !allow_management {
        return Verdict::ManagementDisabled;
    }
    if !endpoint.takes(method) {
        return Verdict::MethodNotAllowed(endpoint.methods);
    }
    let checked = match endpoint.param {
        Param::None => return Verdict::Allow(Cow::Borrowed(path)),
        Param::ModelName => model_name(param),
        Param::BlobDigest => blob_digest(param),
    };
    match checked {
        Ok(param) => Verdict::Allow(Cow::Owned(format!("{}{param}", endpoint.path))),
        Err(err) => Verdict::BadParam(err),
    }
}

/// Most `/`-separated parts of a model name: Ollama's `host/namespace/model:tag`.
const MAX_MODEL_NAME_PARTS: usize = 3;

/// The model name in `raw` (a path's last segments), percent-decoded and checked.
///
/// The characters are those Ollama's own name parser accepts: ASCII letters, digits and
/// `_ - . :`, each part starting with a letter, a digit or `_`; `/` only between parts and
/// literally (an escaped `/` is how `..%2F..%2Fapi%2Fpull` hides a path), no `..`, and at most
/// [`proto::MAX_MODEL_NAME_BYTES`], the longest name a device reports.
pub fn model_name(raw: &str) -> Result<String, ParamError> {
    let (name, escaped_slash) = percent_decode(raw).ok_or(ParamError::ModelName)?;
    let part_ok = |part: &str| {
        part.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && matches!(b, b'-' | b'.' | b':'))
        }) && !part.is_empty()
    };
    let valid = !escaped_slash
        && name.len() <= proto::MAX_MODEL_NAME_BYTES
        && !name.contains("..")
        && name.split('/').count() <= MAX_MODEL_NAME_PARTS
        && name.split('/').all(part_ok);
    if valid {
        Ok(name)
    } else {
        Err(ParamError::ModelName)
    }
}

/// Hex digits in a SHA-256 digest.
const SHA256_HEX_LEN: usize = 64;

/// The blob digest in `raw`, percent-decoded and checked: `sha256:` (or Ollama's file-name
/// form `sha256-`) and 64 hex digits, nothing else, as Ollama's blob handlers require.
pub fn blob_digest(raw: &str) -> Result<String, ParamError> {
    let (digest, _) = percent_decode(raw).ok_or(ParamError::BlobDigest)?;
    let hex = digest
        .strip_prefix("sha256:")
        .or_else(|| digest.strip_prefix("sha256-"))
        .ok_or(ParamError::BlobDigest)?;
    if hex.len() == SHA256_HEX_LEN && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(digest)
    } else {
        Err(ParamError::BlobDigest)
    }
}

/// `raw` with its `%XX` escapes decoded, and whether one of them was a `/`; `None` if an
/// escape is malformed or the result is not printable ASCII (no name or digest has anything
/// else, and this keeps control bytes, `%00` included, out of Ollama's router).
fn percent_decode(raw: &str) -> Option<(String, bool)> {
    let mut out = String::with_capacity(raw.len());
    let mut escaped_slash = false;
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        let decoded = if b == b'%' {
            let hi = char::from(bytes.next()?).to_digit(16)?;
            let lo = char::from(bytes.next()?).to_digit(16)?;
            let d = u8::try_from(hi * 16 + lo).ok()?;
            escaped_slash |= d == b'/';
            d
        } else {
            b
        };
        if !decoded.is_ascii_graphic() {
            return None;
        }
        out.push(char::from(decoded));
    }
    Some((out, escaped_slash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudllm_proto::endpoints::ENDPOINTS;

    fn allowed(method: &str, path: &str, management: bool) -> Option<String> {
        match check(method, path, management) {
            Verdict::Allow(path) => Some(path.into_owned()),
            _ => None,
        }
    }

    #[test]
    fn every_endpoint_passes_with_its_methods_and_management_needs_the_switch() {
        for endpoint in ENDPOINTS {
            let path = match endpoint.param {
                Param::None => endpoint.path.to_owned(),
                Param::ModelName => format!("{}smollm2:135m", endpoint.path),
                Param::BlobDigest => format!("{}sha256:{}", endpoint.path, "ab".repeat(32)),
            };
            for method in endpoint.methods {
                assert_eq!(
                    allowed(method, &path, true).as_deref(),
                    Some(path.as_str()),
                    "{method} {path}"
                );
                let without = check(method, &path, false);
                match endpoint.class {
                    Class::Inference => assert!(matches!(without, Verdict::Allow(_)), "{path}"),
                    Class::Management => {
                        assert_eq!(without, Verdict::ManagementDisabled, "{path}");
                    }
                }
            }
        }
    }

    #[test]
    fn other_methods_get_the_list_of_allowed_ones() {
        let long = "X".repeat(5_000);
        for method in [
            "TRACE",
            "GET",
            "PUT",
            "OPTIONS",
            "CONNECT",
            "post",
            long.as_str(),
        ] {
            assert_eq!(
                check(method, "/api/chat", false),
                Verdict::MethodNotAllowed(&["POST"]),
                "{method}"
            );
        }
        assert_eq!(
            check("POST", "/api/tags", false),
            Verdict::MethodNotAllowed(&["GET", "HEAD"])
        );
        assert_eq!(
            check("GET", "/api/delete", true),
            Verdict::MethodNotAllowed(&["DELETE"])
        );
        // Management is named as such whatever the method.
        assert_eq!(
            check("TRACE", "/api/pull", false),
            Verdict::ManagementDisabled
        );
    }

    #[test]
    fn unknown_paths_are_not_exposed() {
        for path in [
            "/",
            "/api/",
            "/api/chat/",
            "/api/chat%2F",
            "/api/../api/pull",
            "/api/blobs/",
            "/v1/models/",
            "/.cloudllm/drain",
            "/API/CHAT",
        ] {
            assert_eq!(check("POST", path, true), Verdict::NotExposed, "{path}");
            assert_eq!(check("GET", path, true), Verdict::NotExposed, "{path}");
        }
    }

    #[test]
    fn model_names_are_what_ollama_allows_and_are_forwarded_decoded() {
        for (raw, name) in [
            ("smollm2:135m", "smollm2:135m"),
            ("smollm2%3A135m", "smollm2:135m"),
            (
                "library/llama3.2:1b-instruct-q4_K_M",
                "library/llama3.2:1b-instruct-q4_K_M",
            ),
            (
                "hf.co/bartowski/Model-GGUF:Q4_K_M",
                "hf.co/bartowski/Model-GGUF:Q4_K_M",
            ),
            (
                "registry.local:5000/team/model",
                "registry.local:5000/team/model",
            ),
            ("_private", "_private"),
        ] {
            assert_eq!(model_name(raw).as_deref(), Ok(name), "{raw}");
            assert_eq!(
                allowed("GET", &format!("/v1/models/{raw}"), false),
                Some(format!("/v1/models/{name}"))
            );
        }
        let long = "m".repeat(proto::MAX_MODEL_NAME_BYTES + 1);
        for raw in [
            "..%2F..%2Fapi%2Fpull",
            "..%2f..%2fapi%2fpull",
            "a%2Fb",
            "../api/pull",
            "a/../../x",
            "a/./b",
            "a..b",
            ".hidden",
            "-flag",
            "a//b",
            "a/",
            "/a",
            "a/b/c/d",
            "a%00",
            "a%",
            "a%4",
            "a%zz",
            "a%25",
            "a%20b",
            "a b",
            "a?b",
            "a#b",
            "a\\b",
            "mödel",
            long.as_str(),
        ] {
            assert_eq!(model_name(raw), Err(ParamError::ModelName), "{raw}");
            assert_eq!(
                check("GET", &format!("/v1/models/{raw}"), false),
                Verdict::BadParam(ParamError::ModelName),
                "{raw}"
            );
        }
        assert!(model_name(&"m".repeat(proto::MAX_MODEL_NAME_BYTES)).is_ok());
    }

    #[test]
    fn blob_digests_are_sha256_and_64_hex_digits() {
        let hex = "0123456789abcdefABCDEF".repeat(3)[..64].to_owned();
        for raw in [format!("sha256:{hex}"), format!("sha256-{hex}")] {
            assert_eq!(blob_digest(&raw), Ok(raw.clone()));
        }
        assert_eq!(
            blob_digest(&format!("sha256%3A{hex}")),
            Ok(format!("sha256:{hex}"))
        );
        for raw in [
            "sha256:00".to_owned(),
            format!("sha256:{hex}0"),
            format!("sha512:{hex}"),
            format!("sha256:{}g", &hex[..63]),
            format!("sha256:{hex}/x"),
            format!("sha256:{hex}%2F"),
            hex.clone(),
        ] {
            assert_eq!(blob_digest(&raw), Err(ParamError::BlobDigest), "{raw}");
            assert_eq!(
                check("HEAD", &format!("/api/blobs/{raw}"), true),
                Verdict::BadParam(ParamError::BlobDigest),
                "{raw}"
            );
        }
    }
}
