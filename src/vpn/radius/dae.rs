//! Dynamic authorisation (RFC 5176): ending a session at its NAS. When a RADIUS session is
//! killed (revoked device, `DELETE /v1/sessions/{id}`, the operator CLI), pforte sends a
//! Disconnect-Request to the NAS's DAE port naming the session by `Acct-Session-Id` and
//! `User-Name`, waits for the ACK or NAK, sends it once more if none came, and counts the result.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::metrics::Metrics;

use super::attr;
use super::auth;
use super::clients::Nas;
use super::packet::{Code, MAX_PACKET_LEN, Packet};
use super::upstream::random16;

/// How a Disconnect-Request ended (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Result {
    /// Disconnect-ACK.
    Ack,
    /// Disconnect-NAK.
    Nak,
    /// No answer after the retry.
    Timeout,
    /// Could not be sent.
    Error,
    /// The client has no DAE port or address.
    NoDae,
}

impl Result {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Result::Ack => "ack",
            Result::Nak => "nak",
            Result::Timeout => "timeout",
            Result::Error => "error",
            Result::NoDae => "no_dae",
        }
    }
}

/// The Disconnect-Request for a session (unsigned).
fn request(username: &str, acct_session_id: Option<&str>) -> Packet {
    let rnd = random16();
    let mut p = Packet::new(Code::DisconnectRequest, rnd[0], [0; 16]);
    let cut = |s: &str| s.as_bytes()[..s.len().min(attr::MAX_VALUE_LEN)].to_vec();
    if let Some(id) = acct_session_id {
        p.attributes.push(super::packet::Attribute {
            kind: attr::ACCT_SESSION_ID,
            value: cut(id),
        });
    }
    if !username.is_empty() {
        p.attributes.push(super::packet::Attribute {
            kind: attr::USER_NAME,
            value: cut(username),
        });
    }
    // The Message-Authenticator (RFC 5176 3.1), filled in when signed.
    p.attributes.push(super::packet::Attribute {
        kind: attr::MESSAGE_AUTHENTICATOR,
        value: vec![0; 16],
    });
    p
}

/// Sends the Disconnect-Request for session `id` (named in the log) of `username` to `nas` at
/// `addr`; waits `timeout`, retries once. Logs and counts the result.
pub async fn disconnect(
    nas: &Nas,
    addr: Option<IpAddr>,
    (id, username): (&str, &str),
    acct_session_id: Option<&str>,
    timeout: Duration,
    metrics: &Metrics,
) -> Result {
    let result = match addr.filter(|_| nas.config.dae_port != 0) {
        None => Result::NoDae,
        Some(ip) => send(
            nas,
            SocketAddr::new(ip, nas.config.dae_port),
            username,
            acct_session_id,
            timeout,
        )
        .await
        .unwrap_or(Result::Error),
    };
    metrics
        .radius_disconnects
        .with_label_values(&[&nas.config.name, result.as_str()])
        .inc();
    match result {
        Result::Ack => {
            tracing::info!(client = %nas.config.name, session = %id, "NAS acknowledged the Disconnect-Request")
        }
        other => {
            tracing::warn!(client = %nas.config.name, session = %id, result = other.as_str(), "Disconnect-Request not acknowledged")
        }
    }
    result
}

async fn send(
    nas: &Nas,
    to: SocketAddr,
    username: &str,
    acct_session_id: Option<&str>,
    timeout: Duration,
) -> std::io::Result<Result> {
    let mut req = request(username, acct_session_id);
    let wire = auth::finalize_request(&mut req, &nas.secret)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let bind: SocketAddr = if to.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(to).await?;
    let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
    for _attempt in 0..2 {
        sock.send(&wire).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        // Bounded by the deadline: each pass reads one datagram.
        loop {
            let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Err(_)) => break,
                Ok(Ok(n)) => n,
            };
            let Ok(resp) = Packet::decode(&buf[..n]) else {
                continue;
            };
            if resp.identifier != req.identifier
                || auth::verify_response(&resp, &req.authenticator, &nas.secret).is_err()
            {
                continue;
            }
            match resp.code {
                Code::DisconnectAck => return Ok(Result::Ack),
                Code::DisconnectNak => return Ok(Result::Nak),
                _ => continue,
            }
        }
    }
    Ok(Result::Timeout)
}
