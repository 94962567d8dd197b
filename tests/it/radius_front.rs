//! The RADIUS front end to end: the real `pforte serve` with `[radius]`, FreeRADIUS's `radclient`
//! as Cisco-, Palo Alto- and FortiGate-shaped concentrators (with FreeRADIUS's own vendor
//! dictionaries, source addresses set with `Packet-Src-IP-Address`), and hostile datagrams of our
//! own over UDP.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use pforte::vpn::radius::{Code, Packet, Secret, attr, auth};

use crate::common::harness::{Case, Need, trial};
use crate::common::{Dev, Fixture, Setup, TOKEN, have_tool, http, metric_value, wait_for};

pub const SECRET: &str = "radius-front-test-secret";

/// A free UDP port on loopback.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A registry device with RADIUS identifiers.
pub struct RDev {
    pub id: &'static str,
    pub ownership: &'static str,
    pub status: &'static str,
    pub org_unit: &'static str,
    pub clearance: u8,
    pub encrypted: bool,
    pub patched_days_ago: i64,
    pub hwaddr: &'static str,
    pub users: &'static str,
    pub device_uid: &'static str,
    pub hostname: &'static str,
}

impl RDev {
    pub const fn good(id: &'static str, uid: &'static str, user: &'static str) -> RDev {
        RDev {
            id,
            ownership: "service",
            status: "active",
            org_unit: "it",
            clearance: 1,
            encrypted: true,
            patched_days_ago: 3,
            hwaddr: "",
            users: user,
            device_uid: uid,
            hostname: "",
        }
    }
}

/// Writes the device registry with the device_uid and hostname columns.
pub fn write_radius_devices(f: &Fixture, devices: &[RDev]) {
    let today = chrono::Utc::now().date_naive();
    let mut csv = String::from(
        "device_id,ownership,status,org_unit,clearance,disk_encrypted,patched_on,cert_sha256,cert_serial,hwaddr,users,device_uid,hostname\n",
    );
    for d in devices {
        let patched = today - chrono::Duration::days(d.patched_days_ago);
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},,,{},{},{},{}\n",
            d.id,
            d.ownership,
            d.status,
            d.org_unit,
            d.clearance,
            d.encrypted,
            patched,
            d.hwaddr,
            d.users,
            d.device_uid,
            d.hostname
        ));
    }
    std::fs::write(f.path("devices.csv"), csv).unwrap();
}

/// Ports of a daemon's RADIUS front.
#[derive(Clone, Copy)]
pub struct Ports {
    pub auth: u16,
    pub acct: u16,
    pub dae: u16,
}

/// A fixture with `[radius]`: cisco at 127.0.0.1, paloalto at 127.0.0.2, fortinet at 127.0.0.3,
/// plus `more` (extra keys in `[radius]` first, then tables).
pub fn radius_fixture(
    setup: Setup,
    devices: &[RDev],
    radius_keys: &str,
    tables: &str,
) -> (Fixture, Ports) {
    let setup = Setup {
        token: true,
        ..setup
    };
    let mut f = Fixture::new(setup, &[Dev::good("placeholder", "alice")]);
    write_radius_devices(&f, devices);
    let secret = f.path("nas.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let ports = Ports {
        auth: free_udp_port(),
        acct: free_udp_port(),
        dae: free_udp_port(),
    };
    let s = secret.display();
    let tables = tables.replace("NAS_SECRET_FILE", &s.to_string());
    f.setup.extra = format!(
        r#"
[radius]
auth_listen = "127.0.0.1:{auth}"
acct_listen = "127.0.0.1:{acct}"
{radius_keys}

[[radius.clients]]
name = "asa-1"
address = "127.0.0.1"
secret_file = "{s}"
vendor = "cisco"
zone = "office"
dae_port = {dae}

[[radius.clients]]
name = "pa-1"
address = "127.0.0.2/32"
secret_file = "{s}"
vendor = "paloalto"
zone = "office"
dae_port = 0

[[radius.clients]]
name = "forti-1"
address = "127.0.0.3"
secret_file = "{s}"
vendor = "fortinet"
zone = "office"
dae_port = 0
{tables}
"#,
        auth = ports.auth,
        acct = ports.acct,
        dae = ports.dae,
    );
    f.write_config();
    (f, ports)
}

