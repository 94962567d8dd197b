//! Fuzz checks: each `pub fn` takes arbitrary bytes, runs them through one of pforte's parsers
//! that see outside bytes, and panics when an invariant breaks. Shared, unchanged, by the fuzz
//! targets (`fuzz/fuzz_targets/*.rs`, through `fuzz/src/lib.rs`) and by the regression test
//! (`tests/it/fuzz_regressions.rs`, through `#[path]`), so a saved input replays exactly.
//!
//! Only `std`, `pforte` and crates `pforte` itself depends on (`chrono`, `serde_json`) are used,
//! so the file compiles in both places.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;

use chrono::NaiveDate;
use pforte::config::{PrivateDevices, Rules};
use pforte::policy::{self, Admission};
use pforte::registry::{self as reg, Device, Ownership, Registry, Status, User};
use pforte::vpn::openvpn::management::{self, ClientEventKind, Event, Parser};
use pforte::vpn::openvpn::mgmt;
use pforte::vpn::openvpn::{self, HookSettings};
use pforte::wire::{ConnectRequest, Denial, Reason};
use pforte::wire::{Ifconfig, Push};

const EXAMPLE_CONFIG: &str = include_str!("../../config/pforte.toml");
const EXAMPLE_DEVICES: &[u8] = include_bytes!("../../config/devices.csv");
const EXAMPLE_USERS: &[u8] = include_bytes!("../../config/users.csv");

/// A second rule set with the other switch positions: serial matching, no hardware-address
/// requirement, private devices refused, unknown users to a default org unit, a short patch
/// age, an IPv6 pool with IPv6 routes, a tiny IPv4 pool and a zone without a pool.
const VARIANT_CONFIG: &str = r#"
[server]
socket = "run/p.sock"
[registry]
devices = "d.csv"
[policy]
require_disk_encryption = false
max_patch_age_days = 30
remote_max_level = 2
private_devices = "refuse"
default_org_unit = "finance"
require_hwaddr = false
match_serial = true
[[org_units]]
name = "it"
level = 1
priority = true
[[org_units]]
name = "finance"
level = 1
quota = 2
[[org_units]]
name = "health-office"
level = 2
remote_exception = true
[[org_units]]
name = "social-welfare"
level = 3
[[zones]]
name = "office"
level = 1
pool = "fd00:80::/64"
routes = ["10.1.0.0/16", "2001:db8:1::/48", { prefix = "2001:db8:2::/48", level = 2 }]
[[zones]]
name = "mail"
pool = "10.82.0.0/30"
[[zones]]
name = "nopool"
routes = ["0.0.0.0/0"]
"#;

/// The rule sets, the example registry, and a fixed "today", built once per process.
struct Fixture {
    rule_sets: Vec<Rules>,
    registry: Registry,
    today: NaiveDate,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rules = |text: &str| {
            pforte::config::parse(text, Path::new("fixture.toml"), HashMap::new())
                .expect("fixture config parses")
                .rules
        };
        let example = rules(EXAMPLE_CONFIG);
        let variant = rules(VARIANT_CONFIG);
        let mut registry = Registry::default();
        for (_, row) in reg::parse_csv_rows(EXAMPLE_DEVICES).expect("example devices parse") {
            let device = reg::parse_device(&row, &example).expect("example device parses");
            registry
                .insert_device(device)
                .expect("example device inserts");
        }
        for (_, row) in reg::parse_csv_rows(EXAMPLE_USERS).expect("example users parse") {
            registry.insert_user(reg::parse_user(&row, &example).expect("example user parses"));
        }
        Fixture {
            rule_sets: vec![example, variant],
            registry,
            today: NaiveDate::from_ymd_opt(2026, 11, 23).expect("a valid date"),
        }
    })
}

