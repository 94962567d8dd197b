//! The VICI client, one per `[[strongswan]]` entry: decides each IKE_SA charon reports up and
//! terminates a refused one at once; live bytes and reconciliation from `list-sas` (at connect
//! and every `status_interval`); `terminate` for revoked devices and operator kills; the socket
//! gone: reconnect with backoff, as the OpenVPN management client does.
//!
//! Two connections to charon: one registered for events (`ike-updown`, `ike-rekey` (a rekeyed
//! IKE_SA has a new unique id: the session moves to it), `child-updown`, `child-rekey`, `log`),
//! read by its own task; one for commands (`list-sas`, `list-certs`,
//! `terminate`), used in turn by this task.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};

use super::conn::{Conn, ConnError};
use super::vici::{Message, Value};
use super::{IkeSa, Settings, connect_request, ike_id, proven_identity};
use crate::app::App;
use crate::config::StrongswanInstance;
use crate::session::{KillRequest, Selector};
use crate::wire::DisconnectRequest;

/// The events pforte registers for.
const EVENTS: [&str; 5] = [
    "ike-updown",
    "ike-rekey",
    "child-updown",
    "child-rekey",
    "log",
];
/// How long an IKE_SA reported up waits for its certificate round's log line (charon's logger
/// sends from its own job, so the line may come just after the `ike-updown`).
const IDENTITY_WAIT: Duration = Duration::from_millis(300);
/// Proven identities of IKE_SAs that never came up are forgotten after this.
const IDENTITY_TTL: Duration = Duration::from_secs(120);
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// `terminate` is forced: charon waits this long (ms) for the client's answer to its DELETE,
/// then destroys the IKE_SA and its CHILD_SAs anyway. Without `force` an unanswered DELETE is
/// retransmitted for minutes while the tunnel stays up (a refused client that stops answering
/// would keep it).
const TERMINATE_TIMEOUT_MS: &str = "500";

