//! Reading the registry files: CSV or JSON rows into devices and users, every problem named
//! with its line (or JSON entry).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use chrono::NaiveDate;

use crate::config::Rules;

use super::*;

/// Org-unit names shared by every device of a load (one allocation per org unit).
pub(super) struct OrgUnits(HashMap<String, Arc<str>>);

impl OrgUnits {
    pub(super) fn new(rules: &Rules) -> OrgUnits {
        OrgUnits(
            rules
                .org_units
                .keys()
                .map(|k| (k.clone(), Arc::from(k.as_str())))
                .collect(),
        )
    }
}

pub(super) fn csv_reader<R: std::io::Read>(r: R) -> csv::Reader<R> {
    csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(r)
}

/// Column name (lower case) to position, from the header row.
pub(super) fn header_columns<R: std::io::Read>(
    reader: &mut csv::Reader<R>,
) -> Result<HashMap<String, usize>, (u64, String)> {
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| (1, format!("cannot read the header row: {e}")))?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_ascii_lowercase())
        .collect();
    if headers.iter().all(|h| h.is_empty()) {
        return Err((1, "the header row is missing".into()));
    }
    Ok(headers
        .into_iter()
        .enumerate()
        .map(|(i, h)| (h, i))
        .collect())
}

pub(super) fn invalid(file: &str, line: u64, problem: String) -> RegistryError {
    RegistryError::Invalid {
        file: file.to_string(),
        line,
        problem,
    }
}

/// One row: column name to value, with its line (CSV) or entry number (JSON).
pub(super) type Row = HashMap<String, String>;

pub(super) fn read_rows(path: &Path) -> Result<Vec<(u64, Row)>, RegistryError> {
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
    let mut reader = csv_reader(bytes);
    let columns = header_columns(&mut reader)?;
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
        let row: Row = columns
            .iter()
            .filter_map(|(name, &i)| rec.get(i).map(|v| (name.clone(), v.to_string())))
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

pub(super) fn json_text(v: &serde_json::Value) -> Option<String> {
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

pub(super) fn field<'a>(row: &'a Row, name: &str) -> Result<&'a str, String> {
    row.get(name)
        .map(|s| s.trim())
        .ok_or_else(|| format!("column `{name}` is missing"))
}

pub(super) fn optional<'a>(row: &'a Row, name: &str) -> &'a str {
    row.get(name).map(|s| s.trim()).unwrap_or("")
}

pub(super) fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(';').map(str::trim).filter(|s| !s.is_empty())
}

/// `YYYY-MM-DD`, exactly (faster than a format-string parser, which matters for a million rows).
pub(super) fn parse_date(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let mut n = 0u32;
        for &c in &b[r] {
            if !c.is_ascii_digit() {
                return None;
            }
            n = n * 10 + u32::from(c - b'0');
        }
        Some(n)
    };
    NaiveDate::from_ymd_opt(i32::try_from(num(0..4)?).ok()?, num(5..7)?, num(8..10)?)
}

/// The device registry's columns (the file's contract).
pub const DEVICE_COLUMNS: [&str; 13] = [
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
    "device_uid",
    "hostname",
];

/// Positions of the device columns in a CSV header, found once per file.
pub(super) struct DeviceColumns([Option<usize>; 13]);

impl DeviceColumns {
    pub(super) fn new(columns: &HashMap<String, usize>) -> DeviceColumns {
        DeviceColumns(DEVICE_COLUMNS.map(|name| columns.get(name).copied()))
    }

    pub(super) fn position(&self, name: &str) -> Option<usize> {
        let k = DEVICE_COLUMNS.iter().position(|c| *c == name)?;
        self.0[k]
    }
}

/// Parses one device row.
pub fn parse_device(row: &Row, rules: &Rules) -> Result<Device, String> {
    let get = |name: &str| row.get(name).map(|s| s.trim());
    parse_device_with(&get, rules, &OrgUnits::new(rules))
}

