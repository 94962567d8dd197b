//! End to end with two concentrators: two real OpenVPN 2.6 servers, each running
//! `pforte hook openvpn` against its own pforte, the two pforte nodes sharing one seat pool on a
//! real PostgreSQL. A seat taken on one refuses a client on the other; the seat freed on one
//! admits the client on the other.

use std::time::Duration;

use crate::common::harness::{Case, Need, trial};
use crate::common::openvpn::{self, Client, ClientNs, ClientOptions, Pki, Server, ServerOptions};
use crate::common::postgres::Postgres;
use crate::common::*;

/// One concentrator: an OpenVPN server whose scripts ask its own pforte node. Fields drop in
/// order: the server first, then the daemon, then the files.
struct Concentrator {
    server: Server,
    daemon: Daemon,
    _fixture: Fixture,
}

impl Concentrator {
    fn start(pki: &Pki, pg: &Postgres, node: &str, devices: &[Dev]) -> Concentrator {
        let mut setup = Setup {
            max_sessions: 1,
            token: true,
            ..Setup::default()
        };
        setup.env.extend(pg.node_env("pforte", node, 60));
        let mut fixture = Fixture::new(setup, devices);
        let hook = format!("\"{} hook openvpn\"", bin().display());
        let server = Server::start(
            pki,
            ServerOptions {
                extra: vec![
                    format!("setenv PFORTE_SOCKET {}", fixture.socket().display()),
                    "setenv PFORTE_ZONE office".into(),
                    "setenv PFORTE_INSTANCE office-udp".into(),
                    format!("tls-verify {hook}"),
                    format!("client-connect {hook}"),
                    format!("client-disconnect {hook}"),
                ],
                ..ServerOptions::default()
            },
        )
        .unwrap();
        // Each concentrator hands out addresses of its own tunnel network: pools stay per node.
        fixture.setup.pool = server.tunnel_net().to_string();
        fixture.write_config();
        let daemon = fixture.start();
        Concentrator {
            server,
            daemon,
            _fixture: fixture,
        }
    }

    fn context(&self) -> String {
        format!(
            "--- OpenVPN server log ---\n{}\n--- pforte log ---\n{}",
            self.server.log(),
            self.daemon.log()
        )
    }
}

fn two_openvpn_servers_share_one_seat_pool() {
    if !openvpn::available() {
        return;
    }
    let pg = Postgres::start();
    let work = tempfile::tempdir().unwrap();
    let pki = Pki::create(&work.path().join("pki")).unwrap();
    let ns_a = ClientNs::create().unwrap();
    let ns_b = ClientNs::create().unwrap();
    let cert_a = pki.client("D-CL-A", "alice").unwrap();
    let cert_b = pki.client("D-CL-B", "bob").unwrap();
    let devices = vec![
        Dev {
            hwaddr: ns_a.mac().to_string(),
            cert_sha256: Some(cert_a.sha256.clone()),
            ..Dev::good("D-CL-A", "alice")
        },
        Dev {
            hwaddr: ns_b.mac().to_string(),
            cert_sha256: Some(cert_b.sha256.clone()),
            ..Dev::good("D-CL-B", "bob")
        },
    ];
    let one = Concentrator::start(&pki, &pg, "vpn1", &devices);
    let two = Concentrator::start(&pki, &pg, "vpn2", &devices);
    let context = || format!("{}\n{}", one.context(), two.context());

    // A takes the cluster's only seat on concentrator one.
    let mut a = Client::connect(&ns_a, &cert_a, &one.server, ClientOptions::default()).unwrap();
    if let Err(e) = a.wait_connected(Duration::from_secs(15)) {
        panic!("A did not connect: {e}\n{}", context());
    }
    assert!(one.server.tunnel_net().contains(a.tunnel_ip().unwrap()));
    a.ping(a.server_tunnel_ip(), 2)
        .unwrap_or_else(|e| panic!("{e}\n{}", context()));

    // B on concentrator two is refused: the seat is taken on the other one.
    let b_refused = Client::connect(&ns_b, &cert_b, &two.server, ClientOptions::default()).unwrap();
    if let Err(e) = b_refused.wait_refused(Duration::from_secs(15)) {
        panic!("B not refused: {e}\n{}", context());
    }
    assert_eq!(
        two.daemon
            .metric("pforte_decisions_total{decision=\"deny\",reason=\"capacity_full\"}"),
        Some(1.0),
        "{}",
        context()
    );
    drop(b_refused);

    // A leaves concentrator one: its client-disconnect frees the seat for the cluster.
    a.stop();
    wait_for(
        "the seat freed on node vpn1",
        Duration::from_secs(20),
        || pg.psql("pforte", "SELECT count(*) FROM pforte_sessions") == "0",
    );

    // B now gets in on concentrator two.
    let b = Client::connect(&ns_b, &cert_b, &two.server, ClientOptions::default()).unwrap();
    let mut b = b;
    if let Err(e) = b.wait_connected(Duration::from_secs(15)) {
        panic!(
            "B did not connect after the seat was freed: {e}\n{}",
            context()
        );
    }
    assert!(two.server.tunnel_net().contains(b.tunnel_ip().unwrap()));
    b.ping(b.server_tunnel_ip(), 2)
        .unwrap_or_else(|e| panic!("{e}\n{}", context()));
    assert_eq!(
        pg.psql("pforte", "SELECT node FROM pforte_sessions"),
        "vpn2",
        "the session belongs to node vpn2"
    );
    b.stop();
}

pub fn tests() -> Vec<Case> {
    vec![trial!(two_openvpn_servers_share_one_seat_pool, needs: [
        Need::OpenVpn,
        Need::Tool("initdb", "postgresql"),
        Need::Tool("psql", "postgresql-client"),
    ])]
}
