//! End-to-end test harness: a real OpenVPN 2.6 server on the host and real OpenVPN clients, each
//! in its own network namespace joined to the host by a veth pair.
//!
//! Self-contained (std + `tempfile`), meant to be included as a module of an integration-test crate
//! (`tests/it/common/openvpn.rs`). Needs root, `/dev/net/tun`, `ip netns`, and the `openvpn`,
//! `openssl`, `ip`, `ping`, `setsid`, `bash` and `timeout` programs; [`require_tools`] checks all of
//! that, [`available`] turns the answer into "skip" or "fail" (with `PFORTE_E2E=1`).
//!
//! ```ignore
//! if !openvpn::available() { return; }
//! let work = tempfile::tempdir().unwrap();
//! let pki = Pki::create(work.path()).unwrap();
//! let server = Server::start(&pki, ServerOptions::default()).unwrap();
//! let ns = ClientNs::create().unwrap();
//! let cert = pki.client("alice", "alice").unwrap();
//! let mut client = Client::connect(&ns, &cert, &server, ClientOptions::default()).unwrap();
//! client.wait_connected(Duration::from_secs(10)).unwrap();
//! client.ping(server.tunnel_ip(), 2).unwrap();
//! ```
//!
//! Address plan (nothing here is routed by a normal host; every allocation is also checked
//! against `ip -4 route` and skipped when it overlaps):
//! - veth pairs: one `/30` per namespace from `172.31.0.0/16`, host side `.1`, namespace `.2`;
//! - tunnel nets: one `/24` per server from `10.213.0.0/16` unless the caller gives one.
//!
//! Allocations are claimed with `flock` on files under [`BASE_DIR`]`/claims`, so parallel tests in
//! one process and parallel test processes never share a subnet, and a crashed process frees its
//! claims automatically. Names carry the process id and a counter (`pfn{pid}c{n}` namespace,
//! `pfv{pid}c{n}` host veth, `pft{pid}s{n}` server tun), so [`cleanup_stale`] can find what a dead
//! process left behind. Every process, namespace and veth is removed on `Drop`, also when a test
//! panics; only a killed test process (SIGKILL) leaves debris, which [`cleanup_stale`] removes.
//!
//! Every wait is bounded in time. Scripts run by OpenVPN get no `PATH`: use absolute paths.
//!
//! Behaviour of OpenVPN 2.6.14 observed through this harness (worth knowing when writing tests):
//! - A `client-connect` refusal reaches the client as AUTH_FAILED ~1.2 s after start; with
//!   `auth-retry none` the client then exits (~2.4 s). A management `client-deny` (like
//!   `client-auth`) arrives in ~25 ms or ~1.0 s, depending on whether it beat the end of the TLS
//!   handshake (the push-timer trap in VPN-HOOKS.md).
//! - A `tls-verify` refusal is silent on the client (it waits out `hand-window`, 60 s, then
//!   retries): look for `VERIFY SCRIPT ERROR` in the server log. The CA depth (1) is checked first.
//! - `management-client-auth` without `auth-user-pass-optional` on the server rejects
//!   certificate-only clients ("Auth Username/Password was not provided by peer", a TLS error,
//!   no CONNECT notification). An allowed connect via `client-auth` takes ~1.0–1.3 s (push timer).
//! - `explicit-exit-notify 1` is sent as a control-channel `EXIT` (cc-exit); the server logs
//!   "CC-EEN exit message received" at once and frees the instance 5 s later ("Delayed exit").
//!   A gracefully stopped client lingers ~1.1 s, hence [`Client::stop_fast`] for `Drop`.
//! - `tls_serial_0` is decimal and for random 159-bit serials does not fit in a `u128`.
//! - A test process killed with SIGKILL leaves its OpenVPN processes running (and zombies until
//!   init reaps them); call [`cleanup_stale`] (as [`available`] does once per process).
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Directory holding the harness's work directories and claim files (fixed, so that
/// [`cleanup_stale`] of any later process finds what a crashed one left).
pub const BASE_DIR: &str = "/tmp/pforte-ovpn-harness";

/// The range the veth `/30` subnets come from.
pub const VETH_RANGE: Ipv4Prefix = Ipv4Prefix {
    addr: Ipv4Addr::new(172, 31, 0, 0),
    len: 16,
};

/// The range the default tunnel `/24` nets come from.
pub const TUNNEL_RANGE: Ipv4Prefix = Ipv4Prefix {
    addr: Ipv4Addr::new(10, 213, 0, 0),
    len: 16,
};

/// Name of the veth end inside each namespace (its MAC is what `IV_HWADDR` reports).
pub const NS_VETH: &str = "veth0";

/// Name of the client's tun device inside its namespace.
pub const CLIENT_TUN: &str = "tun0";

const NS_PREFIX: &str = "pfn";
const VETH_PREFIX: &str = "pfv";
const TUN_PREFIX: &str = "pft";
const POLL: Duration = Duration::from_millis(5);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The command that installs everything the harness needs on Debian.
pub const INSTALL_HINT: &str = "apt-get install -y openvpn openssl iproute2 iputils-ping";

// ---------------------------------------------------------------------------------------------
// Environment checks
// ---------------------------------------------------------------------------------------------

