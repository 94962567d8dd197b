//! Proxying Access-Requests to upstream credential servers (RFC 2865 2.3): a new Identifier and
//! Request Authenticator, `User-Password` re-hidden with the upstream's secret, `CHAP-Challenge`
//! made explicit, a `Proxy-State` of pforte's own added and stripped from the answer, `State` and
//! `EAP-Message` passed through both ways, `MS-MPPE-*-Key` re-encrypted for the NAS. Upstreams are
//! tried in order; one that does not answer in time is counted and the next one tried.

use std::net::SocketAddr;
use std::time::Instant;

use md5::{Digest, Md5};
use tokio::net::UdpSocket;

use crate::config::RadiusUpstream;
use crate::metrics::Metrics;

use super::attr;
use super::auth::{self, Secret};
use super::packet::{Attribute, Code, MAX_PACKET_LEN, Packet};

/// CHAP-Challenge (RFC 2865 5.40).
const CHAP_CHALLENGE: u8 = 60;
/// Microsoft's vendor id and its MPPE key attributes (RFC 2548 2.4.2, 2.4.3).
const MICROSOFT: u32 = 311;
const MPPE_SEND_KEY: u8 = 16;
const MPPE_RECV_KEY: u8 = 17;

/// An upstream with its secret in the codec's form.
#[derive(Debug)]
pub struct Upstream {
    /// The config entry.
    pub config: RadiusUpstream,
    secret: Secret,
}

/// What the upstreams said.
#[derive(Debug)]
pub enum Outcome {
    /// Accepted; the attributes to pass on (pforte's Proxy-State and Message-Authenticator
    /// removed, MPPE keys re-encrypted).
    Accept(Vec<Attribute>),
    /// Rejected, with the attributes to pass on.
    Reject(Vec<Attribute>),
    /// Another round (EAP), with the attributes to pass on.
    Challenge(Vec<Attribute>),
    /// None answered in time.
    Unavailable,
}

/// Sixteen unpredictable octets (the v4 UUID's 122 random bits plus fixed ones).
pub fn random16() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

/// The upstreams, in order.
#[derive(Debug, Default)]
pub struct Upstreams {
    list: Vec<Upstream>,
}

impl Upstreams {
    /// From the config.
    pub fn new(config: &[RadiusUpstream]) -> Result<Upstreams, String> {
        let mut list = Vec::new();
        for u in config {
            let secret = Secret::new(u.secret.expose())
                .map_err(|e| format!("radius upstream {}: {e}", u.name))?;
            list.push(Upstream {
                config: u.clone(),
                secret,
            });
        }
        Ok(Upstreams { list })
    }

    /// Whether any upstream is configured.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Forwards `request` (verified, from a NAS with `nas_secret`) to each upstream in turn
    /// until one answers.
    pub async fn forward(
        &self,
        request: &Packet,
        nas_secret: &Secret,
        metrics: &Metrics,
    ) -> Outcome {
        for up in &self.list {
            let started = Instant::now();
            match exchange(up, request, nas_secret).await {
                Ok(outcome) => {
                    metrics
                        .radius_upstream_rtt
                        .with_label_values(&[&up.config.name])
                        .observe(started.elapsed().as_secs_f64());
                    return outcome;
                }
                Err(why) => {
                    metrics
                        .radius_upstream_timeouts
                        .with_label_values(&[&up.config.name])
                        .inc();
                    tracing::warn!(upstream = %up.config.name, why, "upstream credential server did not answer; trying the next");
                }
            }
        }
        Outcome::Unavailable
    }
}

fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Decrypts an MS-MPPE key value (salt, then the encrypted string) to its key.
fn mppe_decrypt(value: &[u8], secret: &Secret, req_auth: &[u8; 16]) -> Option<Vec<u8>> {
    let (salt, c) = value.split_at_checked(2)?;
    if c.is_empty() || !c.len().is_multiple_of(16) {
        return None;
    }
    let mut p = Vec::with_capacity(c.len());
    let mut b = md5(&[secret.as_bytes(), req_auth, salt]);
    for block in c.chunks_exact(16) {
        p.extend(block.iter().zip(b).map(|(x, y)| x ^ y));
        b = md5(&[secret.as_bytes(), block]);
    }
    let len = usize::from(*p.first()?);
    p.get(1..1 + len).map(<[u8]>::to_vec)
}

/// Encrypts a key as an MS-MPPE key value with a fresh salt.
fn mppe_encrypt(key: &[u8], secret: &Secret, req_auth: &[u8; 16]) -> Option<Vec<u8>> {
    let mut p = Vec::with_capacity(key.len() + 16);
    p.push(u8::try_from(key.len()).ok()?);
    p.extend_from_slice(key);
    p.resize(p.len().div_ceil(16) * 16, 0);
    let r = random16();
    let salt = [r[0] | 0x80, r[1]];
    let mut out = salt.to_vec();
    let mut b = md5(&[secret.as_bytes(), req_auth, &salt]);
    for block in p.chunks_exact(16) {
        let c: Vec<u8> = block.iter().zip(b).map(|(x, y)| x ^ y).collect();
        b = md5(&[secret.as_bytes(), &c]);
        out.extend_from_slice(&c);
    }
    Some(out)
}

