use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;
use crate::config::{DuplicateDevice, OrgUnit, PolicyConfig, Revocation, Route, Zone};
use crate::registry::{Device, User};

fn today() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 11, 23).unwrap()
}

fn rules() -> Rules {
    let ou = |name: &str, level, quota, priority, remote_exception| {
        (
            name.to_string(),
            OrgUnit {
                name: name.into(),
                level,
                quota,
                priority,
                remote_exception,
            },
        )
    };
    let zone = |name: &str, level| Zone {
        name: name.into(),
        level,
        pool: Some("10.80.0.0/24".parse().unwrap()),
        network: Some("10.80.0.0/24".parse().unwrap()),
        routes: vec![
            Route {
                prefix: "10.1.0.0/16".parse().unwrap(),
                level: 1,
            },
            Route {
                prefix: "10.2.0.0/16".parse().unwrap(),
                level: 2,
            },
        ],
    };
    Rules {
        policy: PolicyConfig {
            require_disk_encryption: true,
            max_patch_age_days: 30,
            remote_max_level: 1,
            private_devices: PrivateDevices::Refuse,
            mail_zone: "mail".into(),
            default_org_unit: None,
            require_hwaddr: true,
            match_serial: false,
            revoke_on_reload: Revocation::AllChecks,
            revoke_patch_grace_days: 0,
            duplicate_device: DuplicateDevice::Replace,
        },
        levels: BTreeMap::from([(1, "normal".into()), (2, "high".into())]),
        capacity: Capacity {
            max_sessions: 10,
            reserved_seats: 2,
            max_sessions_per_user: 2,
        },
        org_units: HashMap::from([
            ou("it", 1, 3, true, false),
            ou("social", 2, 0, false, false),
            ou("health", 2, 0, false, true),
        ]),
        zones: HashMap::from([
            ("office".to_string(), zone("office", 1)),
            ("mail".to_string(), zone("mail", 0)),
            ("secure".to_string(), zone("secure", 2)),
        ]),
    }
}

fn fp(n: u8) -> [u8; 32] {
    [n; 32]
}

fn fp_text(n: u8) -> String {
    hex(&fp(n))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const HW: &str = "aa:bb:cc:00:00:01";

fn good_device(n: u8) -> Device {
    Device {
        id: format!("dev-{n}").into(),
        ownership: Ownership::Service,
        status: Status::Active,
        org_unit: "it".into(),
        clearance: 1,
        disk_encrypted: true,
        patched_on: Some(NaiveDate::from_ymd_opt(2026, 11, 1).unwrap()),
        cert_sha256: vec![fp(n)].into(),
        cert_serial: vec![format!("{n}").into()].into(),
        hwaddr: vec![HwAddr::parse(HW).unwrap()].into(),
        users: vec!["alice".into()].into(),
        device_uid: vec![].into(),
        hostname: vec![].into(),
    }
}

fn registry(devices: Vec<Device>) -> Registry {
    let mut r = Registry::default();
    for d in devices {
        r.insert_device(d).unwrap();
    }
    for (name, ou, level) in [
        ("alice", "it", None),
        ("bob", "social", None),
        ("carol", "health", None),
        ("dave", "it", Some(2)),
    ] {
        r.insert_user(User {
            name: name.into(),
            org_unit: ou.into(),
            level,
        });
    }
    r
}

fn request(n: u8) -> ConnectRequest {
    ConnectRequest {
        vpn: "openvpn".into(),
        instance: "office-udp".into(),
        zone: "office".into(),
        username: "alice".into(),
        cert_sha256: fp_text(n),
        hwaddr: HW.into(),
        remote_addr: "198.51.100.7:51000".into(),
        session_key: "k".into(),
        ..Default::default()
    }
}

fn reason_of(dev: Device, req: ConnectRequest) -> Result<Admission, Reason> {
    evaluate(&req, &rules(), &registry(vec![dev]), today()).map_err(|d| d.reason)
}

#[test]
fn allows_a_good_device() {
    let adm = reason_of(good_device(1), request(1)).unwrap();
    assert_eq!(adm.device_id, "dev-1");
    assert_eq!(adm.org_unit, "it");
    assert_eq!(adm.routes, vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]);
}

