//! End to end in script mode: a real OpenVPN 2.6 server runs `pforte hook openvpn` as its
//! tls-verify, client-connect and client-disconnect script against the real daemon, and real
//! clients connect from their own network namespaces (see `common/openvpn/`).
//!
//! The device checks run twice: at tls-verify (`POST /v1/verify`, no hardware address yet), where
//! a refusal is silent on the client (it waits out its hand-window), so those cases look for the
//! server's `VERIFY SCRIPT ERROR` and the hook's own line in the server log; and at
//! client-connect (`POST /v1/connect`), where a refusal reaches the client as AUTH_FAILED.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::common::harness::{Case, Need, trial};
use crate::common::openvpn::{
    self, Client, ClientCert, ClientNs, ClientOptions, Pki, Server, ServerOptions,
};
use crate::common::*;

const CONNECT: Duration = Duration::from_secs(15);
const REFUSAL: Duration = Duration::from_secs(15);

/// One OpenVPN server whose scripts ask one pforte daemon. Fields drop in order: the server
/// first (so no script runs against a stopped daemon), then the daemon, then the files.
struct Rig {
    server: Server,
    daemon: Daemon,
    fixture: Fixture,
    _work: tempfile::TempDir,
}

/// A client's namespace and certificate, and its registry row.
struct Peer {
    ns: ClientNs,
    cert: ClientCert,
    dev: Dev,
}

impl Peer {
    /// A namespace and a certificate with common name `user` (pforte's user when OpenVPN gives no
    /// username); the device row is a good one with the certificate's real fingerprint and the
    /// namespace's MAC (what the client reports as IV_HWADDR), changed by `edit`.
    fn new(pki: &Pki, id: &str, user: &str, edit: impl FnOnce(Dev) -> Dev) -> Peer {
        let ns = ClientNs::create().unwrap();
        let cert = pki.client(id, user).unwrap();
        let dev = edit(Dev {
            hwaddr: ns.mac().to_string(),
            cert_sha256: Some(cert.sha256.clone()),
            ..Dev::good(id, user)
        });
        Peer { ns, cert, dev }
    }

    /// Starts an OpenVPN client in the namespace (returns at once).
    fn start(&self, rig: &Rig) -> Client {
        Client::connect(&self.ns, &self.cert, &rig.server, ClientOptions::default()).unwrap()
    }

    /// Starts a client and waits until it is connected.
    fn connect(&self, rig: &Rig) -> Client {
        let mut c = self.start(rig);
        if let Err(e) = c.wait_connected(CONNECT) {
            panic!("{} did not connect: {e}\n{}", self.dev.id, rig.context());
        }
        c
    }

    /// The `who` the hook prints: `cn@ip:` (the port varies).
    fn who(&self) -> String {
        format!("{}@{}:", self.cert.cn, self.ns.ip())
    }
}

impl Rig {
    /// A PKI and a work directory; make the [`Peer`]s with `pki`, then [`Rig::start`].
    fn pki() -> (tempfile::TempDir, Pki) {
        let work = tempfile::tempdir().unwrap();
        let pki = Pki::create(&work.path().join("pki")).unwrap();
        (work, pki)
    }

    /// The fixture (registry from `peers`), the OpenVPN server with pforte's hook as its
    /// scripts, and the daemon with the office zone's pool set to the server's tunnel net.
    fn start(work: tempfile::TempDir, pki: Pki, setup: Setup, peers: &[&Peer]) -> Rig {
        Rig::start_with(work, pki, setup, peers, "")
    }

    /// As [`Rig::start`], with extra flags for the client-connect hook (e.g. `--deferred`).
    fn start_with(
        work: tempfile::TempDir,
        pki: Pki,
        setup: Setup,
        peers: &[&Peer],
        connect_flags: &str,
    ) -> Rig {
        Rig::start_full(work, pki, setup, peers, connect_flags, false)
    }

