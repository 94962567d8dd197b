//! Persistence across kill -9, registry reloads (SIGHUP, file change, API), broken files.

use std::time::Duration;

use hyper::Method;
use nix::sys::signal::Signal;

use crate::common::harness::{Case, trial};
use crate::common::*;

fn pool(n: usize) -> Vec<Dev> {
    (0..n)
        .map(|i| Dev {
            users: String::new(),
            ..Dev::good(&format!("D-{i:03}"), "")
        })
        .collect()
}

async fn sessions_survive_kill_9() {
    let devs = pool(10);
    let f = Fixture::new(
        Setup {
            max_sessions: 8,
            per_user: 0,
            ..Setup::default()
        },
        &devs,
    );
    let mut d = f.start();
    let mut c = d.client().await;
    let mut ids = Vec::new();
    for (i, dv) in devs.iter().take(6).enumerate() {
        let (s, a) = c
            .connect_request(&connect_req(dv, "alice", &format!("k{i}")))
            .await
            .unwrap();
        assert_eq!(s, 200, "{a:?}");
        ids.push(a.session_id.unwrap());
    }
    // End one, so the store must also remember deletions.
    let (s, _) = c
        .request(Method::DELETE, &format!("/v1/sessions/{}", ids[0]), None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    d.signal(Signal::SIGKILL);
    let status = d.child.wait().unwrap();
    assert!(!status.success(), "killed, not exited");

    let d2 = f.start();
    assert_eq!(d2.metric("pforte_seats_used"), Some(5.0), "{}", d2.log());
    let mut c = d2.client().await;
    let (_, body) = c.request(Method::GET, "/v1/sessions", None).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let listed: Vec<String> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let mut want = ids[1..].to_vec();
    want.sort();
    let mut got = listed.clone();
    got.sort();
    assert_eq!(got, want);
    // Seats are right: 8 seats, 5 used, so 3 more and then full.
    for (i, dv) in devs.iter().skip(6).enumerate() {
        let (s, _) = c
            .connect_request(&connect_req(dv, "alice", &format!("n{i}")))
            .await
            .unwrap();
        let want = if i < 3 { 200 } else { 403 };
        assert_eq!(s, want, "connect {i} after restart");
    }
    // Pool addresses of restored sessions are not handed out twice.
    let (_, body) = c.request(Method::GET, "/v1/sessions", None).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut ips: Vec<&str> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tunnel_ip"].as_str().unwrap())
        .collect();
    let n = ips.len();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), n, "duplicate tunnel addresses");
}

async fn broken_registry_keeps_the_old_one_and_counts_the_failure() {
    let devs = vec![Dev::good("D-A", "alice"), Dev::good("D-B", "bob")];
    let f = Fixture::new(
        Setup {
            watch_interval_s: 0,
            ..Setup::default()
        },
        &devs,
    );
    let d = f.start();
    let mut c = d.client().await;
    // A half-written file: line 3 is cut off mid-row.
    let good = std::fs::read_to_string(f.path("devices.csv")).unwrap();
    let cut: String = good.lines().take(2).collect::<Vec<_>>().join("\n") + "\nD-C,service,act";
    std::fs::write(f.path("devices.csv"), cut).unwrap();
    let (s, body) = c
        .request(Method::POST, "/v1/registry/reload", None)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(s, 422, "{text}");
    assert!(
        text.contains("devices.csv:3"),
        "error names file and line: {text}"
    );
    assert_eq!(d.metric("pforte_registry_reload_failures_total"), Some(1.0));
    assert!(d.log().contains("devices.csv:3"), "{}", d.log());
    // The old registry still decides: D-B is known.
    let (s, _) = c
        .connect_request(&connect_req(&devs[1], "bob", "k1"))
        .await
        .unwrap();
    assert_eq!(s, 200);
    // A bad value in a complete row is refused the same way.
    std::fs::write(f.path("devices.csv"), good.replace("service", "servic")).unwrap();
    let (s, _) = c
        .request(Method::POST, "/v1/registry/reload", None)
        .await
        .unwrap();
    assert_eq!(s, 422);
    assert_eq!(d.metric("pforte_registry_reload_failures_total"), Some(2.0));
}

