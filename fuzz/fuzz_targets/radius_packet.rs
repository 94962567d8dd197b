#![no_main]

#[path = "../src/radius_packet.rs"]
mod radius_packet;

libfuzzer_sys::fuzz_target!(|data: &[u8]| radius_packet::radius_packet(data));