    /// As [`Rig::start`], with `narrow`: the office zone's pool is the upper half of the
    /// server's tunnel net (the server keeps the lower half) and its `network` the whole net.
    fn start_full(
        work: tempfile::TempDir,
        pki: Pki,
        setup: Setup,
        peers: &[&Peer],
        connect_flags: &str,
        narrow: bool,
    ) -> Rig {
        let devices: Vec<Dev> = peers.iter().map(|p| p.dev.clone()).collect();
        let mut fixture = Fixture::new(
            Setup {
                token: true,
                ..setup
            },
            &devices,
        );
        // OpenVPN splits the script string at spaces and appends its own arguments; the
        // settings come from `setenv` (scripts get no other environment, no PATH).
        let hook = format!("\"{} hook openvpn\"", bin().display());
        let server = Server::start(
            &pki,
            ServerOptions {
                extra: vec![
                    format!("setenv PFORTE_SOCKET {}", fixture.socket().display()),
                    "setenv PFORTE_ZONE office".into(),
                    "setenv PFORTE_INSTANCE office-udp".into(),
                    format!("tls-verify {hook}"),
                    if connect_flags.is_empty() {
                        format!("client-connect {hook}")
                    } else {
                        format!(
                            "client-connect \"{} hook openvpn {connect_flags}\"",
                            bin().display()
                        )
                    },
                    format!("client-disconnect {hook}"),
                ],
                ..ServerOptions::default()
            },
        )
        .unwrap();
        // The pool must lie in the server's subnet for ifconfig-push; its first host (the
        // server's own address) is never handed out.
        let net = server.tunnel_net();
        if narrow {
            fixture.setup.pool = openvpn::upper_half(net).to_string();
            fixture.setup.network = Some(net.to_string());
        } else {
            fixture.setup.pool = net.to_string();
        }
        fixture.write_config();
        let daemon = fixture.start();
        Rig {
            server,
            daemon,
            fixture,
            _work: work,
        }
    }

    /// The server's and the daemon's logs, for failure messages.
    fn context(&self) -> String {
        format!(
            "--- OpenVPN server log ---\n{}\n--- pforte log ---\n{}",
            self.server.log(),
            self.daemon.log()
        )
    }

    fn deny_count(&self, reason: &str) -> f64 {
        self.daemon
            .metric(&format!(
                "pforte_decisions_total{{decision=\"deny\",reason=\"{reason}\"}}"
            ))
            .unwrap_or_else(|| panic!("no deny series for {reason}\n{}", self.context()))
    }

    fn seats_used(&self) -> f64 {
        self.daemon.metric("pforte_seats_used").unwrap_or(-1.0)
    }

