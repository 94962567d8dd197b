//! The decision: a connect request, the rules and the registry in; an admission or a denial with
//! its reason out. No I/O here, so it can be tested and fuzzed alone. Capacity is checked
//! separately ([`check_capacity`]) under the session table's lock, so admission is atomic.

use std::net::{IpAddr, SocketAddr};

use chrono::NaiveDate;
use ipnet::IpNet;

use crate::config::{Capacity, PrivateDevices, Revocation, Rules};
use crate::registry::{
    Device, HwAddr, Ownership, Registry, Status, normalize_serial, parse_sha256,
};
use crate::wire::{ConnectRequest, Denial, MAX_FIELD_LEN, Reason, VPN_KINDS};

fn deny(reason: Reason, message: impl Into<String>) -> Denial {
    Denial {
        reason,
        message: message.into(),
    }
}

/// What an allowed connection gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The device's inventory id.
    pub device_id: String,
    /// The user.
    pub username: String,
    /// The user's org unit.
    pub org_unit: String,
    /// The user's effective data-protection level.
    pub level: u8,
    /// The zone.
    pub zone: String,
    /// The org unit may use reserved seats.
    pub priority: bool,
    /// The org unit's quota (zero: none).
    pub quota: u32,
    /// The zone's address pool.
    pub pool: Option<IpNet>,
    /// The tunnel network the pool lies in.
    pub network: Option<IpNet>,
    /// Routes the device's clearance permits.
    pub routes: Vec<IpNet>,
}

/// Checks the request's fields; the first problem names the field.
pub fn validate_request(req: &ConnectRequest) -> Result<(), Denial> {
    let fields = [
        ("vpn", &req.vpn),
        ("instance", &req.instance),
        ("zone", &req.zone),
        ("username", &req.username),
        ("common_name", &req.common_name),
        ("cert_sha256", &req.cert_sha256),
        ("cert_serial", &req.cert_serial),
        ("hwaddr", &req.hwaddr),
        ("platform", &req.platform),
        ("remote_addr", &req.remote_addr),
        ("tunnel_ip", &req.tunnel_ip),
        ("session_key", &req.session_key),
        ("device_uid", &req.device_uid),
        ("hostname", &req.hostname),
        ("device_id", &req.device_id),
    ];
    for (name, value) in fields {
        if value.len() > MAX_FIELD_LEN {
            return Err(deny(
                Reason::BadRequest,
                format!("Field `{name}` is longer than {MAX_FIELD_LEN} bytes."),
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(deny(
                Reason::BadRequest,
                format!("Field `{name}` contains control characters."),
            ));
        }
    }
    if !VPN_KINDS.contains(&req.vpn.as_str()) {
        return Err(deny(
            Reason::BadRequest,
            "Field `vpn` must be one of openvpn, strongswan, ocserv, radius, other.",
        ));
    }
    if req.zone.is_empty() {
        return Err(deny(Reason::BadRequest, "Field `zone` is missing."));
    }
    if req.identity().is_empty() {
        return Err(deny(
            Reason::BadRequest,
            "Neither `username` nor `common_name` is given.",
        ));
    }
    // A RADIUS request without any device identity is the concentrator's way (it sends none),
    // not a malformed request: the device checks refuse it as unregistered (or skip, if so
    // configured).
    let identified = !(req.cert_sha256.is_empty()
        && req.cert_serial.is_empty()
        && req.device_uid.is_empty()
        && req.hostname.is_empty()
        && req.device_id.is_empty());
    if !identified && req.vpn != "radius" {
        return Err(deny(
            Reason::BadRequest,
            "Field `cert_sha256` is missing: the device cannot be identified.",
        ));
    }
    if !req.cert_sha256.is_empty() && parse_sha256(&req.cert_sha256).is_none() {
        return Err(deny(
            Reason::BadRequest,
            "Field `cert_sha256` is not a SHA-256 fingerprint (64 hex digits).",
        ));
    }
    if !req.cert_serial.is_empty() && normalize_serial(&req.cert_serial).is_none() {
        return Err(deny(
            Reason::BadRequest,
            "Field `cert_serial` is not a decimal or colon-separated hex serial.",
        ));
    }
    if !req.hwaddr.is_empty() && HwAddr::parse(&req.hwaddr).is_none() {
        return Err(deny(
            Reason::BadRequest,
            "Field `hwaddr` is not a hardware address like aa:bb:cc:dd:ee:ff.",
        ));
    }
    if !req.remote_addr.is_empty()
        && req.remote_addr.parse::<SocketAddr>().is_err()
        && req.remote_addr.parse::<IpAddr>().is_err()
    {
        return Err(deny(
            Reason::BadRequest,
            "Field `remote_addr` is not an ip:port address.",
        ));
    }
    if !req.tunnel_ip.is_empty() && req.tunnel_ip.parse::<IpAddr>().is_err() {
        return Err(deny(
            Reason::BadRequest,
            "Field `tunnel_ip` is not an IP address.",
        ));
    }
    Ok(())
}

/// Runs every check but capacity, in the documented order. `today` is the UTC date.
pub fn evaluate(
    req: &ConnectRequest,
    rules: &Rules,
    registry: &Registry,
    today: NaiveDate,
) -> Result<Admission, Denial> {
    validate_request(req)?;
    if req.skip_device_checks {
        return check_person(req.identity(), &req.zone, rules, registry, None);
    }
    let device = check_device(req, rules, registry, today, reports_hwaddr(req))?;
    check_person(req.identity(), &req.zone, rules, registry, Some(device))
}

/// Whether the request's VPN can report a hardware address at all: strongSwan and ocserv never
/// do, so the hardware-address rule does not apply to them (a registered address is not a
/// mismatch there).
fn reports_hwaddr(req: &ConnectRequest) -> bool {
    !matches!(req.vpn.as_str(), "strongswan" | "ocserv")
}

/// The device a request names: by certificate fingerprint, else serial (where configured),
/// else the concentrator's device uid, else the host name, else the inventory id a certificate
/// field carried (alone, or for an entry that pins no fingerprint).
pub fn find_device<'r>(
    req: &ConnectRequest,
    rules: &Rules,
    registry: &'r Registry,
) -> Option<&'r Device> {
    let by_fp = parse_sha256(&req.cert_sha256).and_then(|fp| registry.device_by_sha256(&fp));
    by_fp
        .or_else(|| {
            rules
                .policy
                .match_serial
                .then(|| {
                    normalize_serial(&req.cert_serial).and_then(|s| registry.device_by_serial(&s))
                })
                .flatten()
        })
        .or_else(|| {
            (!req.device_uid.is_empty())
                .then(|| registry.device_by_uid(&req.device_uid))
                .flatten()
        })
        .or_else(|| {
            (!req.hostname.is_empty())
                .then(|| registry.device_by_hostname(&req.hostname))
                .flatten()
        })
        .or_else(|| {
            // A certificate field named the device (ocserv, strongSwan). Alone it is the
            // identity; beside a certificate (strongSwan) the entry counts only if it pins no
            // fingerprint, for a pinned one did not match this certificate.
            let d = registry.device_by_id(&req.device_id)?;
            let alone = req.cert_sha256.is_empty() && req.cert_serial.is_empty();
            (alone || d.cert_sha256.is_empty()).then_some(d)
        })
}

