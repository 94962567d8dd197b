//! The shared secret and everything computed with it: Message-Authenticator (RFC 3579 3.2,
//! RFC 5176 3.5), Request and Response Authenticators (RFC 2865 3, RFC 2866 3, RFC 5176 2.3),
//! User-Password hiding (RFC 2865 5.2), and signing a packet in the order those need.
//!
//! Every check compares in constant time.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};
use subtle::ConstantTimeEq;
use thiserror::Error;

use super::attr::MESSAGE_AUTHENTICATOR;
use super::packet::{Attribute, Code, Packet, PacketError};

/// The longest User-Password, in octets (RFC 2865 5.2).
pub const MAX_PASSWORD_LEN: usize = 128;

/// A RADIUS shared secret. Its `Debug` prints a mask.
#[derive(Clone)]
pub struct Secret {
    bytes: Vec<u8>,
    /// HMAC-MD5 keyed with the secret, cloned for each Message-Authenticator.
    mac: Hmac<Md5>,
}

impl Secret {
    /// A secret from its octets; an empty one is refused (RFC 2865 3: it must not be empty).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret, AuthError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(AuthError::EmptySecret);
        }
        // HMAC takes a key of any length; the error cannot happen.
        let mac = Hmac::<Md5>::new_from_slice(&bytes).map_err(|_| AuthError::EmptySecret)?;
        Ok(Secret { bytes, mac })
    }

    /// The secret's octets.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(********)")
    }
}

/// Why a packet does not authenticate, or cannot be signed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    /// An empty shared secret.
    #[error("the shared secret is empty")]
    EmptySecret,
    /// A packet that must carry a Message-Authenticator has none.
    #[error("no Message-Authenticator")]
    MissingMessageAuthenticator,
    /// More than one Message-Authenticator (RFC 3579 3.3 allows one).
    #[error("more than one Message-Authenticator")]
    DuplicateMessageAuthenticator,
    /// A Message-Authenticator whose value is not 16 octets.
    #[error("Message-Authenticator of {0} octets, not 16")]
    MessageAuthenticatorSize(usize),
    /// The Message-Authenticator does not match (wrong secret or altered packet).
    #[error("Message-Authenticator does not match")]
    BadMessageAuthenticator,
    /// The Request or Response Authenticator does not match (wrong secret or altered packet).
    #[error("authenticator does not match")]
    BadAuthenticator,
    /// A request where a response is needed, or the other way round.
    #[error("{0:?} is the wrong kind of packet here")]
    WrongCode(Code),
    /// A password longer than 128 octets, or a hidden one not 16 to 128 octets in blocks of 16.
    #[error("User-Password of {0} octets")]
    PasswordSize(usize),
    /// The packet cannot be written.
    #[error(transparent)]
    Packet(#[from] PacketError),
}

/// MD5 over the parts, as 16 octets.
fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The packet's wire bytes with `authenticator` in the authenticator field and, when
/// `zero_ma`, every Message-Authenticator value set to zeros.
fn wire_with(
    packet: &Packet,
    authenticator: &[u8; 16],
    zero_ma: bool,
) -> Result<Vec<u8>, PacketError> {
    let mut bytes = packet.encode()?;
    bytes[4..20].copy_from_slice(authenticator);
    if zero_ma {
        let mut at = 20;
        for a in &packet.attributes {
            if a.kind == MESSAGE_AUTHENTICATOR {
                bytes[at + 2..at + 2 + a.value.len()].fill(0);
            }
            at += 2 + a.value.len();
        }
    }
    Ok(bytes)
}

/// What stands in the authenticator field while a packet's Message-Authenticator is computed:
/// an Access-Request's own authenticator; zeros for the other requests (RFC 5176 3.5) and for
/// an Accounting-Response (as FreeRADIUS signs and checks it); for any other response, its
/// request's authenticator (`None` there gives zeros, which cannot match).
pub fn hmac_stand_in(packet: &Packet, request_authenticator: Option<&[u8; 16]>) -> [u8; 16] {
    match packet.code {
        Code::AccessRequest => packet.authenticator,
        Code::AccountingRequest
        | Code::DisconnectRequest
        | Code::CoaRequest
        | Code::AccountingResponse => [0; 16],
        Code::AccessAccept
        | Code::AccessReject
        | Code::AccessChallenge
        | Code::DisconnectAck
        | Code::DisconnectNak
        | Code::CoaAck
        | Code::CoaNak => request_authenticator.copied().unwrap_or([0; 16]),
    }
}

/// The Message-Authenticator of a packet: HMAC-MD5 keyed with the secret over the packet with
/// `stand_in` in the authenticator field and the Message-Authenticator value zeroed.
pub fn message_authenticator(
    packet: &Packet,
    stand_in: &[u8; 16],
    secret: &Secret,
) -> Result<[u8; 16], AuthError> {
    let bytes = wire_with(packet, stand_in, true)?;
    let mut mac = secret.mac.clone();
    mac.update(&bytes);
    Ok(mac.finalize().into_bytes().into())
}

