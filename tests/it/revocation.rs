//! What a reload does to live sessions (every check re-decided, a patch grace, a blocked-only
//! switch), the registry's safety valve against a cut-off export, and a device seen from two
//! addresses at once.

use std::time::Duration;

use hyper::Method;
use serde_json::Value;

use crate::common::harness::{Case, trial};
use crate::common::*;

/// Sets keys of the fixture's `[policy]` table.
fn with_policy(f: &Fixture, keys: &str) {
    let text = std::fs::read_to_string(f.config())
        .unwrap()
        .replace("[policy]\n", &format!("[policy]\n{keys}\n"));
    std::fs::write(f.config(), text).unwrap();
}

fn audit_lines(f: &Fixture) -> Vec<Value> {
    std::fs::read_to_string(f.path("state/audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn connect_all(d: &Daemon, devs: &[Dev]) {
    let mut c = d.client().await;
    for (i, dv) in devs.iter().enumerate() {
        let (s, r) = c
            .connect_request(&connect_req(dv, &dv.users, &format!("k{i}")))
            .await
            .unwrap();
        assert_eq!(s, 200, "{} {r:?}", dv.id);
    }
}

async fn reload(d: &Daemon, query: &str) -> (u16, Value) {
    let mut c = d.client().await;
    let (s, body) = c
        .request(Method::POST, &format!("/v1/registry/reload{query}"), None)
        .await
        .unwrap();
    (s, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn live_devices(d: &Daemon) -> Vec<String> {
    let mut c = d.client().await;
    let (s, body) = c.request(Method::GET, "/v1/sessions", None).await.unwrap();
    assert_eq!(s, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    let mut ids: Vec<String> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["device_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn devices() -> Vec<Dev> {
    vec![
        Dev::good("D-KEEP", "alice"),
        Dev::good("D-ENC", "bob"),
        Dev::good("D-PATCH", "ivan"),
        Dev {
            org_unit: "finance",
            ..Dev::good("D-MOVE", "frank")
        },
    ]
}

/// The data-protection officer tightens things: a device found unencrypted, one long overdue on
/// patches, a user moved to an org unit above the remote ceiling. A reload ends exactly those
/// sessions, through the VPN server, with the reason counted and audited.
async fn a_reload_ends_every_session_that_would_now_be_refused() {
    let devs = devices();
    let f = Fixture::new(
        Setup {
            watch_interval_s: 0,
            ..Setup::default()
        },
        &devs,
    );
    let d = f.start();
    connect_all(&d, &devs).await;
    assert_eq!(d.metric("pforte_seats_used"), Some(4.0));

    f.write_devices(&[
        devs[0].clone(),
        Dev {
            encrypted: false,
            ..devs[1].clone()
        },
        Dev {
            patched_days_ago: 40,
            ..devs[2].clone()
        },
        Dev {
            org_unit: "social",
            ..devs[3].clone()
        },
    ]);
    let users = std::fs::read_to_string(f.path("users.csv"))
        .unwrap()
        .replace("frank,finance,", "frank,social,");
    std::fs::write(f.path("users.csv"), users).unwrap();
    let (s, body) = reload(&d, "").await;
    assert_eq!((s, body["revoked"].as_u64()), (200, Some(3)), "{body}");
    assert_eq!(live_devices(&d).await, ["D-KEEP"]);
    for reason in [
        "not_encrypted",
        "patch_overdue",
        "remote_work_not_permitted",
    ] {
        assert_eq!(
            d.metric(&format!(
                "pforte_sessions_revoked_total{{reason=\"{reason}\"}}"
            )),
            Some(1.0),
            "{reason}"
        );
    }
    let ends: Vec<String> = audit_lines(&f)
        .iter()
        .filter(|l| l["event"] == "end")
        .map(|l| format!("{} {}", l["device_id"], l["reason"]))
        .collect();
    assert!(
        ends.iter()
            .any(|e| e.contains("D-ENC") && e.contains("revoked on reload: not_encrypted")),
        "{ends:?}"
    );
}

/// A grace for patch age, and a switch that ends only blocked and removed devices.
async fn patch_grace_and_blocked_only_leave_the_rest_connected() {
    let devs = devices();
    let f = Fixture::new(
        Setup {
            watch_interval_s: 0,
            ..Setup::default()
        },
        &devs,
    );
    with_policy(&f, "revoke_patch_grace_days = 14");
    let d = f.start();
    connect_all(&d, &devs).await;
    let aged = |days| Dev {
        patched_days_ago: days,
        ..devs[2].clone()
    };
    // 40 days: 10 past the limit, inside the 14-day grace; 50 days: past it.
    f.write_devices(&[devs[0].clone(), devs[1].clone(), aged(40), devs[3].clone()]);
    assert_eq!(reload(&d, "").await.1["revoked"].as_u64(), Some(0));
    f.write_devices(&[devs[0].clone(), devs[1].clone(), aged(50), devs[3].clone()]);
    assert_eq!(reload(&d, "").await.1["revoked"].as_u64(), Some(1));
    assert_eq!(live_devices(&d).await, ["D-ENC", "D-KEEP", "D-MOVE"]);
    // A new connect gets no grace.
    let mut c = d.client().await;
    let (s, _) = c
        .connect_request(&connect_req(&aged(40), "ivan", "new"))
        .await
        .unwrap();
    assert_eq!(s, 403);

    with_policy(&f, "revoke_on_reload = \"blocked-only\"");
    f.write_devices(&[
        devs[0].clone(),
        Dev {
            encrypted: false,
            ..devs[1].clone()
        },
        Dev {
            status: "lost",
            ..devs[3].clone()
        },
    ]);
    let (s, body) = reload(&d, "").await;
    assert_eq!((s, body["revoked"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(live_devices(&d).await, ["D-ENC", "D-KEEP"]);
    assert_eq!(
        d.metric("pforte_sessions_revoked_total{reason=\"device_blocked\"}"),
        Some(1.0)
    );
}

/// An inventory export cut off at a row boundary parses fine: a reload that would drop more
/// than `registry.max_removed_percent` is refused, counted, the old registry kept, and the
/// error says how to force it.
async fn a_reload_that_drops_most_devices_is_refused_unless_forced() {
    let devs: Vec<Dev> = (0..200)
        .map(|i| Dev::good(&format!("D-{i:03}"), "alice"))
        .collect();
    let f = Fixture::new(
        Setup {
            watch_interval_s: 0,
            per_user: 10,
            ..Setup::default()
        },
        &devs,
    );
    let d = f.start();
    connect_all(&d, &devs[145..150]).await;
    // Twenty of two hundred (10 %) may go; thirty of the 180 left (17 %) may not.
    f.write_devices(&devs[..180]);
    assert_eq!(reload(&d, "").await.0, 200);
    f.write_devices(&devs[..150]);
    assert_eq!(reload(&d, "").await.0, 422);
    f.write_devices(&devs[..145]);
    let (s, body) = reload(&d, "").await;
    assert_eq!(s, 422, "{body}");
    let msg = body["error"].as_str().unwrap_or_default().to_string();
    assert!(
        msg.contains("drops 35 of 180 devices") && msg.contains("pforte reload --force"),
        "{body}"
    );
    assert_eq!(
        d.metric("pforte_registry_mass_removals_refused_total"),
        Some(2.0)
    );
    assert_eq!(
        live_devices(&d).await.len(),
        5,
        "nothing ended by a refused reload"
    );
    let (s, body) = reload(&d, "?force=true").await;
    assert_eq!((s, body["revoked"].as_u64()), (200, Some(5)), "{body}");
    wait_for("the seats to be freed", Duration::from_secs(5), || {
        d.metric("pforte_seats_used") == Some(0.0)
    });
}

/// One certificate on two machines: by default the old session is ended (OpenVPN's own way),
/// with `duplicate_device = "refuse"` the new connect is refused; both counted, both addresses
/// in the audit log. A reconnect from the same address is not a duplicate.
async fn a_device_seen_from_two_addresses_is_replaced_or_refused() {
    for (mode, want) in [("replace", 200), ("refuse", 403)] {
        let dev = Dev::good("D-COPY", "alice");
        let f = Fixture::new(Setup::default(), std::slice::from_ref(&dev));
        with_policy(&f, &format!("duplicate_device = \"{mode}\""));
        let d = f.start();
        let mut c = d.client().await;
        let at = |addr: &str, key: &str| pforte::wire::ConnectRequest {
            remote_addr: addr.into(),
            ..connect_req(&dev, "alice", key)
        };
        let (s, _) = c
            .connect_request(&at("198.51.100.7:1194", "k1"))
            .await
            .unwrap();
        assert_eq!(s, 200);
        let (s, _) = c
            .connect_request(&at("198.51.100.7:1200", "k2"))
            .await
            .unwrap();
        assert_eq!(s, 200, "same address, another port: not a duplicate");
        let (s, r) = c
            .connect_request(&at("203.0.113.9:5000", "k3"))
            .await
            .unwrap();
        assert_eq!(s, want, "{mode}: {r:?}");
        let audit = audit_lines(&f);
        let dup: Vec<&Value> = audit
            .iter()
            .filter(|l| l["event"] == "duplicate_device")
            .collect();
        assert_eq!(
            dup.len(),
            2,
            "{mode}: one record per live session: {audit:?}"
        );
        for l in &dup {
            assert_eq!(l["remote_addr"], "203.0.113.9:5000");
            let other = l["other_remote_addr"].as_str().unwrap();
            assert!(other.starts_with("198.51.100.7:"), "{l}");
        }
        if mode == "replace" {
            assert_eq!(live_devices(&d).await, ["D-COPY"]);
            assert_eq!(
                d.metric("pforte_duplicate_devices_total{action=\"replaced\"}"),
                Some(2.0)
            );
        } else {
            assert_eq!(r.reason.map(|r| r.as_str()), Some("duplicate_device"));
            assert_eq!(live_devices(&d).await.len(), 2);
            assert_eq!(
                d.metric("pforte_duplicate_devices_total{action=\"refused\"}"),
                Some(1.0)
            );
        }
    }
}

pub fn tests() -> Vec<Case> {
    vec![
        trial!(async a_reload_ends_every_session_that_would_now_be_refused),
        trial!(async patch_grace_and_blocked_only_leave_the_rest_connected),
        trial!(async a_reload_that_drops_most_devices_is_refused_unless_forced),
        trial!(async a_device_seen_from_two_addresses_is_replaced_or_refused),
    ]
}
