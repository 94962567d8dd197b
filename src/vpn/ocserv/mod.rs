//! ocserv: its connect/disconnect script environment to pforte's requests, and `occtl --json
//! show users` rows. Pure functions, so they can be tested and fuzzed alone; the `occtl` watcher
//! is [`occtl`].
//!
//! With certificate login ocserv hands a script only what `cert-user-oid` and `cert-group-oid`
//! extract from the client certificate, as `USERNAME` and `GROUPNAME`: no fingerprint, no
//! serial, no full subject. The device is therefore found by its inventory id in one of those two
//! fields ([`DeviceField`]), and the user is the other one (or, where that is empty, the device
//! field too).

pub mod occtl;

use std::collections::HashMap;

use serde::Deserialize;

use crate::wire::{ConnectRequest, DisconnectRequest};

/// Which of ocserv's script variables carries the device's inventory id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceField {
    /// `USERNAME` (filled by `cert-user-oid`).
    Username,
    /// `GROUPNAME` (filled by `cert-group-oid`); the user is then `USERNAME`.
    #[default]
    Groupname,
}

impl DeviceField {
    /// From the option's text: `username` or `groupname`.
    pub fn parse(s: &str) -> Option<DeviceField> {
        match s {
            "username" => Some(DeviceField::Username),
            "groupname" => Some(DeviceField::Groupname),
            _ => None,
        }
    }
}

/// The hook's settings.
#[derive(Debug, Clone, Default)]
pub struct OcservSettings {
    /// Instance name.
    pub instance: String,
    /// Zone.
    pub zone: String,
    /// Where the device id is.
    pub device_from: DeviceField,
}

fn get<'a>(env: &'a HashMap<String, String>, key: &str) -> &'a str {
    env.get(key).map(String::as_str).unwrap_or("")
}

/// The session key: ocserv's `ID` (the worker's pid, what `occtl disconnect id` takes) and the
/// client's real address, so a pid reused after an ocserv restart names a new session.
pub fn session_key(id: &str, real_ip: &str) -> String {
    format!("{id}@{real_ip}")
}

/// The session id and real address back from a key made by [`session_key`].
pub fn worker_id(key: &str) -> Option<u64> {
    key.split_once('@')?.0.parse().ok()
}

/// The device id and the user from ocserv's two certificate-derived names.
pub fn device_and_user<'a>(
    field: DeviceField,
    username: &'a str,
    groupname: &'a str,
) -> (&'a str, &'a str) {
    let (device, other) = match field {
        DeviceField::Username => (username, groupname),
        DeviceField::Groupname => (groupname, username),
    };
    (device, if other.is_empty() { device } else { other })
}

/// A connect request from a connect-script environment.
pub fn connect_request(env: &HashMap<String, String>, s: &OcservSettings) -> ConnectRequest {
    let (device, user) =
        device_and_user(s.device_from, get(env, "USERNAME"), get(env, "GROUPNAME"));
    ConnectRequest {
        vpn: "ocserv".into(),
        instance: s.instance.clone(),
        zone: s.zone.clone(),
        username: user.to_string(),
        common_name: device.to_string(),
        platform: get(env, "DEVICE_PLATFORM").to_string(),
        remote_addr: get(env, "IP_REAL").to_string(),
        tunnel_ip: get(env, "IP_REMOTE").to_string(),
        session_key: session_key(get(env, "ID"), get(env, "IP_REAL")),
        device_id: device.to_string(),
        ..Default::default()
    }
}

/// A disconnect request from a disconnect-script environment (`STATS_BYTES_IN` is what came
/// from the client).
pub fn disconnect_request(env: &HashMap<String, String>, s: &OcservSettings) -> DisconnectRequest {
    DisconnectRequest {
        session_id: String::new(),
        vpn: "ocserv".into(),
        instance: s.instance.clone(),
        session_key: session_key(get(env, "ID"), get(env, "IP_REAL")),
        bytes_received: get(env, "STATS_BYTES_IN").trim().parse().ok(),
        bytes_sent: get(env, "STATS_BYTES_OUT").trim().parse().ok(),
    }
}

/// One row of `occtl --json show users` (ocserv 1.1), the fields pforte reads.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct UserRow {
    /// The worker's pid (`ID` in the scripts).
    #[serde(rename = "ID")]
    pub id: u64,
    /// `USERNAME`.
    #[serde(rename = "Username", default)]
    pub username: String,
    /// `GROUPNAME`.
    #[serde(rename = "Groupname", default)]
    pub groupname: String,
    /// `connected`, or a state before it (`authenticating`, `pre-auth`).
    #[serde(rename = "State", default)]
    pub state: String,
    /// `IP_REAL`.
    #[serde(rename = "Remote IP", default)]
    pub remote_ip: String,
    /// `IP_REMOTE`: the tunnel address.
    #[serde(rename = "IPv4", default)]
    pub ipv4: String,
    /// Bytes received from the client, as decimal text.
    #[serde(rename = "RX", default)]
    pub rx: String,
    /// Bytes sent to the client, as decimal text.
    #[serde(rename = "TX", default)]
    pub tx: String,
}

