//! The RADIUS front as a proxy: a real FreeRADIUS 3.2 (config in a temp dir, `files` + `pap` +
//! `eap` with EAP-MD5) as the upstream credential server behind pforte. PAP accept and reject
//! through pforte, EAP over several rounds with `State` (driven by `eapol_test`), policy still
//! deciding after the upstream accepted, a dead first upstream skipped, and every upstream gone:
//! a clear Reject, never an Accept.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::harness::{Case, Need, trial};
use crate::common::{Setup, have_tool, wait_for};
use crate::radius_front::{
    RDev, Reaped, SECRET, access, cisco, free_udp_port, radius_fixture, session_ids,
};

pub const UPSTREAM_SECRET: &str = "upstream-test-secret";

/// Writes a minimal FreeRADIUS config into `dir`: one auth listener on `port`, pforte
/// (127.0.0.1) as its client with Message-Authenticator required, `files` with `users`.
pub fn write_freeradius(dir: &Path, port: u16, users: &str) {
    let d = dir.display();
    std::fs::write(dir.join("dictionary"), "").unwrap();
    std::fs::write(dir.join("users"), users).unwrap();
    std::fs::write(
        dir.join("radiusd.conf"),
        format!(
            r#"prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
logdir = {d}
raddbdir = {d}
radacctdir = {d}
name = freeradius
confdir = {d}
modconfdir = {d}
certdir = {d}
cadir = {d}
run_dir = {d}
db_dir = {d}
libdir = /usr/lib/freeradius
pidfile = {d}/radiusd.pid
max_request_time = 30
cleanup_delay = 5
max_requests = 65536
hostname_lookups = no
log {{
  destination = stdout
}}
security {{
  allow_core_dumps = no
  max_attributes = 200
  reject_delay = 0
  status_server = no
}}
thread pool {{
  start_servers = 2
  max_servers = 4
  min_spare_servers = 1
  max_spare_servers = 4
  max_requests_per_server = 0
}}
client pforte {{
  ipaddr = 127.0.0.1
  secret = {UPSTREAM_SECRET}
  require_message_authenticator = yes
}}
modules {{
  pap {{
  }}
  files {{
    filename = {d}/users
  }}
  eap {{
    default_eap_type = md5
    timer_expire = 60
    ignore_unknown_eap_types = no
    max_sessions = 4096
    md5 {{
    }}
  }}
}}
server default {{
  listen {{
    type = auth
    ipaddr = 127.0.0.1
    port = {port}
  }}
  authorize {{
    files
    eap {{
      ok = return
    }}
    pap
  }}
  authenticate {{
    Auth-Type PAP {{
      pap
    }}
    eap
  }}
}}
"#
        ),
    )
    .unwrap();
}

