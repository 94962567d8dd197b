//! The RADIUS front: Access-Requests on one UDP socket, Accounting-Requests on another.
//!
//! Every datagram is checked before anything is decided: a known client (by source address),
//! a well-formed packet of the socket's kind, a valid `Message-Authenticator` on every
//! Access-Request (RFC 3579; BlastRADIUS, CVE-2024-3596), a valid Request Authenticator on every
//! Accounting-Request. Anything else is dropped without an answer and counted by cause.
//! Retransmissions are answered from the duplicate cache ([`dedup`](super::dedup)).
//!
//! An Access-Request becomes a [`ConnectRequest`](crate::wire::ConnectRequest) through the
//! client's vendor profile and is decided by [`App::connect`], as an OpenVPN connect is (with an
//! upstream configured, only after the upstream accepted the credentials). Accounting Start binds
//! the NAS's `Acct-Session-Id` to the session named by `Class`; Interim-Update feeds its bytes;
//! Stop ends it; Accounting-On/Off ends every session of that NAS. An accepted session whose
//! Start does not come in time is ended, so no seat leaks.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio::task::JoinSet;

use crate::app::App;
use crate::config::RadiusConfig;
use crate::session::{KillRequest, Selector, Session};
use crate::sync::lock;
use crate::wire::{ConnectRequest, ConnectResponse, Denial, DisconnectRequest, Reason};

use super::attr::{self, acct_status};
use super::auth::{self, AuthError};
use super::clients::{Clients, Nas};
use super::dae;
use super::dedup::{self, Seen};
use super::packet::{Attribute, Code, MAX_PACKET_LEN, Packet};
use super::profile::{self, VPN};
use super::upstream::{Outcome, Upstreams};

/// Requests decided at once; past it, new ones are dropped (`overload`) and the NAS retries.
pub const MAX_IN_FLIGHT: usize = 4096;
/// The session key an accepted session has until its Accounting Start names it.
pub const PENDING_PREFIX: &str = "pending-";

/// The bound sockets (bound in `serve`'s bind step, before `/readyz` answers 200).
pub struct Sockets {
    /// Access-Requests.
    pub auth: UdpSocket,
    /// Accounting-Requests.
    pub acct: UdpSocket,
}

/// Binds both sockets.
pub fn bind(config: &RadiusConfig) -> Result<Sockets, crate::net::BindError> {
    Ok(Sockets {
        auth: crate::net::bind_udp(config.auth_listen)?,
        acct: crate::net::bind_udp(config.acct_listen)?,
    })
}

/// An accepted session waiting for its Accounting Start.
struct Pending {
    deadline: Instant,
    client: String,
}

/// The server's shared parts.
pub struct Server {
    app: Arc<App>,
    config: RadiusConfig,
    clients: Clients,
    upstreams: Upstreams,
    dedup: std::sync::Mutex<dedup::Cache>,
    pending: std::sync::Mutex<HashMap<String, Pending>>,
    /// The source address each accepted session's NAS used (for Disconnect-Requests to a NAS
    /// configured by prefix).
    nas_addr: std::sync::Mutex<HashMap<String, IpAddr>>,
    in_flight: Arc<Semaphore>,
}

/// A Disconnect-Request to be sent to a NAS for one session: a kill, or a client the NAS
/// admitted that pforte has no record of (its commit failed after the Accept, or it was lost
/// in a crash).
struct NasDrop {
    nas: Arc<Nas>,
    addr: Option<IpAddr>,
    id: String,
    user: String,
    acct: Option<String>,
    timeout: Duration,
    app: Arc<App>,
}

impl NasDrop {
    async fn send(self) {
        dae::disconnect(
            &self.nas,
            self.addr,
            (&self.id, &self.user),
            self.acct.as_deref(),
            self.timeout,
            &self.app.metrics,
        )
        .await;
    }
}

/// The `Acct-Session-Id` a session is known by at its NAS (none while it waits for its Start).
fn acct_session_id(s: &Session) -> Option<String> {
    (!s.session_key.starts_with(PENDING_PREFIX)).then(|| s.session_key.clone())
}

/// Which socket a datagram came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    Auth,
    Acct,
}

