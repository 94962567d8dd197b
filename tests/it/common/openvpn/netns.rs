//! Client network namespaces with their veth pairs, and removing what crashed runs left.

use super::*;

/// A network namespace joined to the host by a veth pair: host side `172.31.x.1/30`
/// (`pfv{pid}c{n}`), namespace side `.2/30` ([`NS_VETH`]), `lo` up and a default route via the host
/// side (without one OpenVPN's `push-peer-info` sends no `IV_HWADDR`). Drop kills the namespace's
/// processes and deletes it with the veth pair.
#[derive(Debug)]
pub struct ClientNs {
    name: String,
    veth_host: String,
    subnet: Ipv4Prefix,
    mac: String,
    _claim: Claim,
}

impl ClientNs {
    /// Creates the namespace with a kernel-chosen MAC on its veth.
    pub fn create() -> Result<ClientNs, String> {
        Self::create_inner(None)
    }

    /// Creates the namespace with the given MAC (`aa:bb:cc:dd:ee:ff`, unicast) on its veth, so a
    /// test can register the device's hardware address before it connects.
    pub fn create_with_mac(mac: &str) -> Result<ClientNs, String> {
        Self::create_inner(Some(mac))
    }

    fn create_inner(mac: Option<&str>) -> Result<ClientNs, String> {
        // `ip netns add` run concurrently can race while setting up /run/netns: serialise within
        // the process and retry (other processes).
        static NETNS_LOCK: Mutex<()> = Mutex::new(());
        let (subnet, claim) = claim_subnet("veth", VETH_RANGE, 30)?;
        let n = next_id();
        let pid = std::process::id();
        let mut ns = ClientNs {
            name: format!("{NS_PREFIX}{pid}c{n}"),
            veth_host: format!("{VETH_PREFIX}{pid}c{n}"),
            subnet,
            mac: String::new(),
            _claim: claim,
        };
        debug_assert!(ns.veth_host.len() <= 15);
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            let mut attempt = 0;
            loop {
                match ip(&["netns", "add", &ns.name]) {
                    Ok(_) => break,
                    Err(e) if attempt >= 3 => return Err(e),
                    Err(_) => {
                        attempt += 1;
                        let _ = ip(&["netns", "del", &ns.name]);
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
        // From here on, Drop removes whatever exists.
        let (h, c) = (ns.host_ip(), ns.ip());
        let peer_mac = mac.map(|m| format!(" address {m}")).unwrap_or_default();
        ip_batch(
            None,
            &format!(
                "link add {vh} type veth peer name {NS_VETH}{peer_mac} netns {name}\n\
                 addr add {h}/30 dev {vh}\n\
                 link set {vh} up\n",
                vh = ns.veth_host,
                name = ns.name
            ),
        )?;
        ip_batch(
            Some(&ns.name),
            &format!(
                "link set lo up\n\
                 addr add {c}/30 dev {NS_VETH}\n\
                 link set {NS_VETH} up\n\
                 route add default via {h}\n"
            ),
        )?;
        let out = ip(&["-n", &ns.name, "-o", "link", "show", "dev", NS_VETH])?;
        ns.mac = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(str::to_ascii_lowercase)
            .ok_or_else(|| format!("no MAC in {out:?}"))?;
        Ok(ns)
    }

    /// The namespace's name (`pfn{pid}c{n}`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host-side veth device name.
    pub fn veth_host(&self) -> &str {
        &self.veth_host
    }

    /// The `/30` of the veth pair.
    pub fn subnet(&self) -> Ipv4Prefix {
        self.subnet
    }

    /// The host side's address (the namespace's default gateway; clients connect to it).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.subnet.host(1)
    }

    /// The namespace side's address: the client's real address as the server sees it.
    pub fn ip(&self) -> Ipv4Addr {
        self.subnet.host(2)
    }

    /// MAC of the namespace's veth, lowercase with colons: what `IV_HWADDR` reports.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// A `Command` that runs `program` inside the namespace (`ip netns exec NS program`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(tool("ip"));
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args…` in the namespace, bounded by `timeout`; `Ok(stdout)` on success.
    pub fn exec(&self, program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut c = self.command(program);
        c.args(args);
        run_bounded(c, None, timeout)
    }

    /// Process ids running in the namespace.
    pub fn pids(&self) -> Vec<u32> {
        netns_pids(&self.name)
    }
}

pub(super) fn netns_pids(name: &str) -> Vec<u32> {
    ip(&["netns", "pids", name])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills the namespace's processes (bounded wait), deletes the host veth and the namespace.
pub(super) fn remove_netns(name: &str, veth_host: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids = netns_pids(name);
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        signal(&pids, "KILL");
        thread::sleep(Duration::from_millis(10));
    }
    if let Some(v) = veth_host {
        let _ = ip(&["link", "del", v]);
    }
    let _ = ip(&["netns", "del", name]);
}

impl Drop for ClientNs {
    fn drop(&mut self) {
        remove_netns(&self.name, Some(&self.veth_host));
    }
}

/// Parses `{prefix}{pid}{sep}{n}` and returns the pid.
pub(super) fn owner_pid(name: &str, prefix: &str, sep: char) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let (pid, n) = rest.split_once(sep)?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Removes what harness runs whose process is gone left behind: namespaces `pfn{pid}c{n}` (with
/// their processes), host veths `pfv{pid}c{n}`, OpenVPN processes and work directories under
/// [`BASE_DIR`]. Safe to call while other harness processes run (it only touches names whose pid
/// is dead). Returns a description of each removal.
pub fn cleanup_stale() -> Result<Vec<String>, String> {
    let mut removed = Vec::new();
    let me = std::process::id();
    let stale = |pid: u32| pid != me && !pid_alive(pid);
    // Work directories: kill their OpenVPN processes first (a server holds its tun device).
    if let Ok(entries) = fs::read_dir(BASE_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = ["srv-", "cli-", "ocs-", "occ-", "sws-", "swc-"]
                .iter()
                .find_map(|p| name.strip_prefix(p)?.split('-').next()?.parse::<u32>().ok())
            else {
                continue;
            };
            if !stale(pid) {
                continue;
            }
            // OpenVPN's, ocserv's (on the host) and charon's (the strongSwan rig) pid files.
            for (file, programs) in [
                ("openvpn.pid", &["openvpn"][..]),
                ("ocserv.pid", &["ocserv", "ocserv-main"][..]),
                ("run/charon.pid", &["charon"][..]),
            ] {
                if let Some(p) = read_pid(&entry.path().join(file)) {
                    let comm = fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                    let program = comm.trim();
                    if programs.contains(&program) && pid_alive(p) {
                        signal(&[p], "KILL");
                        removed.push(format!("{program} process {p} of {name}"));
                    }
                }
            }
            if fs::remove_dir_all(entry.path()).is_ok() {
                removed.push(format!("work dir {name}"));
            }
        }
    }
    let netns = ip(&["netns", "list"])?;
    for name in netns.lines().filter_map(|l| l.split_whitespace().next()) {
        if owner_pid(name, NS_PREFIX, 'c').is_some_and(stale) {
            let veth = name.replacen(NS_PREFIX, VETH_PREFIX, 1);
            remove_netns(name, Some(&veth));
            removed.push(format!("namespace {name}"));
        }
    }
    let links = ip(&["-o", "link", "show"])?;
    for name in links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or(""))
    {
        let veth = owner_pid(name, VETH_PREFIX, 'c').is_some_and(stale);
        let tun = owner_pid(name, TUN_PREFIX, 's').is_some_and(stale);
        if (veth || tun) && ip(&["link", "del", name]).is_ok() {
            removed.push(format!("link {name}"));
        }
    }
    Ok(removed)
}
