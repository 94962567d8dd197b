//! End to end with a real ocserv 1.1 (certificate login: `cert-user-oid` = UID gives the user,
//! `cert-group-oid` = CN the device id) running `pforte hook ocserv` as connect-script and
//! disconnect-script, and real `openconnect` clients in their own network namespaces. The daemon
//! watches the server through `occtl` (bytes, reconciliation, disconnect).

use std::time::{Duration, Instant};

use crate::common::harness::{Case, Need, trial};
use crate::common::ocserv::{self, OcCert, OcClient, OcservServer, Script};
use crate::common::openvpn::{ClientNs, Pki};
use crate::common::*;

const UP: Duration = Duration::from_secs(20);
const INSTANCE: &str = "ssl";

/// A client namespace, its certificate and its registry row (the device id is the CN).
struct Peer {
    ns: ClientNs,
    cert: OcCert,
    dev: Dev,
}

impl Peer {
    fn new(pki: &Pki, id: &str, user: &str, edit: impl FnOnce(Dev) -> Dev) -> Peer {
        let ns = ClientNs::create().unwrap();
        let cert = ocserv::cert(pki, id, user);
        let dev = edit(Dev {
            cert_sha256: Some(cert.sha256.clone()),
            ..Dev::good(id, user)
        });
        Peer { ns, cert, dev }
    }
}

/// ocserv with pforte's hook, and the daemon watching it. Fields drop in order: the server
/// first (no script runs against a stopped daemon), then the daemon, then the files.
struct Rig {
    server: OcservServer,
    daemon: Daemon,
    fixture: Fixture,
    _pki_dir: tempfile::TempDir,
}

/// The `[[ocserv]]` entry and a zone of its own without a pforte pool (ocserv assigns the
/// addresses from its `ipv4-network`).
fn extra(occtl: &std::path::Path) -> String {
    format!(
        "[[zones]]\nname = \"ssl\"\nlevel = 1\nroutes = [\"10.1.0.0/16\"]\n\n\
         [[ocserv]]\ninstance = \"{INSTANCE}\"\nzone = \"ssl\"\nocctl = \"{}\"\nstatus_interval_s = 1\n",
        occtl.display()
    )
}

impl Rig {
    fn pki() -> (tempfile::TempDir, Pki) {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(&dir.path().join("pki")).unwrap();
        (dir, pki)
    }

    fn start(pki_dir: tempfile::TempDir, pki: &Pki, peers: &[&Peer]) -> Rig {
        let devices: Vec<Dev> = peers.iter().map(|p| p.dev.clone()).collect();
        // The socket path is known before the daemon starts: the fixture's folder.
        let mut fixture = Fixture::new(Setup::default(), &devices);
        let server = OcservServer::start(
            pki,
            Script::Pforte {
                socket: fixture.socket(),
                zone: "ssl".into(),
                instance: INSTANCE.into(),
            },
        )
        .unwrap();
        fixture.setup.extra = extra(&server.occtl_socket);
        fixture.write_config();
        let daemon = fixture.start();
        Rig {
            server,
            daemon,
            fixture,
            _pki_dir: pki_dir,
        }
    }

    fn context(&self) -> String {
        format!(
            "--- ocserv log ---\n{}\n--- pforte log ---\n{}",
            self.server.log(),
            self.daemon.log()
        )
    }

    fn metric(&self, series: &str) -> f64 {
        self.daemon.metric(series).unwrap_or(0.0)
    }

    fn deny_count(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "pforte_decisions_total{{decision=\"deny\",reason=\"{reason}\"}}"
        ))
    }

    fn seats_used(&self) -> f64 {
        self.daemon.metric("pforte_seats_used").unwrap_or(-1.0)
    }

    fn up(&self, peer: &Peer) -> OcClient {
        let mut c = OcClient::start(&peer.ns, &peer.cert, &self.server).unwrap();
        if let Err(e) = c.wait_up(UP) {
            panic!("{} did not connect: {e}\n{}", peer.dev.id, self.context());
        }
        c
    }

    fn ping(&self, peer: &Peer, size: &str, count: &str) -> Result<String, String> {
        self.server.ping_from(&peer.ns, size, count)
    }
}

