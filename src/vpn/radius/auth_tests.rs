//! Unit tests of `auth.rs`.

use super::*;
use crate::vpn::radius::attr;

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn secret() -> Secret {
    Secret::new("xyzzy5461").unwrap()
}

/// RFC 2865 7.1: nemo's request, hidden password and the server's Access-Accept.
const RFC_REQUEST_AUTH: &str = "0f 40 3f 94 73 97 80 57 bd 83 d5 cb 98 f4 22 7a";
const RFC_HIDDEN: &str = "0d be 70 8d 93 d4 13 ce 31 96 e4 3f 78 2a 0a ee";
const RFC_ACCEPT: &str = "02 00 00 26 86 fe 22 0e 76 24 ba 2a 10 05 f6 bf \
    9b 55 e0 b2 06 06 00 00 00 01 0f 06 00 00 00 00 0e 06 c0 a8 01 03";

fn rfc_auth() -> [u8; 16] {
    hex(RFC_REQUEST_AUTH).try_into().unwrap()
}

#[test]
fn rfc_2865_password_hides_to_the_rfc_bytes() {
    let hidden = hide_password(b"arctangent", &rfc_auth(), &secret()).unwrap();
    assert_eq!(hidden, hex(RFC_HIDDEN));
    let clear = unhide_password(&hidden, &rfc_auth(), &secret()).unwrap();
    assert_eq!(clear, b"arctangent");
}

#[test]
fn rfc_2865_accept_has_the_right_response_authenticator() {
    let accept = Packet::decode(&hex(RFC_ACCEPT)).unwrap();
    verify_response_authenticator(&accept, &rfc_auth(), &secret()).unwrap();
    let other = Secret::new("xyzzy5462").unwrap();
    assert_eq!(
        verify_response_authenticator(&accept, &rfc_auth(), &other),
        Err(AuthError::BadAuthenticator)
    );
    // It has no Message-Authenticator, which an Access-Accept now needs.
    assert_eq!(
        verify_response(&accept, &rfc_auth(), &secret()),
        Err(AuthError::MissingMessageAuthenticator)
    );
}

#[test]
fn passwords_round_trip_at_every_block_boundary() {
    let ra = [7u8; 16];
    for len in [0usize, 1, 15, 16, 17, 31, 32, 100, 127, 128] {
        let pw: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let hidden = hide_password(&pw, &ra, &secret()).unwrap();
        assert_eq!(hidden.len(), len.div_ceil(16).max(1) * 16);
        assert_eq!(unhide_password(&hidden, &ra, &secret()).unwrap(), pw);
    }
    assert_eq!(
        hide_password(&[b'x'; 129], &ra, &secret()),
        Err(AuthError::PasswordSize(129))
    );
    for bad in [0usize, 15, 17, 144] {
        assert_eq!(
            unhide_password(&vec![1; bad], &ra, &secret()),
            Err(AuthError::PasswordSize(bad))
        );
    }
}

fn access_request() -> Packet {
    let mut p = Packet::new(Code::AccessRequest, 42, [0x5a; 16]);
    p.add(attr::USER_NAME, "alice").unwrap();
    let pw = hide_password(b"secret pw", &p.authenticator, &secret()).unwrap();
    p.add(attr::USER_PASSWORD, pw).unwrap();
    p.add_vendor(9, 1, b"mdm-tlv=device-uid=ABC123").unwrap();
    p
}

/// Every single-bit change of the signed bytes makes decoding or checking fail.
fn every_flip_fails(bytes: &[u8], check: impl Fn(&Packet) -> Result<(), AuthError>) {
    for bit in 0..bytes.len() * 8 {
        let mut b = bytes.to_vec();
        b[bit / 8] ^= 1 << (bit % 8);
        if let Ok(p) = Packet::decode(&b) {
            assert!(check(&p).is_err(), "bit {bit} flipped still verifies");
        }
    }
}