#[test]
fn bad_request() {
    for req in [
        ConnectRequest {
            vpn: "pptp".into(),
            ..request(1)
        },
        ConnectRequest {
            cert_sha256: "xyz".into(),
            ..request(1)
        },
        ConnectRequest {
            hwaddr: "not-a-mac".into(),
            ..request(1)
        },
        ConnectRequest {
            username: String::new(),
            common_name: String::new(),
            ..request(1)
        },
        ConnectRequest {
            zone: String::new(),
            ..request(1)
        },
        ConnectRequest {
            common_name: "x".repeat(10_000),
            ..request(1)
        },
        ConnectRequest {
            common_name: "a\0b".into(),
            ..request(1)
        },
    ] {
        assert_eq!(
            reason_of(good_device(1), req.clone()),
            Err(Reason::BadRequest),
            "{req:?}"
        );
    }
}

#[test]
fn unregistered_device() {
    assert_eq!(
        reason_of(good_device(1), request(2)),
        Err(Reason::UnregisteredDevice)
    );
}

#[test]
fn serial_fallback_only_where_configured() {
    let mut r = rules();
    let req = ConnectRequest {
        cert_sha256: String::new(),
        cert_serial: "1".into(),
        ..request(1)
    };
    let reg = registry(vec![good_device(1)]);
    assert_eq!(
        evaluate(&req, &r, &reg, today()).unwrap_err().reason,
        Reason::UnregisteredDevice
    );
    r.policy.match_serial = true;
    assert!(evaluate(&req, &r, &reg, today()).is_ok());
}

#[test]
fn device_mismatch() {
    let req = ConnectRequest {
        hwaddr: "aa:bb:cc:00:00:99".into(),
        ..request(1)
    };
    assert_eq!(reason_of(good_device(1), req), Err(Reason::DeviceMismatch));
    let req = ConnectRequest {
        hwaddr: String::new(),
        ..request(1)
    };
    assert_eq!(
        reason_of(good_device(1), req.clone()),
        Err(Reason::DeviceMismatch)
    );
    let mut r = rules();
    r.policy.require_hwaddr = false;
    assert!(evaluate(&req, &r, &registry(vec![good_device(1)]), today()).is_ok());
}

#[test]
fn private_device_and_mail_only() {
    let dev = Device {
        ownership: Ownership::Private,
        ..good_device(1)
    };
    assert_eq!(
        reason_of(dev.clone(), request(1)),
        Err(Reason::PrivateDevice)
    );
    let mut r = rules();
    r.policy.private_devices = PrivateDevices::MailOnly;
    let reg = registry(vec![dev]);
    let mail = ConnectRequest {
        zone: "mail".into(),
        ..request(1)
    };
    assert!(evaluate(&mail, &r, &reg, today()).is_ok());
    assert_eq!(
        evaluate(&request(1), &r, &reg, today()).unwrap_err().reason,
        Reason::PrivateDevice
    );
}

#[test]
fn device_blocked() {
    for status in [
        Status::Lost,
        Status::Stolen,
        Status::Retired,
        Status::Blocked,
    ] {
        let dev = Device {
            status,
            ..good_device(1)
        };
        assert_eq!(reason_of(dev, request(1)), Err(Reason::DeviceBlocked));
    }
}

#[test]
fn not_encrypted() {
    let dev = Device {
        disk_encrypted: false,
        ..good_device(1)
    };
    assert_eq!(reason_of(dev, request(1)), Err(Reason::NotEncrypted));
}

#[test]
fn patch_overdue() {
    let at_limit = Device {
        patched_on: Some(NaiveDate::from_ymd_opt(2026, 10, 24).unwrap()),
        ..good_device(1)
    };
    assert!(reason_of(at_limit, request(1)).is_ok());
    let over = Device {
        patched_on: Some(NaiveDate::from_ymd_opt(2026, 10, 23).unwrap()),
        ..good_device(1)
    };
    assert_eq!(reason_of(over, request(1)), Err(Reason::PatchOverdue));
    let never = Device {
        patched_on: None,
        ..good_device(1)
    };
    assert_eq!(reason_of(never, request(1)), Err(Reason::PatchOverdue));
}

