//! The live session table: admission (capacity check plus registration, atomic under one lock),
//! ends, byte counters, address pools; every change persisted through the store before it is
//! acknowledged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;
use tokio::sync::broadcast;

mod pool;

use crate::config::{Capacity, DuplicateDevice, FailMode};
use crate::metrics::Metrics;
use crate::policy::{Admission, Occupancy, check_capacity};
use crate::session::{KillRequest, Selector, Session};
use crate::store::{StoreHandle, StoreOp};
use crate::wire::{ConnectRequest, Denial, Reason};
use pool::Pool;

type Key = (String, String, String);

#[derive(Default)]
struct Table {
    by_id: HashMap<String, Session>,
    by_key: HashMap<Key, String>,
    /// Live sessions of each device: id and the address it came from, so the duplicate check
    /// compares addresses without looking each session up.
    by_device: HashMap<String, Vec<(String, Option<IpAddr>)>>,
    per_user: HashMap<String, u32>,
    per_org_unit: HashMap<String, u32>,
    pools: HashMap<String, Pool>,
}

/// The session table. Shared behind an `Arc`.
pub struct Sessions {
    // A std Mutex: nothing is awaited while it is held, and every critical section is a few
    // hash-map operations, so a blocking lock is cheaper than an async one.
    table: Mutex<Table>,
    store: StoreHandle,
    metrics: Metrics,
    fail_mode: FailMode,
    kills: broadcast::Sender<KillRequest>,
    ids: SessionIds,
}

/// Session ids: a random prefix drawn once per start and a counter, so ids are unique across
/// restarts without a system call per session.
struct SessionIds {
    prefix: u64,
    counter: std::sync::atomic::AtomicU64,
}