#[test]
fn access_request_message_authenticator_verifies_and_one_flipped_bit_fails() {
    let mut p = access_request();
    let bytes = finalize_request(&mut p, &secret()).unwrap();
    assert_eq!(p.attributes[0].kind, attr::MESSAGE_AUTHENTICATOR);
    assert_eq!(p.authenticator, [0x5a; 16]);
    let got = Packet::decode(&bytes).unwrap();
    verify_request(&got, &secret()).unwrap();
    let wrong = Secret::new("not it").unwrap();
    assert_eq!(
        verify_request(&got, &wrong),
        Err(AuthError::BadMessageAuthenticator)
    );
    every_flip_fails(&bytes, |p| verify_request(p, &secret()));
}

#[test]
fn message_authenticator_must_be_there_once_and_16_octets() {
    let p = access_request();
    assert_eq!(
        verify_request(&p, &secret()),
        Err(AuthError::MissingMessageAuthenticator)
    );
    let mut twice = access_request();
    finalize_request(&mut twice, &secret()).unwrap();
    twice.add(attr::MESSAGE_AUTHENTICATOR, vec![0; 16]).unwrap();
    assert_eq!(
        verify_request(&twice, &secret()),
        Err(AuthError::DuplicateMessageAuthenticator)
    );
    let mut short = access_request();
    short.add(attr::MESSAGE_AUTHENTICATOR, vec![0; 15]).unwrap();
    assert_eq!(
        verify_request(&short, &secret()),
        Err(AuthError::MessageAuthenticatorSize(15))
    );
}

#[test]
fn response_is_signed_in_order_and_one_flipped_bit_fails() {
    let mut req = access_request();
    finalize_request(&mut req, &secret()).unwrap();
    let mut resp = Packet::response_to(&req, Code::AccessAccept);
    resp.add(attr::REPLY_MESSAGE, "welcome").unwrap();
    resp.add(attr::CLASS, "sess-1").unwrap();
    resp.add_ipv4(attr::FRAMED_IP_ADDRESS, [10, 8, 0, 6].into());
    let bytes = finalize_response(&mut resp, &req.authenticator, &secret()).unwrap();
    assert_eq!(resp.attributes[0].kind, attr::MESSAGE_AUTHENTICATOR);
    let got = Packet::decode(&bytes).unwrap();
    assert_eq!(got, resp);
    verify_response(&got, &req.authenticator, &secret()).unwrap();
    // The Message-Authenticator was computed before the Response Authenticator.
    verify_message_authenticator(&got, &req.authenticator, &secret()).unwrap();
    assert_eq!(
        verify_response(&got, &[0; 16], &secret()),
        Err(AuthError::BadAuthenticator)
    );
    every_flip_fails(&bytes, |p| {
        verify_response(p, &req.authenticator, &secret())
    });
    assert_eq!(
        finalize_response(&mut req.clone(), &[0; 16], &secret()),
        Err(AuthError::WrongCode(Code::AccessRequest))
    );
}

#[test]
fn accounting_and_disconnect_request_authenticators() {
    for (code, with_ma) in [
        (Code::AccountingRequest, false),
        (Code::AccountingRequest, true),
        (Code::DisconnectRequest, true),
        (Code::CoaRequest, false),
    ] {
        let mut p = Packet::new(code, 3, [0; 16]);
        p.add_u32(attr::ACCT_STATUS_TYPE, attr::acct_status::START);
        p.add(attr::ACCT_SESSION_ID, "s-1").unwrap();
        if with_ma {
            p.add(attr::MESSAGE_AUTHENTICATOR, vec![0; 16]).unwrap();
        }
        let bytes = finalize_request(&mut p, &secret()).unwrap();
        assert_ne!(p.authenticator, [0; 16]);
        let got = Packet::decode(&bytes).unwrap();
        verify_request(&got, &secret()).unwrap();
        every_flip_fails(&bytes, |p| verify_request(p, &secret()));

        let mut ack = Packet::response_to(&got, Code::AccountingResponse);
        let out = finalize_response(&mut ack, &got.authenticator, &secret()).unwrap();
        verify_response(
            &Packet::decode(&out).unwrap(),
            &got.authenticator,
            &secret(),
        )
        .unwrap();
    }
}

#[test]
fn secret_debug_is_masked_and_empty_refused() {
    let s = Secret::new("hunter2").unwrap();
    assert!(!format!("{s:?}").contains("hunter2"));
    assert_eq!(format!("{s:?}"), "Secret(********)");
    assert!(matches!(Secret::new(""), Err(AuthError::EmptySecret)));
}
