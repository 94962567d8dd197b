//! OpenVPN connection setup time with and without pforte, against real OpenVPN 2.6 servers on
//! this host and real OpenVPN clients, each in its own network namespace (the end-to-end test
//! harness, `tests/it/common/openvpn/`). Needs root, `/dev/net/tun`, `openvpn`, `openssl`,
//! `iproute2`; `hyperfine` for the hook-process part.
//!
//! ```sh
//! cargo bench --bench openvpn_connect                       # everything, N = 20, 3 rounds
//! cargo bench --bench openvpn_connect -- --clients 24 --rounds 5
//! cargo bench --bench openvpn_connect -- --modes none,mgmt  # a subset
//! cargo bench --bench openvpn_connect -- --hook-only        # only the hook process
//! cargo bench --bench openvpn_connect -- --hook-only --interleaved 300 --also-bin /tmp/pforte-old
//! cargo bench --bench openvpn_connect -- --pforte-bin /tmp/pforte-old   # another build
//! cargo bench --bench openvpn_connect -- --clients 4 --rounds 1 --logs /tmp/ovpn-logs --verb 8
//! ```
//!
//! Modes, one OpenVPN server each, all running during the whole run, measured interleaved
//! (client 1 against every mode, then client 2, …) so that other load on the machine spreads
//! evenly over the modes:
//! - `none`: no check at all;
//! - `ccd`: OpenVPN's own `client-config-dir` + `ccd-exclusive`, a file per allowed CN (with an
//!   `ifconfig-push`, as pforte pushes one);
//! - `hook`: `client-connect`/`client-disconnect` = `pforte hook openvpn` against a pforte daemon;
//! - `mgmt`: `management-client-auth`, pforte deciding over the management interface;
//! - `ref-auth`, `ref-wake`: reference points without pforte: this program itself answers every
//!   `>CLIENT:CONNECT` at once with `client-auth` (`ref-auth`), or with `client-auth` followed by
//!   `client-pending-auth` (`ref-wake`), to show OpenVPN's push-timer trap and its way out;
//! - `hook-deferred`: the hook with `--deferred` (OpenVPN's deferred client-connect);
//! - `true-script`: `client-connect /bin/true`, what running any script costs OpenVPN (the floor
//!   of `hook`).
//!
//! A connect is timed from starting the client process to the client's "Initialization
//! Sequence Completed", read from the client's own log with microsecond timestamps
//! (`machine-readable-output`); the harness's `wait_connected` (5 ms polling) waits for it.
//! Sequential: one client at a time (start, wait connected, `stop_fast`). Concurrent: all N
//! clients started at once. Every mode gets the same clients, namespaces and rounds. Then
//! `--refusals K` (default 5) unregistered certificates against the modes that can refuse: time
//! to AUTH_FAILED, and any refused device that connected all the same. Then the hook process
//! alone (`hyperfine`). Other options: `--no-hook-bench`, `--logs DIR` (every server, pforte and
//! sequential client log, with microsecond timestamps), `--verb N` / `--client-verb N`.
//! Results and their reading: docs/BENCHMARKS.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// The harness's own unit tests are compiled here without a test harness to run them.
#[allow(unused_imports)]
#[path = "../tests/it/common/openvpn/mod.rs"]
mod openvpn;

#[path = "common/machine.rs"]
mod machine;

#[path = "../tests/support/daemon.rs"]
mod daemon;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use daemon::http_get;
use openvpn::{Client, ClientCert, ClientNs, ClientOptions, Pki, Server, ServerOptions};

const ALL_MODES: &[&str] = &[
    "none",
    "ccd",
    "hook",
    "mgmt",
    "ref-auth",
    "ref-wake",
    "hook-deferred",
    "true-script",
];

/// The same instance the e2e tests use.
const INSTANCE: &str = "office-udp";
/// A connect slower than this took OpenVPN's slow path (the push timer).
const SLOW: Duration = Duration::from_millis(500);
/// An instance of a stopped client lives on this long in the server (explicit-exit-notify's
/// delayed exit); a client is not reused against the same server sooner.
const REUSE_GAP: Duration = Duration::from_secs(6);

struct Args {
    clients: usize,
    rounds: usize,
    modes: Vec<String>,
    hook_bench: bool,
    connect_bench: bool,
    /// Copy every log here at the end (servers, pforte, and each sequential client).
    logs: Option<PathBuf>,
    /// Refused connects per mode that can refuse (unregistered certificates).
    refusals: usize,
    /// Rounds of the interleaved hook comparison (0: none).
    interleaved: usize,
    /// Other builds whose hook the interleaved comparison times next to this one.
    also_bins: Vec<PathBuf>,
}

