//! The operator's commands, over the daemon's Unix socket: `pforte sessions`, `pforte kill`,
//! `pforte reload`, `pforte status`; and `pforte decisions`, which reads the audit log for the
//! help desk ("why was I refused five minutes ago?").
//!
//! Exit codes: 0 done; 1 nothing matched (no session to list or kill, no decision found) or the
//! daemon refused (a reload kept the old registry); 2 the command could not run (daemon not
//! reachable, bad arguments, unreadable audit log).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::app::Status;
use crate::audit::PseudonymKey;
use crate::client::request_once;
use crate::config;
use crate::session::Session;

/// Exit code: done.
pub const OK: u8 = 0;
/// Exit code: nothing matched, or the daemon refused.
pub const NONE: u8 = 1;
/// Exit code: the command could not run.
pub const ERROR: u8 = 2;

/// How long the daemon has to answer one request.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a command could not run: one line for stderr.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CtlError(String);

fn fail(msg: impl Into<String>) -> CtlError {
    CtlError(msg.into())
}

/// Which sessions a command means; every filter given must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// pforte's session id.
    pub id: Option<String>,
    /// Zone.
    pub zone: Option<String>,
    /// Org unit.
    pub org_unit: Option<String>,
    /// User.
    pub user: Option<String>,
    /// Device inventory id.
    pub device: Option<String>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.id.is_none()
            && self.zone.is_none()
            && self.org_unit.is_none()
            && self.user.is_none()
            && self.device.is_none()
    }

    fn matches(&self, s: &Session) -> bool {
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        is(&self.id, &s.id)
            && is(&self.zone, &s.zone)
            && is(&self.org_unit, &s.org_unit)
            && is(&self.user, &s.username)
            && is(&self.device, &s.device_id)
    }
}

/// The daemon's socket: `--socket` (or `PFORTE_SOCKET`), else the config's `server.socket`,
/// else the packaged default.
pub fn socket_path(socket: Option<PathBuf>, config: Option<&Path>) -> Result<PathBuf, CtlError> {
    if let Some(s) = socket {
        return Ok(s);
    }
    if let Some(c) = config {
        let cfg = config::load(c).map_err(|e| fail(e.to_string()))?;
        return cfg.server.socket.ok_or_else(|| {
            fail(format!(
                "{}: server.socket is not set; give --socket",
                c.display()
            ))
        });
    }
    Ok(PathBuf::from(crate::hook::DEFAULT_SOCKET))
}

