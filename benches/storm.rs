//! pforte's load generator and benchmarks: runs the real daemon (release build) on a generated
//! registry and drives it over its Unix socket with the project's own client.
//!
//! ```sh
//! cargo bench --bench storm -- pairs  --devices 10000 --pairs 200000 --concurrency 32 [--client lean|hyper|both]
//! cargo bench --bench storm -- steady --devices 10000 --rate 1000 --seconds 10
//! cargo bench --bench storm -- sparse --devices 1000 --count 200 --gap-ms 30
//! cargo bench --bench storm -- storm  --devices 1000000 --connects 100000 --concurrency 64
//! cargo bench --bench storm -- scrape --sessions 100 --sessions-large 100000
//! cargo bench --bench storm -- load   --devices 1000000
//! cargo bench --bench storm -- cluster --store postgres --url postgresql://pforte@127.0.0.1:5432/pforte --password-file pw --nodes 3
//! cargo bench --bench storm -- cluster --store sqlite --nodes 1
//! ```
//! Every mode prints its figures, and a last line with the share of CPU time the host's other
//! guests took during the run (steal); `storm` has a progress line on stderr.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/machine.rs"]
mod machine;

#[path = "../tests/support/daemon.rs"]
mod daemon;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use pforte::client::UnixClient;
use pforte::wire::ConnectRequest;
use pforte::wire::DisconnectRequest;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    /// cargo bench passes --bench; ignored.
    #[arg(long, global = true, hide = true)]
    bench: bool,
    /// `synchronous` of the session store: full or normal.
    #[arg(long, global = true, default_value = "normal")]
    synchronous: String,
    /// Another pforte binary to measure (default: this build's).
    #[arg(long, global = true)]
    pforte_bin: Option<PathBuf>,
}

/// The daemon binary under test.
static PFORTE_BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

