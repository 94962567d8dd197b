//! pforte's RADIUS codec against FreeRADIUS's own encoder and checker: `radclient` sends
//! Access-Requests shaped like Cisco AnyConnect, Palo Alto GlobalProtect and FortiGate SSL-VPN
//! ones, and an Accounting-Request; our codec reads and verifies them, and answers. radclient
//! accepting our answers, and refusing answers with a wrong authenticator, shows that we compute
//! the authenticators as FreeRADIUS does, not merely consistently with ourselves.
//!
//! Set `PFORTE_RADIUS_SEEDS=<dir>` to keep every datagram exchanged there (the fuzz seeds in
//! `fuzz/seeds/radius_packet/` were captured so).

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use pforte::vpn::radius::{Code, Packet, Secret, attr, auth};

use crate::common::harness::{Case, Need, trial};
use crate::common::have_tool;
use crate::common::radclient::Radclient;

const SECRET: &str = "Zw8-radius-test-secret";

/// A UDP socket on loopback for radclient to talk to.
fn listen() -> (UdpSocket, u16) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let port = sock.local_addr().unwrap().port();
    (sock, port)
}

/// One datagram (radclient sends exactly one with `-r 1`), within 5 s.
fn receive(sock: &UdpSocket, name: &str) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 4096 + 64];
    let (n, from) = sock
        .recv_from(&mut buf)
        .expect("no datagram from radclient in 5 s");
    keep_seed(&format!("{name}_request"), &buf[..n]);
    (buf[..n].to_vec(), from)
}

