//! What crosses the wire between a VPN server and the daemon: connect and disconnect requests,
//! the answer, the decision and its reason code. A leaf: the hook process (which must start fast
//! and knows nothing of sessions), the HTTP API and every VPN integration share these types.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::session::Selector;

/// Why a connection was refused. The snake_case codes are a contract (README, metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Required fields missing or malformed.
    BadRequest,
    /// No registry entry for the certificate.
    UnregisteredDevice,
    /// Registered hardware address does not match.
    DeviceMismatch,
    /// A private device.
    PrivateDevice,
    /// Lost, stolen, retired or blocked.
    DeviceBlocked,
    /// Disk encryption not recorded.
    NotEncrypted,
    /// Last patch too old.
    PatchOverdue,
    /// User unknown and no default org unit.
    UnknownUser,
    /// Device assigned to other users.
    UserNotAssigned,
    /// Level above the remote ceiling without exception.
    RemoteWorkNotPermitted,
    /// Device cleared for a lower level.
    DeviceClearance,
    /// Zone not configured.
    UnknownZone,
    /// All seats taken.
    CapacityFull,
    /// Org unit quota used up.
    OrgUnitQuota,
    /// User has the maximum number of sessions.
    UserSessionLimit,
    /// The session store cannot record the session and the fail mode is closed.
    StoreUnavailable,
    /// The device holds a live session from another real address (`policy.duplicate_device =
    /// "refuse"`).
    DuplicateDevice,
    /// No upstream credential server answered a RADIUS login (RADIUS front with upstreams).
    UpstreamUnavailable,
}

impl Reason {
    /// Every reason, in the order the checks run.
    pub const ALL: [Reason; 18] = [
        Reason::BadRequest,
        Reason::UnregisteredDevice,
        Reason::DeviceMismatch,
        Reason::PrivateDevice,
        Reason::DeviceBlocked,
        Reason::NotEncrypted,
        Reason::PatchOverdue,
        Reason::UnknownUser,
        Reason::UserNotAssigned,
        Reason::RemoteWorkNotPermitted,
        Reason::DeviceClearance,
        Reason::UnknownZone,
        Reason::CapacityFull,
        Reason::OrgUnitQuota,
        Reason::UserSessionLimit,
        Reason::StoreUnavailable,
        Reason::DuplicateDevice,
        Reason::UpstreamUnavailable,
    ];

    /// The stable code.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadRequest => "bad_request",
            Reason::UnregisteredDevice => "unregistered_device",
            Reason::DeviceMismatch => "device_mismatch",
            Reason::PrivateDevice => "private_device",
            Reason::DeviceBlocked => "device_blocked",
            Reason::NotEncrypted => "not_encrypted",
            Reason::PatchOverdue => "patch_overdue",
            Reason::UnknownUser => "unknown_user",
            Reason::UserNotAssigned => "user_not_assigned",
            Reason::RemoteWorkNotPermitted => "remote_work_not_permitted",
            Reason::DeviceClearance => "device_clearance",
            Reason::UnknownZone => "unknown_zone",
            Reason::CapacityFull => "capacity_full",
            Reason::OrgUnitQuota => "org_unit_quota",
            Reason::UserSessionLimit => "user_session_limit",
            Reason::StoreUnavailable => "store_unavailable",
            Reason::DuplicateDevice => "duplicate_device",
            Reason::UpstreamUnavailable => "upstream_unavailable",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the code and one human sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The code.
    pub reason: Reason,
    /// One sentence a help desk can read out.
    pub message: String,
}

/// The VPN kinds pforte knows.
pub const VPN_KINDS: [&str; 5] = ["openvpn", "strongswan", "ocserv", "radius", "other"];

/// Longest accepted value of any request field.
pub const MAX_FIELD_LEN: usize = 1024;

