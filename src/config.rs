//! Configuration: a TOML file plus `PFORTE_SECTION__KEY` environment overrides, read through the
//! `config` crate into a raw serde struct, then validated into the runtime [`Config`].
//!
//! Every error names the file, the key and what is wrong.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {problem}")]
pub struct ConfigError {
    /// The configuration file.
    pub file: String,
    /// The key (dotted path), or `-` when the whole file is concerned.
    pub key: String,
    /// What is wrong, in one sentence.
    pub problem: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    registry: RawRegistry,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    levels: BTreeMap<String, String>,
    #[serde(default)]
    capacity: RawCapacity,
    #[serde(default)]
    org_units: Vec<RawOrgUnit>,
    #[serde(default)]
    zones: Vec<RawZone>,
    #[serde(default)]
    links: Vec<RawLink>,
    #[serde(default)]
    openvpn: Vec<RawOpenvpn>,
    #[serde(default)]
    audit: RawAudit,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    socket: Option<String>,
    socket_mode: Option<String>,
    #[serde(default)]
    peer_uids: Ids,
    #[serde(default)]
    peer_gids: Ids,
    api_token_file: Option<String>,
    max_connections: Option<usize>,
    workers: Option<usize>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
}

/// A list of uids or gids: a TOML array, or (from the environment) one number or a
/// comma-separated text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Ids {
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
    fn list(self, key: &str) -> Result<Vec<u32>, Invalid> {
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
struct RawRegistry {
    devices: Option<String>,
    users: Option<String>,
    watch_interval_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<String>,
    fail_mode: Option<String>,
    synchronous: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    require_disk_encryption: Option<bool>,
    max_patch_age_days: Option<u32>,
    remote_max_level: Option<u8>,
    private_devices: Option<String>,
    mail_zone: Option<String>,
    default_org_unit: Option<String>,
    require_hwaddr: Option<bool>,
    match_serial: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapacity {
    max_sessions: Option<u32>,
    reserved_seats: Option<u32>,
    max_sessions_per_user: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrgUnit {
    name: String,
    level: u8,
    #[serde(default)]
    quota: u32,
    #[serde(default)]
    priority: bool,
    #[serde(default)]
    remote_exception: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZone {
    name: String,
    #[serde(default)]
    level: u8,
    pool: Option<String>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawRoute {
    Plain(String),
    Leveled { prefix: String, level: u8 },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    name: String,
    interface: String,
    speed_bits_per_second: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpenvpn {
    instance: String,
    zone: String,
    management: Option<String>,
    #[serde(default)]
    client_auth: bool,
    passthrough: Option<String>,
    bytecount_interval_s: Option<u64>,
    status_interval_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<String>,
    pseudonymise_key_file: Option<String>,
    max_bytes: Option<u64>,
    keep: Option<u32>,
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// Listeners and API access.
    pub server: ServerConfig,
    /// Where the registry files are.
    pub registry: RegistryConfig,
    /// The session store.
    pub store: StoreConfig,
    /// The rules that decide (reloadable).
    pub rules: Rules,
    /// Network links whose counters are exported.
    pub links: Vec<Link>,
    /// OpenVPN server instances on this host.
    pub openvpn: Vec<OpenvpnInstance>,
    /// The audit log.
    pub audit: AuditConfig,
}

/// Listeners and API access.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// TCP address for `/metrics`, health, and (with a token) `/v1`.
    pub listen: Option<SocketAddr>,
    /// Unix socket for the hooks.
    pub socket: Option<PathBuf>,
    /// File mode of the Unix socket.
    pub socket_mode: u32,
    /// Peer uids allowed on the Unix socket (root and the daemon's own uid always are).
    pub peer_uids: Vec<u32>,
    /// Peer gids allowed on the Unix socket.
    pub peer_gids: Vec<u32>,
    /// File holding the bearer token for `/v1` on TCP.
    pub api_token_file: Option<PathBuf>,
    /// Concurrent connections per listener; more wait in the kernel backlog.
    pub max_connections: usize,
    /// Threads that serve requests (the async runtime's workers). The session store's writer
    /// and the checkpointer have threads of their own.
    pub workers: usize,
    /// Time allowed for a request's headers to arrive.
    pub header_timeout: Duration,
    /// Time allowed for a request's body to arrive.
    pub body_timeout: Duration,
}

/// Where the registry files are.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Device inventory, CSV or JSON.
    pub devices: PathBuf,
    /// User list, CSV or JSON.
    pub users: Option<PathBuf>,
    /// How often the files are checked for changes (zero: never).
    pub watch_interval: Duration,
}

/// What happens to a decision when the session store cannot write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Refuse new sessions (the default: a gate keeps the door shut).
    Closed,
    /// Admit them in memory only, and count the error.
    Open,
}

/// The session store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// SQLite file.
    pub path: PathBuf,
    /// What a failed write does to a connect.
    pub fail_mode: FailMode,
    /// How hard a commit waits for the disk.
    pub durability: Durability,
}

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: a commit survives a power cut.
    Full,
    /// `synchronous=NORMAL`: a commit survives a crash of pforte (kill -9), not a power cut.
    Normal,
}

/// What to do with private devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivateDevices {
    /// Refuse them everywhere.
    Refuse,
    /// Admit them to the mail zone only.
    MailOnly,
}

