//! A zone's address pool: the addresses handed out to clients, the lowest free one after a
//! cursor, never the tunnel network's own address, its gateway or its broadcast address.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

/// Addresses of a zone's pool, handed out lowest-free-after-cursor.
#[derive(Debug)]
pub(super) struct Pool {
    pub(super) net: IpNet,
    /// The tunnel network the pool lies in.
    pub(super) network: IpNet,
    pub(super) used: HashSet<IpAddr>,
    pub(super) cursor: u128,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(net: &IpNet, n: u128) -> Option<IpAddr> {
    match net {
        IpNet::V4(_) => u32::try_from(n).ok().map(|v| IpAddr::V4(v.into())),
        IpNet::V6(_) => Some(IpAddr::V6(n.into())),
    }
}

impl Pool {
    pub(super) fn new(net: IpNet, network: IpNet) -> Pool {
        Pool {
            net,
            network,
            used: HashSet::new(),
            cursor: 0,
        }
    }

    /// Usable addresses, `lo..hi`: the pool's, less the tunnel network's own address, its
    /// first host (the VPN server's tunnel address, the clients' gateway) and its last (the
    /// broadcast address, for IPv4). The pool may be any part of the tunnel network.
    fn range(&self) -> (u128, u128) {
        let span = |n: &IpNet| {
            let base = to_u128(n.network());
            (
                base,
                base + (1u128 << (n.max_prefix_len() - n.prefix_len()).min(64)),
            )
        };
        let (pool_lo, pool_hi) = span(&self.net);
        let (net_lo, net_hi) = span(&self.network);
        let lo = pool_lo.max(net_lo + 2);
        let hi = pool_hi.min(net_hi - 1);
        (lo, hi.max(lo))
    }

    pub(super) fn allocate(&mut self) -> Option<IpAddr> {
        let (lo, hi) = self.range();
        let span = hi - lo;
        if span == 0 {
            return None;
        }
        // Bounded scan: at most one pass over the pool.
        for step in 0..span.min(1 << 20) {
            let n = lo + (self.cursor + step) % span;
            let ip = from_u128(&self.net, n)?;
            if !self.used.contains(&ip) {
                self.used.insert(ip);
                self.cursor = (n - lo + 1) % span;
                return Some(ip);
            }
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pool_skips_network_server_and_broadcast() {
        let net: IpNet = "10.80.0.0/29".parse().unwrap();
        let mut p = Pool::new(net, net);
        let got: Vec<IpAddr> = std::iter::from_fn(|| p.allocate()).collect();
        let want: Vec<IpAddr> = (2..=6)
            .map(|i| format!("10.80.0.{i}").parse().unwrap())
            .collect();
        assert_eq!(got, want);
        p.used.remove(&"10.80.0.4".parse::<IpAddr>().unwrap());
        assert_eq!(p.allocate(), Some("10.80.0.4".parse().unwrap()));
        assert_eq!(p.allocate(), None);
    }

    #[test]
    fn a_pool_inside_a_larger_tunnel_network_uses_all_of_its_hosts() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // OpenVPN `server 10.9.0.0 255.255.255.0` with pforte's pool in the upper half: every
        // address of the /25 is a host of the /24 but its broadcast 10.9.0.255.
        let mut p = Pool::new(
            "10.9.0.128/25".parse().unwrap(),
            "10.9.0.0/24".parse().unwrap(),
        );
        let got: Vec<IpAddr> = std::iter::from_fn(|| p.allocate()).collect();
        assert_eq!(got.len(), 127);
        assert_eq!((got[0], got[126]), (ip("10.9.0.128"), ip("10.9.0.254")));
        // In the lower half the gateway and the network address are never handed out.
        let mut p = Pool::new(
            "10.9.0.0/28".parse().unwrap(),
            "10.9.0.0/24".parse().unwrap(),
        );
        let got: Vec<IpAddr> = std::iter::from_fn(|| p.allocate()).collect();
        assert_eq!(got.len(), 14);
        assert_eq!((got[0], got[13]), (ip("10.9.0.2"), ip("10.9.0.15")));
    }
}
