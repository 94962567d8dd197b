//! The registry: service and private devices, users. Loaded from CSV (or JSON) into hash
//! indexes and swapped in whole; a file with any bad row is refused whole, naming file and line.

use std::collections::HashMap;
use std::path::Path;

use chrono::NaiveDate;

use crate::config::Rules;

/// A registry load error: file, line (or JSON entry), what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The file.
        file: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A row or the file's structure is invalid.
    #[error("{file}:{line}: {problem}")]
    Invalid {
        /// The file.
        file: String,
        /// Line (CSV) or entry number (JSON), from 1; 0 for the whole file.
        line: u64,
        /// What is wrong.
        problem: String,
    },
}

/// Who owns a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ownership {
    /// A service device of the administration.
    Service,
    /// A private device.
    Private,
}

impl Ownership {
    /// The registry and label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Ownership::Service => "service",
            Ownership::Private => "private",
        }
    }
}

/// Inventory status of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// In use.
    Active,
    /// Reported lost.
    Lost,
    /// Reported stolen.
    Stolen,
    /// Taken out of service.
    Retired,
    /// Blocked by an operator.
    Blocked,
}

impl Status {
    /// All statuses, for metric labels.
    pub const ALL: [Status; 5] = [
        Status::Active,
        Status::Lost,
        Status::Stolen,
        Status::Retired,
        Status::Blocked,
    ];

    /// The registry and label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Lost => "lost",
            Status::Stolen => "stolen",
            Status::Retired => "retired",
            Status::Blocked => "blocked",
        }
    }
}

/// A hardware (MAC) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HwAddr(pub [u8; 6]);

impl HwAddr {
    /// Parses `aa:bb:cc:dd:ee:ff` (or with `-`), any case.
    pub fn parse(s: &str) -> Option<HwAddr> {
        let s = s.trim();
        if s.len() != 17 {
            return None;
        }
        let mut out = [0u8; 6];
        for (i, part) in s.split([':', '-']).enumerate() {
            if i >= 6 || part.len() != 2 {
                return None;
            }
            out[i] = u8::from_str_radix(part, 16).ok()?;
        }
        Some(HwAddr(out))
    }
}

impl std::fmt::Display for HwAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Parses a SHA-256 fingerprint: 64 hex digits, with or without colons, any case.
pub fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    let mut out = [0u8; 32];
    let mut n = 0usize;
    let mut hi: Option<u8> = None;
    for c in s.bytes() {
        if c == b':' {
            if hi.is_some() {
                return None;
            }
            continue;
        }
        let v = (c as char).to_digit(16)? as u8;
        match hi.take() {
            None => hi = Some(v),
            Some(h) => {
                if n >= 32 {
                    return None;
                }
                out[n] = (h << 4) | v;
                n += 1;
            }
        }
    }
    (n == 32 && hi.is_none()).then_some(out)
}

/// Normalises a certificate serial to decimal without leading zeros. Accepts decimal (as
/// OpenVPN's `tls_serial_0` prints it) or hex with colons or a `0x` prefix (as `tls_serial_hex_0`).
pub fn normalize_serial(s: &str) -> Option<String> {
    let s = s.trim();
    if s.is_empty() || s.len() > 128 {
        return None;
    }
    let hex = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h.to_string())
    } else if s.contains(':') {
        Some(s.replace(':', ""))
    } else {
        None
    };
    match hex {
        Some(h) => hex_to_decimal(&h),
        None => {
            if !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let t = s.trim_start_matches('0');
            Some(if t.is_empty() { "0".into() } else { t.into() })
        }
    }
}

/// Base conversion on digit vectors (serials are up to 160 bits, beyond u128).
fn hex_to_decimal(h: &str) -> Option<String> {
    if h.is_empty() {
        return None;
    }
    // Little-endian limbs of base 10^9.
    let mut limbs: Vec<u64> = vec![0];
    for c in h.chars() {
        let d = u64::from(c.to_digit(16)?);
        let mut carry = d;
        for limb in limbs.iter_mut() {
            let v = *limb * 16 + carry;
            *limb = v % 1_000_000_000;
            carry = v / 1_000_000_000;
        }
        if carry > 0 {
            limbs.push(carry);
        }
    }
    let mut out = String::new();
    for (i, limb) in limbs.iter().rev().enumerate() {
        if i == 0 {
            out.push_str(&limb.to_string());
        } else {
            out.push_str(&format!("{limb:09}"));
        }
    }
    Some(out)
}