#[test]
fn unknown_user_and_default_org_unit() {
    let dev = Device {
        users: vec![].into(),
        device_uid: vec![].into(),
        hostname: vec![].into(),
        ..good_device(1)
    };
    let req = ConnectRequest {
        username: "mallory".into(),
        ..request(1)
    };
    assert_eq!(
        reason_of(dev.clone(), req.clone()),
        Err(Reason::UnknownUser)
    );
    let mut r = rules();
    r.policy.default_org_unit = Some("it".into());
    let adm = evaluate(&req, &r, &registry(vec![dev]), today()).unwrap();
    assert_eq!(adm.org_unit, "it");
}

#[test]
fn user_not_assigned() {
    let req = ConnectRequest {
        username: "dave".into(),
        ..request(1)
    };
    assert_eq!(reason_of(good_device(1), req), Err(Reason::UserNotAssigned));
    // A pool device serves its own org unit only.
    let pool = Device {
        users: vec![].into(),
        device_uid: vec![].into(),
        hostname: vec![].into(),
        ..good_device(1)
    };
    let req = ConnectRequest {
        username: "bob".into(),
        ..request(1)
    };
    assert_eq!(reason_of(pool, req), Err(Reason::UserNotAssigned));
}

#[test]
fn remote_work_not_permitted() {
    let dev = Device {
        org_unit: "social".into(),
        users: vec![].into(),
        device_uid: vec![].into(),
        hostname: vec![].into(),
        clearance: 2,
        ..good_device(1)
    };
    let req = ConnectRequest {
        username: "bob".into(),
        ..request(1)
    };
    assert_eq!(reason_of(dev, req), Err(Reason::RemoteWorkNotPermitted));
    // The user's own level overrides the org unit's.
    let dev = Device {
        users: vec!["dave".into()].into(),
        device_uid: vec![].into(),
        hostname: vec![].into(),
        clearance: 2,
        ..good_device(1)
    };
    let req = ConnectRequest {
        username: "dave".into(),
        ..request(1)
    };
    assert_eq!(reason_of(dev, req), Err(Reason::RemoteWorkNotPermitted));
}

#[test]
fn device_clearance() {
    // carol: health, level 2, with a remote exception; her device is cleared for 1 only.
    let dev = Device {
        org_unit: "health".into(),
        users: vec!["carol".into()].into(),
        device_uid: vec![].into(),
        hostname: vec![].into(),
        ..good_device(1)
    };
    let req = ConnectRequest {
        username: "carol".into(),
        ..request(1)
    };
    assert_eq!(
        reason_of(dev.clone(), req.clone()),
        Err(Reason::DeviceClearance)
    );
    let cleared = Device {
        clearance: 2,
        ..dev
    };
    let adm = reason_of(cleared, req).unwrap();
    assert_eq!(adm.routes.len(), 2, "level-2 route for a level-2 device");
    // The zone's level counts too.
    let secure = ConnectRequest {
        zone: "secure".into(),
        ..request(1)
    };
    assert_eq!(
        reason_of(good_device(1), secure),
        Err(Reason::DeviceClearance)
    );
}

#[test]
fn unknown_zone() {
    let req = ConnectRequest {
        zone: "nowhere".into(),
        ..request(1)
    };
    assert_eq!(reason_of(good_device(1), req), Err(Reason::UnknownZone));
}

fn admission(priority: bool, quota: u32) -> Admission {
    Admission {
        device_id: "d".into(),
        username: "u".into(),
        org_unit: "it".into(),
        level: 1,
        zone: "office".into(),
        priority,
        quota,
        pool: None,
        network: None,
        routes: vec![],
    }
}

