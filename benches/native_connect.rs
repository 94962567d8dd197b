//! ocserv and strongSwan connection setup with and without pforte, against real servers and
//! real clients in network namespaces (the end-to-end rigs, `tests/it/common/{ocserv,
//! strongswan}.rs`). Needs root, `/dev/net/tun`, ocserv, openconnect, strongSwan (charon,
//! swanctl), openssl, iproute2.
//!
//! ```sh
//! cargo bench --bench native_connect                          # both, 20 clients, 3 rounds
//! cargo bench --bench native_connect -- --clients 20 --rounds 3 --refusals 20 --only ocserv
//! ```
//!
//! ocserv: three servers side by side during the whole run, one PKI, the same 20 clients:
//! `none` (no connect-/disconnect-script), `sh` (both scripts `#!/bin/sh` `exit 0`: what any
//! script costs ocserv), `pforte` (both scripts `pforte hook ocserv` through its
//! `pforte-hook-ocserv` link, against a pforte daemon watching the server through occtl). A
//! connect is timed from starting openconnect to its vpnc-script bringing the tunnel up
//! (5 ms polling); then the client stops and the next starts once the server lists no user.
//! Clients are interleaved over the modes (client 1 against each, then client 2, …), with the
//! order of modes rotated per client.
//!
//! strongSwan: two servers side by side, `none` (nobody watching) and `pforte` (a pforte daemon
//! on its VICI socket), 20 clients each (a charon per client namespace): a connect is
//! `swanctl --initiate` (IKE_SA with certificate and EAP-MD5, and the CHILD_SA) until it
//! returns; then `--terminate`. pforte is not in charon's path: the figures should agree within
//! noise. Then `--refusals K` unregistered devices against the pforte server: the window from
//! the `ike-updown` event to charon's answer to `terminate`, from pforte's log. With
//! `--log-listener` a `swanctl --log` listens on the `none` server, to tell what charon's log
//! stream (which pforte reads for the certificate round) costs from what pforte's own work on
//! the shared cores costs; `--sa-listener` attaches `swanctl --monitor-sa` instead (charon's
//! IKE_SA and CHILD_SA events).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    unused_macros,
    unused_imports
)]

#[path = "../tests/it/common/mod.rs"]
mod common;

#[path = "common/machine.rs"]
mod machine;

use std::time::{Duration, Instant};

use common::ocserv::{self, OcClient, OcservServer, Script};
use common::openvpn::{ClientNs, Pki};
use common::strongswan::{RsaPki, SwanClient, SwanServer};
use common::{Dev, Fixture, Setup, wait_for};

const USERS: [&str; 3] = ["alice", "bob", "ivan"];

struct Args {
    clients: usize,
    rounds: usize,
    refusals: usize,
    only: Option<String>,
    /// A listener on the `none` server: `swanctl --log` (`--log-listener`: what charon's log
    /// stream alone costs) or `swanctl --monitor-sa` (`--sa-listener`: what its IKE_SA and
    /// CHILD_SA events cost).
    listener: Option<&'static str>,
    /// Start the server pforte watches first (a check that the order of creation is not what
    /// differs).
    pforte_first: bool,
}

