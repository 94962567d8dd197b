//! From the raw file to the runtime [`Config`]: addresses and prefixes parsed, defaults filled,
//! contradictions refused, each with the key it concerns.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::raw::*;
use super::*;

pub(super) type Invalid = (String, String);

pub(super) fn bad(key: impl Into<String>, problem: impl Into<String>) -> Invalid {
    (key.into(), problem.into())
}

pub(super) fn validate(path: &Path, raw: RawConfig) -> Result<Config, Invalid> {
    let server = validate_server(raw.server)?;
    let registry = RegistryConfig {
        devices: PathBuf::from(
            raw.registry
                .devices
                .ok_or_else(|| bad("registry.devices", "missing: path of the device registry"))?,
        ),
        users: raw.registry.users.map(PathBuf::from),
        watch_interval: Duration::from_secs(raw.registry.watch_interval_s.unwrap_or(2)),
        max_removed_percent: match raw.registry.max_removed_percent.unwrap_or(10) {
            p @ 0..=100 => p,
            p => {
                return Err(bad(
                    "registry.max_removed_percent",
                    format!("{p} is not a share in percent (0 to 100)"),
                ));
            }
        },
    };
    let backend = super::store::backend(&raw.store)?;
    let store = StoreConfig {
        backend,
        path: PathBuf::from(
            raw.store
                .path
                .unwrap_or_else(|| "state/pforte.db".to_string()),
        ),
        fail_mode: match raw.store.fail_mode.as_deref().unwrap_or("closed") {
            "closed" => FailMode::Closed,
            "open" => FailMode::Open,
            other => {
                return Err(bad(
                    "store.fail_mode",
                    format!("`{other}` is not one of closed, open"),
                ));
            }
        },
        durability: match raw.store.synchronous.as_deref().unwrap_or("normal") {
            "full" => Durability::Full,
            "normal" => Durability::Normal,
            other => {
                return Err(bad(
                    "store.synchronous",
                    format!("`{other}` is not one of full, normal"),
                ));
            }
        },
    };
    let rules = validate_rules(
        raw.policy,
        raw.levels,
        raw.capacity,
        raw.org_units,
        raw.zones,
    )?;
    let links = validate_links(raw.links)?;
    let openvpn = validate_openvpn(raw.openvpn, &rules)?;
    let radius = super::radius::validate_radius(raw.radius, &rules)?;
    let strongswan = super::native::validate_strongswan(raw.strongswan, &rules)?;
    let ocserv = super::native::validate_ocserv(raw.ocserv, &rules)?;
    let audit = AuditConfig {
        path: raw.audit.path.map(PathBuf::from),
        pseudonymise_key_file: raw.audit.pseudonymise_key_file.map(PathBuf::from),
        max_bytes: raw.audit.max_bytes.unwrap_or(100 * 1024 * 1024),
        keep: raw.audit.keep.unwrap_or(10),
    };
    if server.listen.is_none() && server.socket.is_none() {
        return Err(bad(
            "server",
            "neither `listen` nor `socket` is set: pforte would be unreachable",
        ));
    }
    Ok(Config {
        source: path.to_path_buf(),
        server,
        registry,
        store,
        rules,
        links,
        openvpn,
        strongswan,
        ocserv,
        audit,
        radius,
    })
}

/// Request threads by default. One: on a small machine (2 cores here) one worker beside the
/// store's writer thread spends less CPU per decision than two, which wake and steal from
/// each other, and leaves the other core to the VPN server (docs/BENCHMARKS-HISTORY.md, fourth
/// session). More only help once one worker is saturated.
pub const DEFAULT_WORKERS: usize = 1;
/// Most request threads the config may ask for.
pub const MAX_WORKERS: usize = 256;

pub(super) fn validate_server(raw: RawServer) -> Result<ServerConfig, Invalid> {
    let listen = match raw.listen {
        Some(s) if !s.is_empty() => Some(s.parse::<SocketAddr>().map_err(|e| {
            bad(
                "server.listen",
                format!("`{s}` is not an address:port ({e})"),
            )
        })?),
        _ => None,
    };
    let socket_mode = match raw.socket_mode {
        Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                bad(
                    "server.socket_mode",
                    format!("`{s}` is not an octal file mode like \"0660\""),
                )
            })?,
        None => 0o660,
    };
    let header_timeout = Duration::from_millis(raw.header_timeout_ms.unwrap_or(5_000));
    let body_timeout = Duration::from_millis(raw.body_timeout_ms.unwrap_or(5_000));
    if header_timeout.is_zero() || body_timeout.is_zero() {
        return Err(bad("server", "timeouts must be greater than zero"));
    }
    let workers = raw.workers.unwrap_or(DEFAULT_WORKERS);
    if !(1..=MAX_WORKERS).contains(&workers) {
        return Err(bad(
            "server.workers",
            format!("{workers} is not between 1 and {MAX_WORKERS}"),
        ));
    }
    Ok(ServerConfig {
        listen,
        socket: raw.socket.filter(|s| !s.is_empty()).map(PathBuf::from),
        socket_mode,
        peer_uids: raw.peer_uids.list("server.peer_uids")?,
        peer_gids: raw.peer_gids.list("server.peer_gids")?,
        api_token_file: raw
            .api_token_file
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        max_connections: raw.max_connections.unwrap_or(4096).max(1),
        workers,
        header_timeout,
        body_timeout,
    })
}

