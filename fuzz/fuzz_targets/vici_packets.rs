#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pforte_fuzz::vici_packets(data));
