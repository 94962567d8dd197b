//! The registry: service and private devices, users. Loaded from CSV (or JSON) into hash
//! indexes and swapped in whole; a file with any bad row is refused whole, naming file and line.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::path::Path;
use std::sync::Arc;

use hashbrown::HashTable;

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

/// A device of the inventory. Compact (boxed slices, shared org-unit names), since a large
/// administration registers a million of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Inventory id.
    pub id: Box<str>,
    /// Service or private.
    pub ownership: Ownership,
    /// Inventory status.
    pub status: Status,
    /// Org unit it belongs to.
    pub org_unit: Arc<str>,
    /// Highest data-protection level it is cleared for.
    pub clearance: u8,
    /// Full-disk encryption recorded.
    pub disk_encrypted: bool,
    /// Day of the last patch.
    pub patched_on: Option<NaiveDate>,
    /// Certificate fingerprints.
    pub cert_sha256: Box<[[u8; 32]]>,
    /// Certificate serials, normalised decimal.
    pub cert_serial: Box<[Box<str>]>,
    /// Registered hardware addresses.
    pub hwaddr: Box<[HwAddr]>,
    /// Assigned users (empty: a pool device for its org unit).
    pub users: Box<[Box<str>]>,
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

/// A hash index over device positions: each entry is (hash, device index), and a lookup
/// confirms the key on the device itself, so the index holds no copies of keys (a million
/// devices cost about 18 MB per index, not the hundreds a map of owned keys would).
#[derive(Debug, Default)]
struct Index(HashTable<(u64, u32)>);

impl Index {
    fn find(&self, hash: u64, mut is_key_of: impl FnMut(u32) -> bool) -> Option<u32> {
        self.0
            .find(hash, |&(h, i)| h == hash && is_key_of(i))
            .map(|&(_, i)| i)
    }

    fn reserve(&mut self, n: usize) {
        self.0.reserve(n, |&(h, _)| h);
    }

    /// Enters device `idx` under `hash` unless another device already holds the key (`holds`
    /// says whether a device carries it); false then. Entries of `idx` itself (a key listed
    /// twice in one row) are no conflict: that device is not in `devices` yet, so positions are
    /// read with `get`, never indexed.
    fn claim(
        &mut self,
        hash: u64,
        idx: u32,
        devices: &[Device],
        holds: impl Fn(&Device) -> bool,
    ) -> bool {
        let entry = self.0.entry(
            hash,
            |&(h, i)| h == hash && devices.get(i as usize).is_some_and(&holds),
            |&(h, _)| h,
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(_) => false,
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert((hash, idx));
                true
            }
        }
    }
}

/// A certificate fingerprint is a SHA-256 output: its first bytes are already a uniform hash.
fn fp_hash(fp: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&fp[..8]);
    u64::from_le_bytes(b)
}

/// The loaded registry with its indexes. Immutable once built.
#[derive(Debug, Default)]
pub struct Registry {
    devices: Vec<Device>,
    hasher: hashbrown::DefaultHashBuilder,
    by_sha256: Index,
    by_serial: Index,
    by_hwaddr: Index,
    by_id: Index,
    users: HashMap<String, User>,
}

impl Registry {
    /// Loads devices and users, checking org units against the rules. CSV is read a record
    /// at a time, straight into devices.
    pub fn load(
        devices: &Path,
        users: Option<&Path>,
        rules: &Rules,
    ) -> Result<Registry, RegistryError> {
        Registry::load_paced(devices, users, rules, false)
    }

