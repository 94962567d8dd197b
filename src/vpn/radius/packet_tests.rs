//! Unit tests of `packet.rs`.

use super::*;
use proptest::prelude::*;

/// RFC 2865 7.1: nemo's Access-Request.
const RFC_REQUEST: &str = "01 00 00 38 0f 40 3f 94 73 97 80 57 bd 83 d5 cb \
    98 f4 22 7a 01 06 6e 65 6d 6f 02 12 0d be 70 8d 93 d4 13 ce 31 96 e4 3f 78 2a 0a ee \
    04 06 c0 a8 01 10 05 06 00 00 00 03";

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

#[test]
fn decodes_the_rfc_2865_example() {
    let p = Packet::decode(&hex(RFC_REQUEST)).unwrap();
    assert_eq!(p.code, Code::AccessRequest);
    assert_eq!(p.identifier, 0);
    assert_eq!(p.authenticator[0], 0x0f);
    assert_eq!(p.get_str(attr::USER_NAME).unwrap(), Some("nemo"));
    assert_eq!(p.get(attr::USER_PASSWORD).unwrap().len(), 16);
    assert_eq!(
        p.get_ipv4(attr::NAS_IP_ADDRESS).unwrap(),
        Some(Ipv4Addr::new(192, 168, 1, 16))
    );
    assert_eq!(p.get_u32(attr::NAS_PORT).unwrap(), Some(3));
    assert_eq!(p.encode().unwrap(), hex(RFC_REQUEST));
}

#[test]
fn octets_past_the_length_field_are_ignored() {
    let mut bytes = hex(RFC_REQUEST);
    let p = Packet::decode(&bytes).unwrap();
    bytes.extend_from_slice(&[0xff; 7]);
    assert_eq!(Packet::decode(&bytes).unwrap(), p);
}

#[test]
fn malformed_packets_get_their_error() {
    let good = hex(RFC_REQUEST);
    assert_eq!(Packet::decode(&good[..19]), Err(PacketError::TooShort(19)));
    assert_eq!(Packet::decode(&[]), Err(PacketError::TooShort(0)));

    let mut short_len = good.clone();
    short_len[2..4].copy_from_slice(&19u16.to_be_bytes());
    assert_eq!(Packet::decode(&short_len), Err(PacketError::BadLength(19)));
    let mut long_len = good.clone();
    long_len[2..4].copy_from_slice(&4097u16.to_be_bytes());
    assert_eq!(Packet::decode(&long_len), Err(PacketError::BadLength(4097)));

    assert_eq!(
        Packet::decode(&good[..40]),
        Err(PacketError::Truncated {
            length: 56,
            received: 40
        })
    );

    let mut unknown = good.clone();
    unknown[0] = 99;
    assert_eq!(Packet::decode(&unknown), Err(PacketError::UnknownCode(99)));

    // Attribute length 0 and 1 (a zero-length attribute would loop forever if accepted).
    for bad in [0u8, 1] {
        let mut b = good.clone();
        b[21] = bad;
        assert_eq!(
            Packet::decode(&b),
            Err(PacketError::BadAttribute { offset: 20 })
        );
    }
    // The last attribute claims more than is left.
    let mut past = good.clone();
    past[51] = 7;
    assert_eq!(
        Packet::decode(&past),
        Err(PacketError::BadAttribute { offset: 50 })
    );
    // One lone octet after the last attribute.
    let mut lone = good.clone();
    lone.push(0x01);
    lone[2..4].copy_from_slice(&57u16.to_be_bytes());
    assert_eq!(
        Packet::decode(&lone),
        Err(PacketError::BadAttribute { offset: 56 })
    );
}

#[test]
fn encode_refuses_oversized() {
    let mut p = Packet::new(Code::AccessAccept, 1, [0; 16]);
    assert!(matches!(
        p.add(attr::CLASS, vec![0; 254]),
        Err(PacketError::ValueTooLong { kind: 25, len: 254 })
    ));
    p.attributes.push(Attribute {
        kind: attr::CLASS,
        value: vec![0; 254],
    });
    assert!(matches!(p.encode(), Err(PacketError::ValueTooLong { .. })));
    p.attributes.clear();
    for _ in 0..16 {
        p.add(attr::CLASS, vec![0; 253]).unwrap();
    }
    // 20 + 16 * 255 = 4100.
    assert_eq!(p.encode(), Err(PacketError::TooLong(4100)));
    p.attributes.pop();
    p.add(attr::CLASS, vec![0; 249]).unwrap();
    assert_eq!(p.encode().unwrap().len(), 4096);
}

