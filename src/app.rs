//! The daemon's operations, shared by the HTTP API and the VPN integrations: connect,
//! disconnect, kill, reload. Each records metrics and the audit log.

use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;

mod status;

pub use status::{Count, Management, OrgUnitCount, RegistryStatus, Seats, Status};

use crate::audit::{Audit, AuditRecord};
use crate::metrics::Metrics;
use crate::policy;
use crate::session::{Selector, Session};
use crate::sessions::{Sessions, Unpersisted};
use crate::state::{LoadError, State, unix_now};
use crate::wire::{
    ConnectRequest, ConnectResponse, Decision, Denial, DisconnectRequest, Ifconfig, Malformed,
    Push, Reason,
};

/// Seconds a new session is left alone by reconciliation: its VPN server may not list it yet.
pub const REAP_GRACE_S: i64 = 10;

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// Devices now registered.
    pub devices: usize,
    /// Users now listed.
    pub users: usize,
    /// Live sessions ended because they would now be refused.
    pub revoked: usize,
}

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

impl PendingCommit {
    /// The session admitted and not yet committed.
    pub fn session(&self) -> &Session {
        &self.admitted.session
    }
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
                let displaced = a.admitted.displaced.clone();
                let org_unit = a.admitted.session.org_unit.clone();
                let why = DISPLACED_WHY;
                let (response, session) = match self.sessions.persist(a.admitted, why).await {
                    Ok(session) => {
                        self.record_displaced(&a.req, &displaced, why);
                        (a.response, Some(session))
                    }
                    Err(d) => {
                        self.count_capacity_refusal(&org_unit, &d);
                        (ConnectResponse::deny(&d), None)
                    }
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
        let displaced = admitted.displaced.clone();
        let org_unit = admitted.session.org_unit.clone();
        let why = DISPLACED_WHY;
        match self.sessions.persist(admitted, why).await {
            Ok(_) => {
                self.record_displaced(&req, &displaced, why);
                true
            }
            Err(d) => {
                self.count_capacity_refusal(&org_unit, &d);
                self.record_decision(&req, &ConnectResponse::deny(&d), None);
                false
            }
        }
    }

    /// Counts a refusal by the cluster's limits (a shared store decides capacity at the
    /// commit).
    fn count_capacity_refusal(&self, org_unit: &str, d: &Denial) {
        if matches!(
            d.reason,
            Reason::CapacityFull | Reason::OrgUnitQuota | Reason::UserSessionLimit
        ) {
            self.metrics
                .capacity_refusals
                .with_label_values(&[org_unit, d.reason.as_str()])
                .inc();
        }
    }