/// Starts `freeradius -f -d DIR` (foreground, its log in DIR/freeradius.log) and waits until it
/// says it is ready.
pub fn start_freeradius(dir: &Path) -> Reaped {
    let log = std::fs::File::create(dir.join("freeradius.log")).unwrap();
    let child = Reaped(
        Command::new("freeradius")
            .args(["-X", "-d"])
            .arg(dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(dir.join("freeradius.log")).unwrap_or_default();
        if text.contains("Ready to process requests") {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "FreeRADIUS not ready in 10 s:\n{}",
        std::fs::read_to_string(dir.join("freeradius.log")).unwrap_or_default()
    );
}

/// `eapol_test` EAP-MD5 as `identity` from `client_ip`; its exit code and output.
fn eapol_md5(
    dir: &Path,
    port: u16,
    client_ip: &str,
    identity: &str,
    password: &str,
) -> (Option<i32>, String) {
    let conf = dir.join(format!("eapol-{identity}.conf"));
    std::fs::write(
        &conf,
        format!(
            "network={{\n  key_mgmt=IEEE8021X\n  eap=MD5\n  identity=\"{identity}\"\n  password=\"{password}\"\n  eapol_flags=0\n}}\n"
        ),
    )
    .unwrap();
    let out = Command::new("timeout")
        .arg("20")
        .arg("eapol_test")
        .arg(format!("-c{}", conf.display()))
        .args(["-a127.0.0.1", &format!("-p{port}"), &format!("-s{SECRET}")])
        .arg(format!("-A{client_ip}"))
        .args(["-t5", "-n"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn radius_upstream_freeradius_pap_eap_and_failover() {
    if !have_tool("radclient", "freeradius-utils")
        || !have_tool("freeradius", "freeradius")
        || !have_tool("eapol_test", "eapoltest")
    {
        return;
    }
    let fr_dir = tempfile::tempdir().unwrap();
    let fr_port = free_udp_port();
    write_freeradius(
        fr_dir.path(),
        fr_port,
        "alice Cleartext-Password := \"pw\"\nivan Cleartext-Password := \"pw\"\n",
    );
    let mut fr = Some(start_freeradius(fr_dir.path()));
    let dead_port = free_udp_port();
    let devices = [
        RDev {
            hwaddr: "aa:bb:cc:00:00:01",
            ..RDev::good("c-alice", "U-ALICE", "alice")
        },
        RDev {
            device_uid: "02-00-00-00-00-01",
            ..RDev::good("eap-ivan", "", "ivan")
        },
    ];
    let up_secret = fr_dir.path().join("up.secret");
    std::fs::write(&up_secret, UPSTREAM_SECRET).unwrap();
    let tables = format!(
        r#"
[[radius.clients]]
name = "wlan-1"
address = "127.0.0.4"
secret_file = "{nas}"
vendor = "generic"
zone = "office"
dae_port = 0
device_attribute = "Calling-Station-Id"

[[radius.upstreams]]
name = "dead"
address = "127.0.0.1:{dead_port}"
secret_file = "{up}"
timeout_ms = 300

[[radius.upstreams]]
name = "fr"
address = "127.0.0.1:{fr_port}"
secret_file = "{up}"
timeout_ms = 500
# FreeRADIUS 3.2.1 (Debian 12) answers PAP without Message-Authenticator.
require_message_authenticator = false
"#,
        nas = "NAS_SECRET_FILE",
        up = up_secret.display(),
    );
    let (f, p) = radius_fixture(Setup::default(), &devices, "", &tables);
    let d = f.start();

    // PAP: right password and a registered device: Accept with pforte's Class.
    let id = access(p.auth, &cisco("alice", "U-ALICE", "aa-bb-cc-00-00-01")).unwrap_or_else(|e| {
        panic!(
            "{e}\npforte:\n{}\nFreeRADIUS:\n{}",
            d.log(),
            std::fs::read_to_string(fr_dir.path().join("freeradius.log")).unwrap_or_default()
        )
    });
    assert_eq!(session_ids(d.port), vec![id]);
    // Wrong password: the upstream's Reject, with pforte's Reply-Message.
    let bad = cisco("ivan", "U-ALICE", "aa-bb-cc-00-00-01").replace("\"pw\"", "\"wrong\"");
    let msg = access(p.auth, &bad).unwrap_err();
    assert!(msg.starts_with("credentials_rejected"), "{msg}");
    // Right password, but the policy refuses: Reject with the reason.
    let msg = access(p.auth, &cisco("ivan", "U-NOBODY", "aa-bb-cc-00-00-01")).unwrap_err();
    assert!(msg.starts_with("unregistered_device"), "{msg}");
    assert_eq!(session_ids(d.port).len(), 1);

    // EAP-MD5 through pforte: Identity, Challenge with State, Response, Accept.
    let rtt_before = d
        .metric(r#"pforte_radius_upstream_rtt_seconds_count{upstream="fr"}"#)
        .unwrap_or(0.0);
    let (code, out) = eapol_md5(fr_dir.path(), p.auth, "127.0.0.4", "ivan", "pw");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    assert!(out.contains("Access-Challenge"), "{out}");
    let rounds = d
        .metric(r#"pforte_radius_upstream_rtt_seconds_count{upstream="fr"}"#)
        .unwrap()
        - rtt_before;
    assert!(rounds >= 2.0, "{rounds} upstream rounds");
    assert_eq!(
        session_ids(d.port).len(),
        2,
        "one seat for the whole EAP exchange"
    );
    let (code, out) = eapol_md5(fr_dir.path(), p.auth, "127.0.0.4", "ivan", "wrong");
    assert_ne!(code, Some(0), "{out}");
    assert_eq!(session_ids(d.port).len(), 2);
    // The dead first upstream was tried and counted each time.
    assert!(
        d.metric(r#"pforte_radius_upstream_timeouts_total{upstream="dead"}"#)
            .unwrap()
            >= 3.0
    );

    // Every upstream gone: a clear Reject, never an Accept.
    drop(fr.take());
    let msg = access(p.auth, &cisco("alice", "U-ALICE", "aa-bb-cc-00-00-01")).unwrap_err();
    assert!(msg.starts_with("upstream_unavailable"), "{msg}");
    wait_for("the timeout counted", Duration::from_secs(5), || {
        d.metric(r#"pforte_radius_upstream_timeouts_total{upstream="fr"}"#) >= Some(1.0)
    });
    assert_eq!(
        d.metric(r#"pforte_decisions_total{decision="deny",reason="upstream_unavailable"}"#),
        Some(1.0)
    );
    assert_eq!(session_ids(d.port).len(), 2);
}

pub fn tests() -> Vec<Case> {
    vec![
        trial!(radius_upstream_freeradius_pap_eap_and_failover, needs: [Need::Tool("radclient", "freeradius-utils"), Need::Tool("freeradius", "freeradius"), Need::Tool("eapol_test", "eapoltest")]),
    ]
}
