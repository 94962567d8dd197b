//! Test helpers: a temp folder with a config and a generated registry, and the real `pforte`
//! binary started on it.

#![allow(dead_code)]

#[path = "../../support/daemon.rs"]
pub mod daemon;
#[path = "../../support/freeradius.rs"]
pub mod freeradius;
pub mod harness;
pub mod ocserv;
pub mod openvpn;
pub mod postgres;
pub mod radclient;
pub mod strongswan;

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pforte::client::UnixClient;
use pforte::wire::ConnectRequest;

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pforte"))
}

/// Whether missing system packages must fail the test (CI) instead of skipping it.
pub fn e2e_required() -> bool {
    std::env::var("PFORTE_E2E").is_ok_and(|v| v == "1")
}

/// Skips (returns false) or fails loudly when a tool is missing. (A test that needs a tool also
/// declares it where it is registered, so that the harness reports it as ignored.)
pub fn have_tool(tool: &str, package: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        let msg = format!("`{tool}` not found: install it with `apt-get install -y {package}`");
        if e2e_required() {
            panic!("{msg} (PFORTE_E2E=1 requires it)");
        }
        eprintln!("SKIPPED: {msg}");
    }
    found
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A registry device row for the generated fixtures.
#[derive(Clone, Debug)]
pub struct Dev {
    pub id: String,
    pub ownership: &'static str,
    pub status: &'static str,
    pub org_unit: &'static str,
    pub clearance: u8,
    pub encrypted: bool,
    pub patched_days_ago: i64,
    pub hwaddr: String,
    pub users: String,
    /// A real certificate's fingerprint (OpenVPN tests); None: derived from the id.
    pub cert_sha256: Option<String>,
}

impl Dev {
    /// A good service device of `it` for `user`.
    pub fn good(id: &str, user: &str) -> Dev {
        Dev {
            id: id.into(),
            ownership: "service",
            status: "active",
            org_unit: "it",
            clearance: 1,
            encrypted: true,
            patched_days_ago: 3,
            hwaddr: String::new(),
            users: user.into(),
            cert_sha256: None,
        }
    }

    /// Its certificate fingerprint (derived from the id), colon form.
    pub fn fp(&self) -> String {
        self.cert_sha256
            .clone()
            .unwrap_or_else(|| fingerprint(&self.id))
    }
}

/// A deterministic fake SHA-256 fingerprint for an id.
pub fn fingerprint(id: &str) -> String {
    // FNV-style mixing into 32 bytes: unique enough for test ids.
    let mut out = Vec::with_capacity(32);
    let mut h: u64 = 0xcbf29ce484222325;
    for round in 0..32u64 {
        for b in id.bytes().chain(round.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        out.push((h >> 24) as u8);
    }
    out.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Config knobs for a fixture.
#[derive(Clone, Debug)]
pub struct Setup {
    pub max_sessions: u32,
    pub reserved_seats: u32,
    pub per_user: u32,
    pub finance_quota: u32,
    pub token: bool,
    pub socket_mode: &'static str,
    pub extra: String,
    pub watch_interval_s: u64,
    /// The office zone's address pool (for OpenVPN tests: the server's tunnel net).
    pub pool: String,
    /// The office zone's tunnel network (`network`), when the pool is only part of it.
    pub network: Option<String>,
    /// The routes the office zone pushes.
    pub routes: Vec<String>,
    /// Environment for the daemon (e.g. `PFORTE_SERVER__HEADER_TIMEOUT_MS` overrides).
    pub env: Vec<(String, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            max_sessions: 100,
            reserved_seats: 0,
            per_user: 2,
            finance_quota: 0,
            token: false,
            socket_mode: "0660",
            extra: String::new(),
            watch_interval_s: 1,
            pool: "10.213.0.0/24".into(),
            network: None,
            routes: vec!["10.1.0.0/16".into()],
            env: Vec::new(),
        }
    }
}

/// A temp folder with config, registry, socket and state.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub setup: Setup,
}

pub const TOKEN: &str = "test-token-0123456789abcdef";

impl Fixture {
    pub fn new(setup: Setup, devices: &[Dev]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let f = Fixture {
            dir,
            port: free_port(),
            setup,
        };
        f.write_devices(devices);
        std::fs::write(
            f.path("users.csv"),
            "username,org_unit,level\nalice,it,\nbob,it,\ncarol,health,\ndora,social,\nfrank,finance,\ngina,finance,\nivan,it,\n",
        )
        .unwrap();
        if f.setup.token {
            std::fs::write(f.path("token"), TOKEN).unwrap();
        }
        f.write_config();
        f
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("run/pforte.sock")
    }

    pub fn config(&self) -> PathBuf {
        self.path("pforte.toml")
    }