/// A managed device gets in, pings through the tunnel, and the bytes of the transfer reach
/// `/metrics` (live from occtl); the private, lost, unencrypted device and the user above the
/// remote ceiling are refused by the connect-script before admission, each with its reason; an
/// operator's `pforte kill` ends the tunnel through occtl.
fn ocserv_admits_a_managed_device_and_refuses_each_reason() {
    let (dir, pki) = Rig::pki();
    let good = Peer::new(&pki, "NB-IT-0001", "alice", |d| d);
    let private = Peer::new(&pki, "NB-PRIV-0002", "bob", |d| Dev {
        ownership: "private",
        ..d
    });
    let lost = Peer::new(&pki, "NB-IT-0003", "ivan", |d| Dev {
        status: "lost",
        ..d
    });
    let plain = Peer::new(&pki, "NB-IT-0004", "alice", |d| Dev {
        encrypted: false,
        ..d
    });
    let high = Peer::new(&pki, "NB-SOC-0005", "dora", |d| Dev {
        org_unit: "social",
        clearance: 3,
        ..d
    });
    let rig = Rig::start(dir, &pki, &[&good, &private, &lost, &plain, &high]);
    let mut client = rig.up(&good);
    let out = rig
        .ping(&good, "1000", "20")
        .unwrap_or_else(|e| panic!("no ping through the tunnel: {e}\n{}", rig.context()));
    assert!(out.contains(" 0% packet loss"), "{out}");
    assert_eq!(rig.seats_used(), 1.0, "{}", rig.context());
    let received = "pforte_session_received_bytes_total{org_unit=\"it\",zone=\"ssl\"}";
    wait_for("live bytes from occtl", Duration::from_secs(10), || {
        rig.metric(received) >= 20_000.0
    });

    for (peer, reason) in [
        (&private, "private_device"),
        (&lost, "device_blocked"),
        (&plain, "not_encrypted"),
        (&high, "remote_work_not_permitted"),
    ] {
        let t0 = Instant::now();
        let mut c = OcClient::start(&peer.ns, &peer.cert, &rig.server).unwrap();
        let code = c.wait_exit(Duration::from_secs(20)).unwrap();
        assert_ne!(code, Some(0), "{} got in:\n{}", peer.dev.id, c.log());
        assert!(
            c.log().contains("Cookie was rejected"),
            "{}: {}",
            peer.dev.id,
            c.log()
        );
        assert_eq!(rig.deny_count(reason), 1.0, "{reason}\n{}", rig.context());
        eprintln!("{} refused ({reason}) in {:?}", peer.dev.id, t0.elapsed());
    }
    assert_eq!(rig.seats_used(), 1.0);

    // The operator ends the session (`pforte kill`): `occtl disconnect id` drops the client.
    let out = std::process::Command::new(bin())
        .args(["kill", "--socket"])
        .arg(rig.fixture.socket())
        .args(["--device", "NB-IT-0001"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let code = client
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.context()));
    assert_ne!(code, Some(0));
    wait_for("the seat to be freed", Duration::from_secs(15), || {
        rig.seats_used() == 0.0
    });
    assert!(rig.metric(received) >= 20_000.0, "{}", rig.context());
}

/// A connected device found lost by a registry reload loses its tunnel (`occtl disconnect`),
/// counted as revoked for `device_blocked`.
fn ocserv_device_blocked_by_a_reload_loses_its_tunnel() {
    let (dir, pki) = Rig::pki();
    let a = Peer::new(&pki, "NB-IT-0011", "alice", |d| d);
    let rig = Rig::start(dir, &pki, &[&a]);
    let mut client = rig.up(&a);
    rig.ping(&a, "56", "2").unwrap();
    rig.fixture.write_devices(&[Dev {
        status: "lost",
        ..a.dev.clone()
    }]);
    let code = client
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.context()));
    assert_ne!(code, Some(0));
    wait_for("ocserv to drop the user", Duration::from_secs(10), || {
        rig.server.user_count() == 0
    });
    assert_eq!(
        rig.metric("pforte_sessions_revoked_total{reason=\"device_blocked\"}"),
        1.0,
        "{}",
        rig.context()
    );
    assert_eq!(rig.seats_used(), 0.0);
}