    /// `GET /v1/sessions` (over TCP with the fixture's token).
    fn sessions(&self) -> Vec<serde_json::Value> {
        let auth = format!("Bearer {TOKEN}");
        let (status, body) = http(
            self.daemon.port,
            "GET",
            "/v1/sessions",
            &[("Authorization", &auth)],
            "",
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["sessions"].as_array().cloned().unwrap_or_default()
    }

    /// The live session of a device.
    fn session_of(&self, dev: &Dev) -> serde_json::Value {
        self.sessions()
            .into_iter()
            .find(|s| s["device_id"] == dev.id.as_str())
            .unwrap_or_else(|| panic!("no session for {}\n{}", dev.id, self.context()))
    }

    /// Waits until a server log line contains every one of `parts`.
    fn wait_server_line(&self, parts: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.server.log();
            if let Some(l) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.to_string();
            }
            if Instant::now() >= deadline {
                panic!(
                    "no server log line with {parts:?} within {within:?}\n{}",
                    self.context()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a refusal at tls-verify: the hook's line naming the client and the reason, and
    /// OpenVPN's verify failure for the client's address.
    fn wait_tls_refusal(&self, peer: &Peer, reason: &str) {
        self.wait_server_line(&[&peer.who(), &format!("at TLS: {reason}")], REFUSAL);
        let addr = format!("{}:", peer.ns.ip());
        self.wait_server_line(&[&addr, "VERIFY SCRIPT ERROR"], REFUSAL);
    }

    /// Waits for a refusal at client-connect: AUTH_FAILED at the client and the hook's line.
    fn wait_connect_refusal(&self, peer: &Peer, client: &Client, reason: &str) {
        if let Err(e) = client.wait_refused(REFUSAL) {
            panic!("{} not refused: {e}\n{}", peer.dev.id, self.context());
        }
        self.wait_server_line(&[&peer.who(), &format!(": {reason}: ")], REFUSAL);
    }

    /// Asserts the client's tunnel address is the one pforte handed out for its session, from
    /// the pool (never the server's own address); returns it.
    fn assert_pool_address(&self, peer: &Peer, client: &Client) -> Ipv4Addr {
        let ip = client.tunnel_ip().unwrap();
        let session = self.session_of(&peer.dev);
        assert_eq!(
            session["tunnel_ip"].as_str(),
            Some(ip.to_string().as_str()),
            "client address vs pforte's session {session}"
        );
        let net = self.server.tunnel_net();
        assert!(net.contains(ip) && ip != self.server.tunnel_ip(), "{ip}");
        ip
    }

    fn ping(&self, client: &Client) {
        if let Err(e) = client.ping(self.server.tunnel_ip(), 3) {
            panic!("no ping through the tunnel: {e}\n{}", self.context());
        }
    }

    /// Stops the daemon with SIGTERM and waits for it to exit 0.
    fn stop_daemon(&mut self) {
        self.daemon.signal(nix::sys::signal::Signal::SIGTERM);
        let code = self.daemon.wait_exit(Duration::from_secs(10));
        assert_eq!(code, Some(0), "{}", self.context());
    }
}

fn openvpn_admits_a_managed_device_and_refuses_each_reason() {
    if !openvpn::available() {
        return;
    }
    let t0 = Instant::now();
    let (work, pki) = Rig::pki();
    let good = Peer::new(&pki, "D-E2E-GOOD", "alice", |d| d);
    let private = Peer::new(&pki, "D-E2E-PRIV", "alice", |d| Dev {
        ownership: "private",
        ..d
    });
    let lost = Peer::new(&pki, "D-E2E-LOST", "alice", |d| Dev {
        status: "lost",
        ..d
    });
    let plain = Peer::new(&pki, "D-E2E-PLAIN", "alice", |d| Dev {
        encrypted: false,
        ..d
    });
    // Org unit social is level 3, above remote_max_level 1, without a remote exception.
    let social = Peer::new(&pki, "D-E2E-SOCIAL", "dora", |d| Dev {
        org_unit: "social",
        clearance: 3,
        ..d
    });
    let rig = Rig::start(
        work,
        pki,
        Setup::default(),
        &[&good, &private, &lost, &plain, &social],
    );

    // 1. The managed device gets its address from pforte's pool and reaches the server.
    let good_client = good.connect(&rig);
    let ip = rig.assert_pool_address(&good, &good_client);
    assert_eq!(ip, rig.server.tunnel_net().host(2), "first pool address");
    let session = rig.session_of(&good.dev);
    assert_eq!(session["username"], "alice");
    assert_eq!(session["instance"], "office-udp");
    assert_eq!(session["zone"], "office");
    assert!(
        session["remote_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{}:", good.ns.ip()))),
        "{session}"
    );
    rig.ping(&good_client);

    // 2. Every refusal at once: the device checks at tls-verify, the user's level at
    // client-connect.
    let clients: Vec<Client> = [&private, &lost, &plain, &social]
        .iter()
        .map(|p| p.start(&rig))
        .collect();
    rig.wait_connect_refusal(&social, &clients[3], "remote_work_not_permitted");
    rig.wait_tls_refusal(&private, "private_device");
    rig.wait_tls_refusal(&lost, "device_blocked");
    rig.wait_tls_refusal(&plain, "not_encrypted");
    for reason in [
        "private_device",
        "device_blocked",
        "not_encrypted",
        "remote_work_not_permitted",
    ] {
        assert_eq!(rig.deny_count(reason), 1.0, "{reason}\n{}", rig.context());
    }
    assert_eq!(
        rig.daemon
            .metric("pforte_decisions_total{decision=\"allow\",reason=\"allowed\"}"),
        Some(1.0)
    );
    assert_eq!(rig.seats_used(), 1.0);
    assert_eq!(rig.sessions().len(), 1);
    // The TLS-refused clients never got a tunnel; the admitted one still works.
    rig.ping(&good_client);
    drop(clients);
    eprintln!("admit and refuse: {:?}", t0.elapsed());
}

fn openvpn_past_the_seats_is_refused_and_a_disconnect_frees_the_seat() {
    if !openvpn::available() {
        return;
    }
    let t0 = Instant::now();
    let (work, pki) = Rig::pki();
    let a = Peer::new(&pki, "D-E2E-A", "alice", |d| d);
    let b = Peer::new(&pki, "D-E2E-B", "bob", |d| d);
    let rig = Rig::start(
        work,
        pki,
        Setup {
            max_sessions: 1,
            ..Setup::default()
        },
        &[&a, &b],
    );
    let mut a_client = a.connect(&rig);
    rig.assert_pool_address(&a, &a_client);
    rig.ping(&a_client);
    assert_eq!(rig.seats_used(), 1.0);

    // B passes tls-verify (a good device) and is refused at client-connect.
    let b_refused = b.start(&rig);
    rig.wait_connect_refusal(&b, &b_refused, "capacity_full");
    assert_eq!(rig.deny_count("capacity_full"), 1.0);
    // OpenVPN runs client-disconnect for the refused client too; it must not free A's seat.
    wait_for("the disconnect of the refused client", REFUSAL, || {
        rig.daemon
            .log()
            .contains("disconnect for an unknown session")
    });
    assert_eq!(rig.seats_used(), 1.0, "{}", rig.context());
    drop(b_refused);

    // A leaves: client-disconnect runs ~5 s after the exit notification and frees the seat.
    a_client.stop();
    let left = Instant::now();
    wait_for("the seat to be freed", Duration::from_secs(15), || {
        rig.seats_used() == 0.0
    });
    eprintln!("seat freed {:?} after the client stopped", left.elapsed());
    assert!(rig.sessions().is_empty());
    // client-disconnect carried OpenVPN's byte counts.
    let bytes = |dir: &str| {
        rig.daemon
            .metric(&format!(
                "pforte_session_{dir}_bytes_total{{org_unit=\"it\",zone=\"office\"}}"
            ))
            .unwrap_or(0.0)
    };
    assert!(
        bytes("received") > 0.0 && bytes("sent") > 0.0,
        "{}",
        rig.daemon.metrics()
    );

    let b_client = b.connect(&rig);
    rig.assert_pool_address(&b, &b_client);
    rig.ping(&b_client);
    assert_eq!(rig.seats_used(), 1.0);
    assert_eq!(rig.deny_count("capacity_full"), 1.0);
    eprintln!("seats: {:?}", t0.elapsed());
}

fn openvpn_fails_closed_without_the_daemon_and_recovers_its_sessions() {
    if !openvpn::available() {
        return;
    }
    let t0 = Instant::now();
    let (work, pki) = Rig::pki();
    let a = Peer::new(&pki, "D-E2E-UP", "alice", |d| d);
    let b = Peer::new(&pki, "D-E2E-LATE", "bob", |d| d);
    let mut rig = Rig::start(work, pki, Setup::default(), &[&a, &b]);
    let a_client = a.connect(&rig);
    let a_ip = rig.assert_pool_address(&a, &a_client);

    rig.stop_daemon();
    // A new client is refused at its first script (tls-verify): fail closed.
    let b_refused = b.start(&rig);
    rig.wait_server_line(&[&b.who(), "fail closed"], REFUSAL);
    rig.wait_server_line(
        &[&format!("{}:", b.ns.ip()), "VERIFY SCRIPT ERROR"],
        REFUSAL,
    );
    drop(b_refused);
    // The connected client keeps its tunnel: OpenVPN asks pforte only at (re)connects.
    rig.ping(&a_client);

    // A new daemon on the same files restores A's session, seat and address.
    rig.daemon = rig.fixture.start();
    assert_eq!(rig.seats_used(), 1.0, "{}", rig.context());
    assert_eq!(
        rig.session_of(&a.dev)["tunnel_ip"].as_str(),
        Some(a_ip.to_string().as_str())
    );
    let b_client = b.connect(&rig);
    let b_ip = rig.assert_pool_address(&b, &b_client);
    assert_ne!(
        a_ip, b_ip,
        "the restored session's address was handed out again"
    );
    rig.ping(&b_client);
    rig.ping(&a_client);
    assert_eq!(rig.seats_used(), 2.0);
    eprintln!("fail closed and recover: {:?}", t0.elapsed());
}

/// Deferred client-connect: OpenVPN's event loop does not wait for pforte; the decision comes
/// from a detached child through the deferred file, with the same result as the direct hook.
fn openvpn_deferred_client_connect_decides_the_same() {
    if !openvpn::available() {
        return;
    }
    let (work, pki) = Rig::pki();
    let a = Peer::new(&pki, "D-DEF-A", "alice", |d| d);
    let b = Peer::new(&pki, "D-DEF-B", "bob", |d| d);
    let rig = Rig::start_with(
        work,
        pki,
        Setup {
            max_sessions: 1,
            ..Setup::default()
        },
        &[&a, &b],
        "--deferred --timeout 10s",
    );
    let a_client = a.connect(&rig);
    rig.assert_pool_address(&a, &a_client);
    rig.ping(&a_client);
    let b_refused = b.start(&rig);
    rig.wait_connect_refusal(&b, &b_refused, "capacity_full");
    assert_eq!(rig.seats_used(), 1.0);
    assert!(
        rig.server.log().contains("deferred"),
        "OpenVPN did not defer: {}",
        rig.context()
    );
}

/// The zone's pool is the upper half of the server's tunnel net (`server` keeps its own pool in
/// the lower half) and its `network` the whole net: the client gets an address from the upper
/// half with the net's netmask, so the route the zone pushes (via the server's address, the
/// route-gateway) is installed on its tun and a host behind it answers, reachable only through
/// the tunnel. With the netmask of the pool (no `network`) the route fails on the client.
fn openvpn_pool_in_part_of_the_tunnel_net_routes_through_the_tunnel() {
    if !openvpn::available() {
        return;
    }
    let mut behind = openvpn::Behind::claim().unwrap();
    let (work, pki) = Rig::pki();
    let a = Peer::new(&pki, "D-E2E-HALF", "alice", |d| d);
    let rig = Rig::start_full(
        work,
        pki,
        Setup {
            routes: vec![behind.net().to_string()],
            ..Setup::default()
        },
        &[&a],
        "",
        true,
    );
    behind.attach(&rig.server).unwrap();
    behind.cut_off(&a.ns).unwrap();
    assert!(
        a.ns.exec(
            "ping",
            &[
                "-n",
                "-q",
                "-c",
                "1",
                "-W",
                "1",
                &behind.target().to_string()
            ],
            Duration::from_secs(5)
        )
        .is_err(),
        "{} answers without the tunnel: no proof",
        behind.target()
    );
    let client = a.connect(&rig);
    let pool = openvpn::upper_half(rig.server.tunnel_net());
    let ip = openvpn::check_reaches_behind(&client, &a.ns, &rig.server, pool, &behind)
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.context()));
    assert_eq!(
        ip,
        pool.host(0),
        "the pool's first address (the gateway is outside it)"
    );
    rig.assert_pool_address(&a, &client);
}

/// The tests of this module, for the harness (`tests/it/main.rs`).
pub fn tests() -> Vec<Case> {
    vec![
        trial!(openvpn_admits_a_managed_device_and_refuses_each_reason, needs: [Need::OpenVpn]),
        trial!(openvpn_past_the_seats_is_refused_and_a_disconnect_frees_the_seat, needs: [Need::OpenVpn]),
        trial!(openvpn_fails_closed_without_the_daemon_and_recovers_its_sessions, needs: [Need::OpenVpn]),
        trial!(openvpn_deferred_client_connect_decides_the_same, needs: [Need::OpenVpn]),
        trial!(openvpn_pool_in_part_of_the_tunnel_net_routes_through_the_tunnel, needs: [Need::OpenVpn]),
    ]
}