#[derive(Subcommand)]
enum Mode {
    /// Connect+disconnect pairs as fast as K keep-alive clients go.
    Pairs {
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        #[arg(long, default_value_t = 100_000)]
        pairs: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Load generator: `lean` (a minimal HTTP/1.1 keep-alive client, so that the
        /// generator, which shares the machine's cores with the daemon, takes as little of
        /// them as it can), `hyper` (pforte's own client), or `both` (one after the other,
        /// each on a fresh daemon).
        #[arg(long, default_value = "lean")]
        client: String,
    },
    /// A steady rate of connects (each followed by its disconnect): latency percentiles.
    Steady {
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Sparse connects, as a script hook makes them: each request on a fresh connection
    /// (`pforte::client::request_once`, the hook's own client), a pause between requests so
    /// that the daemon is idle when the next one comes: latency percentiles.
    Sparse {
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Connects (each followed by its disconnect).
        #[arg(long, default_value_t = 200)]
        count: usize,
        /// Pause before every request, milliseconds.
        #[arg(long, default_value_t = 30)]
        gap_ms: u64,
    },
    /// A reconnect storm: N distinct devices connect with concurrency K, hold, disconnect.
    Storm {
        #[arg(long, default_value_t = 1_000_000)]
        devices: usize,
        #[arg(long, default_value_t = 100_000)]
        connects: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Reload the registry (SIGHUP) after this many connects (0: never).
        #[arg(long, default_value_t = 0)]
        reload_at: usize,
    },
    /// /metrics time and size with few and with many sessions.
    Scrape {
        #[arg(long, default_value_t = 100)]
        sessions: usize,
        #[arg(long, default_value_t = 100_000)]
        sessions_large: usize,
    },
    /// A soak: connects, disconnects, operator kills and registry reloads (some revoking
    /// devices) for a while; checks for seat leaks at the end and samples RSS.
    Soak {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        #[arg(long, default_value_t = 20_000)]
        devices: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Connects (each committed before it is answered, none refused) spread over N daemons
    /// sharing one seat pool on PostgreSQL (`--store postgres --url …`; the database's pforte
    /// tables are dropped first), or one daemon on SQLite (`--store sqlite`): connects per
    /// second and latency percentiles.
    Cluster {
        /// sqlite or postgres.
        #[arg(long, default_value = "postgres")]
        store: String,
        /// The PostgreSQL URL (libpq form).
        #[arg(long)]
        url: Option<String>,
        /// A file holding the PostgreSQL password.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Daemons (nodes) sharing the seats.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 50_000)]
        devices: usize,
        #[arg(long, default_value_t = 40_000)]
        connects: usize,
        /// Clients in all, spread evenly over the nodes (each a keep-alive connection).
        #[arg(long, default_value_t = 48)]
        concurrency: usize,
        /// Offered load in connects per second (0: each client sends its next connect as soon
        /// as the last is answered). Paced: connect n is sent at start + n/rate (or once the
        /// client's previous connect is answered, if that is later); its latency counts from
        /// the send, as in `steady` (tokio's timer wakes up to 1 ms late; that is not counted).
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Registry load time and the daemon's memory for N devices.
    Load {
        #[arg(long, default_value_t = 1_000_000)]
        devices: usize,
    },
}

/// What kind of device index `i` is in the generated registry: about 4% private, 3% blocked.
fn kind(i: usize) -> &'static str {
    match i % 100 {
        0..=3 => "private",
        4..=6 => "blocked",
        _ => "good",
    }
}

fn fingerprint(i: usize) -> String {
    let mut out = String::with_capacity(64);
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for _ in 0..4 {
        x ^= x >> 31;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 29;
        write!(out, "{x:016x}").unwrap();
    }
    out
}

/// A daemon on a temp dir. Fields drop in order: the daemon is killed before its dir goes.
struct Bench {
    daemon: Option<daemon::Running>,
    dir: tempfile::TempDir,
    port: u16,
}

impl Bench {
    fn new(devices: usize, max_sessions: usize, synchronous: &str) -> Bench {
        Bench::with_store(devices, max_sessions, synchronous, "")
    }

    /// As [`Bench::new`], with more `[store]` keys (a PostgreSQL backend).
    fn with_store(devices: usize, max_sessions: usize, synchronous: &str, store: &str) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        write_registry(&dir.path().join("devices.csv"), devices);
        eprintln!(
            "generated {devices} devices in {:.1} s",
            started.elapsed().as_secs_f64()
        );
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
socket = "{d}/pforte.sock"
max_connections = 4096
[registry]
devices = "{d}/devices.csv"
watch_interval_s = 0
[store]
path = "{d}/pforte.db"
synchronous = "{synchronous}"
{store}
[audit]
path = "{d}/audit.log"
[policy]
default_org_unit = "staff"
require_hwaddr = false
[capacity]
max_sessions = {max_sessions}
reserved_seats = 0
max_sessions_per_user = 0
[[org_units]]
name = "staff"
level = 1
[[zones]]
name = "office"
level = 1
pool = "10.64.0.0/10"
routes = ["10.1.0.0/16"]
"#
        );
        std::fs::write(dir.path().join("pforte.toml"), config).unwrap();
        let mut b = Bench {
            daemon: None,
            dir,
            port,
        };
        b.start();
        b
    }

    fn start(&mut self) -> Duration {
        let config = self.dir.path().join("pforte.toml");
        let d = daemon::Running::start(daemon::Launch {
            bin: PFORTE_BIN
                .get_or_init(|| PathBuf::from(env!("CARGO_BIN_EXE_pforte")))
                .clone(),
            config: &config,
            port: self.port,
            log_level: "warn",
            env: &[],
            output: daemon::Output::Stderr,
            ready_within: Duration::from_secs(120),
            poll: Duration::from_millis(20),
        });
        let ready_after = d.ready_after;
        self.daemon = Some(d);
        ready_after
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("pforte.sock")
    }

    fn pid(&self) -> u32 {
        self.daemon.as_ref().unwrap().child.id()
    }

    fn rss_mb(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    }

    fn hwm_mb(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    }

    /// CPU seconds used so far: (the daemon, this load generator).
    fn cpu(&self) -> (f64, f64) {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<f64> = after
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let daemon =
            (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / ticks;
        let me = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
            .map(|u| {
                let t =
                    |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
                t(u.user_time()) + t(u.system_time())
            })
            .unwrap_or(0.0);
        (daemon, me)
    }

    /// A metric's value from `/metrics` (exact name with labels).
    fn metric(&self, name: &str) -> Option<f64> {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    fn scrape(&self) -> (Duration, usize) {
        use std::io::Read;
        let started = Instant::now();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        (started.elapsed(), buf.len())
    }

    fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.terminate();
        }
    }
}

fn write_registry(path: &Path, n: usize) {
    write_registry_with(path, n, |_| false);
}

/// The registry, with `revoked(i)` devices marked blocked.
fn write_registry_with(path: &Path, n: usize, revoked: impl Fn(usize) -> bool) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    writeln!(
        w,
        "device_id,ownership,status,org_unit,clearance,disk_encrypted,patched_on,cert_sha256,cert_serial,hwaddr,users"
    )
    .unwrap();
    let today = chrono::Utc::now().date_naive();
    for i in 0..n {
        let (own, status) = match kind(i) {
            "private" => ("private", "active"),
            "blocked" => ("service", "blocked"),
            _ if revoked(i) => ("service", "blocked"),
            _ => ("service", "active"),
        };
        writeln!(
            w,
            "D{i},{own},{status},staff,1,true,{today},{},{},,",
            fingerprint(i),
            1_000_000 + i
        )
        .unwrap();
    }
    w.flush().unwrap();
}