/// The daemon killed (-9) with two clients connected; one leaves while it is down (its
/// disconnect-script finds no daemon). Restarted, the daemon restores both sessions from its
/// store, reconciles with occtl and reaps the one that left: one seat, the right one.
fn ocserv_daemon_restart_reconciles_the_sessions() {
    let (dir, pki) = Rig::pki();
    let a = Peer::new(&pki, "NB-IT-0021", "alice", |d| d);
    let b = Peer::new(&pki, "NB-IT-0022", "bob", |d| d);
    let mut rig = Rig::start(dir, &pki, &[&a, &b]);
    let _ca = rig.up(&a);
    let mut cb = rig.up(&b);
    assert_eq!(rig.seats_used(), 2.0);
    rig.daemon.signal(nix::sys::signal::Signal::SIGKILL);
    rig.daemon.wait_exit(Duration::from_secs(5));
    let users: Vec<serde_json::Value> = serde_json::from_str(&rig.server.users().unwrap()).unwrap();
    let b_id = users
        .iter()
        .find(|u| u["Groupname"] == "NB-IT-0022")
        .and_then(|u| u["ID"].as_u64())
        .unwrap();
    crate::common::openvpn::signal(&[b_id as u32], "TERM");
    cb.wait_exit(Duration::from_secs(15)).unwrap();
    wait_for("ocserv to drop b", Duration::from_secs(10), || {
        rig.server.user_count() == 1
    });
    // Sessions younger than the reap grace (10 s) are left alone: wait it out.
    std::thread::sleep(Duration::from_secs(10));
    rig.daemon = rig.fixture.start();
    wait_for(
        "the session that left to be reaped",
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
    assert_eq!(
        rig.metric(&format!(
            "pforte_vpn_control_connected{{vpn=\"ocserv\",vpn_instance=\"{INSTANCE}\"}}"
        )),
        1.0
    );
    let status = crate::strongswan_e2e::control_status(&rig.fixture.socket());
    let row: Vec<String> = [INSTANCE, "ocserv", "occtl", "connected"]
        .map(String::from)
        .to_vec();
    assert!(status.contains(&row), "{status:?}");
    rig.ping(&a, "56", "2").unwrap();
}

/// The daemon's store lost (a new disk): restarted without it, the daemon finds ocserv's users
/// without sessions and decides them (seen at two passes in a row): the good device is adopted
/// (a seat again), the device the registry now blocks is disconnected.
fn ocserv_lost_state_is_rebuilt_from_occtl() {
    let (dir, pki) = Rig::pki();
    let a = Peer::new(&pki, "NB-IT-0041", "alice", |d| d);
    let b = Peer::new(&pki, "NB-IT-0042", "bob", |d| d);
    let mut rig = Rig::start(dir, &pki, &[&a, &b]);
    let _ca = rig.up(&a);
    let mut cb = rig.up(&b);
    rig.daemon.signal(nix::sys::signal::Signal::SIGKILL);
    rig.daemon.wait_exit(Duration::from_secs(5));
    std::fs::remove_dir_all(rig.fixture.path("state")).unwrap();
    rig.fixture.write_devices(&[
        a.dev.clone(),
        Dev {
            status: "stolen",
            ..b.dev.clone()
        },
    ]);
    rig.daemon = rig.fixture.start();
    let code = cb
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.context()));
    assert_ne!(code, Some(0));
    wait_for("a adopted", Duration::from_secs(10), || {
        rig.seats_used() == 1.0
    });
    assert_eq!(rig.deny_count("device_blocked"), 1.0, "{}", rig.context());
    rig.ping(&a, "56", "2").unwrap();
}

pub fn tests() -> Vec<Case> {
    vec![
        trial!(ocserv_admits_a_managed_device_and_refuses_each_reason, needs: [Need::OpenVpn, Need::Tool("ocserv", "ocserv"), Need::Tool("openconnect", "openconnect")]),
        trial!(ocserv_device_blocked_by_a_reload_loses_its_tunnel, needs: [Need::OpenVpn, Need::Tool("ocserv", "ocserv"), Need::Tool("openconnect", "openconnect")]),
        trial!(ocserv_lost_state_is_rebuilt_from_occtl, needs: [Need::OpenVpn, Need::Tool("ocserv", "ocserv"), Need::Tool("openconnect", "openconnect")]),
        trial!(ocserv_daemon_restart_reconciles_the_sessions, needs: [Need::OpenVpn, Need::Tool("ocserv", "ocserv"), Need::Tool("openconnect", "openconnect")]),
    ]
}
