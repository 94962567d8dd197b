//! Faults: kill -9 during a storm of connects, the store's disk full, the management socket gone.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::Method;
use nix::sys::signal::Signal;

use crate::common::harness::{Case, Need, trial};
use crate::common::*;

fn pool(n: usize) -> Vec<Dev> {
    (0..n)
        .map(|i| Dev {
            users: String::new(),
            ..Dev::good(&format!("D-F{i:04}"), "")
        })
        .collect()
}

/// kill -9 while connects stream in: after the restart the store opens, every acknowledged
/// session is there, nothing is counted twice, and seats match the session list.
async fn kill_9_during_a_storm_of_connects() {
    let devs = pool(3000);
    let f = Fixture::new(
        Setup {
            max_sessions: 5000,
            per_user: 0,
            pool: "10.64.0.0/16".into(),
            ..Setup::default()
        },
        &devs,
    );
    let mut d = f.start();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    let devs = Arc::new(devs);
    for w in 0..16usize {
        let socket = d.socket.clone();
        let acked = acked.clone();
        let devs = devs.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(mut c) = pforte::client::UnixClient::connect(&socket).await else {
                return;
            };
            let mut i = w;
            while i < devs.len() {
                match c
                    .connect_request(&connect_req(&devs[i], "alice", &format!("s{i}")))
                    .await
                {
                    Ok((200, r)) => acked.lock().unwrap().push(r.session_id.unwrap()),
                    Ok(_) => {}
                    Err(_) => return,
                }
                i += 16;
            }
        }));
    }
    // Kill once a few hundred are acknowledged, in the middle of the stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 300 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.signal(Signal::SIGKILL);
    for t in tasks {
        let _ = t.await;
    }
    let _ = d.child.wait();
    let acked: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    assert!(acked.len() >= 300 && acked.len() < 3000, "{}", acked.len());

    let d2 = f.start();
    let mut c = d2.client().await;
    let (_, body) = c.request(Method::GET, "/v1/sessions", None).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let restored: Vec<String> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let restored_set: HashSet<String> = restored.iter().cloned().collect();
    assert_eq!(
        restored.len(),
        restored_set.len(),
        "a session restored twice"
    );
    let missing: Vec<&String> = acked.difference(&restored_set).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged sessions lost",
        missing.len()
    );
    // At most the requests in flight at the kill (one per client) were committed unanswered.
    assert!(
        restored.len() <= acked.len() + 16,
        "{} restored, {} acknowledged",
        restored.len(),
        acked.len()
    );
    assert_eq!(d2.metric("pforte_seats_used"), Some(restored.len() as f64));
    // Every acknowledged decision is in the audit log.
    let audit = std::fs::read_to_string(f.path("state/audit.log")).unwrap();
    let logged: HashSet<String> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["decision"] == "allow")
        .filter_map(|v| v["session_id"].as_str().map(str::to_string))
        .collect();
    let unlogged = acked.difference(&logged).count();
    assert_eq!(
        unlogged, 0,
        "acknowledged allows missing from the audit log"
    );
}

/// Root, as mounting a tmpfs needs; without it the test is skipped (or fails under
/// `PFORTE_E2E=1`).
pub fn can_mount() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if e2e_required() {
        panic!("this test needs root to mount a small tmpfs");
    }
    eprintln!("SKIPPED: needs root");
    false
}

/// A 512 KiB tmpfs on a folder, unmounted when dropped.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(dir: &std::path::Path) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs");
        Tmpfs(dir.to_path_buf())
    }
}

