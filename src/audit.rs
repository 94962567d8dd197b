//! The audit log: every decision and every session end as one JSON line, written before the
//! answer goes out (one `write` per line, so a crash of pforte loses nothing acknowledged),
//! rotated by size with a retention count.
//!
//! This is where usernames, device ids and addresses go: never into metrics.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::app::ConnectResponse;
use crate::metrics::Metrics;
use crate::policy::ConnectRequest;
use crate::sessions::Session;

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
    pub username: &'a str,
    /// Real remote address.
    pub remote_addr: &'a str,
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
            username: req.identity(),
            remote_addr: &req.remote_addr,
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
            username: req.identity(),
            remote_addr: &req.remote_addr,
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
            username: &s.username,
            remote_addr: &s.remote_addr,
            session_id: Some(&s.id),
            bytes_received: Some(s.bytes_received),
            bytes_sent: Some(s.bytes_sent),
        }
    }
}

struct Writer {
    file: File,
    size: u64,
}

/// The audit log file.
pub struct Audit {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    // std Mutex: held for one write syscall, never across an await.
    writer: Mutex<Writer>,
}

impl Audit {
    /// Opens (appending) the log, creating its folder.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<Audit> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(Audit {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(4096),
            keep,
            writer: Mutex::new(Writer { file, size }),
        })
    }

    /// One record as a JSON line.
    pub fn encode(rec: &AuditRecord<'_>) -> Vec<u8> {
        let mut line = serde_json::to_vec(rec).unwrap_or_else(|e| {
            format!("{{\"event\":\"unencodable\",\"error\":\"{e}\"}}").into_bytes()
        });
        line.push(b'\n');
        line
    }

    /// Appends one record. A failure is logged and counted; it does not change the decision.
    pub fn record(&self, rec: &AuditRecord<'_>, metrics: &Metrics) {
        self.write(&Audit::encode(rec), metrics);
    }

    /// Appends whole lines with one write (the store's writer hands over a batch at a time).
    pub fn write(&self, lines: &[u8], metrics: &Metrics) {
        if lines.is_empty() {
            return;
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
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
