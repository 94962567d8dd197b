//! The config file as written: serde structs that refuse unknown keys, before any checking.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::validate::{Invalid, bad};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) registry: RawRegistry,
    #[serde(default)]
    pub(super) store: RawStore,
    #[serde(default)]
    pub(super) policy: RawPolicy,
    #[serde(default)]
    pub(super) levels: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) capacity: RawCapacity,
    #[serde(default)]
    pub(super) org_units: Vec<RawOrgUnit>,
    #[serde(default)]
    pub(super) zones: Vec<RawZone>,
    #[serde(default)]
    pub(super) links: Vec<RawLink>,
    #[serde(default)]
    pub(super) openvpn: Vec<RawOpenvpn>,
    #[serde(default)]
    pub(super) strongswan: Vec<super::native::RawStrongswan>,
    #[serde(default)]
    pub(super) ocserv: Vec<super::native::RawOcserv>,
    #[serde(default)]
    pub(super) audit: RawAudit,
    pub(super) radius: Option<super::radius::RawRadius>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) socket: Option<String>,
    pub(super) socket_mode: Option<String>,
    #[serde(default)]
    pub(super) peer_uids: Ids,
    #[serde(default)]
    pub(super) peer_gids: Ids,
    pub(super) api_token_file: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) workers: Option<usize>,
    pub(super) header_timeout_ms: Option<u64>,
    pub(super) body_timeout_ms: Option<u64>,
}

/// A list of uids or gids: a TOML array, or (from the environment) one number or a
/// comma-separated text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Ids {
    Many(Vec<u32>),
    One(u32),
    Text(String),
}

impl Default for Ids {
    fn default() -> Self {
        Ids::Many(Vec::new())
    }
}

impl Ids {
    pub(super) fn list(self, key: &str) -> Result<Vec<u32>, Invalid> {
        match self {
            Ids::Many(v) => Ok(v),
            Ids::One(n) => Ok(vec![n]),
            Ids::Text(t) => t
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    p.parse()
                        .map_err(|_| bad(key, format!("`{p}` is not a numeric id")))
                })
                .collect(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegistry {
    pub(super) devices: Option<String>,
    pub(super) users: Option<String>,
    pub(super) watch_interval_s: Option<u64>,
    pub(super) max_removed_percent: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) path: Option<String>,
    pub(super) fail_mode: Option<String>,
    pub(super) synchronous: Option<String>,
    // Several concentrators on PostgreSQL (config/store.rs).
    pub(super) backend: Option<String>,
    pub(super) url: Option<String>,
    pub(super) password_file: Option<String>,
    pub(super) node: Option<String>,
    pub(super) lease_s: Option<u64>,
    pub(super) statement_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) require_disk_encryption: Option<bool>,
    pub(super) max_patch_age_days: Option<u32>,
    pub(super) remote_max_level: Option<u8>,
    pub(super) private_devices: Option<String>,
    pub(super) mail_zone: Option<String>,
    pub(super) default_org_unit: Option<String>,
    pub(super) require_hwaddr: Option<bool>,
    pub(super) match_serial: Option<bool>,
    pub(super) revoke_on_reload: Option<String>,
    pub(super) revoke_patch_grace_days: Option<u32>,
    pub(super) duplicate_device: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCapacity {
    pub(super) max_sessions: Option<u32>,
    pub(super) reserved_seats: Option<u32>,
    pub(super) max_sessions_per_user: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOrgUnit {
    pub(super) name: String,
    pub(super) level: u8,
    #[serde(default)]
    pub(super) quota: u32,
    #[serde(default)]
    pub(super) priority: bool,
    #[serde(default)]
    pub(super) remote_exception: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawZone {
    pub(super) name: String,
    #[serde(default)]
    pub(super) level: u8,
    pub(super) pool: Option<String>,
    pub(super) network: Option<String>,
    #[serde(default)]
    pub(super) routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawRoute {
    Plain(String),
    Leveled { prefix: String, level: u8 },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLink {
    pub(super) name: String,
    pub(super) interface: String,
    pub(super) speed_bits_per_second: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOpenvpn {
    pub(super) instance: String,
    pub(super) zone: String,
    pub(super) management: Option<String>,
    #[serde(default)]
    pub(super) client_auth: bool,
    pub(super) passthrough: Option<String>,
    pub(super) bytecount_interval_s: Option<u64>,
    pub(super) status_interval_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) path: Option<String>,
    pub(super) pseudonymise_key_file: Option<String>,
    pub(super) max_bytes: Option<u64>,
    pub(super) keep: Option<u32>,
}