/// Checks that the packet carries exactly one Message-Authenticator and that it matches.
pub fn verify_message_authenticator(
    packet: &Packet,
    stand_in: &[u8; 16],
    secret: &Secret,
) -> Result<(), AuthError> {
    let mut found = packet.get_all(MESSAGE_AUTHENTICATOR);
    let value = found.next().ok_or(AuthError::MissingMessageAuthenticator)?;
    if found.next().is_some() {
        return Err(AuthError::DuplicateMessageAuthenticator);
    }
    if value.len() != 16 {
        return Err(AuthError::MessageAuthenticatorSize(value.len()));
    }
    let bytes = wire_with(packet, stand_in, true)?;
    let mut mac = secret.mac.clone();
    mac.update(&bytes);
    mac.verify_slice(value)
        .map_err(|_| AuthError::BadMessageAuthenticator)
}

/// The Response Authenticator: MD5(Code | Identifier | Length | Request Authenticator |
/// Attributes | Secret).
pub fn response_authenticator(
    response: &Packet,
    request_authenticator: &[u8; 16],
    secret: &Secret,
) -> Result<[u8; 16], AuthError> {
    let bytes = wire_with(response, request_authenticator, false)?;
    Ok(md5(&[&bytes, secret.as_bytes()]))
}

/// Checks a response's Response Authenticator against its request's authenticator.
pub fn verify_response_authenticator(
    response: &Packet,
    request_authenticator: &[u8; 16],
    secret: &Secret,
) -> Result<(), AuthError> {
    let want = response_authenticator(response, request_authenticator, secret)?;
    ct_check(&want, &response.authenticator, AuthError::BadAuthenticator)
}

/// The Request Authenticator of an Accounting-Request, Disconnect-Request or CoA-Request:
/// MD5(Code | Identifier | Length | 16 zero octets | Attributes | Secret).
pub fn request_authenticator(request: &Packet, secret: &Secret) -> Result<[u8; 16], AuthError> {
    let bytes = wire_with(request, &[0; 16], false)?;
    Ok(md5(&[&bytes, secret.as_bytes()]))
}

/// Checks the Request Authenticator of an Accounting-Request, Disconnect-Request or CoA-Request.
pub fn verify_request_authenticator(request: &Packet, secret: &Secret) -> Result<(), AuthError> {
    let want = request_authenticator(request, secret)?;
    ct_check(&want, &request.authenticator, AuthError::BadAuthenticator)
}

fn ct_check(want: &[u8; 16], got: &[u8; 16], err: AuthError) -> Result<(), AuthError> {
    if bool::from(want.ct_eq(got)) {
        Ok(())
    } else {
        Err(err)
    }
}

/// Checks a request from a client: an Access-Request must carry a matching
/// Message-Authenticator (RFC 3579, and the BlastRADIUS fix); the other requests must carry a
/// matching Request Authenticator, and their Message-Authenticator must match where present.
pub fn verify_request(request: &Packet, secret: &Secret) -> Result<(), AuthError> {
    match request.code {
        Code::AccessRequest => {
            verify_message_authenticator(request, &request.authenticator, secret)
        }
        code if code.is_request() => {
            verify_request_authenticator(request, secret)?;
            if request.get(MESSAGE_AUTHENTICATOR).is_some() {
                verify_message_authenticator(request, &hmac_stand_in(request, None), secret)?;
            }
            Ok(())
        }
        code => Err(AuthError::WrongCode(code)),
    }
}

/// Checks a response to a request with `request_authenticator`: its Response Authenticator,
/// and its Message-Authenticator, which an Access-Accept, -Reject or -Challenge must carry and
/// any other response must get right where present. A Disconnect- or CoA-ACK/NAK's
/// Message-Authenticator is also taken when computed over zeros, as FreeRADIUS 3 signs them.
pub fn verify_response(
    response: &Packet,
    request_authenticator: &[u8; 16],
    secret: &Secret,
) -> Result<(), AuthError> {
    if response.code.is_request() {
        return Err(AuthError::WrongCode(response.code));
    }
    verify_response_authenticator(response, request_authenticator, secret)?;
    let must = matches!(
        response.code,
        Code::AccessAccept | Code::AccessReject | Code::AccessChallenge
    );
    if !must && response.get(MESSAGE_AUTHENTICATOR).is_none() {
        return Ok(());
    }
    let stand_in = hmac_stand_in(response, Some(request_authenticator));
    let checked = verify_message_authenticator(response, &stand_in, secret);
    let dae = matches!(
        response.code,
        Code::DisconnectAck | Code::DisconnectNak | Code::CoaAck | Code::CoaNak
    );
    match checked {
        Err(AuthError::BadMessageAuthenticator) if dae => {
            verify_message_authenticator(response, &[0; 16], secret)
        }
        other => other,
    }
}

