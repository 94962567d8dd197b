//! strongSwan over VICI: charon's IKE_SAs to pforte's requests. Pure functions over VICI
//! messages ([`vici`]), so they can be tested and fuzzed alone; the connection is [`conn`], the
//! task that watches one charon is [`watch`].
//!
//! Debian's strongSwan cannot ask anybody before an IKE_SA is up (no `ext-auth` plugin), so
//! pforte decides each IKE_SA when charon reports it up (`ike-updown`) and terminates a refused
//! one at once: enforcement after establishment.
//!
//! **The device comes from the certificate round, never from `remote-id`.** With two
//! authentication rounds (certificate, then EAP) charon's `remote-id` is the second round's
//! identity, which the client picks freely. The first round's identity, proven by the signature
//! with the certificate's key, is taken from charon's own log line for it
//! (`authentication of '<id>' with <signature scheme> successful`, streamed as a VICI `log`
//! event with the IKE_SA's unique id); the certificate's fingerprint then from `list-certs`
//! (the certificates charon verified and cached) where exactly one has that subject.

pub mod conn;
pub mod vici;
pub mod watch;

use std::collections::HashMap;

use crate::wire::ConnectRequest;
use vici::Message;

/// What pforte reads of one IKE_SA (an `ike-updown` or `list-sa` event's section).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IkeSa {
    /// Connection name.
    pub name: String,
    /// charon's unique id (`ike-id` of `terminate`).
    pub uniqueid: u64,
    /// `ESTABLISHED`, `CONNECTING`, `DELETING`, …
    pub state: String,
    /// The client's real address.
    pub remote_host: String,
    /// Its port.
    pub remote_port: String,
    /// The last round's identity (client-chosen in two-round mode: never the device).
    pub remote_id: String,
    /// The EAP identity, where an EAP round ran.
    pub remote_eap_id: String,
    /// Virtual IPs handed to the client.
    pub remote_vips: Vec<String>,
    /// CHILD_SAs: unique id → (bytes in, bytes out).
    pub children: HashMap<String, (u64, u64)>,
}

impl IkeSa {
    /// Reads an IKE_SA section named `name`.
    pub fn from_section(name: &str, m: &Message) -> Option<IkeSa> {
        let uniqueid = m.str("uniqueid")?.parse().ok()?;
        let mut children = HashMap::new();
        if let Some(cs) = m.section("child-sas") {
            for (_, c) in cs.sections() {
                let n = |k: &str| c.str(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                if let Some(id) = c.str("uniqueid") {
                    children.insert(id, (n("bytes-in"), n("bytes-out")));
                }
            }
        }
        Some(IkeSa {
            name: name.to_string(),
            uniqueid,
            state: m.str("state").unwrap_or_default(),
            remote_host: m.str("remote-host").unwrap_or_default(),
            remote_port: m.str("remote-port").unwrap_or_default(),
            remote_id: m.str("remote-id").unwrap_or_default(),
            remote_eap_id: m.str("remote-eap-id").unwrap_or_default(),
            remote_vips: m.list("remote-vips"),
            children,
        })
    }

    /// Every IKE_SA section of an event message (`ike-updown`, `list-sa`).
    pub fn all_in(m: &Message) -> Vec<IkeSa> {
        m.sections()
            .filter_map(|(name, s)| IkeSa::from_section(name, s))
            .collect()
    }

    /// pforte's key for the session: the unique id and the real address (unique ids start
    /// again at 1 when charon restarts).
    pub fn key(&self) -> String {
        session_key(self.uniqueid, &self.remote_host)
    }

    /// Whether an EAP round ran (then `remote-id` is not the certificate's identity).
    pub fn two_rounds(&self) -> bool {
        !self.remote_eap_id.is_empty()
    }

    /// The real address as `ip:port`.
    pub fn remote_addr(&self) -> String {
        match (
            self.remote_host.parse::<std::net::IpAddr>(),
            self.remote_port.is_empty(),
        ) {
            (Ok(std::net::IpAddr::V6(ip)), false) => format!("[{ip}]:{}", self.remote_port),
            (Ok(_), false) => format!("{}:{}", self.remote_host, self.remote_port),
            _ => self.remote_host.clone(),
        }
    }
}

/// The session key of an IKE_SA ([`IkeSa::key`]).
pub fn session_key(uniqueid: u64, remote_host: &str) -> String {
    format!("{uniqueid}@{remote_host}")
}

/// The unique id back from a key made by [`session_key`].
pub fn ike_id(key: &str) -> Option<u64> {
    key.split_once('@')?.0.parse().ok()
}

/// The identity a certificate round proved, from charon's log line
/// `authentication of '<id>' with <scheme> successful`: `None` for the server's own
/// (`(myself)`), for EAP rounds and for anything else.
pub fn proven_identity(log_msg: &str) -> Option<&str> {
    let rest = log_msg.strip_prefix("authentication of '")?;
    let (id, tail) = rest.rsplit_once("' with ")?;
    let scheme = tail.strip_suffix(" successful")?;
    if scheme == "EAP" || scheme.contains(' ') || id.contains("' (myself)") {
        return None;
    }
    Some(id)
}

/// The common name of a distinguished name as strongSwan prints it (`O=Stadt, CN=NB-IT-0001`);
/// an identity that is no DN (an e-mail, an FQDN) is its own name.
pub fn common_name(id: &str) -> &str {
    if !id.contains('=') {
        return id;
    }
    id.split(", ")
        .filter_map(|rdn| rdn.strip_prefix("CN="))
        .last()
        .unwrap_or("")
}

/// The hook's settings for one instance.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Instance name.
    pub instance: String,
    /// Zone.
    pub zone: String,
}