impl UserRow {
    /// The session key of this row ([`session_key`]).
    pub fn key(&self) -> String {
        session_key(&self.id.to_string(), &self.remote_ip)
    }

    /// Received and sent bytes, where both are numbers.
    pub fn bytes(&self) -> Option<(u64, u64)> {
        Some((self.rx.trim().parse().ok()?, self.tx.trim().parse().ok()?))
    }

    /// A connect request for a client ocserv has and pforte does not (reconciliation).
    pub fn connect_request(&self, s: &OcservSettings) -> ConnectRequest {
        let (device, user) = device_and_user(s.device_from, &self.username, &self.groupname);
        ConnectRequest {
            vpn: "ocserv".into(),
            instance: s.instance.clone(),
            zone: s.zone.clone(),
            username: user.to_string(),
            common_name: device.to_string(),
            remote_addr: self.remote_ip.clone(),
            tunnel_ip: self.ipv4.clone(),
            session_key: self.key(),
            device_id: device.to_string(),
            ..Default::default()
        }
    }
}

/// Parses `occtl --json show users`: a JSON array of objects (empty output: no users).
pub fn parse_users(text: &str) -> Result<Vec<UserRow>, serde_json::Error> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The environment ocserv 1.1.6 gave a connect-script in a real run (certificate login,
    /// `cert-user-oid = 0.9.2342.19200300.100.1.1`, `cert-group-oid = 2.5.4.3`).
    fn seen() -> HashMap<String, String> {
        env(&[
            ("REASON", "connect"),
            ("USERNAME", "alice"),
            ("GROUPNAME", "NB-IT-0001"),
            ("DEVICE", "vpns0"),
            ("ID", "16152"),
            ("IP_REAL", "172.31.99.2"),
            ("IP_REAL_LOCAL", "172.31.99.1"),
            ("IP_LOCAL", "10.77.0.1"),
            ("IP_REMOTE", "10.77.0.50"),
            ("DEVICE_PLATFORM", ""),
            ("USER_AGENT", "Open AnyConnect VPN Agent v9.01-3"),
            ("OCSERV_ROUTES", "10.78.0.0/255.255.255.0 "),
        ])
    }

    #[test]
    fn maps_the_connect_script_environment() {
        let s = OcservSettings {
            instance: "ssl".into(),
            zone: "office".into(),
            device_from: DeviceField::Groupname,
        };
        let r = connect_request(&seen(), &s);
        assert_eq!(r.vpn, "ocserv");
        assert_eq!(r.device_id, "NB-IT-0001");
        assert_eq!(r.username, "alice");
        assert_eq!(r.remote_addr, "172.31.99.2");
        assert_eq!(r.tunnel_ip, "10.77.0.50");
        assert_eq!(r.session_key, "16152@172.31.99.2");
        assert!(r.cert_sha256.is_empty());
        let by_user = OcservSettings {
            device_from: DeviceField::Username,
            ..s.clone()
        };
        let r = connect_request(&seen(), &by_user);
        assert_eq!(
            (r.device_id.as_str(), r.username.as_str()),
            ("alice", "NB-IT-0001")
        );
        let mut lone = seen();
        lone.insert("GROUPNAME".into(), String::new());
        let r = connect_request(&lone, &by_user);
        assert_eq!(
            (r.device_id.as_str(), r.username.as_str()),
            ("alice", "alice")
        );

        let mut d = seen();
        d.insert("REASON".into(), "disconnect".into());
        d.insert("STATS_BYTES_IN".into(), "96".into());
        d.insert("STATS_BYTES_OUT".into(), "352".into());
        let d = disconnect_request(&d, &s);
        assert_eq!(d.session_key, "16152@172.31.99.2");
        assert_eq!((d.bytes_received, d.bytes_sent), (Some(96), Some(352)));
        assert_eq!(worker_id(&d.session_key), Some(16152));
        assert_eq!(worker_id("x"), None);
    }

    #[test]
    fn parses_occtl_show_users() {
        // Cut from `occtl --json show users` of ocserv 1.1.6 (a tab before list values, as seen).
        let text = r#"[
  {
    "ID":  16281,
    "Username":  "alice",
    "Groupname":  "NB-IT-0001",
    "State":  "connected",
    "vhost":  "default",
    "Device":  "vpns0",
    "Remote IP":  "172.31.99.2",
    "IPv4":  "10.77.0.50",
    "RX":  "48",
    "TX":  "352",
    "_RX":  "48 bytes",
    "DNS":	[],
    "Routes":	["10.78.0.0/255.255.255.0"]
  }
]"#;
        let rows = parse_users(text).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key(), "16281@172.31.99.2");
        assert_eq!(rows[0].bytes(), Some((48, 352)));
        let r = rows[0].connect_request(&OcservSettings::default());
        assert_eq!(r.device_id, "NB-IT-0001");
        assert!(parse_users("").unwrap().is_empty());
        assert!(parse_users("[]").unwrap().is_empty());
        assert!(parse_users("{").is_err());
    }
}