async fn sighup_reload_revokes_a_blocked_device() {
    let devs = vec![Dev::good("D-A", "alice"), Dev::good("D-B", "bob")];
    let f = Fixture::new(
        Setup {
            watch_interval_s: 0,
            ..Setup::default()
        },
        &devs,
    );
    let d = f.start();
    let mut c = d.client().await;
    for (i, dv) in devs.iter().enumerate() {
        let user = dv.users.clone();
        let (s, _) = c
            .connect_request(&connect_req(dv, &user, &format!("k{i}")))
            .await
            .unwrap();
        assert_eq!(s, 200);
    }
    let before = d
        .metric("pforte_registry_last_success_timestamp_seconds")
        .unwrap();
    assert!(before > 0.0);
    f.write_devices(&[
        devs[0].clone(),
        Dev {
            status: "blocked",
            ..devs[1].clone()
        },
    ]);
    d.signal(Signal::SIGHUP);
    wait_for("D-B's session to end", Duration::from_secs(5), || {
        d.metric("pforte_seats_used") == Some(1.0)
    });
    assert_eq!(
        d.metric("pforte_registry_devices{ownership=\"service\",status=\"blocked\"}"),
        Some(1.0)
    );
    let (s, r) = c
        .connect_request(&connect_req(&devs[1], "bob", "k9"))
        .await
        .unwrap();
    assert_eq!(
        (s, r.reason.map(|r| r.as_str())),
        (403, Some("device_blocked"))
    );
}

async fn file_change_is_picked_up_without_a_signal() {
    let f = Fixture::new(Setup::default(), &[Dev::good("D-A", "alice")]);
    let d = f.start();
    let mut c = d.client().await;
    let newcomer = Dev::good("D-NEW", "bob");
    let (s, _) = c
        .connect_request(&connect_req(&newcomer, "bob", "k1"))
        .await
        .unwrap();
    assert_eq!(s, 403);
    f.write_devices(&[Dev::good("D-A", "alice"), newcomer.clone()]);
    wait_for(
        "the new device to be loaded",
        Duration::from_secs(10),
        || {
            d.metric("pforte_registry_devices{ownership=\"service\",status=\"active\"}")
                == Some(2.0)
        },
    );
    let (s, _) = c
        .connect_request(&connect_req(&newcomer, "bob", "k2"))
        .await
        .unwrap();
    assert_eq!(s, 200);
}

async fn org_unit_exception_takes_effect_on_reload() {
    // The data-protection officer grants social an exception: no restart needed.
    let dora = Dev {
        org_unit: "social",
        clearance: 3,
        ..Dev::good("D-S", "dora")
    };
    let f = Fixture::new(
        Setup {
            watch_interval_s: 0,
            ..Setup::default()
        },
        std::slice::from_ref(&dora),
    );
    let d = f.start();
    let mut c = d.client().await;
    let (s, r) = c
        .connect_request(&connect_req(&dora, "dora", "k1"))
        .await
        .unwrap();
    assert_eq!(
        (s, r.reason.map(|r| r.as_str())),
        (403, Some("remote_work_not_permitted"))
    );
    let text = std::fs::read_to_string(f.config()).unwrap().replace(
        "name = \"social\"\nlevel = 3",
        "name = \"social\"\nlevel = 3\nremote_exception = true",
    );
    std::fs::write(f.config(), text).unwrap();
    let (s, body) = c
        .request(Method::POST, "/v1/registry/reload", None)
        .await
        .unwrap();
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let (s, r) = c
        .connect_request(&connect_req(&dora, "dora", "k2"))
        .await
        .unwrap();
    assert_eq!(s, 200, "{r:?}");
}

