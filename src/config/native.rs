//! `[[strongswan]]` and `[[ocserv]]`: the concentrators pforte watches natively (strongSwan over
//! its VICI socket, ocserv over its scripts and `occtl`). Raw file types and their validation.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Rules;
use super::validate::{Invalid, bad, check_label};

/// charon's VICI socket where the config names none.
pub const DEFAULT_VICI: &str = "/var/run/charon.vici";
/// The `occtl` program where the config names none (looked up on `PATH`).
pub const DEFAULT_OCCTL: &str = "occtl";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStrongswan {
    instance: String,
    zone: String,
    vici: Option<String>,
    status_interval_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOcserv {
    instance: String,
    zone: String,
    occtl: Option<String>,
    device_from: Option<String>,
    status_interval_s: Option<u64>,
}

/// One strongSwan (charon) on this host, watched over VICI.
#[derive(Debug, Clone)]
pub struct StrongswanInstance {
    /// Instance name (the `instance` metric label and the sessions' instance).
    pub instance: String,
    /// Zone its clients belong to.
    pub zone: String,
    /// charon's VICI socket.
    pub vici: PathBuf,
    /// How often `list-sas` reconciles the session table and reads the byte counters.
    pub status_interval: Duration,
}

/// One ocserv on this host, asked through `occtl`.
#[derive(Debug, Clone)]
pub struct OcservInstance {
    /// Instance name, as the hook reports it.
    pub instance: String,
    /// Zone its clients belong to.
    pub zone: String,
    /// The `occtl` program, or ocserv's occtl socket (then `occtl -s SOCKET` is run).
    pub occtl: PathBuf,
    /// Which script variable carries the device's inventory id: `groupname` (default; ocserv's
    /// `cert-group-oid`) or `username` (`cert-user-oid`). Must match the hook's `--device-from`;
    /// used here for clients that reconciliation finds without a session.
    pub device_from: String,
    /// How often `occtl show users` reconciles the session table and reads the byte counters.
    pub status_interval: Duration,
}

fn check_instance(
    key: &str,
    instance: &str,
    zone: &str,
    seen: &[&str],
    rules: &Rules,
) -> Result<(), Invalid> {
    check_label(&format!("{key}.instance"), instance)?;
    if seen.contains(&instance) {
        return Err(bad(
            format!("{key}.instance"),
            format!("instance `{instance}` is defined twice"),
        ));
    }
    if !rules.zones.contains_key(zone) {
        return Err(bad(
            format!("{key}.zone"),
            format!("zone `{zone}` is not configured in [[zones]]"),
        ));
    }
    Ok(())
}

fn interval(v: Option<u64>) -> Duration {
    Duration::from_secs(v.unwrap_or(10).max(1))
}

pub(super) fn validate_strongswan(
    raw: Vec<RawStrongswan>,
    rules: &Rules,
) -> Result<Vec<StrongswanInstance>, Invalid> {
    let mut out: Vec<StrongswanInstance> = Vec::new();
    for (i, s) in raw.into_iter().enumerate() {
        let seen: Vec<&str> = out.iter().map(|x| x.instance.as_str()).collect();
        check_instance(
            &format!("strongswan[{i}]"),
            &s.instance,
            &s.zone,
            &seen,
            rules,
        )?;
        let vici = s.vici.unwrap_or_else(|| DEFAULT_VICI.into());
        let vici = vici.strip_prefix("unix://").unwrap_or(&vici).to_string();
        out.push(StrongswanInstance {
            instance: s.instance,
            zone: s.zone,
            vici: PathBuf::from(vici),
            status_interval: interval(s.status_interval_s),
        });
    }
    Ok(out)
}

pub(super) fn validate_ocserv(
    raw: Vec<RawOcserv>,
    rules: &Rules,
) -> Result<Vec<OcservInstance>, Invalid> {
    let mut out: Vec<OcservInstance> = Vec::new();
    for (i, o) in raw.into_iter().enumerate() {
        let seen: Vec<&str> = out.iter().map(|x| x.instance.as_str()).collect();
        check_instance(&format!("ocserv[{i}]"), &o.instance, &o.zone, &seen, rules)?;
        let device_from = o.device_from.unwrap_or_else(|| "groupname".into());
        if !["groupname", "username"].contains(&device_from.as_str()) {
            return Err(bad(
                format!("ocserv[{i}].device_from"),
                format!("`{device_from}` is not one of groupname, username"),
            ));
        }
        out.push(OcservInstance {
            device_from,
            instance: o.instance,
            zone: o.zone,
            occtl: PathBuf::from(o.occtl.unwrap_or_else(|| DEFAULT_OCCTL.into())),
            status_interval: interval(o.status_interval_s),
        });
    }
    Ok(out)
}