/// Checks that end-to-end tests can run here: the tools exist (`openvpn` 2.6+, `openssl`, `ip`,
/// `ping`, `setsid`, `bash`, `timeout`), we are root with `CAP_NET_ADMIN` and `CAP_SYS_ADMIN`, and
/// `/dev/net/tun` exists. The error names every problem and the install command.
pub fn require_tools() -> Result<(), String> {
    let mut problems = Vec::new();
    for t in [
        "openvpn", "openssl", "ip", "ping", "setsid", "bash", "timeout",
    ] {
        if find_tool(t).is_none() {
            problems.push(format!("`{t}` not found"));
        }
    }
    if let Some(ovpn) = find_tool("openvpn") {
        match Command::new(ovpn).arg("--version").output() {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let version = text.split_whitespace().nth(1).unwrap_or("");
                let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
                let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
                if (major, minor) < (2, 6) {
                    problems.push(format!("openvpn {version} found, 2.6 or later needed"));
                }
            }
            Err(e) => problems.push(format!("`openvpn --version` failed: {e}")),
        }
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    if field("Uid:").get(1).map(String::as_str) != Some("0") {
        problems.push("not running as root".to_owned());
    }
    let cap_eff = field("CapEff:")
        .first()
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(0);
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    if cap_eff & CAP_NET_ADMIN == 0 || cap_eff & CAP_SYS_ADMIN == 0 {
        problems.push("CAP_NET_ADMIN and CAP_SYS_ADMIN needed (network namespaces)".to_owned());
    }
    if !Path::new("/dev/net/tun").exists() {
        problems.push("/dev/net/tun missing".to_owned());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "OpenVPN end-to-end tests cannot run: {}. Install with `{INSTALL_HINT}` and run as root.",
            problems.join("; ")
        ))
    }
}

/// `true` when the end-to-end tests must run (environment `PFORTE_E2E=1`).
pub fn e2e_required() -> bool {
    std::env::var("PFORTE_E2E").is_ok_and(|v| v == "1")
}

/// Gate for a test: `true` when [`require_tools`] passes. Otherwise panics with its message when
/// [`e2e_required`], else prints a skip note to stderr and returns `false`.
/// Also runs [`cleanup_stale`] once per process.
pub fn available() -> bool {
    static CLEANED: std::sync::Once = std::sync::Once::new();
    match require_tools() {
        Ok(()) => {
            CLEANED.call_once(|| {
                let _ = cleanup_stale();
            });
            true
        }
        Err(e) if e2e_required() => panic!("PFORTE_E2E=1 but {e}"),
        Err(e) => {
            eprintln!("skipping OpenVPN end-to-end test: {e}");
            false
        }
    }
}

/// Finds a program in `PATH`, then in the sbin/bin directories (root's tools may be outside a
/// restricted `PATH`).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| PathBuf::from(name))
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

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