/// Runs the client for one instance until shutdown, reconnecting with backoff.
pub async fn run(inst: StrongswanInstance, app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let mut kills = app.sessions.subscribe_kills();
    let gauge = app
        .metrics
        .vpn_control_connected
        .with_label_values(&["strongswan", &inst.instance]);
    gauge.set(0);
    app.metrics
        .sessions_reaped
        .with_label_values(&[&inst.instance]);
    app.metrics
        .strongswan_enforcement
        .with_label_values(&[&inst.instance]);
    let mut backoff = Duration::from_millis(250);
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        match session(&inst, &app, &mut kills, &mut shutdown, &gauge).await {
            Ok(()) => return,
            Err(e) => {
                gauge.set(0);
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(instance = %inst.instance, socket = %inst.vici.display(), error = %e, attempts = failures, "strongSwan VICI connection lost or unavailable; reconnecting");
                }
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(250);
            failures = 0;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn session(
    inst: &StrongswanInstance,
    app: &Arc<App>,
    kills: &mut broadcast::Receiver<KillRequest>,
    shutdown: &mut watch::Receiver<bool>,
    gauge: &prometheus::IntGauge,
) -> Result<(), ConnError> {
    let mut ev = Conn::connect(&inst.vici).await?;
    for e in EVENTS {
        ev.register(e).await?;
    }
    let mut events = ev.into_events();
    let cmd = Conn::connect(&inst.vici).await?;
    tracing::info!(instance = %inst.instance, socket = %inst.vici.display(), "connected to strongSwan's VICI socket");
    gauge.set(1);
    let mut w = Watcher {
        inst,
        app,
        cmd,
        settings: Settings {
            instance: inst.instance.clone(),
            zone: inst.zone.clone(),
        },
        identities: HashMap::new(),
        pending: HashMap::new(),
        books: HashMap::new(),
        unknown: HashSet::new(),
    };
    w.reconcile().await?;
    let mut tick = tokio::time::interval(inst.status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let deadline = w
            .pending
            .values()
            .map(|(_, at)| *at + IDENTITY_WAIT)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            e = events.recv() => match e {
                Some(Ok((name, m))) => w.on_event(&name, &m, Instant::now()).await?,
                Some(Err(e)) => return Err(e),
                None => return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            },
            _ = tick.tick() => w.reconcile().await?,
            k = kills.recv() => match k {
                Ok(k) => w.on_kill(&k).await?,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "kill requests missed; reconciling");
                    w.reconcile().await?;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            _ = tokio::time::sleep_until(deadline.into()), if !w.pending.is_empty() => {
                w.decide_overdue().await?;
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// A session's bytes across CHILD_SAs: counters restart with each rekeyed CHILD_SA, so the
/// finished ones are summed.
#[derive(Debug, Default)]
struct ByteBook {
    done: (u64, u64),
    live: HashMap<String, (u64, u64)>,
}

impl ByteBook {
    /// Records what charon reports of its CHILD_SAs; with `complete` (a `list-sas` answer),
    /// children no longer listed are finished.
    fn observe(&mut self, children: &HashMap<String, (u64, u64)>, complete: bool) {
        for (id, (i, o)) in children {
            let e = self.live.entry(id.clone()).or_default();
            *e = (e.0.max(*i), e.1.max(*o));
        }
        if complete {
            let gone: Vec<String> = self
                .live
                .keys()
                .filter(|k| !children.contains_key(*k))
                .cloned()
                .collect();
            for k in gone {
                if let Some((i, o)) = self.live.remove(&k) {
                    self.done = (self.done.0 + i, self.done.1 + o);
                }
            }
        }
    }

    fn total(&self) -> (u64, u64) {
        self.live
            .values()
            .fold(self.done, |(a, b), (i, o)| (a + i, b + o))
    }
}

struct Watcher<'a> {
    inst: &'a StrongswanInstance,
    app: &'a Arc<App>,
    cmd: Conn,
    settings: Settings,
    /// IKE_SA unique id → the identity its certificate round proved, and when.
    identities: HashMap<u64, (String, Instant)>,
    /// IKE_SAs up and waiting for their certificate round's identity, with when they came up.
    pending: HashMap<u64, (IkeSa, Instant)>,
    /// Session key → bytes.
    books: HashMap<String, ByteBook>,
    /// Keys of established IKE_SAs without a session seen at the last reconciliation.
    unknown: HashSet<String>,
}

impl Watcher<'_> {
    fn selector(&self, key: &str) -> Selector {
        Selector::Key {
            vpn: "strongswan".into(),
            instance: self.inst.instance.clone(),
            session_key: key.to_string(),
        }
    }

    async fn on_event(&mut self, name: &str, m: &Message, at: Instant) -> Result<(), ConnError> {
        match name {
            "log" => {
                let id = m.str("ikesa-uniqueid").and_then(|v| v.parse::<u64>().ok());
                let msg = m.str("msg").unwrap_or_default();
                if let (Some(id), Some(who)) = (id, proven_identity(&msg)) {
                    // The first proven identity of an IKE_SA is its certificate round's.
                    self.identities
                        .entry(id)
                        .or_insert_with(|| (who.to_string(), at));
                    if let Some((sa, up_at)) = self.pending.remove(&id) {
                        self.decide(&sa, up_at).await?;
                    }
                }
            }
            "ike-updown" => {
                let up = m.str("up").as_deref() == Some("yes");
                for sa in IkeSa::all_in(m) {
                    if up {
                        if self.identities.contains_key(&sa.uniqueid) {
                            self.decide(&sa, at).await?;
                        } else {
                            self.pending.insert(sa.uniqueid, (sa, at));
                        }
                    } else {
                        self.ended(&sa).await;
                    }
                }
            }
            "ike-rekey" => {
                for (name, sa) in m.sections() {
                    let old = sa.section("old").and_then(|o| IkeSa::from_section(name, o));
                    let new = sa.section("new").and_then(|n| IkeSa::from_section(name, n));
                    if let (Some(old), Some(new)) = (old, new) {
                        self.rekeyed(&old, &new);
                    }
                }
            }
            "child-updown" | "child-rekey" => {
                for sa in IkeSa::all_in(m) {
                    self.observe(&sa, false);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn observe(&mut self, sa: &IkeSa, complete: bool) {
        let key = sa.key();
        let sel = self.selector(&key);
        if self.app.sessions.get(&sel).is_none() {
            return;
        }
        let book = self.books.entry(key).or_default();
        book.observe(&sa.children, complete);
        let (i, o) = book.total();
        self.app.sessions.update_bytes(&sel, i, o);
    }

    /// An IKE_SA was rekeyed: the new one (a new unique id, the same CHILD_SAs) carries the
    /// session on.
    fn rekeyed(&mut self, old: &IkeSa, new: &IkeSa) {
        let (old_key, new_key) = (old.key(), new.key());
        if let Some(identity) = self.identities.remove(&old.uniqueid) {
            self.identities.insert(new.uniqueid, identity);
        }
        let Some(session) = self.app.sessions.get(&self.selector(&old_key)) else {
            return;
        };
        self.app.sessions.rekey(&session.id, &new_key);
        if let Some(book) = self.books.remove(&old_key) {
            self.books.insert(new_key, book);
        }
        tracing::debug!(instance = %self.inst.instance, old = old.uniqueid, new = new.uniqueid, "IKE_SA rekeyed");
    }

    /// An IKE_SA went down: the session ends with its final bytes.
    async fn ended(&mut self, sa: &IkeSa) {
        self.pending.remove(&sa.uniqueid);
        self.identities.remove(&sa.uniqueid);
        let key = sa.key();
        let mut book = self.books.remove(&key).unwrap_or_default();
        book.observe(&sa.children, false);
        let (i, o) = book.total();
        let req = DisconnectRequest {
            vpn: "strongswan".into(),
            instance: self.inst.instance.clone(),
            session_key: key,
            bytes_received: Some(i),
            bytes_sent: Some(o),
            ..Default::default()
        };
        if let Err(e) = self.app.disconnect(&req).await {
            tracing::warn!(error = %e, "strongSwan disconnect not recorded");
        }
    }

    /// The fingerprint of the certificate charon verified for `identity`, where exactly one
    /// certificate has that subject.
    async fn fingerprint(&mut self, identity: &str) -> Option<String> {
        let args = Message::new().kv("type", "X509").kv("subject", identity);
        let (certs, _) = match self.cmd.call("list-certs", args, Some("list-cert")).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "list-certs failed; deciding by the certificate's CN");
                return None;
            }
        };
        let ders: Vec<&Vec<u8>> = certs
            .iter()
            .filter_map(|c| match c.get("data") {
                Some(Value::Str(d)) => Some(d),
                _ => None,
            })
            .collect();
        match ders.as_slice() {
            [one] => Some(hex(&Sha256::digest(one))),
            _ => None,
        }
    }

    /// Decides an IKE_SA that came up at `up_at`; a refused one is terminated at once.
    async fn decide(&mut self, sa: &IkeSa, up_at: Instant) -> Result<(), ConnError> {
        let identity = self.identities.get(&sa.uniqueid).map(|(id, _)| id.clone());
        let fp = match &identity {
            Some(id) => self.fingerprint(id).await,
            None => None,
        };
        let req = connect_request(sa, identity.as_deref(), fp.as_deref(), &self.settings);
        let resp = self.app.connect(req).await;
        if resp.allowed() {
            self.observe(sa, false);
            return Ok(());
        }
        let reason = resp.reason.map(|r| r.as_str()).unwrap_or("refused");
        self.terminate(sa.uniqueid, reason).await?;
        let window = up_at.elapsed();
        self.app
            .metrics
            .strongswan_enforcement
            .with_label_values(&[&self.inst.instance])
            .observe(window.as_secs_f64());
        tracing::info!(instance = %self.inst.instance, ike_id = sa.uniqueid, reason, window_ms = window.as_secs_f64() * 1000.0, "IKE_SA refused and terminated");
        Ok(())
    }

    /// IKE_SAs whose certificate round's identity never came: decided without one (refused).
    async fn decide_overdue(&mut self) -> Result<(), ConnError> {
        let now = Instant::now();
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= IDENTITY_WAIT)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some((sa, at)) = self.pending.remove(&id) {
                tracing::warn!(instance = %self.inst.instance, ike_id = id, "no certificate round seen for this IKE_SA");
                self.decide(&sa, at).await?;
            }
        }
        self.identities
            .retain(|_, (_, at)| now.duration_since(*at) < IDENTITY_TTL);
        Ok(())
    }

    async fn terminate(&mut self, id: u64, why: &str) -> Result<(), ConnError> {
        let args = Message::new()
            .kv("ike-id", id.to_string())
            .kv("force", "yes")
            .kv("timeout", TERMINATE_TIMEOUT_MS);
        let (_, answer) = self.cmd.call("terminate", args, None).await?;
        if answer.str("success").as_deref() != Some("yes") {
            tracing::warn!(instance = %self.inst.instance, ike_id = id, why, error = answer.str("errmsg").unwrap_or_default(), "terminate failed");
        }
        Ok(())
    }

    async fn on_kill(&mut self, k: &KillRequest) -> Result<(), ConnError> {
        let s = &k.session;
        if s.vpn != "strongswan" || s.instance != self.inst.instance {
            return Ok(());
        }
        self.books.remove(&s.session_key);
        match ike_id(&s.session_key) {
            Some(id) => {
                tracing::info!(instance = %self.inst.instance, ike_id = id, why = %k.why, "terminate");
                self.terminate(id, &k.why).await
            }
            None => Ok(()),
        }
    }

    /// `list-sas`: bytes of known sessions; sessions charon no longer has are reaped;
    /// established IKE_SAs without a session (seen twice, so none still on its way through
    /// `ike-updown`) are terminated: their certificate round cannot be read any more, so they
    /// are sent back through the gate.
    async fn reconcile(&mut self) -> Result<(), ConnError> {
        let (events, _) = self
            .cmd
            .call("list-sas", Message::new(), Some("list-sa"))
            .await?;
        let sas: Vec<IkeSa> = events.iter().flat_map(IkeSa::all_in).collect();
        let live: HashSet<String> = sas.iter().map(IkeSa::key).collect();
        let mut unknown = HashSet::new();
        for sa in &sas {
            let key = sa.key();
            if self.app.sessions.get(&self.selector(&key)).is_some() {
                self.observe(sa, true);
            } else if sa.state == "ESTABLISHED" && !self.pending.contains_key(&sa.uniqueid) {
                if self.unknown.contains(&key) {
                    tracing::warn!(instance = %self.inst.instance, ike_id = sa.uniqueid, "IKE_SA without a pforte session; terminating it");
                    self.terminate(sa.uniqueid, "no session").await?;
                } else {
                    unknown.insert(key);
                }
            }
        }
        self.unknown = unknown;
        self.books.retain(|k, _| live.contains(k));
        self.app
            .reap_missing(
                "strongswan",
                &self.inst.instance,
                &live,
                "gone from strongSwan's IKE_SAs",
            )
            .await;
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_summed_across_rekeyed_children() {
        let mut b = ByteBook::default();
        b.observe(&HashMap::from([("1".to_string(), (100, 50))]), true);
        b.observe(&HashMap::from([("1".to_string(), (300, 80))]), false);
        // Rekeyed: child 1 is gone, child 2 starts again from 0.
        b.observe(&HashMap::from([("2".to_string(), (10, 5))]), true);
        assert_eq!(b.total(), (310, 85));
        // A counter never goes back within one child.
        b.observe(&HashMap::from([("2".to_string(), (7, 1))]), true);
        assert_eq!(b.total(), (310, 85));
    }
}
