//! Who is on the other end of a connection: the peer's address, or the client's address a
//! trusted reverse proxy names in `X-Forwarded-For`.
//!
//! The header is only believed from the proxies the operator lists (`trusted_proxies`):
//! from anyone else it could be forged to dodge the per-address limits or to blame someone
//! else in the audit log.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

/// The client's address for a request that arrived from `peer` with `headers`.
///
/// From a trusted proxy, the `X-Forwarded-For` list is read from the right, where each proxy
/// appended the address it saw: trusted proxies are skipped, and the first address that is not
/// one is the client. Nothing left of that address is read (the client wrote it). An entry that
/// is not an address (`unknown`, garbage) ends the walk too, and the request is attributed to
/// the trusted hop that wrote it, the last address the chain vouches for: what lies left of it
/// cannot be trusted, and attributing to the proxy instead would hand a client who prepends
/// garbage the proxy's fresh budget and hide it from the audit log. A missing header means the
/// peer is the client; an entry may carry a port (`198.51.100.7:4711`, `[2001:db8::1]:4711`).
pub fn client_ip(
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    trusted: &[IpAddr],
) -> Option<IpAddr> {
    let peer = canonical(peer?.ip());
    if !trusted.contains(&peer) {
        return Some(peer);
    }
    // The trusted proxy that wrote the entry read next.
    let mut hop = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(value) = value.to_str() else {
            return Some(hop);
        };
        for entry in value.rsplit(',') {
            let Some(ip) = parse_entry(entry) else {
                return Some(hop);
            };
            if !trusted.contains(&ip) {
                return Some(ip);
            }
            hop = ip;
        }
    }
    Some(hop)
}

/// One `X-Forwarded-For` entry as an address: a bare IP, or an IP with a port.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<IpAddr>()
                .ok()
        })?;
    Some(canonical(ip))
}

/// IPv4 addresses seen through an IPv6 socket (`::ffff:a.b.c.d`) as plain IPv4, so lists and
/// limits see one address.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in xff {
            headers.append("x-forwarded-for", value.parse().unwrap());
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxy: SocketAddr = "10.0.0.2:4000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let trusted = [ip("10.0.0.2"), ip("10.0.0.3")];
        let xff = headers(&["198.51.100.7, 10.0.0.3"]);

        // From a stranger the header is ignored.
        assert_eq!(
            client_ip(Some(stranger), &xff, &trusted),
            Some(ip("203.0.113.9"))
        );
        // From the proxy, the rightmost address that is not a proxy is the client.
        assert_eq!(
            client_ip(Some(proxy), &xff, &trusted),
            Some(ip("198.51.100.7"))
        );
        // A client cannot prepend a fake address to get past the proxy's own entry.
        let spoofed = headers(&["1.2.3.4", "198.51.100.7"]);
        assert_eq!(
            client_ip(Some(proxy), &spoofed, &trusted),
            Some(ip("198.51.100.7"))
        );
        // Missing, or garbage written by the proxy itself: the proxy.
        assert_eq!(
            client_ip(Some(proxy), &HeaderMap::new(), &trusted),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(
            client_ip(Some(proxy), &headers(&["not-an-ip"]), &trusted),
            Some(ip("10.0.0.2"))
        );
        // Mapped IPv4 peers compare as IPv4.
        let mapped: SocketAddr = "[::ffff:10.0.0.2]:4000".parse().unwrap();
        assert_eq!(
            client_ip(Some(mapped), &xff, &trusted),
            Some(ip("198.51.100.7"))
        );
        assert_eq!(client_ip(None, &xff, &trusted), None);
    }

    #[test]
    fn garbage_left_of_the_client_is_never_read_and_garbage_from_a_proxy_stops_the_walk() {
        let proxy: SocketAddr = "10.0.0.2:4000".parse().unwrap();
        let trusted = [ip("10.0.0.2"), ip("10.0.0.3")];
        let client = |xff: &[&str]| client_ip(Some(proxy), &headers(xff), &trusted);

        // A client that prepends garbage is still the address the proxy saw: it keeps its own
        // failure budget and its place in the audit log.
        assert_eq!(client(&["x, 198.51.100.7"]), Some(ip("198.51.100.7")));
        assert_eq!(client(&["x", "198.51.100.7"]), Some(ip("198.51.100.7")));
        assert_eq!(client(&[",,, 198.51.100.7"]), Some(ip("198.51.100.7")));
        // Garbage written by a trusted hop: attributed to that hop, never to what lies left.
        assert_eq!(
            client(&["198.51.100.9, unknown, 10.0.0.3"]),
            Some(ip("10.0.0.3"))
        );
        assert_eq!(client(&["198.51.100.9, "]), Some(ip("10.0.0.2")));
        // Only trusted hops: the first of them (the one nearest the client).
        assert_eq!(client(&["10.0.0.3, 10.0.0.2"]), Some(ip("10.0.0.3")));
        // Ports, brackets and mapped addresses.
        assert_eq!(client(&["198.51.100.7:4711"]), Some(ip("198.51.100.7")));
        assert_eq!(client(&["[2001:db8::1]:4711"]), Some(ip("2001:db8::1")));
        assert_eq!(client(&["[2001:db8::1]"]), Some(ip("2001:db8::1")));
        assert_eq!(
            client(&["::ffff:198.51.100.7, 10.0.0.3"]),
            Some(ip("198.51.100.7"))
        );
        // A value that is not text is one unreadable entry.
        let mut binary = headers(&["198.51.100.9"]);
        binary.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        );
        assert_eq!(
            client_ip(Some(proxy), &binary, &trusted),
            Some(ip("10.0.0.2"))
        );
        let mut binary_left = headers(&[]);
        binary_left.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        );
        binary_left.append("x-forwarded-for", "198.51.100.7".parse().unwrap());
        assert_eq!(
            client_ip(Some(proxy), &binary_left, &trusted),
            Some(ip("198.51.100.7"))
        );
    }
}