/// `verb` of the clients (`--client-verb N`; the harness's default is 4).
static CLIENT_VERB: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Extra lines for every server (`--logs`: microsecond timestamps; `--verb N`).
static SERVER_EXTRA: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

fn args() -> Args {
    let mut a = Args {
        clients: 20,
        rounds: 3,
        modes: ALL_MODES.iter().map(|s| s.to_string()).collect(),
        hook_bench: true,
        connect_bench: true,
        logs: None,
        refusals: 5,
        interleaved: 0,
        also_bins: Vec::new(),
    };
    let mut server_extra = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bench" => {}
            "--clients" => a.clients = it.next().and_then(|v| v.parse().ok()).unwrap_or(20),
            "--rounds" => a.rounds = it.next().and_then(|v| v.parse().ok()).unwrap_or(3),
            "--modes" => {
                a.modes = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if let Some(bad) = a.modes.iter().find(|m| !ALL_MODES.contains(&m.as_str())) {
                    panic!("unknown mode {bad:?}; modes: {}", ALL_MODES.join(","));
                }
                if !a.modes.iter().any(|m| m == "none") {
                    a.modes.insert(0, "none".into());
                }
            }
            "--no-hook-bench" => a.hook_bench = false,
            "--refusals" => a.refusals = it.next().and_then(|v| v.parse().ok()).unwrap_or(5),
            "--logs" => {
                let dir = PathBuf::from(it.next().unwrap_or_default());
                std::fs::create_dir_all(&dir).unwrap();
                server_extra.push("machine-readable-output".to_string());
                a.logs = Some(dir);
            }
            "--verb" => server_extra.push(format!("verb {}", it.next().unwrap_or_default())),
            "--server-line" => server_extra.push(it.next().unwrap_or_default()),
            "--client-verb" => {
                let _ = CLIENT_VERB.set(it.next().unwrap_or_default());
            }
            "--pforte-bin" => {
                let p = PathBuf::from(it.next().unwrap_or_default());
                assert!(p.is_file(), "--pforte-bin {}: no such file", p.display());
                let _ = PFORTE_BIN.set(p);
            }
            "--hook-only" => a.connect_bench = false,
            "--interleaved" => {
                a.interleaved = it.next().and_then(|v| v.parse().ok()).unwrap_or(300)
            }
            "--also-bin" => {
                let p = PathBuf::from(it.next().unwrap_or_default());
                assert!(p.is_file(), "--also-bin {}: no such file", p.display());
                a.also_bins.push(p);
            }
            other => panic!(
                "unknown argument {other:?}; use --clients N --rounds R --modes a,b --no-hook-bench --hook-only --pforte-bin PATH --logs DIR --verb N --client-verb N --server-line LINE --refusals K --interleaved N --also-bin PATH"
            ),
        }
    }
    let _ = SERVER_EXTRA.set(server_extra);
    a
}

fn main() {
    let args = args();
    if !openvpn::available() {
        eprintln!("openvpn_connect: not run (see above)");
        return;
    }
    print_machine();
    let machine_before = machine::cpu_times();
    println!("pforte: {}", pforte_bin().display());
    let work = tempfile::tempdir().unwrap();
    let pki = Pki::create(work.path()).unwrap();
    if args.connect_bench {
        connect_bench(&args, &pki, work.path());
    }
    if args.hook_bench {
        hook_bench(&pki, work.path(), &args);
    }
    if let Some(line) = machine::report(machine_before) {
        println!("\n{line}");
    }
}

fn print_machine() {
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let ovpn = Command::new("openvpn")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    println!(
        "machine: {cpus} CPUs ({model}); load average at start: {}",
        load.trim()
    );
    println!("{ovpn}");
}

// ---------------------------------------------------------------------------------------------
// pforte daemon
// ---------------------------------------------------------------------------------------------

/// Another pforte binary to measure instead of this build's (`--pforte-bin`).
static PFORTE_BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The real release binary of this package (or the one given with `--pforte-bin`).
fn pforte_bin() -> PathBuf {
    PFORTE_BIN
        .get()
        .cloned()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pforte")))
}

