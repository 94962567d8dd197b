//! The daemon's API, run as the real binary.

use std::time::Duration;

use hyper::Method;
use nix::sys::signal::Signal;
use pforte::wire::ConnectRequest;
use pforte::wire::DisconnectRequest;

use crate::common::harness::{Case, trial};
use crate::common::*;

fn devices() -> Vec<Dev> {
    vec![
        Dev::good("D-GOOD", "alice"),
        Dev::good("D-BOB", "bob"),
        Dev {
            ownership: "private",
            ..Dev::good("D-PRIV", "alice")
        },
        Dev {
            status: "lost",
            ..Dev::good("D-LOST", "alice")
        },
        Dev {
            encrypted: false,
            ..Dev::good("D-PLAIN", "alice")
        },
        Dev {
            patched_days_ago: 45,
            ..Dev::good("D-OLD", "alice")
        },
        Dev {
            hwaddr: "aa:bb:cc:00:00:01".into(),
            ..Dev::good("D-HW", "alice")
        },
        Dev {
            org_unit: "social",
            clearance: 3,
            ..Dev::good("D-SOCIAL", "dora")
        },
        Dev {
            org_unit: "health",
            clearance: 1,
            ..Dev::good("D-HEALTH", "carol")
        },
        Dev {
            org_unit: "finance",
            users: String::new(),
            ..Dev::good("D-FIN1", "")
        },
        Dev {
            org_unit: "finance",
            users: String::new(),
            ..Dev::good("D-FIN2", "")
        },
        Dev::good("D-IVAN", "ivan"),
    ]
}

fn dev(id: &str) -> Dev {
    devices().into_iter().find(|d| d.id == id).unwrap()
}

/// Every reason the policy gives without capacity, through the real API, with status codes.
async fn every_reason_code_through_the_api() {
    let f = Fixture::new(Setup::default(), &devices());
    let d = f.start();
    let mut c = d.client().await;
    let cases: Vec<(ConnectRequest, &str)> = vec![
        (connect_req(&dev("D-GOOD"), "alice", "k-good"), "allowed"),
        (
            ConnectRequest {
                cert_sha256: "zz".into(),
                ..connect_req(&dev("D-GOOD"), "alice", "k0")
            },
            "bad_request",
        ),
        (
            connect_req(&Dev::good("D-NOWHERE", "alice"), "alice", "k1"),
            "unregistered_device",
        ),
        (
            ConnectRequest {
                hwaddr: "aa:bb:cc:00:00:02".into(),
                ..connect_req(&dev("D-HW"), "alice", "k2")
            },
            "device_mismatch",
        ),
        (connect_req(&dev("D-PRIV"), "alice", "k3"), "private_device"),
        (connect_req(&dev("D-LOST"), "alice", "k4"), "device_blocked"),
        (connect_req(&dev("D-PLAIN"), "alice", "k5"), "not_encrypted"),
        (connect_req(&dev("D-OLD"), "alice", "k6"), "patch_overdue"),
        (connect_req(&dev("D-FIN1"), "zoe", "k7"), "unknown_user"),
        (
            connect_req(&dev("D-BOB"), "alice", "k8"),
            "user_not_assigned",
        ),
        (
            connect_req(&dev("D-SOCIAL"), "dora", "k9"),
            "remote_work_not_permitted",
        ),
        (
            connect_req(&dev("D-HEALTH"), "carol", "k10"),
            "device_clearance",
        ),
        (
            ConnectRequest {
                zone: "lab".into(),
                ..connect_req(&dev("D-GOOD"), "alice", "k11")
            },
            "unknown_zone",
        ),
    ];
    for (req, want) in &cases {
        let (status, resp) = c.connect_request(req).await.unwrap();
        let got = resp.reason.map(|r| r.as_str()).unwrap_or("allowed");
        assert_eq!(got, *want, "{req:?} -> {resp:?}");
        let want_status = match *want {
            "allowed" => 200,
            "bad_request" => 400,
            _ => 403,
        };
        assert_eq!(status, want_status, "{want}");
        assert!(!resp.message.is_empty());
    }
    let m = d.metrics();
    for (_, want) in &cases {
        let series = if *want == "allowed" {
            "pforte_decisions_total{decision=\"allow\",reason=\"allowed\"}".to_string()
        } else {
            format!("pforte_decisions_total{{decision=\"deny\",reason=\"{want}\"}}")
        };
        assert_eq!(metric_value(&m, &series), Some(1.0), "{series}\n{m}");
    }
    // Capacity reasons exist from the start at 0.
    assert_eq!(
        metric_value(
            &m,
            "pforte_decisions_total{decision=\"deny\",reason=\"capacity_full\"}"
        ),
        Some(0.0)
    );
}