/// Policy switches.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Refuse devices without recorded disk encryption.
    pub require_disk_encryption: bool,
    /// Maximum age of the last patch, in days.
    pub max_patch_age_days: u32,
    /// Highest data-protection level that may work off-site.
    pub remote_max_level: u8,
    /// Private devices: refuse, or mail-only.
    pub private_devices: PrivateDevices,
    /// The mail-only zone.
    pub mail_zone: String,
    /// Org unit of users not in the user list (none: they are refused).
    pub default_org_unit: Option<String>,
    /// A device with registered hardware addresses must report one of them.
    pub require_hwaddr: bool,
    /// Fall back to the certificate serial when the fingerprint is not registered.
    pub match_serial: bool,
}

/// Seats.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// All seats.
    pub max_sessions: u32,
    /// Seats kept for priority org units.
    pub reserved_seats: u32,
    /// Sessions one user may hold at once (zero: no limit).
    pub max_sessions_per_user: u32,
}

/// An organisational unit.
#[derive(Debug, Clone)]
pub struct OrgUnit {
    /// Name, as in the registry files.
    pub name: String,
    /// Data-protection level of its work.
    pub level: u8,
    /// Concurrent sessions (zero: no quota).
    pub quota: u32,
    /// May use the reserved seats.
    pub priority: bool,
    /// May work off-site above the remote ceiling.
    pub remote_exception: bool,
}

/// A route pushed to clients whose device is cleared for `level`.
#[derive(Debug, Clone)]
pub struct Route {
    /// The prefix.
    pub prefix: IpNet,
    /// Clearance a device needs to get it.
    pub level: u8,
}

/// A zone: a VPN entry point with its own level, address pool and routes.
#[derive(Debug, Clone)]
pub struct Zone {
    /// Name.
    pub name: String,
    /// Data-protection level of what the zone reaches.
    pub level: u8,
    /// Address pool for `ifconfig-push`.
    pub pool: Option<IpNet>,
    /// Routes pushed to clients.
    pub routes: Vec<Route>,
}

/// Everything the policy needs that comes from the config; swapped whole on reload.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Policy switches.
    pub policy: PolicyConfig,
    /// Names of the data-protection levels.
    pub levels: BTreeMap<u8, String>,
    /// Seats.
    pub capacity: Capacity,
    /// Org units by name.
    pub org_units: HashMap<String, OrgUnit>,
    /// Zones by name.
    pub zones: HashMap<String, Zone>,
}

impl Rules {
    /// The name of a level, or its number.
    pub fn level_name(&self, level: u8) -> String {
        match self.levels.get(&level) {
            Some(name) => format!("{level} ({name})"),
            None => level.to_string(),
        }
    }

