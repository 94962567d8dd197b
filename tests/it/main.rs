//! Integration tests: one crate, one binary (see STYLE.md). They start the real `pforte`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli;
mod common;
mod daemon;
mod faults;
mod fuzz_regressions;
mod hook;
mod hostile;
mod lifecycle;
mod monitoring_e2e;
mod openvpn_e2e;
mod openvpn_mgmt_e2e;
mod ops;
mod radius_codec;
mod radius_front;
mod radius_upstream;