/// A child process killed and reaped when dropped (also when a test fails).
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One radclient run (`-x`, one try, 2 s): exit code and everything it printed.
pub fn radclient(port: u16, command: &str, secret: &str, attrs: &str) -> (Option<i32>, String) {
    crate::common::radclient::Radclient::start(port, command, secret, attrs).finish()
}

/// A Cisco AnyConnect-shaped Access-Request.
pub fn cisco(user: &str, uid: &str, mac: &str) -> String {
    format!(
        r#"User-Name = "{user}"
User-Password = "pw"
Message-Authenticator = 0x00
Cisco-AVPair = "mdm-tlv=device-platform=win"
Cisco-AVPair = "mdm-tlv=device-uid={uid}"
Cisco-AVPair = "mdm-tlv=device-mac={mac}"
Calling-Station-Id = "203.0.113.7"
Tunnel-Client-Endpoint = "203.0.113.7"
ASA-TunnelGroupName = "staff"
"#
    )
}

fn paloalto(user: &str, host: &str) -> String {
    format!(
        r#"User-Name = "{user}"
User-Password = "pw"
Message-Authenticator = 0x00
Packet-Src-IP-Address = 127.0.0.2
PaloAlto-Client-Hostname = "{host}"
PaloAlto-Client-OS = "Microsoft Windows 11 Enterprise"
PaloAlto-Client-Source-IP = "198.51.100.4"
"#
    )
}

fn fortinet(user: &str) -> String {
    format!(
        r#"User-Name = "{user}"
User-Password = "pw"
Message-Authenticator = 0x00
Packet-Src-IP-Address = 127.0.0.3
NAS-Identifier = "FGT60F"
NAS-Port-Type = Virtual
Calling-Station-Id = "192.0.2.99"
Connect-Info = "vpn-ssl"
"#
    )
}

/// The Reply-Message radclient printed, if any.
pub fn reply_message(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Reply-Message = \""))
        .map(|s| s.trim_end_matches('"').to_string())
}

/// The Class radclient printed, decoded from hex.
pub fn class(out: &str) -> Option<String> {
    let hex = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Class = 0x"))?;
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    String::from_utf8(bytes).ok()
}

/// Sends an Access-Request through radclient; the Class of an Accept, or the Reply-Message of a
/// Reject.
pub fn access(port: u16, attrs: &str) -> Result<String, String> {
    let (_, out) = radclient(port, "auth", SECRET, attrs);
    if out.contains("Received Access-Accept") {
        Ok(class(&out).unwrap_or_else(|| panic!("Accept without Class:\n{out}")))
    } else if out.contains("Received Access-Reject") {
        Err(reply_message(&out).unwrap_or_else(|| panic!("Reject without Reply-Message:\n{out}")))
    } else {
        panic!("no answer from pforte:\n{out}")
    }
}

/// Sends an Accounting-Request through radclient; panics unless it is answered.
pub fn accounting(port: u16, attrs: &str) {
    let (code, out) = radclient(port, "acct", SECRET, attrs);
    assert!(
        out.contains("Received Accounting-Response"),
        "exit {code:?}:\n{out}"
    );
}