pub(super) fn parse_device_with<'a>(
    get: &dyn Fn(&str) -> Option<&'a str>,
    rules: &Rules,
    org_units: &OrgUnits,
) -> Result<Device, String> {
    let field = |name: &str| -> Result<&'a str, String> {
        get(name)
            .map(str::trim)
            .ok_or_else(|| format!("column `{name}` is missing"))
    };
    let optional = |name: &str| -> &'a str { get(name).map(str::trim).unwrap_or("") };
    let id = field("device_id")?;
    if id.is_empty() || id.len() > 128 {
        return Err("device_id must be 1-128 characters".into());
    }
    let ownership = match field("ownership")? {
        o if o.eq_ignore_ascii_case("service") => Ownership::Service,
        o if o.eq_ignore_ascii_case("private") => Ownership::Private,
        other => return Err(format!("ownership `{other}` is not service or private")),
    };
    let status_text = field("status")?;
    let status = Status::ALL
        .into_iter()
        .find(|s| s.as_str().eq_ignore_ascii_case(status_text))
        .ok_or_else(|| {
            format!("status `{status_text}` is not one of active, lost, stolen, retired, blocked")
        })?;
    let org_unit_text = field("org_unit")?;
    let org_unit =
        org_units.0.get(org_unit_text).cloned().ok_or_else(|| {
            format!("org_unit `{org_unit_text}` is not configured in [[org_units]]")
        })?;
    let _ = rules;
    let clearance_text = field("clearance")?;
    let clearance: u8 = if clearance_text.is_empty() {
        0
    } else {
        clearance_text
            .parse()
            .map_err(|_| format!("clearance `{clearance_text}` is not a level number"))?
    };
    let disk_encrypted = match field("disk_encrypted")? {
        t if t.eq_ignore_ascii_case("true") || t.eq_ignore_ascii_case("yes") || t == "1" => true,
        f if f.eq_ignore_ascii_case("false")
            || f.eq_ignore_ascii_case("no")
            || f == "0"
            || f.is_empty() =>
        {
            false
        }
        other => return Err(format!("disk_encrypted `{other}` is not true or false")),
    };
    let patched_text = field("patched_on")?;
    let patched_on = if patched_text.is_empty() {
        None
    } else {
        Some(
            parse_date(patched_text)
                .ok_or_else(|| format!("patched_on `{patched_text}` is not a date YYYY-MM-DD"))?,
        )
    };
    let mut cert_sha256 = Vec::with_capacity(1);
    for fp in list(field("cert_sha256")?) {
        cert_sha256.push(
            parse_sha256(fp)
                .ok_or_else(|| format!("cert_sha256 `{fp}` is not a SHA-256 fingerprint"))?,
        );
    }
    let mut cert_serial = Vec::new();
    for s in list(optional("cert_serial")) {
        cert_serial.push(
            normalize_serial(s)
                .ok_or_else(|| format!("cert_serial `{s}` is not a serial"))?
                .into_boxed_str(),
        );
    }
    let device_uid: Box<[Box<str>]> = list(optional("device_uid"))
        .map(|u| normalize_name(u).into_boxed_str())
        .collect();
    let hostname: Box<[Box<str>]> = list(optional("hostname"))
        .map(|h| normalize_name(h).into_boxed_str())
        .collect();
    if let Some(long) = device_uid
        .iter()
        .chain(hostname.iter())
        .find(|v| v.len() > 253)
    {
        return Err(format!(
            "device `{id}`: `{long}` is longer than 253 characters"
        ));
    }
    if cert_sha256.is_empty()
        && cert_serial.is_empty()
        && device_uid.is_empty()
        && hostname.is_empty()
    {
        return Err(format!(
            "device `{id}` has neither cert_sha256, cert_serial, device_uid nor hostname"
        ));
    }
    let mut hwaddr = Vec::new();
    for h in list(optional("hwaddr")) {
        hwaddr.push(
            HwAddr::parse(h).ok_or_else(|| {
                format!("hwaddr `{h}` is not a hardware address aa:bb:cc:dd:ee:ff")
            })?,
        );
    }
    let users = list(optional("users")).map(Box::from).collect();
    Ok(Device {
        id: id.into(),
        ownership,
        status,
        org_unit,
        clearance,
        disk_encrypted,
        patched_on,
        cert_sha256: cert_sha256.into_boxed_slice(),
        cert_serial: cert_serial.into_boxed_slice(),
        hwaddr: hwaddr.into_boxed_slice(),
        users,
        device_uid,
        hostname,
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
