//! OpenVPN: its script environment to pforte's requests and back to a client-connect dynamic
//! config file. Pure functions, so they can be tested and fuzzed alone.

pub mod management;
pub mod mgmt;

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::wire::ConnectRequest;
use crate::wire::{DisconnectRequest, Push};

/// Where the hook's settings come from: flags, else OpenVPN `setenv` variables.
#[derive(Debug, Clone, Default)]
pub struct HookSettings {
    /// Instance name.
    pub instance: String,
    /// Zone.
    pub zone: String,
}

fn get<'a>(env: &'a HashMap<String, String>, key: &str) -> &'a str {
    env.get(key).map(String::as_str).unwrap_or("")
}

/// The real remote address, `ip:port` (IPv6 as `[ip]:port`).
pub fn remote_addr(env: &HashMap<String, String>) -> String {
    let ip = ["trusted_ip", "trusted_ip6", "untrusted_ip", "untrusted_ip6"]
        .iter()
        .map(|k| get(env, k))
        .find(|v| !v.is_empty())
        .unwrap_or("");
    let port = ["trusted_port", "untrusted_port"]
        .iter()
        .map(|k| get(env, k))
        .find(|v| !v.is_empty())
        .unwrap_or("");
    match (ip.parse::<IpAddr>(), port.is_empty()) {
        (Ok(IpAddr::V6(v6)), false) => format!("[{v6}]:{port}"),
        (Ok(_), false) => format!("{ip}:{port}"),
        _ => ip.to_string(),
    }
}

/// The session key: the real address and port plus the connect time. OpenVPN gives both to
/// client-connect and client-disconnect (where `time_unix` is still the connect time), so a
/// disconnect after a refused connect never matches an admitted session of the same address.
pub fn session_key(env: &HashMap<String, String>) -> String {
    let addr = remote_addr(env);
    let t = get(env, "time_unix");
    if t.is_empty() {
        addr
    } else {
        format!("{addr}@{t}")
    }
}

/// A connect request from a client-connect (or management CONNECT) environment.
pub fn connect_request(env: &HashMap<String, String>, s: &HookSettings) -> ConnectRequest {
    let username = get(env, "username");
    ConnectRequest {
        vpn: "openvpn".into(),
        instance: s.instance.clone(),
        zone: s.zone.clone(),
        username: username.to_string(),
        common_name: get(env, "common_name").to_string(),
        cert_sha256: get(env, "tls_digest_sha256_0").to_string(),
        cert_serial: get(env, "tls_serial_0").to_string(),
        hwaddr: get(env, "IV_HWADDR").to_string(),
        platform: get(env, "IV_PLAT").to_string(),
        remote_addr: remote_addr(env),
        tunnel_ip: get(env, "ifconfig_pool_remote_ip").to_string(),
        session_key: session_key(env),
        device_id: String::new(),
    }
}

/// A disconnect request from a client-disconnect environment.
pub fn disconnect_request(env: &HashMap<String, String>, s: &HookSettings) -> DisconnectRequest {
    DisconnectRequest {
        session_id: String::new(),
        vpn: "openvpn".into(),
        instance: s.instance.clone(),
        session_key: session_key(env),
        bytes_received: get(env, "bytes_received").trim().parse().ok(),
        bytes_sent: get(env, "bytes_sent").trim().parse().ok(),
    }
}

/// The client-connect dynamic config file: `ifconfig-push` from the zone's pool and a
/// `push "route …"` per permitted route.
pub fn dynamic_config(push: &Push) -> String {
    let mut out = String::new();
    if let Some(ifc) = &push.ifconfig {
        match ifc.ip {
            IpAddr::V4(ip) => out.push_str(&format!("ifconfig-push {ip} {}\n", ifc.netmask)),
            IpAddr::V6(ip) => {
                out.push_str(&format!("ifconfig-ipv6-push {ip}/{}\n", ifc.prefix_len))
            }
        }
    }
    for r in &push.routes {
        match r {
            IpNet::V4(n) => {
                out.push_str(&format!("push \"route {} {}\"\n", n.network(), n.netmask()))
            }
            IpNet::V6(n) => out.push_str(&format!("push \"route-ipv6 {n}\"\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Ifconfig;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn maps_client_connect_env() {
        let e = env(&[
            ("common_name", "alice-laptop"),
            ("tls_digest_sha256_0", "ab:cd"),
            ("tls_serial_0", "17"),
            ("IV_HWADDR", "aa:bb:cc:dd:ee:ff"),
            ("IV_PLAT", "linux"),
            ("trusted_ip", "198.51.100.7"),
            ("trusted_port", "50123"),
            ("time_unix", "1700000000"),
            ("ifconfig_pool_remote_ip", "10.8.0.2"),
            ("password", "secret"),
        ]);
        let s = HookSettings {
            instance: "office-udp".into(),
            zone: "office".into(),
        };
        let r = connect_request(&e, &s);
        assert_eq!(r.identity(), "alice-laptop");
        assert_eq!(r.remote_addr, "198.51.100.7:50123");
        assert_eq!(r.session_key, "198.51.100.7:50123@1700000000");
        assert_eq!(r.hwaddr, "aa:bb:cc:dd:ee:ff");
        assert!(!format!("{r:?}").contains("secret"));
        let d = disconnect_request(
            &env(&[
                ("trusted_ip6", "2001:db8::1"),
                ("trusted_port", "1"),
                ("bytes_sent", "9"),
            ]),
            &s,
        );
        assert_eq!(d.session_key, "[2001:db8::1]:1");
        assert_eq!(d.bytes_sent, Some(9));
        assert_eq!(d.bytes_received, None);
    }

    #[test]
    fn dynamic_config_lines() {
        let p = Push {
            ifconfig: Some(Ifconfig {
                ip: "10.80.0.5".parse().unwrap(),
                netmask: "255.255.240.0".into(),
                prefix_len: 20,
            }),
            routes: vec![
                "10.1.0.0/16".parse().unwrap(),
                "2001:db8::/48".parse().unwrap(),
            ],
        };
        assert_eq!(
            dynamic_config(&p),
            "ifconfig-push 10.80.0.5 255.255.240.0\npush \"route 10.1.0.0 255.255.0.0\"\npush \"route-ipv6 2001:db8::/48\"\n"
        );
    }
}
