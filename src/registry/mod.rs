//! The registry: service and private devices, users. Loaded from CSV (or JSON) into hash
//! indexes and swapped in whole; a file with any bad row is refused whole, naming file and line.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::path::Path;
use std::sync::Arc;

use hashbrown::HashTable;

use chrono::NaiveDate;

use crate::config::Rules;

mod ids;
mod rows;

pub use ids::{HwAddr, Ownership, Status, normalize_name, normalize_serial, parse_sha256};
use rows::*;
pub use rows::{DEVICE_COLUMNS, parse_csv_rows, parse_device, parse_json_rows, parse_user};

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
    /// Stable ids a concentrator reports (Cisco ACIDex `device-uid`), lower case.
    pub device_uid: Box<[Box<str>]>,
    /// Host names (Palo Alto `PaloAlto-Client-Hostname`), lower case.
    pub hostname: Box<[Box<str>]>,
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
    by_uid: Index,
    by_hostname: Index,
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
        for u in d.device_uid.iter() {
            let h = self.hasher.hash_one(&**u);
            if !self
                .by_uid
                .claim(h, idx, &self.devices, |x| x.device_uid.contains(u))
            {
                return Err(format!(
                    "device `{}`: device_uid {u} is already registered to another device",
                    d.id
                ));
            }
        }
        for n in d.hostname.iter() {
            let h = self.hasher.hash_one(&**n);
            if !self
                .by_hostname
                .claim(h, idx, &self.devices, |x| x.hostname.contains(n))
            {
                return Err(format!(
                    "device `{}`: hostname {n} is already registered to another device",
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

    /// The device with this concentrator-reported id (any case).
    pub fn device_by_uid(&self, uid: &str) -> Option<&Device> {
        let uid = normalize_name(uid);
        let idx = self.by_uid.find(self.hash(uid.as_str()), |i| {
            self.devices
                .get(i as usize)
                .is_some_and(|x| x.device_uid.iter().any(|u| **u == *uid))
        });
        self.at(idx)
    }

    /// The device with this host name (any case).
    pub fn device_by_hostname(&self, name: &str) -> Option<&Device> {
        let name = normalize_name(name);
        let idx = self.by_hostname.find(self.hash(name.as_str()), |i| {
            self.devices
                .get(i as usize)
                .is_some_and(|x| x.hostname.iter().any(|u| **u == *name))
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

    #[test]
    fn device_uid_and_hostname_columns_are_optional_and_indexed() {
        use std::collections::{BTreeMap, HashMap};
        let rules = crate::config::Rules {
            policy: crate::config::PolicyConfig {
                require_disk_encryption: true,
                max_patch_age_days: 30,
                remote_max_level: 1,
                private_devices: crate::config::PrivateDevices::Refuse,
                mail_zone: "mail".into(),
                default_org_unit: None,
                require_hwaddr: true,
                match_serial: false,
                revoke_on_reload: crate::config::Revocation::AllChecks,
                revoke_patch_grace_days: 0,
                duplicate_device: crate::config::DuplicateDevice::Replace,
            },
            levels: BTreeMap::new(),
            capacity: crate::config::Capacity {
                max_sessions: 1,
                reserved_seats: 0,
                max_sessions_per_user: 1,
            },
            org_units: HashMap::from([(
                "it".to_string(),
                crate::config::OrgUnit {
                    name: "it".into(),
                    level: 1,
                    quota: 0,
                    priority: false,
                    remote_exception: false,
                },
            )]),
            zones: HashMap::new(),
        };
        let dir = tempfile::tempdir().unwrap();
        let head =
            "device_id,ownership,status,org_unit,clearance,disk_encrypted,patched_on,cert_sha256";
        let old = dir.path().join("old.csv");
        std::fs::write(
            &old,
            format!(
                "{head}\nd1,service,active,it,1,true,2026-11-01,{}\n",
                "ab".repeat(32)
            ),
        )
        .unwrap();
        let r = Registry::load(&old, None, &rules).unwrap();
        assert!(r.device_by_uid("x").is_none());
        let new = dir.path().join("new.csv");
        std::fs::write(
            &new,
            format!("{head},device_uid,hostname\nd1,service,active,it,1,true,2026-11-01,,UID-1;uid-2,NB-1\nd2,service,active,it,1,true,2026-11-01,{},,\n", "cd".repeat(32)),
        )
        .unwrap();
        let r = Registry::load(&new, None, &rules).unwrap();
        assert_eq!(&*r.device_by_uid("uid-1").unwrap().id, "d1");
        assert_eq!(&*r.device_by_uid("UID-2").unwrap().id, "d1");
        assert_eq!(&*r.device_by_hostname("nb-1").unwrap().id, "d1");
        assert!(r.device_by_hostname("nb-2").is_none());
        let json = dir.path().join("d.json");
        std::fs::write(&json, r#"[{"device_id":"j1","ownership":"service","status":"active","org_unit":"it","clearance":1,"disk_encrypted":true,"patched_on":"2026-11-01","cert_sha256":"","device_uid":"J-UID","hostname":["h1","h2"]}]"#).unwrap();
        let r = Registry::load(&json, None, &rules).unwrap();
        assert_eq!(&*r.device_by_hostname("H2").unwrap().id, "j1");
        let dup = dir.path().join("dup.csv");
        std::fs::write(&dup, format!("{head},device_uid\nd1,service,active,it,1,true,2026-11-01,,u\nd2,service,active,it,1,true,2026-11-01,,U\n")).unwrap();
        let e = Registry::load(&dup, None, &rules).unwrap_err().to_string();
        assert!(e.contains("device_uid"), "{e}");
        let none = dir.path().join("none.csv");
        std::fs::write(
            &none,
            format!("{head}\nd1,service,active,it,1,true,2026-11-01,\n"),
        )
        .unwrap();
        assert!(Registry::load(&none, None, &rules).is_err());
    }
}
