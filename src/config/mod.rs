//! Configuration: a TOML file plus `PFORTE_SECTION__KEY` environment overrides, read through the
//! `config` crate into a raw serde struct, then validated into the runtime [`Config`].
//!
//! Every error names the file, the key and what is wrong.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
mod native;
mod radius;
mod raw;
mod store;
mod validate;

pub use native::{DEFAULT_OCCTL, DEFAULT_VICI, OcservInstance, StrongswanInstance};
#[cfg(test)]
pub use radius::test_secret_value;
pub use radius::{
    DeviceAttribute, MissingDevice, RadiusClient, RadiusConfig, RadiusUpstream, SecretValue, Vendor,
};

use raw::RawConfig;
pub use store::{Backend, PostgresConfig};
use validate::validate;
pub use validate::{DEFAULT_WORKERS, MAX_WORKERS};

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
    /// strongSwan (charon) instances on this host, watched over VICI.
    pub strongswan: Vec<StrongswanInstance>,
    /// ocserv instances on this host.
    pub ocserv: Vec<OcservInstance>,
    /// The audit log.
    pub audit: AuditConfig,
    /// The RADIUS front (`[radius]`), if configured.
    pub radius: Option<RadiusConfig>,
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
    /// A reload that removes more than this share of the devices (in percent) is refused
    /// unless forced: an export cut off at a row boundary parses fine.
    pub max_removed_percent: u32,
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
    /// SQLite (one concentrator) or PostgreSQL (several sharing seats).
    pub backend: Backend,
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
    /// Which live sessions a reload ends.
    pub revoke_on_reload: Revocation,
    /// Days past `max_patch_age_days` that a live session may run before a reload ends it.
    pub revoke_patch_grace_days: u32,
    /// A device connecting while it holds a session from another address.
    pub duplicate_device: DuplicateDevice,
}

/// Which live sessions a reload re-decides and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// Every device and person check but capacity (`all-checks`, the default).
    AllChecks,
    /// Only devices removed from the registry or marked lost, stolen, retired or blocked.
    BlockedOnly,
}

/// What a connect does for a device that holds a live session from another real address (a
/// copied certificate, or a laptop that moved networks before its old session timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicateDevice {
    /// End the old session, admit the new one (OpenVPN's own way without `duplicate-cn`).
    Replace,
    /// Refuse the new one (`duplicate_device`).
    Refuse,
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
    /// The VPN's tunnel network the pool lies in (the netmask pushed with an address; its
    /// first host is the VPN server's own address and never handed out). The pool itself
    /// when not configured.
    pub network: Option<IpNet>,
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
    fn the_pool_lies_in_the_tunnel_network_and_the_new_policy_keys_have_defaults() {
        let d = tempfile::tempdir().unwrap();
        let c = load_with_env(&write(d.path(), MINIMAL), HashMap::new()).unwrap();
        let office = &c.rules.zones["office"];
        assert_eq!(office.network, office.pool);
        assert_eq!(c.rules.policy.revoke_on_reload, Revocation::AllChecks);
        assert_eq!(c.rules.policy.revoke_patch_grace_days, 0);
        assert_eq!(c.rules.policy.duplicate_device, DuplicateDevice::Replace);
        assert_eq!(c.registry.max_removed_percent, 10);

        let narrow = MINIMAL.replace(
            "pool = \"10.80.0.0/24\"",
            "pool = \"10.9.0.128/25\"\nnetwork = \"10.9.0.0/24\"",
        );
        let c = load_with_env(&write(d.path(), &narrow), HashMap::new()).unwrap();
        assert_eq!(
            c.rules.zones["office"].network,
            Some("10.9.0.0/24".parse().unwrap())
        );

        let outside = narrow.replace("network = \"10.9.0.0/24\"", "network = \"10.8.0.0/24\"");
        let e = load_with_env(&write(d.path(), &outside), HashMap::new()).unwrap_err();
        assert_eq!(e.key, "zones[0].pool");
        assert!(
            e.problem.contains("outside the tunnel network 10.8.0.0/24"),
            "{e}"
        );

        let bad = format!("{MINIMAL}[policy]\nrevoke_on_reload = \"some\"\n");
        let e = load_with_env(&write(d.path(), &bad), HashMap::new()).unwrap_err();
        assert_eq!(e.key, "policy.revoke_on_reload");
        let bad = format!("{MINIMAL}[policy]\nduplicate_device = \"allow\"\n");
        let e = load_with_env(&write(d.path(), &bad), HashMap::new()).unwrap_err();
        assert_eq!(e.key, "policy.duplicate_device");
        let bad = MINIMAL.replace(
            "devices = \"d.csv\"",
            "devices = \"d.csv\"\nmax_removed_percent = 101",
        );
        let e = load_with_env(&write(d.path(), &bad), HashMap::new()).unwrap_err();
        assert_eq!(e.key, "registry.max_removed_percent");
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