    /// Audits and counts the sessions a connect of the same device from another address
    /// replaced (they are already ended and asked of the VPN server to drop).
    fn record_displaced(&self, req: &ConnectRequest, displaced: &[Session], why: &str) {
        for s in displaced {
            if let Some(audit) = &self.audit {
                audit.record(&AuditRecord::duplicate(req, s, "replaced"), &self.metrics);
                audit.record(&AuditRecord::end(s, why), &self.metrics);
            }
            self.metrics
                .duplicate_devices
                .with_label_values(&["replaced"])
                .inc();
            tracing::warn!(session = %s.id, why, "session replaced by a connect of the same device from another address");
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
                .admit_unpersisted(
                    &adm,
                    &req,
                    &snap.rules.capacity,
                    snap.rules.policy.duplicate_device,
                    unix_now(),
                    |s| self.audit_line(&AuditRecord::allow(&req, s)),
                )
                .map(|admitted| (adm.clone(), admitted))
                .inspect_err(|d| {
                    if d.reason == Reason::DuplicateDevice {
                        self.metrics
                            .duplicate_devices
                            .with_label_values(&["refused"])
                            .inc();
                        if let Some(audit) = &self.audit {
                            for live in self.sessions.of_device(&adm.device_id) {
                                audit.record(
                                    &AuditRecord::duplicate(&req, &live, "refused"),
                                    &self.metrics,
                                );
                            }
                        }
                    }
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
                        ifconfig: ifconfig(session, adm.network.or(adm.pool)),
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
            // A refusal names the device where the request identifies one, so that the help
            // desk finds it by asset tag (`pforte decisions --device`).
            let snap = self.state.current();
            let mut rec = AuditRecord::decision(req, resp, session);
            if rec.device_id.is_empty()
                && let Some(d) = policy::find_device(req, &snap.rules, &snap.registry)
            {
                rec.device_id = &d.id;
            }
            audit.record(&rec, &self.metrics);
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

    /// Reconciliation: ends the sessions of one VPN instance that its server no longer lists
    /// (`live`: the session keys it has now), except those younger than [`REAP_GRACE_S`]
    /// (their server may not list them yet). Counted by instance; returns the keys ended.
    pub async fn reap_missing(
        &self,
        vpn: &str,
        instance: &str,
        live: &std::collections::HashSet<String>,
        why: &str,
    ) -> Vec<String> {
        let now = unix_now();
        let gone: Vec<String> = self
            .sessions
            .list()
            .into_iter()
            .filter(|s| s.vpn == vpn && s.instance == instance)
            .filter(|s| !live.contains(&s.session_key) && now - s.started_at > REAP_GRACE_S)
            .map(|s| s.session_key)
            .collect();
        let mut ended = Vec::new();
        for key in gone {
            let sel = Selector::Key {
                vpn: vpn.to_string(),
                instance: instance.to_string(),
                session_key: key.clone(),
            };
            if self.reap(&sel, why).await {
                self.metrics
                    .sessions_reaped
                    .with_label_values(&[instance])
                    .inc();
                ended.push(key);
            }
        }
        ended
    }

    /// Reloads config and registry; on success re-decides the live sessions and ends those now
    /// refused ([`App::revoke_sessions`]). On failure (an invalid file, or without `force` a
    /// registry that drops too many devices) the old state stays and the failure is counted.
    pub async fn reload(
        self: &Arc<Self>,
        trigger: &str,
        force: bool,
    ) -> Result<Reloaded, LoadError> {
        let _guard = self.reload_lock.lock().await;
        let state = self.state.clone();
        let result = tokio::task::spawn_blocking(move || state.reload(force))
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
                    snap.rules.zones.values().filter_map(|z| {
                        z.pool.map(|p| (z.name.clone(), p, z.network.unwrap_or(p)))
                    }),
                );
                let devices = snap.registry.devices().len();
                let users = snap.registry.user_count();
                tracing::info!(trigger, devices, users, force, "registry reloaded");
                let revoked = self.revoke_sessions().await;
                Ok(Reloaded {
                    devices,
                    users,
                    revoked,
                })
            }
            Err(e) => {
                self.state.mark_seen();
                self.metrics.registry_reload_failures.inc();
                if matches!(e, LoadError::MassRemoval { .. }) {
                    self.metrics.registry_mass_removals.inc();
                }
                tracing::error!(trigger, error = %e, "reload failed; the previous registry stays in force");
                Err(e)
            }
        }
    }

    /// Re-decides every live session against the registry and rules now in force (device and
    /// person checks, not capacity: [`policy::recheck`]) and ends, through the VPN server, each
    /// that would now be refused, with its reason in the audit log and the
    /// `pforte_sessions_revoked_total` metric. Returns how many it ended.
    async fn revoke_sessions(&self) -> usize {
        let snap = self.state.current();
        let today = chrono::Utc::now().date_naive();
        let revoked: Vec<(Session, Denial)> = self
            .sessions
            .list()
            .into_iter()
            // A session without a device (device checks skipped by configuration) is
            // re-decided on the person alone (`policy::recheck`).
            .filter_map(|s| {
                let live = policy::Live {
                    device_id: &s.device_id,
                    username: &s.username,
                    zone: &s.zone,
                };
                let denial = policy::recheck(live, &snap.rules, &snap.registry, today).err()?;
                Some((s, denial))
            })
            .collect();
        let mut ended = 0;
        for (s, d) in revoked {
            let why = format!("revoked on reload: {}: {}", d.reason, d.message);
            if self.kill(&Selector::Id(s.id.clone()), &why).await.is_some() {
                self.metrics
                    .sessions_revoked
                    .with_label_values(&[d.reason.as_str()])
                    .inc();
                ended += 1;
            }
        }
        ended
    }
}

/// Why a session is ended for a connect of its device from another address. The addresses go
/// to the audit log's `duplicate_device` record (pseudonymised where configured), not here.
const DISPLACED_WHY: &str =
    "replaced: the same device connected from another address (policy.duplicate_device = replace)";

/// The address pushed to a client: from the zone's pool, with the netmask of the tunnel
/// network the pool lies in (so that the server's address, the clients' gateway, is on the
/// client's link).
fn ifconfig(session: &Session, network: Option<IpNet>) -> Option<Ifconfig> {
    let network = network?;
    let ip = session.tunnel_ip.filter(|_| session.pool_ip)?;
    Some(Ifconfig {
        ip,
        netmask: network.netmask().to_string(),
        prefix_len: network.prefix_len(),
    })
}
