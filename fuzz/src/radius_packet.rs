//! The check behind the `radius_packet` fuzz target: arbitrary bytes through
//! `vpn::radius::Packet::decode`, and every packet that decodes through the encoder, the
//! accessors and the shared-secret arithmetic.
//!
//! Included by `#[path]` in `fuzz/fuzz_targets/radius_packet.rs` and in
//! `tests/it/radius_codec.rs` (which replays `seeds/radius_packet/` and
//! `regressions/radius_packet/` through it), so a saved input replays through the very code the
//! fuzzer ran. Only `std` and `pforte` are used.

use pforte::config::{DeviceAttribute, MissingDevice, RadiusClient, SecretValue, Vendor};
use pforte::vpn::radius::clients::Nas;
use pforte::vpn::radius::{Code, Packet, Secret, attr, auth, profile, upstream};

/// Panics when an invariant breaks: no panic inside the codec; a packet that decodes encodes
/// to the same octets (up to its Length field) and decodes to itself again; whatever
/// `finalize_*` signs, the matching `verify_*` accepts.
pub fn radius_packet(data: &[u8]) {
    let Ok(packet) = Packet::decode(data) else {
        return;
    };
    let bytes = packet.encode().expect("a decoded packet encodes");
    assert_eq!(&data[..bytes.len()], &bytes[..], "re-encoded octets differ");
    assert_eq!(
        Packet::decode(&bytes).as_ref(),
        Ok(&packet),
        "decode(encode(p)) != p"
    );

    // The accessors only read.
    for kind in [
        attr::USER_NAME,
        attr::NAS_IP_ADDRESS,
        attr::NAS_PORT,
        attr::CLASS,
    ] {
        let _ = packet.get_str(kind);
        let _ = packet.get_u32(kind);
        let _ = packet.get_ipv4(kind);
    }
    let subs = packet.vendor_attrs().count();
    assert!(
        subs <= bytes.len() / 2,
        "more vendor attributes than octets"
    );
    let _ = packet.cisco_avpair("mdm-tlv=device-uid");
    let _ = packet.vendor_str(attr::paloalto::VENDOR_ID, attr::paloalto::CLIENT_HOSTNAME);

    let Ok(secret) = Secret::new(&b"fuzz-secret"[..]) else {
        return;
    };

    // Every vendor profile reads any packet into a connect request the policy can check.
    for (vendor, device_attribute) in [
        (Vendor::Cisco, None),
        (Vendor::PaloAlto, None),
        (Vendor::Fortinet, Some(DeviceAttribute::Vendor(12356, 1))),
        (Vendor::Generic, Some(DeviceAttribute::AvPair("x".into()))),
    ] {
        let Some(value) = SecretValue::new(&b"fuzz-secret"[..]) else {
            return;
        };
        let nas = Nas {
            config: RadiusClient {
                name: "nas".into(),
                prefix: "127.0.0.1/32".parse().expect("a prefix"),
                secret: value,
                vendor,
                zone: "office".into(),
                dae_port: 0,
                dae_address: None,
                device_attribute,
                require_message_authenticator: true,
            },
            secret: secret.clone(),
        };
        for missing in [MissingDevice::Refuse, MissingDevice::SkipDeviceChecks] {
            let req = profile::connect_request(&nas, &packet, missing, "k".into());
            assert_eq!(req.vpn, "radius");
            let _ = pforte::policy::validate_request(&req);
        }
    }
    // MPPE re-encryption (upstream answers) takes any attributes.
    let _ = upstream::reencrypt_mppe(
        packet.attributes.clone(),
        (&secret, &packet.authenticator),
        (&secret, &[7; 16]),
    );
    if let Some(hidden) = packet.get(attr::USER_PASSWORD)
        && let Ok(clear) = auth::unhide_password(hidden, &packet.authenticator, &secret)
    {
        assert!(clear.len() <= hidden.len());
        let again = auth::hide_password(&clear, &packet.authenticator, &secret)
            .expect("an unhidden password hides again");
        // Trailing zeros of the clear text are padding: the blocks they filled come back.
        assert!(again.len() <= hidden.len());
    }
    let _ = auth::verify_request(&packet, &secret);
    let _ = auth::verify_response(&packet, &[7; 16], &secret);

    // Signing and checking agree, whenever there is at most one Message-Authenticator.
    let single_ma = packet.get_all(attr::MESSAGE_AUTHENTICATOR).count() <= 1;
    let mut signed = packet.clone();
    if packet.code.is_request() {
        if let Ok(out) = auth::finalize_request(&mut signed, &secret) {
            let got = Packet::decode(&out).expect("a signed request decodes");
            if single_ma {
                auth::verify_request(&got, &secret).expect("a signed request verifies");
            }
        }
    } else if let Ok(out) = auth::finalize_response(&mut signed, &[7; 16], &secret) {
        let got = Packet::decode(&out).expect("a signed response decodes");
        assert_ne!(got.code, Code::AccessRequest);
        if single_ma {
            auth::verify_response(&got, &[7; 16], &secret).expect("a signed response verifies");
        }
    }
}
