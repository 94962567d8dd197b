//! The audit log: every decision and every session end as one JSON line, written before the
//! answer goes out (one `write` per line, so a crash of pforte loses nothing acknowledged),
//! rotated by size with a retention count.
//!
//! This is where usernames, device ids and addresses go: never into metrics.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::metrics::Metrics;
use crate::session::Session;
use crate::wire::ConnectRequest;
use crate::wire::ConnectResponse;

/// One line of the audit log.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// RFC 3339 UTC time.
    pub time: String,
    /// `decision` or `end`.
    pub event: &'static str,
    /// allow | deny (decisions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<&'a str>,
    /// Reason code (denials) or why a session ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// VPN kind.
    pub vpn: &'a str,
    /// Instance.
    pub instance: &'a str,
    /// Zone.
    pub zone: &'a str,
    /// Org unit (when known).
    pub org_unit: &'a str,
    /// Device id (when known).
    pub device_id: &'a str,
    /// User.
    pub username: Cow<'a, str>,
    /// Real remote address.
    pub remote_addr: Cow<'a, str>,
    /// The other real address of a device seen twice (`duplicate_device` events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_remote_addr: Option<Cow<'a, str>>,
    /// Session id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<&'a str>,
    /// Bytes received from the client (ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    /// Bytes sent to the client (ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl<'a> AuditRecord<'a> {
    /// A decision.
    pub fn decision(
        req: &'a ConnectRequest,
        resp: &'a ConnectResponse,
        session: Option<&'a Session>,
    ) -> AuditRecord<'a> {
        AuditRecord {
            time: now(),
            event: "decision",
            decision: Some(resp.decision.as_str()),
            reason: resp.reason.map(|r| r.as_str().to_string()),
            vpn: &req.vpn,
            instance: &req.instance,
            zone: &req.zone,
            org_unit: session.map(|s| s.org_unit.as_str()).unwrap_or(""),
            device_id: session.map(|s| s.device_id.as_str()).unwrap_or(""),
            username: Cow::Borrowed(req.identity()),
            remote_addr: Cow::Borrowed(&req.remote_addr),
            other_remote_addr: None,
            session_id: session.map(|s| s.id.as_str()),
            bytes_received: None,
            bytes_sent: None,
        }
    }

    /// An allow, with the session it opened.
    pub fn allow(req: &'a ConnectRequest, session: &'a Session) -> AuditRecord<'a> {
        AuditRecord {
            time: now(),
            event: "decision",
            decision: Some("allow"),
            reason: None,
            vpn: &req.vpn,
            instance: &req.instance,
            zone: &session.zone,
            org_unit: &session.org_unit,
            device_id: &session.device_id,
            username: Cow::Borrowed(req.identity()),
            remote_addr: Cow::Borrowed(&req.remote_addr),
            other_remote_addr: None,
            session_id: Some(&session.id),
            bytes_received: None,
            bytes_sent: None,
        }
    }

    /// A session end.
    pub fn end(s: &'a Session, why: &str) -> AuditRecord<'a> {
        AuditRecord {
            time: now(),
            event: "end",
            decision: None,
            reason: Some(why.to_string()),
            vpn: &s.vpn,
            instance: &s.instance,
            zone: &s.zone,
            org_unit: &s.org_unit,
            device_id: &s.device_id,
            username: Cow::Borrowed(&s.username),
            remote_addr: Cow::Borrowed(&s.remote_addr),
            other_remote_addr: None,
            session_id: Some(&s.id),
            bytes_received: Some(s.bytes_received),
            bytes_sent: Some(s.bytes_sent),
        }
    }

    /// A device connecting while it holds a live session from another address: the connect's
    /// address and the live session's, and what was done (`replaced` or `refused`).
    pub fn duplicate(
        req: &'a ConnectRequest,
        live: &'a Session,
        action: &'static str,
    ) -> AuditRecord<'a> {
        AuditRecord {
            time: now(),
            event: "duplicate_device",
            decision: None,
            reason: Some(action.to_string()),
            vpn: &req.vpn,
            instance: &req.instance,
            zone: &live.zone,
            org_unit: &live.org_unit,
            device_id: &live.device_id,
            username: Cow::Borrowed(req.identity()),
            remote_addr: Cow::Borrowed(&req.remote_addr),
            other_remote_addr: Some(Cow::Borrowed(&live.remote_addr)),
            session_id: Some(&live.id),
            bytes_received: None,
            bytes_sent: None,
        }
    }
}

struct Writer {
    file: File,
    size: u64,
}

/// A key for pseudonymising usernames and addresses; Debug never shows it.
pub struct PseudonymKey(Vec<u8>);

impl std::fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PseudonymKey(****)")
    }
}

impl PseudonymKey {
    /// Reads a key file (at least 16 bytes; not writable by everyone).
    pub fn read(path: &Path) -> Result<PseudonymKey, String> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("{}: cannot read pseudonymisation key: {e}", path.display()))?;
        if meta.permissions().mode() & 0o002 != 0 {
            return Err(format!(
                "{}: pseudonymisation key is writable by every user; refusing it (chmod o-w)",
                path.display()
            ));
        }
        let key = std::fs::read(path)
            .map_err(|e| format!("{}: cannot read pseudonymisation key: {e}", path.display()))?;
        let trimmed = key.trim_ascii();
        if trimmed.len() < 16 {
            return Err(format!(
                "{}: pseudonymisation key must be at least 16 bytes",
                path.display()
            ));
        }
        Ok(PseudonymKey(trimmed.to_vec()))
    }

    /// A keyed hash (HMAC-SHA256, first 16 bytes, hex): the same input gives the same
    /// pseudonym under one key, and without the key it cannot be reversed or recomputed.
    pub fn pseudonym(&self, value: &str) -> String {
        use hmac::{KeyInit, Mac};
        let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0) else {
            return "p:invalid-key".into();
        };
        mac.update(value.as_bytes());
        let out = mac.finalize().into_bytes();
        let mut hex = String::with_capacity(34);
        hex.push_str("p:");
        for b in &out[..16] {
            hex.push_str(&format!("{b:02x}"));
        }
        hex
    }
}

