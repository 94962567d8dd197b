//! End to end for the operations pack: a real Prometheus (Debian `prometheus`) scrapes the real
//! daemon every second and evaluates the repository's rules every second, and a real Alertmanager
//! (Debian `prometheus-alertmanager`) sends pages to a webhook served by this test.
//!
//! The test drives pforte to seat saturation through its API and waits for the page at the
//! webhook, checks that every rule evaluates without error against the real series, and runs
//! every PromQL expression of the Grafana dashboards against that Prometheus: each must parse and
//! return data (no dead panel).
//!
//! Everything listens on 127.0.0.1 only; Prometheus and Alertmanager are killed on drop (also when
//! the test panics) and their files live in a temporary folder.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pforte::wire::DisconnectRequest;
use serde_json::Value;

use crate::common::harness::{Case, Need, trial};
use crate::common::*;

/// How long Prometheus and Alertmanager may take to become ready.
const READY: Duration = Duration::from_secs(30);
/// How long the page may take from saturation to the webhook.
const PAGE: Duration = Duration::from_secs(60);
/// Scrapes of pforte after the API traffic before the dashboards are queried (rates and
/// increases need at least two samples of the changed counters).
const SCRAPES_AFTER_TRAFFIC: f64 = 4.0;

// ------------------------------------------------------------------------------- processes

