#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pforte_fuzz::occtl_users(data));
