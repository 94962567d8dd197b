//! Vendor profiles: what a concentrator's Access-Request says about the user and the device,
//! mapped onto a [`ConnectRequest`].
//!
//! - `cisco` (ASA/FTD AnyConnect): the device by ACIDex `Cisco-AVPair` `mdm-tlv=device-uid=…`,
//!   the hardware address from `mdm-tlv=device-mac=…`, the platform from
//!   `mdm-tlv=device-platform=…`. The client software reports these; they are not proof.
//! - `paloalto` (GlobalProtect): the device by `PaloAlto-Client-Hostname`, the platform from
//!   `PaloAlto-Client-OS`; no hardware address.
//! - `fortinet`, `generic`: only the attribute the client entry names (`device_attribute`).
//!
//! A configured `device_attribute` is read for every vendor and fills whichever of device uid and
//! host name the profile left empty. Without any device identity the request is refused as
//! unregistered, or its device checks are skipped where `missing_device` says so.

use std::net::{IpAddr, SocketAddr};

use crate::config::{DeviceAttribute, MissingDevice, Vendor};
use crate::wire::ConnectRequest;

use super::attr;
use super::clients::Nas;
use super::packet::Packet;

/// The VPN kind of every RADIUS session.
pub const VPN: &str = "radius";

fn text(v: &[u8]) -> Option<String> {
    std::str::from_utf8(v).ok().map(|s| s.trim().to_string())
}

/// A client address from `Calling-Station-Id` or `Tunnel-Client-Endpoint`, where one parses.
fn remote_addr(pkt: &Packet) -> String {
    let parse = |v: &[u8]| -> Option<String> {
        // Tunnel-Client-Endpoint may start with a tag octet (RFC 2868 3.3).
        let v = match v.first() {
            Some(&t) if t <= 0x1f => &v[1..],
            _ => v,
        };
        let s = std::str::from_utf8(v).ok()?.trim();
        if s.parse::<IpAddr>().is_ok() || s.parse::<SocketAddr>().is_ok() {
            Some(s.to_string())
        } else {
            None
        }
    };
    pkt.get(attr::CALLING_STATION_ID)
        .and_then(parse)
        .or_else(|| pkt.get(attr::TUNNEL_CLIENT_ENDPOINT).and_then(parse))
        .unwrap_or_default()
}

/// The configured device attribute's value, if the request carries it.
fn device_attribute(pkt: &Packet, which: &DeviceAttribute) -> Option<String> {
    match which {
        DeviceAttribute::Standard(kind) => pkt.get(*kind).and_then(text),
        DeviceAttribute::Vendor(vendor, kind) => {
            pkt.vendor_values(*vendor, *kind).next().and_then(text)
        }
        DeviceAttribute::AvPair(name) => pkt.cisco_avpair(name).map(|s| s.trim().to_string()),
    }
    .filter(|s| !s.is_empty())
}