/// A started program (Prometheus, Alertmanager) with its output in a log file; killed on drop.
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Service {
    fn start(name: &'static str, program: &str, args: &[String], log: PathBuf, port: u16) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            // Keep them light on a shared machine.
            .env("GOMAXPROCS", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Service {
            name,
            child,
            log,
            port,
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        // The end is what matters; keep failure messages readable.
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits (bounded) until `GET /-/ready` answers 200.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited early with {status}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            if request(self.port, "GET", "/-/ready", "").is_some_and(|(s, _)| s == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{} not ready within {READY:?}; log:\n{}",
            self.name,
            self.log()
        );
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// --------------------------------------------------------------------------------- webhook

/// An HTTP server on 127.0.0.1 that answers 200 to everything and keeps the POST bodies: the
/// Alertmanager receiver.
struct Webhook {
    port: u16,
    bodies: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Webhook {
    fn start() -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let bodies = Arc::clone(&bodies);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut stream) = stream else { continue };
                    if let Some((method, body)) = read_request(&mut stream) {
                        let _ = stream.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                        if method == "POST" {
                            bodies
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(body);
                        }
                    }
                }
            })
        };
        Webhook {
            port,
            bodies,
            stop,
            thread: Some(thread),
        }
    }

    fn bodies(&self) -> Vec<String> {
        self.bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The alert names received firing with `severity="page"`.
    fn firing_pages(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for body in self.bodies() {
            let Ok(v) = serde_json::from_str::<Value>(&body) else {
                continue;
            };
            for alert in v["alerts"].as_array().into_iter().flatten() {
                if alert["status"] == "firing"
                    && alert["labels"]["severity"] == "page"
                    && let Some(name) = alert["labels"]["alertname"].as_str()
                {
                    names.insert(name.to_string());
                }
            }
        }
        names
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one HTTP/1.1 request (Content-Length or chunked body): (method, body).
fn read_request(stream: &mut TcpStream) -> Option<(String, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 || buf.len() > 1 << 20 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let method = head.split(' ').next()?.to_ascii_uppercase();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let mut body = buf[head_end..].to_vec();
    if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        while find(&body, b"0\r\n\r\n").is_none() {
            let n = stream.read(&mut chunk).ok()?;
            if n == 0 || body.len() > 1 << 22 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body = dechunk(&body);
    } else {
        let len: usize = header("content-length:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while body.len() < len {
            let n = stream.read(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Some((method, String::from_utf8_lossy(&body).into_owned()))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a chunked body (no trailers).
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(data, b"\r\n") {
        let size = std::str::from_utf8(&data[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || data.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = data.get(eol + 2 + size + 2..).unwrap_or_default();
    }
    out
}

// ---------------------------------------------------------------------------- HTTP client

/// A blocking HTTP/1.0 request to 127.0.0.1:`port` (1.0, so Go servers answer without chunking
/// and close the connection). A non-empty body is sent as a form: (status, body).
fn request(port: u16, method: &str, path: &str, form: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n");
    if !form.is_empty() {
        req.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{form}", form.len()));
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((status, body.to_string()))
}

/// Percent-encoding for a form value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query: Prometheus's whole JSON answer (or a description of what went wrong).
fn query(port: u16, promql: &str) -> Result<Value, String> {
    let (status, body) = request(
        port,
        "POST",
        "/api/v1/query",
        &format!("query={}", encode(promql)),
    )
    .ok_or_else(|| "no answer from Prometheus".to_string())?;
    let v: Value = serde_json::from_str(&body)
        .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
    if v["status"] != "success" {
        return Err(format!("HTTP {status}: {v}"));
    }
    Ok(v)
}

/// The value of the first sample an instant query returns.
fn query_value(port: u16, promql: &str) -> Option<f64> {
    let v = query(port, promql).ok()?;
    let data = &v["data"];
    let value = match data["resultType"].as_str()? {
        "scalar" => &data["result"][1],
        "vector" => &data["result"][0]["value"][1],
        _ => return None,
    };
    value.as_str()?.parse().ok()
}

/// Every sample value of a vector or scalar answer, as Prometheus formats them.
fn sample_values(answer: &Value) -> Vec<String> {
    let data = &answer["data"];
    let result = &data["result"];
    match data["resultType"].as_str() {
        Some("scalar") | Some("string") => vec![result[1].as_str().unwrap_or("").to_string()],
        Some("vector") => result
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["value"][1].as_str().unwrap_or("").to_string())
            .collect(),
        Some("matrix") => result
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
            .map(|p| p[1].as_str().unwrap_or("").to_string())
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether an answer has at least one sample that is a number (all-NaN shows as no data).
fn has_data(answer: &Value) -> bool {
    sample_values(answer).iter().any(|v| v != "NaN")
}

/// The expression without a trailing `or on() vector(c)` placeholder, if it has one. `or` binds
/// loosest, so what is left is the real query.
fn without_placeholder(expr: &str) -> Option<String> {
    let t = expr.trim_end();
    let at = t.rfind("vector(")?;
    let constant = t[at..].strip_prefix("vector(")?.strip_suffix(')')?;
    constant.trim().parse::<f64>().ok()?;
    let before = t[..at].trim_end();
    let before = before
        .strip_suffix("on()")
        .or_else(|| before.strip_suffix("on ()"))?
        .trim_end()
        .strip_suffix("or")?;
    Some(before.trim_end().to_string())
}

/// Waits (bounded) until an instant query's first value satisfies `ok`.
fn wait_value(port: u16, promql: &str, within: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        last = query_value(port, promql);
        if let Some(v) = last.filter(|v| ok(*v)) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out after {within:?} waiting on `{promql}` (last value {last:?})");
}

// ------------------------------------------------------------------------------ dashboards

/// Every target `expr` of every panel (rows and nested panels included) of every dashboard:
/// (dashboard file, panel title, expr).
fn dashboard_exprs() -> Vec<(String, String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{name}: invalid JSON: {e}"));
        collect_exprs(&name, &dashboard, &mut out);
    }
    out
}

fn collect_exprs(file: &str, node: &Value, out: &mut Vec<(String, String, String)>) {
    let title = node["title"].as_str().unwrap_or("(untitled)");
    for target in node["targets"].as_array().into_iter().flatten() {
        if let Some(expr) = target["expr"].as_str() {
            out.push((file.to_string(), title.to_string(), expr.to_string()));
        }
    }
    for key in ["panels", "rows"] {
        for child in node[key].as_array().into_iter().flatten() {
            collect_exprs(file, child, out);
        }
    }
}

/// Replaces Grafana's variables as Grafana would with "All" selected: `$__rate_interval` and
/// `$__interval` by 1m, `$__range` by 1h, every other `$name`/`${name}`/`${name:fmt}`/`[[name]]`
/// by `.*` (the dashboards' allValue). `$1`-style regex references are left alone.
fn substitute(expr: &str) -> String {
    let value = |name: &str| match name {
        "__rate_interval" | "__interval" => "1m",
        "__range" => "1h",
        "__range_s" => "3600",
        "__interval_ms" => "60000",
        _ => ".*",
    };
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(inner) = tail.strip_prefix("[[") {
            if let Some(end) = inner.find("]]") {
                let name = inner[..end].split(':').next().unwrap_or("");
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    out.push_str(value(name));
                    rest = &inner[end + 2..];
                    continue;
                }
            }
        } else if let Some(inner) = tail.strip_prefix("${") {
            if let Some(end) = inner.find('}') {
                out.push_str(value(inner[..end].split(':').next().unwrap_or("")));
                rest = &inner[end + 1..];
                continue;
            }
        } else if let Some(inner) = tail.strip_prefix('$') {
            let len = inner
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(inner.len());
            if len > 0 && !inner.starts_with(|c: char| c.is_ascii_digit()) {
                out.push_str(value(&inner[..len]));
                rest = &inner[len..];
                continue;
            }
        }
        // Not a variable: keep the character.
        out.push_str(&tail[..1]);
        rest = &tail[1..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------- configs

/// The repository's rules with every `for:` shortened to 1s: the real page alerts wait minutes
/// (`for: 5m` and more), which a test cannot. Only the copy in the test's folder is changed.
fn rules_with_short_for(dir: &Path) -> PathBuf {
    let real = repo().join("dashboards/rules/pforte.rules.yml");
    let text = std::fs::read_to_string(&real).unwrap();
    let mut shortened = 0;
    let copy: String = text
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("for:") {
                shortened += 1;
                let indent = &line[..line.len() - trimmed.len()];
                format!("{indent}for: 1s\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    assert!(shortened > 0, "no `for:` in {}", real.display());
    let path = dir.join("pforte.rules.yml");
    std::fs::write(&path, copy).unwrap();
    path
}

fn prometheus_config(dir: &Path, pforte: u16, alertmanager: u16) -> PathBuf {
    let rules = rules_with_short_for(dir);
    let text = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
alerting:
  alertmanagers:
    - static_configs:
        - targets: ["127.0.0.1:{alertmanager}"]
scrape_configs:
  - job_name: pforte
    static_configs:
      - targets: ["127.0.0.1:{pforte}"]
"#,
        rules = rules.display()
    );
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, text).unwrap();
    path
}

fn alertmanager_config(dir: &Path, webhook: u16) -> PathBuf {
    // Pages go to the test's webhook at once; everything else to a receiver that sends nothing.
    let text = format!(
        r#"route:
  receiver: quiet
  group_by: [alertname, instance]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
  routes:
    - receiver: pager
      matchers:
        - severity="page"
receivers:
  - name: quiet
  - name: pager
    webhook_configs:
      - url: http://127.0.0.1:{webhook}/pager
        send_resolved: true
"#
    );
    let path = dir.join("alertmanager.yml");
    std::fs::write(&path, text).unwrap();
    path
}

// ------------------------------------------------------------------------------------- test

/// What every panel needs to show a real series rather than its `or on() vector(0)`
/// placeholder: a link on loopback (throughput), a link whose interface does not exist ("Links
/// down"), and an OpenVPN instance whose management socket is not there ("Sessions reaped").
const EXTRA_CONFIG: &str = r#"
[[links]]
name = "lo"
interface = "lo"
speed_bits_per_second = 1000000000

[[links]]
name = "gone"
interface = "pforte-gone0"
speed_bits_per_second = 1000000

[[openvpn]]
instance = "monitoring-e2e"
zone = "office"
management = "/nonexistent/pforte-monitoring-e2e.sock"
"#;

fn devices() -> Vec<Dev> {
    vec![
        Dev::good("D-ALICE", "alice"),
        Dev::good("D-BOB", "bob"),
        Dev {
            org_unit: "finance",
            ..Dev::good("D-FRANK", "frank")
        },
        Dev {
            org_unit: "finance",
            ..Dev::good("D-GINA", "gina")
        },
    ]
}

fn dev(id: &str) -> Dev {
    devices().into_iter().find(|d| d.id == id).unwrap()
}

async fn prometheus_pages_on_seat_saturation_and_no_dashboard_panel_is_dead() {
    if !have_tool("prometheus", "prometheus")
        || !have_tool("prometheus-alertmanager", "prometheus-alertmanager")
    {
        return;
    }
    let started = Instant::now();
    // Dropped last (locals drop in reverse order): the processes are killed before their files go.
    let work = tempfile::tempdir().unwrap();
    let mut fixture = Fixture::new(
        Setup {
            max_sessions: 3,
            reserved_seats: 0,
            // A quota, so the quota panels show a real series.
            finance_quota: 2,
            extra: EXTRA_CONFIG.into(),
            ..Setup::default()
        },
        &devices(),
    );
    // A RADIUS front with a client and an upstream, so its panels have series (at zero).
    // The upstream is a responder of the test's own that accepts everything, so one request
    // gives the round-trip panel a real observation.
    let secret = fixture.path("radius.secret");
    std::fs::write(&secret, "s").unwrap();
    let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let up_port = upstream.local_addr().unwrap().port();
    let auth_port = crate::radius_front::free_udp_port();
    fixture.setup.extra.push_str(&format!(
        "\n[radius]\nauth_listen = \"127.0.0.1:{auth_port}\"\nacct_listen = \"127.0.0.1:0\"\n[[radius.clients]]\nname = \"nas\"\naddress = \"127.0.0.1\"\nsecret_file = \"{s}\"\nzone = \"office\"\n[[radius.upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{up_port}\"\nsecret_file = \"{s}\"\n",
        s = secret.display()
    ));
    fixture.write_config();
    // On a PostgreSQL store (a cluster of one node), so the dashboard's cluster row has series
    // too; every other panel reads the same metrics on either store.
    let pg = crate::common::postgres::Postgres::start();
    fixture.setup.env.extend(pg.node_env("pforte", "vpn1", 60));
    let daemon = fixture.start();

    let webhook = Webhook::start();
    let am_port = free_port();
    let am_config = alertmanager_config(work.path(), webhook.port);
    let mut alertmanager = Service::start(
        "alertmanager",
        "prometheus-alertmanager",
        &[
            format!("--config.file={}", am_config.display()),
            format!("--storage.path={}", work.path().join("am-data").display()),
            format!("--web.listen-address=127.0.0.1:{am_port}"),
            // Empty: no cluster listener, no gossip.
            "--cluster.listen-address=".into(),
            "--data.retention=1h".into(),
            "--log.level=warn".into(),
        ],
        work.path().join("alertmanager.log"),
        am_port,
    );
    let prom_port = free_port();
    let prom_config = prometheus_config(work.path(), daemon.port, am_port);
    let mut prometheus = Service::start(
        "prometheus",
        "prometheus",
        &[
            format!("--config.file={}", prom_config.display()),
            format!("--storage.tsdb.path={}", work.path().join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
            "--storage.tsdb.retention.time=1h".into(),
            "--query.max-concurrency=2".into(),
            "--log.level=warn".into(),
        ],
        work.path().join("prometheus.log"),
        prom_port,
    );
    alertmanager.wait_ready();
    prometheus.wait_ready();
    let ready = started.elapsed();

    // Two scrapes before any traffic: the counters' zero is in the TSDB, so increase() and rate()
    // see the refusals and bytes to come. The link gauges appear with the first bandwidth sample.
    wait_value(
        prom_port,
        r#"count_over_time(pforte_build_info{job="pforte"}[10m])"#,
        READY,
        |n| n >= 2.0,
    );
    wait_value(
        prom_port,
        r#"count_over_time(pforte_link_up{job="pforte"}[10m])"#,
        READY,
        |n| n >= 2.0,
    );

    // Traffic: a session that ends with byte counts (session traffic and duration panels), then
    // all three seats taken and a fourth device refused with capacity_full.
    let mut c = daemon.client().await;
    let (s, a) = c
        .connect_request(&connect_req(&dev("D-ALICE"), "alice", "k-early"))
        .await
        .unwrap();
    assert_eq!(s, 200, "{a:?}");
    let (s, v) = c
        .disconnect_request(&DisconnectRequest {
            vpn: "openvpn".into(),
            instance: "office-udp".into(),
            session_key: "k-early".into(),
            bytes_received: Some(120_000),
            bytes_sent: Some(540_000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((s, v["result"].as_str()), (200, Some("ended")), "{v}");
    for (id, user, key) in [
        ("D-ALICE", "alice", "k1"),
        ("D-BOB", "bob", "k2"),
        ("D-FRANK", "frank", "k3"),
    ] {
        let (s, a) = c
            .connect_request(&connect_req(&dev(id), user, key))
            .await
            .unwrap();
        assert_eq!(s, 200, "{id}: {a:?}");
    }
    let (s, a) = c
        .connect_request(&connect_req(&dev("D-GINA"), "gina", "k4"))
        .await
        .unwrap();
    assert_eq!(
        (s, a.reason.map(|r| r.as_str())),
        (403, Some("capacity_full")),
        "the fourth device must find the seats full"
    );
    assert_eq!(daemon.metric("pforte_seats_used"), Some(3.0));
    let saturated = Instant::now();

    // The page reaches the webhook.
    let wanted = ["PforteSeatSaturation", "PforteCapacityRefusals"];
    let deadline = saturated + PAGE;
    while Instant::now() < deadline {
        let pages = webhook.firing_pages();
        if wanted.iter().all(|w| pages.contains(*w)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let pages = webhook.firing_pages();
    let page_after = saturated.elapsed();
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|w| !pages.contains(*w))
        .collect();
    assert!(
        missing.is_empty(),
        "within {PAGE:?} of saturation the webhook got no firing severity=\"page\" alert {missing:?}\n\
         firing pages received: {pages:?}\nwebhook bodies:\n{}\n\
         Prometheus alerts: {:?}\n--- prometheus log\n{}\n--- alertmanager log\n{}",
        webhook.bodies().join("\n"),
        request(prom_port, "GET", "/api/v1/alerts", ""),
        prometheus.log(),
        alertmanager.log(),
    );

    // One RADIUS request through the upstream, after Prometheus has scraped (a rate needs two
    // samples).
    {
        use pforte::vpn::radius::{Code, Packet, Secret, attr, auth};
        let key = Secret::new("s").unwrap();
        let nas = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        nas.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = Packet::new(Code::AccessRequest, 1, [9; 16]);
        req.add(attr::USER_NAME, "alice").unwrap();
        let wire = auth::finalize_request(&mut req, &key).unwrap();
        nas.send_to(&wire, ("127.0.0.1", auth_port)).unwrap();
        let mut buf = [0u8; 4096];
        let (n, from) = upstream.recv_from(&mut buf).unwrap();
        let fwd = Packet::decode(&buf[..n]).unwrap();
        let mut ok = Packet::response_to(&fwd, Code::AccessAccept);
        for ps in fwd.get_all(attr::PROXY_STATE) {
            ok.add(attr::PROXY_STATE, ps.to_vec()).unwrap();
        }
        let answer = auth::finalize_response(&mut ok, &fwd.authenticator, &key).unwrap();
        upstream.send_to(&answer, from).unwrap();
        // pforte's answer to the NAS (a Reject: the request names no device).
        nas.recv_from(&mut buf).unwrap();
    }

    // A few scrapes of the traffic, then every rule has been evaluated on it.
    let scrapes = query_value(
        prom_port,
        r#"count_over_time(pforte_build_info{job="pforte"}[10m])"#,
    )
    .unwrap_or(0.0);
    wait_value(
        prom_port,
        r#"count_over_time(pforte_build_info{job="pforte"}[10m])"#,
        Duration::from_secs(30),
        |n| n >= scrapes + SCRAPES_AFTER_TRAFFIC,
    );
    let (_, rules) = request(prom_port, "GET", "/api/v1/rules", "").unwrap();
    let rules: Value = serde_json::from_str(&rules).unwrap();
    let mut rule_problems = Vec::new();
    let mut rule_count = 0;
    for group in rules["data"]["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            rule_count += 1;
            if rule["health"] != "ok" {
                rule_problems.push(format!(
                    "{} {}: health {}, {}",
                    rule["type"], rule["name"], rule["health"], rule["lastError"]
                ));
            }
        }
    }
    assert!(rule_count > 0, "Prometheus loaded no rules: {rules}");
    assert!(
        rule_problems.is_empty(),
        "rules that do not evaluate cleanly on the real series:\n{}",
        rule_problems.join("\n")
    );

    // Every dashboard expression parses and returns data.
    let exprs = dashboard_exprs();
    assert!(!exprs.is_empty(), "no expressions in dashboards/*.json");
    let mut dead = Vec::new();
    let mut placeholders = 0;
    for (file, title, expr) in &exprs {
        let promql = substitute(expr);
        match query(prom_port, &promql) {
            Err(answer) => dead.push(format!("{file} {title:?}: {promql}\n  -> {answer}")),
            Ok(answer) => {
                if !has_data(&answer) {
                    dead.push(format!(
                        "{file} {title:?}: {promql}\n  -> no data: {}",
                        answer["data"]
                    ));
                    continue;
                }
                // A trailing `or on() vector(0)` makes any expression "return data", even one
                // whose real part names a wrong label or metric: the real part must have data too.
                let Some(real) = without_placeholder(&promql) else {
                    continue;
                };
                placeholders += 1;
                match query(prom_port, &real) {
                    Ok(answer) if has_data(&answer) => {}
                    Ok(answer) => dead.push(format!(
                        "{file} {title:?}: only its placeholder has data; without it: {real}\n  -> {}",
                        answer["data"]
                    )),
                    Err(answer) => dead.push(format!(
                        "{file} {title:?}: without its placeholder: {real}\n  -> {answer}"
                    )),
                }
            }
        }
    }
    assert!(
        dead.is_empty(),
        "{} of {} dashboard expressions fail or return no data:\n{}",
        dead.len(),
        exprs.len(),
        dead.join("\n")
    );
    eprintln!(
        "monitoring e2e: ready after {ready:?}, pages {pages:?} {page_after:?} after saturation, \
         {rule_count} rules healthy, {} dashboard expressions with data ({placeholders} also \
         without their placeholder), {:?} in all",
        exprs.len(),
        started.elapsed()
    );
}

fn placeholders_are_recognised() {
    assert_eq!(
        without_placeholder("8 * sum by (link) (x) or on() vector(0)").as_deref(),
        Some("8 * sum by (link) (x)")
    );
    assert_eq!(
        without_placeholder("a or on (instance, link) (b + 104) or on () vector(104)\n").as_deref(),
        Some("a or on (instance, link) (b + 104)")
    );
    assert_eq!(without_placeholder("sum(x)"), None);
    assert_eq!(without_placeholder("x or on() vector(y)"), None);
}

fn grafana_variables_are_substituted() {
    assert_eq!(
        substitute(r#"rate(x{instance=~"$instance", zone=~"${zone}"}[$__rate_interval])"#),
        r#"rate(x{instance=~".*", zone=~".*"}[1m])"#
    );
    assert_eq!(
        substitute(r#"max_over_time(y{org_unit=~"${org_unit:regex}"}[$__range:5m])[1d:1m]"#),
        r#"max_over_time(y{org_unit=~".*"}[1h:5m])[1d:1m]"#
    );
    assert_eq!(
        substitute(r#"label_replace(z, "a", "$1", "b", "(.*)") [[instance]] $__interval"#),
        r#"label_replace(z, "a", "$1", "b", "(.*)") .* 1m"#
    );
}

/// The tests of this module, for the harness (`tests/it/main.rs`).
pub fn tests() -> Vec<Case> {
    vec![
        trial!(async prometheus_pages_on_seat_saturation_and_no_dashboard_panel_is_dead, needs: [Need::Tool("prometheus", "prometheus"), Need::Tool("prometheus-alertmanager", "prometheus-alertmanager"), Need::Tool("initdb", "postgresql"), Need::Tool("psql", "postgresql-client")]),
        trial!(placeholders_are_recognised),
        trial!(grafana_variables_are_substituted),
    ]
}