/// A pforte daemon on a temp dir with a registry of the given client certificates (good service
/// devices of org unit `it`), the zone `office` on `pool`, and `extra` config text. Fields drop
/// in order: the process is killed before its dir goes.
struct Daemon {
    process: daemon::Running,
    dir: tempfile::TempDir,
    port: u16,
}

impl Daemon {
    /// Writes the registry and config; call [`Daemon::start`] with the pool once it is known.
    fn prepare(certs: &[ClientCert]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let patched = chrono::Utc::now().date_naive() - chrono::Duration::days(3);
        let mut csv = String::from(
            "device_id,ownership,status,org_unit,clearance,disk_encrypted,patched_on,cert_sha256,cert_serial,hwaddr,users\n",
        );
        for (i, c) in certs.iter().enumerate() {
            writeln!(
                csv,
                "D-{i:04},service,active,it,1,true,{patched},{},,,{}",
                c.sha256, c.cn
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("devices.csv"), csv).unwrap();
        dir
    }

    fn socket_of(dir: &Path) -> PathBuf {
        dir.join("run/pforte.sock")
    }

    fn start(dir: tempfile::TempDir, pool: &str, extra: &str) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display();
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
socket = "{d}/run/pforte.sock"
[registry]
devices = "{d}/devices.csv"
watch_interval_s = 0
[store]
path = "{d}/state/pforte.db"
synchronous = "normal"
[audit]
path = "{d}/state/audit.log"
[policy]
default_org_unit = "it"
[capacity]
max_sessions = 100000
max_sessions_per_user = 0
[[org_units]]
name = "it"
level = 1
[[zones]]
name = "office"
level = 1
pool = "{pool}"
routes = []
{extra}
"#
        );
        let path = dir.path().join("pforte.toml");
        std::fs::write(&path, config).unwrap();
        let process = daemon::Running::start(daemon::Launch {
            bin: pforte_bin(),
            config: &path,
            port,
            log_level: "warn",
            env: &[],
            output: daemon::Output::Log(dir.path().join("serve.log")),
            ready_within: Duration::from_secs(20),
            poll: Duration::from_millis(20),
        });
        Daemon { process, dir, port }
    }

    fn log(&self) -> String {
        self.process.log()
    }

    /// Whether the process still runs (its `/proc` state).
    fn state(&self) -> String {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.process.child.id()));
        match stat
            .as_deref()
            .map(|s| s.rsplit_once(')').map(|x| x.1.trim_start()))
        {
            Ok(Some(rest)) if rest.starts_with('Z') => "exited".into(),
            Ok(_) => "running".into(),
            Err(_) => "gone".into(),
        }
    }

    fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = http_get(self.port, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

// ---------------------------------------------------------------------------------------------
// A bare management client (the reference modes)
// ---------------------------------------------------------------------------------------------

/// Answers every `>CLIENT:CONNECT` at once with `client-auth` (and, with `wake`, a
/// `client-pending-auth` right after it). Stops on drop.
struct BareMgmt {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl BareMgmt {
    fn start(path: &Path, wake: bool) -> BareMgmt {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    panic!("management {}: {e}", path.display())
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            let mut connect: Option<(String, String)> = None;
            while !flag.load(Ordering::Relaxed) {
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) => return,
                    Ok(_) if buf.ends_with(b"\n") => {}
                    Ok(_) => continue,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        continue;
                    }
                    Err(_) => return,
                }
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                buf.clear();
                if let Some(rest) = line.strip_prefix(">CLIENT:CONNECT,") {
                    let mut p = rest.split(',');
                    connect = Some((
                        p.next().unwrap_or("").to_string(),
                        p.next().unwrap_or("").to_string(),
                    ));
                } else if line == ">CLIENT:ENV,END"
                    && let Some((cid, kid)) = connect.take()
                {
                    let mut cmd = format!("client-auth {cid} {kid}\nEND\n");
                    if wake {
                        writeln!(cmd, "client-pending-auth {cid} {kid} \"\" 60").unwrap();
                    }
                    if w.write_all(cmd.as_bytes()).is_err() {
                        return;
                    }
                }
            }
        });
        BareMgmt {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for BareMgmt {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Targets: one OpenVPN server per mode (and what it needs)
// ---------------------------------------------------------------------------------------------

struct Target {
    mode: String,
    // Drop order: the management client and pforte before the server.
    _bare: Option<BareMgmt>,
    daemon: Option<Daemon>,
    server: Server,
    _ccd: Option<tempfile::TempDir>,
}

fn hook_lines(socket: &Path, deferred: bool) -> Vec<String> {
    let flags = if deferred {
        " --deferred --timeout 10s"
    } else {
        ""
    };
    let hook = format!("\"{} hook openvpn{flags}\"", pforte_bin().display());
    vec![
        format!("setenv PFORTE_SOCKET {}", socket.display()),
        "setenv PFORTE_ZONE office".into(),
        format!("setenv PFORTE_INSTANCE {INSTANCE}"),
        format!("client-connect {hook}"),
        format!("client-disconnect {hook}"),
    ]
}

impl Target {
    fn start(mode: &str, pki: &Pki, certs: &[ClientCert]) -> Target {
        let start = |mut extra: Vec<String>, management: bool| {
            extra.extend(SERVER_EXTRA.get().cloned().unwrap_or_default());
            Server::start(
                pki,
                ServerOptions {
                    management,
                    extra,
                    ..ServerOptions::default()
                },
            )
            .unwrap_or_else(|e| panic!("{mode}: {e}"))
        };
        match mode {
            "true-script" => Target {
                mode: mode.into(),
                _bare: None,
                daemon: None,
                server: start(vec!["client-connect /bin/true".into()], false),
                _ccd: None,
            },
            "none" => Target {
                mode: mode.into(),
                _bare: None,
                daemon: None,
                server: start(vec![], false),
                _ccd: None,
            },
            "ccd" => {
                let dir = tempfile::tempdir().unwrap();
                let server = start(
                    vec![
                        format!("client-config-dir {}", dir.path().display()),
                        "ccd-exclusive".into(),
                    ],
                    false,
                );
                // The files are read at connect time: written after the start is fine.
                let net = server.tunnel_net();
                for (i, c) in certs.iter().enumerate() {
                    std::fs::write(
                        dir.path().join(&c.cn),
                        format!(
                            "ifconfig-push {} {}\n",
                            net.host(10 + i as u32),
                            net.netmask()
                        ),
                    )
                    .unwrap();
                }
                Target {
                    mode: mode.into(),
                    _bare: None,
                    daemon: None,
                    server,
                    _ccd: Some(dir),
                }
            }
            "hook" | "hook-deferred" => {
                let dir = Daemon::prepare(certs);
                let server = start(
                    hook_lines(&Daemon::socket_of(dir.path()), mode == "hook-deferred"),
                    false,
                );
                let daemon = Daemon::start(dir, &server.tunnel_net().to_string(), "");
                Target {
                    mode: mode.into(),
                    _bare: None,
                    daemon: Some(daemon),
                    server,
                    _ccd: None,
                }
            }
            "mgmt" => {
                let dir = Daemon::prepare(certs);
                let server = start(
                    vec![
                        "management-client-auth".into(),
                        "auth-user-pass-optional".into(),
                    ],
                    true,
                );
                let extra = format!(
                    "[[openvpn]]\ninstance = \"{INSTANCE}\"\nzone = \"office\"\nmanagement = \"{}\"\nclient_auth = true\n",
                    server.management_socket().unwrap().display()
                );
                let daemon = Daemon::start(dir, &server.tunnel_net().to_string(), &extra);
                let series =
                    format!("pforte_openvpn_management_connected{{vpn_instance=\"{INSTANCE}\"}}");
                let deadline = Instant::now() + Duration::from_secs(10);
                while daemon.metric(&series) != Some(1.0) {
                    assert!(
                        Instant::now() < deadline,
                        "pforte did not connect to the management interface: {}",
                        daemon.log()
                    );
                    thread::sleep(Duration::from_millis(20));
                }
                Target {
                    mode: mode.into(),
                    _bare: None,
                    daemon: Some(daemon),
                    server,
                    _ccd: None,
                }
            }
            "ref-auth" | "ref-wake" => {
                let server = start(
                    vec![
                        "management-client-auth".into(),
                        "auth-user-pass-optional".into(),
                    ],
                    true,
                );
                let bare = BareMgmt::start(server.management_socket().unwrap(), mode == "ref-wake");
                Target {
                    mode: mode.into(),
                    _bare: Some(bare),
                    daemon: None,
                    server,
                    _ccd: None,
                }
            }
            other => panic!("unknown mode {other}"),
        }
    }

    fn explain(&self, client: &Client, e: &str) -> String {
        let tail = |t: &str, n: usize| {
            let l: Vec<&str> = t.lines().collect();
            l[l.len().saturating_sub(n)..].join("\n")
        };
        format!(
            "mode {}: {}\n--- client log ---\n{}\n--- server log ---\n{}\n--- pforte ({}) log ---\n{}",
            self.mode,
            tail(e, 5),
            tail(&client.log(), 20),
            tail(&self.server.log(), 30),
            self.daemon.as_ref().map(Daemon::state).unwrap_or_default(),
            self.daemon
                .as_ref()
                .map(|d| tail(&d.log(), 20))
                .unwrap_or_default()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------------------------

/// One connect: from the client's start to its "Initialization Sequence Completed", by the
/// client log's own timestamp (`precise`) and as seen by the harness's 5 ms polling (`polled`).
#[derive(Clone, Copy)]
struct Sample {
    precise: Duration,
    polled: Duration,
}

struct Started {
    client: Client,
    t0: f64,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn start_client(ns: &ClientNs, cert: &ClientCert, t: &Target) -> Started {
    let mut extra = vec![
        // Microsecond unix timestamps on every log line.
        "machine-readable-output".to_string(),
    ];
    if let Some(v) = CLIENT_VERB.get() {
        extra.push(format!("verb {v}"));
    }
    let opts = ClientOptions {
        extra,
        auth_user_pass: None,
    };
    let t0 = unix_now();
    let client = Client::connect(ns, cert, &t.server, opts)
        .unwrap_or_else(|e| panic!("mode {}: {e}", t.mode));
    Started { client, t0 }
}

/// The timestamp of the log line holding `needle` (`machine-readable-output`: `SECS.USECS …`).
fn stamp(log: &str, needle: &str) -> Option<f64> {
    log.lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|t| t.parse().ok())
}

fn finish(t: &Target, s: &mut Started) -> Sample {
    let polled = s
        .client
        .wait_connected(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{}", t.explain(&s.client, &e)));
    let log = s.client.log();
    let at = stamp(&log, "Initialization Sequence Completed")
        .unwrap_or_else(|| panic!("{}", t.explain(&s.client, "no timestamped completion line")));
    Sample {
        precise: Duration::from_secs_f64((at - s.t0).max(0.0)),
        polled,
    }
}

/// Waits until `REUSE_GAP` has passed since `last` (a client's or a batch's last use of a
/// server), so no connect meets a previous instance of the same client still in the server.
fn keep_gap(last: Option<&Instant>) {
    if let Some(at) = last {
        let left = REUSE_GAP.saturating_sub(at.elapsed());
        if !left.is_zero() {
            thread::sleep(left);
        }
    }
}

fn connect_bench(args: &Args, pki: &Pki, work: &Path) {
    let n = args.clients;
    let r = args.rounds;
    let t_setup = Instant::now();
    let certs: Vec<ClientCert> = (0..n)
        .map(|i| {
            pki.client(&format!("c{i:02}"), &format!("c{i:02}"))
                .unwrap()
        })
        .collect();
    let nss: Vec<ClientNs> = (0..n).map(|_| ClientNs::create().unwrap()).collect();
    let targets: Vec<Target> = args
        .modes
        .iter()
        .map(|m| Target::start(m, pki, &certs))
        .collect();
    let m = targets.len();
    eprintln!(
        "setup: {n} client certificates and namespaces, {m} servers in {:.1} s (work dir {})",
        t_setup.elapsed().as_secs_f64(),
        work.display()
    );

    // Sequential: one client at a time, interleaving the modes.
    let mut seq: Vec<Vec<Sample>> = vec![Vec::new(); m];
    let mut last: HashMap<(usize, usize), Instant> = HashMap::new();
    let t_seq = Instant::now();
    for round in 0..r {
        for i in 0..n {
            for k in 0..m {
                let j = (i + k + round) % m;
                let t = &targets[j];
                keep_gap(last.get(&(i, j)));
                let mut s = start_client(&nss[i], &certs[i], t);
                let sample = finish(t, &mut s);
                s.client.stop_fast();
                if let Some(dir) = &args.logs {
                    let name = format!("client-seq-{}-c{i:02}-r{round}.log", t.mode);
                    let _ = std::fs::copy(s.client.log_path(), dir.join(name));
                }
                last.insert((i, j), Instant::now());
                seq[j].push(sample);
            }
        }
        eprintln!(
            "sequential round {}/{r} done ({:.0} s)",
            round + 1,
            t_seq.elapsed().as_secs_f64()
        );
    }

    // Concurrent: all N clients at once, one mode at a time, the modes interleaved by round.
    let mut conc: Vec<Vec<Sample>> = vec![Vec::new(); m];
    let mut last_batch: HashMap<usize, Instant> = HashMap::new();
    let mut batch_wall: Vec<Vec<Duration>> = vec![Vec::new(); m];
    let t_conc = Instant::now();
    for round in 0..r {
        for k in 0..m {
            let j = (k + round) % m;
            let t = &targets[j];
            keep_gap(last_batch.get(&j));
            thread::sleep(Duration::from_millis(300));
            let t0 = Instant::now();
            let mut started: Vec<Started> = (0..n)
                .map(|i| start_client(&nss[i], &certs[i], t))
                .collect();
            for s in started.iter_mut() {
                conc[j].push(finish(t, s));
            }
            batch_wall[j].push(t0.elapsed());
            for s in started.iter_mut() {
                s.client.stop_fast();
            }
            last_batch.insert(j, Instant::now());
        }
        eprintln!(
            "concurrent round {}/{r} done ({:.0} s)",
            round + 1,
            t_conc.elapsed().as_secs_f64()
        );
    }

    // Refusals: certificates nobody registered, one at a time, in the modes that can refuse.
    let refusing: Vec<usize> = (0..m)
        .filter(|j| ["ccd", "hook", "mgmt", "hook-deferred"].contains(&targets[*j].mode.as_str()))
        .collect();
    let strangers: Vec<ClientCert> = (0..args.refusals.min(n))
        .map(|i| {
            pki.client(&format!("x{i:02}"), &format!("x{i:02}"))
                .unwrap()
        })
        .collect();
    let mut refused: Vec<Vec<Duration>> = vec![Vec::new(); m];
    // Refused devices that OpenVPN let in all the same: a security failure, counted and shown.
    let mut admitted: Vec<usize> = vec![0; m];
    for (i, cert) in strangers.iter().enumerate() {
        for &j in &refusing {
            let t = &targets[j];
            let mut s = start_client(&nss[i], cert, t);
            match s.client.wait_refused(Duration::from_secs(20)) {
                Ok(_) => {
                    let at = stamp(&s.client.log(), "AUTH_FAILED").unwrap_or(f64::NAN);
                    refused[j].push(Duration::from_secs_f64((at - s.t0).max(0.0)));
                }
                Err(_) if s.client.log().contains("Initialization Sequence Completed") => {
                    admitted[j] += 1;
                    eprintln!(
                        "SECURITY: mode {}: the unregistered {} was refused by pforte but connected",
                        t.mode, cert.cn
                    );
                }
                Err(e) => panic!("{}", t.explain(&s.client, &e)),
            }
            s.client.stop_fast();
            if let Some(dir) = &args.logs {
                let name = format!("client-refused-{}-x{i:02}.log", t.mode);
                let _ = std::fs::copy(s.client.log_path(), dir.join(name));
            }
        }
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at the end: {}", load.trim());
    if let Some(dir) = &args.logs {
        for t in &targets {
            let _ = std::fs::copy(
                t.server.log_path(),
                dir.join(format!("server-{}.log", t.mode)),
            );
            if let Some(d) = &t.daemon {
                let _ = std::fs::write(dir.join(format!("pforte-{}.log", t.mode)), d.log());
            }
        }
        println!("logs in {}", dir.display());
    }
    println!();
    let names: Vec<&str> = targets.iter().map(|t| t.mode.as_str()).collect();
    report(
        &format!("Sequential: {n} clients x {r} rounds, one connect at a time"),
        &names,
        &seq,
        None,
    );
    report(
        &format!("Concurrent: {n} clients started at once, {r} batches"),
        &names,
        &conc,
        Some(&batch_wall),
    );
    if !strangers.is_empty() && !refusing.is_empty() {
        println!(
            "## Refusals: {} unregistered certificates, one at a time",
            strangers.len()
        );
        println!();
        println!(
            "| mode | refused | median ms to AUTH_FAILED | max ms | refused by pforte yet connected |"
        );
        println!("|---|---:|---:|---:|---:|");
        for &j in &refusing {
            let (med, _, max) = median_p90(&refused[j]);
            println!(
                "| {} | {} | {med:.1} | {max:.1} | {} |",
                names[j],
                refused[j].len(),
                admitted[j]
            );
        }
        println!();
    }
    // A word on the pforte modes' own view.
    for t in &targets {
        if let Some(d) = &t.daemon {
            let allowed = d
                .metric("pforte_decisions_total{decision=\"allow\",reason=\"allowed\"}")
                .unwrap_or(0.0);
            println!("{}: pforte allowed {allowed} connects", t.mode);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median (mean of the middle two for an even count) and nearest-rank p90, in ms.
fn median_p90(v: &[Duration]) -> (f64, f64, f64) {
    let mut x: Vec<f64> = v.iter().map(|d| ms(*d)).collect();
    x.sort_by(f64::total_cmp);
    if x.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let n = x.len();
    let median = if n % 2 == 1 {
        x[n / 2]
    } else {
        (x[n / 2 - 1] + x[n / 2]) / 2.0
    };
    let rank = ((0.9 * n as f64).ceil() as usize).clamp(1, n);
    (median, x[rank - 1], x[n - 1])
}

/// Prints one table. The harness's polled times are shown for sequential runs only: waiting
/// for N clients one after the other overstates all but the first.
fn report(title: &str, names: &[&str], samples: &[Vec<Sample>], walls: Option<&[Vec<Duration>]>) {
    println!("## {title}");
    println!();
    let polled_head = if walls.is_none() {
        " polled median ms |"
    } else {
        ""
    };
    let polled_rule = if walls.is_none() { "---:|" } else { "" };
    println!(
        "| mode | connects | median ms | p90 ms | max ms | > 500 ms | median / none | p90 / none |{polled_head}"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|{polled_rule}");
    let base = median_p90(&samples[0].iter().map(|s| s.precise).collect::<Vec<_>>());
    for (j, name) in names.iter().enumerate() {
        let precise: Vec<Duration> = samples[j].iter().map(|s| s.precise).collect();
        let polled: Vec<Duration> = samples[j].iter().map(|s| s.polled).collect();
        let (med, p90, max) = median_p90(&precise);
        let (pmed, _, _) = median_p90(&polled);
        let slow = precise.iter().filter(|d| **d > SLOW).count();
        let polled_cell = if walls.is_none() {
            format!(" {pmed:.1} |")
        } else {
            String::new()
        };
        println!(
            "| {name} | {} | {med:.1} | {p90:.1} | {max:.1} | {slow} | {:.2} | {:.2} |{polled_cell}",
            precise.len(),
            med / base.0,
            p90 / base.1
        );
    }
    if let Some(walls) = walls {
        println!();
        let line: Vec<String> = names
            .iter()
            .zip(walls)
            .map(|(n, w)| {
                let (med, _, max) = median_p90(w);
                format!("{n} {med:.0} ms (max {max:.0})")
            })
            .collect();
        println!(
            "whole batch, first start to last completion, median: {}",
            line.join("; ")
        );
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// The hook process alone
// ---------------------------------------------------------------------------------------------

/// `hyperfine -N` of one client-connect call of `pforte hook openvpn` (against a running
/// daemon, an admitted device) next to `/bin/true` and `pforte --version`, with the
/// environment OpenVPN gives a client-connect script (no PATH).
fn hook_bench(pki: &Pki, work: &Path, args: &Args) {
    let Some(hyperfine) = openvpn::find_tool("hyperfine") else {
        println!(
            "## Hook process\n\nhyperfine not installed (apt-get install -y hyperfine): skipped"
        );
        return;
    };
    let cert = pki.client("hookbench", "hookbench").unwrap();
    let dir = Daemon::prepare(std::slice::from_ref(&cert));
    let socket = Daemon::socket_of(dir.path());
    let daemon = Daemon::start(dir, "10.213.250.0/24", "");
    let ccfile = daemon.dir.path().join("client-connect.conf");
    let json = work.join("hook-hyperfine.json");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .to_string();
    let env: Vec<(&str, String)> = vec![
        ("script_type", "client-connect".into()),
        ("script_context", "init".into()),
        ("dev", "tun0".into()),
        ("dev_type", "tun".into()),
        ("verb", "4".into()),
        ("daemon_pid", std::process::id().to_string()),
        ("common_name", cert.cn.clone()),
        ("X509_0_CN", cert.cn.clone()),
        ("tls_digest_sha256_0", cert.sha256.clone()),
        ("tls_serial_0", cert.serial.clone()),
        ("tls_serial_hex_0", cert.serial_hex.clone()),
        ("trusted_ip", "198.51.100.7".into()),
        ("trusted_port", "51000".into()),
        ("untrusted_ip", "198.51.100.7".into()),
        ("untrusted_port", "51000".into()),
        ("ifconfig_pool_remote_ip", "10.213.250.2".into()),
        ("ifconfig_pool_netmask", "255.255.255.0".into()),
        ("IV_PLAT", "linux".into()),
        ("IV_VER", "2.6.14".into()),
        ("time_unix", now),
        ("client_connect_config_file", ccfile.display().to_string()),
        ("PFORTE_SOCKET", socket.display().to_string()),
        ("PFORTE_ZONE", "office".into()),
        ("PFORTE_INSTANCE", INSTANCE.into()),
    ];
    let bin = pforte_bin();
    let hook_cmd = format!("{} hook openvpn {}", bin.display(), ccfile.display());
    let version_cmd = format!("{} --version", bin.display());
    println!("## Hook process");
    println!();
    let status = Command::new(&hyperfine)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(["-N", "--warmup", "20", "--runs", "300", "--style", "basic"])
        .arg("--export-json")
        .arg(&json)
        .args(["/bin/true", &version_cmd, &hook_cmd])
        .stdout(Stdio::inherit())
        .status()
        .unwrap();
    assert!(status.success(), "hyperfine failed");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let results = v["results"].as_array().cloned().unwrap_or_default();
    let med = |i: usize| {
        results
            .get(i)
            .and_then(|r| r["median"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let p90 = |i: usize| {
        let mut t: Vec<f64> = results
            .get(i)
            .and_then(|r| r["times"].as_array())
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        t.sort_by(f64::total_cmp);
        if t.is_empty() {
            f64::NAN
        } else {
            t[((0.9 * t.len() as f64).ceil() as usize).clamp(1, t.len()) - 1]
        }
    };
    let ok = std::fs::read_to_string(&ccfile).unwrap_or_default();
    assert!(
        ok.contains("ifconfig-push"),
        "the hook did not admit: {ok:?}\n{}",
        daemon.log()
    );
    println!();
    println!("| command | median ms | p90 ms | median / /bin/true |");
    println!("|---|---:|---:|---:|");
    for (i, name) in [
        "/bin/true",
        "pforte --version",
        "pforte hook openvpn (client-connect)",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            med(i) * 1000.0,
            p90(i) * 1000.0,
            med(i) / med(0)
        );
    }
    println!();
    if args.interleaved > 0 {
        hook_interleaved(&env, args);
    }
}

/// `--interleaved N`: N rounds, each spawning `/bin/true` and then the hook of this build and
/// of every `--also-bin` build, 10 ms apart, so that builds are compared call by call and the
/// daemon is idle between calls, as under OpenVPN. Every call is a client-connect of its own
/// session (timed), followed by its client-disconnect (not timed).
fn hook_interleaved(env: &[(&str, String)], args: &Args) {
    let mut bins = vec![pforte_bin()];
    bins.extend(args.also_bins.iter().cloned());
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); bins.len() + 1];
    let mut port = 20_000u32;
    let run = |program: &Path, hook: bool, script_type: &str, port: u32| {
        let mut cmd = Command::new(program);
        if hook {
            cmd.args(["hook", "openvpn"]);
        }
        let status = cmd
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("script_type", script_type)
            .env("trusted_port", port.to_string())
            .env("untrusted_port", port.to_string())
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{} ({script_type}) failed",
            program.display()
        );
    };
    for _ in 0..args.interleaved {
        for (k, slot) in times.iter_mut().enumerate() {
            port += 1;
            thread::sleep(Duration::from_millis(10));
            let t = Instant::now();
            if k == 0 {
                run(Path::new("/bin/true"), false, "client-connect", port);
            } else {
                run(&bins[k - 1], true, "client-connect", port);
            }
            slot.push(t.elapsed().as_secs_f64() * 1000.0);
            if k > 0 {
                run(&bins[k - 1], true, "client-disconnect", port);
            }
        }
    }
    println!(
        "### Interleaved: {} rounds, each `/bin/true` then every build's hook, 10 ms apart",
        args.interleaved
    );
    println!();
    println!("| command | median ms | p90 ms | median / /bin/true |");
    println!("|---|---:|---:|---:|");
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        (at(0.5), at(0.9))
    };
    let (t0, _) = stats(&mut times[0]);
    for (k, v) in times.iter_mut().enumerate() {
        let (m, p) = stats(v);
        let name = if k == 0 {
            "/bin/true".to_string()
        } else {
            format!("{} hook openvpn", bins[k - 1].display())
        };
        println!("| {name} | {m:.2} | {p:.2} | {:.2} |", m / t0);
    }
    println!();
}
