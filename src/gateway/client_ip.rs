//! Which address a request came from, for the failed-login limit per address and the
//! access log: the TCP peer, or — when the peer is a configured trusted proxy — the
//! address that proxy (and any trusted proxy before it) put in `X-Forwarded-For`.
//!
//! The header is read from the right, the way proxies append to it: addresses of trusted
//! proxies are skipped, and the first other address is the client. Anything to its left was
//! written by the client itself and proves nothing. Entries with a port (`1.2.3.4:5678`,
//! `[2001:db8::1]:443`, as some cloud load balancers write them) count as the address. An
//! entry that is not an address ends the walk at the last trusted hop, so garbage can only
//! make a request count against its proxy, never against an address of the sender's
//! choosing.
//!
//! Every host inside a trusted network can name any client address: list the proxies'
//! own addresses, not the networks their clients live in.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// The proxies whose `X-Forwarded-For` is believed (`trusted_proxies` in the config).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// Trusts the given networks; none: `X-Forwarded-For` is never read.
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies { nets }
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client's address given the TCP peer's and the request headers.
    pub fn client_ip(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let mut client = canonical(peer?);
        if self.nets.is_empty() || !self.trusts(client) {
            return Some(client);
        }
        // Several header lines count as one list, in order.
        let lines: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        for line in lines.iter().rev() {
            for entry in line.rsplit(|&b| b == b',') {
                let Some(ip) = parse_entry(entry) else {
                    return Some(client);
                };
                client = ip;
                if !self.trusts(ip) {
                    return Some(client);
                }
            }
        }
        Some(client)
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as dual-stack sockets report IPv4
/// peers) as the IPv4 address it is, so that one network entry covers both.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` entry: an address, or an address with a port, optionally with
/// blanks around it.
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    let ip = text
        .parse::<IpAddr>()
        .or_else(|_| text.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()?;
    Some(canonical(ip))
}

/// Parses one `trusted_proxies` entry: a single address or a network (`10.0.0.0/24`,
/// `fd00::/64`). IPv4-mapped IPv6 entries become the IPv4 ones they stand for, as peers do.
pub fn parse_trusted(entry: &str) -> Result<IpNet, String> {
    let entry = entry.trim();
    let net = match entry.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => entry.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
            format!("{entry:?} is not an IP address or network (like 192.168.1.7 or 10.0.0.0/24)")
        })?,
    };
    Ok(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => {
                IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map_err(|e| e.to_string())?
            }
            None => net,
        },
        _ => net,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(nets.iter().map(|n| parse_trusted(n).unwrap()).collect())
    }

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for line in lines {
            map.append("x-forwarded-for", line.parse().unwrap());
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn client(p: &TrustedProxies, peer: &str, lines: &[&str]) -> IpAddr {
        p.client_ip(Some(ip(peer)), &headers(lines)).unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let p = proxies(&[]);
        assert_eq!(client(&p, "10.0.0.1", &["1.2.3.4"]), ip("10.0.0.1"));
        assert_eq!(p.client_ip(None, &headers(&["1.2.3.4"])), None);
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let p = proxies(&["10.0.0.0/8"]);
        assert_eq!(client(&p, "192.0.2.7", &["1.2.3.4"]), ip("192.0.2.7"));
    }

    #[test]
    fn walks_from_the_right_past_trusted_hops_only() {
        let p = proxies(&["10.0.0.0/8", "fd00::/8"]);
        assert_eq!(client(&p, "10.0.0.1", &["1.2.3.4"]), ip("1.2.3.4"));
        // The client wrote 6.6.6.6 itself; the proxy appended the address it saw.
        assert_eq!(
            client(&p, "10.0.0.1", &["6.6.6.6, 1.2.3.4, 10.1.1.1"]),
            ip("1.2.3.4")
        );
        assert_eq!(
            client(&p, "10.0.0.1", &["6.6.6.6", "2001:db8::5", "fd00::1"]),
            ip("2001:db8::5")
        );
        // Only trusted hops: the left-most one is as far as anything is known.
        assert_eq!(
            client(&p, "10.0.0.1", &["10.9.9.9,10.1.1.1"]),
            ip("10.9.9.9")
        );
        // No header from a trusted peer: the peer.
        assert_eq!(client(&p, "10.0.0.1", &[]), ip("10.0.0.1"));
    }

    #[test]
    fn garbage_ends_the_walk_at_the_last_trusted_hop() {
        let p = proxies(&["10.0.0.0/8"]);
        for bad in [
            "unknown",
            "1.2.3.4:x",
            "",
            " ",
            "1.2.3.4 5.6.7.8",
            "[1.2.3.4]:80",
        ] {
            let line = format!("6.6.6.6, {bad}");
            assert_eq!(client(&p, "10.0.0.1", &[&line]), ip("10.0.0.1"), "{line:?}");
        }
        assert_eq!(
            client(&p, "10.0.0.1", &["6.6.6.6, nonsense, 10.2.2.2"]),
            ip("10.2.2.2")
        );
        let mut binary = HeaderMap::new();
        binary.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"1.2.3.4\xff").unwrap(),
        );
        assert_eq!(
            p.client_ip(Some(ip("10.0.0.1")), &binary),
            Some(ip("10.0.0.1"))
        );
    }

    #[test]
    fn entries_with_ports_count_as_their_address() {
        let p = proxies(&["10.0.0.0/8"]);
        assert_eq!(client(&p, "10.0.0.1", &["1.2.3.4:5678"]), ip("1.2.3.4"));
        assert_eq!(
            client(&p, "10.0.0.1", &["6.6.6.6, [2001:db8::7]:443, 10.0.0.2:80"]),
            ip("2001:db8::7")
        );
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let p = proxies(&["127.0.0.1"]);
        assert_eq!(
            client(&p, "::ffff:127.0.0.1", &["::ffff:1.2.3.4"]),
            ip("1.2.3.4")
        );
        // Mapped entries in the list mean their IPv4 addresses.
        let mapped = proxies(&["::ffff:10.0.0.0/104", "::ffff:192.0.2.9"]);
        assert_eq!(client(&mapped, "10.3.3.3", &["1.2.3.4"]), ip("1.2.3.4"));
        assert_eq!(client(&mapped, "192.0.2.9", &["1.2.3.5"]), ip("1.2.3.5"));
        assert_eq!(
            parse_trusted("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn trusted_entries_parse_networks_and_single_addresses() {
        assert_eq!(
            parse_trusted("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_trusted(" 127.0.0.1 ").unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert_eq!(parse_trusted("::1").unwrap().to_string(), "::1/128");
        let err = parse_trusted("10.0.0.0/33").unwrap_err();
        assert!(err.contains("not an IP address or network"), "{err}");
        assert!(parse_trusted("proxy.internal").is_err());
    }
}
