//! Open files and listen backlogs: a daemon started with systemd's default soft limit of 1,024
//! open files still serves thousands of connections at once, and a burst of connects opened one
//! after another never waits for a SYN to be sent again.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::harness::{Case, trial};
use crate::common::*;

/// A wrapper that starts the daemon with a soft open-files limit of 1,024, as systemd does.
fn with_soft_limit_1024(f: &Fixture) -> PathBuf {
    let path = f.path("pforte-ulimit");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nulimit -Sn 1024\nexec '{}' \"$@\"\n",
            bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The daemon's soft and hard open-files limits, from /proc.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1])
}

const REQUEST: &[u8] = b"GET /v1/sessions HTTP/1.1\r\nHost: pforte\r\n\r\n";

/// Reads one HTTP answer's status line from a connection that stays open.
fn status_of(stream: &mut impl Read) -> String {
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before an answer");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

async fn a_soft_limit_of_1024_still_serves_3000_connections_and_a_hook() {
    let own = pforte::net::raise_open_files_limit().unwrap();
    assert!(
        own >= 3200,
        "the test itself needs 3,200 open files, has {own}"
    );
    let dev = Dev::good("D-A", "alice");
    let f = Fixture::new(Setup::default(), std::slice::from_ref(&dev));
    let d = Daemon::start_via(&f, with_soft_limit_1024(&f));
    let (soft, hard) = open_files_limit(d.child.id());
    assert_eq!(
        soft, hard,
        "the daemon raised its soft limit to the hard one"
    );
    assert!(soft > 1024);

    let socket = f.socket();
    let conns: Vec<UnixStream> = tokio::task::spawn_blocking(move || {
        let mut conns = Vec::with_capacity(3000);
        for _ in 0..3000 {
            let mut s = UnixStream::connect(&socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(REQUEST).unwrap();
            conns.push(s);
        }
        for s in conns.iter_mut() {
            assert_eq!(status_of(s), "HTTP/1.1 200 OK");
        }
        conns
    })
    .await
    .unwrap();
    assert_eq!(conns.len(), 3000);
    // With all 3,000 still open, a hook's connect is answered.
    let mut c = d.client().await;
    let (s, r) = c
        .connect_request(&connect_req(&dev, "alice", "k1"))
        .await
        .unwrap();
    assert_eq!(s, 200, "{r:?}");
    drop(conns);
}

/// 3,000 TCP connects one after another, each sending its request at once: a listen backlog of
/// 128 filled while the accept task served the ones before, and every ~129th connect waited a
/// second for its SYN to be sent again.
async fn a_burst_of_connects_never_waits_for_a_syn_retry() {
    let own = pforte::net::raise_open_files_limit().unwrap();
    assert!(
        own >= 3200,
        "the test itself needs 3,200 open files, has {own}"
    );
    let f = Fixture::new(Setup::default(), &[Dev::good("D-A", "alice")]);
    let d = f.start();
    let addr: SocketAddr = format!("127.0.0.1:{}", d.port).parse().unwrap();
    let (slow, conns) = tokio::task::spawn_blocking(move || {
        let mut slow = Vec::new();
        let mut conns = Vec::with_capacity(3000);
        for i in 0..3000 {
            let t = Instant::now();
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
            let took = t.elapsed();
            if took >= Duration::from_millis(900) {
                slow.push((i, took));
            }
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            conns.push(s);
        }
        for s in conns.iter_mut() {
            assert_eq!(status_of(s), "HTTP/1.1 200 OK");
        }
        (slow, conns.len())
    })
    .await
    .unwrap();
    assert_eq!(conns, 3000);
    assert!(
        slow.is_empty(),
        "{} connects waited for a SYN retry: {slow:?}",
        slow.len()
    );
}

pub fn tests() -> Vec<Case> {
    vec![
        trial!(async a_soft_limit_of_1024_still_serves_3000_connections_and_a_hook),
        trial!(async a_burst_of_connects_never_waits_for_a_syn_retry),
    ]
}
