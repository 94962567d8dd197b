//! How devices are named and marked: ownership, status, hardware addresses, certificate
//! fingerprints and serials, each parsed from what inventories and VPN servers write.

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

/// A device uid or host name as the registry keeps it: trimmed, lower case.
pub fn normalize_name(s: &str) -> String {
    s.trim().to_lowercase()
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