#[test]
fn capacity_full_and_reserved_seats() {
    let cap = rules().capacity; // 10 seats, 2 reserved
    let occ = |total| Occupancy {
        total,
        org_unit: 0,
        user: 0,
    };
    assert!(check_capacity(&admission(false, 0), occ(7), &cap).is_ok());
    assert_eq!(
        check_capacity(&admission(false, 0), occ(8), &cap)
            .unwrap_err()
            .reason,
        Reason::CapacityFull
    );
    assert!(check_capacity(&admission(true, 0), occ(9), &cap).is_ok());
    assert_eq!(
        check_capacity(&admission(true, 0), occ(10), &cap)
            .unwrap_err()
            .reason,
        Reason::CapacityFull
    );
}

#[test]
fn org_unit_quota() {
    let cap = rules().capacity;
    let occ = Occupancy {
        total: 1,
        org_unit: 3,
        user: 0,
    };
    assert_eq!(
        check_capacity(&admission(true, 3), occ, &cap)
            .unwrap_err()
            .reason,
        Reason::OrgUnitQuota
    );
    assert!(check_capacity(&admission(true, 0), occ, &cap).is_ok());
}

#[test]
fn user_session_limit() {
    let cap = rules().capacity;
    let occ = Occupancy {
        total: 1,
        org_unit: 1,
        user: 2,
    };
    assert_eq!(
        check_capacity(&admission(true, 0), occ, &cap)
            .unwrap_err()
            .reason,
        Reason::UserSessionLimit
    );
}

#[test]
fn reason_codes_are_snake_case_and_serde_agrees() {
    for r in Reason::ALL {
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, format!("\"{}\"", r.as_str()));
    }
}

fn arb_status() -> impl Strategy<Value = Status> {
    prop::sample::select(Status::ALL.to_vec())
}

prop_compose! {
    fn arb_device()(
        private in any::<bool>(),
        status in arb_status(),
        encrypted in any::<bool>(),
        age in 0i64..120,
        clearance in 0u8..4,
        ou in prop::sample::select(vec!["it", "social", "health"]),
        pool in any::<bool>(),
        hw in any::<bool>(),
    ) -> Device {
        Device {
            ownership: if private { Ownership::Private } else { Ownership::Service },
            status,
            disk_encrypted: encrypted,
            patched_on: Some(today() - chrono::Duration::days(age)),
            clearance,
            org_unit: ou.into(),
            users: if pool { vec![].into() } else { vec!["alice".into(), "bob".into(), "carol".into()].into() },
            device_uid: vec![].into(),
            hostname: vec![].into(),
            hwaddr: if hw { vec![HwAddr::parse(HW).unwrap()].into() } else { vec![].into() },
            ..good_device(1)
        }
    }
}

prop_compose! {
    fn arb_request()(
        fp_n in 1u8..3,
        zone in prop::sample::select(vec!["office", "mail", "secure", "nowhere"]),
        user in prop::sample::select(vec!["alice", "bob", "carol", "dave", "mallory", ""]),
        cn in ".{0,8}",
        hw in prop::sample::select(vec![HW, "", "aa:bb:cc:00:00:02", "junk"]),
        serial in prop::sample::select(vec!["", "1", "2", "0x01"]),
    ) -> ConnectRequest {
        ConnectRequest {
            zone: zone.into(),
            username: user.into(),
            common_name: cn,
            hwaddr: hw.into(),
            cert_serial: serial.into(),
            ..request(fp_n)
        }
    }
}

