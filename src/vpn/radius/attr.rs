//! Attribute numbers, vendor ids and Vendor-Specific (type 26) sub-attributes.
//!
//! The numbers are those of RFC 2865, 2866, 2868, 2869, 3579 and 5176, and of the vendor
//! dictionaries FreeRADIUS ships (`dictionary.cisco`, `dictionary.cisco.asa`,
//! `dictionary.paloalto`, `dictionary.fortinet`).

use thiserror::Error;

/// User-Name (1), string.
pub const USER_NAME: u8 = 1;
/// User-Password (2), hidden with the secret (RFC 2865 5.2).
pub const USER_PASSWORD: u8 = 2;
/// CHAP-Password (3).
pub const CHAP_PASSWORD: u8 = 3;
/// NAS-IP-Address (4), IPv4 address.
pub const NAS_IP_ADDRESS: u8 = 4;
/// NAS-Port (5), integer.
pub const NAS_PORT: u8 = 5;
/// Service-Type (6), integer.
pub const SERVICE_TYPE: u8 = 6;
/// Framed-Protocol (7), integer.
pub const FRAMED_PROTOCOL: u8 = 7;
/// Framed-IP-Address (8), IPv4 address.
pub const FRAMED_IP_ADDRESS: u8 = 8;
/// Framed-IP-Netmask (9), IPv4 address.
pub const FRAMED_IP_NETMASK: u8 = 9;
/// Reply-Message (18), string.
pub const REPLY_MESSAGE: u8 = 18;
/// Framed-Route (22), string (`"10.1.0.0/16 0.0.0.0 1"`).
pub const FRAMED_ROUTE: u8 = 22;
/// State (24), octets.
pub const STATE: u8 = 24;
/// Class (25), octets: sent in an Access-Accept, echoed by the NAS in its accounting.
pub const CLASS: u8 = 25;
/// Vendor-Specific (26): vendor id and vendor sub-attributes.
pub const VENDOR_SPECIFIC: u8 = 26;
/// Session-Timeout (27), integer, seconds.
pub const SESSION_TIMEOUT: u8 = 27;
/// Called-Station-Id (30), string.
pub const CALLED_STATION_ID: u8 = 30;
/// Calling-Station-Id (31), string: the client's address as the NAS saw it.
pub const CALLING_STATION_ID: u8 = 31;
/// NAS-Identifier (32), string.
pub const NAS_IDENTIFIER: u8 = 32;
/// Proxy-State (33), octets: copied unchanged into the answer.
pub const PROXY_STATE: u8 = 33;
/// Acct-Status-Type (40), integer (see [`acct_status`]).
pub const ACCT_STATUS_TYPE: u8 = 40;
/// Acct-Delay-Time (41), integer, seconds.
pub const ACCT_DELAY_TIME: u8 = 41;
/// Acct-Input-Octets (42), integer: octets received from the client (low 32 bits).
pub const ACCT_INPUT_OCTETS: u8 = 42;
/// Acct-Output-Octets (43), integer: octets sent to the client (low 32 bits).
pub const ACCT_OUTPUT_OCTETS: u8 = 43;
/// Acct-Session-Id (44), string.
pub const ACCT_SESSION_ID: u8 = 44;
/// Acct-Session-Time (46), integer, seconds.
pub const ACCT_SESSION_TIME: u8 = 46;
/// Acct-Terminate-Cause (49), integer.
pub const ACCT_TERMINATE_CAUSE: u8 = 49;
/// Acct-Input-Gigawords (52), integer: how often [`ACCT_INPUT_OCTETS`] wrapped past 2^32.
pub const ACCT_INPUT_GIGAWORDS: u8 = 52;
/// Acct-Output-Gigawords (53), integer: how often [`ACCT_OUTPUT_OCTETS`] wrapped past 2^32.
pub const ACCT_OUTPUT_GIGAWORDS: u8 = 53;
/// Event-Timestamp (55), seconds since 1970.
pub const EVENT_TIMESTAMP: u8 = 55;
/// NAS-Port-Type (61), integer (5 = Virtual).
pub const NAS_PORT_TYPE: u8 = 61;
/// Tunnel-Client-Endpoint (66), string (tagged).
pub const TUNNEL_CLIENT_ENDPOINT: u8 = 66;
/// Connect-Info (77), string (FortiGate SSL-VPN sends `vpn-ssl`).
pub const CONNECT_INFO: u8 = 77;
/// Message-Authenticator (80), 16 octets of HMAC-MD5 (RFC 3579 3.2).
pub const MESSAGE_AUTHENTICATOR: u8 = 80;
/// Error-Cause (101), integer (RFC 5176 3.5).
pub const ERROR_CAUSE: u8 = 101;