/// A device of the inventory.
#[derive(Debug, Clone)]
pub struct Device {
    /// Inventory id.
    pub id: String,
    /// Service or private.
    pub ownership: Ownership,
    /// Inventory status.
    pub status: Status,
    /// Org unit it belongs to.
    pub org_unit: String,
    /// Highest data-protection level it is cleared for.
    pub clearance: u8,
    /// Full-disk encryption recorded.
    pub disk_encrypted: bool,
    /// Day of the last patch.
    pub patched_on: Option<NaiveDate>,
    /// Certificate fingerprints.
    pub cert_sha256: Vec<[u8; 32]>,
    /// Certificate serials, normalised decimal.
    pub cert_serial: Vec<String>,
    /// Registered hardware addresses.
    pub hwaddr: Vec<HwAddr>,
    /// Assigned users (empty: a pool device for its org unit).
    pub users: Vec<String>,
}

/// A user of the user list.
#[derive(Debug, Clone)]
pub struct User {
    /// Login name, as the VPN reports it.
    pub name: String,
    /// Org unit.
    pub org_unit: String,
    /// Own data-protection level (none: the org unit's).
    pub level: Option<u8>,
}

/// The loaded registry with its indexes. Immutable once built.
#[derive(Debug, Default)]
pub struct Registry {
    devices: Vec<Device>,
    by_sha256: HashMap<[u8; 32], u32>,
    by_serial: HashMap<String, u32>,
    by_hwaddr: HashMap<HwAddr, u32>,
    by_id: HashMap<String, u32>,
    users: HashMap<String, User>,
}

impl Registry {
    /// Loads devices and users, checking org units against the rules.
    pub fn load(
        devices: &Path,
        users: Option<&Path>,
        rules: &Rules,
    ) -> Result<Registry, RegistryError> {
        let rows = read_rows(devices)?;
        let mut reg = Registry::default();
        reg.devices.reserve(rows.len());
        let file = devices.display().to_string();
        for (line, fields) in rows {
            let device =
                parse_device(&fields, rules).map_err(|problem| invalid(&file, line, problem))?;
            reg.insert_device(device)
                .map_err(|problem| invalid(&file, line, problem))?;
        }
        if let Some(users) = users {
            let file = users.display().to_string();
            for (line, fields) in read_rows(users)? {
                let user =
                    parse_user(&fields, rules).map_err(|problem| invalid(&file, line, problem))?;
                if reg.users.contains_key(&user.name) {
                    return Err(invalid(
                        &file,
                        line,
                        format!("user `{}` is listed twice", user.name),
                    ));
                }
                reg.users.insert(user.name.clone(), user);
            }
        }
        Ok(reg)
    }

    /// Adds a device, refusing ambiguous fingerprints, serials, addresses and ids.
    pub fn insert_device(&mut self, d: Device) -> Result<(), String> {
        let idx = u32::try_from(self.devices.len()).map_err(|_| "too many devices".to_string())?;
        if self.by_id.insert(d.id.clone(), idx).is_some() {
            return Err(format!("device id `{}` is listed twice", d.id));
        }
        for fp in &d.cert_sha256 {
            if self.by_sha256.insert(*fp, idx).is_some() {
                return Err(format!(
                    "device `{}`: certificate fingerprint is already registered to another device",
                    d.id
                ));
            }
        }
        for s in &d.cert_serial {
            if self.by_serial.insert(s.clone(), idx).is_some() {
                return Err(format!(
                    "device `{}`: certificate serial {s} is already registered to another device",
                    d.id
                ));
            }
        }
        for hw in &d.hwaddr {
            // A shared address (docking stations) is not an error; the first entry keeps it.
            self.by_hwaddr.entry(*hw).or_insert(idx);
        }
        self.devices.push(d);
        Ok(())
    }

    /// Adds a user.
    pub fn insert_user(&mut self, u: User) {
        self.users.insert(u.name.clone(), u);
    }

    /// The device with this certificate fingerprint.
    pub fn device_by_sha256(&self, fp: &[u8; 32]) -> Option<&Device> {
        self.by_sha256.get(fp).map(|&i| &self.devices[i as usize])
    }

    /// The device with this certificate serial (normalised decimal).
    pub fn device_by_serial(&self, serial: &str) -> Option<&Device> {
        self.by_serial
            .get(serial)
            .map(|&i| &self.devices[i as usize])
    }

    /// The device with this hardware address.
    pub fn device_by_hwaddr(&self, hw: &HwAddr) -> Option<&Device> {
        self.by_hwaddr.get(hw).map(|&i| &self.devices[i as usize])
    }