#[test]
fn typed_getters_check_sizes_and_text() {
    let mut p = Packet::new(Code::AccessRequest, 1, [0; 16]);
    p.add(attr::NAS_PORT, vec![1, 2, 3]).unwrap();
    p.add(attr::USER_NAME, vec![0xff, 0xfe]).unwrap();
    assert_eq!(
        p.get_u32(attr::NAS_PORT),
        Err(AttrError::WrongSize {
            kind: 5,
            expected: 4,
            got: 3
        })
    );
    assert_eq!(
        p.get_str(attr::USER_NAME),
        Err(AttrError::NotUtf8 { kind: 1 })
    );
    assert_eq!(p.get_ipv4(attr::FRAMED_IP_ADDRESS), Ok(None));
}

#[test]
fn vendor_attributes_and_cisco_avpairs() {
    let mut p = Packet::new(Code::AccessRequest, 1, [0; 16]);
    p.add_vendor(9, 1, b"mdm-tlv=device-platform=win").unwrap();
    p.add_vendor(9, 1, b"mdm-tlv=device-uid=ABC123").unwrap();
    p.add(attr::VENDOR_SPECIFIC, vec![0, 0, 0, 9, 1, 200])
        .unwrap(); // malformed: skipped
    let two = attr::build_vsa(25461, &[(9, b"host-1"), (8, b"Linux")]).unwrap();
    p.add(attr::VENDOR_SPECIFIC, two).unwrap();
    assert_eq!(p.cisco_avpair("mdm-tlv=device-uid"), Some("ABC123"));
    assert_eq!(p.cisco_avpair("mdm-tlv=device-mac"), None);
    assert_eq!(p.cisco_avpairs().count(), 2);
    assert_eq!(
        p.vendor_str(attr::paloalto::VENDOR_ID, attr::paloalto::CLIENT_HOSTNAME),
        Some("host-1")
    );
    assert_eq!(p.vendor_str(25461, 8), Some("Linux"));
    assert_eq!(p.vendor_attrs().count(), 4);
}

fn arb_packet() -> impl Strategy<Value = Packet> {
    let codes = prop::sample::select(vec![
        Code::AccessRequest,
        Code::AccessAccept,
        Code::AccessReject,
        Code::AccountingRequest,
        Code::AccountingResponse,
        Code::AccessChallenge,
        Code::DisconnectRequest,
        Code::DisconnectAck,
        Code::DisconnectNak,
        Code::CoaRequest,
        Code::CoaAck,
        Code::CoaNak,
    ]);
    // At most 15 attributes of at most 253 octets: 3,845 octets, always under 4096.
    let attrs = prop::collection::vec(
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..=253))
            .prop_map(|(kind, value)| Attribute { kind, value }),
        0..15,
    );
    (codes, any::<u8>(), any::<[u8; 16]>(), attrs).prop_map(
        |(code, identifier, authenticator, attributes)| Packet {
            code,
            identifier,
            authenticator,
            attributes,
        },
    )
}

proptest! {
    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..5000)) {
        if let Ok(p) = Packet::decode(&bytes) {
            let again = p.encode().unwrap();
            prop_assert_eq!(&bytes[..again.len()], &again[..]);
        }
    }

    #[test]
    fn decode_never_panics_on_headers_that_look_right(
        code in prop::sample::select(vec![1u8, 2, 4, 11, 40, 45]),
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let len = u16::try_from(20 + body.len()).unwrap();
        let mut bytes = vec![code, 7];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&[0; 16]);
        bytes.extend_from_slice(&body);
        if let Ok(p) = Packet::decode(&bytes) {
            prop_assert_eq!(p.encode().unwrap(), bytes);
        }
    }

    #[test]
    fn encode_then_decode_is_identity(p in arb_packet()) {
        let bytes = p.encode().unwrap();
        prop_assert_eq!(Packet::decode(&bytes).unwrap(), p);
    }
}