fn drop_reason(e: &AuthError) -> &'static str {
    match e {
        AuthError::MissingMessageAuthenticator => "missing_message_authenticator",
        AuthError::DuplicateMessageAuthenticator | AuthError::MessageAuthenticatorSize(_) => {
            "malformed"
        }
        _ => "bad_authenticator",
    }
}

/// The `type` label of a verified request.
fn request_type(pkt: &Packet) -> &'static str {
    match pkt.code {
        Code::AccessRequest => "access_request",
        Code::AccountingRequest => match pkt.get_u32(attr::ACCT_STATUS_TYPE) {
            Ok(Some(acct_status::START)) => "accounting_start",
            Ok(Some(acct_status::INTERIM_UPDATE)) => "accounting_interim_update",
            Ok(Some(acct_status::STOP)) => "accounting_stop",
            Ok(Some(acct_status::ACCOUNTING_ON)) => "accounting_on",
            Ok(Some(acct_status::ACCOUNTING_OFF)) => "accounting_off",
            _ => "accounting_other",
        },
        _ => "other",
    }
}

fn text(v: &[u8]) -> Option<&str> {
    std::str::from_utf8(v)
        .ok()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

impl Server {
    /// The server for a config; `Err` when a secret cannot be used.
    pub fn new(app: Arc<App>, config: RadiusConfig) -> Result<Arc<Server>, String> {
        let clients = Clients::new(&config)?;
        let upstreams = Upstreams::new(&config.upstreams)?;
        let server = Arc::new(Server {
            app,
            config,
            clients,
            upstreams,
            dedup: std::sync::Mutex::new(dedup::Cache::default()),
            pending: std::sync::Mutex::new(HashMap::new()),
            nas_addr: std::sync::Mutex::new(HashMap::new()),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        });
        // Sessions restored from the store that never saw their Start get a fresh deadline.
        let deadline = Instant::now() + server.config.accounting_start_timeout;
        let mut pending = lock(&server.pending);
        for s in server.app.sessions.list() {
            if s.vpn == VPN && s.session_key.starts_with(PENDING_PREFIX) {
                pending.insert(
                    s.id.clone(),
                    Pending {
                        deadline,
                        client: s.instance.clone(),
                    },
                );
            }
        }
        drop(pending);
        // Every series a dashboard or alert reads exists from the start (at zero).
        let m = &server.app.metrics;
        for nas in server.clients.all() {
            let name = nas.config.name.as_str();
            for t in [
                "access_request",
                "accounting_start",
                "accounting_interim_update",
                "accounting_stop",
            ] {
                m.radius_requests.with_label_values(&[name, t]);
            }
            for reason in [
                "malformed",
                "bad_authenticator",
                "missing_message_authenticator",
            ] {
                m.radius_dropped.with_label_values(&[name, reason]);
            }
            m.radius_accepts.with_label_values(&[name]);
            m.radius_duplicates.with_label_values(&[name]);
            m.radius_start_timeouts.with_label_values(&[name]);
            m.radius_unrecorded_starts.with_label_values(&[name]);
            if nas.config.dae_port != 0 {
                for result in ["ack", "nak", "timeout"] {
                    m.radius_disconnects.with_label_values(&[name, result]);
                }
            }
        }
        m.radius_dropped
            .with_label_values(&["unknown", "unknown_client"]);
        for up in server.upstreams_names() {
            m.radius_upstream_timeouts.with_label_values(&[&up]);
            m.radius_upstream_rtt.with_label_values(&[&up]);
        }
        Ok(server)
    }

    fn upstreams_names(&self) -> Vec<String> {
        self.config
            .upstreams
            .iter()
            .map(|u| u.name.clone())
            .collect()
    }

    fn dropped(&self, client: &str, reason: &str) {
        self.app
            .metrics
            .radius_dropped
            .with_label_values(&[client, reason])
            .inc();
    }

    /// Checks a datagram; `Some` when it is to be decided.
    fn admit_datagram(
        &self,
        port: Port,
        data: &[u8],
        src: SocketAddr,
    ) -> Option<(Arc<Nas>, Packet)> {
        let Some(nas) = self.clients.find(src.ip()) else {
            self.dropped("unknown", "unknown_client");
            return None;
        };
        let name = nas.config.name.as_str();
        if data.len() > MAX_PACKET_LEN {
            self.dropped(name, "oversized");
            return None;
        }
        let pkt = match Packet::decode(data) {
            Ok(p) => p,
            Err(_) => {
                self.dropped(name, "malformed");
                return None;
            }
        };
        let expected = match port {
            Port::Auth => Code::AccessRequest,
            Port::Acct => Code::AccountingRequest,
        };
        if pkt.code != expected {
            self.dropped(name, "wrong_code");
            return None;
        }
        let legacy = pkt.code == Code::AccessRequest
            && !nas.config.require_message_authenticator
            && pkt.get(attr::MESSAGE_AUTHENTICATOR).is_none();
        if !legacy && let Err(e) = auth::verify_request(&pkt, &nas.secret) {
            self.dropped(name, drop_reason(&e));
            return None;
        }
        Some((nas.clone(), pkt))
    }

    /// Signs an answer for the NAS, echoing the request's Proxy-State attributes in order.
    fn sign(&self, nas: &Nas, request: &Packet, mut answer: Packet) -> Option<Vec<u8>> {
        answer.attributes.retain(|a| a.kind != attr::PROXY_STATE);
        for ps in request.get_all(attr::PROXY_STATE) {
            answer.attributes.push(Attribute {
                kind: attr::PROXY_STATE,
                value: ps.to_vec(),
            });
        }
        match auth::finalize_response(&mut answer, &request.authenticator, &nas.secret) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(client = %nas.config.name, error = %e, "RADIUS answer cannot be encoded");
                None
            }
        }
    }

    /// Whether an Accept may go out before its session's commit: with a store of this node
    /// alone (SQLite) whose last commit succeeded, the decision taken in memory is final (the
    /// seat and the address are taken) and only its durability is still to come, as on
    /// OpenVPN's management interface. Not with a shared store (the cluster decides capacity
    /// at the commit), nor once a commit failed (the refusal is then `store_unavailable`).
    fn answers_first(&self) -> bool {
        self.app.sessions.store().local_and_healthy()
    }

    /// Decides one verified request; the signed answer (none: drop).
    async fn handle(
        &self,
        nas: &Arc<Nas>,
        pkt: &Packet,
        src: SocketAddr,
        answer_first: bool,
    ) -> Option<Vec<u8>> {
        let answer = match pkt.code {
            Code::AccessRequest => self.access(nas, pkt, src.ip(), answer_first).await,
            _ => self.accounting(nas, pkt, src.ip()).await,
        };
        self.sign(nas, pkt, answer)
    }

    /// Decides with the Accept before the commit ([`App::connect_answer_first`]); the commit
    /// follows on a task of its own. Should the store refuse it after all (a commit failing,
    /// fail mode closed), the session is out of the table again and the NAS is asked to drop
    /// the client it let in. A crash between the Accept and the commit leaves a session the
    /// NAS has and pforte has not: its Accounting Start is answered with a Disconnect-Request
    /// ([`Server::accounting`]).
    fn decide_answer_first(
        &self,
        nas: &Arc<Nas>,
        req: ConnectRequest,
        src: IpAddr,
    ) -> ConnectResponse {
        let (resp, pending) = self.app.connect_answer_first(req);
        if let Some(pending) = pending {
            let app = self.app.clone();
            let s = pending.session();
            let drop_it = self.nas_drop(nas, Some(src), &s.id, &s.username, acct_session_id(s));
            tokio::spawn(async move {
                if !app.persist(pending).await {
                    tracing::warn!(client = %drop_it.nas.config.name, session = %drop_it.id, "accepted session not recorded; asking the NAS to drop the client");
                    drop_it.send().await;
                }
            });
        }
        resp
    }

    fn reject(request: &Packet, code: &str, message: &str, mut extra: Vec<Attribute>) -> Packet {
        let mut p = Packet::response_to(request, Code::AccessReject);
        extra.retain(|a| a.kind != attr::REPLY_MESSAGE);
        p.attributes = extra;
        let text = format!("{code}: {message}");
        let mut cut = text.len().min(attr::MAX_VALUE_LEN);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        p.attributes.push(Attribute {
            kind: attr::REPLY_MESSAGE,
            value: text.as_bytes()[..cut].to_vec(),
        });
        p
    }

    async fn access(
        &self,
        nas: &Arc<Nas>,
        pkt: &Packet,
        src: IpAddr,
        answer_first: bool,
    ) -> Packet {
        let session_key = pkt
            .get(attr::ACCT_SESSION_ID)
            .and_then(text)
            .map(str::to_string)
            .unwrap_or_else(|| format!("{PENDING_PREFIX}{}", uuid::Uuid::new_v4().simple()));
        let req = profile::connect_request(nas, pkt, self.config.missing_device, session_key);
        let mut passed: Vec<Attribute> = Vec::new();
        if !self.upstreams.is_empty() {
            // Credentials first: an unauthenticated caller learns nothing about the registry,
            // and only the last round of a multi-round EAP takes a seat.
            match self
                .upstreams
                .forward(pkt, &nas.secret, &self.app.metrics)
                .await
            {
                Outcome::Challenge(attrs) => {
                    let mut p = Packet::response_to(pkt, Code::AccessChallenge);
                    p.attributes = attrs;
                    return p;
                }
                Outcome::Reject(attrs) => {
                    return Self::reject(
                        pkt,
                        "credentials_rejected",
                        "The credential server refused the login.",
                        attrs,
                    );
                }
                Outcome::Unavailable => {
                    let d = Denial {
                        reason: Reason::UpstreamUnavailable,
                        message: "No credential server answered; the login cannot be checked."
                            .into(),
                    };
                    self.app
                        .record_decision(&req, &ConnectResponse::deny(&d), None);
                    return Self::reject(pkt, d.reason.as_str(), &d.message, Vec::new());
                }
                Outcome::Accept(attrs) => passed = attrs,
            }
        }
        let resp = if answer_first {
            self.decide_answer_first(nas, req.clone(), src)
        } else {
            self.app.connect(req.clone()).await
        };
        if !resp.allowed() {
            let code = resp.reason.map(Reason::as_str).unwrap_or("refused");
            return Self::reject(pkt, code, &resp.message, Vec::new());
        }
        let Some(id) = resp.session_id.clone() else {
            return Self::reject(pkt, "refused", "No session was recorded.", Vec::new());
        };
        let mut p = Packet::response_to(pkt, Code::AccessAccept);
        let push = resp.push.unwrap_or_default();
        // The upstream's own address and routes give way to the zone's where pforte has them.
        let ours = |k: u8| {
            (k == attr::FRAMED_IP_ADDRESS || k == attr::FRAMED_IP_NETMASK)
                && push.ifconfig.is_some()
                || k == attr::FRAMED_ROUTE && !push.routes.is_empty()
                || k == attr::SESSION_TIMEOUT && self.config.session_timeout_s.is_some()
        };
        p.attributes = passed.into_iter().filter(|a| !ours(a.kind)).collect();
        p.attributes.push(Attribute {
            kind: attr::CLASS,
            value: id.as_bytes().to_vec(),
        });
        if let Some(ifc) = &push.ifconfig
            && let IpAddr::V4(ip) = ifc.ip
        {
            p.add_ipv4(attr::FRAMED_IP_ADDRESS, ip);
            if let Ok(mask) = ifc.netmask.parse() {
                p.add_ipv4(attr::FRAMED_IP_NETMASK, mask);
            }
        }
        for r in &push.routes {
            if r.addr().is_ipv4() {
                let _ = p.add(attr::FRAMED_ROUTE, format!("{r} 0.0.0.0 1"));
            }
        }
        if let Some(t) = self.config.session_timeout_s {
            p.add_u32(attr::SESSION_TIMEOUT, t);
        }
        self.app
            .metrics
            .radius_accepts
            .with_label_values(&[&nas.config.name])
            .inc();
        lock(&self.pending).insert(
            id.clone(),
            Pending {
                deadline: Instant::now() + self.config.accounting_start_timeout,
                client: nas.config.name.clone(),
            },
        );
        lock(&self.nas_addr).insert(id, src);
        p
    }

    /// The live session an Accounting-Request names: by this NAS's `Acct-Session-Id`, else by
    /// a `Class` holding a session id of this NAS, else (a NAS that does not echo `Class`) the
    /// one session of this user at this NAS still waiting for its Start.
    fn find_session(&self, nas: &Nas, pkt: &Packet, acct_id: Option<&str>) -> Option<Session> {
        let sessions = &self.app.sessions;
        if let Some(key) = acct_id
            && let Some(s) = sessions.get(&Selector::Key {
                vpn: VPN.into(),
                instance: nas.config.name.clone(),
                session_key: key.to_string(),
            })
        {
            return Some(s);
        }
        let mine = |s: &Session| s.vpn == VPN && s.instance == nas.config.name;
        for class in pkt.get_all(attr::CLASS) {
            if let Some(id) = text(class)
                && let Some(s) = sessions.get(&Selector::Id(id.to_string()))
                && mine(&s)
            {
                return Some(s);
            }
        }
        let user = pkt.get(attr::USER_NAME).and_then(text)?;
        let waiting: Vec<String> = lock(&self.pending)
            .iter()
            .filter(|(_, p)| p.client == nas.config.name)
            .map(|(id, _)| id.clone())
            .collect();
        let mut found = waiting
            .iter()
            .filter_map(|id| sessions.get(&Selector::Id(id.clone())))
            .filter(|s| mine(s) && s.username == user);
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }

    async fn accounting(&self, nas: &Arc<Nas>, pkt: &Packet, src: IpAddr) -> Packet {
        let answer = Packet::response_to(pkt, Code::AccountingResponse);
        let status = pkt.get_u32(attr::ACCT_STATUS_TYPE).ok().flatten();
        let acct_id = pkt.get(attr::ACCT_SESSION_ID).and_then(text);
        match status {
            Some(acct_status::ACCOUNTING_ON | acct_status::ACCOUNTING_OFF) => {
                let why = if status == Some(acct_status::ACCOUNTING_ON) {
                    "NAS restarted (Accounting-On)"
                } else {
                    "NAS shut down (Accounting-Off)"
                };
                let mine: Vec<String> = self
                    .app
                    .sessions
                    .list()
                    .into_iter()
                    .filter(|s| s.vpn == VPN && s.instance == nas.config.name)
                    .map(|s| s.id)
                    .collect();
                for id in mine {
                    lock(&self.pending).remove(&id);
                    self.app.reap(&Selector::Id(id), why).await;
                }
            }
            Some(acct_status::START | acct_status::INTERIM_UPDATE | acct_status::STOP) => {
                let Some(s) = self.find_session(nas, pkt, acct_id) else {
                    if status == Some(acct_status::START) {
                        self.unrecorded_start(nas, pkt, acct_id, src);
                    } else {
                        tracing::info!(client = %nas.config.name, "accounting for an unknown session (ended already, or never admitted)");
                    }
                    return answer;
                };
                lock(&self.pending).remove(&s.id);
                if let Some(key) = acct_id
                    && s.session_key != key
                {
                    self.app.sessions.rekey(&s.id, key);
                }
                let octets = |lo: u8, hi: u8| -> Option<u64> {
                    let lo = pkt.get_u32(lo).ok().flatten()?;
                    let hi = pkt.get_u32(hi).ok().flatten().unwrap_or(0);
                    Some((u64::from(hi) << 32) | u64::from(lo))
                };
                let rx = octets(attr::ACCT_INPUT_OCTETS, attr::ACCT_INPUT_GIGAWORDS);
                let tx = octets(attr::ACCT_OUTPUT_OCTETS, attr::ACCT_OUTPUT_GIGAWORDS);
                if status == Some(acct_status::STOP) {
                    lock(&self.nas_addr).remove(&s.id);
                    let _ = self
                        .app
                        .disconnect(&DisconnectRequest {
                            session_id: s.id.clone(),
                            bytes_received: rx,
                            bytes_sent: tx,
                            ..DisconnectRequest::default()
                        })
                        .await;
                } else if rx.is_some() || tx.is_some() {
                    self.app.sessions.update_bytes(
                        &Selector::Id(s.id.clone()),
                        rx.unwrap_or(s.bytes_received),
                        tx.unwrap_or(s.bytes_sent),
                    );
                }
            }
            _ => {}
        }
        answer
    }

    /// An Accounting Start whose `Class` names a pforte session this node has no record of:
    /// one accepted just before a crash, whose commit never happened (see
    /// [`Server::decide_answer_first`]), or one pforte ended already. Either way pforte does not
    /// count it, so the NAS is asked to drop it; the client logs in again and is decided anew.
    /// Only with a store of this node alone: in a cluster another node may hold the session.
    fn unrecorded_start(&self, nas: &Arc<Nas>, pkt: &Packet, acct_id: Option<&str>, src: IpAddr) {
        let Some(id) = pkt
            .get_all(attr::CLASS)
            .filter_map(text)
            .find(|c| crate::sessions::is_session_id(c))
            .map(str::to_string)
        else {
            tracing::info!(client = %nas.config.name, "Accounting Start for an unknown session (ended already, or never admitted)");
            return;
        };
        if self.app.sessions.store().cluster().is_some() {
            tracing::info!(client = %nas.config.name, session = %id, "Accounting Start for a session this node does not hold");
            return;
        }
        self.app
            .metrics
            .radius_unrecorded_starts
            .with_label_values(&[&nas.config.name])
            .inc();
        tracing::warn!(client = %nas.config.name, session = %id, "Accounting Start for a session pforte has no record of; asking the NAS to drop it");
        let user = pkt
            .get(attr::USER_NAME)
            .and_then(text)
            .unwrap_or("")
            .to_string();
        let drop_it = self.nas_drop(nas, Some(src), &id, &user, acct_id.map(str::to_string));
        tokio::spawn(drop_it.send());
    }

    /// A Disconnect-Request for session `id` of `user`, to `nas` at `addr`.
    fn nas_drop(
        &self,
        nas: &Arc<Nas>,
        addr: Option<IpAddr>,
        id: &str,
        user: &str,
        acct: Option<String>,
    ) -> NasDrop {
        NasDrop {
            nas: nas.clone(),
            addr,
            id: id.to_string(),
            user: user.to_string(),
            acct,
            timeout: self.config.dae_timeout,
            app: self.app.clone(),
        }
    }

    /// Ends sessions whose Accounting Start did not come in time.
    async fn reap_overdue(&self) {
        let now = Instant::now();
        let overdue: Vec<(String, String)> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<String> = pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| pending.remove(&id).map(|p| (id, p.client)))
                .collect()
        };
        for (id, client) in overdue {
            // A kill, not a reap: the NAS may still carry the client, and a freed seat must mean
            // a dropped client, so a Disconnect-Request goes out where the NAS takes one.
            let killed = self
                .app
                .kill(
                    &Selector::Id(id.clone()),
                    "no Accounting Start from the NAS in time",
                )
                .await;
            if killed.is_some() {
                self.app
                    .metrics
                    .radius_start_timeouts
                    .with_label_values(&[&client])
                    .inc();
            }
        }
        // Forget NAS addresses of sessions that ended by other paths.
        let mut addrs = lock(&self.nas_addr);
        if addrs.len() > 1024 && addrs.len() > 2 * self.app.sessions.len() {
            let live: std::collections::HashSet<String> =
                self.app.sessions.list().into_iter().map(|s| s.id).collect();
            addrs.retain(|id, _| live.contains(id));
        }
    }

    async fn on_kill(self: &Arc<Self>, kill: KillRequest) {
        let s = kill.session;
        if s.vpn != VPN {
            return;
        }
        lock(&self.pending).remove(&s.id);
        let addr = lock(&self.nas_addr).remove(&s.id);
        let Some(nas) = self.clients.by_name(&s.instance).cloned() else {
            return;
        };
        let addr = addr.or(nas.config.dae_address);
        let drop_it = self.nas_drop(&nas, addr, &s.id, &s.username, acct_session_id(&s));
        tokio::spawn(drop_it.send());
    }
}

