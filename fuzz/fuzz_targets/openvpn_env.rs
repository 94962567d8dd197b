#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pforte_fuzz::openvpn_env(data));