pub(super) fn validate_rules(
    policy: RawPolicy,
    raw_levels: BTreeMap<String, String>,
    capacity: RawCapacity,
    org_units: Vec<RawOrgUnit>,
    zones: Vec<RawZone>,
) -> Result<Rules, Invalid> {
    let mut levels = BTreeMap::new();
    for (k, v) in raw_levels {
        let n: u8 = k.parse().map_err(|_| {
            bad(
                format!("levels.{k}"),
                "level keys are small integers like \"2\"",
            )
        })?;
        levels.insert(n, v);
    }
    let known_level = |key: String, level: u8| -> Result<(), Invalid> {
        if !levels.is_empty() && !levels.contains_key(&level) {
            return Err(bad(
                key,
                format!("level {level} is not defined in [levels]"),
            ));
        }
        Ok(())
    };
    let mut units = HashMap::new();
    for (i, ou) in org_units.into_iter().enumerate() {
        let key = format!("org_units[{i}]");
        check_label(&format!("{key}.name"), &ou.name)?;
        known_level(format!("{key}.level"), ou.level)?;
        if units.contains_key(&ou.name) {
            return Err(bad(
                format!("{key}.name"),
                format!("org unit `{}` is defined twice", ou.name),
            ));
        }
        units.insert(
            ou.name.clone(),
            OrgUnit {
                name: ou.name,
                level: ou.level,
                quota: ou.quota,
                priority: ou.priority,
                remote_exception: ou.remote_exception,
            },
        );
    }
    if units.is_empty() {
        return Err(bad(
            "org_units",
            "at least one [[org_units]] entry is needed",
        ));
    }
    let mut zone_map = HashMap::new();
    for (i, z) in zones.into_iter().enumerate() {
        let key = format!("zones[{i}]");
        check_label(&format!("{key}.name"), &z.name)?;
        known_level(format!("{key}.level"), z.level)?;
        let pool = match z.pool.as_deref() {
            Some(p) if !p.is_empty() => {
                let net: IpNet = p.parse().map_err(|e| {
                    bad(
                        format!("{key}.pool"),
                        format!("`{p}` is not a CIDR prefix ({e})"),
                    )
                })?;
                if net.prefix_len() + 2 > net.max_prefix_len() {
                    return Err(bad(
                        format!("{key}.pool"),
                        "a pool needs at least a /30 (IPv4) or /126 (IPv6)",
                    ));
                }
                Some(net.trunc())
            }
            _ => None,
        };
        let network = match (z.network.as_deref().filter(|n| !n.is_empty()), pool) {
            (None, pool) => pool,
            (Some(n), None) => {
                return Err(bad(
                    format!("{key}.network"),
                    format!("`{n}` is given but the zone has no pool"),
                ));
            }
            (Some(n), Some(pool)) => {
                let net: IpNet = n.parse().map_err(|e| {
                    bad(
                        format!("{key}.network"),
                        format!("`{n}` is not a CIDR prefix ({e})"),
                    )
                })?;
                let net = net.trunc();
                if !net.contains(&pool) {
                    return Err(bad(
                        format!("{key}.pool"),
                        format!("pool {pool} lies outside the tunnel network {net}"),
                    ));
                }
                Some(net)
            }
        };
        let mut routes = Vec::new();
        for (j, r) in z.routes.into_iter().enumerate() {
            let (text, level) = match r {
                RawRoute::Plain(s) => (s, z.level),
                RawRoute::Leveled { prefix, level } => (prefix, level),
            };
            let prefix: IpNet = text.parse().map_err(|e| {
                bad(
                    format!("{key}.routes[{j}]"),
                    format!("`{text}` is not a CIDR prefix ({e})"),
                )
            })?;
            routes.push(Route {
                prefix: prefix.trunc(),
                level,
            });
        }
        if zone_map.contains_key(&z.name) {
            return Err(bad(
                format!("{key}.name"),
                format!("zone `{}` is defined twice", z.name),
            ));
        }
        zone_map.insert(
            z.name.clone(),
            Zone {
                name: z.name,
                level: z.level,
                pool,
                network,
                routes,
            },
        );
    }
    if zone_map.is_empty() {
        return Err(bad("zones", "at least one [[zones]] entry is needed"));
    }
    let private_devices = match policy.private_devices.as_deref().unwrap_or("refuse") {
        "refuse" => PrivateDevices::Refuse,
        "mail-only" => PrivateDevices::MailOnly,
        other => {
            return Err(bad(
                "policy.private_devices",
                format!("`{other}` is not one of refuse, mail-only"),
            ));
        }
    };
    let mail_zone = policy.mail_zone.unwrap_or_else(|| "mail".to_string());
    if private_devices == PrivateDevices::MailOnly && !zone_map.contains_key(&mail_zone) {
        return Err(bad(
            "policy.mail_zone",
            format!("private_devices is mail-only but zone `{mail_zone}` is not configured"),
        ));
    }
    let default_org_unit = policy.default_org_unit.filter(|s| !s.is_empty());
    if let Some(ou) = &default_org_unit
        && !units.contains_key(ou)
    {
        return Err(bad(
            "policy.default_org_unit",
            format!("org unit `{ou}` is not configured in [[org_units]]"),
        ));
    }
    let revoke_on_reload = match policy.revoke_on_reload.as_deref().unwrap_or("all-checks") {
        "all-checks" => Revocation::AllChecks,
        "blocked-only" => Revocation::BlockedOnly,
        other => {
            return Err(bad(
                "policy.revoke_on_reload",
                format!("`{other}` is not one of all-checks, blocked-only"),
            ));
        }
    };
    let duplicate_device = match policy.duplicate_device.as_deref().unwrap_or("replace") {
        "replace" => DuplicateDevice::Replace,
        "refuse" => DuplicateDevice::Refuse,
        other => {
            return Err(bad(
                "policy.duplicate_device",
                format!("`{other}` is not one of replace, refuse"),
            ));
        }
    };
    let capacity = Capacity {
        max_sessions: capacity.max_sessions.unwrap_or(500),
        reserved_seats: capacity.reserved_seats.unwrap_or(0),
        max_sessions_per_user: capacity.max_sessions_per_user.unwrap_or(2),
    };
    if capacity.reserved_seats > capacity.max_sessions {
        return Err(bad(
            "capacity.reserved_seats",
            format!(
                "{} reserved seats exceed max_sessions = {}",
                capacity.reserved_seats, capacity.max_sessions
            ),
        ));
    }
    Ok(Rules {
        policy: PolicyConfig {
            require_disk_encryption: policy.require_disk_encryption.unwrap_or(true),
            max_patch_age_days: policy.max_patch_age_days.unwrap_or(30),
            remote_max_level: policy.remote_max_level.unwrap_or(1),
            private_devices,
            mail_zone,
            default_org_unit,
            require_hwaddr: policy.require_hwaddr.unwrap_or(true),
            match_serial: policy.match_serial.unwrap_or(false),
            revoke_on_reload,
            revoke_patch_grace_days: policy.revoke_patch_grace_days.unwrap_or(0),
            duplicate_device,
        },
        levels,
        capacity,
        org_units: units,
        zones: zone_map,
    })
}