    /// Org unit names, sorted (for metric labels).
    pub fn org_unit_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.org_units.keys().cloned().collect();
        names.sort();
        names
    }

    /// Zone names, sorted (for metric labels).
    pub fn zone_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.zones.keys().cloned().collect();
        names.sort();
        names
    }
}

/// A network link whose counters are exported.
#[derive(Debug, Clone)]
pub struct Link {
    /// Label value.
    pub name: String,
    /// Interface under /sys/class/net.
    pub interface: String,
    /// Nominal speed.
    pub speed_bits_per_second: u64,
}

/// One OpenVPN server instance on this host.
#[derive(Debug, Clone)]
pub struct OpenvpnInstance {
    /// Instance name, as the hook reports it.
    pub instance: String,
    /// Zone its clients belong to.
    pub zone: String,
    /// Management socket (Unix).
    pub management: Option<PathBuf>,
    /// Decide over the management interface (`management-client-auth`).
    pub client_auth: bool,
    /// Pass-through management socket for operators' tools.
    pub passthrough: Option<PathBuf>,
    /// `bytecount` interval.
    pub bytecount_interval: Duration,
    /// How often `status` reconciles the session table.
    pub status_interval: Duration,
}

/// The audit log.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// JSON-lines file (none: no audit log).
    pub path: Option<PathBuf>,
    /// Key for pseudonymising usernames and addresses (none: clear text).
    pub pseudonymise_key_file: Option<PathBuf>,
    /// Size at which the file is rotated.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
}

/// Environment variables that override the file: `PFORTE_<SECTION>__<KEY>`, e.g.
/// `PFORTE_SERVER__LISTEN=127.0.0.1:9000`. Variables without `__` (like the hook's
/// `PFORTE_SOCKET`) are not config overrides and are ignored here.
fn env_overrides() -> HashMap<String, String> {
    std::env::vars()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("PFORTE_")?;
            rest.contains("__").then(|| (k.clone(), v))
        })
        .collect()
}

/// Reads and validates a config file plus environment overrides.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_env(path, env_overrides())
}

/// Reads and validates a config file with the given override variables.
pub fn load_with_env(path: &Path, env: HashMap<String, String>) -> Result<Config, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError {
            file: path.display().to_string(),
            key: "-".into(),
            problem: "file not found or not a regular file".into(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        key: "-".into(),
        problem: format!("cannot read: {e}"),
    })?;
    parse(&text, path, env)
}

/// Parses config text as if read from `path` (for tests and fuzzing: no file access).
pub fn parse(text: &str, path: &Path, env: HashMap<String, String>) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let err = |key: &str, problem: String| ConfigError {
        file: file.clone(),
        key: key.to_string(),
        problem,
    };
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("PFORTE")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        )
        .build()
        .map_err(|e| err("-", e.to_string()))?;
    let raw: RawConfig = built.try_deserialize().map_err(|e| {
        let text = e.to_string();
        let key = extract_key(&text).unwrap_or_else(|| "-".into());
        err(&key, text)
    })?;
    validate(path, raw).map_err(|(key, problem)| err(&key, problem))
}

/// Pulls "for key `a.b`" out of a `config` crate message.
fn extract_key(text: &str) -> Option<String> {
    let start = text.find("key `")? + 5;
    let end = text[start..].find('`')? + start;
    Some(text[start..end].to_string())
}

type Invalid = (String, String);

fn bad(key: impl Into<String>, problem: impl Into<String>) -> Invalid {
    (key.into(), problem.into())
}

fn validate(path: &Path, raw: RawConfig) -> Result<Config, Invalid> {
    let server = validate_server(raw.server)?;
    let registry = RegistryConfig {
        devices: PathBuf::from(
            raw.registry
                .devices
                .ok_or_else(|| bad("registry.devices", "missing: path of the device registry"))?,
        ),
        users: raw.registry.users.map(PathBuf::from),
        watch_interval: Duration::from_secs(raw.registry.watch_interval_s.unwrap_or(2)),
    };
    let store = StoreConfig {
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
        audit,
    })
}