/// One socket's receive loop until shutdown.
async fn serve_socket(
    server: Arc<Server>,
    sock: Arc<UdpSocket>,
    port: Port,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
    loop {
        let (n, src) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "RADIUS receive failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Some((nas, pkt)) = server.admit_datagram(port, &buf[..n], src) else {
            continue;
        };
        let key = dedup::Key {
            src,
            code: u8::from(pkt.code),
            identifier: pkt.identifier,
            authenticator: pkt.authenticator,
        };
        let seen = lock(&server.dedup).check(key, Instant::now());
        match seen {
            Seen::New => {}
            Seen::InFlight => {
                server
                    .app
                    .metrics
                    .radius_duplicates
                    .with_label_values(&[&nas.config.name])
                    .inc();
                continue;
            }
            Seen::Answered(answer) => {
                server
                    .app
                    .metrics
                    .radius_duplicates
                    .with_label_values(&[&nas.config.name])
                    .inc();
                let _ = sock.send_to(&answer, src).await;
                continue;
            }
        }
        server
            .app
            .metrics
            .radius_requests
            .with_label_values(&[&nas.config.name, request_type(&pkt)])
            .inc();
        let answer_first = port == Port::Auth && server.answers_first();
        if answer_first && server.upstreams.is_empty() {
            // Nothing to wait for (no credential server, no commit before the answer):
            // decided, answered and cached right here, without a task or a thread hop.
            let answer = server.handle(&nas, &pkt, src, true).await;
            reply(&server, &sock, &nas, key, src, answer).await;
            continue;
        }
        let Ok(permit) = server.in_flight.clone().try_acquire_owned() else {
            server.dropped(&nas.config.name, "overload");
            lock(&server.dedup).answer(key, None);
            continue;
        };
        let server = server.clone();
        let sock = sock.clone();
        tokio::spawn(async move {
            let answer = server.handle(&nas, &pkt, src, answer_first).await;
            reply(&server, &sock, &nas, key, src, answer).await;
            drop(permit);
        });
    }
}