/// Values of Acct-Status-Type (RFC 2866 5.1).
pub mod acct_status {
    /// A session starts.
    pub const START: u32 = 1;
    /// A session ends.
    pub const STOP: u32 = 2;
    /// A running session's counters.
    pub const INTERIM_UPDATE: u32 = 3;
    /// The NAS starts: every session it had is gone.
    pub const ACCOUNTING_ON: u32 = 7;
    /// The NAS stops: every session it had is gone.
    pub const ACCOUNTING_OFF: u32 = 8;
}

/// Cisco (vendor 9, FreeRADIUS `dictionary.cisco`).
pub mod cisco {
    /// Cisco's SMI enterprise number.
    pub const VENDOR_ID: u32 = 9;
    /// Cisco-AVPair (1), string `name=value` (AnyConnect ACIDex: `mdm-tlv=device-uid=…`).
    pub const AVPAIR: u8 = 1;
}

/// Cisco ASA (vendor 3076, FreeRADIUS `dictionary.cisco.asa`).
pub mod cisco_asa {
    /// The enterprise number the ASA's VPN attributes use (the old VPN 3000's).
    pub const VENDOR_ID: u32 = 3076;
    /// ASA-TunnelGroupName (146), string.
    pub const TUNNEL_GROUP_NAME: u8 = 146;
    /// ASA-ClientType (150), integer (2 = AnyConnect SSL, 6 = AnyConnect IKEv2).
    pub const CLIENT_TYPE: u8 = 150;
}

/// Palo Alto Networks (vendor 25461, FreeRADIUS `dictionary.paloalto`).
pub mod paloalto {
    /// Palo Alto's SMI enterprise number.
    pub const VENDOR_ID: u32 = 25461;
    /// PaloAlto-User-Group (5), string.
    pub const USER_GROUP: u8 = 5;
    /// PaloAlto-User-Domain (6), string.
    pub const USER_DOMAIN: u8 = 6;
    /// PaloAlto-Client-Source-IP (7), string.
    pub const CLIENT_SOURCE_IP: u8 = 7;
    /// PaloAlto-Client-OS (8), string.
    pub const CLIENT_OS: u8 = 8;
    /// PaloAlto-Client-Hostname (9), string.
    pub const CLIENT_HOSTNAME: u8 = 9;
    /// PaloAlto-GlobalProtect-Client-Version (10), string.
    pub const GLOBALPROTECT_CLIENT_VERSION: u8 = 10;
}

/// Fortinet (vendor 12356, FreeRADIUS `dictionary.fortinet`).
pub mod fortinet {
    /// Fortinet's SMI enterprise number.
    pub const VENDOR_ID: u32 = 12356;
    /// Fortinet-Group-Name (1), string.
    pub const GROUP_NAME: u8 = 1;
    /// Fortinet-Client-IP-Address (2), IPv4 address.
    pub const CLIENT_IP_ADDRESS: u8 = 2;
    /// Fortinet-Vdom-Name (3), string.
    pub const VDOM_NAME: u8 = 3;
    /// Fortinet-Client-IPv6-Address (4), octets.
    pub const CLIENT_IPV6_ADDRESS: u8 = 4;
    /// Fortinet-Interface-Name (5), string.
    pub const INTERFACE_NAME: u8 = 5;
    /// Fortinet-Access-Profile (6), string.
    pub const ACCESS_PROFILE: u8 = 6;
}

/// The largest value an attribute can carry (its length octet counts the 2 header octets).
pub const MAX_VALUE_LEN: usize = 253;

/// Why an attribute's value is not what its type says.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AttrError {
    /// A string attribute that is not UTF-8.
    #[error("attribute {kind} is not UTF-8")]
    NotUtf8 {
        /// The attribute type.
        kind: u8,
    },
    /// An integer or address attribute of the wrong size.
    #[error("attribute {kind} has {got} octets, expected {expected}")]
    WrongSize {
        /// The attribute type.
        kind: u8,
        /// The size its type has.
        expected: usize,
        /// The size it came with.
        got: usize,
    },
    /// A Vendor-Specific value shorter than its vendor id, or whose sub-attributes do not tile it.
    #[error("malformed Vendor-Specific attribute")]
    BadVsa,
    /// A value, or a Vendor-Specific attribute being built, past 253 octets.
    #[error("attribute value of {len} octets is longer than 253")]
    TooLong {
        /// Its length.
        len: usize,
    },
}

/// One sub-attribute of a Vendor-Specific attribute, borrowed from the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VendorAttr<'a> {
    /// The vendor's SMI enterprise number.
    pub vendor_id: u32,
    /// The vendor's attribute type.
    pub vendor_type: u8,
    /// The value.
    pub value: &'a [u8],
}

