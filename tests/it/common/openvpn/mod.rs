//! End-to-end test harness: a real OpenVPN 2.6 server on the host and real OpenVPN clients, each
//! in its own network namespace joined to the host by a veth pair.
//!
//! Self-contained (std + `tempfile`), meant to be included as a module of an integration-test crate
//! (`tests/it/common/openvpn/`, also included by `benches/openvpn_connect.rs`). Needs root, `/dev/net/tun`, `ip netns`, and the `openvpn`,
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
//! - tunnel nets: one `/24` per server from `10.213.0.0/16` unless the caller gives one;
//! - nets behind the VPN ([`Behind`]): one `/24` per test from `10.214.0.0/16`, its `.1` on the
//!   server's tun, cut off from the client namespace's default route.
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
//!   handshake (OpenVPN's push timer).
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

mod behind;
mod client;
mod management;
mod netns;
mod pki;
mod process;
mod server;
mod subnets;
pub mod unit;

pub use behind::*;
pub use client::*;
pub use management::*;
pub use netns::*;
pub use pki::*;
pub use process::*;
pub use server::*;
pub use subnets::*;

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

/// The Debian packages the harness needs.
pub const PACKAGES: &str = "openvpn openssl iproute2 iputils-ping";

/// The command that installs everything the harness needs on Debian.
pub const INSTALL_HINT: &str = "apt-get install -y openvpn openssl iproute2 iputils-ping";

// ---------------------------------------------------------------------------------------------
// Environment checks
// ---------------------------------------------------------------------------------------------

/// Checks that end-to-end tests can run here: the tools exist (`openvpn` 2.6+, `openssl`, `ip`,
/// `ping`, `setsid`, `bash`, `timeout`), we are root with `CAP_NET_ADMIN` and `CAP_SYS_ADMIN`, and
/// `/dev/net/tun` exists. The error names every problem and the install command.
pub fn require_tools() -> Result<(), String> {
    let problems = problems();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "OpenVPN end-to-end tests cannot run: {}. Install with `{INSTALL_HINT}` and run as root.",
            problems.join("; ")
        ))
    }
}

/// What keeps the end-to-end tests from running here (see [`require_tools`]), one entry each.
pub fn problems() -> Vec<String> {
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
    problems
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