/// The device checks alone (registered, hardware address, private, status, encryption,
/// patch), for OpenVPN's tls-verify phase, where the client has not yet reported its hardware
/// address: with `hwaddr_reported = false` a missing address is not a mismatch.
pub fn check_device<'r>(
    req: &ConnectRequest,
    rules: &Rules,
    registry: &'r Registry,
    today: NaiveDate,
    hwaddr_reported: bool,
) -> Result<&'r Device, Denial> {
    let policy = &rules.policy;
    let device = find_device(req, rules, registry).ok_or_else(|| {
        deny(
            Reason::UnregisteredDevice,
            if req.vpn == "radius"
                && req.cert_sha256.is_empty()
                && req.cert_serial.is_empty()
                && req.device_uid.is_empty()
                && req.hostname.is_empty()
            {
                "The concentrator sent no device identity, so the device cannot be checked."
            } else {
                "This device's certificate is not registered in the device inventory."
            },
        )
    })?;

    // A path that never reports hardware addresses (RADIUS profiles other than Cisco's) does
    // not apply the rule: there is nothing to compare.
    if !device.hwaddr.is_empty() && !req.no_hwaddr_path {
        match HwAddr::parse(&req.hwaddr) {
            Some(hw) if device.hwaddr.contains(&hw) => {}
            Some(_) => {
                return Err(deny(
                    Reason::DeviceMismatch,
                    format!(
                        "The certificate of device {} is used on a machine with another hardware address.",
                        device.id
                    ),
                ));
            }
            None if policy.require_hwaddr && hwaddr_reported => {
                return Err(deny(
                    Reason::DeviceMismatch,
                    format!(
                        "Device {} has a registered hardware address, but the client reported none.",
                        device.id
                    ),
                ));
            }
            None => {}
        }
    }

    check_standing(device, &req.zone, policy, today, 0)?;
    Ok(device)
}