fn mask(len: u8) -> u32 {
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

/// Writes an executable (0755) script. Scripts run by OpenVPN get no `PATH`: use absolute paths
/// (`/usr/bin/env`, `/bin/cat`) inside. To rule out `ETXTBSY` ("Text file busy") when another
/// thread forks while the file is being written, reference it as `"/bin/sh /path/script"` (quoted)
/// in the OpenVPN config rather than executing the file directly.
pub fn write_script(path: &Path, body: &str) -> Result<PathBuf, String> {
    fs::write(path, body).map_err(|e| format!("write {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    Ok(path.to_path_buf())
}

fn next_id() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn base_dir() -> Result<PathBuf, String> {
    let dir = PathBuf::from(BASE_DIR);
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn work_dir(kind: &str, n: u32) -> Result<tempfile::TempDir, String> {
    tempfile::Builder::new()
        .prefix(&format!("{kind}-{}-{n}-", std::process::id()))
        .tempdir_in(base_dir()?)
        .map_err(|e| format!("create work dir: {e}"))
}

fn cmd_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion (bounded by `timeout`: killed after it) with optional stdin;
/// `Ok(stdout)` on exit status 0, else `Err` with the command line, status and output.
fn run_bounded(mut cmd: Command, stdin: Option<&str>, timeout: Duration) -> Result<String, String> {
    let line = cmd_line(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("`{line}`: cannot start: {e}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(input.as_bytes());
    }
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                // The readers may block on grandchildren holding the pipes: leave them.
                return Err(format!("`{line}`: timed out after {timeout:?}"));
            }
        }
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if status.success() {
        Ok(out)
    } else {
        Err(format!(
            "`{line}`: {status}; stdout: {}; stderr: {}",
            out.trim(),
            err.trim()
        ))
    }
}

fn run(cmd: Command) -> Result<String, String> {
    run_bounded(cmd, None, Duration::from_secs(20))
}

fn ip(args: &[&str]) -> Result<String, String> {
    let mut c = Command::new(tool("ip"));
    c.args(args);
    run(c)
}

fn ip_batch(netns: Option<&str>, batch: &str) -> Result<String, String> {
    let mut c = Command::new(tool("ip"));
    if let Some(ns) = netns {
        c.args(["-n", ns]);
    }
    c.args(["-batch", "-"]);
    run_bounded(c, Some(batch), Duration::from_secs(20))
}

/// Whether `pid` names a live (non-zombie) process.
fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ')'.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

fn signal(pids: &[u32], sig: &str) {
    if pids.is_empty() {
        return;
    }
    // The shell's builtin `kill` (no procps needed, no unsafe FFI).
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let mut c = Command::new("/bin/sh");
    c.args([
        "-c",
        &format!("kill -s {sig} {} 2>/dev/null; true", list.join(" ")),
    ]);
    let _ = run_bounded(c, None, Duration::from_secs(5));
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// SIGTERM the process (pid file, else the child), wait up to `grace`, then SIGKILL; reaps the
/// child. Returns how long it took.
fn stop_process(child: &mut Option<Child>, pid_file: &Path, grace: Duration) -> Duration {
    let t0 = Instant::now();
    let Some(mut ch) = child.take() else {
        return t0.elapsed();
    };
    let mut pids = vec![ch.id()];
    if let Some(p) = read_pid(pid_file).filter(|p| *p != ch.id()) {
        pids.push(p);
    }
    let done = |ch: &mut Child, pids: &[u32]| {
        matches!(ch.try_wait(), Ok(Some(_)) | Err(_)) && pids[1..].iter().all(|p| !pid_alive(*p))
    };
    if !done(&mut ch, &pids) {
        signal(&pids, "TERM");
        let deadline = Instant::now() + grace;
        while !done(&mut ch, &pids) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        if !done(&mut ch, &pids) {
            signal(&pids, "KILL");
            let _ = ch.kill();
        }
    }
    let _ = ch.wait();
    t0.elapsed()
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Polls `path` until `needle` occurs at least `count` times (bounded by `timeout`). `abort` is
/// checked on each round with the current text and may end the wait with an error.
fn wait_in_file(
    path: &Path,
    needle: &str,
    count: usize,
    timeout: Duration,
    started: Instant,
    mut abort: impl FnMut(&str) -> Option<String>,
) -> Result<Duration, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = read_lossy(path);
        if text.matches(needle).count() >= count.max(1) {
            return Ok(started.elapsed());
        }
        if let Some(why) = abort(&text) {
            return Err(format!(
                "{why} (waiting for {needle:?} in {}); log:\n{text}",
                path.display()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "timeout after {timeout:?} waiting for {needle:?} in {}; log:\n{text}",
                path.display()
            ));
        }
        thread::sleep(POLL);
    }
}

/// IPv4 prefixes in the host's main routing table (the default route excluded).
fn host_routes() -> Result<Vec<Ipv4Prefix>, String> {
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

// ---------------------------------------------------------------------------------------------
// Claims: cross-process, crash-safe reservations (flock on a file that is never deleted)
// ---------------------------------------------------------------------------------------------

/// A reservation held by an exclusive `flock`; the kernel releases it when the file is closed or
/// the process dies. The files are never deleted (deleting a lock file races with lockers).
#[derive(Debug)]
struct Claim {
    _file: File,
}

impl Claim {
    fn try_take(key: &str) -> Result<Option<Claim>, String> {
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
fn claim_subnet(kind: &str, range: Ipv4Prefix, len: u8) -> Result<(Ipv4Prefix, Claim), String> {
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

// ---------------------------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------------------------

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// A throw-away PKI made with the `openssl` CLI: EC P-256 keys, a CA, one server certificate
/// (`extendedKeyUsage=serverAuth`) and any number of client certificates (`clientAuth`).
/// Certificates have random serials (as real CAs do: up to 20 bytes, too big for a `u64`).
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    cnf: PathBuf,
    /// CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// CA private key (PEM).
    pub ca_key: PathBuf,
    /// Server certificate (PEM), CN `pforte-test-server`.
    pub server_cert: PathBuf,
    /// Server private key (PEM).
    pub server_key: PathBuf,
}

/// A client certificate and the values OpenVPN will report for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    /// File base name given to [`Pki::client`].
    pub name: String,
    /// Subject common name (`X509_0_CN`, `common_name`).
    pub cn: String,
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, unencrypted).
    pub key: PathBuf,
    /// SHA-256 fingerprint as OpenVPN's `tls_digest_sha256_0`: lowercase hex with colons.
    pub sha256: String,
    /// Serial in decimal, as OpenVPN's `tls_serial_0`.
    pub serial: String,
    /// Serial as OpenVPN's `tls_serial_hex_0`: lowercase hex bytes with colons.
    pub serial_hex: String,
}

impl Pki {
    /// Creates the CA and the server certificate in `dir` (created if missing). ~30 ms.
    pub fn create(dir: &Path) -> Result<Pki, String> {
        fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let cnf = dir.join("openssl.cnf");
        fs::write(&cnf, OPENSSL_CNF).map_err(|e| format!("write {}: {e}", cnf.display()))?;
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            cnf,
        };
        pki.make_cert(
            "/CN=pforte test CA",
            "v3_ca",
            &pki.ca_key,
            &pki.ca_cert,
            false,
        )?;
        pki.make_cert(
            "/CN=pforte-test-server",
            "server",
            &pki.server_key,
            &pki.server_cert,
            true,
        )?;
        Ok(pki)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a client certificate with common name `cn` into `<dir>/<name>.crt` / `.key`.
    /// `cn` must not contain `/` or `=` (it goes into `openssl -subj`). ~20 ms.
    pub fn client(&self, name: &str, cn: &str) -> Result<ClientCert, String> {
        if cn.contains(['/', '=']) || name.contains('/') {
            return Err(format!("unsupported client name {name:?} / cn {cn:?}"));
        }
        let cert = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        self.make_cert(&format!("/CN={cn}"), "client", &key, &cert, true)?;
        let mut c = Command::new(tool("openssl"));
        c.args([
            "x509",
            "-noout",
            "-serial",
            "-fingerprint",
            "-sha256",
            "-in",
        ])
        .arg(&cert);
        let out = run(c)?;
        let value = |prefix: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(|v| v.trim().to_ascii_lowercase())
                .ok_or_else(|| format!("no {prefix:?} in openssl output: {out}"))
        };
        let serial_plain = value("serial=")?;
        let sha256 = value("sha256 Fingerprint=")?;
        let serial_hex = serial_plain
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(":");
        Ok(ClientCert {
            name: name.to_owned(),
            cn: cn.to_owned(),
            cert,
            key,
            sha256,
            serial: hex_to_decimal(&serial_plain)?,
            serial_hex,
        })
    }

    fn make_cert(
        &self,
        subj: &str,
        ext: &str,
        key: &Path,
        cert: &Path,
        signed: bool,
    ) -> Result<(), String> {
        let mut c = Command::new(tool("openssl"));
        c.args(["req", "-config"]).arg(&self.cnf);
        c.args([
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "3650",
        ]);
        c.args(["-subj", subj, "-extensions", ext, "-keyout"])
            .arg(key)
            .arg("-out")
            .arg(cert);
        if signed {
            c.arg("-CA")
                .arg(&self.ca_cert)
                .arg("-CAkey")
                .arg(&self.ca_key);
        }
        run(c).map(drop)
    }
}

/// Converts a hex string (any length) to decimal.
fn hex_to_decimal(hex: &str) -> Result<String, String> {
    // Little-endian base-10^9 limbs.
    let mut limbs: Vec<u64> = vec![0];
    for ch in hex.chars().filter(|c| *c != ':') {
        let d = u64::from(ch.to_digit(16).ok_or_else(|| format!("bad hex {hex:?}"))?);
        let mut carry = d;
        for limb in limbs.iter_mut() {
            let v = *limb * 16 + carry;
            *limb = v % 1_000_000_000;
            carry = v / 1_000_000_000;
        }
        if carry > 0 {
            limbs.push(carry);
        }
    }
    let mut s = limbs.last().copied().unwrap_or(0).to_string();
    for limb in limbs.iter().rev().skip(1) {
        s.push_str(&format!("{limb:09}"));
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// Options for [`Server::start`].
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// UDP port; `None` picks a free one (and retries with another if the bind races).
    pub port: Option<u16>,
    /// Tunnel net for `server <net> <mask>` (server address `.1`); `None` allocates a free `/24`
    /// from [`TUNNEL_RANGE`]. A given net is claimed too; it must not overlap a host route.
    pub tunnel_net: Option<Ipv4Prefix>,
    /// Adds `management <dir>/mgmt.sock unix` (see [`Server::management_socket`]).
    pub management: bool,
    /// Extra config lines, verbatim, after the harness's own (`tls-verify …`, `client-connect …`,
    /// `client-disconnect …`, `setenv …`, `management-client-auth`, `duplicate-cn`, …).
    pub extra: Vec<String>,
    /// Bound on waiting for "Initialization Sequence Completed".
    pub ready_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            port: None,
            tunnel_net: None,
            management: false,
            extra: Vec::new(),
            ready_timeout: Duration::from_secs(10),
        }
    }
}

/// A real OpenVPN server (UDP, `dev-type tun`, `topology subnet`, `disable-dco`) running on the
/// host as a child process. Stopped on drop.
#[derive(Debug)]
pub struct Server {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    tunnel_net: Ipv4Prefix,
    tun_name: String,
    config: PathBuf,
    log: PathBuf,
    pid_file: PathBuf,
    mgmt: Option<PathBuf>,
    ca_cert: PathBuf,
    startup: Duration,
    _claim: Option<Claim>,
}

impl Server {
    /// Writes the config into a fresh work directory under [`BASE_DIR`], starts
    /// `openvpn --config … --writepid …` and waits for "Initialization Sequence Completed".
    /// On failure the error carries the log.
    pub fn start(pki: &Pki, opts: ServerOptions) -> Result<Server, String> {
        let (tunnel_net, claim) = match opts.tunnel_net {
            None => claim_subnet("tun", TUNNEL_RANGE, 24)?,
            Some(net) => {
                if let Some(r) = host_routes()?.iter().find(|r| r.overlaps(&net)) {
                    return Err(format!("tunnel net {net} overlaps host route {r}"));
                }
                let claim = Claim::try_take(&format!("tun-{}-{}", net.addr, net.len))?
                    .ok_or_else(|| format!("tunnel net {net} is in use by another test server"))?;
                (net, claim)
            }
        };
        let attempts = if opts.port.is_some() { 1 } else { 3 };
        let mut last_err = String::new();
        for _ in 0..attempts {
            let port = match opts.port {
                Some(p) => p,
                None => free_udp_port()?,
            };
            match Server::start_once(pki, &opts, port, tunnel_net) {
                Ok(mut s) => {
                    s._claim = Some(claim);
                    return Ok(s);
                }
                Err((e, retry)) => {
                    last_err = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(last_err)
    }

    // Err((message, worth retrying with another port)).
    fn start_once(
        pki: &Pki,
        opts: &ServerOptions,
        port: u16,
        net: Ipv4Prefix,
    ) -> Result<Server, (String, bool)> {
        let fail = |e: String| (e, false);
        let n = next_id();
        let dir = work_dir("srv", n).map_err(fail)?;
        let tun_name = format!("{TUN_PREFIX}{}s{n}", std::process::id());
        debug_assert!(tun_name.len() <= 15);
        let d = dir.path();
        let tmp = d.join("tmp");
        fs::create_dir_all(&tmp).map_err(|e| fail(format!("create {}: {e}", tmp.display())))?;
        let log = d.join("openvpn.log");
        let pid_file = d.join("openvpn.pid");
        let config = d.join("server.conf");
        let mgmt = opts.management.then(|| d.join("mgmt.sock"));
        let mut conf = vec![
            format!("port {port}"),
            "proto udp".to_owned(),
            format!("dev {tun_name}"),
            "dev-type tun".to_owned(),
            "topology subnet".to_owned(),
            format!("server {} {}", net.addr, net.netmask()),
            format!("ca {}", pki.ca_cert.display()),
            format!("cert {}", pki.server_cert.display()),
            format!("key {}", pki.server_key.display()),
            "dh none".to_owned(),
            "disable-dco".to_owned(),
            "keepalive 2 10".to_owned(),
            format!("tmp-dir {}", tmp.display()),
            "verb 4".to_owned(),
            format!("log {}", log.display()),
            "script-security 2".to_owned(),
        ];
        if let Some(m) = &mgmt {
            conf.push(format!("management {} unix", m.display()));
        }
        conf.extend(opts.extra.iter().cloned());
        let mut text = conf.join("\n");
        text.push('\n');
        fs::write(&config, text).map_err(|e| fail(format!("write {}: {e}", config.display())))?;
        let out = File::create(d.join("stdout.log"))
            .map_err(|e| fail(format!("create stdout.log: {e}")))?;
        let err = out.try_clone().map_err(|e| fail(e.to_string()))?;
        let t0 = Instant::now();
        let child = Command::new(tool("openvpn"))
            .current_dir(d)
            .arg("--config")
            .arg(&config)
            .arg("--writepid")
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| fail(format!("start openvpn: {e}")))?;
        let mut server = Server {
            dir,
            child: Some(child),
            port,
            tunnel_net: net,
            tun_name,
            config,
            log,
            pid_file,
            mgmt,
            ca_cert: pki.ca_cert.clone(),
            startup: Duration::ZERO,
            _claim: None,
        };
        let res = {
            let child = server.child.as_mut().expect("just set");
            let stdout = server.dir.path().join("stdout.log");
            wait_in_file(
                &server.log,
                "Initialization Sequence Completed",
                1,
                opts.ready_timeout,
                t0,
                |_| match child.try_wait() {
                    Ok(Some(st)) => Some(format!(
                        "openvpn server exited ({st}); stdout/stderr: {}",
                        read_lossy(&stdout).trim()
                    )),
                    _ => None,
                },
            )
        };
        match res {
            Ok(d) => {
                server.startup = d;
                Ok(server)
            }
            Err(e) => {
                let retry = e.contains("Address already in use");
                server.stop();
                Err((format!("OpenVPN server did not start: {e}"), retry))
            }
        }
    }

    /// The UDP port it listens on (all host addresses).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The tunnel net (`server` directive).
    pub fn tunnel_net(&self) -> Ipv4Prefix {
        self.tunnel_net
    }

    /// The server's own tunnel address (`.1` of the tunnel net), on the host's tun device.
    pub fn tunnel_ip(&self) -> Ipv4Addr {
        self.tunnel_net.host(1)
    }

    /// Name of the server's tun device on the host (`pft{pid}s{n}`), for
    /// `/sys/class/net/<tun>/statistics`.
    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }

    /// The server's work directory (config, log, pid file, `tmp/`, `mgmt.sock`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file written for this server.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The management socket when [`ServerOptions::management`] was set.
    pub fn management_socket(&self) -> Option<&Path> {
        self.mgmt.as_deref()
    }

    /// The CA certificate clients must trust.
    pub fn ca_cert(&self) -> &Path {
        &self.ca_cert
    }

    /// The tun device's `(rx_bytes, tx_bytes)` from `/sys/class/net/<tun>/statistics`: whole IP
    /// packets from (rx) and to (tx) all clients together.
    pub fn tun_bytes(&self) -> Result<(u64, u64), String> {
        let read = |what: &str| {
            let path = format!("/sys/class/net/{}/statistics/{what}", self.tun_name);
            fs::read_to_string(&path)
                .map_err(|e| format!("read {path}: {e}"))?
                .trim()
                .parse::<u64>()
                .map_err(|e| format!("parse {path}: {e}"))
        };
        Ok((read("rx_bytes")?, read("tx_bytes")?))
    }

    /// Time from spawning the process to "Initialization Sequence Completed".
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The process id (from the pid file, else the child), while running.
    pub fn pid(&self) -> Option<u32> {
        let child = self.child.as_ref()?;
        Some(read_pid(&self.pid_file).unwrap_or(child.id()))
    }

    /// Whether the server process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits until `needle` occurs at least `count` times in the log; returns the time waited.
    pub fn wait_log(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Duration, String> {
        wait_in_file(&self.log, needle, count, timeout, Instant::now(), |_| None)
    }

    /// SIGTERM via the pid file, SIGKILL after 5 s; idempotent. Returns how long it took.
    pub fn stop(&mut self) -> Duration {
        stop_process(&mut self.child, &self.pid_file, STOP_GRACE)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A UDP port that was free a moment ago (bind to port 0, read it, release it).
pub fn free_udp_port() -> Result<u16, String> {
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind udp: {e}"))?;
    sock.local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Client namespace
// ---------------------------------------------------------------------------------------------

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

fn netns_pids(name: &str) -> Vec<u32> {
    ip(&["netns", "pids", name])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills the namespace's processes (bounded wait), deletes the host veth and the namespace.
fn remove_netns(name: &str, veth_host: Option<&str>) {
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

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// Options for [`Client::connect`].
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// Extra config lines, verbatim (`setenv IV_GUI_VER …`, `setenv UV_…`, `tls-version-min …`).
    pub extra: Vec<String>,
    /// Username and password: written to a file and used with `auth-user-pass <file>`.
    pub auth_user_pass: Option<(String, String)>,
}

/// A real OpenVPN client running inside a [`ClientNs`] (`ip netns exec NS setsid openvpn …`).
/// Uses `auth-retry none`, so a refusal (AUTH_FAILED) ends the process. Stopped on drop.
#[derive(Debug)]
pub struct Client {
    dir: tempfile::TempDir,
    child: Option<Child>,
    ns: String,
    config: PathBuf,
    log: PathBuf,
    pid_file: PathBuf,
    started: Instant,
    server_tunnel_ip: Ipv4Addr,
    server_log: PathBuf,
    ns_ip: Ipv4Addr,
}

impl Client {
    /// Writes the client config and starts the client in `ns` against `server` (via the
    /// namespace's host-side veth address); returns at once: use [`Client::wait_connected`] or
    /// [`Client::wait_refused`].
    pub fn connect(
        ns: &ClientNs,
        cert: &ClientCert,
        server: &Server,
        opts: ClientOptions,
    ) -> Result<Client, String> {
        let n = next_id();
        let dir = work_dir("cli", n)?;
        let d = dir.path();
        let log = d.join("openvpn.log");
        let pid_file = d.join("openvpn.pid");
        let config = d.join("client.conf");
        let mut conf = vec![
            "client".to_owned(),
            format!("dev {CLIENT_TUN}"),
            "dev-type tun".to_owned(),
            "proto udp".to_owned(),
            format!("remote {} {}", ns.host_ip(), server.port()),
            "nobind".to_owned(),
            "remote-cert-tls server".to_owned(),
            "push-peer-info".to_owned(),
            "explicit-exit-notify 1".to_owned(),
            "disable-dco".to_owned(),
            "connect-retry 1".to_owned(),
            "auth-retry none".to_owned(),
            "verb 4".to_owned(),
            format!("log {}", log.display()),
            format!("ca {}", server.ca_cert().display()),
            format!("cert {}", cert.cert.display()),
            format!("key {}", cert.key.display()),
        ];
        if let Some((user, pass)) = &opts.auth_user_pass {
            let f = d.join("auth.txt");
            fs::write(&f, format!("{user}\n{pass}\n"))
                .map_err(|e| format!("write {}: {e}", f.display()))?;
            conf.push(format!("auth-user-pass {}", f.display()));
            conf.push("auth-nocache".to_owned());
        }
        conf.extend(opts.extra.iter().cloned());
        let mut text = conf.join("\n");
        text.push('\n');
        fs::write(&config, text).map_err(|e| format!("write {}: {e}", config.display()))?;
        let out =
            File::create(d.join("stdout.log")).map_err(|e| format!("create stdout.log: {e}"))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let started = Instant::now();
        let child = Command::new(tool("ip"))
            .args(["netns", "exec", ns.name()])
            .arg(tool("setsid"))
            .arg(tool("openvpn"))
            .arg("--config")
            .arg(&config)
            .arg("--writepid")
            .arg(&pid_file)
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start openvpn client: {e}"))?;
        Ok(Client {
            dir,
            child: Some(child),
            ns: ns.name().to_owned(),
            config,
            log,
            pid_file,
            started,
            server_tunnel_ip: server.tunnel_ip(),
            server_log: server.log_path().to_path_buf(),
            ns_ip: ns.ip(),
        })
    }

    /// Waits for "Initialization Sequence Completed"; returns the time since the client was
    /// started. Fails early on AUTH_FAILED or when the process exits.
    pub fn wait_connected(&mut self, timeout: Duration) -> Result<Duration, String> {
        let mut child = self.child.as_mut();
        wait_in_file(
            &self.log,
            "Initialization Sequence Completed",
            1,
            timeout,
            self.started,
            |text| {
                if text.contains("AUTH_FAILED") {
                    return Some("client refused (AUTH_FAILED)".to_owned());
                }
                exited(&mut child)
            },
        )
    }

    /// Waits for AUTH_FAILED in the log (a refusal by client-connect, auth script or management
    /// `client-deny`); returns the time since start. Fails early if the client connects instead.
    /// A `tls-verify` refusal gives no AUTH_FAILED and the client logs nothing about it until its
    /// `hand-window` (60 s) ends; it then retries for ever: wait for `"VERIFY SCRIPT ERROR"` in
    /// the server's log ([`Server::wait_log`]) instead.
    pub fn wait_refused(&self, timeout: Duration) -> Result<Duration, String> {
        wait_in_file(&self.log, "AUTH_FAILED", 1, timeout, self.started, |text| {
            text.contains("Initialization Sequence Completed")
                .then(|| "client connected, refusal expected".to_owned())
        })
    }

    /// The reason after `AUTH_FAILED,` sent by the server, if any (e.g. management `client-deny`'s
    /// client reason); `Some("")` for a bare AUTH_FAILED.
    pub fn auth_failed_message(&self) -> Option<String> {
        let log = self.log();
        let line = log.lines().find(|l| l.contains("AUTH_FAILED"))?;
        let rest = &line[line.find("AUTH_FAILED")? + "AUTH_FAILED".len()..];
        Some(rest.strip_prefix(',').unwrap_or("").trim().to_owned())
    }

    /// Waits until `needle` occurs at least `count` times in the log; returns the time since start.
    pub fn wait_log(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Duration, String> {
        wait_in_file(&self.log, needle, count, timeout, self.started, |_| None)
    }

    /// Waits for the process to end by itself (e.g. after a refusal or `client-kill … HALT`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.as_mut().map(|c| c.try_wait()) {
                None | Some(Ok(Some(_))) | Some(Err(_)) => return Ok(self.started.elapsed()),
                Some(Ok(None)) if Instant::now() < deadline => thread::sleep(POLL),
                Some(Ok(None)) => {
                    return Err(format!(
                        "client still running after {timeout:?}; log:\n{}",
                        self.log()
                    ));
                }
            }
        }
    }

    /// Whether the client process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The client's tunnel address, read from its tun device in the namespace.
    pub fn tunnel_ip(&self) -> Result<Ipv4Addr, String> {
        let out = ip(&[
            "-n", &self.ns, "-4", "-o", "addr", "show", "dev", CLIENT_TUN,
        ])?;
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("no IPv4 address on {CLIENT_TUN} in {}: {out:?}", self.ns))
    }

    /// The server's tunnel address (`.1`), the natural ping target.
    pub fn server_tunnel_ip(&self) -> Ipv4Addr {
        self.server_tunnel_ip
    }

    /// Pings `dst` from the namespace `count` times (0.2 s apart); `Ok(output)` when all `count`
    /// replies came (ping's exit status 0), bounded by `count / 5 + 5` seconds.
    pub fn ping(&self, dst: Ipv4Addr, count: u32) -> Result<String, String> {
        let deadline = (count / 5 + 5).to_string();
        let mut c = Command::new(tool("ip"));
        c.args(["netns", "exec", &self.ns]).arg(tool("ping")).args([
            "-n",
            "-q",
            "-i",
            "0.2",
            "-W",
            "2",
            "-w",
            &deadline,
            "-c",
            &count.to_string(),
            &dst.to_string(),
        ]);
        run_bounded(c, None, Duration::from_secs(u64::from(count / 5) + 10))
    }

    /// Pushes `bytes` of zeros through the tunnel over TCP, from the namespace to a listener the
    /// harness binds on the server's tunnel address on the host. Returns the bytes received
    /// (equal to `bytes` on success). Bounded by 30 s.
    pub fn transfer(&self, bytes: u64) -> Result<u64, String> {
        let listener = TcpListener::bind((self.server_tunnel_ip, 0))
            .map_err(|e| format!("bind on tunnel ip: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let receiver = thread::spawn(move || -> Result<u64, String> {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        thread::sleep(POLL)
                    }
                    Err(e) => return Err(format!("accept on {addr}: {e}")),
                }
            };
            stream.set_nonblocking(false).map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            let mut total = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n as u64,
                    Err(e) => return Err(format!("read after {total} bytes: {e}")),
                }
                if Instant::now() >= deadline {
                    return Err(format!("transfer timed out after {total} bytes"));
                }
            }
        });
        let SocketAddr::V4(a) = addr else {
            return Err("listener not IPv4".to_owned());
        };
        let script = format!(
            "exec 3>/dev/tcp/{}/{} && head -c {bytes} /dev/zero >&3",
            a.ip(),
            a.port()
        );
        let mut c = Command::new(tool("ip"));
        c.args(["netns", "exec", &self.ns])
            .arg(tool("timeout"))
            .arg("25")
            .arg(tool("bash"))
            .args(["-c", &script]);
        let sent = run_bounded(c, None, Duration::from_secs(30));
        let received = receiver
            .join()
            .map_err(|_| "receiver thread panicked".to_owned())?;
        sent?;
        let received = received?;
        if received == bytes {
            Ok(received)
        } else {
            Err(format!("sent {bytes} bytes, received {received}"))
        }
    }

    /// The client's work directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file written for this client.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The OpenVPN process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        let child = self.child.as_ref()?;
        Some(read_pid(&self.pid_file).unwrap_or(child.id()))
    }

    /// SIGTERM and wait for the process to end by itself (SIGKILL after 5 s); idempotent. A
    /// connected client sends its exit notification (`explicit-exit-notify 1`) at once, then
    /// lingers ~1.1 s before it exits. Returns how long it took. See [`Client::stop_fast`].
    pub fn stop(&mut self) -> Duration {
        stop_process(&mut self.child, &self.pid_file, STOP_GRACE)
    }

    /// SIGTERM, then SIGKILL as soon as the server has logged the client's exit notification
    /// ("CC-EEN exit message received", bounded by 1 s), or after 200 ms for a client that is not
    /// connected. The server sees the same as with [`Client::stop`] (it frees the client instance
    /// and runs client-disconnect ~5 s later), in ~5 ms instead of ~1.1 s. Used by `Drop`.
    pub fn stop_fast(&mut self) -> Duration {
        let t0 = Instant::now();
        if !self.is_running() {
            return stop_process(&mut self.child, &self.pid_file, Duration::ZERO);
        }
        if !self.log().contains("Initialization Sequence Completed") {
            stop_process(&mut self.child, &self.pid_file, Duration::from_millis(200));
            return t0.elapsed();
        }
        let me = format!("/{}:", self.ns_ip);
        let notified = |log: &Path| {
            read_lossy(log)
                .lines()
                .filter(|l| l.contains(&me) && l.contains("CC-EEN exit message received"))
                .count()
        };
        let before = notified(&self.server_log);
        if let Some(pid) = self.pid() {
            signal(&[pid], "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while notified(&self.server_log) <= before && self.is_running() && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(2));
        }
        stop_process(&mut self.child, &self.pid_file, Duration::ZERO);
        t0.elapsed()
    }

    /// SIGKILL only (a crash or a lost network: no exit notification). The server notices at its
    /// ping-restart (`keepalive 2 10` gives the server 20 s) and then runs client-disconnect.
    pub fn kill(&mut self) {
        if let Some(mut ch) = self.child.take() {
            let mut pids = vec![ch.id()];
            pids.extend(read_pid(&self.pid_file).filter(|p| *p != ch.id()));
            signal(&pids, "KILL");
            let _ = ch.kill();
            let _ = ch.wait();
        }
    }
}

