#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pforte_fuzz::mgmt_lines(data));