    /// As [`Registry::load`]; `paced` (for reloads while the daemon serves) rests after every
    /// few thousand rows as long as they took, so a reload of a million devices uses about
    /// half a core and leaves the rest to the decisions in flight.
    pub fn load_paced(
        devices: &Path,
        users: Option<&Path>,
        rules: &Rules,
        paced: bool,
    ) -> Result<Registry, RegistryError> {
        let mut reg = Registry::default();
        let mut chunk_started = std::time::Instant::now();
        let mut rows = 0usize;
        let file = devices.display().to_string();
        let interner = OrgUnits::new(rules);
        let is_json = devices
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if is_json {
            for (line, fields) in read_rows(devices)? {
                let get = |name: &str| fields.get(name).map(|s| s.trim());
                let device = parse_device_with(&get, rules, &interner)
                    .map_err(|problem| invalid(&file, line, problem))?;
                reg.insert_device(device)
                    .map_err(|problem| invalid(&file, line, problem))?;
            }
        } else {
            let f = std::fs::File::open(devices).map_err(|source| RegistryError::Io {
                file: file.clone(),
                source,
            })?;
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            // About 120 bytes a row: reserve once instead of growing a million-entry table.
            let expected = usize::try_from(size / 120).unwrap_or(0).min(20_000_000);
            reg.reserve(expected);
            let mut reader = csv_reader(std::io::BufReader::with_capacity(1 << 20, f));
            let columns = DeviceColumns::new(
                &header_columns(&mut reader).map_err(|(l, p)| invalid(&file, l, p))?,
            );
            let mut rec = csv::StringRecord::new();
            loop {
                match reader.read_record(&mut rec) {
                    Ok(false) => break,
                    Ok(true) => {}
                    Err(e) => {
                        let line = e.position().map(|p| p.line()).unwrap_or(0);
                        return Err(invalid(&file, line, format!("malformed CSV: {e}")));
                    }
                }
                let line = rec.position().map(|p| p.line()).unwrap_or(0);
                if rec.iter().all(str::is_empty) {
                    continue;
                }
                rows += 1;
                if paced && rows.is_multiple_of(4096) {
                    std::thread::sleep(chunk_started.elapsed());
                    chunk_started = std::time::Instant::now();
                }
                let get = |name: &str| columns.position(name).and_then(|i| rec.get(i));
                let device = parse_device_with(&get, rules, &interner)
                    .map_err(|problem| invalid(&file, line, problem))?;
                reg.insert_device(device)
                    .map_err(|problem| invalid(&file, line, problem))?;
            }
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

    fn reserve(&mut self, n: usize) {
        self.devices.reserve(n);
        self.by_sha256.reserve(n);
        self.by_id.reserve(n);
    }

    fn hash<T: Hash + ?Sized>(&self, key: &T) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Adds a device, refusing ambiguous fingerprints, serials and ids. On an error the
    /// registry is half-built and must be dropped (a load refuses the whole file).
    pub fn insert_device(&mut self, d: Device) -> Result<(), String> {
        let idx = u32::try_from(self.devices.len()).map_err(|_| "too many devices".to_string())?;
        let h = self.hasher.hash_one(&*d.id);
        if !self.by_id.claim(h, idx, &self.devices, |x| x.id == d.id) {
            return Err(format!("device id `{}` is listed twice", d.id));
        }
        for fp in d.cert_sha256.iter() {
            if !self.by_sha256.claim(fp_hash(fp), idx, &self.devices, |x| {
                x.cert_sha256.contains(fp)
            }) {
                return Err(format!(
                    "device `{}`: certificate fingerprint is already registered to another device",
                    d.id
                ));
            }
        }
        for s in d.cert_serial.iter() {
            let h = self.hasher.hash_one(&**s);
            if !self
                .by_serial
                .claim(h, idx, &self.devices, |x| x.cert_serial.contains(s))
            {
                return Err(format!(
                    "device `{}`: certificate serial {s} is already registered to another device",
                    d.id
                ));
            }
        }
        for hw in d.hwaddr.iter() {
            // A shared address (docking stations) is not an error; the first device keeps it.
            let h = self.hasher.hash_one(hw);
            self.by_hwaddr
                .claim(h, idx, &self.devices, |x| x.hwaddr.contains(hw));
        }
        self.devices.push(d);
        Ok(())
    }

    /// Adds a user.
    pub fn insert_user(&mut self, u: User) {
        self.users.insert(u.name.clone(), u);
    }

    fn at(&self, idx: Option<u32>) -> Option<&Device> {
        idx.and_then(|i| self.devices.get(i as usize))
    }

    /// The device with this certificate fingerprint.
    pub fn device_by_sha256(&self, fp: &[u8; 32]) -> Option<&Device> {
        let idx = self.by_sha256.find(fp_hash(fp), |i| {
            self.devices
                .get(i as usize)
                .is_some_and(|x| x.cert_sha256.contains(fp))
        });
        self.at(idx)
    }

    /// The device with this certificate serial (normalised decimal).
    pub fn device_by_serial(&self, serial: &str) -> Option<&Device> {
        let idx = self.by_serial.find(self.hash(serial), |i| {
            self.devices
                .get(i as usize)
                .is_some_and(|x| x.cert_serial.iter().any(|s| &**s == serial))
        });
        self.at(idx)
    }

    /// The device with this hardware address.
    pub fn device_by_hwaddr(&self, hw: &HwAddr) -> Option<&Device> {
        let idx = self.by_hwaddr.find(self.hash(hw), |i| {
            self.devices
                .get(i as usize)
                .is_some_and(|x| x.hwaddr.contains(hw))
        });
        self.at(idx)
    }

    /// The device with this inventory id.
    pub fn device_by_id(&self, id: &str) -> Option<&Device> {
        let idx = self.by_id.find(self.hash(id), |i| {
            self.devices.get(i as usize).is_some_and(|x| &*x.id == id)
        });
        self.at(idx)
    }

    /// A user by login name.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    /// All devices.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Devices by (ownership, status) label pair, every pair listed (zero where none).
    pub fn device_counts(&self) -> Vec<((&'static str, &'static str), i64)> {
        let mut counts = std::collections::HashMap::new();
        for d in self.devices() {
            *counts.entry((d.ownership, d.status)).or_insert(0i64) += 1;
        }
        let mut all = Vec::new();
        for o in [Ownership::Service, Ownership::Private] {
            for s in Status::ALL {
                let n = counts.get(&(o, s)).copied().unwrap_or(0);
                all.push(((o.as_str(), s.as_str()), n));
            }
        }
        all
    }

    /// Number of users.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}

/// Org-unit names shared by every device of a load (one allocation per org unit).
struct OrgUnits(HashMap<String, Arc<str>>);

impl OrgUnits {
    fn new(rules: &Rules) -> OrgUnits {
        OrgUnits(
            rules
                .org_units
                .keys()
                .map(|k| (k.clone(), Arc::from(k.as_str())))
                .collect(),
        )
    }
}

fn csv_reader<R: std::io::Read>(r: R) -> csv::Reader<R> {
    csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(r)
}

/// Column name (lower case) to position, from the header row.
fn header_columns<R: std::io::Read>(
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

/// `YYYY-MM-DD`, exactly (faster than a format-string parser, which matters for a million rows).
fn parse_date(s: &str) -> Option<NaiveDate> {
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
pub const DEVICE_COLUMNS: [&str; 11] = [
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

/// Positions of the device columns in a CSV header, found once per file.
struct DeviceColumns([Option<usize>; 11]);

impl DeviceColumns {
    fn new(columns: &HashMap<String, usize>) -> DeviceColumns {
        DeviceColumns(DEVICE_COLUMNS.map(|name| columns.get(name).copied()))
    }

    fn position(&self, name: &str) -> Option<usize> {
        let k = DEVICE_COLUMNS.iter().position(|c| *c == name)?;
        self.0[k]
    }
}

/// Parses one device row.
pub fn parse_device(row: &Row, rules: &Rules) -> Result<Device, String> {
    let get = |name: &str| row.get(name).map(|s| s.trim());
    parse_device_with(&get, rules, &OrgUnits::new(rules))
}

fn parse_device_with<'a>(
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
    if cert_sha256.is_empty() && cert_serial.is_empty() {
        return Err(format!(
            "device `{id}` has neither cert_sha256 nor cert_serial"
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
