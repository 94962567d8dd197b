//! The RADIUS front end to end with a real concentrator: ocserv 1.1 with `auth = radius` and
//! `acct = radius` (radcli) asking pforte's RADIUS front, and real `openconnect` clients logging in
//! with a user name and a password from their own network namespaces. A small recording relay sits
//! between ocserv and pforte so that the tests can show (and assert) what ocserv really sends.
//!
//! ocserv's requests carry no device identity (User-Name, the client's address in
//! Calling-Station-Id, NAS-Identifier, …), so the NAS is configured with `missing_device =
//! "skip-device-checks"`: the person, level and zone checks decide. ocserv 1.1 does not implement
//! RFC 5176 (no Disconnect-Request/CoA listener): a revoked session's Disconnect-Request times
//! out, pforte frees the seat and counts the timeout, and the tunnel stays up until ocserv ends it
//! for its own reasons. That limitation is asserted here, not hidden; what does bound such a
//! tunnel is the Accept's `Session-Timeout`, which ocserv enforces with `groupconfig=true`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pforte::vpn::radius::{Packet, attr};

use crate::common::harness::{Case, Need, trial};
use crate::common::ocserv::{OcClient, OcservServer, RadiusNas};
use crate::common::openvpn::{ClientNs, Pki};
use crate::common::*;

const UP: Duration = Duration::from_secs(25);
const SECRET: &str = "ocserv-radius-e2e-secret";
const NAS: &str = "ocserv-1";
/// The standard RFC 5176 port, where ocserv would listen if it took Disconnect-Requests.
const DAE_PORT: u16 = 3799;
/// ocserv's `stats-report-time`.
const INTERIM_S: u32 = 2;

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request seen by the relay: its code and its attributes as `Name=value`.
#[derive(Clone, Debug)]
struct Seen {
    code: u8,
    attrs: Vec<(u8, String)>,
}

impl Seen {
    fn has(&self, kind: u8) -> bool {
        self.attrs.iter().any(|(k, _)| *k == kind)
    }

    fn value(&self, kind: u8) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_str())
    }

    fn describe(&self) -> String {
        let names = self
            .attrs
            .iter()
            .map(|(k, v)| format!("{}={v}", attr_name(*k)))
            .collect::<Vec<_>>()
            .join(", ");
        format!("code {}: {names}", self.code)
    }
}

fn attr_name(kind: u8) -> String {
    let name = match kind {
        attr::USER_NAME => "User-Name",
        attr::USER_PASSWORD => "User-Password",
        attr::NAS_IP_ADDRESS => "NAS-IP-Address",
        attr::NAS_PORT => "NAS-Port",
        attr::SERVICE_TYPE => "Service-Type",
        attr::FRAMED_PROTOCOL => "Framed-Protocol",
        attr::FRAMED_IP_ADDRESS => "Framed-IP-Address",
        attr::CLASS => "Class",
        attr::VENDOR_SPECIFIC => "Vendor-Specific",
        attr::CALLED_STATION_ID => "Called-Station-Id",
        attr::CALLING_STATION_ID => "Calling-Station-Id",
        attr::NAS_IDENTIFIER => "NAS-Identifier",
        attr::ACCT_STATUS_TYPE => "Acct-Status-Type",
        attr::ACCT_DELAY_TIME => "Acct-Delay-Time",
        attr::ACCT_INPUT_OCTETS => "Acct-Input-Octets",
        attr::ACCT_OUTPUT_OCTETS => "Acct-Output-Octets",
        attr::ACCT_SESSION_ID => "Acct-Session-Id",
        attr::ACCT_SESSION_TIME => "Acct-Session-Time",
        attr::ACCT_TERMINATE_CAUSE => "Acct-Terminate-Cause",
        attr::ACCT_INPUT_GIGAWORDS => "Acct-Input-Gigawords",
        attr::ACCT_OUTPUT_GIGAWORDS => "Acct-Output-Gigawords",
        attr::EVENT_TIMESTAMP => "Event-Timestamp",
        attr::NAS_PORT_TYPE => "NAS-Port-Type",
        attr::CONNECT_INFO => "Connect-Info",
        attr::MESSAGE_AUTHENTICATOR => "Message-Authenticator",
        45 => "Acct-Authentic",
        95 => "NAS-IPv6-Address",
        _ => return format!("attr-{kind}"),
    };
    name.to_string()
}

