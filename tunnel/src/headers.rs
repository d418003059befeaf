//! Header hygiene at each proxy hop: what never crosses from one connection to the next, and
//! (where a hop trusts only what it knows) the short list of what does.

use hyper::header::{self, HeaderMap, HeaderName};

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the common non-standard ones): they describe one
/// connection and are never forwarded.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes hop-by-hop headers: the standard ones and those the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| name.trim().parse().ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Keeps only the headers named in `allowed` (every value of each), in `allowed`'s order, and
/// drops the rest: for a hop that passes what it has reviewed rather than refusing what it
/// has heard of.
pub fn keep_only(headers: &mut HeaderMap, allowed: &[HeaderName]) {
    let all = std::mem::take(headers);
    for name in allowed {
        for value in all.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_headers_and_the_ones_connection_names_go() {
        let mut headers: HeaderMap = [
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-type", "application/json"),
        ]
        .into_iter()
        .map(|(k, v)| (HeaderName::from_static(k), v.parse().unwrap()))
        .collect();
        remove_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type"]);
    }

    #[test]
    fn keep_only_keeps_every_value_of_the_named_headers_and_nothing_else() {
        let mut headers: HeaderMap = [
            ("accept", "application/json"),
            ("accept", "text/event-stream"),
            ("x-real-ip", "10.0.0.1"),
            ("content-type", "application/json"),
            ("cookie2", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (HeaderName::from_static(k), v.parse().unwrap()))
        .collect();
        keep_only(
            &mut headers,
            &[header::CONTENT_TYPE, header::ACCEPT, header::HOST],
        );
        let left: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            left,
            [
                ("content-type", "application/json"),
                ("accept", "application/json"),
                ("accept", "text/event-stream"),
            ]
        );
    }
}