/// A connect request for an IKE_SA: the device from `cert_id` (the certificate round's proven
/// identity: its CN as inventory id, and its fingerprint where known), the user from the EAP
/// identity (else the certificate's CN), the virtual IP as tunnel address.
pub fn connect_request(
    sa: &IkeSa,
    cert_id: Option<&str>,
    fingerprint: Option<&str>,
    s: &Settings,
) -> ConnectRequest {
    let cn = cert_id.map(common_name).unwrap_or("");
    ConnectRequest {
        vpn: "strongswan".into(),
        instance: s.instance.clone(),
        zone: s.zone.clone(),
        username: sa.remote_eap_id.clone(),
        common_name: cn.to_string(),
        cert_sha256: fingerprint.unwrap_or("").to_string(),
        remote_addr: sa.remote_addr(),
        tunnel_ip: sa.remote_vips.first().cloned().unwrap_or_default(),
        session_key: sa.key(),
        device_id: cn.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::vici::{Message, Value};
    use super::*;

    #[test]
    fn reads_the_certificate_round_not_remote_id() {
        assert_eq!(
            proven_identity(
                "authentication of 'O=Stadt, CN=NB-IT-0001' with RSA_EMSA_PKCS1_SHA2_256 successful"
            ),
            Some("O=Stadt, CN=NB-IT-0001")
        );
        assert_eq!(
            proven_identity("authentication of 'O=Probe, CN=NB-IT-9999' with EAP successful"),
            None
        );
        assert_eq!(
            proven_identity(
                "authentication of 'CN=vpn-server' (myself) with RSA_EMSA_PKCS1_SHA2_256 successful"
            ),
            None
        );
        assert_eq!(
            proven_identity("authentication of 'CN=vpn-server' (myself) with EAP"),
            None
        );
        assert_eq!(common_name("O=Stadt, CN=NB-IT-0001"), "NB-IT-0001");
        assert_eq!(common_name("laptop.example.org"), "laptop.example.org");
        assert_eq!(common_name("O=Stadt"), "");
    }

    #[test]
    fn maps_an_ike_sa_as_seen_in_list_sas() {
        // `swanctl --list-sas --raw` of a two-round IKE_SA whose client set a false round-2 id.
        let child = Message(vec![
            ("uniqueid".into(), Value::Str(b"4".to_vec())),
            ("bytes-in".into(), Value::Str(b"1200".to_vec())),
            ("bytes-out".into(), Value::Str(b"900".to_vec())),
        ]);
        let sa = Message(vec![
            ("uniqueid".into(), Value::Str(b"1".to_vec())),
            ("state".into(), Value::Str(b"ESTABLISHED".to_vec())),
            ("remote-host".into(), Value::Str(b"192.168.250.2".to_vec())),
            ("remote-port".into(), Value::Str(b"4500".to_vec())),
            (
                "remote-id".into(),
                Value::Str(b"O=Probe, CN=NB-IT-9999".to_vec()),
            ),
            ("remote-eap-id".into(), Value::Str(b"alice".to_vec())),
            (
                "remote-vips".into(),
                Value::List(vec![b"10.99.1.1".to_vec()]),
            ),
            (
                "child-sas".into(),
                Value::Section(Message(vec![("net-4".into(), Value::Section(child))])),
            ),
        ]);
        let event = Message(vec![
            ("up".into(), Value::Str(b"yes".to_vec())),
            ("rw".into(), Value::Section(sa)),
        ]);
        let sas = IkeSa::all_in(&event);
        assert_eq!(sas.len(), 1);
        let sa = &sas[0];
        assert!(sa.two_rounds());
        assert_eq!(sa.key(), "1@192.168.250.2");
        assert_eq!(ike_id(&sa.key()), Some(1));
        assert_eq!(sa.children.get("4"), Some(&(1200, 900)));
        let s = Settings {
            instance: "ikev2".into(),
            zone: "office".into(),
        };
        let r = connect_request(sa, Some("O=Stadt, CN=NB-IT-0001"), None, &s);
        assert_eq!(r.device_id, "NB-IT-0001");
        assert_eq!(r.username, "alice");
        assert_eq!(r.remote_addr, "192.168.250.2:4500");
        assert_eq!(r.tunnel_ip, "10.99.1.1");
        // Without the certificate round's identity, nothing names a device: never remote-id.
        let r = connect_request(sa, None, None, &s);
        assert!(r.device_id.is_empty() && r.common_name.is_empty());
    }
}
