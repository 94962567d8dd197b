//! Hostile clients and peers: idle and slow connections, oversized headers, peers outside the
//! allow-list, secrets in files anyone may write.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::harness::{Case, Need, trial};
use crate::common::*;

fn raise_own_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One decision the way the hook asks: a fresh connection, one request.
fn timed_decision(socket: &std::path::Path, dev: &Dev, key: &str) -> (u16, Duration) {
    let body = serde_json::to_string(&connect_req(dev, "alice", key)).unwrap();
    let started = Instant::now();
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST /v1/connect HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, started.elapsed())
}

fn two_thousand_idle_connections_do_not_starve_decisions() {
    raise_own_fd_limit();
    let dev = Dev {
        users: String::new(),
        ..Dev::good("D-IDLE", "")
    };
    let f = Fixture::new(
        Setup {
            per_user: 0,
            // Long enough that the idle connections stay for the whole test.
            env: vec![("PFORTE_SERVER__HEADER_TIMEOUT_MS".into(), "30000".into())],
            ..Setup::default()
        },
        std::slice::from_ref(&dev),
    );
    let d = f.start();
    let before = rss_kb(d.child.id());
    let idle: Vec<UnixStream> = (0..2000)
        .map(|i| {
            UnixStream::connect(&d.socket).unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
        })
        .collect();
    // Let the daemon accept them all.
    std::thread::sleep(Duration::from_millis(500));
    let mut worst = Duration::ZERO;
    for i in 0..50 {
        let (status, took) = timed_decision(&d.socket, &dev, &format!("k{i}"));
        assert_eq!(status, 200);
        worst = worst.max(took);
    }
    assert!(
        worst < Duration::from_millis(100),
        "slowest decision {worst:?}"
    );
    let after = rss_kb(d.child.id());
    assert!(
        after < before + 150 * 1024,
        "2000 idle connections grew RSS from {before} KB to {after} KB"
    );
    drop(idle);
}

fn slow_and_idle_connections_are_cut_off() {
    let f = Fixture::new(
        Setup {
            env: vec![("PFORTE_SERVER__HEADER_TIMEOUT_MS".into(), "1000".into())],
            ..Setup::default()
        },
        &[Dev::good("D-1", "alice")],
    );
    let d = f.start();
    // Idle: never sends a byte.
    let mut idle = UnixStream::connect(&d.socket).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = idle.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "idle connection was answered instead of closed");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Slowloris: a header byte every 200 ms.
    let mut slow = UnixStream::connect(&d.socket).unwrap();
    let started = Instant::now();
    let mut cut = false;
    for b in b"POST /v1/connect HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    {
        if slow.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(cut, "a slow header trickle was not cut off");
    assert!(started.elapsed() < Duration::from_secs(4));
    // A body that never finishes.
    let mut stalled = UnixStream::connect(&d.socket).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stalled
        .write_all(b"POST /v1/connect HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"vpn\"")
        .unwrap();
    let mut text = String::new();
    let _ = stalled.read_to_string(&mut text);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "stalled body: {text}"
    );
}

fn oversized_headers_are_refused_and_the_daemon_lives_on() {
    let f = Fixture::new(Setup::default(), &[Dev::good("D-1", "alice")]);
    let mut d = f.start();
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let huge = "a".repeat(200 * 1024);
    let _ = write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: {huge}\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(d.wait_exit(Duration::from_millis(10)).is_none());
    assert_eq!(http_get(d.port, "/healthz").unwrap().0, 200);
}

fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(args)
        .output()
        .unwrap()
}

/// A peer outside the uid/gid allow-list gets nothing, even where the socket file's mode
/// would let it in; listed, it is served.
fn unix_socket_refuses_peers_outside_the_allow_list() {
    if !nix::unistd::geteuid().is_root() {
        if e2e_required() {
            panic!("this test needs root to act as a second uid");
        }
        eprintln!("SKIPPED: needs root");
        return;
    }
    if !have_tool("setpriv", "util-linux") || !have_tool("curl", "curl") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let open = |f: &Fixture| {
        for dir in [f.dir.path().to_path_buf(), f.path("run")] {
            let _ = std::fs::create_dir_all(&dir);
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    };
    let curl = |f: &Fixture| {
        as_nobody(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "--unix-socket",
            f.socket().to_str().unwrap(),
            "http://pforte/v1/sessions",
        ])
    };
    let f = Fixture::new(
        Setup {
            socket_mode: "0666",
            ..Setup::default()
        },
        &[Dev::good("D-1", "alice")],
    );
    open(&f);
    let d = f.start();
    let out = curl(&f);
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    assert_ne!(code, "200", "uid 65534 was served");
    wait_for("the refusal in the log", Duration::from_secs(5), || {
        d.log().contains("not on the allow-list")
    });
    drop(d);

    let f = Fixture::new(
        Setup {
            socket_mode: "0666",
            env: vec![("PFORTE_SERVER__PEER_UIDS".into(), "65534".into())],
            ..Setup::default()
        },
        &[Dev::good("D-1", "alice")],
    );
    open(&f);
    let _d = f.start();
    let out = curl(&f);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
}

fn world_writable_token_file_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new(
        Setup {
            token: true,
            ..Setup::default()
        },
        &[Dev::good("D-1", "alice")],
    );
    std::fs::set_permissions(f.path("token"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(f.config())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token") && err.contains("writable"), "{err}");
    assert!(!err.contains(TOKEN), "the token itself leaked: {err}");
}

/// The tests of this module, for the harness (`tests/it/main.rs`).
pub fn tests() -> Vec<Case> {
    vec![
        trial!(two_thousand_idle_connections_do_not_starve_decisions),
        trial!(slow_and_idle_connections_are_cut_off),
        trial!(oversized_headers_are_refused_and_the_daemon_lives_on),
        trial!(unix_socket_refuses_peers_outside_the_allow_list, needs: [Need::Root("to act as a second uid"), Need::Tool("setpriv", "util-linux"), Need::Tool("curl", "curl")]),
        trial!(world_writable_token_file_is_refused_at_start),
    ]
}
