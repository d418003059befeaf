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
/// From a trusted proxy, the `X-Forwarded-For` list is read from the right (each proxy appends
/// the address it saw) and the first address that is not itself a trusted proxy is the client.
/// A missing or malformed header means the peer is the client.
pub fn client_ip(
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    trusted: &[IpAddr],
) -> Option<IpAddr> {
    let peer = canonical(peer?.ip());
    if !trusted.contains(&peer) {
        return Some(peer);
    }
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(value) = value.to_str() else {
            return Some(peer);
        };
        for hop in value.split(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(canonical(ip)),
                Err(_) => return Some(peer),
            }
        }
    }
    Some(
        hops.into_iter()
            .rev()
            .find(|ip| !trusted.contains(ip))
            .unwrap_or(peer),
    )
}

/// IPv4 addresses seen through an IPv6 socket (`::ffff:a.b.c.d`) as plain IPv4, so lists and
/// limits see one address.
fn canonical(ip: IpAddr) -> IpAddr {
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
        // Missing or malformed: the proxy itself.
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
}
