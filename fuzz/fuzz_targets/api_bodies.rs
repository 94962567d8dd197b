#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pforte_fuzz::api_bodies(data));
