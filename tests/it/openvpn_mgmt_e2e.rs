//! End to end with a real OpenVPN 2.6 server and its management interface: live byte counters,
//! client-kill on revocation and operator kill, the pass-through socket, OpenVPN restarts, and
//! decisions over management-client-auth (no script at all).

use std::time::Duration;

use hyper::Method;

use crate::common::harness::{Case, Need, trial};
use crate::common::openvpn::{
    self, Client, ClientCert, ClientNs, ClientOptions, Management, Pki, Server, ServerOptions,
};
use crate::common::*;

struct Rig {
    _work: tempfile::TempDir,
    _pki: Pki,
    server: Server,
    fixture: Fixture,
    daemon: Daemon,
}

fn hook_lines(socket: &std::path::Path) -> Vec<String> {
    let hook = format!("\"{} hook openvpn\"", bin().display());
    vec![
        "script-security 2".into(),
        format!("setenv PFORTE_SOCKET {}", socket.display()),
        "setenv PFORTE_ZONE office".into(),
        "setenv PFORTE_INSTANCE office-udp".into(),
        format!("client-connect {hook}"),
        format!("client-disconnect {hook}"),
    ]
}

/// A server with a management socket, and pforte connected to it. `client_auth`: decisions over
/// the management interface instead of the script hook.
fn rig(
    client_auth: bool,
    setup: Setup,
    devices: impl Fn(&Pki) -> Vec<(Dev, ClientCert)>,
) -> Option<(Rig, Vec<(Dev, ClientCert)>)> {
    rig_on(client_auth, setup, devices, false)
}

/// As [`rig`]; with `narrow` the office zone's pool is the upper half of the server's tunnel net
/// and its `network` the whole net.
fn rig_on(
    client_auth: bool,
    setup: Setup,
    devices: impl Fn(&Pki) -> Vec<(Dev, ClientCert)>,
    narrow: bool,
) -> Option<(Rig, Vec<(Dev, ClientCert)>)> {
    if !openvpn::available() {
        return None;
    }
    let work = tempfile::tempdir().unwrap();
    let pki = Pki::create(work.path()).unwrap();
    let devs = devices(&pki);
    // The socket path must be known before the server starts (setenv), so the fixture comes
    // first with a placeholder pool, and its config is rewritten once the tunnel net is known.
    let mut fixture = Fixture::new(
        setup,
        &devs.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
    );
    let extra = if client_auth {
        vec![
            "management-client-auth".to_string(),
            "auth-user-pass-optional".to_string(),
        ]
    } else {
        hook_lines(&fixture.socket())
    };
    let server = Server::start(
        &pki,
        ServerOptions {
            management: true,
            extra,
            ..ServerOptions::default()
        },
    )
    .unwrap();
    let net = server.tunnel_net();
    if narrow {
        fixture.setup.pool = openvpn::upper_half(net).to_string();
        fixture.setup.network = Some(net.to_string());
    } else {
        fixture.setup.pool = net.to_string();
    }
    fixture.setup.extra = format!(
        "[[openvpn]]\ninstance = \"office-udp\"\nzone = \"office\"\nmanagement = \"{}\"\nclient_auth = {client_auth}\npassthrough = \"{}\"\nbytecount_interval_s = 1\nstatus_interval_s = 2\n",
        server.management_socket().unwrap().display(),
        fixture.path("run/office-mgmt.sock").display()
    );
    fixture.write_config();
    let daemon = fixture.start();
    wait_for(
        "pforte to connect to the management interface",
        Duration::from_secs(10),
        || {
            daemon.metric("pforte_openvpn_management_connected{vpn_instance=\"office-udp\"}")
                == Some(1.0)
        },
    );
    Some((
        Rig {
            _work: work,
            _pki: pki,
            server,
            fixture,
            daemon,
        },
        devs,
    ))
}

/// A registry device for a fresh client certificate, hwaddr registered later per namespace.
fn device(pki: &Pki, id: &str, user: &str) -> (Dev, ClientCert) {
    let cert = pki.client(id, user).unwrap();
    (
        Dev {
            cert_sha256: Some(cert.sha256.clone()),
            ..Dev::good(id, user)
        },
        cert,
    )
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Rig {
    /// What to show when something fails: the ends of every log.
    fn explain(&self, e: &str) -> String {
        format!(
            "{}\n--- server log ---\n{}\n--- pforte log ---\n{}\n--- audit ---\n{}",
            tail(e, 8),
            tail(&self.server.log(), 25),
            tail(&self.daemon.log(), 25),
            tail(
                &std::fs::read_to_string(self.fixture.path("state/audit.log")).unwrap_or_default(),
                10
            )
        )
    }
}

fn client(rig: &Rig, cert: &ClientCert) -> (ClientNs, Client) {
    let ns = ClientNs::create().unwrap();
    let c = Client::connect(&ns, cert, &rig.server, ClientOptions::default()).unwrap();
    (ns, c)
}

fn sessions(d: &Daemon) -> serde_json::Value {
    let (s, body) = http_get_unix(&d.socket, "/v1/sessions");
    assert_eq!(s, 200);
    serde_json::from_str(&body).unwrap()
}

fn http_get_unix(socket: &std::path::Path, path: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = pforte::client::UnixClient::connect(socket).await.unwrap();
        let (s, b) = c.request(Method::GET, path, None).await.unwrap();
        (s, String::from_utf8_lossy(&b).into_owned())
    })
}