fn show_value(kind: u8, v: &[u8]) -> String {
    match kind {
        attr::USER_PASSWORD | attr::MESSAGE_AUTHENTICATOR => "<hidden>".into(),
        _ if v.len() == 4 && !v.iter().all(|b| b.is_ascii_graphic()) => {
            if matches!(kind, attr::NAS_IP_ADDRESS | attr::FRAMED_IP_ADDRESS) {
                format!("{}.{}.{}.{}", v[0], v[1], v[2], v[3])
            } else {
                u32::from_be_bytes([v[0], v[1], v[2], v[3]]).to_string()
            }
        }
        _ if v.iter().all(|b| b.is_ascii_graphic() || *b == b' ') => {
            String::from_utf8_lossy(v).into_owned()
        }
        _ => format!(
            "0x{}",
            v.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

/// A UDP relay between ocserv and one of pforte's ports that records every request; stopped on
/// drop.
struct Relay {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(to: u16) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(("127.0.0.1", to)).unwrap();
        front
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        back.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let port = front.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut waiting: std::collections::HashMap<u8, SocketAddr> = Default::default();
            let mut buf = [0u8; 4096];
            // Ends when the relay is dropped.
            while !st2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    if let Ok(p) = Packet::decode(&buf[..n]) {
                        s2.lock().unwrap().push(Seen {
                            code: p.code as u8,
                            attrs: p
                                .attributes
                                .iter()
                                .map(|a| (a.kind, show_value(a.kind, &a.value)))
                                .collect(),
                        });
                    }
                    if n >= 2 {
                        waiting.insert(buf[1], from);
                    }
                    let _ = back.send(&buf[..n]);
                }
                if let Ok(n) = back.recv(&mut buf)
                    && n >= 2
                    && let Some(to) = waiting.get(&buf[1])
                {
                    let _ = front.send_to(&buf[..n], to);
                }
            }
        });
        Relay {
            port,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// ocserv asking pforte over RADIUS. Fields drop in order: the server first, then the relays,
/// the daemon and the files.
struct Rig {
    server: OcservServer,
    auth: Relay,
    acct: Relay,
    daemon: Daemon,
    fixture: Fixture,
    _pki_dir: tempfile::TempDir,
}

impl Rig {
    fn start() -> Rig {
        Self::start_with("", false)
    }

    /// With extra keys in `[radius]`, and ocserv's `groupconfig`.
    fn start_with(radius_keys: &str, groupconfig: bool) -> Rig {
        let pki_dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(&pki_dir.path().join("pki")).unwrap();
        let setup = Setup {
            token: true,
            ..Setup::default()
        };
        let mut fixture = Fixture::new(setup, &[Dev::good("placeholder", "alice")]);
        let secret = fixture.path("nas.secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        let (auth_port, acct_port) = (free_udp_port(), free_udp_port());
        // A zone of its own without a pforte pool: ocserv assigns the addresses
        // (with `groupconfig=false` it applies nothing from the Accept).
        fixture.setup.extra = format!(
            r#"
[[zones]]
name = "ssl"
level = 1
routes = ["10.1.0.0/16"]

[radius]
auth_listen = "127.0.0.1:{auth_port}"
acct_listen = "127.0.0.1:{acct_port}"
missing_device = "skip-device-checks"
dae_timeout_ms = 500
{radius_keys}

[[radius.clients]]
name = "{NAS}"
address = "127.0.0.1"
secret_file = "{s}"
vendor = "generic"
zone = "ssl"
dae_port = {DAE_PORT}
require_message_authenticator = false
"#,
            s = secret.display()
        );
        fixture.write_config();
        let daemon = fixture.start();
        let auth = Relay::start(auth_port);
        let acct = Relay::start(acct_port);
        let server = OcservServer::start_radius(
            &pki,
            &RadiusNas {
                auth_port: auth.port,
                acct_port: acct.port,
                secret: SECRET.into(),
                interim_s: INTERIM_S,
                groupconfig,
            },
        )
        .unwrap();
        Rig {
            server,
            auth,
            acct,
            daemon,
            fixture,
            _pki_dir: pki_dir,
        }
    }

    fn context(&self) -> String {
        let seen = |r: &Relay| {
            r.seen()
                .iter()
                .map(Seen::describe)
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "--- auth requests ---\n{}\n--- acct requests ---\n{}\n--- ocserv log ---\n{}\n--- pforte log ---\n{}",
            seen(&self.auth),
            seen(&self.acct),
            self.server.log(),
            self.daemon.log()
        )
    }

    fn metric(&self, series: &str) -> f64 {
        self.daemon.metric(series).unwrap_or(0.0)
    }

    fn up(&self, ns: &ClientNs, user: &str) -> OcClient {
        let mut c = OcClient::start_password(ns, user, "secret-pw", &self.server).unwrap();
        if let Err(e) = c.wait_up(UP) {
            panic!("{user} did not connect: {e}\n{}", self.context());
        }
        c
    }

    fn ping(&self, ns: &ClientNs, size: &str, count: &str) -> Result<String, String> {
        self.server.ping_from(ns, size, count)
    }

    /// Waits for `cond`, bounded; panics with the rig's logs and the metrics.
    fn wait(&self, what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !cond() {
            if Instant::now() > deadline {
                let metrics = self.daemon.metrics();
                let ours = metrics
                    .lines()
                    .filter(|l| {
                        !l.starts_with('#')
                            && (l.contains("radius")
                                || l.contains("revoked")
                                || l.contains("seats")
                                || l.contains("reload"))
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!(
                    "timed out after {within:?} waiting for {what}\n--- metrics ---\n{ours}\n{}",
                    self.context()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET /v1/sessions: the list.
    fn sessions(&self) -> Vec<serde_json::Value> {
        let bearer = format!("Bearer {TOKEN}");
        let (status, body) = http(
            self.daemon.port,
            "GET",
            "/v1/sessions",
            &[("Authorization", &bearer)],
            "",
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v.get("sessions")
            .and_then(|s| s.as_array())
            .cloned()
            .or_else(|| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// The accounting requests of one `Acct-Status-Type` (1 Start, 2 Stop, 3 Interim-Update).
    fn acct_of(&self, status: u32) -> Vec<Seen> {
        let s = status.to_string();
        self.acct
            .seen()
            .into_iter()
            .filter(|r| r.value(attr::ACCT_STATUS_TYPE) == Some(s.as_str()))
            .collect()
    }
}

const RECEIVED: &str = "pforte_session_received_bytes_total{org_unit=\"it\",zone=\"ssl\"}";

/// A permitted user logs in with a password through ocserv's `auth = radius`, pings through the
/// tunnel and is listed as a RADIUS session; a user above the remote-work ceiling is refused
/// (openconnect fails, ocserv logs the reason pforte put in Reply-Message, the decision is
/// counted); the bytes of a transfer reach `/metrics` from ocserv's Interim-Updates.
fn radius_ocserv_admits_refuses_and_counts_interim_bytes() {
    let rig = Rig::start();
    let ns = ClientNs::create().unwrap();
    let _client = rig.up(&ns, "alice");
    let out = rig
        .ping(&ns, "56", "3")
        .unwrap_or_else(|e| panic!("no ping through the tunnel: {e}\n{}", rig.context()));
    assert!(out.contains(" 0% packet loss"), "{out}");

    // What ocserv sent: no device identity and (radcli without EAP) no Message-Authenticator.
    let auth = rig.auth.seen();
    let req = auth
        .iter()
        .find(|r| r.value(attr::USER_NAME) == Some("alice"))
        .unwrap_or_else(|| panic!("no Access-Request for alice\n{}", rig.context()));
    eprintln!("ocserv Access-Request: {}", req.describe());
    assert!(req.has(attr::USER_PASSWORD), "{}", req.describe());
    assert!(!req.has(attr::MESSAGE_AUTHENTICATOR), "{}", req.describe());
    assert_eq!(
        req.value(attr::CALLING_STATION_ID),
        Some(ns.ip().to_string().as_str()),
        "{}",
        req.describe()
    );

    rig.wait("Accounting Start", Duration::from_secs(10), || {
        !rig.acct_of(1).is_empty()
    });
    eprintln!("ocserv Accounting Start: {}", rig.acct_of(1)[0].describe());
    rig.wait("the session listed", Duration::from_secs(10), || {
        rig.sessions()
            .iter()
            .any(|s| s["vpn"] == "radius" && s["username"] == "alice")
    });
    let sessions = rig.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["vpn"], "radius", "{sessions:?}");
    assert_eq!(sessions[0]["zone"], "ssl", "{sessions:?}");
    assert_eq!(rig.metric("pforte_seats_used"), 1.0, "{}", rig.context());

    // Refused: dora's org unit works at level 3, above the remote-work ceiling.
    let ns2 = ClientNs::create().unwrap();
    let t0 = Instant::now();
    let mut refused = OcClient::start_password(&ns2, "dora", "secret-pw", &rig.server).unwrap();
    let code = refused
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.context()));
    assert_ne!(code, Some(0), "dora got in:\n{}", refused.log());
    eprintln!(
        "dora refused in {:?}; openconnect said:\n{}",
        t0.elapsed(),
        refused.log()
    );
    // ocserv shows pforte's Reply-Message to the user (as the text of a new password prompt).
    assert!(
        refused
            .log()
            .contains("remote_work_not_permitted: User dora"),
        "{}",
        refused.log()
    );
    assert_eq!(
        rig.metric(
            "pforte_decisions_total{decision=\"deny\",reason=\"remote_work_not_permitted\"}"
        ),
        1.0,
        "{}",
        rig.context()
    );
    assert_eq!(rig.metric("pforte_seats_used"), 1.0);
    assert_eq!(rig.server.user_count(), 1, "{}", rig.context());

    // Interim bytes: ~100 kB through the tunnel reach /metrics within a few report periods.
    let before = rig.metric(RECEIVED);
    let out = rig
        .ping(&ns, "1000", "100")
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.context()));
    assert!(out.contains(" 0% packet loss"), "{out}");
    let t0 = Instant::now();
    // ocserv's workers report their counters on a timer of their own, so the first
    // Interim-Update can come some seconds after `stats-report-time`: bounded at 10 periods.
    let within = Duration::from_secs(u64::from(INTERIM_S) * 10);
    let deadline = Instant::now() + within;
    while rig.metric(RECEIVED) < before + 100_000.0 {
        assert!(
            Instant::now() < deadline,
            "no interim bytes within {within:?}: {} → {}\n{}",
            before,
            rig.metric(RECEIVED),
            rig.context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let interim = rig.acct_of(3);
    assert!(!interim.is_empty(), "{}", rig.context());
    eprintln!(
        "Interim-Updates at Acct-Session-Time {:?}",
        interim
            .iter()
            .map(|r| r.value(attr::ACCT_SESSION_TIME).unwrap_or("?"))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "received bytes {} after {:?}; last Interim-Update: {}",
        rig.metric(RECEIVED),
        t0.elapsed(),
        interim.last().unwrap().describe()
    );
}

/// Revocation: a registry reload moves alice's org unit above the remote-work ceiling. pforte
/// ends the session and sends a Disconnect-Request to ocserv's address; ocserv 1.1 does not
/// implement RFC 5176, so it times out (counted), the seat is freed, and the tunnel stays up
/// (ocserv's later accounting for it frees nothing).
fn radius_ocserv_revocation_frees_the_seat_but_ocserv_ignores_disconnect() {
    let rig = Rig::start();
    let ns = ClientNs::create().unwrap();
    let mut client = rig.up(&ns, "alice");
    rig.ping(&ns, "56", "2")
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.context()));
    rig.wait("Accounting Start", Duration::from_secs(10), || {
        !rig.acct_of(1).is_empty()
    });
    rig.wait("the session listed", Duration::from_secs(10), || {
        rig.sessions().len() == 1
    });
    assert_eq!(rig.metric("pforte_seats_used"), 1.0);

    // alice moves to the social org unit (level 3): the reload revokes her session.
    let users = std::fs::read_to_string(rig.fixture.path("users.csv")).unwrap();
    let tmp = rig.fixture.path("users.csv.tmp");
    std::fs::write(&tmp, users.replace("alice,it,", "alice,social,")).unwrap();
    std::fs::rename(tmp, rig.fixture.path("users.csv")).unwrap();
    let bearer = format!("Bearer {TOKEN}");
    let (status, body) = http(
        rig.daemon.port,
        "POST",
        "/v1/registry/reload",
        &[("Authorization", &bearer)],
        "",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    eprintln!("reload: {body}");
    rig.wait("the session revoked", Duration::from_secs(15), || {
        rig.metric("pforte_sessions_revoked_total{reason=\"remote_work_not_permitted\"}") == 1.0
    });
    let timeout = format!("pforte_radius_disconnects_total{{client=\"{NAS}\",result=\"timeout\"}}");
    rig.wait(
        "the unanswered Disconnect-Request counted",
        Duration::from_secs(10),
        || rig.metric(&timeout) == 1.0,
    );
    for result in ["ack", "nak"] {
        assert_eq!(
            rig.metric(&format!(
                "pforte_radius_disconnects_total{{client=\"{NAS}\",result=\"{result}\"}}"
            )),
            0.0,
            "{}",
            rig.context()
        );
    }
    assert_eq!(rig.metric("pforte_seats_used"), 0.0, "{}", rig.context());
    assert!(rig.sessions().is_empty());

    // The limitation: ocserv did not act on it. The tunnel is still up and carries traffic.
    assert_eq!(rig.server.user_count(), 1, "{}", rig.context());
    rig.ping(&ns, "56", "2")
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.context()));
    // Its Interim-Updates now name a session pforte ended: answered, nothing admitted again.
    let interims = rig.acct_of(3).len();
    rig.wait(
        "another Interim-Update",
        Duration::from_secs(u64::from(INTERIM_S) * 12),
        || rig.acct_of(3).len() > interims,
    );
    assert_eq!(rig.metric("pforte_seats_used"), 0.0, "{}", rig.context());

    // The user ends it herself: ocserv's Stop frees nothing more.
    drop(client.wait_exit(Duration::from_millis(1)));
    drop(client);
    rig.wait("ocserv to drop the user", Duration::from_secs(15), || {
        rig.server.user_count() == 0
    });
    rig.wait("Accounting Stop", Duration::from_secs(10), || {
        !rig.acct_of(2).is_empty()
    });
    eprintln!("ocserv Accounting Stop: {}", rig.acct_of(2)[0].describe());
    assert_eq!(rig.metric("pforte_seats_used"), 0.0, "{}", rig.context());
}

/// What does bound a tunnel ocserv will not end on request: pforte's `Session-Timeout` in the
/// Accept, which ocserv enforces only with `groupconfig=true` (with `false` it ignores the
/// Accept's attributes and the tunnel stays up): the client is dropped, ocserv's Stop
/// (`Acct-Terminate-Cause` = Session-Timeout) frees the seat.
fn radius_ocserv_session_timeout_ends_the_tunnel() {
    let rig = Rig::start_with("session_timeout_s = 4", true);
    let ns = ClientNs::create().unwrap();
    let t0 = Instant::now();
    let mut client = rig.up(&ns, "alice");
    rig.wait("the seat taken", Duration::from_secs(10), || {
        rig.metric("pforte_seats_used") == 1.0
    });
    let code = client
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.context()));
    eprintln!("openconnect ended after {:?} (exit {code:?})", t0.elapsed());
    assert_ne!(code, Some(0));
    rig.wait("Accounting Stop", Duration::from_secs(10), || {
        !rig.acct_of(2).is_empty()
    });
    let stop = &rig.acct_of(2)[0];
    eprintln!("ocserv Accounting Stop: {}", stop.describe());
    assert_eq!(
        stop.value(attr::ACCT_TERMINATE_CAUSE),
        Some("5"),
        "{}",
        stop.describe()
    );
    rig.wait("the seat freed", Duration::from_secs(10), || {
        rig.metric("pforte_seats_used") == 0.0
    });
}

pub fn tests() -> Vec<Case> {
    vec![
        trial!(radius_ocserv_admits_refuses_and_counts_interim_bytes, needs: [Need::OpenVpn, Need::Tool("ocserv", "ocserv"), Need::Tool("openconnect", "openconnect")]),
        trial!(radius_ocserv_revocation_frees_the_seat_but_ocserv_ignores_disconnect, needs: [Need::OpenVpn, Need::Tool("ocserv", "ocserv"), Need::Tool("openconnect", "openconnect")]),
        trial!(radius_ocserv_session_timeout_ends_the_tunnel, needs: [Need::OpenVpn, Need::Tool("ocserv", "ocserv"), Need::Tool("openconnect", "openconnect")]),
    ]
}