fn exited(child: &mut Option<&mut Child>) -> Option<String> {
    match child.as_mut().map(|c| c.try_wait()) {
        Some(Ok(Some(st))) => Some(format!("client exited ({st})")),
        _ => None,
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop_fast();
    }
}

// ---------------------------------------------------------------------------------------------
// Management interface
// ---------------------------------------------------------------------------------------------

/// A client of OpenVPN's management interface on a unix socket. OpenVPN serves one management
/// client at a time: a second connection waits silently until the first closes.
#[derive(Debug)]
pub struct Management {
    stream: UnixStream,
    pending: Vec<u8>,
    notifications: VecDeque<String>,
    timeout: Duration,
}

/// One `CLIENT_LIST` row of `status 3`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusClient {
    /// Certificate common name.
    pub common_name: String,
    /// Real address `ip:port`.
    pub real_address: String,
    /// Tunnel address.
    pub virtual_address: String,
    /// Link bytes received from the client.
    pub bytes_received: u64,
    /// Link bytes sent to the client.
    pub bytes_sent: u64,
    /// Username or `UNDEF`.
    pub username: String,
    /// Client id (CID) for `client-kill`, `client-auth`, ….
    pub client_id: u64,
    /// Peer id.
    pub peer_id: u64,
    /// Every column by its header name.
    pub fields: HashMap<String, String>,
}