/// What the VPN knows about a connection (`POST /v1/connect`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ConnectRequest {
    /// openvpn | strongswan | ocserv | radius | other.
    pub vpn: String,
    /// VPN server instance.
    pub instance: String,
    /// Zone asked for.
    pub zone: String,
    /// Login name (falls back to the certificate common name).
    pub username: String,
    /// Certificate common name.
    pub common_name: String,
    /// Certificate SHA-256 fingerprint.
    pub cert_sha256: String,
    /// Certificate serial.
    pub cert_serial: String,
    /// Hardware address reported by the client.
    pub hwaddr: String,
    /// Client platform.
    pub platform: String,
    /// Real remote address, ip:port.
    pub remote_addr: String,
    /// Tunnel address the VPN picked.
    pub tunnel_ip: String,
    /// The VPN's own key for the session.
    pub session_key: String,
    /// A stable device id the concentrator reports (Cisco ACIDex `device-uid`).
    pub device_uid: String,
    /// The device's host name as the concentrator reports it (Palo Alto).
    pub hostname: String,
    /// Set by integrations whose requests never carry a hardware address (RADIUS profiles
    /// other than Cisco's): the hardware-address rule does not apply. Not read from JSON.
    #[serde(skip)]
    pub no_hwaddr_path: bool,
    /// Set by an integration configured to skip the device checks when a request carries no
    /// device identity at all (RADIUS `missing_device = "skip-device-checks"`). Not read
    /// from JSON.
    #[serde(skip)]
    pub skip_device_checks: bool,
    /// The device's inventory id, where the VPN identifies the device by a certificate field
    /// naming it rather than by the certificate's fingerprint (ocserv's `cert-user-oid` /
    /// `cert-group-oid`, strongSwan's certificate round). Used only when neither `cert_sha256`
    /// nor `cert_serial` is given.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub device_id: String,
}

impl ConnectRequest {
    /// The user's identity: the login name, else the certificate common name.
    pub fn identity(&self) -> &str {
        if self.username.is_empty() {
            &self.common_name
        } else {
            &self.username
        }
    }
}

/// Address configuration pushed to an allowed client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ifconfig {
    /// The client's tunnel address.
    pub ip: IpAddr,
    /// Netmask of the pool (IPv4) or prefix length form.
    pub netmask: String,
    /// Prefix length of the pool.
    pub prefix_len: u8,
}

/// What to push to an allowed client.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Push {
    /// Address from the zone's pool, where the zone has one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ifconfig: Option<Ifconfig>,
    /// Routes the device's clearance permits.
    #[serde(default)]
    pub routes: Vec<IpNet>,
}

/// The verdict of a connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Admitted.
    Allow,
    /// Refused, with a reason.
    Deny,
}

impl Decision {
    /// `allow` or `deny`, as on the wire and in the `decision` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

/// A request body that cannot be read, with what is wrong in one sentence (the 400's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

/// The answer to a connect (`POST /v1/connect`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectResponse {
    /// `allow` or `deny`.
    pub decision: Decision,
    /// The reason code, on deny.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<Reason>,
    /// One human sentence.
    pub message: String,
    /// The session id, on allow.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub session_id: Option<String>,
    /// What to push, on allow.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub push: Option<Push>,
}

impl ConnectResponse {
    /// A refusal.
    pub fn deny(d: &Denial) -> ConnectResponse {
        ConnectResponse {
            decision: Decision::Deny,
            reason: Some(d.reason),
            message: d.message.clone(),
            session_id: None,
            push: None,
        }
    }

    /// Whether it allows.
    pub fn allowed(&self) -> bool {
        self.decision == Decision::Allow
    }
}

/// A disconnect (`POST /v1/disconnect`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DisconnectRequest {
    /// pforte's session id.
    pub session_id: String,
    /// VPN kind (with instance and session_key, instead of session_id).
    pub vpn: String,
    /// Instance.
    pub instance: String,
    /// The VPN's key.
    pub session_key: String,
    /// Final bytes received from the client.
    pub bytes_received: Option<u64>,
    /// Final bytes sent to the client.
    pub bytes_sent: Option<u64>,
}

impl DisconnectRequest {
    /// The session it names, or why it names none.
    pub fn selector(&self) -> Result<Selector, Malformed> {
        if !self.session_id.is_empty() {
            return Ok(Selector::Id(self.session_id.clone()));
        }
        if self.vpn.is_empty() || self.session_key.is_empty() {
            return Err(Malformed(
                "give `session_id`, or `vpn`, `instance` and `session_key`".to_string(),
            ));
        }
        Ok(Selector::Key {
            vpn: self.vpn.clone(),
            instance: self.instance.clone(),
            session_key: self.session_key.clone(),
        })
    }
}