/// Fills the filesystem of `dir` with one file; returns it (remove it to free the space).
pub fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
    filler
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The store's disk fills up: connects are refused (fail mode closed), the error shows in the
/// log and the metrics, and pforte recovers by itself once space is free again.
async fn store_disk_full_fails_closed_and_recovers() {
    if !can_mount() {
        return;
    }
    let devs = pool(600);
    let f = Fixture::new(
        Setup {
            max_sessions: 5000,
            per_user: 0,
            pool: "10.64.0.0/16".into(),
            ..Setup::default()
        },
        &devs,
    );
    let state = f.path("state");
    let _guard = Tmpfs::mount(&state);
    let d = f.start();
    let mut c = d.client().await;
    let (s, _) = c
        .connect_request(&connect_req(&devs[0], "alice", "k0"))
        .await
        .unwrap();
    assert_eq!(s, 200);
    // Fill the disk.
    let filler = fill(&state);
    let mut refused_at = None;
    for (i, dev) in devs.iter().enumerate().skip(1).take(400) {
        let (s, r) = c
            .connect_request(&connect_req(dev, "alice", &format!("k{i}")))
            .await
            .unwrap();
        if s != 200 {
            assert_eq!(
                r.reason.map(|r| r.as_str()),
                Some("store_unavailable"),
                "{r:?}"
            );
            refused_at = Some(i);
            break;
        }
    }
    let refused_at = refused_at.expect("no connect was refused with the disk full");
    assert_eq!(d.metric("pforte_store_healthy"), Some(0.0));
    assert!(d.metric("pforte_store_errors_total").unwrap_or(0.0) >= 1.0);
    assert!(
        d.log().contains("session store commit failed"),
        "{}",
        d.log()
    );
    let used = d.metric("pforte_seats_used").unwrap();
    // Space again: it recovers without a restart.
    std::fs::remove_file(&filler).unwrap();
    let mut ok = false;
    for (i, dev) in devs.iter().enumerate().skip(refused_at + 1).take(50) {
        let (s, _) = c
            .connect_request(&connect_req(dev, "alice", &format!("k{i}")))
            .await
            .unwrap();
        if s == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "no recovery after the disk was freed");
    assert_eq!(d.metric("pforte_store_healthy"), Some(1.0));
    assert_eq!(d.metric("pforte_seats_used"), Some(used + 1.0));
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: utime is the 14th field, stime the 15th.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// The OpenVPN management socket is gone: pforte retries with backoff (no busy loop, one log
/// line rather than one per attempt), and connects as soon as the socket is back.
fn management_socket_gone_backs_off_and_reconnects() {
    let f = Fixture::new(Setup::default(), &[Dev::good("D-1", "alice")]);
    let mgmt = f.path("mgmt.sock");
    let mut f = f;
    f.setup.extra = format!(
        "[[openvpn]]\ninstance = \"office-udp\"\nzone = \"office\"\nmanagement = \"{}\"\n",
        mgmt.display()
    );
    f.write_config();
    let d = f.start();
    let series = "pforte_openvpn_management_connected{vpn_instance=\"office-udp\"}";
    assert_eq!(d.metric(series), Some(0.0));
    let before = cpu_ticks(d.child.id());
    std::thread::sleep(Duration::from_secs(4));
    let spent = cpu_ticks(d.child.id()) - before;
    assert!(
        spent < 30,
        "{spent} ticks of CPU in 4 s while the socket was gone"
    );
    let warnings = d
        .log()
        .matches("cannot reach the OpenVPN management interface")
        .count();
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} warnings:\n{}",
        d.log()
    );

    // A stand-in management interface: greets, answers bytecount and status.
    let listener = UnixListener::bind(&mgmt).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut w = stream.try_clone().unwrap();
        w.write_all(
            b">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info\r\n",
        )
        .unwrap();
        let mut r = BufReader::new(stream);
        let mut seen = Vec::new();
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && r.read_line(&mut line).unwrap_or(0) > 0 {
            let cmd = line.trim().to_string();
            line.clear();
            let reply = if cmd.starts_with("status") {
                "TITLE\tOpenVPN\r\nHEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address\tBytes Received\tBytes Sent\tConnected Since\tConnected Since (time_t)\tUsername\tClient ID\tPeer ID\tData Channel Cipher\r\nEND\r\n".to_string()
            } else {
                format!("SUCCESS: {cmd}\r\n")
            };
            seen.push(cmd);
            if w.write_all(reply.as_bytes()).is_err() {
                break;
            }
            if seen.len() >= 2 {
                // Stay connected while the test looks at the metric.
                std::thread::sleep(Duration::from_secs(3));
                break;
            }
        }
        seen
    });
    wait_for("the management connection", Duration::from_secs(15), || {
        d.metric(series) == Some(1.0)
    });
    let seen = server.join().unwrap();
    assert!(seen.iter().any(|c| c.starts_with("bytecount")), "{seen:?}");
    assert!(seen.iter().any(|c| c == "status 3"), "{seen:?}");
}

