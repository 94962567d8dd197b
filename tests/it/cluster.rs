//! Several pforte nodes sharing one seat pool on a real PostgreSQL (started by the tests in a
//! temp folder): the oversell race for each of the four limits, sessions listed and killed
//! from any node, a node restarted while its sessions live, kill -9 of a node and its lease
//! lapsing, PostgreSQL stopped and started during a storm of connects, and a failover to a
//! promoted synchronous standby.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use pforte::wire::{ConnectRequest, ConnectResponse, Decision};

use crate::common::harness::{Case, Need, trial};
use crate::common::postgres::Postgres;
use crate::common::*;

const NEEDS: [Need; 3] = [
    Need::Tool("initdb", "postgresql"),
    Need::Tool("psql", "postgresql-client"),
    Need::Root("to run PostgreSQL as an unprivileged user"),
];

/// One node: its own folder, config, socket and audit log, on the shared database.
fn node(
    pg: &Postgres,
    db: &str,
    name: &str,
    lease_s: u64,
    setup: Setup,
    devices: &[Dev],
) -> Fixture {
    let mut setup = setup;
    setup.token = true;
    setup.env.extend(pg.node_env(db, name, lease_s));
    Fixture::new(setup, devices)
}

fn reason(r: &ConnectResponse) -> String {
    r.reason
        .map(|x| x.as_str().to_string())
        .unwrap_or_else(|| "allowed".into())
}

fn auth() -> [(&'static str, &'static str); 1] {
    [("Authorization", "Bearer test-token-0123456789abcdef")]
}