fn keep_seed(name: &str, bytes: &[u8]) {
    if let Some(dir) = std::env::var_os("PFORTE_RADIUS_SEEDS") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn secret() -> Secret {
    Secret::new(SECRET).unwrap()
}

/// Receives an Access-Request from radclient, checks it, and checks the password.
fn receive_access_request(sock: &UdpSocket, name: &str, password: &str) -> (Packet, SocketAddr) {
    let (bytes, from) = receive(sock, name);
    let req = Packet::decode(&bytes).unwrap();
    assert_eq!(req.code, Code::AccessRequest);
    auth::verify_request(&req, &secret()).expect("radclient's Message-Authenticator");
    let wrong = Secret::new("another secret").unwrap();
    assert!(auth::verify_request(&req, &wrong).is_err());
    let hidden = req.get(attr::USER_PASSWORD).unwrap();
    let clear = auth::unhide_password(hidden, &req.authenticator, &secret()).unwrap();
    assert_eq!(clear, password.as_bytes());
    (req, from)
}

/// Our Access-Accept for `req`, signed.
fn accept(req: &Packet) -> Packet {
    let mut resp = Packet::response_to(req, Code::AccessAccept);
    resp.add(attr::REPLY_MESSAGE, "Welcome to pforte").unwrap();
    resp.add(attr::CLASS, "pforte-session-0001").unwrap();
    resp.add_ipv4(attr::FRAMED_IP_ADDRESS, [10, 8, 0, 6].into());
    resp
}

fn hexed(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Answers with our Access-Accept and asserts radclient took it.
fn answer_and_expect_accept(
    sock: &UdpSocket,
    req: &Packet,
    to: SocketAddr,
    rc: Radclient,
    name: &str,
) {
    let mut resp = accept(req);
    let bytes = auth::finalize_response(&mut resp, &req.authenticator, &secret()).unwrap();
    keep_seed(&format!("{name}_accept"), &bytes);
    sock.send_to(&bytes, to).unwrap();
    let (code, out) = rc.finish();
    assert_eq!(code, Some(0), "radclient refused our Access-Accept:\n{out}");
    assert!(out.contains("Received Access-Accept Id"), "{out}");
    assert!(out.contains("Welcome to pforte"), "{out}");
    assert!(out.contains(&hexed("pforte-session-0001")), "Class: {out}");
    assert!(out.contains("Framed-IP-Address = 10.8.0.6"), "{out}");
}

const CISCO: &str = r#"User-Name = "alice"
User-Password = "correct horse battery staple"
Message-Authenticator = 0x00
Cisco-AVPair = "mdm-tlv=device-platform=win"
Cisco-AVPair = "mdm-tlv=device-uid=ABC123"
Cisco-AVPair = "mdm-tlv=device-mac=aa-bb-cc-dd-ee-ff"
Calling-Station-Id = "203.0.113.7"
Tunnel-Client-Endpoint = "203.0.113.7"
NAS-IP-Address = 192.0.2.10
ASA-TunnelGroupName = "staff"
ASA-ClientType = AnyConnect-Client-SSL-VPN
"#;

fn radius_codec_cisco_anyconnect_request_and_our_accept() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let (sock, port) = listen();
    let rc = Radclient::start(port, "auth", SECRET, CISCO);
    let (req, from) = receive_access_request(&sock, "cisco", "correct horse battery staple");
    assert_eq!(req.get_str(attr::USER_NAME).unwrap(), Some("alice"));
    assert_eq!(
        req.get_str(attr::CALLING_STATION_ID).unwrap(),
        Some("203.0.113.7")
    );
    assert_eq!(
        req.get_ipv4(attr::NAS_IP_ADDRESS).unwrap(),
        Some([192, 0, 2, 10].into())
    );
    assert_eq!(req.cisco_avpair("mdm-tlv=device-uid"), Some("ABC123"));
    assert_eq!(
        req.cisco_avpair("mdm-tlv=device-mac"),
        Some("aa-bb-cc-dd-ee-ff")
    );
    assert_eq!(req.cisco_avpairs().count(), 3);
    use attr::cisco_asa;
    assert_eq!(
        req.vendor_str(cisco_asa::VENDOR_ID, cisco_asa::TUNNEL_GROUP_NAME),
        Some("staff")
    );
    let client_type: Vec<&[u8]> = req
        .vendor_values(cisco_asa::VENDOR_ID, cisco_asa::CLIENT_TYPE)
        .collect();
    assert_eq!(client_type, [&[0, 0, 0, 2][..]]);
    answer_and_expect_accept(&sock, &req, from, rc, "cisco");
}

fn radius_codec_paloalto_request_and_our_accept() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let (sock, port) = listen();
    let attrs = r#"User-Name = "bob"
User-Password = "a password longer than one block of sixteen"
Message-Authenticator = 0x00
PaloAlto-Client-Hostname = "LAPTOP-BOB-7"
PaloAlto-Client-OS = "Microsoft Windows 11 Enterprise"
PaloAlto-Client-Source-IP = "198.51.100.4"
PaloAlto-GlobalProtect-Client-Version = "6.2.1-59"
Calling-Station-Id = "198.51.100.4"
NAS-IP-Address = 192.0.2.11
"#;
    let rc = Radclient::start(port, "auth", SECRET, attrs);
    let (req, from) = receive_access_request(
        &sock,
        "paloalto",
        "a password longer than one block of sixteen",
    );
    use attr::paloalto as pa;
    assert_eq!(
        req.vendor_str(pa::VENDOR_ID, pa::CLIENT_HOSTNAME),
        Some("LAPTOP-BOB-7")
    );
    assert_eq!(
        req.vendor_str(pa::VENDOR_ID, pa::CLIENT_OS),
        Some("Microsoft Windows 11 Enterprise")
    );
    assert_eq!(
        req.vendor_str(pa::VENDOR_ID, pa::CLIENT_SOURCE_IP),
        Some("198.51.100.4")
    );
    assert_eq!(
        req.vendor_str(pa::VENDOR_ID, pa::GLOBALPROTECT_CLIENT_VERSION),
        Some("6.2.1-59")
    );
    answer_and_expect_accept(&sock, &req, from, rc, "paloalto");
}

fn radius_codec_fortinet_request_and_our_accept() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let (sock, port) = listen();
    let attrs = r#"User-Name = "carol"
User-Password = "x"
Message-Authenticator = 0x00
NAS-Identifier = "fgt-1"
NAS-Port-Type = Virtual
Calling-Station-Id = "192.0.2.99"
Acct-Session-Id = "0a1b2c3d"
Connect-Info = "vpn-ssl"
Fortinet-Vdom-Name = "root"
Fortinet-Client-IP-Address = 192.0.2.99
"#;
    let rc = Radclient::start(port, "auth", SECRET, attrs);
    let (req, from) = receive_access_request(&sock, "fortinet", "x");
    assert_eq!(req.get_str(attr::NAS_IDENTIFIER).unwrap(), Some("fgt-1"));
    assert_eq!(req.get_u32(attr::NAS_PORT_TYPE).unwrap(), Some(5));
    assert_eq!(req.get_str(attr::CONNECT_INFO).unwrap(), Some("vpn-ssl"));
    use attr::fortinet as ft;
    assert_eq!(req.vendor_str(ft::VENDOR_ID, ft::VDOM_NAME), Some("root"));
    let ip: Vec<&[u8]> = req
        .vendor_values(ft::VENDOR_ID, ft::CLIENT_IP_ADDRESS)
        .collect();
    assert_eq!(ip, [&[192, 0, 2, 99][..]]);
    answer_and_expect_accept(&sock, &req, from, rc, "fortinet");
}