async fn allow_pushes_pool_address_and_routes_and_disconnect_frees_the_seat() {
    let f = Fixture::new(
        Setup {
            max_sessions: 1,
            ..Setup::default()
        },
        &devices(),
    );
    let d = f.start();
    let mut c = d.client().await;
    let (s, a) = c
        .connect_request(&connect_req(&dev("D-GOOD"), "alice", "k1"))
        .await
        .unwrap();
    assert_eq!(s, 200, "{a:?}");
    let push = a.push.clone().unwrap();
    let ifc = push.ifconfig.unwrap();
    assert_eq!(ifc.ip.to_string(), "10.213.0.2");
    assert_eq!(ifc.netmask, "255.255.255.0");
    assert_eq!(push.routes[0].to_string(), "10.1.0.0/16");
    // Seat taken: bob is refused.
    let (s, b) = c
        .connect_request(&connect_req(&dev("D-BOB"), "bob", "k2"))
        .await
        .unwrap();
    assert_eq!(
        (s, b.reason.map(|r| r.as_str())),
        (403, Some("capacity_full"))
    );
    // An unknown disconnect (as after a refused connect) is answered and frees nothing.
    let (s, v) = c
        .disconnect_request(&DisconnectRequest {
            vpn: "openvpn".into(),
            instance: "office-udp".into(),
            session_key: "k2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((s, v["result"].as_str()), (200, Some("unknown")));
    assert_eq!(d.metric("pforte_seats_used"), Some(1.0));
    // The real disconnect frees it, with final bytes counted.
    let (s, v) = c
        .disconnect_request(&DisconnectRequest {
            vpn: "openvpn".into(),
            instance: "office-udp".into(),
            session_key: "k1".into(),
            bytes_received: Some(1000),
            bytes_sent: Some(5000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((s, v["result"].as_str()), (200, Some("ended")), "{v}");
    assert_eq!(d.metric("pforte_seats_used"), Some(0.0));
    assert_eq!(
        d.metric("pforte_session_received_bytes_total{org_unit=\"it\",zone=\"office\"}"),
        Some(1000.0)
    );
    let (s, b) = c
        .connect_request(&connect_req(&dev("D-BOB"), "bob", "k2"))
        .await
        .unwrap();
    assert_eq!(s, 200, "{b:?}");
}

async fn reserved_seats_quota_and_user_limit() {
    let f = Fixture::new(
        Setup {
            max_sessions: 4,
            reserved_seats: 1,
            per_user: 1,
            finance_quota: 1,
            ..Setup::default()
        },
        &devices(),
    );
    let d = f.start();
    let mut c = d.client().await;
    let reason = |r: &pforte::wire::ConnectResponse| {
        r.reason
            .map(|x| x.as_str().to_string())
            .unwrap_or_else(|| "allowed".into())
    };
    let (_, r) = c
        .connect_request(&connect_req(&dev("D-FIN1"), "frank", "f1"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "allowed");
    let (_, r) = c
        .connect_request(&connect_req(&dev("D-FIN2"), "gina", "f2"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "org_unit_quota");
    let (_, r) = c
        .connect_request(&connect_req(&dev("D-GOOD"), "alice", "a1"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "allowed");
    let (_, r) = c
        .connect_request(&connect_req(&dev("D-GOOD"), "alice", "a2"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "user_session_limit");
    let (_, r) = c
        .connect_request(&connect_req(&dev("D-BOB"), "bob", "b1"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "allowed");
    // 3 of 4 seats taken; the last is reserved for priority org units (it).
    let (_, r) = c
        .connect_request(&connect_req(&dev("D-FIN2"), "gina", "f3"))
        .await
        .unwrap();
    assert_eq!(
        reason(&r),
        "capacity_full",
        "finance may not take the reserved seat"
    );
    let (_, r) = c
        .connect_request(&connect_req(&dev("D-IVAN"), "ivan", "i1"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "allowed", "it is a priority org unit");
    assert_eq!(d.metric("pforte_seats_used"), Some(4.0));
    let (_, r) = c
        .connect_request(&connect_req(&dev("D-FIN2"), "gina", "f4"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "capacity_full");
}

async fn concurrent_connects_never_oversell_the_last_seats() {
    let mut devs = Vec::new();
    for i in 0..40 {
        devs.push(Dev {
            users: String::new(),
            ..Dev::good(&format!("D-P{i}"), "")
        });
    }
    let f = Fixture::new(
        Setup {
            max_sessions: 7,
            per_user: 0,
            ..Setup::default()
        },
        &devs,
    );
    let d = f.start();
    let mut handles = Vec::new();
    for (i, dv) in devs.iter().cloned().enumerate() {
        let socket = d.socket.clone();
        handles.push(tokio::spawn(async move {
            let mut c = pforte::client::UnixClient::connect(&socket).await.unwrap();
            let (s, _) = c
                .connect_request(&connect_req(&dv, "alice", &format!("race{i}")))
                .await
                .unwrap();
            s
        }));
    }
    let mut allowed = 0;
    for h in handles {
        if h.await.unwrap() == 200 {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 7);
    let mut c = d.client().await;
    let (_, body) = c.request(Method::GET, "/v1/sessions", None).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["count"], 7);
}

async fn malformed_input_gets_400_naming_the_field_and_never_kills_the_daemon() {
    let f = Fixture::new(Setup::default(), &devices());
    let mut d = f.start();
    let mut c = d.client().await;
    let bodies: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"vpn\": 42}".to_vec(), "`vpn`"),
        (b"not json".to_vec(), "JSON"),
        (vec![0xff, 0x00, 0xfe], "JSON"),
        (b"[]".to_vec(), "object"),
        (
            format!("{{\"vpn\":\"openvpn\",\"zone\":\"office\",\"username\":\"a\",\"common_name\":\"{}\",\"cert_sha256\":\"{}\"}}", "x".repeat(10_000), dev("D-GOOD").fp()).into_bytes(),
            "common_name",
        ),
        (
            format!("{{\"vpn\":\"openvpn\",\"zone\":\"office\",\"username\":\"a\",\"hwaddr\":\"aa:bb:cc:dd:ee:ff\\u0000\",\"cert_sha256\":\"{}\"}}", dev("D-GOOD").fp()).into_bytes(),
            "hwaddr",
        ),
    ];
    for (body, needle) in bodies {
        let (s, resp) = c
            .request(Method::POST, "/v1/connect", Some(body.clone()))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&resp);
        assert_eq!(s, 400, "{text}");
        assert!(text.contains(needle), "{needle} not in {text}");
    }
    // Oversized body: 413.
    let (s, _) = c
        .request(Method::POST, "/v1/connect", Some(vec![b' '; 70 * 1024]))
        .await
        .unwrap();
    assert_eq!(s, 413);
    let mut c = d.client().await;
    let (s, _) = c
        .request(
            Method::POST,
            "/v1/disconnect",
            Some(b"{\"bytes_sent\":-1}".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(s, 400);
    let (s, _) = c.request(Method::GET, "/v1/nothing", None).await.unwrap();
    assert_eq!(s, 404);
    let (s, _) = c.request(Method::GET, "/v1/connect", None).await.unwrap();
    assert_eq!(s, 405);
    assert!(
        d.wait_exit(Duration::from_millis(10)).is_none(),
        "daemon died"
    );
}

async fn kill_a_session_and_list_sessions() {
    let f = Fixture::new(Setup::default(), &devices());
    let d = f.start();
    let mut c = d.client().await;
    let (_, a) = c
        .connect_request(&connect_req(&dev("D-GOOD"), "alice", "k1"))
        .await
        .unwrap();
    let id = a.session_id.unwrap();
    let (s, _) = c
        .request(Method::DELETE, &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    let (s, _) = c
        .request(Method::DELETE, &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(s, 404);
    let (_, body) = c.request(Method::GET, "/v1/sessions", None).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["count"], 0);
}

async fn tcp_v1_needs_the_bearer_token() {
    let f = Fixture::new(
        Setup {
            token: true,
            ..Setup::default()
        },
        &devices(),
    );
    let d = f.start();
    assert_eq!(http_get(d.port, "/v1/sessions").unwrap().0, 401);
    let wrong = [("Authorization", "Bearer wrong-token-wrong-token")];
    assert_eq!(
        http(d.port, "GET", "/v1/sessions", &wrong, "").unwrap().0,
        401
    );
    let bearer = format!("Bearer {TOKEN}");
    let right = [("Authorization", bearer.as_str())];
    assert_eq!(
        http(d.port, "GET", "/v1/sessions", &right, "").unwrap().0,
        200
    );
    assert_eq!(http_get(d.port, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(d.port, "/metrics").unwrap().0, 200);
    assert!(!d.log().contains(TOKEN), "token leaked into the log");
}

async fn tcp_without_token_file_does_not_serve_v1() {
    let f = Fixture::new(Setup::default(), &devices());
    let d = f.start();
    let (s, body) = http_get(d.port, "/v1/sessions").unwrap();
    assert_eq!(s, 404, "{body}");
}

async fn socket_gets_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new(
        Setup {
            socket_mode: "0600",
            ..Setup::default()
        },
        &devices(),
    );
    let _d = f.start();
    let mode = std::fs::metadata(f.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

/// No username, device id, address or fingerprint in /metrics, whatever sessions exist.
async fn metrics_carry_no_personal_data() {
    let f = Fixture::new(Setup::default(), &devices());
    let d = f.start();
    let mut c = d.client().await;
    let req = ConnectRequest {
        remote_addr: "203.0.113.77:51515".into(),
        tunnel_ip: "10.213.0.99".into(),
        ..connect_req(&dev("D-GOOD"), "alice", "key-secret-1")
    };
    let (s, a) = c.connect_request(&req).await.unwrap();
    assert_eq!(s, 200);
    let (s, _) = c
        .connect_request(&connect_req(&dev("D-PRIV"), "alice", "k2"))
        .await
        .unwrap();
    assert_eq!(s, 403);
    c.disconnect_request(&DisconnectRequest {
        session_id: "no-such-session".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let m = d.metrics();
    assert!(
        m.contains("pforte_sessions{org_unit=\"it\",zone=\"office\"} 1"),
        "{m}"
    );
    let fp = dev("D-GOOD").fp();
    let plain_fp = fp.replace(':', "");
    let tunnel = a.push.unwrap().ifconfig.unwrap().ip.to_string();
    for secret in [
        "alice",
        "D-GOOD",
        "D-PRIV",
        "203.0.113.77",
        "51515",
        fp.as_str(),
        &fp[..20],
        &plain_fp[..20],
        "key-secret-1",
        "D-GOOD-cn",
        tunnel.as_str(),
    ] {
        assert!(!m.contains(secret), "`{secret}` appears in /metrics");
    }
    // The audit log has them instead.
    let audit = std::fs::read_to_string(f.path("state/audit.log")).unwrap();
    assert!(audit.contains("alice") && audit.contains("D-GOOD") && audit.contains("203.0.113.77"));
}

async fn sigterm_drains_and_exits_zero() {
    let f = Fixture::new(Setup::default(), &devices());
    let mut d = f.start();
    let mut c = d.client().await;
    let (s, _) = c
        .connect_request(&connect_req(&dev("D-GOOD"), "alice", "k1"))
        .await
        .unwrap();
    assert_eq!(s, 200);
    d.signal(Signal::SIGTERM);
    assert_eq!(
        d.wait_exit(Duration::from_secs(15)),
        Some(0),
        "log:\n{}",
        d.log()
    );
    assert!(d.log().contains("session store flushed"), "{}", d.log());
}

async fn audit_log_pseudonymises_users_and_addresses_with_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.key");
    std::fs::write(&key, "a-secret-key-of-32-bytes-length!").unwrap();
    let f = Fixture::new(
        Setup {
            env: vec![(
                "PFORTE_AUDIT__PSEUDONYMISE_KEY_FILE".into(),
                key.display().to_string(),
            )],
            ..Setup::default()
        },
        &devices(),
    );
    let d = f.start();
    let mut c = d.client().await;
    let req = ConnectRequest {
        remote_addr: "203.0.113.77:51515".into(),
        ..connect_req(&dev("D-GOOD"), "alice", "k1")
    };
    assert_eq!(c.connect_request(&req).await.unwrap().0, 200);
    let denied = ConnectRequest {
        remote_addr: "203.0.113.77:40000".into(),
        ..connect_req(&dev("D-PRIV"), "alice", "k2")
    };
    assert_eq!(c.connect_request(&denied).await.unwrap().0, 403);
    let audit = std::fs::read_to_string(f.path("state/audit.log")).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{audit}");
    assert!(
        !audit.contains("alice") && !audit.contains("203.0.113.77"),
        "{audit}"
    );
    // The same person and address give the same pseudonym, so a data-protection officer can
    // follow one case without reading names; the device id stays (it is the inventory's).
    assert_eq!(lines[0]["username"], lines[1]["username"]);
    assert_eq!(lines[0]["remote_addr"], lines[1]["remote_addr"]);
    assert!(lines[0]["username"].as_str().unwrap().starts_with("p:"));
    assert_eq!(lines[0]["device_id"], "D-GOOD");
    assert_eq!(lines[1]["reason"], "private_device");
}

/// SIGTERM while a request is half sent: the daemon stops accepting, answers the request in
/// flight, flushes the store and exits 0.
async fn sigterm_finishes_the_request_in_flight() {
    use std::io::{Read, Write};
    let f = Fixture::new(Setup::default(), &devices());
    let mut d = f.start();
    let body = serde_json::to_string(&connect_req(&dev("D-GOOD"), "alice", "k1")).unwrap();
    let (head, tail) = body.split_at(body.len() / 2);
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/connect HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{head}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    d.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    // New connections are no longer accepted...
    assert!(
        std::os::unix::net::UnixStream::connect(&d.socket).is_err()
            || http_get(d.port, "/healthz").is_none(),
        "still accepting after SIGTERM"
    );
    // ...but the request in flight is answered.
    s.write_all(tail.as_bytes()).unwrap();
    let mut answer = [0u8; 12];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    drop(s);
    assert_eq!(d.wait_exit(Duration::from_secs(15)), Some(0), "{}", d.log());
    // And it was persisted: a restart has the session.
    let d2 = f.start();
    assert_eq!(d2.metric("pforte_seats_used"), Some(1.0));
}

/// The tests of this module, for the harness (`tests/it/main.rs`).
pub fn tests() -> Vec<Case> {
    vec![
        trial!(async every_reason_code_through_the_api),
        trial!(async allow_pushes_pool_address_and_routes_and_disconnect_frees_the_seat),
        trial!(async reserved_seats_quota_and_user_limit),
        trial!(async concurrent_connects_never_oversell_the_last_seats),
        trial!(async malformed_input_gets_400_naming_the_field_and_never_kills_the_daemon),
        trial!(async kill_a_session_and_list_sessions),
        trial!(async tcp_v1_needs_the_bearer_token),
        trial!(async tcp_without_token_file_does_not_serve_v1),
        trial!(async socket_gets_its_mode),
        trial!(async metrics_carry_no_personal_data),
        trial!(async sigterm_drains_and_exits_zero),
        trial!(async audit_log_pseudonymises_users_and_addresses_with_a_key),
        trial!(async sigterm_finishes_the_request_in_flight),
    ]
}
