//! End to end with a real strongSwan 5.9 server and clients (each a charon in its own network
//! namespace, kernel-libipsec on both ends): IKEv2 with a machine certificate, then an EAP-MD5
//! user. pforte watches the server over VICI, decides each IKE_SA when it comes up and
//! terminates a refused one (enforcement after establishment).

use std::time::{Duration, Instant};

use crate::common::harness::{Case, Need, trial};
use crate::common::strongswan::{RsaPki, SwanCert, SwanClient, SwanServer};
use crate::common::*;

const INSTANCE: &str = "ikev2";

struct Rig {
    server: SwanServer,
    daemon: Daemon,
    fixture: Fixture,
    pki: RsaPki,
}

fn extra(vici: &std::path::Path) -> String {
    format!(
        "[[zones]]\nname = \"ipsec\"\nlevel = 1\nroutes = [\"10.1.0.0/16\"]\n\n\
         [[strongswan]]\ninstance = \"{INSTANCE}\"\nzone = \"ipsec\"\nvici = \"{}\"\nstatus_interval_s = 1\n",
        vici.display()
    )
}

/// A device row for a certificate: the CN is the device id, the fingerprint the real one.
fn dev(cert: &SwanCert, id: &str, user: &str, edit: impl FnOnce(Dev) -> Dev) -> Dev {
    edit(Dev {
        cert_sha256: Some(cert.sha256.clone()),
        ..Dev::good(id, user)
    })
}

impl Rig {
    fn start(pki: RsaPki, devices: &[Dev]) -> Rig {
        let server = SwanServer::start(&pki).unwrap();
        let fixture = Fixture::new(
            Setup {
                extra: extra(&server.vici()),
                ..Setup::default()
            },
            devices,
        );
        let daemon = fixture.start();
        let rig = Rig {
            server,
            daemon,
            fixture,
            pki,
        };
        wait_for("pforte to reach VICI", Duration::from_secs(10), || {
            rig.metric(&format!(
                "pforte_vpn_control_connected{{vpn=\"strongswan\",vpn_instance=\"{INSTANCE}\"}}"
            )) == 1.0
        });
        rig
    }

    fn client(&self, cert: &SwanCert, user: &str, round2_id: Option<&str>) -> SwanClient {
        SwanClient::new(&self.server, &self.pki, cert, user, round2_id).unwrap()
    }

    fn context(&self) -> String {
        format!(
            "--- charon (server) log, tail ---\n{}\n--- pforte log ---\n{}\n--- list-sas ---\n{}",
            tail(&self.server.log(), 60),
            self.daemon.log(),
            self.server.list_sas()
        )
    }

    fn metric(&self, series: &str) -> f64 {
        self.daemon.metric(series).unwrap_or(0.0)
    }

    fn seats_used(&self) -> f64 {
        self.daemon.metric("pforte_seats_used").unwrap_or(-1.0)
    }

    /// Waits (bounded) until `n` seats are used: pforte decides an IKE_SA after charon reports
    /// it up, so right after `up` its session may be a few milliseconds away.
    fn expect_seats(&self, n: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.seats_used() != n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(self.seats_used(), n, "{}", self.context());
    }