/// An answer radclient must refuse: it drops it, waits out its 2 s and gives up.
fn expect_refused(sock: &UdpSocket, bytes: &[u8], to: SocketAddr, rc: Radclient, what: &str) {
    sock.send_to(bytes, to).unwrap();
    let (code, out) = rc.finish();
    assert_ne!(
        code,
        Some(0),
        "radclient took an answer with {what}:\n{out}"
    );
    // radclient prints "Received <code> Id <n> from …" for an answer it took; for one it
    // dropped, "Reply verification failed: Received <code> packet … invalid …".
    assert!(!out.contains("Received Access-Accept Id"), "{what}: {out}");
    assert!(
        !out.contains("Received Accounting-Response Id"),
        "{what}: {out}"
    );
    assert!(out.contains("verification failed"), "{what}: {out}");
}

fn radius_codec_radclient_refuses_a_wrong_response_authenticator() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let (sock, port) = listen();
    let rc = Radclient::start(port, "auth", SECRET, CISCO);
    let (req, from) = receive_access_request(&sock, "cisco_bad_ra", "correct horse battery staple");
    let mut resp = accept(&req);
    let mut bytes = auth::finalize_response(&mut resp, &req.authenticator, &secret()).unwrap();
    bytes[4] ^= 0x01;
    expect_refused(&sock, &bytes, from, rc, "a wrong Response Authenticator");
}

fn radius_codec_radclient_refuses_a_wrong_message_authenticator() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let (sock, port) = listen();
    let rc = Radclient::start(port, "auth", SECRET, CISCO);
    let (req, from) = receive_access_request(&sock, "cisco_bad_ma", "correct horse battery staple");
    let mut resp = accept(&req);
    auth::finalize_response(&mut resp, &req.authenticator, &secret()).unwrap();
    // A wrong Message-Authenticator under a Response Authenticator that is right for it.
    let ma = resp
        .attributes
        .iter_mut()
        .find(|a| a.kind == attr::MESSAGE_AUTHENTICATOR)
        .unwrap();
    ma.value[0] ^= 0x80;
    resp.authenticator =
        auth::response_authenticator(&resp, &req.authenticator, &secret()).unwrap();
    assert!(auth::verify_response_authenticator(&resp, &req.authenticator, &secret()).is_ok());
    assert_eq!(
        auth::verify_response(&resp, &req.authenticator, &secret()),
        Err(auth::AuthError::BadMessageAuthenticator)
    );
    expect_refused(
        &sock,
        &resp.encode().unwrap(),
        from,
        rc,
        "a wrong Message-Authenticator",
    );
}

const ACCT_START: &str = r#"Acct-Status-Type = Start
Acct-Session-Id = "0a1b2c3d"
User-Name = "alice"
NAS-IP-Address = 192.0.2.10
Calling-Station-Id = "203.0.113.7"
Framed-IP-Address = 10.8.0.6
Class = 0x70666f7274652d73657373696f6e2d30303031
Acct-Input-Octets = 4000000000
Acct-Output-Octets = 12345
Acct-Input-Gigawords = 1
"#;

/// Receives radclient's Accounting-Request and checks it.
fn receive_accounting(sock: &UdpSocket, name: &str) -> (Packet, SocketAddr) {
    let (bytes, from) = receive(sock, name);
    let req = Packet::decode(&bytes).unwrap();
    assert_eq!(req.code, Code::AccountingRequest);
    auth::verify_request(&req, &secret()).expect("radclient's Request Authenticator");
    let wrong = Secret::new("another secret").unwrap();
    assert_eq!(
        auth::verify_request(&req, &wrong),
        Err(auth::AuthError::BadAuthenticator)
    );
    assert_eq!(
        req.get_u32(attr::ACCT_STATUS_TYPE).unwrap(),
        Some(attr::acct_status::START)
    );
    assert_eq!(
        req.get_str(attr::ACCT_SESSION_ID).unwrap(),
        Some("0a1b2c3d")
    );
    assert_eq!(req.get(attr::CLASS), Some(&b"pforte-session-0001"[..]));
    assert_eq!(
        req.get_u32(attr::ACCT_INPUT_OCTETS).unwrap(),
        Some(4_000_000_000)
    );
    assert_eq!(req.get_u32(attr::ACCT_INPUT_GIGAWORDS).unwrap(), Some(1));
    assert_eq!(req.get_u32(attr::ACCT_OUTPUT_OCTETS).unwrap(), Some(12345));
    (req, from)
}