impl Management {
    /// Connects (retrying while the socket is not there yet, bounded by `timeout`), reads the
    /// `>INFO:` banner. `timeout` also bounds each later command.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Management, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("connect {}: {e}", path.display()));
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        let mut m = Management {
            stream,
            pending: Vec::new(),
            notifications: VecDeque::new(),
            timeout,
        };
        let banner = m.read_line(deadline)?;
        if !banner.starts_with(">INFO:") {
            return Err(format!("unexpected management banner {banner:?}"));
        }
        Ok(m)
    }

    fn read_line(&mut self, deadline: Instant) -> Result<String, String> {
        loop {
            if let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Ok(String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "management: timeout; partial input {:?}",
                    String::from_utf8_lossy(&self.pending)
                ));
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err("management: connection closed".to_owned()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(format!("management read: {e}")),
            }
        }
    }

    /// Sends `cmd` (one or more lines, e.g. `"client-auth 0 1\npush \"route …\"\nEND"`) and reads
    /// the reply up to a line `END`, `SUCCESS: …` or `ERROR: …` (included). Notifications (`>…`)
    /// that arrive meanwhile are queued for [`Management::wait_notification`]. An `ERROR:` reply is
    /// an `Err`.
    pub fn command(&mut self, cmd: &str) -> Result<Vec<String>, String> {
        let mut text = cmd.trim_end().to_owned();
        text.push('\n');
        self.stream
            .write_all(text.as_bytes())
            .map_err(|e| format!("management write: {e}"))?;
        let deadline = Instant::now() + self.timeout;
        let mut lines = Vec::new();
        loop {
            let line = self
                .read_line(deadline)
                .map_err(|e| format!("{e} (after {cmd:?}; got {lines:?})"))?;
            if line.starts_with('>') {
                self.notifications.push_back(line);
                continue;
            }
            let last = line == "END" || line.starts_with("SUCCESS:") || line.starts_with("ERROR:");
            let error = line.starts_with("ERROR:");
            lines.push(line);
            if error {
                return Err(format!("management {cmd:?}: {}", lines.join("\n")));
            }
            if last {
                return Ok(lines);
            }
        }
    }

    /// Waits for a notification starting with `prefix` (e.g. `">CLIENT:ESTABLISHED"`), skipping
    /// (and dropping) earlier ones. For `>CLIENT:` notifications other than ADDRESS, the following
    /// `>CLIENT:ENV,…` lines up to `>CLIENT:ENV,END` are returned with it.
    pub fn wait_notification(
        &mut self,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            let line = match self.notifications.pop_front() {
                Some(l) => l,
                None => self
                    .read_line(deadline)
                    .map_err(|e| format!("{e} waiting for {prefix:?}; skipped {skipped:?}"))?,
            };
            if !line.starts_with(prefix) {
                skipped.push(line);
                continue;
            }
            let mut block = vec![line];
            if block[0].starts_with(">CLIENT:")
                && !block[0].starts_with(">CLIENT:ADDRESS")
                && !block[0].starts_with(">CLIENT:ENV")
            {
                loop {
                    let l = match self.notifications.pop_front() {
                        Some(l) => l,
                        None => self.read_line(deadline)?,
                    };
                    let end = l == ">CLIENT:ENV,END";
                    block.push(l);
                    if end {
                        break;
                    }
                }
            }
            return Ok(block);
        }
    }

    /// Notifications received so far and not yet consumed.
    pub fn take_notifications(&mut self) -> Vec<String> {
        self.notifications.drain(..).collect()
    }

    /// `status 3`, parsed: one entry per `CLIENT_LIST` row.
    pub fn status_clients(&mut self) -> Result<Vec<StatusClient>, String> {
        let lines = self.command("status 3")?;
        parse_status3(&lines)
    }
}