proptest! {
    /// No private, blocked, unencrypted, patch-overdue or unregistered device is ever allowed,
    /// whatever the other fields hold and however the switches are set (except the documented
    /// mail-only exception for private devices in the mail zone).
    #[test]
    fn refused_devices_are_never_allowed(
        dev in arb_device(),
        req in arb_request(),
        mail_only in any::<bool>(),
        match_serial in any::<bool>(),
        require_hwaddr in any::<bool>(),
        default_ou in any::<bool>(),
    ) {
        let mut r = rules();
        r.policy.private_devices = if mail_only { PrivateDevices::MailOnly } else { PrivateDevices::Refuse };
        r.policy.match_serial = match_serial;
        r.policy.require_hwaddr = require_hwaddr;
        r.policy.default_org_unit = default_ou.then(|| "it".to_string());
        let reg = registry(vec![dev.clone()]);
        let outcome = evaluate(&req, &r, &reg, today());
        if let Ok(adm) = outcome {
            prop_assert_eq!(adm.device_id.as_str(), &*dev.id);
            prop_assert!(dev.ownership == Ownership::Service || (mail_only && req.zone == "mail"));
            prop_assert_eq!(dev.status, Status::Active);
            prop_assert!(dev.disk_encrypted);
            prop_assert!((today() - dev.patched_on.unwrap()).num_days() <= 30);
            // Registered: the fingerprint matched, or the serial where configured.
            prop_assert!(req.cert_sha256 == fp_text(1) || (match_serial && !req.cert_serial.is_empty()));
            prop_assert!(adm.level <= 1 || r.org_units[&adm.org_unit].remote_exception);
            prop_assert!(dev.clearance >= adm.level);
        }
    }
}

fn radius_device() -> Device {
    Device {
        cert_sha256: vec![].into(),
        cert_serial: vec![].into(),
        device_uid: vec!["5e3a9b0c71d2".into()].into(),
        hostname: vec!["nb-it-0001".into()].into(),
        ..good_device(9)
    }
}

fn radius_request() -> ConnectRequest {
    ConnectRequest {
        vpn: "radius".into(),
        instance: "asa-1".into(),
        cert_sha256: String::new(),
        hwaddr: String::new(),
        ..request(9)
    }
}

#[test]
fn a_radius_device_is_found_by_uid_then_hostname_any_case() {
    let by_uid = ConnectRequest {
        device_uid: "5E3A9B0C71D2".into(),
        hwaddr: "AA-BB-CC-00-00-01".into(),
        ..radius_request()
    };
    assert_eq!(
        reason_of(radius_device(), by_uid).unwrap().device_id,
        "dev-9"
    );
    let by_host = ConnectRequest {
        hostname: "NB-IT-0001".into(),
        no_hwaddr_path: true,
        ..radius_request()
    };
    assert_eq!(
        reason_of(radius_device(), by_host).unwrap().device_id,
        "dev-9"
    );
    let unknown = ConnectRequest {
        hostname: "nb-it-0002".into(),
        no_hwaddr_path: true,
        ..radius_request()
    };
    assert_eq!(
        reason_of(radius_device(), unknown),
        Err(Reason::UnregisteredDevice)
    );
}

#[test]
fn the_hardware_address_rule_applies_only_where_the_path_reports_one() {
    // Cisco reports device-mac: a wrong or missing one is a mismatch.
    let wrong = ConnectRequest {
        device_uid: "5e3a9b0c71d2".into(),
        hwaddr: "aa-bb-cc-00-00-02".into(),
        ..radius_request()
    };
    assert_eq!(
        reason_of(radius_device(), wrong.clone()),
        Err(Reason::DeviceMismatch)
    );
    let missing = ConnectRequest {
        hwaddr: String::new(),
        ..wrong.clone()
    };
    assert_eq!(
        reason_of(radius_device(), missing),
        Err(Reason::DeviceMismatch)
    );
    // Palo Alto, Fortinet, generic: nothing to compare, the rule is not applied.
    let none = ConnectRequest {
        hwaddr: String::new(),
        no_hwaddr_path: true,
        ..wrong
    };
    assert!(reason_of(radius_device(), none).is_ok());
}

