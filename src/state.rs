//! The read-mostly state the policy reads: rules from the config and the registry, built whole on
//! the side and swapped in with `ArcSwap`. A failed build leaves the old state in place.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::{self, Config, ConfigError, Rules};
use crate::registry::{Registry, RegistryError};

/// Why a (re)load failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The config file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A registry file.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A file anyone may write.
    #[error("{0}: writable by every user; refusing to trust it (chmod o-w)")]
    WorldWritable(String),
    /// A reload would remove more of the devices than `registry.max_removed_percent` allows.
    #[error(
        "the new device registry drops {removed} of {total} devices, more than registry.max_removed_percent = {limit} % allows (an export cut short?); the previous registry stays. If this is intended: pforte reload --force"
    )]
    MassRemoval {
        /// Devices of the registry in force that the new one lacks.
        removed: usize,
        /// Devices of the registry in force.
        total: usize,
        /// The configured limit, in percent.
        limit: u32,
    },
    /// The reload's worker thread failed before it could say why (it panicked or was cancelled).
    #[error("the reload did not finish: {0}")]
    Interrupted(String),
}

/// Everything one decision reads, consistent with itself.
#[derive(Debug)]
pub struct Snapshot {
    /// Rules from the config.
    pub rules: Rules,
    /// The registry.
    pub registry: Registry,
    /// Zone of each OpenVPN instance (for requests that name an instance but no zone).
    pub instance_zones: HashMap<String, String>,
    /// VPN servers pforte keeps a control channel to, as (vpn, instance): OpenVPN management
    /// interfaces, strongSwan's VICI socket, ocserv's occtl.
    pub managed_instances: Vec<(String, String)>,
    /// Unix time it was loaded.
    pub loaded_at: i64,
}

/// The files a snapshot was built from, with what identifies their content.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileStamps(Vec<(PathBuf, Option<Stamp>)>);

/// Inode, size, mtime seconds and nanoseconds.
type Stamp = (u64, u64, i64, i64);

impl FileStamps {
    fn of(paths: &[PathBuf]) -> FileStamps {
        FileStamps(
            paths
                .iter()
                .map(|p| {
                    let stamp = std::fs::metadata(p)
                        .ok()
                        .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()));
                    (p.clone(), stamp)
                })
                .collect(),
        )
    }

    /// The same files, read again now.
    pub fn refresh(&self) -> FileStamps {
        let paths: Vec<PathBuf> = self.0.iter().map(|(p, _)| p.clone()).collect();
        FileStamps::of(&paths)
    }
}

fn refuse_world_writable(path: &Path) -> Result<(), LoadError> {
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o002 != 0
    {
        return Err(LoadError::WorldWritable(path.display().to_string()));
    }
    Ok(())
}

/// Builds a snapshot from a validated config: reads the registry files.
pub fn build(config: &Config) -> Result<Snapshot, LoadError> {
    build_paced(config, false)
}

/// As [`build`]; `paced` reads the registry at about half a core (reloads while serving).
pub fn build_paced(config: &Config, paced: bool) -> Result<Snapshot, LoadError> {
    refuse_world_writable(&config.registry.devices)?;
    if let Some(u) = &config.registry.users {
        refuse_world_writable(u)?;
    }
    let registry = Registry::load_paced(
        &config.registry.devices,
        config.registry.users.as_deref(),
        &config.rules,
        paced,
    )?;
    Ok(Snapshot {
        rules: config.rules.clone(),
        registry,
        instance_zones: config
            .openvpn
            .iter()
            .map(|o| (o.instance.clone(), o.zone.clone()))
            .collect(),
        managed_instances: config
            .openvpn
            .iter()
            .filter(|o| o.management.is_some())
            .map(|o| ("openvpn".to_string(), o.instance.clone()))
            .chain(
                config
                    .strongswan
                    .iter()
                    .map(|i| ("strongswan".to_string(), i.instance.clone())),
            )
            .chain(
                config
                    .ocserv
                    .iter()
                    .map(|i| ("ocserv".to_string(), i.instance.clone())),
            )
            .collect(),
        loaded_at: unix_now(),
    })
}

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The current snapshot and how to replace it.
pub struct State {
    current: ArcSwap<Snapshot>,
    config_path: PathBuf,
    stamps: std::sync::Mutex<FileStamps>,
}

impl State {
    /// Wraps the first snapshot.
    pub fn new(config: &Config, first: Snapshot) -> State {
        State {
            current: ArcSwap::from_pointee(first),
            config_path: config.source.clone(),
            stamps: std::sync::Mutex::new(FileStamps::of(&watched(config))),
        }
    }

    /// The snapshot decisions read now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Re-reads the config file and the registry; swaps only if all of it is valid and, unless
    /// `force`, it removes no more than `registry.max_removed_percent` of the devices.
    /// Blocking (file I/O and parsing): call from a blocking thread.
    pub fn reload(&self, force: bool) -> Result<Arc<Snapshot>, LoadError> {
        let config = config::load(&self.config_path)?;
        let stamps = FileStamps::of(&watched(&config));
        let snapshot = Arc::new(build_paced(&config, true)?);
        if !force {
            check_removals(
                &self.current().registry,
                &snapshot.registry,
                config.registry.max_removed_percent,
            )?;
        }
        self.current.store(snapshot.clone());
        *crate::sync::lock(&self.stamps) = stamps;
        Ok(snapshot)
    }

    /// Whether any watched file changed since the last successful load (or failed attempt:
    /// `mark_seen` records those, so a broken file is reported once, not every few seconds).
    pub fn files_changed(&self) -> bool {
        let stamps = crate::sync::lock(&self.stamps);
        stamps.refresh() != *stamps
    }

    /// Records the files as they are now.
    pub fn mark_seen(&self) {
        let mut stamps = crate::sync::lock(&self.stamps);
        *stamps = stamps.refresh();
    }
}

/// Devices a reload may always remove, whatever the share: a small registry (a test, a small
/// office) loses a large share with a few retirements.
const REMOVALS_ALWAYS_ALLOWED: usize = 10;

/// Refuses a new registry that lacks more than `limit` percent of the devices in force (and
/// more than [`REMOVALS_ALWAYS_ALLOWED`]).
fn check_removals(old: &Registry, new: &Registry, limit: u32) -> Result<(), LoadError> {
    let total = old.devices().len();
    let removed = old
        .devices()
        .iter()
        .filter(|d| new.device_by_id(&d.id).is_none())
        .count();
    if removed > REMOVALS_ALWAYS_ALLOWED
        && removed as u128 * 100 > total as u128 * u128::from(limit)
    {
        return Err(LoadError::MassRemoval {
            removed,
            total,
            limit,
        });
    }
    Ok(())
}

fn watched(config: &Config) -> Vec<PathBuf> {
    let mut v = vec![config.source.clone(), config.registry.devices.clone()];
    if let Some(u) = &config.registry.users {
        v.push(u.clone());
    }
    v
}