pub fn session_ids(port: u16) -> Vec<String> {
    let bearer = format!("Bearer {TOKEN}");
    let (status, body) = http(
        port,
        "GET",
        "/v1/sessions",
        &[("Authorization", &bearer)],
        "",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let list = v
        .get("sessions")
        .and_then(|s| s.as_array())
        .cloned()
        .or_else(|| v.as_array().cloned())
        .unwrap_or_default();
    list.iter()
        .filter_map(|s| s.get("id").and_then(|i| i.as_str()).map(str::to_string))
        .collect()
}

fn reason_of(result: Result<String, String>) -> String {
    match result {
        Ok(class) => format!("allowed {class}"),
        Err(msg) => msg.split(':').next().unwrap_or("").to_string(),
    }
}

const MAC1: &str = "aa-bb-cc-00-00-01";

fn radius_every_reason_code_over_radclient() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let setup = Setup {
        max_sessions: 3,
        per_user: 1,
        finance_quota: 1,
        ..Setup::default()
    };
    let devices = [
        RDev {
            hwaddr: "aa:bb:cc:00:00:01",
            ..RDev::good("c-alice", "U-ALICE", "alice")
        },
        RDev::good("c-alice2", "U-ALICE2", "alice"),
        RDev {
            ownership: "private",
            ..RDev::good("c-priv", "U-PRIV", "alice")
        },
        RDev {
            status: "blocked",
            ..RDev::good("c-block", "U-BLOCK", "alice")
        },
        RDev {
            encrypted: false,
            ..RDev::good("c-noenc", "U-NOENC", "alice")
        },
        RDev {
            patched_days_ago: 100,
            ..RDev::good("c-old", "U-OLD", "alice")
        },
        RDev {
            org_unit: "social",
            ..RDev::good("c-dora", "U-DORA", "dora")
        },
        RDev {
            org_unit: "health",
            ..RDev::good("c-carol", "U-CAROL", "carol")
        },
        RDev {
            org_unit: "finance",
            ..RDev::good("c-frank", "U-FRANK", "frank")
        },
        RDev {
            org_unit: "finance",
            ..RDev::good("c-gina", "U-GINA", "gina")
        },
        RDev::good("c-ivan", "U-IVAN", "ivan"),
        RDev::good("c-bob", "U-BOB", "bob"),
    ];
    let (f, p) = radius_fixture(setup, &devices, "", "");
    let d = f.start();
    let ask = |user: &str, uid: &str, mac: &str| reason_of(access(p.auth, &cisco(user, uid, mac)));
    let refusals = [
        ("alice", "U-NOBODY", MAC1, "unregistered_device"),
        ("alice", "U-ALICE", "aa-bb-cc-00-00-02", "device_mismatch"),
        ("alice", "U-PRIV", MAC1, "private_device"),
        ("alice", "U-BLOCK", MAC1, "device_blocked"),
        ("alice", "U-NOENC", MAC1, "not_encrypted"),
        ("alice", "U-OLD", MAC1, "patch_overdue"),
        ("zed", "U-ALICE", MAC1, "unknown_user"),
        ("bob", "U-ALICE", MAC1, "user_not_assigned"),
        ("dora", "U-DORA", MAC1, "remote_work_not_permitted"),
        ("carol", "U-CAROL", MAC1, "device_clearance"),
        ("alice", "U-ALICE", "not-a-mac", "bad_request"),
    ];
    for (user, uid, mac, want) in refusals {
        assert_eq!(ask(user, uid, mac), want, "{user} {uid} {mac}");
    }
    assert!(ask("alice", "U-ALICE", MAC1).starts_with("allowed "));
    assert_eq!(ask("alice", "U-ALICE2", MAC1), "user_session_limit");
    assert!(ask("frank", "U-FRANK", MAC1).starts_with("allowed "));
    assert_eq!(ask("gina", "U-GINA", MAC1), "org_unit_quota");
    assert!(ask("ivan", "U-IVAN", MAC1).starts_with("allowed "));
    assert_eq!(ask("bob", "U-BOB", MAC1), "capacity_full");
    // The whole Reply-Message: code, colon, the sentence.
    let msg = access(p.auth, &cisco("alice", "U-PRIV", MAC1)).unwrap_err();
    assert!(
        msg.starts_with("private_device: Device c-priv is a private device"),
        "{msg}"
    );
    // The same counters as OpenVPN's decisions, and the per-NAS request count.
    let m = d.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"pforte_decisions_total{decision="deny",reason="device_mismatch"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            r#"pforte_radius_requests_total{client="asa-1",type="access_request"}"#
        ),
        Some(18.0)
    );
    assert_eq!(session_ids(d.port).len(), 3);
}

