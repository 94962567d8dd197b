//! The OpenVPN management-interface client, one per `[[openvpn]]` entry with `management`:
//! live byte counters (`bytecount`), reconciliation (`status 3` at connect and periodically),
//! `client-kill` for revoked devices and operator kills, decisions over
//! `management-client-auth`, and a pass-through socket for operators' own tools (OpenVPN serves
//! one management client at a time, and that is pforte).
//!
//! Session keys: the script hook keys a session `ip:port@time_unix` (both client-connect and
//! client-disconnect carry the connect time); a decision taken here keys it `ip:port#cid`. A
//! `status 3` row carries the real address, the connect time and the client id, so it matches
//! either. After an OpenVPN restart (client ids start again at 0) the reconnecting clients come
//! in as new sessions and the old ones, gone from `status`, are reaped: nothing is lost, nothing
//! counted twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::app::App;
use crate::config::OpenvpnInstance;
use crate::session::{KillRequest, Selector};
use crate::state::unix_now;
use crate::vpn::openvpn::management::{
    ClientEvent, ClientEventKind, Event, MAX_LINE, Parser, StatusClient, ends_reply, parse_status,
    quote,
};
use crate::vpn::openvpn::{self, HookSettings};
use crate::wire::DisconnectRequest;

/// Clients pforte does not know are sent back through the gate (`client-kill`, which restarts
/// them) once they are this old, so half-finished handshakes are left alone.
const UNKNOWN_GRACE_S: i64 = 30;
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The timeout of the `client-pending-auth` that wakes a client after its decision
/// ([`wake_command`]): OpenVPN's default `hand-window`, so nothing changes for the client.
const WAKE_TIMEOUT_S: u32 = 60;

/// A command from the pass-through socket and where its reply goes.
type PassRequest = (String, oneshot::Sender<Vec<String>>);

/// The key a decision over the management interface gives a session.
pub fn auth_key(real: &str, cid: u64) -> String {
    format!("{real}#{cid}")
}

/// The key the script hook gives a session (see [`openvpn::session_key`]).
pub fn script_key(real: &str, since: i64) -> String {
    format!("{real}@{since}")
}

enum Ended {
    Shutdown,
    Lost(String),
}

/// Runs the client for one instance until shutdown, reconnecting with backoff.
pub async fn run(inst: OpenvpnInstance, app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let Some(path) = inst.management.clone() else {
        return;
    };
    let (pass_tx, mut pass_rx) = mpsc::channel::<PassRequest>(64);
    if let Some(p) = &inst.passthrough {
        match crate::net::bind_unix(p, 0o660) {
            Ok(listener) => {
                tokio::spawn(passthrough(listener, pass_tx.clone(), shutdown.clone()));
            }
            Err(e) => {
                tracing::error!(instance = %inst.instance, error = %e, "pass-through socket not available")
            }
        }
    }
    drop(pass_tx);
    let mut kills = app.sessions.subscribe_kills();
    let gauge = app
        .metrics
        .openvpn_management_connected
        .with_label_values(&[&inst.instance]);
    gauge.set(0);
    app.metrics
        .sessions_reaped
        .with_label_values(&[&inst.instance]);
    let mut backoff = Duration::from_millis(250);
    let mut failures = 0u32;
    loop {
        match UnixStream::connect(&path).await {
            Ok(stream) => {
                tracing::info!(instance = %inst.instance, socket = %path.display(), "connected to the OpenVPN management interface");
                gauge.set(1);
                failures = 0;
                let started = Instant::now();
                let mut conn = Conn::new(&inst, &app, stream);
                let ended = conn.run(&mut kills, &mut pass_rx, &mut shutdown).await;
                gauge.set(0);
                match ended {
                    Ended::Shutdown => return,
                    Ended::Lost(why) => {
                        tracing::warn!(instance = %inst.instance, why, "OpenVPN management connection lost; reconnecting");
                    }
                }
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(250);
                }
            }
            Err(e) => {
                failures += 1;
                // Log the first failure and then every tenth, not every attempt.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(instance = %inst.instance, socket = %path.display(), error = %e, attempts = failures, "cannot reach the OpenVPN management interface");
                }
            }
        }
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = shutdown.changed() => return,
                Some((_, reply)) = pass_rx.recv() => {
                    let _ = reply.send(vec!["ERROR: pforte is not connected to OpenVPN's management interface".into()]);
                }
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