async fn world_writable_registry_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new(Setup::default(), &[Dev::good("D-A", "alice")]);
    std::fs::set_permissions(
        f.path("devices.csv"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(f.config())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("devices.csv") && err.contains("writable"),
        "{err}"
    );
}

/// What systemd sees through `NOTIFY_SOCKET` (a `Type=notify` unit with `WatchdogSec=`): `READY=1`
/// once `/readyz` answers 200, `WATCHDOG=1` every half `WATCHDOG_USEC`, `RELOADING=1` then
/// `READY=1` around a SIGHUP reload, and `STOPPING=1` on SIGTERM. (`WATCHDOG_PID` is not set:
/// the daemon's pid is not known before it starts, and without it the watchdog is for any pid.)
fn systemd_notify_ready_watchdog_reload_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    use std::sync::mpsc;
    use std::time::Instant;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let f = Fixture::new(
        Setup {
            env: vec![
                ("NOTIFY_SOCKET".into(), path.display().to_string()),
                ("WATCHDOG_USEC".into(), "1000000".into()),
            ],
            ..Setup::default()
        },
        &pool(1),
    );
    // Each datagram as it arrives, with `/readyz`'s status at that moment for READY=1.
    let (tx, rx) = mpsc::channel::<(Instant, String, Option<u16>)>();
    let port = f.port;
    let reader = std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            match sock.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let ready = text
                        .lines()
                        .any(|l| l == "READY=1")
                        .then(|| http_get(port, "/readyz").map_or(0, |(s, _)| s));
                    let last = text.lines().any(|l| l == "STOPPING=1");
                    if tx.send((Instant::now(), text, ready)).is_err() || last {
                        return;
                    }
                }
                Err(_) => continue,
            }
        }
    });
    let started = Instant::now();
    let mut d = f.start();
    let next = |within: Duration, want: &str| -> (Instant, String, Option<u16>) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(m) if m.1.lines().any(|l| l == want) => return m,
                Ok(_) => continue,
                Err(_) => panic!("no {want} within {within:?}"),
            }
        }
    };
    let (at, text, readyz) = next(Duration::from_secs(10), "READY=1");
    assert_eq!(
        readyz,
        Some(200),
        "READY=1 before /readyz answers 200: {text:?}"
    );
    eprintln!("READY=1 {:?} after start", at - started);
    // Two watchdog pings within 3 s (every 0.5 s with WATCHDOG_USEC=1 s).
    let (w1, ..) = next(Duration::from_secs(3), "WATCHDOG=1");
    let (w2, ..) = next(Duration::from_secs(3), "WATCHDOG=1");
    assert!(
        w2 - w1 < Duration::from_millis(900),
        "{:?} between pings",
        w2 - w1
    );
    // A reload says so and is ready again.
    d.signal(Signal::SIGHUP);
    next(Duration::from_secs(5), "RELOADING=1");
    next(Duration::from_secs(5), "READY=1");
    // SIGTERM: STOPPING=1, then a clean exit.
    d.signal(Signal::SIGTERM);
    next(Duration::from_secs(5), "STOPPING=1");
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0), "{}", d.log());
    drop(rx);
    let _ = reader.join();
}

/// The tests of this module, for the harness (`tests/it/main.rs`).
pub fn tests() -> Vec<Case> {
    vec![
        trial!(async sessions_survive_kill_9),
        trial!(async broken_registry_keeps_the_old_one_and_counts_the_failure),
        trial!(async sighup_reload_revokes_a_blocked_device),
        trial!(async file_change_is_picked_up_without_a_signal),
        trial!(async org_unit_exception_takes_effect_on_reload),
        trial!(async world_writable_registry_is_refused_at_start),
        trial!(systemd_notify_ready_watchdog_reload_and_stopping),
    ]
}