fn radius_vendors_accounting_bytes_seats_and_disconnect() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let devices = [
        RDev {
            hwaddr: "aa:bb:cc:00:00:01",
            ..RDev::good("c-alice", "U-ALICE", "alice")
        },
        RDev {
            hostname: "NB-PA-1",
            ..RDev::good("pa-ivan", "", "ivan")
        },
        RDev::good("c-bob", "U-BOB", "bob"),
    ];
    let legacy = "[[radius.clients]]\nname = \"ocserv-1\"\naddress = \"127.0.0.5\"\nsecret_file = \"NAS_SECRET_FILE\"\nvendor = \"generic\"\nzone = \"office\"\ndae_port = 0\ndevice_attribute = \"Calling-Station-Id\"\nrequire_message_authenticator = false\n";
    let (f, p) = radius_fixture(Setup::default(), &devices, "", legacy);
    let d = f.start();

    // A client allowed to omit Message-Authenticator (radcli, so ocserv, signs only EAP) is
    // answered without one; every other client still needs it (see the hostile-input test).
    let (_, out) = radclient(
        p.auth,
        "auth",
        SECRET,
        "User-Name = \"bob\"\nUser-Password = \"pw\"\nCalling-Station-Id = \"U-BOB\"\nPacket-Src-IP-Address = 127.0.0.5\n",
    );
    assert!(out.contains("Received Access-Accept"), "{out}");
    let legacy_id = class(&out).unwrap();
    accounting(
        p.acct,
        "Acct-Status-Type = Accounting-Off\nPacket-Src-IP-Address = 127.0.0.5\n",
    );
    assert!(!session_ids(d.port).contains(&legacy_id));

    // Cisco: admitted; the Accept carries Class = the listed session id, the zone's address.
    let (_, out) = radclient(p.auth, "auth", SECRET, &cisco("alice", "u-alice", MAC1));
    assert!(out.contains("Received Access-Accept"), "{out}");
    assert!(out.contains("Framed-IP-Address = 10.213.0."), "{out}");
    assert!(out.contains("Framed-IP-Netmask = 255.255.255.0"), "{out}");
    assert!(
        out.contains("Framed-Route = \"10.1.0.0/16 0.0.0.0 1\""),
        "{out}"
    );
    let id = class(&out).unwrap();
    assert_eq!(session_ids(d.port), vec![id.clone()]);

    // Accounting: Start binds the NAS's session id, Interim moves bytes (with Gigawords),
    // Stop ends the session and frees the seat.
    let before = d
        .metric(r#"pforte_session_received_bytes_total{org_unit="it",zone="office"}"#)
        .unwrap_or(0.0);
    accounting(
        p.acct,
        &format!(
            "Acct-Status-Type = Start\nAcct-Session-Id = \"ASA-0001\"\nUser-Name = \"alice\"\nClass = \"{id}\"\n"
        ),
    );
    accounting(
        p.acct,
        "Acct-Status-Type = Interim-Update\nAcct-Session-Id = \"ASA-0001\"\nUser-Name = \"alice\"\nAcct-Input-Octets = 1000\nAcct-Input-Gigawords = 1\nAcct-Output-Octets = 500\n",
    );
    let after = d
        .metric(r#"pforte_session_received_bytes_total{org_unit="it",zone="office"}"#)
        .unwrap();
    assert_eq!(after - before, 4_294_967_296.0 + 1000.0);
    assert_eq!(d.metric("pforte_seats_used"), Some(1.0));
    accounting(
        p.acct,
        "Acct-Status-Type = Stop\nAcct-Session-Id = \"ASA-0001\"\nUser-Name = \"alice\"\nAcct-Input-Octets = 2000\nAcct-Input-Gigawords = 1\nAcct-Output-Octets = 900\n",
    );
    assert!(session_ids(d.port).is_empty());
    assert_eq!(d.metric("pforte_seats_used"), Some(0.0));
    // A Stop for a session already ended is answered and frees nothing.
    accounting(
        p.acct,
        "Acct-Status-Type = Stop\nAcct-Session-Id = \"ASA-0001\"\nUser-Name = \"alice\"\n",
    );

    // Palo Alto by host name, FortiGate without any device identity.
    let pa = access(p.auth, &paloalto("ivan", "nb-pa-1")).unwrap();
    assert!(session_ids(d.port).contains(&pa));
    let msg = access(p.auth, &fortinet("bob")).unwrap_err();
    assert!(
        msg.starts_with("unregistered_device: The concentrator sent no device identity"),
        "{msg}"
    );
    // Accounting-On from the Palo Alto ends its sessions, not the Cisco's.
    let c = access(p.auth, &cisco("bob", "U-BOB", MAC1)).unwrap();
    accounting(
        p.acct,
        "Acct-Status-Type = Accounting-On\nPacket-Src-IP-Address = 127.0.0.2\nNAS-Identifier = \"pa-1\"\n",
    );
    assert_eq!(session_ids(d.port), vec![c.clone()]);

    // DELETE /v1/sessions/{id} on a RADIUS session: a Disconnect-Request to the NAS's DAE port
    // with Acct-Session-Id, User-Name and a valid Message-Authenticator; our ACK is recorded.
    accounting(
        p.acct,
        &format!(
            "Acct-Status-Type = Start\nAcct-Session-Id = \"ASA-0002\"\nUser-Name = \"bob\"\nClass = \"{c}\"\n"
        ),
    );
    let nas = UdpSocket::bind(("127.0.0.1", p.dae)).unwrap();
    nas.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let bearer = format!("Bearer {TOKEN}");
    let (status, body) = http(
        d.port,
        "DELETE",
        &format!("/v1/sessions/{c}"),
        &[("Authorization", &bearer)],
        "",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let mut buf = [0u8; 4096];
    let (n, from) = nas.recv_from(&mut buf).expect("no Disconnect-Request");
    let req = Packet::decode(&buf[..n]).unwrap();
    assert_eq!(req.code, Code::DisconnectRequest);
    let secret = Secret::new(SECRET).unwrap();
    auth::verify_request(&req, &secret).unwrap();
    assert!(req.get(attr::MESSAGE_AUTHENTICATOR).is_some());
    assert_eq!(
        req.get_str(attr::ACCT_SESSION_ID).unwrap(),
        Some("ASA-0002")
    );
    assert_eq!(req.get_str(attr::USER_NAME).unwrap(), Some("bob"));
    let mut ack = Packet::response_to(&req, Code::DisconnectAck);
    let wire = auth::finalize_response(&mut ack, &req.authenticator, &secret).unwrap();
    nas.send_to(&wire, from).unwrap();
    wait_for("the ACK counted", Duration::from_secs(5), || {
        d.metric(r#"pforte_radius_disconnects_total{client="asa-1",result="ack"}"#) == Some(1.0)
    });
    assert!(session_ids(d.port).is_empty());
}

fn radius_accept_without_accounting_start_is_reaped() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let devices = [RDev {
        hwaddr: "aa:bb:cc:00:00:01",
        ..RDev::good("c-alice", "U-ALICE", "alice")
    }];
    let (f, p) = radius_fixture(
        Setup::default(),
        &devices,
        "accounting_start_timeout_s = 1",
        "",
    );
    let d = f.start();
    let nas = UdpSocket::bind(("127.0.0.1", p.dae)).unwrap();
    nas.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let id = access(p.auth, &cisco("alice", "U-ALICE", MAC1)).unwrap();
    assert_eq!(session_ids(d.port), vec![id]);
    wait_for("the session reaped", Duration::from_secs(5), || {
        session_ids(d.port).is_empty()
    });
    // The NAS is told to drop the client whose seat was freed.
    let mut buf = [0u8; 4096];
    let (n, _) = nas.recv_from(&mut buf).expect("no Disconnect-Request");
    let req = Packet::decode(&buf[..n]).unwrap();
    assert_eq!(req.code, Code::DisconnectRequest);
    assert_eq!(req.get_str(attr::USER_NAME).unwrap(), Some("alice"));
    assert_eq!(
        d.metric(r#"pforte_radius_accounting_start_timeouts_total{client="asa-1"}"#),
        Some(1.0)
    );
    assert_eq!(d.metric("pforte_seats_used"), Some(0.0));
}

/// The Accept goes out before the session's commit (a store of this node alone): after a
/// kill -9, every session pforte accepted is either back from the store or, when its Accounting
/// Start comes, dropped at the NAS with a Disconnect-Request: none is let in uncounted. A Start
/// naming a pforte session id pforte has no record of gets a Disconnect-Request (with the NAS's
/// Acct-Session-Id and User-Name) and is counted; a `Class` that is no pforte id does not.
fn radius_start_for_a_session_pforte_has_no_record_of_is_disconnected() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let devices = [
        RDev {
            hwaddr: "aa:bb:cc:00:00:01",
            ..RDev::good("c-alice", "U-ALICE", "alice")
        },
        RDev {
            hwaddr: "aa:bb:cc:00:00:02",
            ..RDev::good("c-bob", "U-BOB", "bob")
        },
        RDev {
            hwaddr: "aa:bb:cc:00:00:03",
            ..RDev::good("c-ivan", "U-IVAN", "ivan")
        },
    ];
    let (f, p) = radius_fixture(Setup::default(), &devices, "", "");
    let d = f.start();
    let users = [
        ("alice", "U-ALICE", "aa-bb-cc-00-00-01"),
        ("bob", "U-BOB", "aa-bb-cc-00-00-02"),
        ("ivan", "U-IVAN", "aa-bb-cc-00-00-03"),
    ];
    let accepted: Vec<String> = users
        .iter()
        .map(|(u, uid, mac)| access(p.auth, &cisco(u, uid, mac)).unwrap())
        .collect();
    drop(d); // SIGKILL
    let d = f.start();
    let listed = session_ids(d.port);
    let nas = UdpSocket::bind(("127.0.0.1", p.dae)).unwrap();
    nas.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let secret = Secret::new(SECRET).unwrap();
    let mut buf = [0u8; 4096];
    let mut dropped_at_nas = 0;
    for (i, ((user, _, _), class)) in users.iter().zip(&accepted).enumerate() {
        let acct = format!("ASA-{i}");
        accounting(
            p.acct,
            &format!(
                "Acct-Status-Type = Start\nAcct-Session-Id = \"{acct}\"\nUser-Name = \"{user}\"\nClass = \"{class}\"\n"
            ),
        );
        if listed.contains(class) {
            continue;
        }
        let (n, _) = nas.recv_from(&mut buf).expect("no Disconnect-Request");
        let req = Packet::decode(&buf[..n]).unwrap();
        assert_eq!(req.code, Code::DisconnectRequest);
        assert_eq!(
            req.get_str(attr::ACCT_SESSION_ID).unwrap(),
            Some(acct.as_str())
        );
        dropped_at_nas += 1;
    }
    assert_eq!(
        listed.len() + dropped_at_nas,
        accepted.len(),
        "accepted {accepted:?}, listed after kill -9 {listed:?}"
    );
    assert_eq!(d.metric("pforte_seats_used"), Some(listed.len() as f64));

    // A Start for a pforte session id this node never recorded: dropped at the NAS, counted.
    let lost = "0123456789abcdef0123456789abcdef";
    accounting(
        p.acct,
        &format!(
            "Acct-Status-Type = Start\nAcct-Session-Id = \"ASA-LOST\"\nUser-Name = \"dave\"\nClass = \"{lost}\"\n"
        ),
    );
    let (n, from) = nas.recv_from(&mut buf).expect("no Disconnect-Request");
    let req = Packet::decode(&buf[..n]).unwrap();
    assert_eq!(req.code, Code::DisconnectRequest);
    auth::verify_request(&req, &secret).unwrap();
    assert_eq!(
        req.get_str(attr::ACCT_SESSION_ID).unwrap(),
        Some("ASA-LOST")
    );
    assert_eq!(req.get_str(attr::USER_NAME).unwrap(), Some("dave"));
    let mut ack = Packet::response_to(&req, Code::DisconnectAck);
    let wire = auth::finalize_response(&mut ack, &req.authenticator, &secret).unwrap();
    nas.send_to(&wire, from).unwrap();
    wait_for("the ACK counted", Duration::from_secs(5), || {
        d.metric(r#"pforte_radius_disconnects_total{client="asa-1",result="ack"}"#) == Some(1.0)
    });
    assert_eq!(
        d.metric(r#"pforte_radius_unrecorded_starts_total{client="asa-1"}"#),
        Some(1.0 + dropped_at_nas as f64)
    );
    // A Class that is no pforte session id: answered, nothing sent to the NAS.
    accounting(
        p.acct,
        "Acct-Status-Type = Start\nAcct-Session-Id = \"ASA-OTHER\"\nUser-Name = \"erin\"\nClass = \"not-a-pforte-session\"\n",
    );
    nas.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    assert!(
        nas.recv_from(&mut buf).is_err(),
        "a Disconnect-Request for a foreign Class"
    );
    assert_eq!(
        d.metric(r#"pforte_radius_unrecorded_starts_total{client="asa-1"}"#),
        Some(1.0 + dropped_at_nas as f64)
    );
    assert_eq!(d.metric("pforte_seats_used"), Some(listed.len() as f64));
}

/// Acknowledges every Disconnect-Request (for alice) that comes before the socket's read
/// timeout; how many came.
fn ack_disconnects(nas: &UdpSocket) -> usize {
    let secret = Secret::new(SECRET).unwrap();
    let mut buf = [0u8; 4096];
    let mut n_acked = 0;
    while let Ok((n, from)) = nas.recv_from(&mut buf) {
        let req = Packet::decode(&buf[..n]).unwrap();
        assert_eq!(req.code, Code::DisconnectRequest);
        assert_eq!(req.get_str(attr::USER_NAME).unwrap(), Some("alice"));
        let mut ack = Packet::response_to(&req, Code::DisconnectAck);
        let wire = auth::finalize_response(&mut ack, &req.authenticator, &secret).unwrap();
        nas.send_to(&wire, from).unwrap();
        n_acked += 1;
    }
    n_acked
}

/// The store's disk fills up (fail mode closed). An Accept that went out before its commit
/// failed is followed by a Disconnect-Request to the NAS and frees its seat; from the failed
/// commit on, Access-Requests are refused with `store_unavailable` (decided after the commit);
/// with space again, pforte accepts again without a restart. No Accept is left uncounted.
fn radius_disk_full_after_an_accept_drops_the_client_and_refuses_the_next() {
    if !have_tool("radclient", "freeradius-utils") || !crate::faults::can_mount() {
        return;
    }
    let devices = [RDev {
        hwaddr: "aa:bb:cc:00:00:01",
        ..RDev::good("c-alice", "U-ALICE", "alice")
    }];
    let (f, p) = radius_fixture(
        Setup {
            per_user: 0,
            ..Setup::default()
        },
        &devices,
        "",
        "",
    );
    let state = f.path("state");
    let _tmpfs = crate::faults::Tmpfs::mount(&state);
    let d = f.start();
    let nas = UdpSocket::bind(("127.0.0.1", p.dae)).unwrap();
    nas.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let first = access(p.auth, &cisco("alice", "U-ALICE", MAC1)).unwrap();
    let filler = crate::faults::fill(&state);
    let mut accepted_after_fill: Vec<String> = Vec::new();
    let mut disconnected = 0;
    let mut refused = false;
    for _ in 0..400 {
        match access(p.auth, &cisco("alice", "U-ALICE", MAC1)) {
            Ok(id) => accepted_after_fill.push(id),
            Err(msg) => {
                assert!(msg.starts_with("store_unavailable: "), "{msg}");
                refused = true;
                break;
            }
        }
        disconnected += ack_disconnects(&nas);
    }
    assert!(refused, "no Access-Request was refused with the disk full");
    // The Disconnect-Requests of Accepts whose commit failed, each acknowledged.
    nas.set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    disconnected += ack_disconnects(&nas);
    let listed = session_ids(d.port);
    let recorded = accepted_after_fill
        .iter()
        .filter(|id| listed.contains(id))
        .count();
    let unrecorded = accepted_after_fill.len() - recorded;
    assert!(listed.contains(&first));
    assert!(
        unrecorded >= 1,
        "every Accept was recorded; the disk never failed a commit after an Accept"
    );
    // Each unrecorded Accept, and only those, was asked of the NAS to drop.
    assert_eq!(
        disconnected, unrecorded,
        "Disconnect-Requests for {unrecorded} unrecorded Accepts"
    );
    assert_eq!(
        d.metric(r#"pforte_radius_disconnects_total{client="asa-1",result="ack"}"#),
        Some(unrecorded as f64)
    );
    assert_eq!(d.metric("pforte_seats_used"), Some(listed.len() as f64));
    assert_eq!(d.metric("pforte_store_healthy"), Some(0.0));
    // Space again: accepted again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(id) = access(p.auth, &cisco("alice", "U-ALICE", MAC1)) {
            ok = session_ids(d.port).contains(&id);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "no recovery after the disk was freed");
}

fn vm_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A valid Cisco-shaped Access-Request of our own codec.
fn signed_request(id: u8, auth_seed: u8, secret: &Secret) -> Vec<u8> {
    let mut p = Packet::new(Code::AccessRequest, id, [auth_seed; 16]);
    p.add(attr::USER_NAME, "alice").unwrap();
    p.add_vendor(9, 1, b"mdm-tlv=device-uid=U-ALICE").unwrap();
    p.add_vendor(9, 1, format!("mdm-tlv=device-mac={MAC1}").as_bytes())
        .unwrap();
    auth::finalize_request(&mut p, secret).unwrap()
}

fn radius_hostile_input_is_dropped_counted_and_memory_stays_flat() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let devices = [RDev {
        hwaddr: "aa:bb:cc:00:00:01",
        ..RDev::good("c-alice", "U-ALICE", "alice")
    }];
    let (f, p) = radius_fixture(Setup::default(), &devices, "", "");
    let d = f.start();
    let dropped = |client: &str, reason: &str| {
        d.metric(&format!(
            r#"pforte_radius_dropped_total{{client="{client}",reason="{reason}"}}"#
        ))
        .unwrap_or(0.0)
    };

    // radclient without Message-Authenticator, with a wrong secret, from an unknown address.
    let no_ma = cisco("alice", "U-ALICE", MAC1).replace("Message-Authenticator = 0x00\n", "");
    let (_, out) = radclient(p.auth, "auth", SECRET, &no_ma);
    assert!(!out.contains("Received"), "{out}");
    let (_, out) = radclient(
        p.auth,
        "auth",
        "wrong-secret",
        &cisco("alice", "U-ALICE", MAC1),
    );
    assert!(!out.contains("Received"), "{out}");
    let unknown = format!(
        "{}Packet-Src-IP-Address = 127.0.0.9\n",
        cisco("alice", "U-ALICE", MAC1)
    );
    let (_, out) = radclient(p.auth, "auth", SECRET, &unknown);
    assert!(!out.contains("Received"), "{out}");
    let (_, out) = radclient(
        p.acct,
        "acct",
        "wrong-secret",
        "Acct-Status-Type = Start\nAcct-Session-Id = \"x\"\n",
    );
    assert!(!out.contains("Received"), "{out}");

    // Our own datagrams: truncated, lying attribute lengths, oversized, wrong code.
    let secret = Secret::new(SECRET).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let to = ("127.0.0.1", p.auth);
    let good = signed_request(7, 7, &secret);
    sock.send_to(&good[..good.len() - 5], to).unwrap();
    let mut lying = good.clone();
    lying[21] = 250; // the first attribute claims to run past the end
    sock.send_to(&lying, to).unwrap();
    let mut long = good.clone();
    long.resize(5000, 0);
    long[2..4].copy_from_slice(&5000u16.to_be_bytes());
    sock.send_to(&long, to).unwrap();
    sock.send_to(&good[..10], to).unwrap();
    let mut buf = [0u8; 4096];
    assert!(
        sock.recv_from(&mut buf).is_err(),
        "a hostile datagram was answered"
    );
    wait_for("the drops counted", Duration::from_secs(5), || {
        dropped("asa-1", "missing_message_authenticator") == 1.0
            && dropped("asa-1", "bad_authenticator") == 2.0
            && dropped("unknown", "unknown_client") == 1.0
            && dropped("asa-1", "malformed") == 3.0
            && dropped("asa-1", "oversized") == 1.0
    });
    assert!(session_ids(d.port).is_empty());

    // A retransmission gets the cached answer, byte for byte, and takes no second seat.
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(&good, to).unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let first = buf[..n].to_vec();
    sock.send_to(&good, to).unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &first[..]);
    assert_eq!(Packet::decode(&first).unwrap().code, Code::AccessAccept);
    assert_eq!(session_ids(d.port).len(), 1);
    assert_eq!(
        d.metric(r#"pforte_radius_duplicates_total{client="asa-1"}"#),
        Some(1.0)
    );

    // A flood of garbage from an unknown address: dropped, counted, memory flat.
    let flood = UdpSocket::bind("127.0.0.9:0").unwrap();
    let pid = d.child.id();
    let warm = |n: u32| {
        for i in 0..n {
            let mut g = signed_request((i % 256) as u8, (i % 251) as u8, &secret);
            g[4..8].copy_from_slice(&i.to_le_bytes());
            let _ = flood.send_to(&g, to);
            if i % 500 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    warm(2_000);
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = vm_rss_kb(pid);
    let counted_before = dropped("unknown", "unknown_client");
    warm(20_000);
    // Wait until the count stops moving (bounded). Under CPU contention the kernel may drop some
    // datagrams before pforte reads them; those are dropped too, only not by pforte.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = -1.0;
    while Instant::now() < deadline {
        let now = dropped("unknown", "unknown_client");
        if now == last {
            break;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        last - counted_before >= 15_000.0,
        "only {} of 20000 flood datagrams counted",
        last - counted_before
    );
    let rss_after = vm_rss_kb(pid);
    assert!(
        rss_after <= rss_before + 2048,
        "RSS grew from {rss_before} kB to {rss_after} kB"
    );
    assert_eq!(session_ids(d.port).len(), 1);
    eprintln!(
        "flood: {} dropped, RSS {rss_before} kB -> {rss_after} kB",
        dropped("unknown", "unknown_client")
    );
}

pub fn tests() -> Vec<Case> {
    vec![
        trial!(radius_every_reason_code_over_radclient, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_vendors_accounting_bytes_seats_and_disconnect, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_accept_without_accounting_start_is_reaped, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_hostile_input_is_dropped_counted_and_memory_stays_flat, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_start_for_a_session_pforte_has_no_record_of_is_disconnected, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_disk_full_after_an_accept_drops_the_client_and_refuses_the_next, needs: [Need::Tool("radclient", "freeradius-utils"), Need::Root("to mount a small tmpfs")]),
    ]
}