/// Parses the `CLIENT_LIST` rows of a `status 3` reply using its `HEADER\tCLIENT_LIST` line.
pub fn parse_status3(lines: &[String]) -> Result<Vec<StatusClient>, String> {
    let header: Vec<&str> = lines
        .iter()
        .find_map(|l| l.strip_prefix("HEADER\tCLIENT_LIST\t"))
        .ok_or_else(|| format!("no CLIENT_LIST header in {lines:?}"))?
        .split('\t')
        .collect();
    let mut out = Vec::new();
    for row in lines.iter().filter_map(|l| l.strip_prefix("CLIENT_LIST\t")) {
        let fields: HashMap<String, String> = header
            .iter()
            .zip(row.split('\t'))
            .map(|(k, v)| ((*k).to_owned(), v.to_owned()))
            .collect();
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        let num = |k: &str| {
            get(k)
                .parse::<u64>()
                .map_err(|e| format!("{k} in {row:?}: {e}"))
        };
        out.push(StatusClient {
            common_name: get("Common Name"),
            real_address: get("Real Address"),
            virtual_address: get("Virtual Address"),
            bytes_received: num("Bytes Received")?,
            bytes_sent: num("Bytes Sent")?,
            username: get("Username"),
            client_id: num("Client ID")?,
            peer_id: num("Peer ID")?,
            fields,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Cleanup after crashed runs
// ---------------------------------------------------------------------------------------------

/// Parses `{prefix}{pid}{sep}{n}` and returns the pid.
fn owner_pid(name: &str, prefix: &str, sep: char) -> Option<u32> {
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
            let Some(pid) = ["srv-", "cli-"]
                .iter()
                .find_map(|p| name.strip_prefix(p)?.split('-').next()?.parse::<u32>().ok())
            else {
                continue;
            };
            if !stale(pid) {
                continue;
            }
            if let Some(p) = read_pid(&entry.path().join("openvpn.pid")) {
                let comm = fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                if comm.trim() == "openvpn" && pid_alive(p) {
                    signal(&[p], "KILL");
                    removed.push(format!("openvpn process {p} of {name}"));
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

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn hex_to_decimal_works() {
        assert_eq!(hex_to_decimal("00").unwrap(), "0");
        assert_eq!(hex_to_decimal("ff").unwrap(), "255");
        assert_eq!(hex_to_decimal("01:00").unwrap(), "256");
        assert_eq!(
            hex_to_decimal("ffffffffffffffffffffffffffffffff").unwrap(),
            u128::MAX.to_string()
        );
    }

    #[test]
    fn prefixes() {
        let p: Ipv4Prefix = "10.213.7.9/24".parse().unwrap();
        assert_eq!(p.to_string(), "10.213.7.0/24");
        assert_eq!(p.host(1), Ipv4Addr::new(10, 213, 7, 1));
        assert!(p.overlaps(&TUNNEL_RANGE));
        assert!(!p.overlaps(&VETH_RANGE));
        assert_eq!(p.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(owner_pid("pfn123c4", NS_PREFIX, 'c'), Some(123));
        assert_eq!(owner_pid("pft123s4", TUN_PREFIX, 's'), Some(123));
        assert_eq!(owner_pid("pfv12x", VETH_PREFIX, 'c'), None);
    }
}