/// management-client-auth answers before the session's commit (OpenVPN's window is under a
/// millisecond). If the commit then fails (disk full, fail mode closed), the client that was
/// let in is ended with `client-kill` and its seat is free again. A stand-in management
/// interface plays OpenVPN.
fn client_auth_answered_before_a_commit_that_fails_ends_the_client() {
    if !can_mount() {
        return;
    }
    let devs = pool(2);
    let mut f = Fixture::new(
        Setup {
            max_sessions: 100,
            per_user: 0,
            pool: "10.65.0.0/16".into(),
            ..Setup::default()
        },
        &devs,
    );
    let mgmt = f.path("mgmt.sock");
    f.setup.extra = format!(
        "[[openvpn]]\ninstance = \"office-udp\"\nzone = \"office\"\nmanagement = \"{}\"\nclient_auth = true\nstatus_interval_s = 3600\n",
        mgmt.display()
    );
    f.write_config();
    let state = f.path("state");
    let _guard = Tmpfs::mount(&state);
    let listener = UnixListener::bind(&mgmt).unwrap();
    let d = f.start();

    let (stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut events = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    w.write_all(b">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info\r\n")
        .unwrap();
    // Reads pforte's commands, answering them as OpenVPN does, until `stop` holds for the
    // commands so far or the time is up.
    let mut seen: Vec<String> = Vec::new();
    let mut serve = |seen: &mut Vec<String>, stop: &dyn Fn(&[String]) -> bool, secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut in_auth = false;
        let mut line = String::new();
        while Instant::now() < deadline && !stop(seen) {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            let cmd = line.trim().to_string();
            let reply = if in_auth {
                if cmd == "END" {
                    in_auth = false;
                    "SUCCESS: client-auth command succeeded\r\n".to_string()
                } else {
                    String::new()
                }
            } else if cmd.starts_with("client-auth ") {
                in_auth = true;
                String::new()
            } else if cmd.starts_with("status") {
                "TITLE\tOpenVPN\r\nHEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address\tBytes Received\tBytes Sent\tConnected Since\tConnected Since (time_t)\tUsername\tClient ID\tPeer ID\tData Channel Cipher\r\nEND\r\n".to_string()
            } else {
                format!("SUCCESS: {cmd}\r\n")
            };
            seen.push(cmd);
            w.write_all(reply.as_bytes()).unwrap();
        }
    };
    let connect = |w: &mut std::os::unix::net::UnixStream, cid: u64, dev: &Dev, port: u16| {
        let env = [
            "common_name=alice".to_string(),
            format!("tls_digest_sha256_0={}", dev.fp()),
            "tls_serial_0=4096".to_string(),
            "untrusted_ip=198.51.100.20".to_string(),
            format!("untrusted_port={port}"),
            "IV_PLAT=linux".to_string(),
            "password=hunter2".to_string(),
        ];
        let mut text = format!(">CLIENT:CONNECT,{cid},1\r\n");
        for e in env {
            text.push_str(&format!(">CLIENT:ENV,{e}\r\n"));
        }
        text.push_str(">CLIENT:ENV,END\r\n");
        w.write_all(text.as_bytes()).unwrap();
    };
    // pforte's start: bytecount and status.
    serve(
        &mut seen,
        &|s: &[String]| s.iter().any(|c| c == "status 3"),
        10,
    );

    // Healthy store: admitted, woken, recorded; no kill.
    connect(&mut events, 0, &devs[0], 50000);
    serve(
        &mut seen,
        &|s: &[String]| s.iter().any(|c| c.starts_with("client-pending-auth 0 ")),
        10,
    );
    assert!(seen.iter().any(|c| c == "client-auth 0 1"), "{seen:?}");
    wait_for("the first session", Duration::from_secs(5), || {
        d.metric("pforte_seats_used") == Some(1.0)
    });

    // Fill the disk: the next client is answered, its commit fails, and it is ended.
    fill(&state);
    // The WAL may still have room for a few commits: ask until one fails.
    let mut killed = None;
    for (i, port) in (1..=40u64).zip(50001u16..) {
        connect(&mut events, i, &devs[i as usize % 2], port);
        let kill = format!("client-kill {i} HALT");
        let done = format!("client-pending-auth {i} ");
        serve(
            &mut seen,
            &|s: &[String]| {
                s.contains(&kill)
                    || (s.iter().any(|c| c.starts_with(&done))
                        && s.last().is_some_and(|c| c.starts_with(&done)))
            },
            10,
        );
        // A kill, if any, follows the wake-up at once.
        serve(&mut seen, &|s: &[String]| s.contains(&kill), 1);
        if seen.contains(&kill) {
            killed = Some(i);
            break;
        }
    }
    let killed = killed.unwrap_or_else(|| {
        panic!(
            "no client was ended with the disk full: {seen:?}\n{}",
            d.log()
        )
    });
    let auth = seen
        .iter()
        .position(|c| *c == format!("client-auth {killed} 1"))
        .expect("the killed client was admitted first");
    let kill = seen
        .iter()
        .position(|c| *c == format!("client-kill {killed} HALT"))
        .unwrap();
    assert!(auth < kill, "{seen:?}");
    assert!(
        d.log().contains("session not recorded; ending the client"),
        "{}",
        d.log()
    );
    assert_eq!(
        d.metric("pforte_decisions_total{decision=\"deny\",reason=\"store_unavailable\"}"),
        Some(1.0)
    );
    // Every other client of this loop holds a seat; the killed one does not.
    assert_eq!(d.metric("pforte_seats_used"), Some(killed as f64));
    assert!(!d.log().contains("hunter2"));
}

/// The tests of this module, for the harness (`tests/it/main.rs`).
pub fn tests() -> Vec<Case> {
    vec![
        trial!(async(2) kill_9_during_a_storm_of_connects),
        trial!(async store_disk_full_fails_closed_and_recovers, needs: [Need::Root("to mount a small tmpfs")]),
        trial!(management_socket_gone_backs_off_and_reconnects),
        trial!(client_auth_answered_before_a_commit_that_fails_ends_the_client, needs: [Need::Root("to mount a small tmpfs")]),
    ]
}
