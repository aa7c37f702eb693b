//! Who a request comes from: its peer address, or, when the peer is one of
//! `NIXERY_TRUSTED_PROXIES`, the first address in `X-Forwarded-For` read from the right that is
//! not a trusted proxy (App Engine and other load balancers append more than one hop). A client
//! can write anything into that header, so only what trusted proxies appended is believed.
//!
//! The address is known to everything a request's handler runs ([`serve_as`] sets it for the
//! handler's task), so that admission can count the new work each client starts without every
//! call carrying it.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::HeaderMap;

/// The addresses whose `X-Forwarded-For` is believed (`NIXERY_TRUSTED_PROXIES`).
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl FromStr for TrustedProxies {
    type Err = String;

    /// Comma-separated CIDRs or addresses: `10.0.0.0/8,2001:db8::/32,192.0.2.7`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| {
                part.parse::<ipnet::IpNet>()
                    .or_else(|_| part.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("{part:?} is not a CIDR (10.0.0.0/8) or an address"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }
}

impl TrustedProxies {
    fn trusts(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        self.0.iter().any(|net| net.contains(&addr))
    }

    /// The client of a request from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = canonical(peer);
        if !self.trusts(client) {
            return client;
        }
        // Every X-Forwarded-For header, as one list: hops are appended on the right.
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .collect();
        for hop in hops.iter().rev() {
            // What a proxy wrote that is no address ends the trust: the last proxy that could
            // be believed is the client.
            let Some(addr) = parse_hop(hop) else {
                break;
            };
            client = addr;
            if !self.trusts(addr) {
                break;
            }
        }
        client
    }
}

/// An address as a proxy writes it in `X-Forwarded-For`: `192.0.2.1`, `2001:db8::1`, or with a
/// port (`192.0.2.1:4711`, `[2001:db8::1]:4711`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .map(canonical)
}

/// IPv4 addresses mapped into IPv6 (`::ffff:192.0.2.1`, what a dual-stack socket reports) as
/// IPv4, so a client is one address however it connected.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// The request being served: its client, and whether it has been counted for new work.
struct Request {
    addr: IpAddr,
    charged: AtomicBool,
}

tokio::task_local! {
    static REQUEST: Request;
}

/// Runs `handler` as the request of client `addr`.
pub async fn serve_as<F: Future>(addr: IpAddr, handler: F) -> F::Output {
    REQUEST
        .scope(
            Request {
                addr,
                charged: AtomicBool::new(false),
            },
            handler,
        )
        .await
}

/// The client of the request being served, if this runs in one.
pub fn current() -> Option<IpAddr> {
    REQUEST.try_with(|request| request.addr).ok()
}

/// Counts the request being served against its client with `take`, the first time it is asked
/// in that request; later times, and work outside any request, cost nothing.
pub fn charge_once<E>(take: impl FnOnce(IpAddr) -> Result<(), E>) -> Result<(), E> {
    let Ok(addr) = REQUEST
        .try_with(|request| (!request.charged.load(Ordering::Relaxed)).then_some(request.addr))
    else {
        return Ok(());
    };
    let Some(addr) = addr else {
        return Ok(());
    };
    take(addr)?;
    let _ = REQUEST.try_with(|request| request.charged.store(true, Ordering::Relaxed));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", value.parse().unwrap());
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let none = TrustedProxies::default();
        let forwarded = headers(&["203.0.113.9"]);
        assert_eq!(none.client(ip("127.0.0.2"), &forwarded), ip("127.0.0.2"));
        let some: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        assert_eq!(some.client(ip("127.0.0.2"), &forwarded), ip("127.0.0.2"));
    }

    #[test]
    fn the_first_untrusted_hop_from_the_right_is_the_client() {
        let trusted: TrustedProxies = "10.0.0.0/8, 130.211.0.0/22,192.0.2.7".parse().unwrap();
        let peer = ip("10.1.2.3");
        // App Engine: the client, then Google's front end; the peer is the VM's proxy.
        let forwarded = headers(&["198.51.100.4, 130.211.0.9"]);
        assert_eq!(trusted.client(peer, &forwarded), ip("198.51.100.4"));
        // What the client itself wrote on the left is not believed.
        let spoofed = headers(&["1.2.3.4, 198.51.100.4", "130.211.0.9"]);
        assert_eq!(trusted.client(peer, &spoofed), ip("198.51.100.4"));
        // Ports and brackets, as some proxies write them.
        let ported = headers(&["[2001:db8::1]:4711, 192.0.2.7:80"]);
        assert_eq!(trusted.client(peer, &ported), ip("2001:db8::1"));
        // Garbage ends the trust at the last believed hop.
        let garbage = headers(&["198.51.100.4, garbage, 130.211.0.9"]);
        assert_eq!(trusted.client(peer, &garbage), ip("130.211.0.9"));
        // No header: the proxy itself.
        assert_eq!(trusted.client(peer, &HeaderMap::new()), peer);
        // Only trusted hops: the leftmost.
        let all_trusted = headers(&["10.9.9.9, 130.211.0.9"]);
        assert_eq!(trusted.client(peer, &all_trusted), ip("10.9.9.9"));
    }

    #[test]
    fn mapped_addresses_are_their_ipv4_selves() {
        let trusted: TrustedProxies = "127.0.0.1".parse().unwrap();
        let forwarded = headers(&["::ffff:198.51.100.4"]);
        assert_eq!(
            trusted.client(ip("::ffff:127.0.0.1"), &forwarded),
            ip("198.51.100.4")
        );
    }

    #[test]
    fn bad_proxy_lists_are_refused() {
        assert!("10.0.0.0/33".parse::<TrustedProxies>().is_err());
        assert!("localhost".parse::<TrustedProxies>().is_err());
        assert!("".parse::<TrustedProxies>().unwrap().0.is_empty());
    }
}