enum Pending {
    Status,
    Quiet(&'static str),
    Pass(oneshot::Sender<Vec<String>>),
}

struct Conn<'a> {
    inst: &'a OpenvpnInstance,
    app: &'a Arc<App>,
    settings: HookSettings,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    parser: Parser,
    pending: VecDeque<(Pending, Vec<String>)>,
    cid_key: HashMap<u64, String>,
    key_cid: HashMap<String, u64>,
}

impl<'a> Conn<'a> {
    fn new(inst: &'a OpenvpnInstance, app: &'a Arc<App>, stream: UnixStream) -> Conn<'a> {
        let (r, w) = stream.into_split();
        Conn {
            inst,
            app,
            settings: HookSettings {
                instance: inst.instance.clone(),
                zone: inst.zone.clone(),
            },
            reader: BufReader::new(r),
            writer: w,
            parser: Parser::new(),
            pending: VecDeque::new(),
            cid_key: HashMap::new(),
            key_cid: HashMap::new(),
        }
    }

    async fn send(&mut self, cmd: &str, kind: Pending) -> std::io::Result<()> {
        let mut text = cmd.to_string();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        self.writer.write_all(text.as_bytes()).await?;
        self.pending.push_back((kind, Vec::new()));
        Ok(())
    }

    fn remember(&mut self, cid: u64, key: String) {
        if let Some(old) = self.cid_key.insert(cid, key.clone()) {
            self.key_cid.remove(&old);
        }
        self.key_cid.insert(key, cid);
    }

    fn forget(&mut self, cid: u64) -> Option<String> {
        let key = self.cid_key.remove(&cid)?;
        self.key_cid.remove(&key);
        Some(key)
    }

    fn selector(&self, key: &str) -> Selector {
        Selector::Key {
            vpn: "openvpn".into(),
            instance: self.inst.instance.clone(),
            session_key: key.to_string(),
        }
    }

    async fn run(
        &mut self,
        kills: &mut broadcast::Receiver<KillRequest>,
        pass: &mut mpsc::Receiver<PassRequest>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Ended {
        let setup = format!(
            "bytecount {}\n",
            self.inst.bytecount_interval.as_secs().max(1)
        );
        if let Err(e) = self.send(&setup, Pending::Quiet("bytecount")).await {
            return Ended::Lost(e.to_string());
        }
        if let Err(e) = self.send("status 3", Pending::Status).await {
            return Ended::Lost(e.to_string());
        }
        let mut tick = tokio::time::interval(self.inst.status_interval);
        tick.tick().await;
        let mut line = Vec::with_capacity(256);
        loop {
            let result = tokio::select! {
                r = read_line(&mut self.reader, &mut line) => match r {
                    Ok(0) => return Ended::Lost("end of stream".into()),
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line).into_owned();
                        self.on_line(&text).await
                    }
                    Err(e) => return Ended::Lost(e.to_string()),
                },
                k = kills.recv() => match k {
                    Ok(k) => self.on_kill(&k).await,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "kill requests missed; reconciling");
                        self.send("status 3", Pending::Status).await
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ended::Shutdown,
                },
                Some((cmd, reply)) = pass.recv() => self.send(&cmd, Pending::Pass(reply)).await,
                _ = tick.tick() => self.send("status 3", Pending::Status).await,
                _ = shutdown.changed() => return Ended::Shutdown,
            };
            if let Err(e) = result {
                return Ended::Lost(e.to_string());
            }
        }
    }

    async fn on_line(&mut self, line: &str) -> std::io::Result<()> {
        match self.parser.feed(line) {
            None => Ok(()),
            Some(Event::Reply(text)) => {
                let done = ends_reply(&text);
                if let Some((_, lines)) = self.pending.front_mut() {
                    lines.push(text);
                } else {
                    tracing::debug!(line = %text, "management reply with no command waiting");
                }
                if done && let Some((kind, lines)) = self.pending.pop_front() {
                    self.on_reply(kind, lines).await?;
                }
                Ok(())
            }
            Some(Event::Client(ev)) => self.on_client(ev).await,
            Some(Event::ByteCount {
                cid,
                received,
                sent,
            }) => {
                if let Some(key) = self.cid_key.get(&cid).cloned() {
                    self.app
                        .sessions
                        .update_bytes(&self.selector(&key), received, sent);
                }
                Ok(())
            }
            Some(Event::Hold) => {
                self.send("hold release", Pending::Quiet("hold release"))
                    .await
            }
            Some(Event::Info(_)) | Some(Event::Other(_)) => Ok(()),
        }
    }

    async fn on_reply(&mut self, kind: Pending, lines: Vec<String>) -> std::io::Result<()> {
        match kind {
            Pending::Status => self.reconcile(&parse_status(&lines)).await,
            Pending::Quiet(what) => {
                if let Some(err) = lines.iter().find(|l| l.starts_with("ERROR:")) {
                    tracing::warn!(command = what, reply = %err, "OpenVPN refused a management command");
                }
                Ok(())
            }
            Pending::Pass(reply) => {
                let _ = reply.send(lines);
                Ok(())
            }
        }
    }

    async fn on_client(&mut self, ev: ClientEvent) -> std::io::Result<()> {
        let real = openvpn::remote_addr(&ev.env);
        match ev.kind {
            ClientEventKind::Connect if self.inst.client_auth => self.decide(&ev, &real).await,
            ClientEventKind::Reauth if self.inst.client_auth => {
                let key = auth_key(&real, ev.cid);
                if self.app.sessions.get(&self.selector(&key)).is_none() {
                    return self.decide(&ev, &real).await;
                }
                // A TLS renegotiation: the session stays if the device still passes.
                let req = openvpn::connect_request(&ev.env, &self.settings);
                let verdict = self.app.verify(req);
                let kid = ev.kid.unwrap_or(0);
                if verdict.allowed() {
                    self.send(
                        &format!("client-auth-nt {} {kid}", ev.cid),
                        Pending::Quiet("client-auth-nt"),
                    )
                    .await
                } else {
                    self.app
                        .reap(&self.selector(&key), "refused at renegotiation")
                        .await;
                    self.forget(ev.cid);
                    self.deny(ev.cid, kid, &verdict).await
                }
            }
            ClientEventKind::Established => {
                let auth = auth_key(&real, ev.cid);
                let key = if self.app.sessions.get(&self.selector(&auth)).is_some() {
                    auth
                } else {
                    openvpn::session_key(&ev.env)
                };
                self.remember(ev.cid, key);
                Ok(())
            }
            ClientEventKind::Disconnect => {
                let key = self
                    .forget(ev.cid)
                    .unwrap_or_else(|| auth_key(&real, ev.cid));
                if self.inst.client_auth {
                    let req = DisconnectRequest {
                        vpn: "openvpn".into(),
                        instance: self.inst.instance.clone(),
                        session_key: key,
                        bytes_received: ev.env.get("bytes_received").and_then(|v| v.parse().ok()),
                        bytes_sent: ev.env.get("bytes_sent").and_then(|v| v.parse().ok()),
                        ..Default::default()
                    };
                    if let Err(e) = self.app.disconnect(&req).await {
                        tracing::warn!(error = %e, "disconnect from the management interface not recorded");
                    }
                }
                Ok(())
            }
            ClientEventKind::Connect | ClientEventKind::Reauth => Ok(()),
        }
    }

    /// Answers a `>CLIENT:CONNECT` (or the `>CLIENT:REAUTH` of a client pforte has no session
    /// for) with `client-auth` and the pushed config, or `client-deny`. The `client-auth` of a
    /// new connection goes out together with [`wake_command`], so OpenVPN pushes the config at
    /// once.
    async fn decide(&mut self, ev: &ClientEvent, real: &str) -> std::io::Result<()> {
        let mut req = openvpn::connect_request(&ev.env, &self.settings);
        let key = auth_key(real, ev.cid);
        req.session_key = key.clone();
        let kid = ev.kid.unwrap_or(0);
        // The answer goes out before the session's commit: OpenVPN's window for a fast
        // `client-auth` is well under a millisecond after `>CLIENT:CONNECT`. Crash-safe here
        // (not for the script hook): a session lost before its commit is one OpenVPN still
        // has, which reconciliation adopts or ends at the next start.
        let (resp, pending) = self.app.connect_answer_first(req);
        if resp.allowed() {
            self.remember(ev.cid, key);
            let mut cmd = format!("client-auth {} {kid}\n", ev.cid);
            if let Some(push) = &resp.push {
                cmd.push_str(&openvpn::dynamic_config(push));
            }
            cmd.push_str("END\n");
            if ev.kind == ClientEventKind::Connect {
                self.send_all(vec![
                    (cmd, Pending::Quiet("client-auth")),
                    (
                        wake_command(ev.cid, kid),
                        Pending::Quiet("client-pending-auth (wake-up after client-auth)"),
                    ),
                ])
                .await?;
            } else {
                self.send(&cmd, Pending::Quiet("client-auth")).await?;
            }
            if let Some(pending) = pending
                && !self.app.persist(pending).await
            {
                // The store refused the session (fail mode closed): it is out of the table;
                // end the client that was let in.
                tracing::warn!(instance = %self.inst.instance, cid = ev.cid, "session not recorded; ending the client");
                self.forget(ev.cid);
                self.send(
                    &format!("client-kill {} HALT", ev.cid),
                    Pending::Quiet("client-kill"),
                )
                .await?;
            }
            Ok(())
        } else {
            self.deny(ev.cid, kid, &resp).await
        }
    }

    /// Sends several commands in one write, so OpenVPN reads them together (it reads its
    /// management socket 256 bytes at a time and acts on every complete line it has).
    async fn send_all(&mut self, cmds: Vec<(String, Pending)>) -> std::io::Result<()> {
        let mut text = String::new();
        for (cmd, _) in &cmds {
            text.push_str(cmd);
            if !cmd.ends_with('\n') {
                text.push('\n');
            }
        }
        self.writer.write_all(text.as_bytes()).await?;
        for (_, kind) in cmds {
            self.pending.push_back((kind, Vec::new()));
        }
        Ok(())
    }

    /// Refuses a client with `client-deny`: the log reason for OpenVPN's log, the client reason
    /// for its `AUTH_FAILED` message.
    async fn deny(
        &mut self,
        cid: u64,
        kid: u64,
        resp: &crate::wire::ConnectResponse,
    ) -> std::io::Result<()> {
        let reason = resp.reason.map(|r| r.as_str()).unwrap_or("refused");
        let cmd = format!(
            "client-deny {cid} {kid} {} {}",
            quote(&format!("pforte: {reason}: {}", resp.message)),
            quote(&format!("{reason}: {}", resp.message))
        );
        self.send(&cmd, Pending::Quiet("client-deny")).await
    }

    async fn on_kill(&mut self, k: &KillRequest) -> std::io::Result<()> {
        let s = &k.session;
        if s.vpn != "openvpn" || s.instance != self.inst.instance {
            return Ok(());
        }
        match self.key_cid.get(&s.session_key).copied() {
            Some(cid) => {
                tracing::info!(instance = %self.inst.instance, cid, why = %k.why, "client-kill");
                self.forget(cid);
                self.send(
                    &format!("client-kill {cid} HALT"),
                    Pending::Quiet("client-kill"),
                )
                .await
            }
            None => {
                tracing::warn!(instance = %self.inst.instance, why = %k.why, "killed session has no known OpenVPN client id; reconciling");
                self.send("status 3", Pending::Status).await
            }
        }
    }

    /// Matches pforte's sessions of this instance against OpenVPN's client list: sessions
    /// OpenVPN no longer has are reaped; clients pforte does not know are sent back through
    /// the gate.
    async fn reconcile(&mut self, rows: &[StatusClient]) -> std::io::Result<()> {
        let now = unix_now();
        let mut live: HashSet<String> = HashSet::new();
        let mut unknown = Vec::new();
        let mut mapped: Vec<(u64, String)> = Vec::new();
        for row in rows {
            let by_auth = auth_key(&row.real_address, row.client_id);
            let by_script = script_key(&row.real_address, row.connected_since);
            live.insert(by_auth.clone());
            live.insert(by_script.clone());
            if self.app.sessions.get(&self.selector(&by_auth)).is_some() {
                mapped.push((row.client_id, by_auth));
            } else if self.app.sessions.get(&self.selector(&by_script)).is_some() {
                mapped.push((row.client_id, by_script));
            } else {
                unknown.push(row);
            }
        }
        for (cid, key) in mapped {
            self.remember(cid, key);
        }
        let reaped = self
            .app
            .reap_missing(
                "openvpn",
                &self.inst.instance,
                &live,
                "gone from OpenVPN's client list",
            )
            .await;
        for key in reaped {
            if let Some(cid) = self.key_cid.remove(&key) {
                self.cid_key.remove(&cid);
            }
        }
        for row in unknown {
            if row.connected_since > 0 && now - row.connected_since >= UNKNOWN_GRACE_S {
                tracing::warn!(instance = %self.inst.instance, cid = row.client_id, "client without a pforte session; sending it back through the gate");
                self.send(
                    &format!("client-kill {}", row.client_id),
                    Pending::Quiet("client-kill"),
                )
                .await?;
            }
        }
        Ok(())
    }
}