#[test]
fn a_radius_request_without_device_identity_is_refused_or_skipped_as_configured() {
    let bare = ConnectRequest {
        no_hwaddr_path: true,
        ..radius_request()
    };
    assert_eq!(
        reason_of(radius_device(), bare.clone()),
        Err(Reason::UnregisteredDevice)
    );
    let skipped = ConnectRequest {
        skip_device_checks: true,
        ..bare
    };
    let adm = reason_of(radius_device(), skipped.clone()).unwrap();
    assert_eq!(adm.device_id, "");
    assert_eq!(adm.routes, vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]);
    // The person checks still run.
    let bob = ConnectRequest {
        username: "bob".into(),
        ..skipped
    };
    assert_eq!(
        reason_of(radius_device(), bob),
        Err(Reason::RemoteWorkNotPermitted)
    );
    // Other VPN kinds still need a certificate.
    let openvpn = ConnectRequest {
        vpn: "openvpn".into(),
        ..radius_request()
    };
    assert_eq!(reason_of(radius_device(), openvpn), Err(Reason::BadRequest));
}

#[test]
fn recheck_decides_live_sessions_again_with_grace_and_the_blocked_only_switch() {
    let mut rules = rules();
    let live = |device_id| Live {
        device_id,
        username: "alice",
        zone: "office",
    };
    let code = |r: Result<(), Denial>| r.map_err(|d| d.reason);
    // 35 days since the patch (2026-11-01 to 2026-12-06), 30 allowed.
    let r = registry(vec![good_device(1)]);
    let day = NaiveDate::from_ymd_opt(2026, 12, 6).unwrap();
    assert_eq!(
        code(recheck(live("dev-1"), &rules, &r, day)),
        Err(Reason::PatchOverdue)
    );
    rules.policy.revoke_patch_grace_days = 7;
    assert_eq!(code(recheck(live("dev-1"), &rules, &r, day)), Ok(()));
    assert_eq!(
        code(recheck(live("gone"), &rules, &r, day)),
        Err(Reason::UnregisteredDevice)
    );
    let plain = registry(vec![Device {
        disk_encrypted: false,
        ..good_device(1)
    }]);
    assert_eq!(
        code(recheck(live("dev-1"), &rules, &plain, day)),
        Err(Reason::NotEncrypted)
    );
    rules.policy.revoke_on_reload = Revocation::BlockedOnly;
    assert_eq!(code(recheck(live("dev-1"), &rules, &plain, day)), Ok(()));
    let lost = registry(vec![Device {
        status: Status::Lost,
        ..good_device(1)
    }]);
    assert_eq!(
        code(recheck(live("dev-1"), &rules, &lost, day)),
        Err(Reason::DeviceBlocked)
    );
    // A session admitted without device checks is decided on the person alone.
    rules.policy.revoke_on_reload = Revocation::AllChecks;
    assert_eq!(code(recheck(live(""), &rules, &r, day)), Ok(()));
    let nobody = Live {
        device_id: "",
        username: "zed",
        zone: "office",
    };
    assert_eq!(
        code(recheck(nobody, &rules, &r, day)),
        Err(Reason::UnknownUser)
    );
}

#[test]
fn device_named_by_a_certificate_field() {
    // ocserv: no fingerprint, the inventory id from the certificate; no hardware address rule.
    let by_id = ConnectRequest {
        vpn: "ocserv".into(),
        cert_sha256: String::new(),
        hwaddr: String::new(),
        device_id: "dev-1".into(),
        ..request(1)
    };
    assert_eq!(
        reason_of(good_device(1), by_id.clone()).unwrap().device_id,
        "dev-1"
    );
    let unknown = ConnectRequest {
        device_id: "dev-9".into(),
        ..by_id.clone()
    };
    assert_eq!(
        reason_of(good_device(1), unknown),
        Err(Reason::UnregisteredDevice)
    );
    // strongSwan: a fingerprint and the id; an entry that pins another fingerprint is not
    // found by the id, one that pins none is.
    let both = ConnectRequest {
        vpn: "strongswan".into(),
        cert_sha256: fp_text(7),
        ..by_id
    };
    assert_eq!(
        reason_of(good_device(1), both.clone()),
        Err(Reason::UnregisteredDevice)
    );
    let unpinned = Device {
        cert_sha256: Box::new([]),
        ..good_device(1)
    };
    assert_eq!(reason_of(unpinned, both).unwrap().device_id, "dev-1");
}