fn request(i: usize) -> ConnectRequest {
    ConnectRequest {
        vpn: "openvpn".into(),
        instance: "bench".into(),
        zone: "office".into(),
        username: format!("u{i}"),
        cert_sha256: fingerprint(i),
        remote_addr: format!("198.51.100.{}:{}", i % 250, 1024 + i % 60000),
        session_key: format!("k{i}"),
        ..Default::default()
    }
}

fn disconnect(i: usize) -> DisconnectRequest {
    DisconnectRequest {
        vpn: "openvpn".into(),
        instance: "bench".into(),
        session_key: format!("k{i}"),
        bytes_received: Some(1000),
        bytes_sent: Some(2000),
        ..Default::default()
    }
}

#[derive(Default)]
struct Latencies(Vec<u32>);

impl Latencies {
    fn pct(&mut self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let idx = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.0[idx]) / 1000.0
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn pairs(cli: &Cli, devices: usize, pairs: usize, concurrency: usize, client: &str) {
    match client {
        "hyper" => pairs_hyper(cli, devices, pairs, concurrency),
        "lean" => pairs_lean(cli, devices, pairs, concurrency),
        "both" => {
            pairs_lean(cli, devices, pairs, concurrency);
            pairs_hyper(cli, devices, pairs, concurrency);
        }
        other => panic!("--client {other}: lean, hyper or both"),
    }
}

/// The device index of the `n`-th pair: good devices only (7..=99 of every hundred), so every
/// pair is a real admission and a real end, each good device once per cycle, so that two pairs
/// in flight never share a device (a client would have to lag a whole cycle behind).
fn pair_device(n: usize, devices: usize) -> usize {
    let good = (devices / 100 * 93).max(1);
    let k = n % good;
    (k / 93 * 100 + 7 + k % 93) % devices.max(1)
}

/// A minimal HTTP/1.1 client on one keep-alive connection, for load generation only: one
/// write per request, the answer read by its `content-length`. It asserts what the daemon must
/// hold to (HTTP/1.1, a status, a content-length, no chunking) and gives up on anything else.
struct LeanClient {
    stream: tokio::net::UnixStream,
    buf: Vec<u8>,
}

/// The bytes of an HTTP/1.1 `POST` with a JSON body. The lean client's requests are made
/// before the clock starts, so that the load generator spends its share of the two cores on
/// the exchange, not on formatting.
fn http_post(path: &str, body: &impl serde::Serialize) -> Vec<u8> {
    let json = serde_json::to_vec(body).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: pforte\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        json.len()
    )
    .into_bytes();
    req.extend_from_slice(&json);
    req
}

