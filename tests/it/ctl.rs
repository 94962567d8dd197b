//! The operator's commands against a running daemon: `pforte sessions`, `kill`, `reload`,
//! `status`, and for the help desk `check --device` and `decisions`.

use std::process::{Command, Output};

use crate::common::harness::{Case, trial};
use crate::common::*;

fn pforte(f: &Fixture, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(f.config())
        .env_remove("PFORTE_SOCKET")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

async fn connect(d: &Daemon, dev: &Dev, user: &str, key: &str) -> u16 {
    let mut c = d.client().await;
    c.connect_request(&connect_req(dev, user, key))
        .await
        .unwrap()
        .0
}

async fn sessions_kill_and_status_over_the_socket() {
    let alice = Dev::good("D-A", "alice");
    let bob = Dev {
        org_unit: "finance",
        ..Dev::good("D-B", "frank")
    };
    let f = Fixture::new(
        Setup {
            finance_quota: 3,
            ..Setup::default()
        },
        &[alice.clone(), bob.clone()],
    );
    let d = f.start();
    let o = pforte(&f, &["sessions"]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("no live sessions"));
    assert_eq!(connect(&d, &alice, "alice", "k1").await, 200);
    assert_eq!(connect(&d, &alice, "alice", "k2").await, 200);
    assert_eq!(connect(&d, &bob, "frank", "k3").await, 200);

    let o = pforte(&f, &["sessions"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let out = text(&o);
    assert!(out.starts_with("ID "), "{out}");
    assert_eq!(out.lines().count(), 4, "{out}");
    let o = pforte(&f, &["sessions", "--json", "--org-unit", "finance"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["device_id"], "D-B");
    let o = pforte(&f, &["sessions", "--user", "nobody"]);
    assert_eq!(code(&o), 1);

    let o = pforte(&f, &["status"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("seats: 3 used of 100 (97 free"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["finance", "1", "3", "2"]),
        "{out}"
    );
    let o = pforte(&f, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["seats"]["used"], 3);
    assert_eq!(v["registry"]["devices"], 2);

    let o = pforte(&f, &["kill"]);
    assert_eq!(code(&o), 2);
    assert!(text(&o).contains("name what to end"), "{}", text(&o));
    let o = pforte(&f, &["kill", "--device", "D-A"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(text(&o).matches("ended ").count(), 2, "{}", text(&o));
    assert_eq!(d.metric("pforte_seats_used"), Some(1.0));
    let o = pforte(&f, &["kill", "--user", "alice"]);
    assert_eq!(code(&o), 1, "nothing left to end: {}", text(&o));
    let id = {
        let o = pforte(&f, &["sessions", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v[0]["id"].as_str().unwrap().to_string()
    };
    let o = pforte(&f, &["kill", "--id", &id]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(d.metric("pforte_seats_used"), Some(0.0));

    let o = pforte(&f, &["reload"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("reloaded: 2 devices"), "{}", text(&o));
}

async fn a_daemon_that_is_not_there_gets_a_clear_error() {
    let f = Fixture::new(Setup::default(), &[Dev::good("D-A", "alice")]);
    for cmd in ["sessions", "status", "reload"] {
        let o = pforte(&f, &[cmd]);
        assert_eq!(code(&o), 2, "{cmd}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.starts_with(&format!("pforte {cmd}: cannot ask the daemon at "))
                && err.contains("pforte.sock"),
            "{err}"
        );
    }
}

/// The help desk knows the asset tag and the caller's name, not a fingerprint; and asks what
/// happened five minutes ago.
async fn the_help_desk_checks_a_device_by_id_and_reads_its_last_decisions() {
    let good = Dev::good("D-OK", "alice");
    let plain = Dev {
        encrypted: false,
        ..Dev::good("D-PLAIN", "alice")
    };
    let f = Fixture::new(Setup::default(), &[good.clone(), plain.clone()]);
    let o = Command::new(bin())
        .args([
            "check", "--device", "D-PLAIN", "--user", "alice", "--config",
        ])
        .arg(f.config())
        .output()
        .unwrap();
    assert_eq!(code(&o), 1);
    assert!(
        text(&o).starts_with("REFUSED (not_encrypted): Device D-PLAIN"),
        "{}",
        text(&o)
    );
    let o = Command::new(bin())
        .args(["check", "--device", "D-OK", "--user", "alice", "--config"])
        .arg(f.config())
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = Command::new(bin())
        .args(["check", "--device", "D-NONE", "--user", "alice", "--config"])
        .arg(f.config())
        .output()
        .unwrap();
    assert!(
        text(&o).starts_with("REFUSED (unregistered_device)"),
        "{}",
        text(&o)
    );

    let d = f.start();
    assert_eq!(connect(&d, &plain, "alice", "k1").await, 403);
    assert_eq!(connect(&d, &good, "alice", "k2").await, 200);
    let o = Command::new(bin())
        .args(["decisions", "--device", "D-PLAIN", "--config"])
        .arg(f.config())
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", text(&o));
    let out = text(&o);
    assert!(
        out.lines()
            .any(|l| l.contains("deny") && l.contains("not_encrypted") && l.contains("alice")),
        "{out}"
    );
    let o = Command::new(bin())
        .args(["decisions", "--user", "alice", "--last", "1", "--config"])
        .arg(f.config())
        .output()
        .unwrap();
    let out = text(&o);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.contains("allow") && out.contains("D-OK"), "{out}");
    let o = Command::new(bin())
        .args(["decisions", "--user", "nobody", "--config"])
        .arg(f.config())
        .output()
        .unwrap();
    assert_eq!(code(&o), 1);
}

/// With a pseudonymised audit log the help desk still finds a person: the name is pseudonymised
/// with the same key before the lookup, and never appears in the log.
async fn decisions_are_found_in_a_pseudonymised_log() {
    use std::os::unix::fs::PermissionsExt;
    let plain = Dev {
        encrypted: false,
        ..Dev::good("D-PLAIN", "alice")
    };
    let f = Fixture::new(Setup::default(), std::slice::from_ref(&plain));
    std::fs::write(f.path("pseudo.key"), "0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(f.path("pseudo.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let text_cfg = std::fs::read_to_string(f.config()).unwrap().replace(
        "[audit]\n",
        &format!(
            "[audit]\npseudonymise_key_file = \"{}\"\n",
            f.path("pseudo.key").display()
        ),
    );
    std::fs::write(f.config(), text_cfg).unwrap();
    let d = f.start();
    assert_eq!(connect(&d, &plain, "alice", "k1").await, 403);
    let log = std::fs::read_to_string(f.path("state/audit.log")).unwrap();
    assert!(!log.contains("alice"), "{log}");
    let o = Command::new(bin())
        .args(["decisions", "--user", "alice", "--config"])
        .arg(f.config())
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("not_encrypted"), "{}", text(&o));
}

pub fn tests() -> Vec<Case> {
    vec![
        trial!(async sessions_kill_and_status_over_the_socket),
        trial!(async a_daemon_that_is_not_there_gets_a_clear_error),
        trial!(async the_help_desk_checks_a_device_by_id_and_reads_its_last_decisions),
        trial!(async decisions_are_found_in_a_pseudonymised_log),
    ]
}