impl SessionIds {
    fn new() -> SessionIds {
        let r = uuid::Uuid::new_v4().as_u64_pair();
        SessionIds {
            prefix: r.0 ^ r.1,
            counter: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{:016x}{n:016x}", self.prefix)
    }
}

/// Whether `s` has the shape of a session id this table hands out (32 lowercase hex digits), so a
/// VPN's echo of one (RADIUS `Class`) can be told from other values.
pub fn is_session_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A session admitted to the table and not yet committed (see
/// [`Sessions::admit_unpersisted`]).
#[derive(Debug)]
pub struct Unpersisted {
    /// The session.
    pub session: Session,
    line: Option<Vec<u8>>,
    /// Sessions of the same device from another address that this one replaces
    /// (`policy.duplicate_device = "replace"`): out of the table, ended at the VPN server once
    /// this one is committed, put back if it is not.
    pub displaced: Vec<Session>,
}

/// The IP address of a `remote_addr` (ip:port or a bare ip), if it names one.
fn remote_ip(addr: &str) -> Option<IpAddr> {
    addr.parse::<std::net::SocketAddr>()
        .map(|s| s.ip())
        .or_else(|_| addr.parse::<IpAddr>())
        .ok()
}

impl Sessions {
    /// An empty table over a store.
    pub fn new(store: StoreHandle, metrics: Metrics, fail_mode: FailMode) -> Arc<Sessions> {
        let (kills, _) = broadcast::channel(1024);
        Arc::new(Sessions {
            table: Mutex::new(Table::default()),
            store,
            metrics,
            fail_mode,
            kills,
            ids: SessionIds::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        crate::sync::lock(&self.table)
    }

    /// The store handle (for flushing at shutdown).
    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    /// Subscribes to kill requests (for the VPN integrations).
    pub fn subscribe_kills(&self) -> broadcast::Receiver<KillRequest> {
        self.kills.subscribe()
    }

    /// Sets the zones' pools, each with the tunnel network it lies in (at start and after a
    /// reload); addresses in use stay taken.
    pub fn set_pools(&self, pools: impl IntoIterator<Item = (String, IpNet, IpNet)>) {
        let mut t = self.lock();
        let mut fresh: HashMap<String, Pool> = HashMap::new();
        for (zone, net, network) in pools {
            let pool = match t.pools.remove(&zone) {
                Some(p) if p.net == net && p.network == network => p,
                _ => Pool::new(net, network),
            };
            fresh.insert(zone, pool);
        }
        t.pools = fresh;
        let taken: Vec<(String, IpAddr)> = t
            .by_id
            .values()
            .filter(|s| s.pool_ip)
            .filter_map(|s| s.tunnel_ip.map(|ip| (s.zone.clone(), ip)))
            .collect();
        for (zone, ip) in taken {
            if let Some(p) = t.pools.get_mut(&zone)
                && p.net.contains(&ip)
            {
                p.used.insert(ip);
            }
        }
    }

    /// Puts sessions loaded from the store back into the table.
    pub fn restore(&self, sessions: Vec<Session>) {
        let mut t = self.lock();
        for s in sessions {
            self.insert_locked(&mut t, s);
        }
    }

    fn insert_locked(&self, t: &mut Table, s: Session) {
        if s.pool_ip
            && let (Some(ip), Some(p)) = (s.tunnel_ip, t.pools.get_mut(&s.zone))
        {
            p.used.insert(ip);
        }
        *t.per_user.entry(s.username.clone()).or_default() += 1;
        t.by_device
            .entry(s.device_id.clone())
            .or_default()
            .push((s.id.clone(), remote_ip(&s.remote_addr)));
        *t.per_org_unit.entry(s.org_unit.clone()).or_default() += 1;
        if !s.session_key.is_empty() {
            t.by_key.insert(
                (s.vpn.clone(), s.instance.clone(), s.session_key.clone()),
                s.id.clone(),
            );
        }
        self.metrics
            .sessions
            .with_label_values(&[&s.zone, &s.org_unit])
            .inc();
        t.by_id.insert(s.id.clone(), s);
        self.metrics.seats_used.set(t.by_id.len() as i64);
    }

    fn remove_locked(&self, t: &mut Table, id: &str) -> Option<Session> {
        let s = t.by_id.remove(id)?;
        let key = (s.vpn.clone(), s.instance.clone(), s.session_key.clone());
        if t.by_key.get(&key).is_some_and(|v| v == id) {
            t.by_key.remove(&key);
        }
        decrement(&mut t.per_user, &s.username);
        if let Some(ids) = t.by_device.get_mut(&s.device_id) {
            ids.retain(|(x, _)| x != id);
            if ids.is_empty() {
                t.by_device.remove(&s.device_id);
            }
        }
        decrement(&mut t.per_org_unit, &s.org_unit);
        if s.pool_ip
            && let (Some(ip), Some(p)) = (s.tunnel_ip, t.pools.get_mut(&s.zone))
        {
            p.used.remove(&ip);
        }
        self.metrics
            .sessions
            .with_label_values(&[&s.zone, &s.org_unit])
            .dec();
        self.metrics.seats_used.set(t.by_id.len() as i64);
        Some(s)
    }

    /// Admits a session if capacity allows, atomically: it holds its seat in the table from
    /// here on, and [`Sessions::persist`] must follow (before the answer, except where a lost
    /// session is recovered otherwise: see `App::connect_answer_first`). A session the VPN
    /// already had under the same key is replaced (the VPN reused the key, so the old one is
    /// gone).
    ///
    /// A device that holds a live session from another real address (a copied certificate, or
    /// a laptop that changed networks) is refused with `duplicate_device`, or its old sessions
    /// are displaced (`duplicate`), as the policy says.
    pub fn admit_unpersisted(
        &self,
        adm: &Admission,
        req: &ConnectRequest,
        capacity: &Capacity,
        duplicate: DuplicateDevice,
        now_unix: i64,
        audit_line: impl FnOnce(&Session) -> Option<Vec<u8>>,
    ) -> Result<Unpersisted, Denial> {
        let (session, replaced, displaced) = {
            let mut t = self.lock();
            let replaced = if req.session_key.is_empty() {
                None
            } else {
                let key = (
                    req.vpn.clone(),
                    req.instance.clone(),
                    req.session_key.clone(),
                );
                match t.by_key.get(&key).cloned() {
                    Some(old) => self.remove_locked(&mut t, &old),
                    None => None,
                }
            };
            // A session admitted without device checks names no device: nothing to compare.
            let ip = remote_ip(&req.remote_addr).filter(|_| !adm.device_id.is_empty());
            let others: Vec<Session> = match ip {
                None => Vec::new(),
                Some(ip) => t
                    .by_device
                    .get(&adm.device_id)
                    .into_iter()
                    .flatten()
                    .filter(|(_, old)| old.is_some_and(|old| old != ip))
                    .filter_map(|(id, _)| t.by_id.get(id))
                    .cloned()
                    .collect(),
            };
            if let Some(old) = others.first()
                && duplicate == DuplicateDevice::Refuse
            {
                return Err(Denial {
                    reason: Reason::DuplicateDevice,
                    message: format!(
                        "Device {} already has a live session from {} and now connects from {}; its certificate may have been copied.",
                        adm.device_id, old.remote_addr, req.remote_addr
                    ),
                });
            }
            for old in &others {
                self.remove_locked(&mut t, &old.id);
            }
            let occupancy = Occupancy {
                total: t.by_id.len() as u32,
                org_unit: t.per_org_unit.get(&adm.org_unit).copied().unwrap_or(0),
                user: t.per_user.get(&adm.username).copied().unwrap_or(0),
            };
            // With a shared store the cluster's seats decide, in the database, at the commit
            // (`persist`); this table holds this node's sessions only.
            if self.store.cluster().is_none()
                && let Err(d) = check_capacity(adm, occupancy, capacity)
            {
                self.restore_locked(&mut t, others);
                return Err(d);
            }
            let (tunnel_ip, pool_ip) = match adm.pool {
                Some(_) => match t.pools.get_mut(&adm.zone).and_then(Pool::allocate) {
                    Some(ip) => (Some(ip), true),
                    None => {
                        self.restore_locked(&mut t, others);
                        return Err(Denial {
                            reason: Reason::CapacityFull,
                            message: format!("The address pool of zone {} is exhausted.", adm.zone),
                        });
                    }
                },
                None => (req.tunnel_ip.parse().ok(), false),
            };
            let session = Session {
                id: self.ids.next(),
                vpn: req.vpn.clone(),
                instance: req.instance.clone(),
                session_key: req.session_key.clone(),
                zone: adm.zone.clone(),
                org_unit: adm.org_unit.clone(),
                level: adm.level,
                priority: adm.priority,
                device_id: adm.device_id.clone(),
                username: adm.username.clone(),
                common_name: req.common_name.clone(),
                remote_addr: req.remote_addr.clone(),
                tunnel_ip,
                pool_ip,
                started_at: now_unix,
                bytes_received: 0,
                bytes_sent: 0,
                node: self
                    .store
                    .cluster()
                    .map(|c| c.node().to_string())
                    .unwrap_or_default(),
            };
            self.insert_locked(&mut t, session.clone());
            (session, replaced, others)
        };
        if let Some(old) = replaced {
            self.account_end(&old, now_unix);
            self.store.queue(StoreOp::Delete(old.id), None);
        }
        let line = audit_line(&session);
        Ok(Unpersisted {
            session,
            line,
            displaced,
        })
    }

    /// Puts sessions taken out for a connect back, when the connect does not go ahead.
    fn restore_locked(&self, t: &mut Table, sessions: Vec<Session>) {
        for s in sessions {
            self.insert_locked(t, s);
        }
    }

    /// Commits an admitted session (with its audit line). If the store fails and the fail
    /// mode is closed, the session is taken out of the table again and refused.
    ///
    /// Sessions the new one displaced are ended once it is committed: out of the store, and
    /// asked of the VPN server to drop (with `why_displaced`); if it is refused they are back.
    pub async fn persist(
        &self,
        admitted: Unpersisted,
        why_displaced: &str,
    ) -> Result<Session, Denial> {
        let Unpersisted {
            session,
            line,
            displaced,
        } = admitted;
        let committed = match self.store.cluster() {
            None => {
                self.store
                    .commit(StoreOp::Insert(Box::new(session.clone())), line)
                    .await
            }
            Some(cluster) => match cluster.admit(session.clone(), line).await {
                Ok(None) => Ok(()),
                Ok(Some(reason)) => {
                    let mut t = self.lock();
                    self.remove_locked(&mut t, &session.id);
                    self.restore_locked(&mut t, displaced);
                    return Err(cluster_refusal(reason, &session));
                }
                Err(e) => Err(e),
            },
        };
        match committed {
            Ok(()) => {
                self.end_displaced(displaced, why_displaced);
                Ok(session)
            }
            Err(e) if self.fail_mode == FailMode::Open => {
                tracing::error!(error = %e, session = %session.id, "session admitted without persistence (fail_mode = open)");
                self.end_displaced(displaced, why_displaced);
                Ok(session)
            }
            Err(e) => {
                tracing::error!(error = %e, "session store failed; connection refused (fail_mode = closed)");
                let mut t = self.lock();
                self.remove_locked(&mut t, &session.id);
                self.restore_locked(&mut t, displaced);
                Err(Denial {
                    reason: Reason::StoreUnavailable,
                    message: "The session store cannot record sessions right now.".into(),
                })
            }
        }
    }

    /// Ends displaced sessions (already out of the table): the store forgets them and the VPN
    /// integrations are asked to drop them.
    fn end_displaced(&self, displaced: Vec<Session>, why: &str) {
        let now = crate::state::unix_now();
        for s in displaced {
            self.account_end(&s, now);
            self.store.queue(StoreOp::Delete(s.id.clone()), None);
            let _ = self.kills.send(KillRequest {
                session: s,
                why: why.to_string(),
            });
        }
    }

    fn find_locked(t: &Table, sel: &Selector) -> Option<String> {
        match sel {
            Selector::Id(id) => t.by_id.contains_key(id).then(|| id.clone()),
            Selector::Key {
                vpn,
                instance,
                session_key,
            } => t
                .by_key
                .get(&(vpn.clone(), instance.clone(), session_key.clone()))
                .cloned(),
        }
    }

    /// Ends a session with its final byte counts; `None` if it is not known (a disconnect
    /// after a refused connect, or a repeat).
    pub async fn end(
        &self,
        sel: &Selector,
        final_bytes: Option<(u64, u64)>,
        now_unix: i64,
        audit_line: impl FnOnce(&Session) -> Option<Vec<u8>>,
    ) -> Option<Session> {
        self.end_as(sel, final_bytes, now_unix, "disconnect", audit_line)
            .await
            .map(|(s, _)| s)
    }

    /// As [`Sessions::end`]; also true if the session was this node's (false: another node's,
    /// ended in the shared store, which that node ends at its VPN server).
    async fn end_as(
        &self,
        sel: &Selector,
        final_bytes: Option<(u64, u64)>,
        now_unix: i64,
        why: &str,
        audit_line: impl FnOnce(&Session) -> Option<Vec<u8>>,
    ) -> Option<(Session, bool)> {
        let found = {
            let mut t = self.lock();
            Self::find_locked(&t, sel).and_then(|id| self.remove_locked(&mut t, &id))
        };
        let mut s = match (found, self.store.cluster(), sel) {
            (Some(s), _, _) => s,
            (None, Some(cluster), Selector::Id(id)) => {
                let s = match cluster.end_elsewhere(id, why).await {
                    Ok(s) => s?,
                    Err(e) => {
                        tracing::error!(error = %e, session = %id, "ending a session of another node failed");
                        return None;
                    }
                };
                // The delete is done; this carries the end's audit line to the writer.
                self.store
                    .queue(StoreOp::Delete(s.id.clone()), audit_line(&s));
                return Some((s, false));
            }
            (None, _, _) => return None,
        };
        if let Some((rx, tx)) = final_bytes {
            self.account_bytes(&s, rx, tx);
            s.bytes_received = rx;
            s.bytes_sent = tx;
        }
        self.account_end(&s, now_unix);
        let line = audit_line(&s);
        if let Err(e) = self.store.commit(StoreOp::Delete(s.id.clone()), line).await {
            // The writer keeps the delete and retries it; the seat is free in memory now.
            tracing::warn!(error = %e, "session end not yet persisted; will retry");
        }
        Some((s, true))
    }

    /// A session of this node ended elsewhere (a kill on another node, a lapsed lease): out of
    /// the table (the shared store has forgotten it already) and asked of the VPN server to
    /// drop. False if it was not here.
    pub fn ended_elsewhere(&self, id: &str, why: &str) -> bool {
        let Some(s) = ({
            let mut t = self.lock();
            self.remove_locked(&mut t, id)
        }) else {
            return false;
        };
        self.account_end(&s, crate::state::unix_now());
        let _ = self.kills.send(KillRequest {
            session: s,
            why: why.to_string(),
        });
        true
    }

    /// Every live session: with a shared store the whole cluster's (each with its node), else
    /// this table's.
    pub async fn list_all(&self) -> Vec<Session> {
        if let Some(cluster) = self.store.cluster() {
            match cluster.list().await {
                Ok(v) => return v,
                Err(e) => {
                    tracing::warn!(error = %e, "listing the cluster's sessions failed; this node's only");
                }
            }
        }
        self.list()
    }

    /// Ends a session and asks the VPN server to drop it.
    pub async fn kill(
        &self,
        sel: &Selector,
        why: &str,
        now_unix: i64,
        audit_line: impl FnOnce(&Session) -> Option<Vec<u8>>,
    ) -> Option<Session> {
        let (s, here) = self.end_as(sel, None, now_unix, why, audit_line).await?;
        if !here {
            return Some(s);
        }
        // No receiver (no VPN integration running) is fine: the table is already right.
        let _ = self.kills.send(KillRequest {
            session: s.clone(),
            why: why.to_string(),
        });
        Some(s)
    }

    /// Live byte counters from the VPN server: the totals only move forward.
    pub fn update_bytes(&self, sel: &Selector, received: u64, sent: u64) -> bool {
        let (s, (rx, tx)) = {
            let mut t = self.lock();
            let Some(id) = Self::find_locked(&t, sel) else {
                return false;
            };
            let Some(s) = t.by_id.get_mut(&id) else {
                return false;
            };
            let before = s.clone();
            s.bytes_received = received;
            s.bytes_sent = sent;
            (before, (received, sent))
        };
        self.account_bytes(&s, rx, tx);
        self.store.queue(
            StoreOp::Bytes {
                id: s.id,
                received,
                sent,
            },
            None,
        );
        true
    }

    /// Adds what the counters moved since the last known values; a counter that went down was
    /// reset at the VPN server, so its new value is all new.
    fn account_bytes(&self, before: &Session, rx: u64, tx: u64) {
        let drx = if rx >= before.bytes_received {
            rx - before.bytes_received
        } else {
            rx
        };
        let dtx = if tx >= before.bytes_sent {
            tx - before.bytes_sent
        } else {
            tx
        };
        let labels = [before.zone.as_str(), before.org_unit.as_str()];
        self.metrics
            .session_received_bytes
            .with_label_values(&labels)
            .inc_by(drx);
        self.metrics
            .session_sent_bytes
            .with_label_values(&labels)
            .inc_by(dtx);
    }

    fn account_end(&self, s: &Session, now_unix: i64) {
        let secs = (now_unix - s.started_at).max(0) as f64;
        self.metrics
            .session_duration
            .with_label_values(&[&s.zone])
            .observe(secs);
    }

    /// The live sessions of a device.
    pub fn of_device(&self, device_id: &str) -> Vec<Session> {
        let t = self.lock();
        t.by_device
            .get(device_id)
            .into_iter()
            .flatten()
            .filter_map(|(id, _)| t.by_id.get(id).cloned())
            .collect()
    }

    /// A copy of every live session.
    pub fn list(&self) -> Vec<Session> {
        let t = self.lock();
        let mut v: Vec<Session> = t.by_id.values().cloned().collect();
        v.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        v
    }

    /// One session by id or key.
    pub fn get(&self, sel: &Selector) -> Option<Session> {
        let t = self.lock();
        let id = Self::find_locked(&t, sel)?;
        t.by_id.get(&id).cloned()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// No live sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-keys a session (the VPN server restarted and gave it a new key).
    pub fn rekey(&self, id: &str, new_key: &str) -> bool {
        let mut t = self.lock();
        let Some(s) = t.by_id.get_mut(id) else {
            return false;
        };
        let old = (s.vpn.clone(), s.instance.clone(), s.session_key.clone());
        s.session_key = new_key.to_string();
        let new = (s.vpn.clone(), s.instance.clone(), new_key.to_string());
        let copy = s.clone();
        if t.by_key.get(&old).is_some_and(|v| v == id) {
            t.by_key.remove(&old);
        }
        t.by_key.insert(new, id.to_string());
        drop(t);
        self.store.queue(StoreOp::Insert(Box::new(copy)), None);
        true
    }
}

/// A refusal by the cluster's limits, worded as the local check words it.
fn cluster_refusal(reason: Reason, s: &Session) -> Denial {
    let message = match reason {
        Reason::OrgUnitQuota => format!(
            "Org unit {} has used all of its VPN sessions in the cluster.",
            s.org_unit
        ),
        Reason::UserSessionLimit => format!(
            "User {} already has the maximum number of VPN sessions in the cluster.",
            s.username
        ),
        _ if s.priority => "All VPN seats of the cluster are taken.".to_string(),
        _ => "All general VPN seats of the cluster are taken.".to_string(),
    };
    Denial { reason, message }
}

fn decrement(map: &mut HashMap<String, u32>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}