    /// The device with this inventory id.
    pub fn device_by_id(&self, id: &str) -> Option<&Device> {
        self.by_id.get(id).map(|&i| &self.devices[i as usize])
    }

    /// A user by login name.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    /// All devices.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Number of users.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}

fn invalid(file: &str, line: u64, problem: String) -> RegistryError {
    RegistryError::Invalid {
        file: file.to_string(),
        line,
        problem,
    }
}

/// One row: column name to value, with its line (CSV) or entry number (JSON).
type Row = HashMap<String, String>;

fn read_rows(path: &Path) -> Result<Vec<(u64, Row)>, RegistryError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| RegistryError::Io {
        file: file.clone(),
        source,
    })?;
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        parse_json_rows(&bytes).map_err(|(line, problem)| invalid(&file, line, problem))
    } else {
        parse_csv_rows(&bytes).map_err(|(line, problem)| invalid(&file, line, problem))
    }
}

/// Parses CSV bytes into rows keyed by the header. Errors carry the line number.
pub fn parse_csv_rows(bytes: &[u8]) -> Result<Vec<(u64, Row)>, (u64, String)> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(bytes);
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| (1, format!("cannot read the header row: {e}")))?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_ascii_lowercase())
        .collect();
    if headers.iter().all(|h| h.is_empty()) {
        return Err((1, "the header row is missing".into()));
    }
    let mut rows = Vec::new();
    for rec in reader.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            (line, format!("malformed CSV: {e}"))
        })?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        if rec.iter().all(|f| f.is_empty()) {
            continue;
        }
        let row: Row = headers
            .iter()
            .cloned()
            .zip(rec.iter().map(str::to_string))
            .collect();
        rows.push((line, row));
    }
    Ok(rows)
}

/// Parses a JSON array of objects; arrays become `;`-joined values, numbers and booleans text.
pub fn parse_json_rows(bytes: &[u8]) -> Result<Vec<(u64, Row)>, (u64, String)> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| (e.line() as u64, format!("malformed JSON: {e}")))?;
    let serde_json::Value::Array(items) = value else {
        return Err((0, "expected a JSON array of objects".into()));
    };
    let mut rows = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let entry = i as u64 + 1;
        let serde_json::Value::Object(map) = item else {
            return Err((entry, format!("entry {entry} is not an object")));
        };
        let mut row = Row::new();
        for (k, v) in map {
            let text = json_text(&v).ok_or_else(|| {
                (
                    entry,
                    format!("entry {entry}: field `{k}` has an unsupported value"),
                )
            })?;
            row.insert(k.to_ascii_lowercase(), text);
        }
        rows.push((entry, row));
    }
    Ok(rows)
}

fn json_text(v: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    Some(match v {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let parts: Option<Vec<String>> = items
                .iter()
                .map(|i| match i {
                    Value::Array(_) | Value::Object(_) => None,
                    other => json_text(other),
                })
                .collect();
            parts?.join(";")
        }
        Value::Object(_) => return None,
    })
}

fn field<'a>(row: &'a Row, name: &str) -> Result<&'a str, String> {
    row.get(name)
        .map(|s| s.trim())
        .ok_or_else(|| format!("column `{name}` is missing"))
}

fn optional<'a>(row: &'a Row, name: &str) -> &'a str {
    row.get(name).map(|s| s.trim()).unwrap_or("")
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(';').map(str::trim).filter(|s| !s.is_empty())
}

