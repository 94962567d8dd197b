//! A network behind the VPN: an address on the host that a client reaches only through its
//! tunnel, by a route the server pushes. A ping to the server's own tunnel address proves little
//! (with a wrong netmask it still answers, over the namespace's default route through the host);
//! a ping to this address answers only when the pushed route is installed on the client's tun.

use super::*;

/// The range the behind-the-VPN `/24` nets come from.
pub const BEHIND_RANGE: Ipv4Prefix = Ipv4Prefix {
    addr: Ipv4Addr::new(10, 214, 0, 0),
    len: 16,
};

/// A `/24` from [`BEHIND_RANGE`], claimed before the server starts (so its route can go into
/// the config); [`Behind::attach`] puts its `.1` (the target) on the server's tun device on the
/// host (this kernel may have no dummy devices). The address goes with the device when the
/// server stops; drop removes it before.
#[derive(Debug)]
pub struct Behind {
    link: Option<String>,
    net: Ipv4Prefix,
    _claim: Claim,
}

impl Behind {
    /// Claims a free `/24` of [`BEHIND_RANGE`].
    pub fn claim() -> Result<Behind, String> {
        let (net, claim) = claim_subnet("behind", BEHIND_RANGE, 24)?;
        Ok(Behind {
            link: None,
            net,
            _claim: claim,
        })
    }

    /// Puts the target address on `server`'s tun device.
    pub fn attach(&mut self, server: &Server) -> Result<(), String> {
        let link = server.tun_name().to_owned();
        ip(&[
            "addr",
            "add",
            &format!("{}/32", self.target()),
            "dev",
            &link,
        ])?;
        self.link = Some(link);
        Ok(())
    }

    /// The net (push it as a route).
    pub fn net(&self) -> Ipv4Prefix {
        self.net
    }

    /// The address to ping.
    pub fn target(&self) -> Ipv4Addr {
        self.net.host(1)
    }

    /// Makes all of [`BEHIND_RANGE`] unreachable in `ns` (an `unreachable` route), so that its
    /// default route through the host does not reach the target: only a more specific route, the
    /// pushed one through the tunnel, does.
    pub fn cut_off(&self, ns: &ClientNs) -> Result<(), String> {
        ip(&[
            "-n",
            ns.name(),
            "route",
            "add",
            "unreachable",
            &BEHIND_RANGE.to_string(),
        ])
        .map(drop)
    }
}

impl Drop for Behind {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            let _ = ip(&[
                "addr",
                "del",
                &format!("{}/32", self.target()),
                "dev",
                &link,
            ]);
        }
    }
}

/// What a client that got its address from `pool`, inside the server's tunnel net, must show:
/// an address from `pool` with the tunnel net's prefix length on its tun, the route to `behind`
/// installed on its tun via the server's address, and an answer from `behind`'s target.
/// Returns the address.
pub fn check_reaches_behind(
    client: &Client,
    ns: &ClientNs,
    server: &Server,
    pool: Ipv4Prefix,
    behind: &Behind,
) -> Result<Ipv4Addr, String> {
    let net = server.tunnel_net();
    let addr = ip(&[
        "-n",
        ns.name(),
        "-4",
        "-o",
        "addr",
        "show",
        "dev",
        CLIENT_TUN,
    ])?;
    let cidr = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .ok_or_else(|| format!("no IPv4 address on {CLIENT_TUN}: {addr:?}"))?;
    let (ip_text, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let tun_ip: Ipv4Addr = ip_text.parse().map_err(|e| format!("{cidr}: {e}"))?;
    if !pool.contains(tun_ip) || tun_ip == server.tunnel_ip() {
        return Err(format!(
            "{CLIENT_TUN} has {cidr}, not an address of the pool {pool}"
        ));
    }
    if len != net.len.to_string() {
        return Err(format!(
            "{CLIENT_TUN} has {cidr}: the prefix length is not the tunnel net's ({net})"
        ));
    }
    let routes = ip(&[
        "-n",
        ns.name(),
        "-4",
        "route",
        "show",
        &behind.net().to_string(),
    ])?;
    let want_via = format!("via {} dev {CLIENT_TUN}", server.tunnel_ip());
    if !routes.lines().any(|l| l.contains(&want_via)) {
        return Err(format!(
            "the pushed route {} is not on {CLIENT_TUN} ({want_via}): `ip route show` gives {routes:?}; client log:\n{}",
            behind.net(),
            client.log()
        ));
    }
    client
        .ping(behind.target(), 3)
        .map_err(|e| format!("no answer from {} behind the VPN: {e}", behind.target()))?;
    Ok(tun_ip)
}

/// The upper half of `net` (`10.9.0.0/24` → `10.9.0.128/25`).
pub fn upper_half(net: Ipv4Prefix) -> Ipv4Prefix {
    Ipv4Prefix::new(net.host(1 << (31 - u32::from(net.len))), net.len + 1)
}