/// Makes sure the packet has a Message-Authenticator; a new one goes first, where a
/// BlastRADIUS-style forged prefix cannot push it out.
fn ensure_message_authenticator(packet: &mut Packet) {
    if packet.get(MESSAGE_AUTHENTICATOR).is_none() {
        packet.attributes.insert(
            0,
            Attribute {
                kind: MESSAGE_AUTHENTICATOR,
                value: vec![0; 16],
            },
        );
    }
}

/// Sets every Message-Authenticator of the packet to `value`.
fn set_message_authenticator(packet: &mut Packet, value: [u8; 16]) {
    for a in &mut packet.attributes {
        if a.kind == MESSAGE_AUTHENTICATOR {
            a.value = value.to_vec();
        }
    }
}

/// Signs a response and writes it: adds a Message-Authenticator (first) when it has none,
/// computes it (with [`hmac_stand_in`] in the authenticator field), then computes the Response
/// Authenticator over the result. The response keeps the values it was sent with.
pub fn finalize_response(
    response: &mut Packet,
    request_authenticator: &[u8; 16],
    secret: &Secret,
) -> Result<Vec<u8>, AuthError> {
    if response.code.is_request() {
        return Err(AuthError::WrongCode(response.code));
    }
    ensure_message_authenticator(response);
    set_message_authenticator(response, [0; 16]);
    let stand_in = hmac_stand_in(response, Some(request_authenticator));
    let ma = message_authenticator(response, &stand_in, secret)?;
    set_message_authenticator(response, ma);
    response.authenticator = response_authenticator(response, request_authenticator, secret)?;
    Ok(response.encode()?)
}

/// Signs a request and writes it. An Access-Request keeps its authenticator (the caller puts
/// 16 unpredictable octets there) and gets a Message-Authenticator (first, when it has none).
/// An Accounting-, Disconnect- or CoA-Request gets its Message-Authenticator computed where it
/// carries one, then its Request Authenticator.
pub fn finalize_request(request: &mut Packet, secret: &Secret) -> Result<Vec<u8>, AuthError> {
    match request.code {
        Code::AccessRequest => {
            ensure_message_authenticator(request);
            set_message_authenticator(request, [0; 16]);
            let ma = message_authenticator(request, &request.authenticator, secret)?;
            set_message_authenticator(request, ma);
        }
        code if code.is_request() => {
            if request.get(MESSAGE_AUTHENTICATOR).is_some() {
                set_message_authenticator(request, [0; 16]);
                let ma = message_authenticator(request, &hmac_stand_in(request, None), secret)?;
                set_message_authenticator(request, ma);
            }
            request.authenticator = request_authenticator(request, secret)?;
        }
        code => return Err(AuthError::WrongCode(code)),
    }
    Ok(request.encode()?)
}

/// Hides a User-Password (RFC 2865 5.2): padded with zeros to a multiple of 16 octets, each
/// block XORed with MD5(secret | previous block), the first with the Request Authenticator.
pub fn hide_password(
    password: &[u8],
    request_authenticator: &[u8; 16],
    secret: &Secret,
) -> Result<Vec<u8>, AuthError> {
    if password.len() > MAX_PASSWORD_LEN {
        return Err(AuthError::PasswordSize(password.len()));
    }
    let mut out = password.to_vec();
    out.resize(password.len().div_ceil(16).max(1) * 16, 0);
    let mut prev = *request_authenticator;
    for block in out.chunks_exact_mut(16) {
        let pad = md5(&[secret.as_bytes(), &prev]);
        for (b, p) in block.iter_mut().zip(pad) {
            *b ^= p;
        }
        prev.copy_from_slice(block);
    }
    Ok(out)
}

/// Recovers a User-Password hidden with [`hide_password`], without its zero padding.
pub fn unhide_password(
    hidden: &[u8],
    request_authenticator: &[u8; 16],
    secret: &Secret,
) -> Result<Vec<u8>, AuthError> {
    if hidden.is_empty() || hidden.len() > MAX_PASSWORD_LEN || !hidden.len().is_multiple_of(16) {
        return Err(AuthError::PasswordSize(hidden.len()));
    }
    let mut out = Vec::with_capacity(hidden.len());
    let mut prev: &[u8] = request_authenticator;
    for block in hidden.chunks_exact(16) {
        let pad = md5(&[secret.as_bytes(), prev]);
        out.extend(block.iter().zip(pad).map(|(b, p)| b ^ p));
        prev = block;
    }
    while out.last() == Some(&0) {
        out.pop();
    }
    Ok(out)
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