/// The command that follows the `client-auth` of a new connection, so that OpenVPN acts on it
/// now and not up to a second later.
///
/// OpenVPN 2.6 (`management_client_auth` in multi.c) records a `client-auth` without
/// scheduling the client's instance again. The instance next runs when a packet from the client
/// arrives or its own timer fires: an answer that arrives before the server has finished the
/// client's TLS handshake is acted on with the handshake's last packet; one that arrives after
/// (the window is well under a millisecond on a fast link) waits for the instance's one-second
/// timer or the client's first PUSH_REQUEST, so such connects took 1.0–1.2 s instead of ~20 ms.
/// `client-pending-auth` is the only management command besides `client-kill` that reschedules
/// the instance (`reschedule_multi_process` and `multi_schedule_context_wakeup` in
/// `management_client_pending_auth`): right after the `client-auth`, it makes the instance run
/// in the next event-loop round, find the decision (`tls_authentication_status`) and push the
/// configuration at once.
///
/// The client sees `AUTH_PENDING,timeout 60` and an empty `INFO_PRE` just before its
/// `PUSH_REPLY` (2.6 clients log them and carry on; the timeout, [`WAKE_TIMEOUT_S`], is the
/// default `hand-window`). A `client-deny` is not followed by a wake-up: an OpenVPN 2.6 client
/// reads one control message per pass of its event loop, and a refusal that beat the handshake
/// would then reach it as the third message of one packet, read only at its next timer (a
/// second later) instead of at once. A renegotiation (`>CLIENT:REAUTH`) is not woken either:
/// the client is connected and its traffic runs the instance anyway.
fn wake_command(cid: u64, kid: u64) -> String {
    format!("client-pending-auth {cid} {kid} \"\" {WAKE_TIMEOUT_S}")
}