/// Names that become metric label values: short, printable, no surprises.
pub(super) fn check_label(key: &str, value: &str) -> Result<(), Invalid> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(bad(
            key,
            format!("`{value}` must be 1-64 characters of letters, digits, '-', '_' or '.'"),
        ))
    }
}

pub(super) fn validate_links(raw: Vec<RawLink>) -> Result<Vec<Link>, Invalid> {
    let mut links = Vec::new();
    for (i, l) in raw.into_iter().enumerate() {
        check_label(&format!("links[{i}].name"), &l.name)?;
        if l.interface.is_empty() || l.interface.contains('/') || l.interface.len() > 15 {
            return Err(bad(
                format!("links[{i}].interface"),
                format!("`{}` is not an interface name", l.interface),
            ));
        }
        if l.speed_bits_per_second == 0 {
            return Err(bad(
                format!("links[{i}].speed_bits_per_second"),
                "must be greater than zero",
            ));
        }
        links.push(Link {
            name: l.name,
            interface: l.interface,
            speed_bits_per_second: l.speed_bits_per_second,
        });
    }
    Ok(links)
}

pub(super) fn validate_openvpn(
    raw: Vec<RawOpenvpn>,
    rules: &Rules,
) -> Result<Vec<OpenvpnInstance>, Invalid> {
    let mut out: Vec<OpenvpnInstance> = Vec::new();
    for (i, o) in raw.into_iter().enumerate() {
        let key = format!("openvpn[{i}]");
        check_label(&format!("{key}.instance"), &o.instance)?;
        if out.iter().any(|x| x.instance == o.instance) {
            return Err(bad(
                format!("{key}.instance"),
                format!("instance `{}` is defined twice", o.instance),
            ));
        }
        if !rules.zones.contains_key(&o.zone) {
            return Err(bad(
                format!("{key}.zone"),
                format!("zone `{}` is not configured in [[zones]]", o.zone),
            ));
        }
        if (o.client_auth || o.passthrough.is_some()) && o.management.is_none() {
            return Err(bad(
                format!("{key}.management"),
                "client_auth and passthrough need a management socket",
            ));
        }
        out.push(OpenvpnInstance {
            instance: o.instance,
            zone: o.zone,
            management: o.management.map(PathBuf::from),
            client_auth: o.client_auth,
            passthrough: o.passthrough.map(PathBuf::from),
            bytecount_interval: Duration::from_secs(o.bytecount_interval_s.unwrap_or(5).max(1)),
            status_interval: Duration::from_secs(o.status_interval_s.unwrap_or(30).max(1)),
        });
    }
    Ok(out)
}