impl LeanClient {
    async fn connect(path: &Path) -> LeanClient {
        LeanClient {
            stream: tokio::net::UnixStream::connect(path).await.unwrap(),
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one whole request (see [`http_post`]); the status and the body of the answer.
    async fn send(&mut self, request: &[u8]) -> std::io::Result<(u16, &[u8])> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(request).await?;
        self.buf.clear();
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head =
                    std::str::from_utf8(&self.buf[..end]).map_err(|_| bad("head not UTF-8"))?;
                let mut lines = head.split("\r\n");
                let status: u16 = lines
                    .next()
                    .and_then(|l| l.strip_prefix("HTTP/1.1 "))
                    .and_then(|l| l.get(..3))
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| bad("no status line"))?;
                let mut len = None;
                for l in lines {
                    let (k, v) = l.split_once(':').ok_or_else(|| bad("bad header"))?;
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse::<usize>().ok();
                    } else if k.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(bad("chunked answer"));
                    }
                }
                let len = len.ok_or_else(|| bad("no content-length"))?;
                let start = end + 4;
                while self.buf.len() < start + len {
                    let mut chunk = [0u8; 4096];
                    let n = self.stream.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(bad("closed mid-body"));
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                return Ok((status, &self.buf[start..start + len]));
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(bad("closed before the answer"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A device and the bytes of its connect and its disconnect request.
type PairRequests = (usize, Vec<u8>, Vec<u8>);

/// What both `pairs` clients share: the daemon, the next pair to take, the error count, the
/// clock and the CPU at the start, and the report.
struct PairsRun {
    b: Bench,
    next: Arc<AtomicUsize>,
    errors: Arc<AtomicU64>,
    cpu_before: (f64, f64),
    started: Instant,
}

impl PairsRun {
    /// Starts the clock on a running daemon.
    fn start(b: Bench) -> PairsRun {
        PairsRun {
            cpu_before: b.cpu(),
            b,
            next: Arc::new(AtomicUsize::new(0)),
            errors: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        }
    }

    /// Runs `concurrency` clients, each given the socket, the next-pair counter and the error
    /// count; gathers their connect latencies.
    fn drive<F, Fut>(&self, concurrency: usize, client: F) -> Latencies
    where
        F: Fn(PathBuf, Arc<AtomicUsize>, Arc<AtomicU64>) -> Fut,
        Fut: std::future::Future<Output = Vec<u32>> + Send + 'static,
    {
        runtime().block_on(async {
            let tasks: Vec<_> = (0..concurrency)
                .map(|_| {
                    tokio::spawn(client(
                        self.b.socket(),
                        self.next.clone(),
                        self.errors.clone(),
                    ))
                })
                .collect();
            let mut all = Latencies::default();
            for t in tasks {
                all.0.extend(t.await.unwrap());
            }
            all
        })
    }

    /// Prints the run's figures; the number of failed requests.
    fn report(
        &self,
        label: &str,
        cli: &Cli,
        pairs: usize,
        concurrency: usize,
        mut lat: Latencies,
    ) -> u64 {
        let secs = self.started.elapsed().as_secs_f64();
        let cpu_after = self.b.cpu();
        let errors = self.errors.load(Ordering::Relaxed);
        println!(
            "pairs ({label} client): {pairs} connect+disconnect pairs, {concurrency} clients, synchronous={}: {:.1} s, {:.0} pairs/s = {:.0} requests/s; connect latency p50 {:.3} ms p99 {:.3} ms; errors {errors}; daemon RSS {:.0} MB; CPU: daemon {:.2} cores, load generator {:.2} cores",
            cli.synchronous,
            secs,
            pairs as f64 / secs,
            2.0 * pairs as f64 / secs,
            lat.pct(0.5),
            lat.pct(0.99),
            self.b.rss_mb(),
            (cpu_after.0 - self.cpu_before.0) / secs,
            (cpu_after.1 - self.cpu_before.1) / secs
        );
        errors
    }
}

/// Counts a failed request of the lean client; the first few are shown.
fn failed(errors: &AtomicU64, what: &str, device: usize, answer: std::io::Result<(u16, &[u8])>) {
    if errors.fetch_add(1, Ordering::Relaxed) < 5 {
        let answer = answer.map(|(s, b)| (s, String::from_utf8_lossy(b).into_owned()));
        eprintln!("{what} of device {device}: {answer:?}");
    }
}

fn pairs_lean(cli: &Cli, devices: usize, pairs: usize, concurrency: usize) {
    let b = Bench::new(devices, devices + 10, &cli.synchronous);
    // Every request of the run, made up front: (device, connect, disconnect) per good device.
    let good = (devices / 100 * 93).max(1);
    let requests: Arc<Vec<PairRequests>> = Arc::new(
        (0..good.min(pairs))
            .map(|n| {
                let i = pair_device(n, devices);
                (
                    i,
                    http_post("/v1/connect", &request(i)),
                    http_post("/v1/disconnect", &disconnect(i)),
                )
            })
            .collect(),
    );
    let run = PairsRun::start(b);
    let lat = run.drive(concurrency, |socket, next, errors| {
        let requests = requests.clone();
        async move {
            let mut c = LeanClient::connect(&socket).await;
            let mut lat = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= pairs {
                    return lat;
                }
                let (i, connect, disconnect) = &requests[n % requests.len()];
                let t = Instant::now();
                match c.send(connect).await {
                    Ok((200, body)) if body.starts_with(b"{\"decision\":\"allow\"") => {}
                    other => failed(&errors, "connect", *i, other),
                }
                lat.push(t.elapsed().as_micros() as u32);
                match c.send(disconnect).await {
                    Ok((200, body)) if body.windows(7).any(|w| w == b"\"ended\"") => {}
                    other => failed(&errors, "disconnect", *i, other),
                }
            }
        }
    });
    let errors = run.report("lean", cli, pairs, concurrency, lat);
    assert_eq!(errors, 0, "requests failed");
    assert_eq!(run.b.metric("pforte_seats_used"), Some(0.0), "seats leaked");
}

fn pairs_hyper(cli: &Cli, devices: usize, pairs: usize, concurrency: usize) {
    let run = PairsRun::start(Bench::new(devices, devices + 10, &cli.synchronous));
    let lat = run.drive(concurrency, |socket, next, errors| async move {
        let mut c = UnixClient::connect(&socket).await.unwrap();
        let mut lat = Vec::new();
        loop {
            let n = next.fetch_add(1, Ordering::Relaxed);
            if n >= pairs {
                return lat;
            }
            let i = pair_device(n, devices);
            let t = Instant::now();
            match c.connect_request(&request(i)).await {
                Ok((200, _)) => {}
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat.push(t.elapsed().as_micros() as u32);
            if c.disconnect_request(&disconnect(i)).await.is_err() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    run.report("hyper", cli, pairs, concurrency, lat);
}

fn steady(cli: &Cli, devices: usize, rate: u64, seconds: u64) {
    let b = Bench::new(devices, devices + 10, &cli.synchronous);
    let total = (rate * seconds) as usize;
    let lat = runtime().block_on(async {
        // Paced: worker w sends request k*W + w at start + (k*W + w)/rate; latency runs from the
        // moment the request is sent (timer slack delays sending, it is not counted).
        const WORKERS: usize = 16;
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let interval = Duration::from_nanos(1_000_000_000 / rate);
        let mut workers = Vec::new();
        for w in 0..WORKERS {
            let socket = b.socket();
            workers.push(tokio::spawn(async move {
                let mut c = UnixClient::connect(&socket).await.unwrap();
                let mut lat = Vec::new();
                let mut n = w;
                while n < total {
                    tokio::time::sleep_until(start + interval * n as u32).await;
                    let i = (n * 100 / 93) % devices;
                    let i = if kind(i) == "good" {
                        i
                    } else {
                        (i / 100) * 100 + 50
                    };
                    let t = Instant::now();
                    let (s, _) = c.connect_request(&request(i)).await.unwrap();
                    lat.push(t.elapsed().as_micros() as u32);
                    assert_eq!(s, 200);
                    c.disconnect_request(&disconnect(i)).await.unwrap();
                    n += WORKERS;
                }
                lat
            }));
        }
        let mut all = Latencies::default();
        for w in workers {
            all.0.extend(w.await.unwrap());
        }
        all
    });
    let mut lat = lat;
    println!(
        "steady: {rate} connects/s (each with its disconnect) for {seconds} s, synchronous={}: connect latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        cli.synchronous,
        lat.pct(0.5),
        lat.pct(0.99),
        lat.pct(0.999),
        lat.pct(1.0)
    );
}

fn sparse(cli: &Cli, devices: usize, count: usize, gap_ms: u64) {
    let b = Bench::new(devices, devices + 10, &cli.synchronous);
    let socket = b.socket();
    let gap = Duration::from_millis(gap_ms);
    let timeout = Duration::from_secs(2);
    let mut connects = Latencies::default();
    let mut disconnects = Latencies::default();
    for n in 0..count {
        let i = (n * 100 / 93) % devices;
        let i = if kind(i) == "good" {
            i
        } else {
            (i / 100) * 100 + 50
        };
        let body = serde_json::to_vec(&request(i)).unwrap();
        std::thread::sleep(gap);
        let t = Instant::now();
        let (s, _) =
            pforte::client::request_once(&socket, "POST", "/v1/connect", &body, timeout).unwrap();
        connects.0.push(t.elapsed().as_micros() as u32);
        assert_eq!(s, 200, "connect of device {i}");
        let body = serde_json::to_vec(&disconnect(i)).unwrap();
        std::thread::sleep(gap);
        let t = Instant::now();
        let (s, _) =
            pforte::client::request_once(&socket, "POST", "/v1/disconnect", &body, timeout)
                .unwrap();
        disconnects.0.push(t.elapsed().as_micros() as u32);
        assert_eq!(s, 200, "disconnect of device {i}");
    }
    println!(
        "sparse: {count} connects and disconnects, {gap_ms} ms apart, a connection each, synchronous={}: connect p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms; disconnect p50 {:.3} ms, p90 {:.3} ms",
        cli.synchronous,
        connects.pct(0.5),
        connects.pct(0.9),
        connects.pct(0.99),
        disconnects.pct(0.5),
        disconnects.pct(0.9),
    );
}

fn storm(cli: &Cli, devices: usize, connects: usize, concurrency: usize, reload_at: usize) {
    // Seats for 95% of the good devices that connect: the rest are refused for capacity.
    let good = (0..connects).filter(|i| kind(*i) == "good").count();
    let seats = good * 95 / 100;
    let b = Bench::new(devices, seats, &cli.synchronous);
    let rss_idle = b.rss_mb();
    println!(
        "storm: registry {devices} devices, {connects} connects ({good} good, seats {seats}), concurrency {concurrency}, synchronous={}; daemon RSS at start {rss_idle:.0} MB",
        cli.synchronous
    );
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let allowed = Arc::new(AtomicU64::new(0));
    let pid = b.pid();
    let started = Instant::now();
    let progress = {
        let done = done.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let d = done.load(Ordering::Relaxed);
                let el = started.elapsed().as_secs_f64();
                eprint!(
                    "\r  {d}/{connects} decided, {:.0}/s     ",
                    d as f64 / el.max(1e-9)
                );
                if d >= connects {
                    eprintln!();
                    return;
                }
            }
        })
    };
    let mut lat = runtime().block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let socket = b.socket();
            let (next, done, errors, allowed) =
                (next.clone(), done.clone(), errors.clone(), allowed.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = UnixClient::connect(&socket).await.unwrap();
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= connects {
                        return lat;
                    }
                    if reload_at > 0 && i == reload_at {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGHUP,
                        );
                    }
                    let t = Instant::now();
                    match c.connect_request(&request(i)).await {
                        Ok((200, _)) => {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((403, _)) => {}
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    lat.push(t.elapsed().as_micros() as u32);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let mut all = Latencies::default();
        for t in tasks {
            all.0.extend(t.await.unwrap());
        }
        all
    });
    let secs = started.elapsed().as_secs_f64();
    let _ = progress.join();
    let rss_peak = b.hwm_mb();
    let (scrape, size) = b.scrape();
    println!(
        "storm: {connects} connects decided in {secs:.2} s = {:.0}/s; allowed {}, refused {}, errors {}; latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms; daemon RSS now {:.0} MB, peak {rss_peak:.0} MB; /metrics {:.1} ms, {size} bytes",
        connects as f64 / secs,
        allowed.load(Ordering::Relaxed),
        connects as u64 - allowed.load(Ordering::Relaxed) - errors.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        lat.pct(0.5),
        lat.pct(0.99),
        lat.pct(0.999),
        lat.pct(1.0),
        b.rss_mb(),
        scrape.as_secs_f64() * 1000.0,
    );
    // Hold, then everyone disconnects.
    let started = Instant::now();
    runtime().block_on(async {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let socket = b.socket();
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = UnixClient::connect(&socket).await.unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= connects {
                        return;
                    }
                    c.disconnect_request(&disconnect(i)).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    println!(
        "storm: {connects} disconnects in {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

/// Runs one statement batch on the bench's PostgreSQL; returns the first column of the last row.
fn pg_exec(url: &str, password_file: Option<&Path>, sql: &str) -> Option<String> {
    runtime().block_on(async {
        let mut config: tokio_postgres::Config = url.parse().unwrap();
        if let Some(p) = password_file {
            config.password(std::fs::read_to_string(p).unwrap().trim_end());
        }
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let rows = client.simple_query(sql).await.unwrap();
        rows.iter().rev().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
    })
}

fn cluster(
    cli: &Cli,
    store: &str,
    url: Option<&str>,
    password_file: Option<&Path>,
    (nodes, devices, connects, concurrency, rate): (usize, usize, usize, usize, u64),
) {
    let good: Vec<usize> = (0..devices)
        .filter(|i| kind(*i) == "good")
        .take(connects)
        .collect();
    assert_eq!(good.len(), connects, "--devices too few for --connects");
    let mut benches = Vec::new();
    match store {
        "sqlite" => {
            assert_eq!(nodes, 1, "SQLite: one node");
            benches.push(Bench::new(devices, connects + 10, &cli.synchronous));
        }
        "postgres" => {
            let url = url.expect("--url");
            pg_exec(
                url,
                password_file,
                "DROP TABLE IF EXISTS pforte_schema, pforte_cluster, pforte_sessions, pforte_counts, pforte_nodes, pforte_kills CASCADE;
                 DROP FUNCTION IF EXISTS pforte_apply(jsonb), pforte_end(text, text, text), pforte_expire(text), pforte_bump(text[], text[], integer);",
            );
            for n in 0..nodes {
                let pw = password_file
                    .map(|p| format!("password_file = \"{}\"\n", p.display()))
                    .unwrap_or_default();
                let keys = format!(
                    "backend = \"postgres\"\nurl = \"{url}\"\n{pw}node = \"bench{n}\"\nlease_s = 60\n"
                );
                benches.push(Bench::with_store(
                    devices,
                    connects + 10,
                    &cli.synchronous,
                    &keys,
                ));
            }
        }
        other => panic!("--store {other}: sqlite or postgres"),
    }
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        good.iter()
            .map(|i| http_post("/v1/connect", &request(*i)))
            .collect(),
    );
    let sockets: Vec<PathBuf> = benches.iter().map(Bench::socket).collect();
    let cpu_before: Vec<(f64, f64)> = benches.iter().map(Bench::cpu).collect();
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut lat = runtime().block_on(async {
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
        let tasks: Vec<_> = (0..concurrency)
            .map(|t| {
                let socket = sockets[t % sockets.len()].clone();
                let (next, errors, requests) = (next.clone(), errors.clone(), requests.clone());
                tokio::spawn(async move {
                    let mut c = LeanClient::connect(&socket).await;
                    let mut lat = Vec::new();
                    // Paced: this client's connects are t, t + clients, t + 2 × clients, …
                    let mut paced = (t..requests.len()).step_by(concurrency);
                    loop {
                        let n = if rate == 0 {
                            next.fetch_add(1, Ordering::Relaxed)
                        } else {
                            paced.next().unwrap_or(usize::MAX)
                        };
                        if n >= requests.len() {
                            return lat;
                        }
                        if rate != 0 {
                            tokio::time::sleep_until(start + interval * n as u32).await;
                        }
                        let t = Instant::now();
                        match c.send(&requests[n]).await {
                            Ok((200, body)) if body.starts_with(b"{\"decision\":\"allow\"") => {}
                            other => failed(&errors, "connect", n, other),
                        }
                        lat.push(t.elapsed().as_micros() as u32);
                    }
                })
            })
            .collect();
        let mut all = Latencies::default();
        for t in tasks {
            all.0.extend(t.await.unwrap());
        }
        all
    });
    let secs = started.elapsed().as_secs_f64();
    let daemons_cpu: f64 = benches
        .iter()
        .zip(&cpu_before)
        .map(|(b, before)| b.cpu().0 - before.0)
        .sum();
    let me_cpu = benches[0].cpu().1 - cpu_before[0].1;
    let errors = errors.load(Ordering::Relaxed);
    let offered = if rate == 0 {
        String::from("closed loop")
    } else {
        format!("offered {rate}/s")
    };
    println!(
        "cluster ({store}, {nodes} node{}): {connects} connects, {concurrency} clients, {offered}, synchronous={}: {secs:.2} s = {:.0} connects/s; latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms; errors {errors}; CPU: daemons {:.2} cores, load generator {:.2} cores",
        if nodes == 1 { "" } else { "s" },
        cli.synchronous,
        connects as f64 / secs,
        lat.pct(0.5),
        lat.pct(0.99),
        lat.pct(0.999),
        lat.pct(1.0),
        daemons_cpu / secs,
        me_cpu / secs,
    );
    assert_eq!(errors, 0, "connects failed");
    if store == "postgres" {
        let stored = pg_exec(
            url.unwrap_or_default(),
            password_file,
            "SELECT count(*) FROM pforte_sessions",
        );
        println!(
            "cluster: sessions in PostgreSQL after the run: {stored:?} (connects acknowledged: {connects})"
        );
        assert_eq!(stored, Some(connects.to_string()));
    }
}

fn fill(b: &Bench, n: usize) {
    runtime().block_on(async {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let socket = b.socket();
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = UnixClient::connect(&socket).await.unwrap();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= n {
                        return;
                    }
                    let i = k / 93 * 100 + 7 + k % 93;
                    let (s, _) = c.connect_request(&request(i)).await.unwrap();
                    assert_eq!(s, 200, "device {i}");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

fn scrape(cli: &Cli, small: usize, large: usize) {
    let devices = large * 100 / 93 + 200;
    let measure = |n: usize| -> (f64, usize) {
        let b = Bench::new(devices, large + 10, &cli.synchronous);
        fill(&b, n);
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..50 {
            let (t, s) = b.scrape();
            times.push(t.as_secs_f64() * 1000.0);
            size = s;
        }
        times.sort_by(f64::total_cmp);
        (times[times.len() / 2], size)
    };
    let (t_small, s_small) = measure(small);
    let (t_large, s_large) = measure(large);
    println!(
        "scrape: {small} sessions: median {t_small:.2} ms, {s_small} bytes; {large} sessions: median {t_large:.2} ms, {s_large} bytes; ratio time {:.2}, size {:.2}",
        t_large / t_small,
        s_large as f64 / s_small as f64
    );
}

fn load(cli: &Cli, devices: usize) {
    let mut b = Bench::new(devices, 10, &cli.synchronous);
    let rss = b.rss_mb();
    b.stop();
    let t = b.start();
    println!(
        "load: {devices} devices: daemon start to ready {:.2} s (registry load included); RSS {:.0} MB (after first start {rss:.0} MB)",
        t.as_secs_f64(),
        b.rss_mb()
    );
}

/// A small deterministic generator (xorshift), so runs are repeatable without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn soak(cli: &Cli, seconds: u64, devices: usize, concurrency: usize) {
    let b = Bench::new(devices, devices, &cli.synchronous);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let stats: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let (connects, allowed, disconnects, kills, reloads, errors) = (0, 1, 2, 3, 4, 5);
    let pid = b.pid();
    let registry = b.dir.path().join("devices.csv");
    // Reloads every 10 s; every other one revokes a rotating 1% of the devices.
    let reloader = {
        let stats = stats.clone();
        std::thread::spawn(move || {
            let mut n = 0usize;
            while Instant::now() + Duration::from_secs(10) < deadline {
                std::thread::sleep(Duration::from_secs(10));
                n += 1;
                let slice = n % 50;
                let tmp = registry.with_extension("tmp");
                write_registry_with(&tmp, devices, |i| n % 2 == 1 && i % 100 == 50 + slice % 40);
                std::fs::rename(&tmp, &registry).unwrap();
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGHUP,
                );
                stats[reloads].fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let sampler = {
        let pid = b.pid();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_secs(10));
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let rss = status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
                    .unwrap_or(0.0)
                    / 1024.0;
                samples.push((started.elapsed().as_secs(), rss));
                eprint!(
                    "\r  {:>4} s: RSS {rss:.1} MB     ",
                    started.elapsed().as_secs()
                );
            }
            eprintln!();
            samples
        })
    };
    runtime().block_on(async {
        let mut tasks = Vec::new();
        for w in 0..concurrency {
            let socket = b.socket();
            let stats = stats.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = UnixClient::connect(&socket).await.unwrap();
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1));
                let mut held: Vec<(usize, String)> = Vec::new();
                let mut serial = 0usize;
                while Instant::now() < deadline {
                    // Around 200 sessions per client at any time (a steady state, so RSS
                    // must stay flat): connect below that, mostly end above it.
                    let roll = rng.below(100);
                    let connect_share = if held.len() < 200 { 70 } else { 30 };
                    if roll < connect_share || held.is_empty() {
                        // Devices are split between the clients so keys never collide.
                        let i = rng.below(devices / concurrency) * concurrency + w;
                        serial += 1;
                        let mut req = request(i);
                        req.session_key = format!("w{w}-{serial}");
                        stats[connects].fetch_add(1, Ordering::Relaxed);
                        match c.connect_request(&req).await {
                            Ok((200, r)) => {
                                stats[allowed].fetch_add(1, Ordering::Relaxed);
                                held.push((serial, r.session_id.unwrap_or_default()));
                            }
                            Ok(_) => {}
                            Err(_) => {
                                stats[errors].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    } else if roll < connect_share + (100 - connect_share) * 4 / 5 {
                        let (k, _) = held.swap_remove(rng.below(held.len()));
                        let mut d = disconnect(0);
                        d.session_key = format!("w{w}-{k}");
                        stats[disconnects].fetch_add(1, Ordering::Relaxed);
                        if c.disconnect_request(&d).await.is_err() {
                            stats[errors].fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        let (_, id) = held.swap_remove(rng.below(held.len()));
                        stats[kills].fetch_add(1, Ordering::Relaxed);
                        if c.request(hyper::Method::DELETE, &format!("/v1/sessions/{id}"), None)
                            .await
                            .is_err()
                        {
                            stats[errors].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                // The end: everyone leaves.
                for (k, _) in held {
                    let mut d = disconnect(0);
                    d.session_key = format!("w{w}-{k}");
                    let _ = c.disconnect_request(&d).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let _ = reloader.join();
    let samples = sampler.join().unwrap();
    let metrics = {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", b.port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    };
    let seats = metrics
        .lines()
        .find(|l| l.starts_with("pforte_seats_used "))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("?")
        .to_string();
    let warm: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= 60)
        .map(|(_, r)| *r)
        .collect();
    let (first, last) = (
        warm.first().copied().unwrap_or(0.0),
        warm.last().copied().unwrap_or(0.0),
    );
    let max = warm.iter().copied().fold(0.0, f64::max);
    let get = |i: usize| stats[i].load(Ordering::Relaxed);
    println!(
        "soak: {seconds} s, {concurrency} clients, {devices} devices: {} connects ({} allowed), {} disconnects, {} operator kills, {} reloads, {} errors; seats used at the end: {seats} (0 = no leak); RSS after 1 min {first:.1} MB, at the end {last:.1} MB, max {max:.1} MB",
        get(connects),
        get(allowed),
        get(disconnects),
        get(kills),
        get(reloads),
        get(errors)
    );
}

fn main() {
    let cli = Cli::parse();
    if let Some(bin) = &cli.pforte_bin {
        assert!(
            bin.is_file(),
            "--pforte-bin {}: no such file",
            bin.display()
        );
        let _ = PFORTE_BIN.set(bin.clone());
    }
    let machine_before = machine::cpu_times();
    match cli.mode {
        Mode::Pairs {
            devices,
            pairs: n,
            concurrency,
            ref client,
        } => pairs(&cli, devices, n, concurrency, client),
        Mode::Steady {
            devices,
            rate,
            seconds,
        } => steady(&cli, devices, rate, seconds),
        Mode::Sparse {
            devices,
            count,
            gap_ms,
        } => sparse(&cli, devices, count, gap_ms),
        Mode::Storm {
            devices,
            connects,
            concurrency,
            reload_at,
        } => storm(&cli, devices, connects, concurrency, reload_at),
        Mode::Scrape {
            sessions,
            sessions_large,
        } => scrape(&cli, sessions, sessions_large),
        Mode::Load { devices } => load(&cli, devices),
        Mode::Cluster {
            ref store,
            ref url,
            ref password_file,
            nodes,
            devices,
            connects,
            concurrency,
            rate,
        } => cluster(
            &cli,
            store,
            url.as_deref(),
            password_file.as_deref(),
            (nodes, devices, connects, concurrency, rate),
        ),
        Mode::Soak {
            seconds,
            devices,
            concurrency,
        } => soak(&cli, seconds, devices, concurrency),
    }
    if let Some(line) = machine::report(machine_before) {
        println!("{line}");
    }
}