fn lines_of(data: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(data)
        .split('\n')
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// openvpn_env

/// Target `openvpn_env`: bytes as an OpenVPN script environment, one `name=value` per line
/// (invalid UTF-8 replaced, as the hook's `environment()` does; `PFORTE_INSTANCE` and
/// `PFORTE_ZONE` in it play the hook's settings), through the hook's request mapping and the
/// whole policy.
pub fn openvpn_env(data: &[u8]) {
    let mut env: HashMap<String, String> = HashMap::new();
    for line in lines_of(data) {
        if let Some((k, v)) = line.split_once('=') {
            env.insert(k.to_string(), v.to_string());
        }
    }
    let get = |k: &str| env.get(k).cloned().unwrap_or_default();
    let settings = HookSettings {
        instance: env
            .get("PFORTE_INSTANCE")
            .cloned()
            .unwrap_or_else(|| "office-udp".into()),
        zone: env
            .get("PFORTE_ZONE")
            .cloned()
            .unwrap_or_else(|| "office".into()),
    };

    let req = openvpn::connect_request(&env, &settings);
    assert_eq!(req.vpn, "openvpn");
    assert_eq!(req.username, get("username"));
    assert_eq!(req.common_name, get("common_name"));
    assert_eq!(req.cert_sha256, get("tls_digest_sha256_0"));
    assert_eq!(req.cert_serial, get("tls_serial_0"));
    assert_eq!(req.hwaddr, get("IV_HWADDR"));
    assert_eq!(req.tunnel_ip, get("ifconfig_pool_remote_ip"));
    assert!(req.session_key.starts_with(&req.remote_addr));

    let dis = openvpn::disconnect_request(&env, &settings);
    assert_eq!(dis.session_key, req.session_key);
    assert_eq!(dis.instance, settings.instance);
    let _ = dis.selector();

    let _ = decide(&req);
}

// ---------------------------------------------------------------------------------------------
// The policy, shared by every target that ends in a connect request

/// Runs a request through the policy with every rule set and checks the verdicts; returns the
/// verdict of the example rules (what the management target answers OpenVPN with).
fn decide(req: &ConnectRequest) -> Result<Admission, Denial> {
    let f = fixture();
    let mut first = None;
    for rules in &f.rule_sets {
        let verdict = decide_with(req, rules, &f.registry, f.today);
        first.get_or_insert(verdict);
    }
    first.expect("at least one rule set")
}

fn decide_with(
    req: &ConnectRequest,
    rules: &Rules,
    registry: &Registry,
    today: NaiveDate,
) -> Result<Admission, Denial> {
    let valid = policy::validate_request(req);
    let verdict = policy::evaluate(req, rules, registry, today);
    match (&valid, &verdict) {
        (Err(v), Ok(_)) => panic!("an invalid request was admitted: {v:?}"),
        (Err(v), Err(d)) => {
            assert_eq!(v, d, "the validation problem must be the reason");
            assert_eq!(d.reason, Reason::BadRequest);
        }
        (Ok(()), Err(d)) => assert_ne!(d.reason, Reason::BadRequest, "{d:?}"),
        (Ok(()), Ok(_)) => {}
    }
    if valid.is_ok() {
        check_valid_request(req);
        // The tls-verify phase (no hardware address yet) must agree on admitted devices.
        let verify = policy::check_device(req, rules, registry, today, false);
        let full = policy::check_device(req, rules, registry, today, true);
        if let Ok(d) = &full {
            assert_eq!(verify.as_ref().map(|v| &v.id).ok(), Some(&d.id));
        }
    }
    match &verdict {
        Ok(adm) => check_admission(req, rules, registry, adm),
        Err(d) => {
            assert!(!d.message.is_empty());
            if valid.is_ok() {
                assert!(
                    !d.message.chars().any(char::is_control),
                    "a denial message carries control characters: {d:?}"
                );
            }
        }
    }
    verdict
}

fn check_valid_request(req: &ConnectRequest) {
    for v in [
        &req.vpn,
        &req.instance,
        &req.zone,
        &req.username,
        &req.common_name,
        &req.cert_sha256,
        &req.cert_serial,
        &req.hwaddr,
        &req.platform,
        &req.remote_addr,
        &req.tunnel_ip,
        &req.session_key,
    ] {
        assert!(v.len() <= pforte::wire::MAX_FIELD_LEN);
        assert!(!v.chars().any(char::is_control));
    }
    assert!(pforte::wire::VPN_KINDS.contains(&req.vpn.as_str()));
    assert!(!req.zone.is_empty());
    assert!(!req.identity().is_empty());
}

/// What an admission promises: the security properties of the checks, and a clean push.
fn check_admission(req: &ConnectRequest, rules: &Rules, registry: &Registry, adm: &Admission) {
    let p = &rules.policy;
    let device = registry
        .device_by_id(&adm.device_id)
        .expect("an admitted device is registered");
    let by_fp =
        reg::parse_sha256(&req.cert_sha256).is_some_and(|fp| device.cert_sha256.contains(&fp));
    let by_serial = p.match_serial
        && reg::normalize_serial(&req.cert_serial)
            .is_some_and(|s| device.cert_serial.iter().any(|x| **x == *s));
    assert!(
        by_fp || by_serial,
        "admitted without a matching certificate"
    );
    assert_eq!(device.status, Status::Active);
    assert!(device.disk_encrypted || !p.require_disk_encryption);
    assert!(
        device.ownership == Ownership::Service
            || (p.private_devices == PrivateDevices::MailOnly && req.zone == p.mail_zone)
    );
    if !device.hwaddr.is_empty() && p.require_hwaddr {
        let hw = reg::HwAddr::parse(&req.hwaddr).expect("an admitted device reported its address");
        assert!(device.hwaddr.contains(&hw));
    }
    assert_eq!(adm.username, req.identity());
    assert_eq!(adm.zone, req.zone);
    let zone = rules.zones.get(&adm.zone).expect("an admitted zone exists");
    assert!(device.clearance >= adm.level && device.clearance >= zone.level);
    assert!(rules.org_units.contains_key(&adm.org_unit));
    for r in &adm.routes {
        assert!(
            zone.routes
                .iter()
                .any(|z| z.prefix == *r && z.level <= device.clearance)
        );
    }
    check_dynamic_config(&push_for(adm, req));
}

/// The push the daemon would send: a pool address (the VPN's own pick when it is in the pool),
/// and the admitted routes.
fn push_for(adm: &Admission, req: &ConnectRequest) -> Push {
    let ifconfig = adm.pool.map(|pool| {
        let ip = req
            .tunnel_ip
            .parse::<IpAddr>()
            .ok()
            .filter(|ip| pool.contains(ip))
            .or_else(|| pool.hosts().nth(1))
            .unwrap_or_else(|| pool.addr());
        Ifconfig {
            ip,
            netmask: pool.netmask().to_string(),
            prefix_len: pool.prefix_len(),
        }
    });
    Push {
        ifconfig,
        routes: adm.routes.clone(),
    }
}

/// The client-connect file: one directive a line, nothing else.
fn check_dynamic_config(push: &Push) -> String {
    let text = openvpn::dynamic_config(push);
    assert!(text.is_empty() || text.ends_with('\n'));
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    assert_eq!(
        lines.len(),
        usize::from(push.ifconfig.is_some()) + push.routes.len(),
        "{text:?}"
    );
    for l in lines {
        assert!(!l.chars().any(char::is_control), "{l:?}");
        assert!(
            l.starts_with("ifconfig-push ")
                || l.starts_with("ifconfig-ipv6-push ")
                || l.starts_with("push \"route ")
                || l.starts_with("push \"route-ipv6 "),
            "{l:?}"
        );
    }
    text
}

// ---------------------------------------------------------------------------------------------
// registry_csv, registry_json

/// Target `registry_csv`: bytes as a registry CSV file, every row as device and as user, each
/// parsed entry written back (CSV and JSON) and parsed again, the devices indexed.
pub fn registry_csv(data: &[u8]) {
    match reg::parse_csv_rows(data) {
        Ok(rows) => check_rows(&rows),
        Err((line, problem)) => {
            assert!(line >= 1, "a CSV error names no line: {problem}");
            assert!(!problem.is_empty());
        }
    }
}

/// Target `registry_json`: bytes as a registry JSON file, then as [`registry_csv`].
pub fn registry_json(data: &[u8]) {
    match reg::parse_json_rows(data) {
        Ok(rows) => check_rows(&rows),
        Err((_, problem)) => assert!(!problem.is_empty()),
    }
}

type Row = HashMap<String, String>;

fn check_rows(rows: &[(u64, Row)]) {
    let rules = &fixture().rule_sets[0];
    let mut registry = Registry::default();
    let mut refused = false;
    let mut parsed = Vec::new();
    for (_, row) in rows {
        if let Ok(d) = reg::parse_device(row, rules) {
            check_device_fields(&d);
            let again = reparse_device(&device_csv(&d), reg::parse_csv_rows, rules);
            assert_eq!(format!("{d:?}"), format!("{again:?}"), "CSV round trip");
            let again = reparse_device(&device_json(&d), reg::parse_json_rows, rules);
            assert_eq!(format!("{d:?}"), format!("{again:?}"), "JSON round trip");
            // `Registry::load` stops at the first refusal (a duplicate) and drops the half-built
            // registry; the public calls after a refusal must still not panic.
            parsed.push(d.clone());
            refused |= registry.insert_device(d).is_err();
        }
        if let Ok(u) = reg::parse_user(row, rules) {
            let again = reparse_user(&user_csv(&u), reg::parse_csv_rows, rules);
            assert_eq!(format!("{u:?}"), format!("{again:?}"), "CSV round trip");
            let again = reparse_user(&user_json(&u), reg::parse_json_rows, rules);
            assert_eq!(format!("{u:?}"), format!("{again:?}"), "JSON round trip");
        }
    }
    if refused {
        for d in &parsed {
            let mut found = usize::from(registry.device_by_id(&d.id).is_some());
            for fp in d.cert_sha256.iter() {
                found += usize::from(registry.device_by_sha256(fp).is_some());
            }
            for s in d.cert_serial.iter() {
                found += usize::from(registry.device_by_serial(s).is_some());
            }
            for h in d.hwaddr.iter() {
                found += usize::from(registry.device_by_hwaddr(h).is_some());
            }
            std::hint::black_box(found);
        }
    } else {
        check_indexes(&registry);
    }
}

/// Every index leads to a device that carries the key it was looked up by.
fn check_indexes(registry: &Registry) {
    for d in registry.devices() {
        let by_id = registry.device_by_id(&d.id).expect("indexed by id");
        assert_eq!(format!("{by_id:?}"), format!("{d:?}"));
        for fp in d.cert_sha256.iter() {
            let x = registry
                .device_by_sha256(fp)
                .expect("indexed by fingerprint");
            assert_eq!(x.id, d.id);
        }
        for s in d.cert_serial.iter() {
            let x = registry.device_by_serial(s).expect("indexed by serial");
            assert_eq!(x.id, d.id);
        }
        for h in d.hwaddr.iter() {
            // A shared address stays with the first device that has it.
            let x = registry.device_by_hwaddr(h).expect("indexed by address");
            assert!(x.hwaddr.contains(h));
        }
    }
}

fn check_device_fields(d: &Device) {
    let id: &str = &d.id;
    assert!(!id.is_empty() && id.len() <= 128);
    assert_eq!(id.trim(), id);
    assert!(!d.cert_sha256.is_empty() || !d.cert_serial.is_empty());
    for s in d.cert_serial.iter() {
        let s: &str = s;
        assert!(
            !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()),
            "{s:?}"
        );
        assert!(s == "0" || !s.starts_with('0'), "{s:?}");
    }
    for u in d.users.iter() {
        let u: &str = u;
        assert!(!u.is_empty() && !u.contains(';') && u.trim() == u, "{u:?}");
    }
}

