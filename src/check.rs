//! `pforte check`: explains a decision without connecting, for the help desk ("why was I
//! refused?"). Reads the same config and registry as the daemon; capacity is live state and is
//! not checked here.

use std::path::PathBuf;

use crate::config;
use crate::policy;
use crate::state;
use crate::wire::ConnectRequest;

/// Exit code: the connection would be allowed.
pub const ALLOWED: i32 = 0;
/// Exit code: refused.
pub const REFUSED: i32 = 1;
/// Exit code: the check itself failed.
pub const ERROR: i32 = 2;

/// What to check.
#[derive(Debug, Clone, Default)]
pub struct CheckArgs {
    /// Config file.
    pub config: PathBuf,
    /// Device inventory id (instead of a certificate).
    pub device: Option<String>,
    /// Certificate fingerprint.
    pub cert_sha256: Option<String>,
    /// Certificate serial.
    pub cert_serial: Option<String>,
    /// User.
    pub user: String,
    /// Zone (default: the only OpenVPN instance's zone, else the first non-mail zone).
    pub zone: Option<String>,
    /// Hardware address (without it the hardware-address check is skipped).
    pub hwaddr: Option<String>,
}

/// Runs the check, printing the explanation; returns the exit code.
pub fn run(args: &CheckArgs) -> i32 {
    match explain(args) {
        Ok((allowed, text)) => {
            println!("{text}");
            if allowed { ALLOWED } else { REFUSED }
        }
        Err(e) => {
            eprintln!("pforte check: {e}");
            ERROR
        }
    }
}

/// The decision and its explanation.
pub fn explain(args: &CheckArgs) -> Result<(bool, String), String> {
    let mut cfg = config::load(&args.config).map_err(|e| e.to_string())?;
    let zone = match &args.zone {
        Some(z) => z.clone(),
        None => default_zone(&cfg).ok_or("no zone given and none configured")?,
    };
    let mut notes = Vec::new();
    if args.zone.is_none() {
        notes.push(format!(
            "(Checked for zone {zone}; pass --zone to choose another.)"
        ));
    }
    if args.hwaddr.is_none() && args.device.is_none() {
        cfg.rules.policy.require_hwaddr = false;
        notes.push("(No --hwaddr given: the hardware-address check was skipped.)".to_string());
    }
    notes.push("(Seats and quotas are live state and were not checked.)".to_string());
    let snap = state::build(&cfg).map_err(|e| e.to_string())?;
    let req = ConnectRequest {
        vpn: "other".into(),
        instance: "check".into(),
        zone,
        username: args.user.clone(),
        cert_sha256: args.cert_sha256.clone().unwrap_or_default(),
        cert_serial: args.cert_serial.clone().unwrap_or_default(),
        hwaddr: args.hwaddr.clone().unwrap_or_default(),
        ..Default::default()
    };
    let today = chrono::Utc::now().date_naive();
    let outcome = match &args.device {
        Some(id) => {
            notes.push(
                "(Device named by its inventory id: the certificate and hardware address were not checked.)"
                    .to_string(),
            );
            policy::evaluate_device(
                id,
                &args.user,
                &req.zone,
                &snap.rules,
                &snap.registry,
                today,
            )
        }
        None if req.cert_sha256.is_empty() && req.cert_serial.is_empty() => {
            return Err("give --device, --cert-sha256 or --cert-serial".to_string());
        }
        None => policy::evaluate(&req, &snap.rules, &snap.registry, today),
    };
    let (allowed, head) = match outcome {
        Ok(adm) => (
            true,
            format!(
                "ALLOWED: user {} on device {} may connect to zone {} (org unit {}, level {}).",
                adm.username,
                adm.device_id,
                adm.zone,
                adm.org_unit,
                snap.rules.level_name(adm.level)
            ),
        ),
        Err(d) => (false, format!("REFUSED ({}): {}", d.reason, d.message)),
    };
    Ok((
        allowed,
        std::iter::once(head)
            .chain(notes)
            .collect::<Vec<_>>()
            .join("\n"),
    ))
}

fn default_zone(cfg: &config::Config) -> Option<String> {
    if let [only] = cfg.openvpn.as_slice() {
        return Some(only.zone.clone());
    }
    cfg.rules
        .zone_names()
        .into_iter()
        .find(|z| *z != cfg.rules.policy.mail_zone)
        .or_else(|| cfg.rules.zone_names().into_iter().next())
}