/// The connect request an Access-Request from `nas` makes.
pub fn connect_request(
    nas: &Nas,
    pkt: &Packet,
    missing: MissingDevice,
    session_key: String,
) -> ConnectRequest {
    let c = &nas.config;
    let mut req = ConnectRequest {
        vpn: VPN.into(),
        instance: c.name.clone(),
        zone: c.zone.clone(),
        username: pkt.get(attr::USER_NAME).and_then(text).unwrap_or_default(),
        remote_addr: remote_addr(pkt),
        session_key,
        ..ConnectRequest::default()
    };
    match c.vendor {
        Vendor::Cisco => {
            let avpair = |name: &str| pkt.cisco_avpair(name).map(|s| s.trim().to_string());
            req.device_uid = avpair("mdm-tlv=device-uid").unwrap_or_default();
            req.hwaddr = avpair("mdm-tlv=device-mac").unwrap_or_default();
            req.platform = avpair("mdm-tlv=device-platform").unwrap_or_default();
        }
        Vendor::PaloAlto => {
            req.hostname = pkt
                .vendor_str(attr::paloalto::VENDOR_ID, attr::paloalto::CLIENT_HOSTNAME)
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            req.platform = pkt
                .vendor_str(attr::paloalto::VENDOR_ID, attr::paloalto::CLIENT_OS)
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            req.no_hwaddr_path = true;
        }
        Vendor::Fortinet | Vendor::Generic => req.no_hwaddr_path = true,
    }
    if let Some(value) = c
        .device_attribute
        .as_ref()
        .and_then(|which| device_attribute(pkt, which))
    {
        if req.device_uid.is_empty() {
            req.device_uid = value.clone();
        }
        if req.hostname.is_empty() {
            req.hostname = value;
        }
    }
    if req.device_uid.is_empty()
        && req.hostname.is_empty()
        && missing == MissingDevice::SkipDeviceChecks
    {
        req.skip_device_checks = true;
        req.no_hwaddr_path = true;
    }
    req
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{RadiusClient, SecretValue};
    use crate::vpn::radius::{Code, Secret};

    fn nas(vendor: Vendor, device_attribute: Option<DeviceAttribute>) -> Nas {
        let _ = SecretValue::clone;
        Nas {
            config: RadiusClient {
                name: "gw".into(),
                prefix: "192.0.2.1/32".parse().unwrap(),
                secret: test_secret(),
                vendor,
                zone: "office".into(),
                dae_port: 0,
                dae_address: None,
                device_attribute,
                require_message_authenticator: true,
            },
            secret: Secret::new("x").unwrap(),
        }
    }

    fn test_secret() -> SecretValue {
        // Built through the config loader in real use; tests need any value.
        crate::config::test_secret_value(b"x")
    }

    #[test]
    fn cisco_acidex_fills_uid_mac_platform() {
        let mut p = Packet::new(Code::AccessRequest, 1, [0; 16]);
        p.add(attr::USER_NAME, "alice").unwrap();
        p.add(attr::CALLING_STATION_ID, "198.51.100.9").unwrap();
        for v in [
            "mdm-tlv=device-uid=ABC123",
            "mdm-tlv=device-mac=aa-bb-cc-00-00-01",
            "mdm-tlv=device-platform=win",
        ] {
            p.add_vendor(9, 1, v.as_bytes()).unwrap();
        }
        let r = connect_request(
            &nas(Vendor::Cisco, None),
            &p,
            MissingDevice::Refuse,
            "k".into(),
        );
        assert_eq!(
            (
                r.username.as_str(),
                r.device_uid.as_str(),
                r.hwaddr.as_str()
            ),
            ("alice", "ABC123", "aa-bb-cc-00-00-01")
        );
        assert_eq!(r.remote_addr, "198.51.100.9");
        assert_eq!((r.vpn.as_str(), r.instance.as_str()), ("radius", "gw"));
        assert!(!r.no_hwaddr_path);
    }

    #[test]
    fn paloalto_hostname_fortinet_attribute_and_missing_device() {
        let mut p = Packet::new(Code::AccessRequest, 1, [0; 16]);
        p.add(attr::USER_NAME, "bob").unwrap();
        p.add(attr::TUNNEL_CLIENT_ENDPOINT, b"\x00203.0.113.5".to_vec())
            .unwrap();
        p.add_vendor(25461, 9, b"NB-IT-0001").unwrap();
        let r = connect_request(
            &nas(Vendor::PaloAlto, None),
            &p,
            MissingDevice::Refuse,
            "k".into(),
        );
        assert_eq!(r.hostname, "NB-IT-0001");
        assert_eq!(r.remote_addr, "203.0.113.5");
        assert!(r.no_hwaddr_path);
        let f = nas(Vendor::Fortinet, Some(DeviceAttribute::Vendor(25461, 9)));
        let r = connect_request(&f, &p, MissingDevice::Refuse, "k".into());
        assert_eq!(
            (r.device_uid.as_str(), r.hostname.as_str()),
            ("NB-IT-0001", "NB-IT-0001")
        );
        let g = nas(Vendor::Generic, None);
        let r = connect_request(&g, &p, MissingDevice::Refuse, "k".into());
        assert!(!r.skip_device_checks && r.device_uid.is_empty());
        let r = connect_request(&g, &p, MissingDevice::SkipDeviceChecks, "k".into());
        assert!(r.skip_device_checks);
    }
}