/// Request threads by default. One: on a small machine (2 cores here) one worker beside the
/// store's writer thread spends less CPU per decision than two, which wake and steal from
/// each other, and leaves the other core to the VPN server (docs/BENCHMARKS.md, fourth
/// session). More only help once one worker is saturated.
pub const DEFAULT_WORKERS: usize = 1;
/// Most request threads the config may ask for.
pub const MAX_WORKERS: usize = 256;

fn validate_server(raw: RawServer) -> Result<ServerConfig, Invalid> {
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

fn validate_rules(
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
        },
        levels,
        capacity,
        org_units: units,
        zones: zone_map,
    })
}

/// Names that become metric label values: short, printable, no surprises.
fn check_label(key: &str, value: &str) -> Result<(), Invalid> {
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

fn validate_links(raw: Vec<RawLink>) -> Result<Vec<Link>, Invalid> {
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

fn validate_openvpn(raw: Vec<RawOpenvpn>, rules: &Rules) -> Result<Vec<OpenvpnInstance>, Invalid> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("t.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    const MINIMAL: &str = r#"
[server]
socket = "run/p.sock"
[registry]
devices = "d.csv"
[[org_units]]
name = "it"
level = 1
[[zones]]
name = "office"
pool = "10.80.0.0/24"
routes = ["10.1.0.0/16", { prefix = "10.2.0.0/16", level = 2 }]
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let d = tempfile::tempdir().unwrap();
        let c = load_with_env(&write(d.path(), MINIMAL), HashMap::new()).unwrap();
        assert_eq!(c.rules.capacity.max_sessions, 500);
        assert_eq!(c.server.socket_mode, 0o660);
        assert_eq!(c.rules.zones["office"].routes[1].level, 2);
        assert!(c.rules.policy.require_hwaddr);
        assert_eq!(c.server.workers, DEFAULT_WORKERS);
    }

    #[test]
    fn env_overrides_file() {
        let d = tempfile::tempdir().unwrap();
        let env = HashMap::from([
            (
                "PFORTE_SERVER__PEER_UIDS".to_string(),
                "65534,1000".to_string(),
            ),
            ("PFORTE_SERVER__PEER_GIDS".to_string(), "4".to_string()),
            ("PFORTE_CAPACITY__MAX_SESSIONS".to_string(), "7".to_string()),
            (
                "PFORTE_SERVER__LISTEN".to_string(),
                "127.0.0.1:1".to_string(),
            ),
            ("PFORTE_SERVER__WORKERS".to_string(), "3".to_string()),
        ]);
        let c = load_with_env(&write(d.path(), MINIMAL), env).unwrap();
        assert_eq!(c.rules.capacity.max_sessions, 7);
        assert_eq!(c.server.peer_uids, vec![65534, 1000]);
        assert_eq!(c.server.peer_gids, vec![4]);
        assert_eq!(c.server.listen, Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(c.server.workers, 3);
    }

    #[test]
    fn errors_name_file_and_key() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            &format!("{MINIMAL}\n[capacity]\nmax_sessions = \"many\"\n"),
        );
        let e = load_with_env(&p, HashMap::new()).unwrap_err().to_string();
        assert!(
            e.contains("t.toml") && e.contains("capacity.max_sessions"),
            "{e}"
        );

        let p = write(d.path(), &MINIMAL.replace("10.80.0.0/24", "10.80.0.0/33"));
        let e = load_with_env(&p, HashMap::new()).unwrap_err().to_string();
        assert!(e.contains("zones[0].pool"), "{e}");

        let p = write(
            d.path(),
            &MINIMAL.replace("[registry]", "workers = 0\n[registry]"),
        );
        let e = load_with_env(&p, HashMap::new()).unwrap_err().to_string();
        assert!(e.contains("server.workers"), "{e}");

        let p = write(d.path(), &format!("{MINIMAL}\n[policy]\nbogus = 1\n"));
        let e = load_with_env(&p, HashMap::new()).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
