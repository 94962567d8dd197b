//! The `occtl` watcher, one per `[[ocserv]]` entry: every `status_interval` it reads
//! `occtl --json show users`, records each session's live bytes, reaps sessions ocserv no
//! longer has and decides clients ocserv has and pforte does not (refused ones are
//! disconnected); it ends killed and revoked sessions with `occtl disconnect id N`.
//!
//! occtl is a short command per question, not a connection: an ocserv that is down is simply
//! asked again at the next tick, and `pforte_vpn_control_connected{vpn="ocserv"}` is 0 until it
//! answers.

use std::collections::HashSet;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::{broadcast, watch};

use crate::app::App;
use crate::config::OcservInstance;
use crate::session::{KillRequest, Selector};
use crate::vpn::ocserv::{DeviceField, OcservSettings, UserRow, parse_users, worker_id};

/// The longest an `occtl` call may take.
const OCCTL_TIMEOUT: Duration = Duration::from_secs(5);
/// The most output read from one `occtl` call.
const MAX_OUTPUT: usize = 16 * 1024 * 1024;

/// How to run occtl: the program and the arguments before the command.
#[derive(Debug, Clone)]
struct Occtl {
    program: PathBuf,
    socket: Option<PathBuf>,
}

impl Occtl {
    /// `occtl` names a socket (it is one, or it is a path that does not exist yet and is not a
    /// bare program name): `occtl -s SOCKET`; otherwise it is the program.
    fn new(configured: &Path) -> Occtl {
        let meta = std::fs::metadata(configured);
        let is_socket = match &meta {
            Ok(m) => m.file_type().is_socket(),
            Err(_) => configured.components().count() > 1,
        };
        if is_socket {
            Occtl {
                program: PathBuf::from(crate::config::DEFAULT_OCCTL),
                socket: Some(configured.to_path_buf()),
            }
        } else {
            Occtl {
                program: configured.to_path_buf(),
                socket: None,
            }
        }
    }

    async fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.program);
        if let Some(s) = &self.socket {
            cmd.arg("-s").arg(s);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.program.display()))?;
        let out = tokio::time::timeout(OCCTL_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| {
                format!(
                    "occtl {} took longer than {OCCTL_TIMEOUT:?}",
                    args.join(" ")
                )
            })?
            .map_err(|e| format!("occtl {}: {e}", args.join(" ")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr[..out.stderr.len().min(300)]);
            let text = String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(300)]);
            return Err(format!(
                "occtl {} failed ({}): {} {}",
                args.join(" "),
                out.status,
                err.trim(),
                text.trim()
            ));
        }
        let n = out.stdout.len().min(MAX_OUTPUT);
        Ok(String::from_utf8_lossy(&out.stdout[..n]).into_owned())
    }
}

/// Runs the watcher for one instance until shutdown.
pub async fn run(inst: OcservInstance, app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let occtl = Occtl::new(&inst.occtl);
    let settings = OcservSettings {
        instance: inst.instance.clone(),
        zone: inst.zone.clone(),
        device_from: DeviceField::parse(&inst.device_from).unwrap_or_default(),
    };
    let mut kills = app.sessions.subscribe_kills();
    let gauge = app
        .metrics
        .vpn_control_connected
        .with_label_values(&["ocserv", &inst.instance]);
    gauge.set(0);
    app.metrics
        .sessions_reaped
        .with_label_values(&[&inst.instance]);
    let mut watcher = Watcher {
        inst: &inst,
        app: &app,
        occtl,
        settings,
        unknown: HashSet::new(),
        failures: 0,
    };
    let mut tick = tokio::time::interval(inst.status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let ok = watcher.reconcile().await;
                gauge.set(i64::from(ok));
            }
            k = kills.recv() => match k {
                Ok(k) => watcher.on_kill(&k).await,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "kill requests missed; reconciling");
                    gauge.set(i64::from(watcher.reconcile().await));
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = shutdown.changed() => return,
        }
    }
}

struct Watcher<'a> {
    inst: &'a OcservInstance,
    app: &'a Arc<App>,
    occtl: Occtl,
    settings: OcservSettings,
    /// Keys of connected clients without a session seen at the last reconciliation: decided
    /// when seen a second time, so a connect-script still on its way is not decided twice.
    unknown: HashSet<String>,
    failures: u32,
}

impl Watcher<'_> {
    fn selector(&self, key: &str) -> Selector {
        Selector::Key {
            vpn: "ocserv".into(),
            instance: self.inst.instance.clone(),
            session_key: key.to_string(),
        }
    }

    /// One pass: bytes, reaping, unknown clients. `false` if occtl did not answer.
    async fn reconcile(&mut self) -> bool {
        let rows = match self.occtl.run(&["--json", "show", "users"]).await {
            Ok(text) => match parse_users(&text) {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(instance = %self.inst.instance, error = %e, "occtl show users: unreadable answer");
                    return false;
                }
            },
            Err(e) => {
                self.failures += 1;
                if self.failures == 1 || self.failures.is_multiple_of(10) {
                    tracing::warn!(instance = %self.inst.instance, error = %e, attempts = self.failures, "cannot ask ocserv through occtl");
                }
                return false;
            }
        };
        if self.failures > 0 {
            tracing::info!(instance = %self.inst.instance, "occtl answers again");
            self.failures = 0;
        }
        self.apply(&rows).await;
        true
    }

    async fn apply(&mut self, rows: &[UserRow]) {
        let live: HashSet<String> = rows.iter().map(UserRow::key).collect();
        let mut unknown = HashSet::new();
        for row in rows {
            let key = row.key();
            let sel = self.selector(&key);
            if self.app.sessions.get(&sel).is_some() {
                if let Some((rx, tx)) = row.bytes() {
                    self.app.sessions.update_bytes(&sel, rx, tx);
                }
            } else if row.state == "connected" {
                if self.unknown.contains(&key) {
                    self.adopt(row).await;
                } else {
                    unknown.insert(key);
                }
            }
        }
        self.unknown = unknown;
        self.app
            .reap_missing(
                "ocserv",
                &self.inst.instance,
                &live,
                "gone from ocserv's user list",
            )
            .await;
    }

    /// A client ocserv has and pforte does not (pforte's state was lost, or it came in while
    /// the hook was misconfigured to admit): decided now; refused ones are disconnected.
    async fn adopt(&mut self, row: &UserRow) {
        let req = row.connect_request(&self.settings);
        let resp = self.app.connect(req).await;
        if resp.allowed() {
            tracing::info!(instance = %self.inst.instance, id = row.id, "ocserv client without a session admitted by reconciliation");
        } else {
            let reason = resp.reason.map(|r| r.as_str()).unwrap_or("refused");
            tracing::warn!(instance = %self.inst.instance, id = row.id, reason, "ocserv client without a session refused; disconnecting it");
            self.disconnect(row.id).await;
        }
    }

    async fn on_kill(&mut self, k: &KillRequest) {
        let s = &k.session;
        if s.vpn != "ocserv" || s.instance != self.inst.instance {
            return;
        }
        match worker_id(&s.session_key) {
            Some(id) => {
                tracing::info!(instance = %self.inst.instance, id, why = %k.why, "occtl disconnect");
                self.disconnect(id).await;
            }
            None => {
                tracing::warn!(instance = %self.inst.instance, key = %s.session_key, "killed session has no ocserv id")
            }
        }
    }

    async fn disconnect(&self, id: u64) {
        let id = id.to_string();
        if let Err(e) = self.occtl.run(&["disconnect", "id", &id]).await {
            tracing::warn!(instance = %self.inst.instance, error = %e, "occtl disconnect failed");
        }
    }
}