/// `GET /v1/sessions` on a node: (node, id) of every session listed.
fn listed(d: &Daemon) -> Vec<(String, String)> {
    let (status, body) = http(d.port, "GET", "/v1/sessions", &auth(), "").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["node"].as_str().unwrap_or("").to_string(),
                s["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Fires every request at once, each on its own connection to its node.
async fn race(nodes: &[Daemon], per_node: Vec<Vec<ConnectRequest>>) -> Vec<ConnectResponse> {
    let mut set = tokio::task::JoinSet::new();
    for (d, reqs) in nodes.iter().zip(per_node) {
        for req in reqs {
            let socket = d.socket.clone();
            set.spawn(async move {
                let mut c = pforte::client::UnixClient::connect(&socket).await.unwrap();
                c.connect_request(&req).await.unwrap().1
            });
        }
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}

/// A paced storm's answers: (sent at, time to answer, answer).
type Answers = Vec<(Instant, Duration, ConnectResponse)>;

/// Connects `dev` to the node every 5 ms, each on a fresh connection with session key
/// `{tag}-{i}`, until `stop` is set (at most 20,000 connects).
fn paced_storm(
    d: &Daemon,
    dev: &Dev,
    tag: &str,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Answers> {
    let (socket, dev, tag, stop) = (d.socket.clone(), dev.clone(), tag.to_string(), stop.clone());
    tokio::spawn(async move {
        let mut out = Answers::new();
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 20_000 {
            let started = Instant::now();
            let mut c = pforte::client::UnixClient::connect(&socket).await.unwrap();
            let (_, r) = c
                .connect_request(&connect_req(&dev, "alice", &format!("{tag}-{i}")))
                .await
                .unwrap();
            out.push((started, started.elapsed(), r));
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        out
    })
}

/// The node config of the storm tests: seats and a pool large enough for the whole storm (a /24
/// runs out after 253 sessions), no per-user limit.
fn storm_setup() -> Setup {
    Setup {
        max_sessions: 100_000,
        per_user: 0,
        pool: "10.213.0.0/16".into(),
        ..Setup::default()
    }
}

/// Stops the paced storms and gathers their answers.
async fn stop_storms(
    stop: &std::sync::atomic::AtomicBool,
    storms: Vec<tokio::task::JoinHandle<Answers>>,
) -> Answers {
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut answers = Answers::new();
    for s in storms {
        answers.extend(s.await.unwrap());
    }
    answers
}

/// No connect took as long as the hook waits (2 s).
fn assert_answered_within_the_hooks_timeout(answers: &Answers, d: &Daemon) {
    let slowest = answers.iter().map(|(_, took, _)| *took).max().unwrap();
    assert!(
        slowest < Duration::from_secs(2),
        "a connect took {slowest:?} (the hook gives up after 2 s)\n{}",
        d.log()
    );
}

/// Connects sent after `t` and admitted.
fn admitted_after(answers: &Answers, t: Instant) -> usize {
    answers
        .iter()
        .filter(|(at, _, r)| *at > t && r.decision == Decision::Allow)
        .count()
}

/// The database holds exactly the sessions acknowledged: nothing acknowledged lost, nothing
/// refused kept (compensating deletes of candidates whose outcome was unknown are given 5 s).
fn assert_holds_exactly_the_acknowledged(pg: &Postgres, answers: &Answers) {
    let acked: HashSet<String> = answers
        .iter()
        .filter_map(|(_, _, r)| r.session_id.clone())
        .collect();
    pg.wait_query(
        "pforte",
        "SELECT count(*) FROM pforte_sessions",
        Duration::from_secs(5),
        |o| o == acked.len().to_string(),
    );
    let ids: HashSet<String> = pg
        .psql("pforte", "SELECT id FROM pforte_sessions")
        .lines()
        .map(str::to_string)
        .collect();
    let lost: Vec<&String> = acked.difference(&ids).collect();
    assert!(
        lost.is_empty(),
        "acknowledged, missing from the database: {lost:?}"
    );
    let kept: Vec<&String> = ids.difference(&acked).collect();
    assert!(
        kept.is_empty(),
        "not acknowledged, kept in the database: {kept:?}"
    );
}

struct Scenario {
    db: &'static str,
    setup: Setup,
    org_unit: &'static str,
    user: &'static str,
    /// Seats free for these connects.
    free: usize,
    refusal: &'static str,
}

/// N=3 nodes each firing M=12 connects at once at K free seats admit exactly K, for each of
/// the four limits: seats, reserved seats (a non-priority org unit), an org-unit quota, the
/// per-user limit. The database holds exactly K sessions and its counters agree; every node
/// lists all of them with their nodes.
async fn the_oversell_race_admits_exactly_the_free_seats_for_every_limit() {
    let pg = Postgres::start();
    let scenarios = [
        Scenario {
            db: "seats",
            setup: Setup {
                max_sessions: 7,
                per_user: 0,
                ..Setup::default()
            },
            org_unit: "it",
            user: "alice",
            free: 7,
            refusal: "capacity_full",
        },
        Scenario {
            db: "reserved",
            setup: Setup {
                max_sessions: 10,
                reserved_seats: 4,
                per_user: 0,
                ..Setup::default()
            },
            org_unit: "finance",
            user: "frank",
            free: 6,
            refusal: "capacity_full",
        },
        Scenario {
            db: "quota",
            setup: Setup {
                max_sessions: 100,
                finance_quota: 5,
                per_user: 0,
                ..Setup::default()
            },
            org_unit: "finance",
            user: "frank",
            free: 5,
            refusal: "org_unit_quota",
        },
        Scenario {
            db: "per_user",
            setup: Setup {
                max_sessions: 100,
                per_user: 3,
                ..Setup::default()
            },
            org_unit: "it",
            user: "alice",
            free: 3,
            refusal: "user_session_limit",
        },
    ];
    for sc in scenarios {
        pg.create_db(sc.db);
        let devices: Vec<Dev> = (0..36)
            .map(|i| Dev {
                org_unit: sc.org_unit,
                ..Dev::good(&format!("D-{i:02}"), sc.user)
            })
            .collect();
        let fixtures: Vec<Fixture> = ["gw1", "gw2", "gw3"]
            .iter()
            .map(|n| node(&pg, sc.db, n, 60, sc.setup.clone(), &devices))
            .collect();
        let nodes: Vec<Daemon> = fixtures.iter().map(Fixture::start).collect();
        let per_node: Vec<Vec<ConnectRequest>> = (0..3)
            .map(|n| {
                (0..12)
                    .map(|i| connect_req(&devices[n * 12 + i], sc.user, &format!("k{n}-{i}")))
                    .collect()
            })
            .collect();
        let answers = race(&nodes, per_node).await;
        let allowed = answers
            .iter()
            .filter(|r| r.decision == Decision::Allow)
            .count();
        assert_eq!(
            allowed,
            sc.free,
            "{}: {:?}",
            sc.db,
            answers.iter().map(reason).collect::<Vec<_>>()
        );
        assert!(
            answers
                .iter()
                .filter(|r| r.decision != Decision::Allow)
                .all(|r| reason(r) == sc.refusal),
            "{}: {:?}",
            sc.db,
            answers.iter().map(reason).collect::<Vec<_>>()
        );
        assert_eq!(
            pg.psql(sc.db, "SELECT count(*) FROM pforte_sessions"),
            sc.free.to_string()
        );
        assert_eq!(
            pg.psql(sc.db, "SELECT n FROM pforte_counts WHERE kind = 't'"),
            sc.free.to_string()
        );
        for d in &nodes {
            let list = listed(d);
            assert_eq!(list.len(), sc.free, "{}", sc.db);
            assert!(list.iter().all(|(n, _)| n.starts_with("gw")), "{list:?}");
        }
        let refused_here: f64 = nodes
            .iter()
            .map(|d| {
                d.metric(&format!(
                    "pforte_decisions_total{{decision=\"deny\",reason=\"{}\"}}",
                    sc.refusal
                ))
                .unwrap_or(0.0)
            })
            .sum();
        assert_eq!(refused_here as usize, 36 - sc.free);
    }
}

/// A session admitted on one node is listed on another with its node, killed there by id, and
/// gone from its own node's table (which would end it at its VPN server); a node restarted
/// (kill -9) while its concentrator runs adopts its live sessions and ends them by key.
async fn sessions_are_listed_and_killed_from_any_node_and_a_restart_loses_nothing() {
    let pg = Postgres::start();
    let devices: Vec<Dev> = (0..4)
        .map(|i| Dev::good(&format!("D-{i}"), "alice"))
        .collect();
    let fa = node(&pg, "pforte", "gwa", 60, Setup::default(), &devices);
    let fb = node(&pg, "pforte", "gwb", 60, Setup::default(), &devices);
    let a = fa.start();
    let b = fb.start();
    let mut ca = a.client().await;
    let (_, r) = ca
        .connect_request(&connect_req(&devices[0], "alice", "k1"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "allowed");
    let id = r.session_id.clone().unwrap();
    assert_eq!(a.metric("pforte_seats_used"), Some(1.0));
    assert_eq!(listed(&b), vec![("gwa".to_string(), id.clone())]);
    let (status, body) =
        http(b.port, "DELETE", &format!("/v1/sessions/{id}"), &auth(), "").unwrap();
    assert_eq!(status, 200, "{body}");
    wait_for(
        "node a to drop the session killed on node b",
        Duration::from_secs(5),
        || a.metric("pforte_seats_used") == Some(0.0),
    );
    assert_eq!(
        pg.psql("pforte", "SELECT count(*) FROM pforte_sessions"),
        "0"
    );
    assert!(a.log().contains("session ended elsewhere in the cluster"));

    // A restart of node a while its sessions live.
    let (_, r) = ca
        .connect_request(&connect_req(&devices[1], "alice", "k2"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "allowed");
    let id2 = r.session_id.clone().unwrap();
    drop(ca);
    drop(a); // SIGKILL
    let a = fa.start();
    assert_eq!(
        a.metric("pforte_seats_used"),
        Some(1.0),
        "adopted from the database"
    );
    assert_eq!(listed(&a), vec![("gwa".to_string(), id2.clone())]);
    let mut ca = a.client().await;
    let (status, v) = ca
        .disconnect_request(&pforte::wire::DisconnectRequest {
            vpn: "openvpn".into(),
            instance: "office-udp".into(),
            session_key: "k2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    pg.wait_query(
        "pforte",
        "SELECT count(*) FROM pforte_sessions",
        Duration::from_secs(3),
        |o| o == "0",
    );
    assert_eq!(
        pg.psql("pforte", "SELECT count(*) FROM pforte_sessions"),
        "0"
    );
    assert_eq!(
        pg.psql("pforte", "SELECT n FROM pforte_counts WHERE kind = 't'"),
        "0"
    );
}

/// kill -9 of a node: its sessions stay (its concentrator may live); once its lease has lapsed
/// another node ends them, counts and audits it, and the seats are free for the others.
async fn a_node_killed_hard_loses_its_seats_once_its_lease_lapses() {
    let pg = Postgres::start();
    let devices: Vec<Dev> = (0..8)
        .map(|i| Dev::good(&format!("D-{i}"), "alice"))
        .collect();
    let setup = Setup {
        max_sessions: 4,
        per_user: 0,
        ..Setup::default()
    };
    let fa = node(&pg, "pforte", "gwa", 3, setup.clone(), &devices);
    let fb = node(&pg, "pforte", "gwb", 3, setup.clone(), &devices);
    let fc = node(&pg, "pforte", "gwc", 3, setup, &devices);
    let a = fa.start();
    let b = fb.start();
    let c = fc.start();
    let mut cb = b.client().await;
    for (i, dev) in devices.iter().enumerate().take(4) {
        let (_, r) = cb
            .connect_request(&connect_req(dev, "alice", &format!("b{i}")))
            .await
            .unwrap();
        assert_eq!(reason(&r), "allowed");
    }
    let mut ca = a.client().await;
    let (_, r) = ca
        .connect_request(&connect_req(&devices[4], "alice", "a0"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "capacity_full");
    drop(cb);
    let killed_at = Instant::now();
    drop(b); // SIGKILL
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        pg.psql(
            "pforte",
            "SELECT count(*) FROM pforte_sessions WHERE node = 'gwb'"
        ),
        "4",
        "a node silent for less than its lease keeps its sessions"
    );
    pg.wait_query(
        "pforte",
        "SELECT count(*) FROM pforte_sessions WHERE node = 'gwb'",
        Duration::from_secs(10),
        |o| o == "0",
    );
    let took = killed_at.elapsed();
    // The lease ran 3 s from the node's last heartbeat, at most 1 s (lease_s / 3) before the kill.
    assert!(
        took >= Duration::from_secs(2),
        "ended after {took:?}, before the lease of 3 s lapsed"
    );
    assert!(took <= Duration::from_secs(7), "ended only after {took:?}");
    wait_for("the expiry counted", Duration::from_secs(3), || {
        a.metric("pforte_cluster_sessions_expired_total")
            .unwrap_or(0.0)
            + c.metric("pforte_cluster_sessions_expired_total")
                .unwrap_or(0.0)
            == 4.0
    });
    let audits = std::fs::read_to_string(fa.path("state/audit.log")).unwrap_or_default()
        + &std::fs::read_to_string(fc.path("state/audit.log")).unwrap_or_default();
    assert_eq!(
        audits.matches("lease of node gwb lapsed").count(),
        4,
        "{audits}"
    );
    wait_for(
        "node a sees gwb's lease lapsed",
        Duration::from_secs(3),
        || a.metric("pforte_cluster_node_lease_ok{node=\"gwb\"}") == Some(0.0),
    );
    assert_eq!(
        a.metric("pforte_cluster_node_lease_ok{node=\"gwa\"}"),
        Some(1.0)
    );
    let (_, r) = ca
        .connect_request(&connect_req(&devices[4], "alice", "a1"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "allowed", "the lapsed node's seats are free");
    assert_eq!(
        pg.psql("pforte", "SELECT n FROM pforte_counts WHERE kind = 't'"),
        "1"
    );
}

/// PostgreSQL stopped and started while two nodes take a storm of connects (fail mode closed):
/// connects are refused with store_unavailable while it is gone, each answered within the
/// hook's 2 s; every connect acknowledged is in the database and no refused one is; the nodes
/// recover without a restart, and `pforte_store_healthy` says so.
async fn postgres_stopped_and_started_during_a_storm() {
    let pg = Postgres::start();
    let devices: Vec<Dev> = (0..2)
        .map(|i| Dev::good(&format!("D-{i}"), "alice"))
        .collect();
    let setup = storm_setup();
    let fixtures: Vec<Fixture> = ["gwa", "gwb"]
        .iter()
        .map(|n| node(&pg, "pforte", n, 60, setup.clone(), &devices))
        .collect();
    let nodes: Vec<Daemon> = fixtures.iter().map(Fixture::start).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storms: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(n, d)| paced_storm(d, &devices[n], &format!("n{n}"), &stop))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pg_ref = &pg;
    tokio::task::block_in_place(|| pg_ref.stop_server());
    let stopped_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let healthy_while_down: Vec<Option<f64>> = nodes
        .iter()
        .map(|d| d.metric("pforte_store_healthy"))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| pg_ref.start_server());
    let started_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let answers = stop_storms(&stop, storms).await;
    assert_eq!(healthy_while_down, vec![Some(0.0), Some(0.0)]);
    assert_answered_within_the_hooks_timeout(&answers, &nodes[0]);
    let refused: Vec<&ConnectResponse> = answers
        .iter()
        .map(|(_, _, r)| r)
        .filter(|r| r.decision != Decision::Allow)
        .collect();
    assert!(!refused.is_empty());
    assert!(
        refused.iter().all(|r| reason(r) == "store_unavailable"),
        "{:?}\n{}",
        {
            let mut runs: Vec<(String, usize)> = Vec::new();
            for (_, _, r) in &answers {
                match runs.last_mut() {
                    Some((w, n)) if *w == reason(r) => *n += 1,
                    _ => runs.push((reason(r), 1)),
                }
            }
            runs
        },
        nodes[0].log()
    );
    // Refused only around the outage; admitting again soon after PostgreSQL is back.
    for (at, _, r) in &answers {
        if r.decision != Decision::Allow {
            assert!(
                *at + Duration::from_secs(2) >= stopped_at
                    && *at <= started_at + Duration::from_secs(3)
            );
        }
    }
    let late_allowed = admitted_after(&answers, started_at + Duration::from_secs(3));
    assert!(
        late_allowed > 10,
        "recovered: {late_allowed} admitted after the restart"
    );
    assert_holds_exactly_the_acknowledged(&pg, &answers);
    for d in &nodes {
        assert_eq!(d.metric("pforte_store_healthy"), Some(1.0));
        assert!(d.log().contains("PostgreSQL reachable again"));
    }
}

/// Capacity is cluster-wide, with one source of truth: the limits of the node that started (or
/// reloaded) last are in force everywhere, and a node whose config differs says so in a metric
/// and its log. A node on PostgreSQL exports every cluster metric.
async fn the_last_node_started_sets_the_limits_and_a_differing_node_says_so() {
    let pg = Postgres::start();
    let devices: Vec<Dev> = (0..6)
        .map(|i| Dev::good(&format!("D-{i}"), "alice"))
        .collect();
    let fa = node(
        &pg,
        "pforte",
        "gwa",
        3,
        Setup {
            max_sessions: 5,
            per_user: 0,
            ..Setup::default()
        },
        &devices,
    );
    let fb = node(
        &pg,
        "pforte",
        "gwb",
        3,
        Setup {
            max_sessions: 3,
            per_user: 0,
            ..Setup::default()
        },
        &devices,
    );
    let a = fa.start();
    let b = fb.start();
    wait_for("node a to see the mismatch", Duration::from_secs(5), || {
        a.metric("pforte_cluster_config_mismatch") == Some(1.0)
    });
    assert_eq!(b.metric("pforte_cluster_config_mismatch"), Some(0.0));
    assert!(a.log().contains("differ from the cluster's limits"));
    let mut ca = a.client().await;
    let mut got = Vec::new();
    for (i, dev) in devices.iter().enumerate().take(4) {
        let (_, r) = ca
            .connect_request(&connect_req(dev, "alice", &format!("a{i}")))
            .await
            .unwrap();
        got.push(reason(&r));
    }
    assert_eq!(
        got,
        ["allowed", "allowed", "allowed", "capacity_full"],
        "node b's 3 seats apply on node a"
    );
    wait_for("cluster metrics", Duration::from_secs(5), || {
        a.metric("pforte_cluster_seats_used") == Some(3.0)
    });
    let text = a.metrics();
    for m in crate::common::postgres::CLUSTER_METRICS {
        assert!(
            text.lines().any(|l| l.starts_with(m)),
            "{m} not exported:\n{text}"
        );
    }
    assert_eq!(a.metric("pforte_cluster_sessions{node=\"gwa\"}"), Some(3.0));
    assert_eq!(
        a.metric("pforte_cluster_node_info{node=\"gwa\"}"),
        Some(1.0)
    );
}

/// Fail mode open: with PostgreSQL gone a connect is admitted on this node's word alone, and
/// recorded in the shared store once it is back.
async fn fail_open_admits_without_the_database_and_records_later() {
    let pg = Postgres::start();
    let devices = [Dev::good("D-0", "alice"), Dev::good("D-1", "alice")];
    let mut setup = Setup::default();
    setup
        .env
        .push(("PFORTE_STORE__FAIL_MODE".into(), "open".into()));
    let f = node(&pg, "pforte", "gwa", 60, setup, &devices);
    let d = f.start();
    let mut c = d.client().await;
    let (_, r) = c
        .connect_request(&connect_req(&devices[0], "alice", "k0"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "allowed");
    let pg_ref = &pg;
    tokio::task::block_in_place(|| pg_ref.stop_server());
    let t = Instant::now();
    let (_, r) = c
        .connect_request(&connect_req(&devices[1], "alice", "k1"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "allowed", "{}", d.log());
    assert!(t.elapsed() < Duration::from_secs(2));
    let id = r.session_id.unwrap();
    assert_eq!(d.metric("pforte_store_healthy"), Some(0.0));
    tokio::task::block_in_place(|| pg_ref.start_server());
    let got = pg.wait_query(
        "pforte",
        &format!("SELECT count(*) FROM pforte_sessions WHERE id = '{id}'"),
        Duration::from_secs(10),
        |o| o == "1",
    );
    assert_eq!(got, "1", "recorded once PostgreSQL is back\n{}", d.log());
    assert_eq!(
        pg.psql("pforte", "SELECT n FROM pforte_counts WHERE kind = 't'"),
        "2"
    );
}

/// PostgreSQL gone for longer than the lease: every lease looks lapsed when it is back, but the
/// live nodes renew theirs before anyone ends a session (a node expires others only after a
/// whole lease of its own renewals), so nothing is ended.
async fn a_database_outage_longer_than_the_lease_ends_no_live_session() {
    let pg = Postgres::start();
    let devices = [Dev::good("D-0", "alice"), Dev::good("D-1", "bob")];
    let fa = node(&pg, "pforte", "gwa", 3, Setup::default(), &devices);
    let fb = node(&pg, "pforte", "gwb", 3, Setup::default(), &devices);
    let a = fa.start();
    let b = fb.start();
    for (d, dev, user) in [(&a, &devices[0], "alice"), (&b, &devices[1], "bob")] {
        let mut c = d.client().await;
        let (_, r) = c
            .connect_request(&connect_req(dev, user, "k"))
            .await
            .unwrap();
        assert_eq!(reason(&r), "allowed");
    }
    let pg_ref = &pg;
    tokio::task::block_in_place(|| pg_ref.stop_server());
    tokio::time::sleep(Duration::from_secs(5)).await;
    tokio::task::block_in_place(|| pg_ref.start_server());
    // Longer than a lease after the database is back: a dead node would be expired by now.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        pg.psql("pforte", "SELECT count(*) FROM pforte_sessions"),
        "2"
    );
    for d in [&a, &b] {
        assert_eq!(d.metric("pforte_cluster_sessions_expired_total"), Some(0.0));
        assert_eq!(d.metric("pforte_seats_used"), Some(1.0));
        assert_eq!(
            d.metric("pforte_cluster_node_lease_ok{node=\"gwa\"}"),
            Some(1.0)
        );
    }
}

/// A database created by an older pforte (schema version 1, `pforte_bump` in SQL) is migrated
/// by the first node that starts: version 2, `pforte_bump` in PL/pgSQL, the live session and the
/// counts kept, and connects admitted and counted as before.
async fn a_version_1_schema_is_migrated_and_keeps_its_sessions() {
    let pg = Postgres::start();
    let devices: Vec<Dev> = (0..3)
        .map(|i| Dev::good(&format!("D-{i}"), "alice"))
        .collect();
    let setup = Setup {
        per_user: 0,
        ..Setup::default()
    };
    let fa = node(&pg, "pforte", "gwa", 30, setup, &devices);
    let a = fa.start();
    let (s, r) = a
        .client()
        .await
        .connect_request(&connect_req(&devices[0], "alice", "k0"))
        .await
        .unwrap();
    assert_eq!(s, 200, "{r:?}");
    drop(a);
    let lang = "SELECT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE p.proname = 'pforte_bump'";
    assert_eq!(
        pg.psql("pforte", "SELECT version FROM pforte_schema")
            .trim(),
        "2"
    );
    assert_eq!(pg.psql("pforte", lang).trim(), "plpgsql");
    // Back to what version 1 left.
    pg.psql(
        "pforte",
        "UPDATE pforte_schema SET version = 1;
         CREATE OR REPLACE FUNCTION pforte_bump(p_ous text[], p_users text[], p_sign integer) RETURNS void
         LANGUAGE sql AS $f$
            INSERT INTO pforte_counts (kind, key, n)
                SELECT 't', '', p_sign * cardinality(p_ous) WHERE cardinality(p_ous) > 0
                UNION ALL SELECT 'o', k, p_sign * count(*) FROM unnest(p_ous) k GROUP BY k
                UNION ALL SELECT 'u', k, p_sign * count(*) FROM unnest(p_users) k GROUP BY k
            ON CONFLICT (kind, key) DO UPDATE SET n = pforte_counts.n + excluded.n;
         $f$;",
    );
    assert_eq!(pg.psql("pforte", lang).trim(), "sql");
    let a = fa.start();
    assert_eq!(
        pg.psql("pforte", "SELECT version FROM pforte_schema")
            .trim(),
        "2"
    );
    assert_eq!(pg.psql("pforte", lang).trim(), "plpgsql");
    assert_eq!(listed(&a).len(), 1);
    let (s, r) = a
        .client()
        .await
        .connect_request(&connect_req(&devices[1], "alice", "k1"))
        .await
        .unwrap();
    assert_eq!(s, 200, "{r:?}");
    assert_eq!(listed(&a).len(), 2);
    assert_eq!(
        pg.psql("pforte", "SELECT n FROM pforte_counts WHERE kind = 't'")
            .trim(),
        "2"
    );
}

/// Every admission is on disk before it is answered: forty connects one after another (each
/// answered before the next is sent) cost PostgreSQL at least forty WAL flushes. A pforte whose
/// flush statement wrote no WAL had PostgreSQL commit it without one (its syncs came from
/// the WAL writer, a few per second) and answered connects that a crash of the server could
/// still lose.
async fn every_admission_is_flushed_to_disk_before_it_is_answered() {
    const N: usize = 40;
    let pg = Postgres::start();
    let devices: Vec<Dev> = (0..N)
        .map(|i| Dev::good(&format!("D-{i}"), "alice"))
        .collect();
    let setup = Setup {
        per_user: 0,
        ..Setup::default()
    };
    let fa = node(&pg, "pforte", "gwa", 60, setup, &devices);
    let syncs = |out: &str| out.trim().parse::<u64>().unwrap_or(0);
    let before = syncs(&pg.psql("pforte", "SELECT wal_sync FROM pg_stat_wal"));
    let a = fa.start();
    let mut c = a.client().await;
    for (i, dev) in devices.iter().enumerate() {
        let (_, r) = c
            .connect_request(&connect_req(dev, "alice", &format!("k{i}")))
            .await
            .unwrap();
        assert_eq!(reason(&r), "allowed");
    }
    drop(c);
    // A backend reports its counts when it ends: the node's connections end with the node.
    drop(a);
    let after = pg.wait_query(
        "pforte",
        "SELECT wal_sync FROM pg_stat_wal",
        Duration::from_secs(10),
        |o| syncs(o) >= before + N as u64,
    );
    assert!(
        syncs(&after) >= before + N as u64,
        "{N} connects answered one at a time, {} WAL flushes",
        syncs(&after) - before
    );
    assert_eq!(
        pg.psql("pforte", "SELECT count(*) FROM pforte_sessions"),
        N.to_string()
    );
}

/// A role that may not send a logical message (each batch waits for its WAL flush with one)
/// is refused at start, with what to grant, instead of refusing every connect later.
async fn a_role_that_cannot_wait_for_the_flush_is_refused_at_start() {
    let pg = Postgres::start();
    let pw = std::fs::read_to_string(pg.password_file()).unwrap();
    pg.psql(
        "postgres",
        &format!("CREATE ROLE lowly LOGIN PASSWORD '{}'", pw.trim()),
    );
    pg.psql("postgres", "CREATE DATABASE lowdb OWNER lowly");
    pg.psql(
        "lowdb",
        "REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC",
    );
    let devices = [Dev::good("D-0", "alice")];
    let mut f = node(&pg, "lowdb", "gwa", 30, Setup::default(), &devices);
    f.setup.env.push((
        "PFORTE_STORE__URL".into(),
        pg.url("lowdb").replacen("pforte@", "lowly@", 1),
    ));
    let err_file = f.path("refused.err");
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(f.config())
        .envs(f.setup.env.iter().cloned())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = std::fs::read_to_string(&err_file).unwrap_or_default();
    assert!(
        status.is_some_and(|s| !s.success()),
        "still running or succeeded: {status:?}\n{stderr}"
    );
    assert!(
        stderr.contains("GRANT EXECUTE ON FUNCTION pg_logical_emit_message"),
        "{stderr}"
    );
    // Granted, the same node starts and admits.
    pg.psql(
        "lowdb",
        "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO lowly",
    );
    let d = f.start();
    let (_, r) = d
        .client()
        .await
        .connect_request(&connect_req(&devices[0], "alice", "k0"))
        .await
        .unwrap();
    assert_eq!(reason(&r), "allowed");
}

/// The primary fails over mid-storm to a synchronous standby that is promoted: the node, given
/// both hosts with `target_session_attrs=read-write`, follows to the new primary by itself;
/// connects in between are refused `store_unavailable`; every connect acknowledged before the
/// crash is on the new primary (each answer waited for the standby's flush), and nothing
/// refused is kept there.
async fn a_failover_to_a_promoted_standby_is_followed_and_loses_nothing_acknowledged() {
    let primary = Postgres::start();
    let standby = Postgres::standby_of(&primary);
    primary.psql(
        "postgres",
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
    );
    primary.psql("postgres", "SELECT pg_reload_conf()");
    let sync = primary.wait_query(
        "postgres",
        "SELECT sync_state FROM pg_stat_replication",
        Duration::from_secs(10),
        |o| o == "sync",
    );
    assert_eq!(sync, "sync", "the standby streams synchronously");
    let dev = Dev::good("D-0", "alice");
    let setup = storm_setup();
    let mut f = node(
        &primary,
        "pforte",
        "gwa",
        60,
        setup,
        std::slice::from_ref(&dev),
    );
    f.setup.env.push((
        "PFORTE_STORE__URL".into(),
        format!(
            "postgresql://pforte@127.0.0.1:{},127.0.0.1:{}/pforte?target_session_attrs=read-write",
            primary.port, standby.port
        ),
    ));
    let d = f.start();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storms = vec![paced_storm(&d, &dev, "k", &stop)];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let crashed_at = Instant::now();
    tokio::task::block_in_place(|| {
        primary.crash();
        standby.promote();
    });
    let promoted_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let answers = stop_storms(&stop, storms).await;
    let before_crash = answers
        .iter()
        .filter(|(at, took, r)| *at + *took < crashed_at && r.decision == Decision::Allow)
        .count();
    assert!(
        before_crash > 50,
        "{before_crash} admitted before the crash"
    );
    let refused: Vec<String> = answers
        .iter()
        .filter(|(_, _, r)| r.decision != Decision::Allow)
        .map(|(_, _, r)| reason(r))
        .collect();
    assert!(
        refused.iter().all(|r| r == "store_unavailable"),
        "{refused:?}\n{}",
        d.log()
    );
    let late_allowed = admitted_after(&answers, promoted_at + Duration::from_secs(3));
    assert!(
        late_allowed > 10,
        "followed to the new primary: {late_allowed} admitted 3 s after the promotion\n{}",
        d.log()
    );
    assert_holds_exactly_the_acknowledged(&standby, &answers);
    assert_eq!(d.metric("pforte_store_healthy"), Some(1.0));
}

/// A hung database (every PostgreSQL process stopped with SIGSTOP, so connections stay open and
/// nothing answers) never holds a connect longer than the hook's own 2 s: each is answered
/// within the statement timeout (1.5 s by default) and refused `store_unavailable`; once the
/// database goes on, the node admits again without a restart, and the database holds exactly
/// the connects acknowledged.
async fn a_hung_database_never_holds_a_connect_beyond_the_hooks_timeout() {
    let pg = Postgres::start();
    let devices: Vec<Dev> = (0..4)
        .map(|i| Dev::good(&format!("D-{i}"), "alice"))
        .collect();
    let setup = storm_setup();
    let f = node(&pg, "pforte", "gwa", 60, setup, &devices);
    let d = f.start();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Four clients at once: connects arrive while a batch hangs, and wait behind it.
    let storms: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(n, dev)| paced_storm(&d, dev, &format!("c{n}"), &stop))
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    pg.freeze();
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    pg.thaw();
    let thawed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let answers = stop_storms(&stop, storms).await;
    assert_answered_within_the_hooks_timeout(&answers, &d);
    let refused: Vec<String> = answers
        .iter()
        .filter(|(_, _, r)| r.decision != Decision::Allow)
        .map(|(_, _, r)| reason(r))
        .collect();
    assert!(!refused.is_empty(), "refused while the database hung");
    assert!(
        refused.iter().all(|r| r == "store_unavailable"),
        "{refused:?}"
    );
    assert!(
        admitted_after(&answers, frozen_at - Duration::from_secs(1)) > 10,
        "admitted before the freeze"
    );
    let late = admitted_after(&answers, thawed_at + Duration::from_secs(4));
    assert!(
        late > 10,
        "admitting again after the thaw: {late}\n{}",
        d.log()
    );
    assert_holds_exactly_the_acknowledged(&pg, &answers);
}

pub fn tests() -> Vec<Case> {
    vec![
        trial!(async(2) the_oversell_race_admits_exactly_the_free_seats_for_every_limit, needs: [NEEDS[0], NEEDS[1], NEEDS[2]]),
        trial!(async(2) sessions_are_listed_and_killed_from_any_node_and_a_restart_loses_nothing, needs: [NEEDS[0], NEEDS[1], NEEDS[2]]),
        trial!(async(2) a_node_killed_hard_loses_its_seats_once_its_lease_lapses, needs: [NEEDS[0], NEEDS[1], NEEDS[2]]),
        trial!(async(2) postgres_stopped_and_started_during_a_storm, needs: [NEEDS[0], NEEDS[1], NEEDS[2]]),
        trial!(async(2) the_last_node_started_sets_the_limits_and_a_differing_node_says_so, needs: [NEEDS[0], NEEDS[1], NEEDS[2]]),
        trial!(async(2) fail_open_admits_without_the_database_and_records_later, needs: [NEEDS[0], NEEDS[1], NEEDS[2]]),
        trial!(async(2) a_database_outage_longer_than_the_lease_ends_no_live_session, needs: [NEEDS[0], NEEDS[1], NEEDS[2]]),
        trial!(async(2) a_version_1_schema_is_migrated_and_keeps_its_sessions, needs: [NEEDS[0], NEEDS[1], NEEDS[2]]),
        trial!(async(2) every_admission_is_flushed_to_disk_before_it_is_answered, needs: [NEEDS[0], NEEDS[1], NEEDS[2]]),
        trial!(async(2) a_role_that_cannot_wait_for_the_flush_is_refused_at_start, needs: [NEEDS[0], NEEDS[1], NEEDS[2]]),
        trial!(async(2) a_hung_database_never_holds_a_connect_beyond_the_hooks_timeout, needs: [NEEDS[0], NEEDS[1], NEEDS[2]]),
        trial!(async(2) a_failover_to_a_promoted_standby_is_followed_and_loses_nothing_acknowledged, needs: [NEEDS[0], NEEDS[1], NEEDS[2], Need::Tool("pg_basebackup", "postgresql")]),
    ]
}