/// Reads one line, at most [`MAX_LINE`] bytes of it; the rest of a longer line is skipped.
async fn read_line(r: &mut BufReader<OwnedReadHalf>, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    buf.clear();
    let n = (&mut *r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', buf)
        .await?;
    if n == MAX_LINE && buf.last() != Some(&b'\n') {
        let mut skip = Vec::new();
        loop {
            skip.clear();
            let m = (&mut *r)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut skip)
                .await?;
            if m == 0 || skip.last() == Some(&b'\n') {
                break;
            }
        }
    }
    Ok(n)
}

/// Commands the pass-through refuses: pforte owns decisions and the byte-count interval.
fn refused_through_passthrough(cmd: &str) -> bool {
    let word = cmd
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    matches!(
        word.as_str(),
        "client-auth" | "client-auth-nt" | "client-deny" | "client-pending-auth" | "bytecount"
    )
}

async fn passthrough(
    listener: tokio::net::UnixListener,
    tx: mpsc::Sender<PassRequest>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(%e, "pass-through accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = passthrough_conn(stream, tx).await {
                tracing::debug!(%e, "pass-through client ended");
            }
        });
    }
}

async fn passthrough_conn(
    stream: UnixStream,
    tx: mpsc::Sender<PassRequest>,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    w.write_all(b">INFO:OpenVPN Management Interface Version 5 (via pforte pass-through) -- type 'help' for more info\r\n")
        .await?;
    let mut line = Vec::new();
    loop {
        if read_line(&mut reader, &mut line).await? == 0 {
            return Ok(());
        }
        let cmd = String::from_utf8_lossy(&line).trim().to_string();
        if cmd.is_empty() {
            continue;
        }
        if cmd == "quit" || cmd == "exit" {
            return Ok(());
        }
        let reply = if refused_through_passthrough(&cmd) {
            vec!["ERROR: pforte owns this command; not passed through".to_string()]
        } else {
            let (otx, orx) = oneshot::channel();
            if tx.send((cmd, otx)).await.is_err() {
                return Ok(());
            }
            match tokio::time::timeout(Duration::from_secs(10), orx).await {
                Ok(Ok(lines)) => lines,
                _ => vec!["ERROR: no reply from OpenVPN".to_string()],
            }
        };
        let mut out = reply.join("\r\n");
        out.push_str("\r\n");
        w.write_all(out.as_bytes()).await?;
    }
}