/// Parses one device row.
pub fn parse_device(row: &Row, rules: &Rules) -> Result<Device, String> {
    let id = field(row, "device_id")?;
    if id.is_empty() || id.len() > 128 {
        return Err("device_id must be 1-128 characters".into());
    }
    let ownership = match field(row, "ownership")?.to_ascii_lowercase().as_str() {
        "service" => Ownership::Service,
        "private" => Ownership::Private,
        other => return Err(format!("ownership `{other}` is not service or private")),
    };
    let status_text = field(row, "status")?.to_ascii_lowercase();
    let status = Status::ALL
        .into_iter()
        .find(|s| s.as_str() == status_text)
        .ok_or_else(|| {
            format!("status `{status_text}` is not one of active, lost, stolen, retired, blocked")
        })?;
    let org_unit = field(row, "org_unit")?;
    if !rules.org_units.contains_key(org_unit) {
        return Err(format!(
            "org_unit `{org_unit}` is not configured in [[org_units]]"
        ));
    }
    let clearance_text = field(row, "clearance")?;
    let clearance: u8 = if clearance_text.is_empty() {
        0
    } else {
        clearance_text
            .parse()
            .map_err(|_| format!("clearance `{clearance_text}` is not a level number"))?
    };
    let disk_encrypted = match field(row, "disk_encrypted")?.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => true,
        "false" | "no" | "0" | "" => false,
        other => return Err(format!("disk_encrypted `{other}` is not true or false")),
    };
    let patched_text = field(row, "patched_on")?;
    let patched_on = if patched_text.is_empty() {
        None
    } else {
        Some(
            NaiveDate::parse_from_str(patched_text, "%Y-%m-%d")
                .map_err(|_| format!("patched_on `{patched_text}` is not a date YYYY-MM-DD"))?,
        )
    };
    let mut cert_sha256 = Vec::new();
    for fp in list(field(row, "cert_sha256")?) {
        cert_sha256.push(
            parse_sha256(fp)
                .ok_or_else(|| format!("cert_sha256 `{fp}` is not a SHA-256 fingerprint"))?,
        );
    }
    let mut cert_serial = Vec::new();
    for s in list(optional(row, "cert_serial")) {
        cert_serial
            .push(normalize_serial(s).ok_or_else(|| format!("cert_serial `{s}` is not a serial"))?);
    }
    if cert_sha256.is_empty() && cert_serial.is_empty() {
        return Err(format!(
            "device `{id}` has neither cert_sha256 nor cert_serial"
        ));
    }
    let mut hwaddr = Vec::new();
    for h in list(optional(row, "hwaddr")) {
        hwaddr.push(
            HwAddr::parse(h).ok_or_else(|| {
                format!("hwaddr `{h}` is not a hardware address aa:bb:cc:dd:ee:ff")
            })?,
        );
    }
    let users = list(optional(row, "users")).map(str::to_string).collect();
    Ok(Device {
        id: id.to_string(),
        ownership,
        status,
        org_unit: org_unit.to_string(),
        clearance,
        disk_encrypted,
        patched_on,
        cert_sha256,
        cert_serial,
        hwaddr,
        users,
    })
}

/// Parses one user row.
pub fn parse_user(row: &Row, rules: &Rules) -> Result<User, String> {
    let name = field(row, "username")?;
    if name.is_empty() || name.len() > 256 {
        return Err("username must be 1-256 characters".into());
    }
    let org_unit = field(row, "org_unit")?;
    if !rules.org_units.contains_key(org_unit) {
        return Err(format!(
            "org_unit `{org_unit}` is not configured in [[org_units]]"
        ));
    }
    let level_text = optional(row, "level");
    let level = if level_text.is_empty() {
        None
    } else {
        Some(
            level_text
                .parse()
                .map_err(|_| format!("level `{level_text}` is not a level number"))?,
        )
    };
    Ok(User {
        name: name.to_string(),
        org_unit: org_unit.to_string(),
        level,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_with_or_without_colons_any_case() {
        let plain = "AB".repeat(32);
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(parse_sha256(&plain), parse_sha256(&colons));
        assert!(parse_sha256(&plain).is_some());
        assert!(parse_sha256(&"ab".repeat(31)).is_none());
        assert!(parse_sha256(&"ab".repeat(33)).is_none());
        assert!(parse_sha256("zz").is_none());
        assert!(parse_sha256(&format!("{}a", "ab".repeat(32))).is_none());
    }

    #[test]
    fn serials_hex_and_decimal_agree() {
        assert_eq!(normalize_serial("0x1F").as_deref(), Some("31"));
        assert_eq!(normalize_serial("00:1f").as_deref(), Some("31"));
        assert_eq!(normalize_serial("0031").as_deref(), Some("31"));
        // 2^64 = 0x1_0000_0000_0000_0000
        assert_eq!(
            normalize_serial("01:00:00:00:00:00:00:00:00").as_deref(),
            Some("18446744073709551616")
        );
        assert!(normalize_serial("12a").is_none());
    }

    #[test]
    fn hwaddr_parse() {
        assert_eq!(
            HwAddr::parse("AA:bb:cc:dd:ee:0F").unwrap().to_string(),
            "aa:bb:cc:dd:ee:0f"
        );
        assert!(HwAddr::parse("aa:bb:cc:dd:ee").is_none());
        assert!(HwAddr::parse("aa:bb:cc:dd:ee:fg").is_none());
        assert!(HwAddr::parse("aabbccddeeff00000").is_none());
    }

    #[test]
    fn csv_errors_carry_line() {
        let csv = b"a,b\n1,2\n3\n";
        let e = parse_csv_rows(csv).unwrap_err();
        assert_eq!(e.0, 3, "{e:?}");
    }
}