fn args() -> Args {
    let mut a = Args {
        clients: 20,
        rounds: 3,
        refusals: 20,
        only: None,
        listener: None,
        pforte_first: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(x) = it.next() {
        match x.as_str() {
            "--clients" => a.clients = it.next().unwrap().parse().unwrap(),
            "--rounds" => a.rounds = it.next().unwrap().parse().unwrap(),
            "--refusals" => a.refusals = it.next().unwrap().parse().unwrap(),
            "--only" => a.only = it.next().cloned(),
            "--log-listener" => a.listener = Some("--log"),
            "--sa-listener" => a.listener = Some("--monitor-sa"),
            "--pforte-first" => a.pforte_first = true,
            _ => {} // `--bench` from cargo
        }
    }
    a
}

fn stats(name: &str, v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    println!(
        "  {name:<8} n={:<3} median {:7.1} ms  p10 {:7.1}  p90 {:7.1}  min {:7.1}  max {:7.1}",
        v.len(),
        q(0.5),
        q(0.1),
        q(0.9),
        v[0],
        v[v.len() - 1]
    );
    q(0.5)
}

fn ocserv_bench(a: &Args) {
    println!(
        "ocserv: {} clients, {} rounds, modes none / sh / pforte",
        a.clients, a.rounds
    );
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki")).unwrap();
    let peers: Vec<(ClientNs, ocserv::OcCert)> = (0..a.clients)
        .map(|i| {
            let id = format!("NB-BEN-{i:04}");
            (
                ClientNs::create().unwrap(),
                ocserv::cert(&pki, &id, USERS[i % 3]),
            )
        })
        .collect();
    let devs: Vec<Dev> = peers
        .iter()
        .enumerate()
        .map(|(i, (_, c))| Dev {
            cert_sha256: Some(c.sha256.clone()),
            ..Dev::good(&format!("NB-BEN-{i:04}"), USERS[i % 3])
        })
        .collect();
    let mut fixture = Fixture::new(
        Setup {
            per_user: 0,
            max_sessions: 1000,
            ..Setup::default()
        },
        &devs,
    );
    let none = OcservServer::start(&pki, Script::None).unwrap();
    let sh = OcservServer::start(&pki, Script::ShExit0).unwrap();
    let pf = OcservServer::start(
        &pki,
        Script::Pforte {
            socket: fixture.socket(),
            zone: "ssl".into(),
            instance: "ssl".into(),
        },
    )
    .unwrap();
    fixture.setup.extra = format!(
        "[[zones]]\nname = \"ssl\"\nlevel = 1\nroutes = [\"10.1.0.0/16\"]\n\n[[ocserv]]\ninstance = \"ssl\"\nzone = \"ssl\"\nocctl = \"{}\"\n",
        pf.occtl_socket.display()
    );
    fixture.write_config();
    let daemon = fixture.start();
    let modes: [(&str, &OcservServer); 3] = [("none", &none), ("sh", &sh), ("pforte", &pf)];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let before = machine::cpu_times();
    for _ in 0..a.rounds {
        for (i, (ns, cert)) in peers.iter().enumerate() {
            for k in 0..3 {
                let m = (i + k) % 3;
                let server = modes[m].1;
                let mut c = OcClient::start(ns, cert, server).unwrap();
                let t = c
                    .wait_up(Duration::from_secs(20))
                    .unwrap_or_else(|e| panic!("{}: {e}\n{}", modes[m].0, daemon.log()));
                times[m].push(t.as_secs_f64() * 1000.0);
                drop(c);
                wait_for(
                    "the server to drop the client",
                    Duration::from_secs(15),
                    || server.user_count() == 0,
                );
            }
        }
    }
    let med: Vec<f64> = (0..3).map(|m| stats(modes[m].0, &mut times[m])).collect();
    println!(
        "  ratios at the median: sh/none {:.3}, pforte/none {:.3}, pforte/sh {:.3} (target ≤ 1.1)",
        med[1] / med[0],
        med[2] / med[0],
        med[2] / med[1]
    );
    if let Some(r) = machine::report(before) {
        println!("  {r}");
    }
}

fn strongswan_bench(a: &Args) {
    println!(
        "strongSwan: {} clients per server, {} rounds, modes none / pforte; {} refusals",
        a.clients, a.rounds, a.refusals
    );
    let pki = RsaPki::create();
    let certs: Vec<_> = (0..a.clients)
        .map(|i| pki.client(&format!("NB-BEN-{i:04}")))
        .collect();
    let devs: Vec<Dev> = certs
        .iter()
        .enumerate()
        .map(|(i, c)| Dev {
            cert_sha256: Some(c.sha256.clone()),
            ..Dev::good(&format!("NB-BEN-{i:04}"), USERS[i % 3])
        })
        .collect();
    let (none, pf) = if a.pforte_first {
        let pf = SwanServer::start(&pki).unwrap();
        (SwanServer::start(&pki).unwrap(), pf)
    } else {
        let none = SwanServer::start(&pki).unwrap();
        (none, SwanServer::start(&pki).unwrap())
    };
    let fixture = Fixture::new(
        Setup {
            per_user: 0,
            max_sessions: 1000,
            extra: format!(
                "[[zones]]\nname = \"ipsec\"\nlevel = 1\nroutes = [\"10.1.0.0/16\"]\n\n[[strongswan]]\ninstance = \"ikev2\"\nzone = \"ipsec\"\nvici = \"{}\"\n",
                pf.vici().display()
            ),
            ..Setup::default()
        },
        &devs,
    );
    let daemon = fixture.start();
    let setup = Instant::now();
    let clients: Vec<[SwanClient; 2]> = certs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let u = USERS[i % 3];
            [
                SwanClient::new(&none, &pki, c, u, None).unwrap(),
                SwanClient::new(&pf, &pki, c, u, None).unwrap(),
            ]
        })
        .collect();
    println!(
        "  {} client charons up in {:?}",
        2 * clients.len(),
        setup.elapsed()
    );
    let _listener = a.listener.map(|what| {
        std::process::Command::new("swanctl")
            .args([what, "--uri"])
            .arg(format!("unix://{}", none.vici().display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(KillOnDrop)
            .unwrap()
    });
    if let Some(what) = a.listener {
        println!("  a `swanctl {what}` listener is attached to the `none` server");
    }
    let servers = [&none, &pf];
    let names = ["none", "pforte"];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let before = machine::cpu_times();
    for _ in 0..a.rounds {
        for (i, pair) in clients.iter().enumerate() {
            for k in 0..2 {
                let m = (i + k) % 2;
                let t = pair[m]
                    .initiate()
                    .unwrap_or_else(|e| panic!("{}: {e}\n{}", names[m], daemon.log()));
                times[m].push(t.as_secs_f64() * 1000.0);
                pair[m].terminate().unwrap();
                wait_for(
                    "the server to drop the IKE_SA",
                    Duration::from_secs(15),
                    || servers[m].sa_count() == 0,
                );
            }
        }
    }
    let med: Vec<f64> = (0..2).map(|m| stats(names[m], &mut times[m])).collect();
    println!("  ratio at the median: pforte/none {:.3}", med[1] / med[0]);
    if let Some(r) = machine::report(before) {
        println!("  {r}");
    }
    // Refusals: unregistered devices against the watched server.
    let mut refused = Vec::new();
    for i in 0..a.refusals {
        let cert = pki.client(&format!("NB-UNREG-{i:04}"));
        let c = SwanClient::new(&pf, &pki, &cert, USERS[i % 3], None).unwrap();
        let _ = c.initiate();
        wait_for(
            "the refused IKE_SA to be terminated",
            Duration::from_secs(15),
            || pf.sa_count() == 0,
        );
        refused.push(c);
        if refused.len() > 4 {
            refused.remove(0);
        }
    }
    let mut windows: Vec<f64> = daemon
        .log()
        .lines()
        .filter(|l| l.contains("IKE_SA refused and terminated"))
        .filter_map(|l| {
            l.split("window_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    if !windows.is_empty() {
        stats("refusal window (up → terminated)", &mut windows);
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let a = args();
    if a.only.as_deref() != Some("strongswan") {
        ocserv_bench(&a);
    }
    if a.only.as_deref() != Some("ocserv") {
        strongswan_bench(&a);
    }
}