/// What the inventory says of a device itself: private (outside the mail-only zone), status,
/// encryption, patch age (`patch_grace_days` beyond the allowed age, for live sessions).
fn check_standing(
    device: &Device,
    zone: &str,
    policy: &crate::config::PolicyConfig,
    today: NaiveDate,
    patch_grace_days: u32,
) -> Result<(), Denial> {
    let mail_only = policy.private_devices == PrivateDevices::MailOnly && zone == policy.mail_zone;
    if device.ownership == Ownership::Private && !mail_only {
        return Err(deny(
            Reason::PrivateDevice,
            format!(
                "Device {} is a private device; only service devices may connect{}.",
                device.id,
                if policy.private_devices == PrivateDevices::MailOnly {
                    format!(" (private devices only to zone {})", policy.mail_zone)
                } else {
                    String::new()
                }
            ),
        ));
    }

    if device.status != Status::Active {
        return Err(deny(
            Reason::DeviceBlocked,
            format!(
                "Device {} is marked {} in the inventory.",
                device.id,
                device.status.as_str()
            ),
        ));
    }

    if policy.require_disk_encryption && !device.disk_encrypted {
        return Err(deny(
            Reason::NotEncrypted,
            format!("Device {} has no recorded full-disk encryption.", device.id),
        ));
    }

    let overdue = match device.patched_on {
        None => true,
        Some(day) => {
            (today - day).num_days()
                > i64::from(policy.max_patch_age_days) + i64::from(patch_grace_days)
        }
    };
    if overdue {
        let last = device
            .patched_on
            .map(|d| format!("last patched on {d}"))
            .unwrap_or_else(|| "no patch date recorded".into());
        return Err(deny(
            Reason::PatchOverdue,
            format!(
                "Device {} is {last}; at most {} days are allowed.",
                device.id, policy.max_patch_age_days
            ),
        ));
    }
    Ok(())
}

/// The checks on the person, the device's assignment, levels and zone.
/// `device` is `None` only where the device checks are skipped by configuration (a concentrator
/// that sends no device identity): assignment and clearance are then not checked, the session
/// names no device, and only the routes the user's own level permits are given.
fn check_person(
    username: &str,
    zone_name: &str,
    rules: &Rules,
    registry: &Registry,
    device: Option<&Device>,
) -> Result<Admission, Denial> {
    let policy = &rules.policy;
    let (org_unit_name, own_level) = match registry.user(username) {
        Some(u) => (u.org_unit.as_str(), u.level),
        None => match &policy.default_org_unit {
            Some(ou) => (ou.as_str(), None),
            None => {
                return Err(deny(
                    Reason::UnknownUser,
                    format!("User {username} is not in the user list."),
                ));
            }
        },
    };
    // The registry checks org units against the rules at load; a reload of the rules alone
    // could still drop one, so this stays a clear refusal rather than a panic.
    let org_unit = rules.org_units.get(org_unit_name).ok_or_else(|| {
        deny(
            Reason::UnknownUser,
            format!(
                "User {username} belongs to org unit {org_unit_name}, which is not configured."
            ),
        )
    })?;

    if let Some(device) = device {
        check_assignment(device, username, org_unit)?;
    }

    let level = own_level.unwrap_or(org_unit.level);
    if level > policy.remote_max_level && !org_unit.remote_exception {
        return Err(deny(
            Reason::RemoteWorkNotPermitted,
            format!(
                "User {username} works at data-protection level {}, above the remote-work ceiling {}, and org unit {} has no exception.",
                rules.level_name(level),
                rules.level_name(policy.remote_max_level),
                org_unit.name
            ),
        ));
    }

    let zone = rules.zones.get(zone_name);
    let needed = level.max(zone.map(|z| z.level).unwrap_or(0));
    if let Some(device) = device
        && device.clearance < needed
    {
        return Err(deny(
            Reason::DeviceClearance,
            format!(
                "Device {} is cleared for level {}, but level {} is needed.",
                device.id,
                rules.level_name(device.clearance),
                rules.level_name(needed)
            ),
        ));
    }

    let Some(zone) = zone else {
        return Err(deny(
            Reason::UnknownZone,
            format!("Zone {zone_name} is not configured."),
        ));
    };

    // Without a device (its checks skipped by configuration), the user's own level stands in
    // for the device's clearance.
    let clearance = device.map_or(level, |d| d.clearance);
    Ok(Admission {
        device_id: device.map(|d| d.id.to_string()).unwrap_or_default(),
        username: username.to_string(),
        org_unit: org_unit.name.clone(),
        level,
        zone: zone.name.clone(),
        priority: org_unit.priority,
        quota: org_unit.quota,
        pool: zone.pool,
        network: zone.network,
        routes: zone
            .routes
            .iter()
            .filter(|r| r.level <= clearance)
            .map(|r| r.prefix)
            .collect(),
    })
}

