//! The daemon's operations, shared by the HTTP API and the VPN integrations: connect,
//! disconnect, kill, reload. Each records metrics and the audit log.

use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;

use crate::audit::{Audit, AuditRecord};
use crate::metrics::Metrics;
use crate::policy;
use crate::registry::Status;
use crate::session::{Selector, Session};
use crate::sessions::{Sessions, Unpersisted};
use crate::state::{LoadError, State, unix_now};
use crate::wire::{
    ConnectRequest, ConnectResponse, Decision, DisconnectRequest, Ifconfig, Malformed, Push, Reason,
};

/// A connect decided up to its commit.
enum Decided {
    /// Refused (and recorded).
    Done(ConnectResponse),
    /// Allowed and holding its seat; the commit and the record are the caller's.
    Admitted(Box<Admitted>),
}

struct Admitted {
    response: ConnectResponse,
    admitted: Unpersisted,
    req: ConnectRequest,
    started: Instant,
}

/// An allow answered before its commit (see [`App::connect_answer_first`]).
#[derive(Debug)]
pub struct PendingCommit {
    admitted: Unpersisted,
    req: ConnectRequest,
}

/// The daemon's shared parts.
pub struct App {
    /// Rules and registry.
    pub state: Arc<State>,
    /// Live sessions.
    pub sessions: Arc<Sessions>,
    /// Metrics.
    pub metrics: Metrics,
    /// Audit log.
    pub audit: Option<Arc<Audit>>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl App {
    /// Assembles the parts.
    pub fn new(
        state: Arc<State>,
        sessions: Arc<Sessions>,
        metrics: Metrics,
        audit: Option<Arc<Audit>>,
    ) -> Arc<App> {
        Arc::new(App {
            state,
            sessions,
            metrics,
            audit,
            reload_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Decides a connect, registers and commits the session on allow, records metrics and
    /// audit. Answered only after the commit: a crash loses nothing acknowledged.
    pub async fn connect(&self, req: ConnectRequest) -> ConnectResponse {
        match self.decide_connect(req) {
            Decided::Done(resp) => resp,
            Decided::Admitted(a) => {
                let (response, session) = match self.sessions.persist(a.admitted).await {
                    Ok(session) => (a.response, Some(session)),
                    Err(d) => (ConnectResponse::deny(&d), None),
                };
                self.record_timed(&a.req, &response, session.as_ref(), a.started);
                response
            }
        }
    }

    /// As [`App::connect`], but an allow is answered before its commit, which the caller
    /// then awaits with [`App::persist`]. For the management interface only: a session lost
    /// in a crash between answer and commit is one OpenVPN has and pforte does not, which
    /// reconciliation adopts (or ends) at the next start. If the commit fails with fail mode
    /// closed, the caller must end the client it admitted.
    pub fn connect_answer_first(
        &self,
        req: ConnectRequest,
    ) -> (ConnectResponse, Option<PendingCommit>) {
        match self.decide_connect(req) {
            Decided::Done(resp) => (resp, None),
            Decided::Admitted(a) => {
                self.record_timed(&a.req, &a.response, Some(&a.admitted.session), a.started);
                let pending = PendingCommit {
                    admitted: a.admitted,
                    req: a.req,
                };
                (a.response, Some(pending))
            }
        }
    }

    /// Commits a session admitted by [`App::connect_answer_first`]; `false` if the store
    /// refused it (fail mode closed): it is out of the table again, and counted and audited
    /// as a refusal (`store_unavailable`) after its allow.
    pub async fn persist(&self, pending: PendingCommit) -> bool {
        let PendingCommit { admitted, req } = pending;
        match self.sessions.persist(admitted).await {
            Ok(_) => true,
            Err(d) => {
                self.record_decision(&req, &ConnectResponse::deny(&d), None);
                false
            }
        }
    }

    /// Records a decision and the time it took since `started`.
    fn record_timed(
        &self,
        req: &ConnectRequest,
        resp: &ConnectResponse,
        session: Option<&Session>,
        started: Instant,
    ) {
        self.record_decision(req, resp, session);
        self.metrics
            .decision_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// The decision up to the commit. A refusal is recorded here; an allow is left to the
    /// caller, who records it around the commit.
    fn decide_connect(&self, mut req: ConnectRequest) -> Decided {
        let started = Instant::now();
        let snap = self.state.current();
        if req.zone.is_empty()
            && let Some(zone) = snap.instance_zones.get(&req.instance)
        {
            req.zone = zone.clone();
        }
        let today = chrono::Utc::now().date_naive();
        let outcome = policy::evaluate(&req, &snap.rules, &snap.registry, today).and_then(|adm| {
            self.sessions
                .admit_unpersisted(&adm, &req, &snap.rules.capacity, unix_now(), |s| {
                    self.audit_line(&AuditRecord::allow(&req, s))
                })
                .map(|admitted| (adm.clone(), admitted))
                .inspect_err(|d| {
                    if matches!(
                        d.reason,
                        Reason::CapacityFull | Reason::OrgUnitQuota | Reason::UserSessionLimit
                    ) {
                        self.metrics
                            .capacity_refusals
                            .with_label_values(&[&adm.org_unit, d.reason.as_str()])
                            .inc();
                    }
                })
        });
        match outcome {
            Ok((adm, admitted)) => {
                let session = &admitted.session;
                let response = ConnectResponse {
                    decision: Decision::Allow,
                    reason: None,
                    message: format!(
                        "Device {} admitted to zone {} for user {}.",
                        adm.device_id, adm.zone, adm.username
                    ),
                    session_id: Some(session.id.clone()),
                    push: Some(Push {
                        ifconfig: ifconfig(session, adm.pool),
                        routes: adm.routes.clone(),
                    }),
                };
                Decided::Admitted(Box::new(Admitted {
                    response,
                    admitted,
                    req,
                    started,
                }))
            }
            Err(d) => {
                let response = ConnectResponse::deny(&d);
                self.record_timed(&req, &response, None, started);
                Decided::Done(response)
            }
        }
    }

    /// The device checks alone, for OpenVPN's tls-verify phase (no hardware address yet, no
    /// session). Refusals are counted and audited as decisions; a pass is not (the
    /// client-connect that follows decides).
    pub fn verify(&self, mut req: ConnectRequest) -> ConnectResponse {
        let snap = self.state.current();
        if req.zone.is_empty()
            && let Some(zone) = snap.instance_zones.get(&req.instance)
        {
            req.zone = zone.clone();
        }
        let today = chrono::Utc::now().date_naive();
        let outcome = policy::validate_request(&req).and_then(|()| {
            policy::check_device(&req, &snap.rules, &snap.registry, today, false).map(|_| ())
        });
        match outcome {
            Ok(()) => ConnectResponse {
                decision: Decision::Allow,
                reason: None,
                message: "Device checks passed.".into(),
                session_id: None,
                push: None,
            },
            Err(d) => {
                let resp = ConnectResponse::deny(&d);
                self.record_decision(&req, &resp, None);
                resp
            }
        }
    }

    /// An audit line, if there is an audit log.
    fn audit_line(&self, rec: &AuditRecord<'_>) -> Option<Vec<u8>> {
        self.audit.as_ref().map(|a| a.encode(rec))
    }

    /// Counts a decision and audits a refusal (also for requests that never reached the
    /// policy). Allows are audited with their session's commit.
    pub fn record_decision(
        &self,
        req: &ConnectRequest,
        resp: &ConnectResponse,
        session: Option<&Session>,
    ) {
        let reason = resp.reason.map(Reason::as_str).unwrap_or("allowed");
        self.metrics
            .decisions
            .with_label_values(&[resp.decision.as_str(), reason])
            .inc();
        if !resp.allowed()
            && let Some(audit) = &self.audit
        {
            audit.record(&AuditRecord::decision(req, resp, session), &self.metrics);
        }
    }

    /// Ends a session reported gone by the VPN server. `None`: unknown (answered, not an
    /// error: OpenVPN also runs client-disconnect after a refused client-connect).
    pub async fn disconnect(&self, req: &DisconnectRequest) -> Result<Option<Session>, Malformed> {
        let sel = req.selector()?;
        let bytes = match (req.bytes_received, req.bytes_sent) {
            (Some(rx), Some(tx)) => Some((rx, tx)),
            (Some(rx), None) => Some((rx, 0)),
            (None, Some(tx)) => Some((0, tx)),
            (None, None) => None,
        };
        let ended = self
            .sessions
            .end(&sel, bytes, unix_now(), |s| {
                self.audit_line(&AuditRecord::end(s, "disconnect"))
            })
            .await;
        match &ended {
            Some(s) => tracing::debug!(session = %s.id, "session ended"),
            None => {
                tracing::info!(selector = ?sel, "disconnect for an unknown session (refused connect or repeat)")
            }
        }
        Ok(ended)
    }

    /// Ends a session and asks its VPN server to drop the client.
    pub async fn kill(&self, sel: &Selector, why: &str) -> Option<Session> {
        let s = self
            .sessions
            .kill(sel, why, unix_now(), |s| {
                self.audit_line(&AuditRecord::end(s, why))
            })
            .await?;
        tracing::info!(session = %s.id, why, "session killed");
        Some(s)
    }

    /// Ends a session the VPN server no longer has (reconciliation); true if it was live.
    pub async fn reap(&self, sel: &Selector, why: &str) -> bool {
        let Some(s) = self
            .sessions
            .end(sel, None, unix_now(), |s| {
                self.audit_line(&AuditRecord::end(s, why))
            })
            .await
        else {
            return false;
        };
        tracing::info!(session = %s.id, why, "session reaped");
        true
    }

    /// Reloads config and registry; on success ends sessions whose device is no longer
    /// registered and active. On failure the old state stays and the failure is counted.
    pub async fn reload(self: &Arc<Self>, trigger: &str) -> Result<(usize, usize), LoadError> {
        let _guard = self.reload_lock.lock().await;
        let state = self.state.clone();
        let result = tokio::task::spawn_blocking(move || state.reload())
            .await
            .unwrap_or_else(|e| Err(LoadError::Interrupted(e.to_string())));
        match result {
            Ok(snap) => {
                self.metrics.apply_rules(&snap.rules);
                self.metrics.apply_registry(
                    snap.registry.device_counts(),
                    snap.registry.user_count(),
                    snap.loaded_at,
                );
                self.sessions.set_pools(
                    snap.rules
                        .zones
                        .values()
                        .filter_map(|z| z.pool.map(|p| (z.name.clone(), p))),
                );
                let devices = snap.registry.devices().len();
                let users = snap.registry.user_count();
                tracing::info!(trigger, devices, users, "registry reloaded");
                self.revoke_sessions().await;
                Ok((devices, users))
            }
            Err(e) => {
                self.state.mark_seen();
                self.metrics.registry_reload_failures.inc();
                tracing::error!(trigger, error = %e, "reload failed; the previous registry stays in force");
                Err(e)
            }
        }
    }

    /// Ends live sessions whose device is gone from the registry or no longer active.
    async fn revoke_sessions(&self) {
        let snap = self.state.current();
        let revoked: Vec<(Session, String)> = self
            .sessions
            .list()
            .into_iter()
            // A session without a device (device checks skipped by configuration) has none
            // to revoke.
            .filter(|s| !s.device_id.is_empty())
            .filter_map(|s| {
                let why = match snap.registry.device_by_id(&s.device_id) {
                    None => "device removed from the registry".to_string(),
                    Some(d) if d.status != Status::Active => {
                        format!("device marked {}", d.status.as_str())
                    }
                    Some(_) => return None,
                };
                Some((s, why))
            })
            .collect();
        for (s, why) in revoked {
            self.kill(&Selector::Id(s.id.clone()), &why).await;
        }
    }
}

fn ifconfig(session: &Session, pool: Option<IpNet>) -> Option<Ifconfig> {
    let pool = pool?;
    let ip = session.tunnel_ip.filter(|_| session.pool_ip)?;
    Some(Ifconfig {
        ip,
        netmask: pool.netmask().to_string(),
        prefix_len: pool.prefix_len(),
    })
}
