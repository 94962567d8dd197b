//! The harness's own checks (registered in `tests/it/common/mod.rs`; the module is named `unit`
//! so the tests keep their names, `common::openvpn::unit::…`).

use super::*;

pub fn hex_to_decimal_works() {
    assert_eq!(hex_to_decimal("00").unwrap(), "0");
    assert_eq!(hex_to_decimal("ff").unwrap(), "255");
    assert_eq!(hex_to_decimal("01:00").unwrap(), "256");
    assert_eq!(
        hex_to_decimal("ffffffffffffffffffffffffffffffff").unwrap(),
        u128::MAX.to_string()
    );
}

pub fn prefixes() {
    let p: Ipv4Prefix = "10.213.7.9/24".parse().unwrap();
    assert_eq!(p.to_string(), "10.213.7.0/24");
    assert_eq!(p.host(1), Ipv4Addr::new(10, 213, 7, 1));
    assert!(p.overlaps(&TUNNEL_RANGE));
    assert!(!p.overlaps(&VETH_RANGE));
    assert_eq!(p.netmask(), Ipv4Addr::new(255, 255, 255, 0));
    assert_eq!(owner_pid("pfn123c4", NS_PREFIX, 'c'), Some(123));
    assert_eq!(owner_pid("pft123s4", TUN_PREFIX, 's'), Some(123));
    assert_eq!(owner_pid("pfv12x", VETH_PREFIX, 'c'), None);
}