    pub fn write_config(&self) {
        let s = &self.setup;
        let d = self.dir.path().display();
        let token = if s.token {
            format!("api_token_file = \"{d}/token\"")
        } else {
            String::new()
        };
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
socket = "{d}/run/pforte.sock"
socket_mode = "{mode}"
{token}

[registry]
devices = "{d}/devices.csv"
users = "{d}/users.csv"
watch_interval_s = {watch}

[store]
path = "{d}/state/pforte.db"
synchronous = "normal"

[audit]
path = "{d}/state/audit.log"

[policy]
max_patch_age_days = 30
remote_max_level = 1
private_devices = "refuse"

[levels]
"0" = "public"
"1" = "normal"
"2" = "high"
"3" = "very-high"

[capacity]
max_sessions = {max}
reserved_seats = {reserved}
max_sessions_per_user = {per_user}

[[org_units]]
name = "it"
level = 1
priority = true

[[org_units]]
name = "finance"
level = 1
quota = {quota}

[[org_units]]
name = "health"
level = 2
remote_exception = true

[[org_units]]
name = "social"
level = 3

[[zones]]
name = "office"
level = 1
pool = "{pool}"
{network}routes = [{routes}]

[[zones]]
name = "mail"
level = 0

{extra}
"#,
            port = self.port,
            mode = s.socket_mode,
            watch = s.watch_interval_s,
            max = s.max_sessions,
            reserved = s.reserved_seats,
            per_user = s.per_user,
            quota = s.finance_quota,
            extra = s.extra,
            pool = s.pool,
            network = s
                .network
                .as_ref()
                .map(|n| format!("network = \"{n}\"\n"))
                .unwrap_or_default(),
            routes = s
                .routes
                .iter()
                .map(|r| format!("\"{r}\""))
                .collect::<Vec<_>>()
                .join(", "),
        );
        std::fs::write(self.config(), text).unwrap();
    }

    pub fn write_devices(&self, devices: &[Dev]) {
        let today = chrono::Utc::now().date_naive();
        let mut csv = String::from(
            "device_id,ownership,status,org_unit,clearance,disk_encrypted,patched_on,cert_sha256,cert_serial,hwaddr,users\n",
        );
        for (i, d) in devices.iter().enumerate() {
            let patched = today - chrono::Duration::days(d.patched_days_ago);
            writeln!(
                csv,
                "{},{},{},{},{},{},{},{},{},{},{}",
                d.id,
                d.ownership,
                d.status,
                d.org_unit,
                d.clearance,
                d.encrypted,
                patched,
                d.fp(),
                1000 + i,
                d.hwaddr,
                d.users
            )
            .unwrap();
        }
        // Write then rename, as an inventory export should, so a reload never sees half a file.
        let tmp = self.path("devices.csv.tmp");
        std::fs::write(&tmp, csv).unwrap();
        std::fs::rename(tmp, self.path("devices.csv")).unwrap();
    }

    /// Starts the real binary on this fixture and waits until it is ready.
    pub fn start(&self) -> Daemon {
        Daemon::start(self)
    }
}

/// The running daemon; killed on drop. Its process is [`daemon::Running`] (the start and the
/// wait shared with the benches), reached through `Deref` (`d.child`).
pub struct Daemon {
    process: daemon::Running,
    pub port: u16,
    pub socket: PathBuf,
}

impl std::ops::Deref for Daemon {
    type Target = daemon::Running;
    fn deref(&self) -> &daemon::Running {
        &self.process
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut daemon::Running {
        &mut self.process
    }
}

impl Daemon {
    pub fn start(f: &Fixture) -> Daemon {
        Daemon::start_via(f, bin())
    }

    /// Starts `program serve --config …`: the binary itself, or a wrapper script that execs it.
    pub fn start_via(f: &Fixture, program: PathBuf) -> Daemon {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let process = daemon::Running::start(daemon::Launch {
            bin: program,
            config: &f.config(),
            port: f.port,
            log_level: "info",
            env: &f.setup.env,
            output: daemon::Output::Log(f.path(&format!("serve-{n}.log"))),
            ready_within: Duration::from_secs(20),
            poll: Duration::from_millis(25),
        });
        Daemon {
            process,
            port: f.port,
            socket: f.socket(),
        }
    }

    pub fn metrics(&self) -> String {
        http_get(self.port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The value of one metric line (exact series text before the value).
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics(), series)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits for exit; returns the exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub async fn client(&self) -> UnixClient {
        UnixClient::connect(&self.socket).await.unwrap()
    }
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path, &[], "")
}

/// A plain HTTP/1.1 request on loopback with extra headers.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Some((status, body))
}

/// A connect request for a fixture device.
pub fn connect_req(dev: &Dev, user: &str, key: &str) -> ConnectRequest {
    ConnectRequest {
        vpn: "openvpn".into(),
        instance: "office-udp".into(),
        zone: "office".into(),
        username: user.into(),
        common_name: format!("{}-cn", dev.id),
        cert_sha256: dev.fp(),
        hwaddr: if dev.hwaddr.is_empty() {
            String::new()
        } else {
            dev.hwaddr.clone()
        },
        remote_addr: "198.51.100.20:40000".into(),
        session_key: key.into(),
        ..Default::default()
    }
}

/// Waits for a condition, bounded.
pub fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {within:?} waiting for {what}");
}

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The harness's own checks (`openvpn::unit`), under their module's name.
pub fn tests() -> Vec<harness::Case> {
    use harness::Case;
    const UNIT: &str = "it::common::openvpn::unit";
    vec![
        Case::new(
            UNIT,
            "hex_to_decimal_works",
            &[],
            openvpn::unit::hex_to_decimal_works,
        ),
        Case::new(UNIT, "prefixes", &[], openvpn::unit::prefixes),
    ]
}