    fn up(&self, c: &SwanClient) {
        if let Err(e) = c.initiate() {
            panic!(
                "initiate failed: {e}\n{}\n--- client ---\n{}",
                self.context(),
                tail(&c.log(), 40)
            );
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A managed device gets in, pings through the tunnel, and the transfer's bytes reach
/// `/metrics`, even though its client claims another device's identity in the EAP round (the
/// device comes from the certificate round); the private, lost, unencrypted device and the
/// user above the remote ceiling are terminated right after establishment, each with its
/// reason, and the window between up and termination is measured.
fn strongswan_admits_a_managed_device_and_terminates_each_refusal() {
    let pki = RsaPki::create();
    let certs: Vec<SwanCert> = [
        "NB-IT-0001",
        "NB-PRIV-0002",
        "NB-IT-0003",
        "NB-IT-0004",
        "NB-SOC-0005",
    ]
    .iter()
    .map(|d| pki.client(d))
    .collect();
    let lost_elsewhere = pki.client("NB-IT-0009");
    let devices = vec![
        dev(&lost_elsewhere, "NB-IT-0009", "alice", |d| Dev {
            status: "lost",
            ..d
        }),
        dev(&certs[0], "NB-IT-0001", "alice", |d| d),
        dev(&certs[1], "NB-PRIV-0002", "bob", |d| Dev {
            ownership: "private",
            ..d
        }),
        dev(&certs[2], "NB-IT-0003", "ivan", |d| Dev {
            status: "lost",
            ..d
        }),
        dev(&certs[3], "NB-IT-0004", "gina", |d| Dev {
            encrypted: false,
            ..d
        }),
        dev(&certs[4], "NB-SOC-0005", "dora", |d| Dev {
            org_unit: "social",
            clearance: 3,
            ..d
        }),
    ];
    let rig = Rig::start(pki, &devices);
    // The good device's client names a lost device in its EAP round: ignored.
    let good = rig.client(&certs[0], "alice", Some("O=Stadt, CN=NB-IT-0009"));
    rig.up(&good);
    let out = good
        .ping("1000", "20")
        .unwrap_or_else(|e| panic!("no ping through the tunnel: {e}\n{}", rig.context()));
    assert!(out.contains(" 0% packet loss"), "{out}");
    rig.expect_seats(1.0);
    let received = "pforte_session_received_bytes_total{org_unit=\"it\",zone=\"ipsec\"}";
    wait_for("live bytes from list-sas", Duration::from_secs(10), || {
        rig.metric(received) >= 20_000.0
    });

    for (i, user, reason) in [
        (1, "bob", "private_device"),
        (2, "ivan", "device_blocked"),
        // Not alice: a second IKE_SA of the same EAP identity would replace the first
        // (charon's INITIAL_CONTACT handling), which is not what this test is about.
        (3, "gina", "not_encrypted"),
        (4, "dora", "remote_work_not_permitted"),
    ] {
        let c = rig.client(&certs[i], user, None);
        let t0 = Instant::now();
        // The IKE_SA comes up (charon cannot ask first), then pforte terminates it.
        let _ = c.initiate();
        wait_for(
            &format!("{reason}: the IKE_SA to be terminated"),
            Duration::from_secs(10),
            || rig.server.ike_id_of(&c.ip).is_none() && !c.has_sa(),
        );
        let deny = rig.metric(&format!(
            "pforte_decisions_total{{decision=\"deny\",reason=\"{reason}\"}}"
        ));
        assert_eq!(deny, 1.0, "{reason}\n{}", rig.context());
        eprintln!("{reason}: terminated {:?} after initiate", t0.elapsed());
    }
    let count = rig.metric(&format!(
        "pforte_strongswan_enforcement_seconds_count{{vpn_instance=\"{INSTANCE}\"}}"
    ));
    let sum = rig.metric(&format!(
        "pforte_strongswan_enforcement_seconds_sum{{vpn_instance=\"{INSTANCE}\"}}"
    ));
    assert_eq!(count, 4.0, "{}", rig.context());
    eprintln!(
        "refusal window: mean {:.1} ms over {count}",
        sum / count * 1000.0
    );
    rig.expect_seats(1.0);
    good.ping("56", "2").unwrap();
}

/// A connected device keeps its session across an IKE rekey, and is terminated once a registry
/// reload finds it lost.
fn strongswan_rekeyed_then_blocked_by_a_reload_is_terminated() {
    let pki = RsaPki::create();
    let cert = pki.client("NB-IT-0011");
    let row = dev(&cert, "NB-IT-0011", "alice", |d| d);
    let rig = Rig::start(pki, std::slice::from_ref(&row));
    let c = rig.client(&cert, "alice", None);
    rig.up(&c);
    c.ping("56", "2").unwrap();
    // The IKE_SA is rekeyed (a new unique id): the session moves with it, is neither reaped
    // (past the 10 s grace) nor sent back through the gate, and the kill below finds it.
    let before = rig.server.ike_id_of(&c.ip).unwrap();
    rig.server.rekey(&before).unwrap();
    wait_for("the rekeyed IKE_SA", Duration::from_secs(10), || {
        rig.server.ike_id_of(&c.ip).is_some_and(|id| id != before)
    });
    std::thread::sleep(Duration::from_secs(12));
    rig.expect_seats(1.0);
    assert!(c.has_sa());
    c.ping("56", "2").unwrap();
    rig.fixture.write_devices(&[Dev {
        status: "lost",
        ..row
    }]);
    wait_for(
        "the IKE_SA to be terminated",
        Duration::from_secs(15),
        || rig.server.sa_count() == 0,
    );
    assert!(c.ping("56", "1").is_err());
    assert_eq!(
        rig.metric("pforte_sessions_revoked_total{reason=\"device_blocked\"}"),
        1.0,
        "{}",
        rig.context()
    );
    rig.expect_seats(0.0);
}

/// A client that stops answering (its charon frozen) is still cut off at once when its device
/// is blocked: `terminate` is forced, so charon does not keep the IKE_SA while it retransmits
/// an unanswered DELETE.
fn strongswan_a_frozen_client_blocked_by_a_reload_loses_its_sa_at_once() {
    let pki = RsaPki::create();
    let cert = pki.client("NB-IT-0012");
    let row = dev(&cert, "NB-IT-0012", "alice", |d| d);
    let rig = Rig::start(pki, std::slice::from_ref(&row));
    let c = rig.client(&cert, "alice", None);
    rig.up(&c);
    c.freeze(true);
    let blocked = std::time::Instant::now();
    rig.fixture.write_devices(&[Dev {
        status: "lost",
        ..row
    }]);
    wait_for(
        "the frozen client's IKE_SA to be gone from the server",
        Duration::from_secs(5),
        || rig.server.sa_count() == 0,
    );
    let took = blocked.elapsed();
    c.freeze(false);
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert_eq!(
        rig.metric("pforte_sessions_revoked_total{reason=\"device_blocked\"}"),
        1.0,
        "{}",
        rig.context()
    );
    rig.expect_seats(0.0);
}

/// The daemon killed (-9) with two clients up; one IKE_SA ends while it is down. Restarted,
/// the daemon restores both sessions, reconciles with `list-sas` and reaps the one that ended.
fn strongswan_daemon_restart_reconciles_the_sessions() {
    let pki = RsaPki::create();
    let (ca, cb) = (pki.client("NB-IT-0021"), pki.client("NB-IT-0022"));
    let rows = [
        dev(&ca, "NB-IT-0021", "alice", |d| d),
        dev(&cb, "NB-IT-0022", "bob", |d| d),
    ];
    let mut rig = Rig::start(pki, &rows);
    let a = rig.client(&ca, "alice", None);
    let b = rig.client(&cb, "bob", None);
    rig.up(&a);
    rig.up(&b);
    rig.expect_seats(2.0);
    rig.daemon.signal(nix::sys::signal::Signal::SIGKILL);
    rig.daemon.wait_exit(Duration::from_secs(5));
    let id = rig.server.ike_id_of(&b.ip).unwrap();
    rig.server.terminate(&id).unwrap();
    // Sessions younger than the reap grace (10 s) are left alone: wait it out.
    std::thread::sleep(Duration::from_secs(10));
    rig.daemon = rig.fixture.start();
    wait_for(
        "the ended IKE_SA's session to be reaped",
        Duration::from_secs(15),
        || rig.seats_used() == 1.0,
    );
    assert_eq!(
        rig.metric(&format!(
            "pforte_sessions_reaped_total{{vpn_instance=\"{INSTANCE}\"}}"
        )),
        1.0,
        "{}",
        rig.context()
    );
    // The one still up was not sent back through the gate.
    std::thread::sleep(Duration::from_secs(3));
    assert!(a.has_sa());
    a.ping("56", "2").unwrap();
}

/// charon stops and starts again: pforte notices the VICI socket gone
/// (`pforte_vpn_control_connected` 0), reconnects with backoff, ends the session that died with
/// charon, and decides a new connect as before; an operator's `pforte kill` terminates it.
fn strongswan_vici_socket_gone_reconnects() {
    let pki = RsaPki::create();
    let cert = pki.client("NB-IT-0031");
    let row = dev(&cert, "NB-IT-0031", "alice", |d| d);
    let mut rig = Rig::start(pki, std::slice::from_ref(&row));
    let c = rig.client(&cert, "alice", None);
    rig.up(&c);
    rig.expect_seats(1.0);
    let connected =
        format!("pforte_vpn_control_connected{{vpn=\"strongswan\",vpn_instance=\"{INSTANCE}\"}}");
    let row = |state: &str| {
        vec![
            INSTANCE.to_string(),
            "strongswan".into(),
            "VICI".into(),
            state.into(),
        ]
    };
    let status = control_status(&rig.fixture.socket());
    assert!(status.contains(&row("connected")), "{status:?}");
    rig.server.stop_charon();
    wait_for(
        "pforte to notice the socket gone",
        Duration::from_secs(10),
        || rig.metric(&connected) == 0.0,
    );
    // The operator sees it too.
    let status = control_status(&rig.fixture.socket());
    assert!(status.contains(&row("DISCONNECTED")), "{status:?}");
    std::thread::sleep(Duration::from_secs(2));
    rig.server.start_charon().unwrap();
    wait_for("pforte to reconnect", Duration::from_secs(20), || {
        rig.metric(&connected) == 1.0
    });
    // The IKE_SA died with charon: its session is reaped once past the grace.
    wait_for(
        "the dead IKE_SA's session to be reaped",
        Duration::from_secs(20),
        || rig.seats_used() == 0.0,
    );
    let again = rig.client(&cert, "alice", None);
    rig.up(&again);
    wait_for(
        "the new IKE_SA to be admitted",
        Duration::from_secs(5),
        || rig.seats_used() == 1.0,
    );
    again.ping("56", "2").unwrap();
    // The operator ends the session (`pforte kill`): `terminate` ends the IKE_SA.
    let out = std::process::Command::new(bin())
        .args(["kill", "--socket"])
        .arg(rig.fixture.socket())
        .args(["--device", "NB-IT-0031"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_for(
        "the killed IKE_SA to be terminated",
        Duration::from_secs(10),
        || rig.server.sa_count() == 0,
    );
    rig.expect_seats(0.0);
}

/// `pforte status` over the daemon's socket: the rows of its table of control channels
/// (instance, vpn, channel, state).
pub fn control_status(socket: &std::path::Path) -> Vec<Vec<String>> {
    let out = std::process::Command::new(bin())
        .args(["status", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("VPN INSTANCE"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The daemon's store lost: restarted without it, the daemon finds an established IKE_SA with
/// no session; its certificate round cannot be read any more, so after two passes it is
/// terminated (sent back through the gate), and no seat is counted for it.
fn strongswan_lost_state_sends_unknown_sas_back_through_the_gate() {
    let pki = RsaPki::create();
    let cert = pki.client("NB-IT-0051");
    let row = dev(&cert, "NB-IT-0051", "alice", |d| d);
    let mut rig = Rig::start(pki, std::slice::from_ref(&row));
    let c = rig.client(&cert, "alice", None);
    rig.up(&c);
    rig.daemon.signal(nix::sys::signal::Signal::SIGKILL);
    rig.daemon.wait_exit(Duration::from_secs(5));
    std::fs::remove_dir_all(rig.fixture.path("state")).unwrap();
    rig.daemon = rig.fixture.start();
    wait_for(
        "the unknown IKE_SA to be terminated",
        Duration::from_secs(15),
        || rig.server.sa_count() == 0,
    );
    rig.expect_seats(0.0);
    // Connecting again, it is decided as any new IKE_SA.
    rig.up(&c);
    wait_for("the new IKE_SA admitted", Duration::from_secs(5), || {
        rig.seats_used() == 1.0
    });
    c.ping("56", "2").unwrap();
}

pub fn tests() -> Vec<Case> {
    vec![
        trial!(strongswan_admits_a_managed_device_and_terminates_each_refusal, needs: [Need::OpenVpn, Need::Tool("swanctl", "strongswan-swanctl"), Need::Tool("openssl", "openssl")]),
        trial!(strongswan_rekeyed_then_blocked_by_a_reload_is_terminated, needs: [Need::OpenVpn, Need::Tool("swanctl", "strongswan-swanctl"), Need::Tool("openssl", "openssl")]),
        trial!(strongswan_a_frozen_client_blocked_by_a_reload_loses_its_sa_at_once, needs: [Need::OpenVpn, Need::Tool("swanctl", "strongswan-swanctl"), Need::Tool("openssl", "openssl")]),
        trial!(strongswan_vici_socket_gone_reconnects, needs: [Need::OpenVpn, Need::Tool("swanctl", "strongswan-swanctl"), Need::Tool("openssl", "openssl")]),
        trial!(strongswan_lost_state_sends_unknown_sas_back_through_the_gate, needs: [Need::OpenVpn, Need::Tool("swanctl", "strongswan-swanctl"), Need::Tool("openssl", "openssl")]),
        trial!(strongswan_daemon_restart_reconciles_the_sessions, needs: [Need::OpenVpn, Need::Tool("swanctl", "strongswan-swanctl"), Need::Tool("openssl", "openssl")]),
    ]
}