const DEVICE_COLUMNS: [&str; 11] = [
    "device_id",
    "ownership",
    "status",
    "org_unit",
    "clearance",
    "disk_encrypted",
    "patched_on",
    "cert_sha256",
    "cert_serial",
    "hwaddr",
    "users",
];

fn hex(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

fn device_texts(d: &Device) -> [String; 11] {
    [
        d.id.to_string(),
        d.ownership.as_str().to_string(),
        d.status.as_str().to_string(),
        d.org_unit.to_string(),
        d.clearance.to_string(),
        d.disk_encrypted.to_string(),
        d.patched_on.map(|p| p.to_string()).unwrap_or_default(),
        d.cert_sha256.iter().map(hex).collect::<Vec<_>>().join(";"),
        d.cert_serial.join(";"),
        d.hwaddr
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(";"),
        d.users.join(";"),
    ]
}

/// A CSV field, always quoted (so a leading `#` is no comment and `;`, `,`, quotes and line
/// ends survive).
fn csv_field(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn csv_file(columns: &[&str], values: &[String]) -> Vec<u8> {
    let row: Vec<String> = values.iter().map(|v| csv_field(v)).collect();
    format!("{}\n{}\n", columns.join(","), row.join(",")).into_bytes()
}

fn device_csv(d: &Device) -> Vec<u8> {
    csv_file(&DEVICE_COLUMNS, &device_texts(d))
}

fn device_json(d: &Device) -> Vec<u8> {
    use serde_json::{Value, json};
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let entry = json!({
        "device_id": &*d.id,
        "ownership": d.ownership.as_str(),
        "status": d.status.as_str(),
        "org_unit": &*d.org_unit,
        "clearance": d.clearance,
        "disk_encrypted": d.disk_encrypted,
        "patched_on": d.patched_on.map(|p| p.to_string()),
        "cert_sha256": strings(d.cert_sha256.iter().map(hex).collect()),
        "cert_serial": strings(d.cert_serial.iter().map(|s| s.to_string()).collect()),
        "hwaddr": strings(d.hwaddr.iter().map(ToString::to_string).collect()),
        "users": strings(d.users.iter().map(|u| u.to_string()).collect()),
    });
    serde_json::to_vec(&Value::Array(vec![entry])).expect("JSON encodes")
}

fn user_csv(u: &User) -> Vec<u8> {
    csv_file(
        &["username", "org_unit", "level"],
        &[
            u.name.clone(),
            u.org_unit.clone(),
            u.level.map(|l| l.to_string()).unwrap_or_default(),
        ],
    )
}

fn user_json(u: &User) -> Vec<u8> {
    let entry = serde_json::json!({"username": u.name, "org_unit": u.org_unit, "level": u.level});
    serde_json::to_vec(&serde_json::Value::Array(vec![entry])).expect("JSON encodes")
}

type RowParser = fn(&[u8]) -> Result<Vec<(u64, Row)>, (u64, String)>;

fn one_row(bytes: &[u8], parse: RowParser) -> Row {
    let rows = parse(bytes).unwrap_or_else(|e| {
        panic!(
            "written entry does not parse: {e:?}\n{}",
            String::from_utf8_lossy(bytes)
        )
    });
    assert_eq!(rows.len(), 1, "{}", String::from_utf8_lossy(bytes));
    rows.into_iter().next().map(|(_, r)| r).unwrap_or_default()
}

fn reparse_device(bytes: &[u8], parse: RowParser, rules: &Rules) -> Device {
    reg::parse_device(&one_row(bytes, parse), rules).unwrap_or_else(|e| {
        panic!(
            "written device does not parse: {e}\n{}",
            String::from_utf8_lossy(bytes)
        )
    })
}

fn reparse_user(bytes: &[u8], parse: RowParser, rules: &Rules) -> User {
    reg::parse_user(&one_row(bytes, parse), rules).unwrap_or_else(|e| {
        panic!(
            "written user does not parse: {e}\n{}",
            String::from_utf8_lossy(bytes)
        )
    })
}

// ---------------------------------------------------------------------------------------------
// config

/// Target `config`: bytes (invalid UTF-8 replaced) as `fuzz.toml`. Errors name the file; a
/// config that loads keeps its promises, and its rules decide a few example devices without
/// a panic (even though the example registry's org units may be missing from them).
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let c = match pforte::config::parse(&text, Path::new("fuzz.toml"), HashMap::new()) {
        Ok(c) => c,
        Err(e) => {
            assert_eq!(e.file, "fuzz.toml");
            assert!(!e.key.is_empty() && !e.problem.is_empty(), "{e:?}");
            assert!(e.to_string().starts_with("fuzz.toml: "), "{e}");
            return;
        }
    };
    assert_eq!(c.source, Path::new("fuzz.toml"));
    assert!(c.server.listen.is_some() || c.server.socket.is_some());
    assert!(c.server.socket_mode <= 0o777);
    let rules = &c.rules;
    assert!(!rules.org_units.is_empty() && !rules.zones.is_empty());
    assert!(rules.capacity.reserved_seats <= rules.capacity.max_sessions);
    if rules.policy.private_devices == PrivateDevices::MailOnly {
        assert!(rules.zones.contains_key(&rules.policy.mail_zone));
    }
    if let Some(ou) = &rules.policy.default_org_unit {
        assert!(rules.org_units.contains_key(ou));
    }
    for (name, z) in &rules.zones {
        assert_eq!(name, &z.name);
        if let Some(pool) = z.pool {
            assert!(pool.prefix_len() + 2 <= pool.max_prefix_len());
        }
    }
    for o in &c.openvpn {
        assert!(rules.zones.contains_key(&o.zone));
    }
    let f = fixture();
    for zone in rules.zone_names() {
        for (fp, hwaddr, user) in [
            (
                "d2:c1:bb:41:06:42:2b:f8:42:2d:8b:df:25:5d:e9:a8:b6:3e:02:5a:76:43:cd:e5:04:f4:3d:ac:92:dc:48:65",
                "aa:bb:cc:10:01:01",
                "alice",
            ),
            (
                "3D042EE6D7B821939C85764594AA447FE587CE11661B22FFC0EB86F5C7C949C4",
                "",
                "carol",
            ),
            (
                "33:ae:44:b8:d9:08:ae:06:56:18:c0:fb:77:10:0a:f4:45:6f:4d:9a:a5:bd:68:57:be:15:40:ea:7b:33:45:c9",
                "",
                "alice",
            ),
        ] {
            let req = ConnectRequest {
                vpn: "openvpn".into(),
                instance: "office-udp".into(),
                zone: zone.clone(),
                username: user.into(),
                cert_sha256: fp.into(),
                hwaddr: hwaddr.into(),
                remote_addr: "198.51.100.7:51000".into(),
                session_key: "198.51.100.7:51000".into(),
                ..Default::default()
            };
            let _ = decide_with(&req, rules, &f.registry, f.today);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// api_bodies

/// Target `api_bodies`: bytes as a `POST /v1/connect` body (re-encoded, it must parse to the
/// same request; then the policy) and as a `POST /v1/disconnect` body.
pub fn api_bodies(data: &[u8]) {
    match pforte::api::parse_connect(data) {
        Ok(req) => {
            let again = serde_json::to_vec(&req).expect("a request encodes");
            let reparsed = pforte::api::parse_connect(&again);
            assert_eq!(reparsed.as_ref().ok(), Some(&req), "{reparsed:?}");
            let _ = decide(&req);
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
    match pforte::api::parse_disconnect(data) {
        Ok(d) => {
            assert!(d.selector().is_ok());
            for v in [&d.session_id, &d.vpn, &d.instance, &d.session_key] {
                assert!(v.len() <= pforte::wire::MAX_FIELD_LEN);
            }
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
}

// ---------------------------------------------------------------------------------------------
// mgmt_lines

/// Target `mgmt_lines`: bytes as lines from OpenVPN's management interface, fed one by one to
/// the parser (client events go through the policy and become the `client-auth` or
/// `client-deny` command the daemon would send), and the whole as a `status 3` reply.
pub fn mgmt_lines(data: &[u8]) {
    let lines = lines_of(data);
    let settings = HookSettings {
        instance: "office-udp".into(),
        zone: "office".into(),
    };
    let mut parser = Parser::new();
    for line in &lines {
        check_quote(line);
        let Some(event) = parser.feed(line) else {
            continue;
        };
        match event {
            Event::Client(ev) => {
                assert!(
                    !ev.env.contains_key("password"),
                    "the password reached a client event"
                );
                assert!(ev.env.len() <= management::MAX_ENV_VARS);
                if matches!(ev.kind, ClientEventKind::Connect | ClientEventKind::Reauth) {
                    let real = openvpn::remote_addr(&ev.env);
                    let mut req = openvpn::connect_request(&ev.env, &settings);
                    req.session_key = mgmt::auth_key(&real, ev.cid);
                    let kid = ev.kid.unwrap_or(0);
                    let command = match decide(&req) {
                        Ok(adm) => format!(
                            "client-auth {} {kid}\n{}END\n",
                            ev.cid,
                            check_dynamic_config(&push_for(&adm, &req))
                        ),
                        Err(d) => {
                            let cmd = format!(
                                "client-deny {} {kid} {} {}\n",
                                ev.cid,
                                management::quote(&format!("pforte: {}: {}", d.reason, d.message)),
                                management::quote(&format!("{}: {}", d.reason, d.message))
                            );
                            assert_eq!(cmd.lines().count(), 1, "{cmd:?}");
                            cmd
                        }
                    };
                    assert!(command.ends_with('\n'));
                    assert!(!command.contains('\r'));
                }
            }
            Event::Reply(text) => {
                let _ = management::ends_reply(&text);
            }
            Event::ByteCount { .. } | Event::Info(_) | Event::Hold | Event::Other(_) => {}
        }
    }
    for c in management::parse_status(&lines) {
        let _ = mgmt::script_key(&c.real_address, c.connected_since);
    }
}

/// A quoted management argument is one argument: quotes at both ends only, no line end.
fn check_quote(s: &str) {
    let q = management::quote(s);
    let inner = q
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .expect("quoted");
    assert!(
        !inner.contains('"') && !inner.chars().any(char::is_control),
        "{q:?}"
    );
    // Every backslash is escaped: they come in pairs.
    assert!(
        inner.split("\\\\").all(|part| !part.contains('\\')),
        "{q:?}"
    );
}

/// VICI packets from charon (`vpn::strongswan::vici`): a packet that decodes encodes again to
/// one that decodes the same; the IKE_SAs of an event map to requests that name no device from
/// `remote-id`.
pub fn vici_packets(data: &[u8]) {
    use pforte::vpn::strongswan::vici::Packet;
    use pforte::vpn::strongswan::{IkeSa, Settings, connect_request, proven_identity};
    let body = data.get(4..).unwrap_or(&[]);
    let Ok(packet) = Packet::decode(body) else {
        return;
    };
    let again = packet.encode().expect("a decoded packet encodes");
    assert_eq!(
        Packet::decode(&again[4..]).expect("an encoded packet decodes"),
        packet,
        "VICI round trip changed the packet"
    );
    if let Packet::Event(_, m) = &packet {
        if let Some(msg) = m.str("msg") {
            let _ = proven_identity(&msg);
        }
        for sa in IkeSa::all_in(m) {
            let req = connect_request(&sa, None, None, &Settings::default());
            assert!(req.device_id.is_empty() && req.common_name.is_empty());
            assert_eq!(req.session_key, sa.key());
        }
    }
}

/// `occtl --json show users` output (`vpn::ocserv`): never a panic; every row maps to a request
/// whose key is the row's.
pub fn occtl_users(data: &[u8]) {
    use pforte::vpn::ocserv::{OcservSettings, parse_users};
    let text = String::from_utf8_lossy(data);
    if let Ok(rows) = parse_users(&text) {
        for row in rows {
            let req = row.connect_request(&OcservSettings::default());
            assert_eq!(req.session_key, row.key());
            let _ = row.bytes();
        }
    }
}