/// The address part of `ip:port` or `[v6]:port` (the port says nothing about a person).
fn address_only(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((ip, port)) if !ip.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => ip,
        _ => addr,
    }
}

/// The audit log file.
pub struct Audit {
    key: Option<PseudonymKey>,
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    // std Mutex: held for one write syscall, never across an await.
    writer: Mutex<Writer>,
}

impl Audit {
    /// Opens (appending) the log, creating its folder. With a key, usernames and addresses
    /// are written as keyed pseudonyms.
    pub fn open(
        path: &Path,
        max_bytes: u64,
        keep: u32,
        key: Option<PseudonymKey>,
    ) -> std::io::Result<Audit> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(Audit {
            key,
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(4096),
            keep,
            writer: Mutex::new(Writer { file, size }),
        })
    }

    /// One record as a JSON line (pseudonymised where a key is configured).
    pub fn encode(&self, rec: &AuditRecord<'_>) -> Vec<u8> {
        let pseudonymised;
        let rec = match &self.key {
            Some(key) => {
                pseudonymised = AuditRecord {
                    username: Cow::Owned(key.pseudonym(&rec.username)),
                    remote_addr: if rec.remote_addr.is_empty() {
                        Cow::Borrowed("")
                    } else {
                        Cow::Owned(key.pseudonym(address_only(&rec.remote_addr)))
                    },
                    other_remote_addr: rec
                        .other_remote_addr
                        .as_ref()
                        .map(|a| Cow::Owned(key.pseudonym(address_only(a)))),
                    time: rec.time.clone(),
                    reason: rec.reason.clone(),
                    ..*rec
                };
                &pseudonymised
            }
            None => rec,
        };
        let mut line = serde_json::to_vec(rec).unwrap_or_else(|e| {
            format!("{{\"event\":\"unencodable\",\"error\":\"{e}\"}}").into_bytes()
        });
        line.push(b'\n');
        line
    }

    /// Appends one record. A failure is logged and counted; it does not change the decision.
    pub fn record(&self, rec: &AuditRecord<'_>, metrics: &Metrics) {
        self.write(&self.encode(rec), metrics);
    }

    /// Appends whole lines with one write (the store's writer hands over a batch at a time).
    pub fn write(&self, lines: &[u8], metrics: &Metrics) {
        if lines.is_empty() {
            return;
        }
        let mut w = crate::sync::lock(&self.writer);
        if w.size + lines.len() as u64 > self.max_bytes
            && let Err(e) = self.rotate(&mut w)
        {
            metrics.audit_errors.inc();
            tracing::error!(%e, path = %self.path.display(), "audit log rotation failed");
        }
        match w.file.write_all(lines) {
            Ok(()) => w.size += lines.len() as u64,
            Err(e) => {
                metrics.audit_errors.inc();
                tracing::error!(%e, path = %self.path.display(), "audit log write failed");
            }
        }
    }

    fn rotate(&self, w: &mut Writer) -> std::io::Result<()> {
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                let from = numbered(n);
                if from.exists() {
                    std::fs::rename(&from, numbered(n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        w.file = open_append(&self.path)?;
        w.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_keyed_and_stable() {
        let a = PseudonymKey(b"0123456789abcdef".to_vec());
        let b = PseudonymKey(b"fedcba9876543210".to_vec());
        assert_eq!(a.pseudonym("alice"), a.pseudonym("alice"));
        assert_ne!(a.pseudonym("alice"), a.pseudonym("bob"));
        assert_ne!(a.pseudonym("alice"), b.pseudonym("alice"));
        assert!(!a.pseudonym("alice").contains("alice"));
        assert_eq!(format!("{a:?}"), "PseudonymKey(****)");
        assert_eq!(address_only("198.51.100.7:5000"), "198.51.100.7");
        assert_eq!(address_only("[2001:db8::1]:5000"), "2001:db8::1");
        assert_eq!(address_only("2001:db8::1"), "2001:db8::1");
    }

    #[test]
    fn rotation_keeps_the_retention_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let m = Metrics::new().unwrap();
        let audit = Audit::open(&path, 4096, 2, None).unwrap();
        let line = vec![b'x'; 1000];
        for _ in 0..20 {
            audit.write(&[&line[..], b"\n"].concat(), &m);
        }
        assert!(path.exists());
        assert!(dir.path().join("audit.log.1").exists());
        assert!(dir.path().join("audit.log.2").exists());
        assert!(!dir.path().join("audit.log.3").exists());
        for p in ["audit.log", "audit.log.1", "audit.log.2"] {
            let n = std::fs::metadata(dir.path().join(p)).unwrap().len();
            assert!(n <= 4096, "{p}: {n} bytes");
        }
    }
}