fn radius_codec_accounting_request_and_our_response() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let (sock, port) = listen();
    let rc = Radclient::start(port, "acct", SECRET, ACCT_START);
    let (req, from) = receive_accounting(&sock, "acct_start");
    let mut resp = Packet::response_to(&req, Code::AccountingResponse);
    let bytes = auth::finalize_response(&mut resp, &req.authenticator, &secret()).unwrap();
    keep_seed("acct_start_response", &bytes);
    sock.send_to(&bytes, from).unwrap();
    let (code, out) = rc.finish();
    assert_eq!(
        code,
        Some(0),
        "radclient refused our Accounting-Response:\n{out}"
    );
    assert!(out.contains("Received Accounting-Response Id"), "{out}");
}

fn radius_codec_radclient_refuses_a_wrong_accounting_response() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let (sock, port) = listen();
    let rc = Radclient::start(port, "acct", SECRET, ACCT_START);
    let (req, from) = receive_accounting(&sock, "acct_bad_ra");
    let mut resp = Packet::response_to(&req, Code::AccountingResponse);
    // Signed with another secret: the Response Authenticator is wrong for radclient's.
    let other = Secret::new("not the shared secret").unwrap();
    let bytes = auth::finalize_response(&mut resp, &req.authenticator, &other).unwrap();
    expect_refused(
        &sock,
        &bytes,
        from,
        rc,
        "a wrong Accounting-Response authenticator",
    );
}

fn radius_codec_disconnect_request_and_our_ack() {
    if !have_tool("radclient", "freeradius-utils") {
        return;
    }
    let (sock, port) = listen();
    let attrs = r#"Acct-Session-Id = "0a1b2c3d"
User-Name = "alice"
Message-Authenticator = 0x00
"#;
    let rc = Radclient::start(port, "disconnect", SECRET, attrs);
    let (bytes, from) = receive(&sock, "disconnect");
    let req = Packet::decode(&bytes).unwrap();
    assert_eq!(req.code, Code::DisconnectRequest);
    assert!(req.get(attr::MESSAGE_AUTHENTICATOR).is_some());
    auth::verify_request(&req, &secret()).expect("radclient's Disconnect-Request");
    assert_eq!(
        req.get_str(attr::ACCT_SESSION_ID).unwrap(),
        Some("0a1b2c3d")
    );
    let mut ack = Packet::response_to(&req, Code::DisconnectAck);
    let out = auth::finalize_response(&mut ack, &req.authenticator, &secret()).unwrap();
    keep_seed("disconnect_ack", &out);
    sock.send_to(&out, from).unwrap();
    let (code, out) = rc.finish();
    assert_eq!(
        code,
        Some(0),
        "radclient refused our Disconnect-ACK:\n{out}"
    );
    assert!(out.contains("Received Disconnect-ACK Id"), "{out}");
}

#[path = "../../fuzz/src/radius_packet.rs"]
mod fuzz_check;

/// Every seed and regression of the `radius_packet` fuzz target through its check.
fn radius_codec_fuzz_inputs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join("radius_packet")) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() {
                inputs.push(path);
            }
        }
    }
    inputs.sort();
    assert!(
        inputs.len() >= 10,
        "radius_packet seeds missing: {inputs:?}"
    );
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        assert!(
            Packet::decode(&data).is_ok(),
            "{} does not decode",
            path.display()
        );
        let outcome = std::panic::catch_unwind(|| fuzz_check::radius_packet(&data));
        assert!(outcome.is_ok(), "fuzz input {} fails", path.display());
    }
}

pub fn tests() -> Vec<Case> {
    vec![
        trial!(radius_codec_cisco_anyconnect_request_and_our_accept, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_codec_paloalto_request_and_our_accept, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_codec_fortinet_request_and_our_accept, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_codec_radclient_refuses_a_wrong_response_authenticator, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_codec_radclient_refuses_a_wrong_message_authenticator, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_codec_accounting_request_and_our_response, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_codec_radclient_refuses_a_wrong_accounting_response, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_codec_disconnect_request_and_our_ack, needs: [Need::Tool("radclient", "freeradius-utils")]),
        trial!(radius_codec_fuzz_inputs),
    ]
}