/// Sends an answer (none: the request is dropped) and keeps it for retransmissions.
async fn reply(
    server: &Server,
    sock: &UdpSocket,
    nas: &Nas,
    key: dedup::Key,
    src: SocketAddr,
    answer: Option<Vec<u8>>,
) {
    if let Some(a) = &answer
        && let Err(e) = sock.send_to(a, src).await
    {
        tracing::warn!(client = %nas.config.name, error = %e, "RADIUS answer not sent");
    }
    lock(&server.dedup).answer(key, answer);
}

async fn reaper(server: Arc<Server>, mut shutdown: watch::Receiver<bool>) {
    let every = (server.config.accounting_start_timeout / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => server.reap_overdue().await,
            _ = shutdown.changed() => return,
        }
    }
}

async fn kills(
    server: Arc<Server>,
    mut rx: broadcast::Receiver<KillRequest>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            k = rx.recv() => match k {
                Ok(k) => server.on_kill(k).await,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "RADIUS front missed kill requests; those NASes keep the clients until their own timeout");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Starts the RADIUS front on bound sockets: both receive loops, the Accounting-Start reaper and
/// the Disconnect-Request sender, all ending with `shutdown`.
pub fn spawn(
    config: RadiusConfig,
    sockets: Sockets,
    app: Arc<App>,
    tasks: &mut JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) {
    let kill_rx = app.sessions.subscribe_kills();
    let server = match Server::new(app, config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "RADIUS front not started");
            return;
        }
    };
    tracing::info!(
        auth = ?sockets.auth.local_addr().ok(),
        acct = ?sockets.acct.local_addr().ok(),
        clients = server.clients.all().len(),
        upstreams = server.config.upstreams.len(),
        "RADIUS front listening"
    );
    tasks.spawn(serve_socket(
        server.clone(),
        Arc::new(sockets.auth),
        Port::Auth,
        shutdown.clone(),
    ));
    tasks.spawn(serve_socket(
        server.clone(),
        Arc::new(sockets.acct),
        Port::Acct,
        shutdown.clone(),
    ));
    tasks.spawn(reaper(server.clone(), shutdown.clone()));
    tasks.spawn(kills(server, kill_rx, shutdown.clone()));
}

/// The connect request an Access-Request would make (for `pforte check`-like tools and tests).
pub fn preview(nas: &Nas, pkt: &Packet, config: &RadiusConfig) -> ConnectRequest {
    profile::connect_request(nas, pkt, config.missing_device, String::new())
}