fn call(socket: &Path, method: &str, uri: &str) -> Result<(u16, Value), CtlError> {
    let (status, body) = request_once(socket, method, uri, b"", TIMEOUT).map_err(|e| {
        fail(format!(
            "cannot ask the daemon at {}: {e} (is `pforte serve` running? --socket or --config name its socket)",
            socket.display()
        ))
    })?;
    let v = serde_json::from_slice(&body).map_err(|_| {
        fail(format!(
            "unexpected answer from the daemon (status {status}): {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    })?;
    Ok((status, v))
}

fn error_of(v: &Value) -> String {
    v["error"]
        .as_str()
        .unwrap_or("(no reason given)")
        .to_string()
}

/// The live sessions that match.
fn sessions_matching(socket: &Path, filter: &Filter) -> Result<Vec<Session>, CtlError> {
    let (status, v) = call(socket, "GET", "/v1/sessions")?;
    if status != 200 {
        return Err(fail(format!("the daemon refused: {}", error_of(&v))));
    }
    let all: Vec<Session> = serde_json::from_value(v["sessions"].clone())
        .map_err(|e| fail(format!("unexpected session list from the daemon: {e}")))?;
    Ok(all.into_iter().filter(|s| filter.matches(s)).collect())
}

fn since(started_at: i64) -> String {
    chrono::DateTime::from_timestamp(started_at, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Rows as an aligned text table under a header.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

/// `pforte sessions`: the live sessions that match, as a table or JSON.
pub fn sessions(socket: &Path, filter: &Filter, json: bool) -> Result<u8, CtlError> {
    let list = sessions_matching(socket, filter)?;
    if json {
        let text = serde_json::to_string_pretty(&list).map_err(|e| fail(e.to_string()))?;
        println!("{text}");
    } else if list.is_empty() {
        println!(
            "no live sessions{}",
            if filter.is_empty() { "" } else { " match" }
        );
    } else {
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|s| {
                vec![
                    s.id.clone(),
                    s.username.clone(),
                    s.device_id.clone(),
                    s.zone.clone(),
                    s.org_unit.clone(),
                    format!("{}/{}", s.vpn, s.instance),
                    s.remote_addr.clone(),
                    s.tunnel_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                    since(s.started_at),
                    bytes(s.bytes_received),
                    bytes(s.bytes_sent),
                ]
            })
            .collect();
        let header = [
            "ID",
            "USER",
            "DEVICE",
            "ZONE",
            "ORG UNIT",
            "VPN",
            "REMOTE",
            "TUNNEL",
            "SINCE (UTC)",
            "RX",
            "TX",
        ];
        println!("{}", table(&header, &rows));
    }
    Ok(if list.is_empty() { NONE } else { OK })
}

/// `pforte kill`: ends every live session that matches (at least one filter is required),
/// through the VPN server where pforte has a management connection to it.
pub fn kill(socket: &Path, filter: &Filter) -> Result<u8, CtlError> {
    if filter.is_empty() {
        return Err(fail(
            "name what to end: --id, --user, --device (and optionally --zone, --org-unit)",
        ));
    }
    let list = sessions_matching(socket, filter)?;
    if list.is_empty() {
        eprintln!("pforte kill: no live session matches");
        return Ok(NONE);
    }
    let mut ended = 0;
    for s in &list {
        let (status, v) = call(socket, "DELETE", &format!("/v1/sessions/{}", s.id))?;
        match status {
            200 => {
                ended += 1;
                println!(
                    "ended {} (user {}, device {}, zone {})",
                    s.id, s.username, s.device_id, s.zone
                );
            }
            404 => println!("{} had already ended", s.id),
            _ => return Err(fail(format!("ending {}: {}", s.id, error_of(&v)))),
        }
    }
    Ok(if ended > 0 { OK } else { NONE })
}

/// `pforte reload`: reloads config and registry; `force` accepts a registry that drops more
/// devices than `registry.max_removed_percent`.
pub fn reload(socket: &Path, force: bool) -> Result<u8, CtlError> {
    let uri = if force {
        "/v1/registry/reload?force=true"
    } else {
        "/v1/registry/reload"
    };
    let (status, v) = call(socket, "POST", uri)?;
    if status == 200 {
        println!(
            "reloaded: {} devices, {} users; {} live sessions ended because they would now be refused",
            v["devices"], v["users"], v["revoked"]
        );
        Ok(OK)
    } else {
        eprintln!("pforte reload: {}", error_of(&v));
        Ok(NONE)
    }
}

/// `pforte status`: seats, sessions per zone and org unit, quotas, management connections,
/// the registry's age.
pub fn status(socket: &Path, json: bool) -> Result<u8, CtlError> {
    let (code, v) = call(socket, "GET", "/v1/status")?;
    if code != 200 {
        return Err(fail(format!("the daemon refused: {}", error_of(&v))));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(OK);
    }
    let s: Status = serde_json::from_value(v)
        .map_err(|e| fail(format!("unexpected status from the daemon: {e}")))?;
    println!(
        "seats: {} used of {} ({} free; {} reserved for priority org units); at most {} per user",
        s.seats.used, s.seats.capacity, s.seats.free, s.seats.reserved, s.max_sessions_per_user
    );
    let zones: Vec<Vec<String>> = s
        .zones
        .iter()
        .map(|z| vec![z.name.clone(), z.sessions.to_string()])
        .collect();
    println!("\n{}", table(&["ZONE", "SESSIONS"], &zones));
    let units: Vec<Vec<String>> = s
        .org_units
        .iter()
        .map(|o| {
            let (quota, free) = if o.quota == 0 {
                ("-".to_string(), "-".to_string())
            } else {
                (
                    o.quota.to_string(),
                    o.quota.saturating_sub(o.sessions).to_string(),
                )
            };
            vec![o.name.clone(), o.sessions.to_string(), quota, free]
        })
        .collect();
    println!(
        "\n{}",
        table(&["ORG UNIT", "SESSIONS", "QUOTA", "FREE"], &units)
    );
    if !s.management.is_empty() {
        let rows: Vec<Vec<String>> = s
            .management
            .iter()
            .map(|m| {
                let state = if m.connected {
                    "connected"
                } else {
                    "DISCONNECTED"
                };
                let channel = match m.vpn.as_str() {
                    "strongswan" => "VICI",
                    "ocserv" => "occtl",
                    _ => "management",
                };
                vec![
                    m.instance.clone(),
                    m.vpn.clone(),
                    channel.to_string(),
                    state.to_string(),
                ]
            })
            .collect();
        println!(
            "\n{}",
            table(&["VPN INSTANCE", "VPN", "CONTROL", "STATE"], &rows)
        );
    }
    println!(
        "\nregistry: {} devices, {} users, loaded {} ({} s ago); session store {}",
        s.registry.devices,
        s.registry.users,
        since(s.registry.loaded_at),
        s.registry.age_s,
        if s.store_healthy {
            "healthy"
        } else {
            "FAILING"
        }
    );
    Ok(OK)
}

/// Whose decisions `pforte decisions` shows.
#[derive(Debug, Clone, Default)]
pub struct DecisionQuery {
    /// User (pseudonymised with the audit log's key where it has one).
    pub user: Option<String>,
    /// Device inventory id.
    pub device: Option<String>,
    /// How many of the newest to show.
    pub last: usize,
}

/// `pforte decisions`: the newest decisions (and session ends) for a person or a device from
/// the audit log named in the config, with their times and reasons. Works on a pseudonymised
/// log too: the user name is pseudonymised with the same key before it is looked up.
pub fn decisions(config_path: &Path, q: &DecisionQuery) -> Result<u8, CtlError> {
    if q.user.is_none() && q.device.is_none() {
        return Err(fail("name whose decisions to show: --user or --device"));
    }
    let cfg = config::load(config_path).map_err(|e| fail(e.to_string()))?;
    let Some(path) = cfg.audit.path.clone() else {
        return Err(fail(format!(
            "{}: [audit] path is not set: pforte keeps no audit log to look in",
            config_path.display()
        )));
    };
    let user = match (&q.user, &cfg.audit.pseudonymise_key_file) {
        (Some(u), Some(key)) => Some(PseudonymKey::read(key).map_err(fail)?.pseudonym(u)),
        (u, _) => u.clone(),
    };
    // The current file and the rotated ones (path.1, path.2, …), oldest first.
    let mut files: Vec<PathBuf> = (1..=cfg.audit.keep)
        .rev()
        .map(|i| PathBuf::from(format!("{}.{i}", path.display())))
        .filter(|p| p.exists())
        .collect();
    files.push(path.clone());
    let mut hits: Vec<Value> = Vec::new();
    for f in &files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(fail(format!("{}: {e}", f.display()))),
        };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let user_ok = user.as_deref().is_none_or(|u| v["username"] == u);
            let device_ok = q.device.as_deref().is_none_or(|d| v["device_id"] == d);
            if user_ok && device_ok {
                hits.push(v);
            }
        }
    }
    if hits.is_empty() {
        println!(
            "no decisions recorded for this {}",
            if q.user.is_some() { "user" } else { "device" }
        );
        return Ok(NONE);
    }
    let start = hits.len().saturating_sub(q.last.max(1));
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    let rows: Vec<Vec<String>> = hits[start..]
        .iter()
        .map(|v| {
            let what = match v["event"].as_str() {
                Some("decision") => text(&v["decision"]),
                Some(other) => other.to_string(),
                None => "?".into(),
            };
            vec![
                text(&v["time"]),
                what,
                text(&v["reason"]),
                text(&v["device_id"]),
                text(&v["username"]),
                text(&v["zone"]),
                format!("{}/{}", text(&v["vpn"]), text(&v["instance"])),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "TIME (UTC)",
                "EVENT",
                "REASON",
                "DEVICE",
                "USER",
                "ZONE",
                "VPN"
            ],
            &rows
        )
    );
    Ok(OK)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_table_aligns_its_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22");
    }

    #[test]
    fn byte_counts_read_as_people_write_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
