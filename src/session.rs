//! A session's own types: the record the table, the store, the audit log and the API share, and
//! the ways to name one. A leaf, so the store and the session table need not import each other.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// A live session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    /// pforte's id.
    pub id: String,
    /// VPN kind.
    pub vpn: String,
    /// VPN server instance.
    pub instance: String,
    /// The VPN's own key for the session.
    pub session_key: String,
    /// Zone.
    pub zone: String,
    /// The user's org unit.
    pub org_unit: String,
    /// The user's effective level.
    pub level: u8,
    /// The org unit may use reserved seats.
    pub priority: bool,
    /// Device inventory id.
    pub device_id: String,
    /// User.
    pub username: String,
    /// Certificate common name.
    pub common_name: String,
    /// Real remote address.
    pub remote_addr: String,
    /// Tunnel address.
    pub tunnel_ip: Option<IpAddr>,
    /// The tunnel address was taken from the zone's pool by pforte.
    pub pool_ip: bool,
    /// Unix time of admission.
    pub started_at: i64,
    /// Bytes received from the client (latest known).
    pub bytes_received: u64,
    /// Bytes sent to the client (latest known).
    pub bytes_sent: u64,
    /// The pforte node the session belongs to, with a shared store (PostgreSQL); empty with
    /// SQLite, and then not shown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
}

/// How a disconnect or kill names its session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// pforte's id.
    Id(String),
    /// The VPN's key.
    Key {
        /// VPN kind.
        vpn: String,
        /// Instance.
        instance: String,
        /// The VPN's session key.
        session_key: String,
    },
}

/// A request to end a session at the VPN server (client-kill), for the VPN integrations.
#[derive(Debug, Clone)]
pub struct KillRequest {
    /// The session as it was.
    pub session: Session,
    /// Why, for the log.
    pub why: String,
}