/// Parses a Vendor-Specific value: a 4-octet vendor id, then one or more sub-attributes
/// `vendor type (1) | length (1, counting these 2) | value`, which must fill the rest exactly
/// (the layout RFC 2865 5.26 suggests, used by Cisco, Palo Alto and Fortinet).
pub fn parse_vsa(value: &[u8]) -> Result<Vec<VendorAttr<'_>>, AttrError> {
    let Some((id, mut rest)) = value.split_first_chunk::<4>() else {
        return Err(AttrError::BadVsa);
    };
    let vendor_id = u32::from_be_bytes(*id);
    // At most 253 octets, so at most 126 sub-attributes: bounded.
    let mut out = Vec::new();
    if rest.is_empty() {
        return Err(AttrError::BadVsa);
    }
    while let [vendor_type, len, tail @ ..] = rest {
        let len = usize::from(*len);
        if len < 2 || len - 2 > tail.len() {
            return Err(AttrError::BadVsa);
        }
        let (sub, after) = tail.split_at(len - 2);
        out.push(VendorAttr {
            vendor_id,
            vendor_type: *vendor_type,
            value: sub,
        });
        rest = after;
    }
    if rest.is_empty() {
        Ok(out)
    } else {
        Err(AttrError::BadVsa)
    }
}

/// Builds a Vendor-Specific value holding `subs` (vendor type, value) under one vendor id.
pub fn build_vsa(vendor_id: u32, subs: &[(u8, &[u8])]) -> Result<Vec<u8>, AttrError> {
    let mut out = Vec::with_capacity(MAX_VALUE_LEN);
    out.extend_from_slice(&vendor_id.to_be_bytes());
    for (vendor_type, value) in subs {
        let len =
            u8::try_from(value.len() + 2).map_err(|_| AttrError::TooLong { len: value.len() })?;
        out.push(*vendor_type);
        out.push(len);
        out.extend_from_slice(value);
        if out.len() > MAX_VALUE_LEN {
            return Err(AttrError::TooLong { len: out.len() });
        }
    }
    if subs.is_empty() {
        return Err(AttrError::BadVsa);
    }
    Ok(out)
}

/// Splits a Cisco-AVPair `name=value` (or optional `name*value`) at its first separator.
pub fn split_avpair(pair: &str) -> Option<(&str, &str)> {
    let at = pair.find(['=', '*'])?;
    Some((&pair[..at], &pair[at + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsa_with_several_sub_attributes_parses() {
        let value = build_vsa(
            paloalto::VENDOR_ID,
            &[
                (paloalto::CLIENT_HOSTNAME, b"laptop-7"),
                (paloalto::CLIENT_OS, b"Windows"),
            ],
        )
        .unwrap();
        let subs = parse_vsa(&value).unwrap();
        assert_eq!(subs.len(), 2);
        assert_eq!(subs[0].vendor_id, 25461);
        assert_eq!(subs[0].vendor_type, 9);
        assert_eq!(subs[0].value, b"laptop-7");
        assert_eq!(subs[1].vendor_type, 8);
        assert_eq!(subs[1].value, b"Windows");
    }

    #[test]
    fn malformed_vsas_are_refused() {
        assert_eq!(parse_vsa(b""), Err(AttrError::BadVsa));
        assert_eq!(parse_vsa(&[0, 0, 0, 9]), Err(AttrError::BadVsa));
        // Sub-attribute length 1, past the end, and a stray octet after a good one.
        assert_eq!(parse_vsa(&[0, 0, 0, 9, 1, 1]), Err(AttrError::BadVsa));
        assert_eq!(parse_vsa(&[0, 0, 0, 9, 1, 9, b'a']), Err(AttrError::BadVsa));
        assert_eq!(
            parse_vsa(&[0, 0, 0, 9, 1, 3, b'a', 7]),
            Err(AttrError::BadVsa)
        );
        // An empty sub-attribute value is well-formed.
        assert_eq!(parse_vsa(&[0, 0, 0, 9, 1, 2]).unwrap()[0].value, b"");
    }

    #[test]
    fn build_vsa_refuses_too_long_and_empty() {
        let big = [b'x'; 250];
        assert!(matches!(
            build_vsa(9, &[(1, &big)]),
            Err(AttrError::TooLong { .. })
        ));
        assert!(build_vsa(9, &[(1, &big[..247])]).is_ok());
        assert!(build_vsa(9, &[(1, &big[..248])]).is_err());
        assert_eq!(build_vsa(9, &[]), Err(AttrError::BadVsa));
    }

    #[test]
    fn avpair_splits_at_first_separator() {
        assert_eq!(
            split_avpair("mdm-tlv=device-uid=ABC123"),
            Some(("mdm-tlv", "device-uid=ABC123"))
        );
        assert_eq!(
            split_avpair("shell:priv-lvl*15"),
            Some(("shell:priv-lvl", "15"))
        );
        assert_eq!(split_avpair("noseparator"), None);
    }
}