fn http_unix(socket: &std::path::Path, method: Method, path: &str) -> u16 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = pforte::client::UnixClient::connect(socket).await.unwrap();
        c.request(method, path, None).await.unwrap().0
    })
}

fn script_mode_with_management_bytes_revocation_kill_passthrough() {
    let Some((rig, devs)) = rig(
        false,
        Setup {
            watch_interval_s: 0,
            ..Setup::default()
        },
        |pki| {
            vec![
                device(pki, "alice-laptop", "alice"),
                device(pki, "bob-laptop", "bob"),
            ]
        },
    ) else {
        return;
    };
    let (_ns_a, mut a) = client(&rig, &devs[0].1);
    let (_ns_b, mut b) = client(&rig, &devs[1].1);
    a.wait_connected(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    b.wait_connected(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    let d = &rig.daemon;
    assert_eq!(d.metric("pforte_seats_used"), Some(2.0));

    // Bytes of a real transfer appear in /metrics within seconds (bytecount).
    let series = "pforte_session_received_bytes_total{org_unit=\"it\",zone=\"office\"}";
    let before = d.metric(series).unwrap_or(0.0);
    a.transfer(2_000_000).unwrap();
    wait_for(
        "bytecount to report the transfer",
        Duration::from_secs(10),
        || d.metric(series).unwrap_or(0.0) - before >= 2_000_000.0,
    );

    // The pass-through socket serves operators' tools while pforte is connected.
    let mut m = Management::connect(
        &rig.fixture.path("run/office-mgmt.sock"),
        Duration::from_secs(5),
    )
    .unwrap();
    let listed = m.status_clients().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        m.command("bytecount 0").is_err(),
        "pforte keeps bytecount for itself"
    );
    drop(m);

    // An operator kill disconnects the client (HALT: it does not come back).
    let v = sessions(d);
    let bob_id = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["username"] == "bob")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        http_unix(&d.socket, Method::DELETE, &format!("/v1/sessions/{bob_id}")),
        200
    );
    b.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(d.metric("pforte_seats_used"), Some(1.0));

    // A reload that finds alice's device no longer encrypted (not only a blocked one: every
    // check is decided again) disconnects her within seconds, with the reason counted.
    let unencrypted = Dev {
        encrypted: false,
        ..devs[0].0.clone()
    };
    rig.fixture.write_devices(&[unencrypted, devs[1].0.clone()]);
    d.signal(nix::sys::signal::Signal::SIGHUP);
    a.wait_exit(Duration::from_secs(10)).unwrap();
    wait_for("no sessions left", Duration::from_secs(10), || {
        d.metric("pforte_seats_used") == Some(0.0)
    });
    assert_eq!(
        d.metric("pforte_sessions_revoked_total{reason=\"not_encrypted\"}"),
        Some(1.0)
    );
    assert!(
        rig.server.log().contains("client-kill") || rig.server.log().contains("HALT"),
        "{}",
        rig.server.log()
    );
}