/// Rewrites the MPPE keys of an upstream answer for the NAS: decrypted with the upstream's
/// secret and the proxied request's authenticator, encrypted with the NAS's secret and its
/// request's. A key that cannot be read is dropped.
pub fn reencrypt_mppe(
    attrs: Vec<Attribute>,
    from: (&Secret, &[u8; 16]),
    to: (&Secret, &[u8; 16]),
) -> Vec<Attribute> {
    attrs
        .into_iter()
        .filter_map(|a| {
            if a.kind != attr::VENDOR_SPECIFIC {
                return Some(a);
            }
            let Ok(subs) = attr::parse_vsa(&a.value) else {
                return Some(a);
            };
            let [sub] = subs.as_slice() else {
                return Some(a);
            };
            if sub.vendor_id != MICROSOFT
                || !matches!(sub.vendor_type, MPPE_SEND_KEY | MPPE_RECV_KEY)
            {
                return Some(a);
            }
            let key = mppe_decrypt(sub.value, from.0, from.1)?;
            let value = mppe_encrypt(&key, to.0, to.1)?;
            let vsa = attr::build_vsa(MICROSOFT, &[(sub.vendor_type, &value)]).ok()?;
            Some(Attribute {
                kind: attr::VENDOR_SPECIFIC,
                value: vsa,
            })
        })
        .collect()
}

/// One request to one upstream: the outcome, or why there is none (timeout, I/O).
async fn exchange(up: &Upstream, request: &Packet, nas_secret: &Secret) -> Result<Outcome, String> {
    let rnd = random16();
    let mut proxied = Packet::new(Code::AccessRequest, rnd[0], random16());
    let mut has_challenge = false;
    for a in &request.attributes {
        match a.kind {
            attr::MESSAGE_AUTHENTICATOR => {}
            attr::USER_PASSWORD => {
                let clear = auth::unhide_password(&a.value, &request.authenticator, nas_secret)
                    .map_err(|e| e.to_string())?;
                let hidden = auth::hide_password(&clear, &proxied.authenticator, &up.secret)
                    .map_err(|e| e.to_string())?;
                proxied.attributes.push(Attribute {
                    kind: attr::USER_PASSWORD,
                    value: hidden,
                });
            }
            CHAP_CHALLENGE => {
                has_challenge = true;
                proxied.attributes.push(a.clone());
            }
            _ => proxied.attributes.push(a.clone()),
        }
    }
    if request.get(attr::CHAP_PASSWORD).is_some() && !has_challenge {
        // The NAS's authenticator was the challenge; the new one is not.
        proxied
            .add(CHAP_CHALLENGE, request.authenticator.to_vec())
            .map_err(|e| e.to_string())?;
    }
    let state: Vec<u8> = rnd[1..9].to_vec();
    proxied
        .add(attr::PROXY_STATE, state.clone())
        .map_err(|e| e.to_string())?;
    let wire = auth::finalize_request(&mut proxied, &up.secret).map_err(|e| e.to_string())?;
    let bind: SocketAddr = if up.config.address.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|_| "bind".to_string())?
    } else {
        "[::]:0".parse().map_err(|_| "bind".to_string())?
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(up.config.address)
        .await
        .map_err(|e| e.to_string())?;
    sock.send(&wire).await.map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + up.config.timeout;
    let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
    // Bounded: each pass waits for one datagram, and the deadline ends the loop.
    loop {
        let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Err(_) => return Err(format!("no answer in {:?}", up.config.timeout)),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(n)) => n,
        };
        let Ok(resp) = Packet::decode(&buf[..n]) else {
            continue;
        };
        let verified = if resp.get(attr::MESSAGE_AUTHENTICATOR).is_some()
            || up.config.require_message_authenticator
        {
            auth::verify_response(&resp, &proxied.authenticator, &up.secret)
        } else {
            // An upstream allowed (by config) to answer without Message-Authenticator, as
            // FreeRADIUS before 3.2.5 does for PAP: the Response Authenticator alone.
            auth::verify_response_authenticator(&resp, &proxied.authenticator, &up.secret)
        };
        if resp.identifier != proxied.identifier || verified.is_err() {
            continue;
        }
        // Our Proxy-State must come back (RFC 2865 5.33); strip the last one that is ours.
        let ours = resp
            .attributes
            .iter()
            .rposition(|a| a.kind == attr::PROXY_STATE && a.value == state);
        let attrs: Vec<Attribute> = resp
            .attributes
            .iter()
            .enumerate()
            .filter(|(i, a)| Some(*i) != ours && a.kind != attr::MESSAGE_AUTHENTICATOR)
            .map(|(_, a)| a.clone())
            .collect();
        let attrs = reencrypt_mppe(
            attrs,
            (&up.secret, &proxied.authenticator),
            (nas_secret, &request.authenticator),
        );
        return Ok(match resp.code {
            Code::AccessAccept => Outcome::Accept(attrs),
            Code::AccessChallenge => Outcome::Challenge(attrs),
            _ => Outcome::Reject(attrs),
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mppe_keys_survive_reencryption() {
        let a = Secret::new("upstream").unwrap();
        let b = Secret::new("nas").unwrap();
        let key: Vec<u8> = (0..32).collect();
        let enc = mppe_encrypt(&key, &a, &[1; 16]).unwrap();
        assert_eq!(mppe_decrypt(&enc, &a, &[1; 16]).unwrap(), key);
        let vsa = attr::build_vsa(MICROSOFT, &[(MPPE_RECV_KEY, &enc)]).unwrap();
        let out = reencrypt_mppe(
            vec![Attribute {
                kind: attr::VENDOR_SPECIFIC,
                value: vsa,
            }],
            (&a, &[1; 16]),
            (&b, &[2; 16]),
        );
        let subs = attr::parse_vsa(&out[0].value).unwrap();
        assert_eq!(mppe_decrypt(subs[0].value, &b, &[2; 16]).unwrap(), key);
    }
}