/// A device assigned to named users serves only them; a pool device only its own org unit.
fn check_assignment(
    device: &Device,
    username: &str,
    org_unit: &crate::config::OrgUnit,
) -> Result<(), Denial> {
    let assigned = if device.users.is_empty() {
        *device.org_unit == *org_unit.name
    } else {
        device.users.iter().any(|u| &**u == username)
    };
    if !assigned {
        return Err(deny(
            Reason::UserNotAssigned,
            if device.users.is_empty() {
                format!(
                    "Device {} is a pool device of org unit {}, and user {username} belongs to {}.",
                    device.id, device.org_unit, org_unit.name
                )
            } else {
                format!("Device {} is not assigned to user {username}.", device.id)
            },
        ));
    }
    Ok(())
}

/// Every check but capacity and the hardware address for a device named by its inventory id
/// (`pforte check --device`: the help desk knows the asset tag, not the certificate).
pub fn evaluate_device(
    device_id: &str,
    username: &str,
    zone: &str,
    rules: &Rules,
    registry: &Registry,
    today: NaiveDate,
) -> Result<Admission, Denial> {
    let Some(device) = registry.device_by_id(device_id) else {
        return Err(deny(
            Reason::UnregisteredDevice,
            format!("There is no device {device_id} in the device inventory."),
        ));
    };
    check_standing(device, zone, &rules.policy, today, 0)?;
    check_person(username, zone, rules, registry, Some(device))
}

/// A live session's device and person, as a reload re-decides them.
#[derive(Debug, Clone, Copy)]
pub struct Live<'a> {
    /// The device's inventory id.
    pub device_id: &'a str,
    /// The user.
    pub username: &'a str,
    /// The zone.
    pub zone: &'a str,
}

/// Re-decides a live session against new rules and registry: the device and person checks
/// (not capacity, not the hardware address, which a live session cannot report again). With
/// [`Revocation::BlockedOnly`] only a removed or blocked device fails. Patch age gets
/// `revoke_patch_grace_days` beyond the allowed age.
pub fn recheck(
    live: Live<'_>,
    rules: &Rules,
    registry: &Registry,
    today: NaiveDate,
) -> Result<(), Denial> {
    let policy = &rules.policy;
    if live.device_id.is_empty() {
        // Admitted without device checks (a concentrator that sends no device identity, with
        // `missing_device = "skip-device-checks"`): only the person is decided again.
        if policy.revoke_on_reload == Revocation::BlockedOnly {
            return Ok(());
        }
        return check_person(live.username, live.zone, rules, registry, None).map(|_| ());
    }
    let Some(device) = registry.device_by_id(live.device_id) else {
        return Err(deny(
            Reason::UnregisteredDevice,
            format!(
                "Device {} was removed from the device inventory.",
                live.device_id
            ),
        ));
    };
    if policy.revoke_on_reload == Revocation::BlockedOnly {
        if device.status != Status::Active {
            return Err(deny(
                Reason::DeviceBlocked,
                format!(
                    "Device {} is marked {} in the inventory.",
                    device.id,
                    device.status.as_str()
                ),
            ));
        }
        return Ok(());
    }
    check_standing(
        device,
        live.zone,
        policy,
        today,
        policy.revoke_patch_grace_days,
    )?;
    check_person(live.username, live.zone, rules, registry, Some(device)).map(|_| ())
}

/// Sessions already held, as the admission check sees them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Occupancy {
    /// All live sessions.
    pub total: u32,
    /// Live sessions of the admission's org unit.
    pub org_unit: u32,
    /// Live sessions of the admission's user.
    pub user: u32,
}

/// The capacity checks, in order: seats (reserved ones only for priority org units), org-unit
/// quota, per-user limit.
pub fn check_capacity(adm: &Admission, occ: Occupancy, cap: &Capacity) -> Result<(), Denial> {
    let limit = if adm.priority {
        cap.max_sessions
    } else {
        cap.max_sessions.saturating_sub(cap.reserved_seats)
    };
    if occ.total >= limit {
        return Err(deny(
            Reason::CapacityFull,
            if adm.priority || cap.reserved_seats == 0 {
                format!("All {} VPN seats are taken.", cap.max_sessions)
            } else {
                format!(
                    "All {limit} general VPN seats are taken; the remaining {} are reserved for priority org units.",
                    cap.reserved_seats
                )
            },
        ));
    }
    if adm.quota > 0 && occ.org_unit >= adm.quota {
        return Err(deny(
            Reason::OrgUnitQuota,
            format!(
                "Org unit {} has used all {} of its VPN sessions.",
                adm.org_unit, adm.quota
            ),
        ));
    }
    if cap.max_sessions_per_user > 0 && occ.user >= cap.max_sessions_per_user {
        return Err(deny(
            Reason::UserSessionLimit,
            format!(
                "User {} already has {} VPN sessions, the maximum.",
                adm.username, occ.user
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