/// The OpenVPN client ids (`status 3` through pforte's pass-through socket), retried while the
/// server restarts.
fn client_ids(rig: &Rig) -> Vec<u64> {
    let path = rig.fixture.path("run/office-mgmt.sock");
    let mut last = String::new();
    for _ in 0..50 {
        match Management::connect(&path, Duration::from_secs(2))
            .and_then(|mut m| m.status_clients())
        {
            Ok(rows) => return rows.iter().map(|r| r.client_id).collect(),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{}", rig.explain(&last));
}

/// OpenVPN restarts on `signal` (SIGHUP: re-reading its config; SIGUSR1: a soft restart) with
/// two clients connected and pforte on its management interface. What a real OpenVPN 2.6 does:
/// the management connection stays open (OpenVPN closes it only at exit), the client instances
/// are torn down and the clients reconnect (after their ping-restart, ~10 s) with client ids
/// counted from 0 again, so an id pforte knew now names another client. pforte neither loses nor
/// doubles a session: one seat per client, new session keys, and an operator kill after the
/// restart ends the right client.
fn restart_openvpn(client_auth: bool, signal: nix::sys::signal::Signal) {
    let Some((rig, devs)) = rig(client_auth, Setup::default(), |pki| {
        vec![device(pki, "carl", "alice"), device(pki, "cleo", "bob")]
    }) else {
        return;
    };
    let (_ns, mut c) = client(&rig, &devs[0].1);
    let (_ns2, mut c2) = client(&rig, &devs[1].1);
    c.wait_connected(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    c2.wait_connected(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    let d = &rig.daemon;
    assert_eq!(d.metric("pforte_seats_used"), Some(2.0));
    let before = client_ids(&rig);
    let old_keys: Vec<String> = sessions(d)["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_key"].as_str().unwrap().to_string())
        .collect();
    let pid = rig.server.pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
    for cl in [&c, &c2] {
        wait_for("the clients to reconnect", Duration::from_secs(30), || {
            cl.log()
                .matches("Initialization Sequence Completed")
                .count()
                >= 2
        });
    }
    // Two clients, two seats: the old sessions ended (by OpenVPN's client-disconnect at the
    // restart, or by reconciliation), the new ones counted once, with new keys.
    wait_for("management connected", Duration::from_secs(15), || {
        d.metric("pforte_openvpn_management_connected{vpn_instance=\"office-udp\"}") == Some(1.0)
    });
    wait_for(
        "seats to settle at two new sessions",
        Duration::from_secs(30),
        || {
            let v = sessions(d);
            d.metric("pforte_seats_used") == Some(2.0)
                && v["count"] == 2
                && v["sessions"].as_array().unwrap().iter().all(|s| {
                    !old_keys
                        .iter()
                        .any(|k| s["session_key"].as_str() == Some(k.as_str()))
                })
        },
    );
    c.ping(rig.server.tunnel_ip(), 2).unwrap();
    c2.ping(rig.server.tunnel_ip(), 2).unwrap();
    let mut after = client_ids(&rig);
    after.sort_unstable();
    let lost = d
        .log()
        .matches("OpenVPN management connection lost")
        .count();
    let accepted = rig
        .server
        .log()
        .matches("MANAGEMENT: Client connected")
        .count();
    eprintln!(
        "{signal:?}: management connection lost {lost} time(s), OpenVPN accepted {accepted}; client ids before {before:?}, after {after:?}"
    );
    assert_eq!(
        (lost, accepted),
        (0, 1),
        "the management connection stays open across the restart\n{}",
        rig.explain("")
    );
    assert_eq!(after, vec![0, 1], "client ids start again at 0");
    // The ids pforte now holds are the new ones: killing alice's session ends alice's client.
    let alice = sessions(d)["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["username"] == "alice")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        http_unix(&d.socket, Method::DELETE, &format!("/v1/sessions/{alice}")),
        200
    );
    c.wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    assert!(c2.is_running(), "{}", rig.explain("bob's client was ended"));
    c2.ping(rig.server.tunnel_ip(), 2).unwrap();
    assert_eq!(d.metric("pforte_seats_used"), Some(1.0));
}

fn openvpn_restart_neither_loses_nor_doubles_sessions() {
    restart_openvpn(false, nix::sys::signal::Signal::SIGHUP);
}

fn openvpn_soft_restart_sigusr1_neither_loses_nor_doubles_sessions() {
    restart_openvpn(false, nix::sys::signal::Signal::SIGUSR1);
}

fn client_auth_soft_restart_sigusr1_neither_loses_nor_doubles_sessions() {
    restart_openvpn(true, nix::sys::signal::Signal::SIGUSR1);
}

fn client_auth_mode_decides_without_scripts() {
    let Some((rig, devs)) = rig(
        true,
        Setup {
            max_sessions: 1,
            ..Setup::default()
        },
        |pki| {
            let mut v = vec![device(pki, "dana", "alice"), device(pki, "erin", "bob")];
            let (mut p, id) = device(pki, "pat", "alice");
            p.ownership = "private";
            v.push((p, id));
            v
        },
    ) else {
        return;
    };
    let d = &rig.daemon;
    // Allowed: address from pforte's pool, pings through the tunnel.
    let (_ns1, mut dana) = client(&rig, &devs[0].1);
    dana.wait_connected(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    let v = sessions(d);
    assert_eq!(v["count"], 1);
    let ip = dana.tunnel_ip().unwrap();
    assert_eq!(
        v["sessions"][0]["tunnel_ip"].as_str().unwrap(),
        ip.to_string()
    );
    dana.ping(rig.server.tunnel_ip(), 2).unwrap();
    assert!(
        !rig.server.log().contains("client-connect"),
        "no script runs in this mode"
    );

    // A private device: refused with its reason, which the client sees.
    let (_ns2, pat) = client(&rig, &devs[2].1);
    pat.wait_refused(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    assert!(
        pat.auth_failed_message()
            .unwrap_or_default()
            .contains("private_device"),
        "{}",
        pat.log()
    );
    // Past the seats.
    let (_ns3, erin) = client(&rig, &devs[1].1);
    erin.wait_refused(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    assert!(
        erin.auth_failed_message()
            .unwrap_or_default()
            .contains("capacity_full")
    );
    assert_eq!(
        d.metric("pforte_decisions_total{decision=\"deny\",reason=\"private_device\"}"),
        Some(1.0)
    );
    // Disconnect frees the seat (>CLIENT:DISCONNECT).
    dana.stop();
    wait_for("the seat to be freed", Duration::from_secs(15), || {
        d.metric("pforte_seats_used") == Some(0.0)
    });
    let (_ns4, mut erin2) = client(&rig, &devs[1].1);
    erin2
        .wait_connected(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
}

fn session_that_ended_while_pforte_was_down_is_reaped_at_restart() {
    let Some((mut rig, devs)) = rig(false, Setup::default(), |pki| {
        vec![device(pki, "gus", "alice"), device(pki, "hal", "bob")]
    }) else {
        return;
    };
    let (_ns1, mut gus) = client(&rig, &devs[0].1);
    let (_ns2, mut hal) = client(&rig, &devs[1].1);
    gus.wait_connected(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    hal.wait_connected(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    assert_eq!(rig.daemon.metric("pforte_seats_used"), Some(2.0));
    // pforte goes down; meanwhile gus leaves (his client-disconnect cannot reach pforte).
    rig.daemon.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = rig.daemon.child.wait();
    gus.stop();
    rig.server
        .wait_log("client-instance exiting", 1, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    // Restarted: both sessions come back from the store, then reconciliation with OpenVPN's
    // client list reaps gus's (older than the grace period) and keeps hal's.
    std::thread::sleep(Duration::from_secs(3));
    rig.daemon = rig.fixture.start();
    let d = &rig.daemon;
    wait_for(
        "the departed session to be reaped",
        Duration::from_secs(20),
        || d.metric("pforte_seats_used") == Some(1.0),
    );
    assert_eq!(
        d.metric("pforte_sessions_reaped_total{vpn_instance=\"office-udp\"}"),
        Some(1.0)
    );
    assert_eq!(sessions(d)["sessions"][0]["username"], "bob");
    hal.ping(rig.server.tunnel_ip(), 2).unwrap();
}

/// management-client-auth with the zone's pool in the upper half of the server's tunnel net and
/// its `network` the whole net: the address comes with the net's netmask, the pushed route is
/// installed on the client's tun and a host reachable only through the tunnel answers (as
/// `openvpn_e2e::openvpn_pool_in_part_of_the_tunnel_net_routes_through_the_tunnel` in script mode).
fn client_auth_pool_in_part_of_the_tunnel_net_routes_through_the_tunnel() {
    if !openvpn::available() {
        return;
    }
    let mut behind = openvpn::Behind::claim().unwrap();
    let Some((rig, devs)) = rig_on(
        true,
        Setup {
            routes: vec![behind.net().to_string()],
            ..Setup::default()
        },
        |pki| vec![device(pki, "half", "alice")],
        true,
    ) else {
        return;
    };
    behind.attach(&rig.server).unwrap();
    let ns = ClientNs::create().unwrap();
    behind.cut_off(&ns).unwrap();
    let mut c = Client::connect(&ns, &devs[0].1, &rig.server, ClientOptions::default()).unwrap();
    c.wait_connected(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    let pool = openvpn::upper_half(rig.server.tunnel_net());
    let ip = openvpn::check_reaches_behind(&c, &ns, &rig.server, pool, &behind)
        .unwrap_or_else(|e| panic!("{}", rig.explain(&e)));
    assert_eq!(ip, pool.host(0));
    let v = sessions(&rig.daemon);
    assert_eq!(
        v["sessions"][0]["tunnel_ip"].as_str(),
        Some(ip.to_string().as_str())
    );
}

/// The tests of this module, for the harness (`tests/it/main.rs`).
pub fn tests() -> Vec<Case> {
    vec![
        trial!(script_mode_with_management_bytes_revocation_kill_passthrough, needs: [Need::OpenVpn]),
        trial!(openvpn_restart_neither_loses_nor_doubles_sessions, needs: [Need::OpenVpn]),
        trial!(openvpn_soft_restart_sigusr1_neither_loses_nor_doubles_sessions, needs: [Need::OpenVpn]),
        trial!(client_auth_soft_restart_sigusr1_neither_loses_nor_doubles_sessions, needs: [Need::OpenVpn]),
        trial!(client_auth_mode_decides_without_scripts, needs: [Need::OpenVpn]),
        trial!(session_that_ended_while_pforte_was_down_is_reaped_at_restart, needs: [Need::OpenVpn]),
        trial!(client_auth_pool_in_part_of_the_tunnel_net_routes_through_the_tunnel, needs: [Need::OpenVpn]),
    ]
}
