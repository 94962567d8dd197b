//! The address plan: IPv4 prefixes, the host's routes, and subnets claimed with `flock` so that
//! parallel tests and test processes never share one.

use super::*;

/// An IPv4 prefix (`addr` is the network address, host bits zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Prefix {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub len: u8,
}

impl Ipv4Prefix {
    /// The prefix containing `addr` with length `len` (host bits are cleared).
    pub fn new(addr: Ipv4Addr, len: u8) -> Self {
        let len = len.min(32);
        Ipv4Prefix {
            addr: Ipv4Addr::from(u32::from(addr) & mask(len)),
            len,
        }
    }

    /// The dotted netmask, e.g. `255.255.255.0`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.len))
    }

    /// The `n`-th address in the prefix (`host(1)` is the first host address).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).wrapping_add(n))
    }

    /// Whether `ip` lies in the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == u32::from(self.addr)
    }

    /// Whether the two prefixes share any address.
    pub fn overlaps(&self, other: &Ipv4Prefix) -> bool {
        let len = self.len.min(other.len);
        u32::from(self.addr) & mask(len) == u32::from(other.addr) & mask(len)
    }
}

pub(super) fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv4Prefix {
    type Err = String;
    /// Parses `a.b.c.d/len`; a bare address is a `/32`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        let addr = a
            .parse::<Ipv4Addr>()
            .map_err(|e| format!("bad prefix {s:?}: {e}"))?;
        let len = l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("bad prefix length in {s:?}"))?;
        Ok(Ipv4Prefix::new(addr, len))
    }
}

/// IPv4 prefixes in the host's main routing table (the default route excluded).
pub(super) fn host_routes() -> Result<Vec<Ipv4Prefix>, String> {
    let out = ip(&["-4", "route", "show", "table", "all"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let mut first = words.next()?;
            if [
                "local",
                "broadcast",
                "unicast",
                "blackhole",
                "unreachable",
                "prohibit",
                "throw",
            ]
            .contains(&first)
            {
                first = words.next()?;
            }
            if first == "default" {
                None
            } else {
                first.parse::<Ipv4Prefix>().ok()
            }
        })
        .collect())
}

/// A reservation held by an exclusive `flock`; the kernel releases it when the file is closed or
/// the process dies. The files are never deleted (deleting a lock file races with lockers).
#[derive(Debug)]
pub struct Claim {
    _file: File,
}

impl Claim {
    pub(super) fn try_take(key: &str) -> Result<Option<Claim>, String> {
        let dir = base_dir()?.join("claims");
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let path = dir.join(key);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Claim { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(format!("lock {}: {e}", path.display())),
        }
    }
}

/// Reserves the first `/len` subnet of `range` that no route overlaps and nobody has claimed.
pub fn claim_subnet(kind: &str, range: Ipv4Prefix, len: u8) -> Result<(Ipv4Prefix, Claim), String> {
    let routes = host_routes()?;
    let slots = 1u32 << (len - range.len);
    for i in 0..slots {
        let net = Ipv4Prefix::new(range.host(i << (32 - u32::from(len))), len);
        if routes.iter().any(|r| r.overlaps(&net)) {
            continue;
        }
        if let Some(claim) = Claim::try_take(&format!("{kind}-{}-{}", net.addr, net.len))? {
            return Ok((net, claim));
        }
    }
    Err(format!("no free /{len} left in {range} for {kind}"))
}
