//! The checks behind the fuzz targets. They live in `checks.rs`, which the integration test
//! `tests/it/fuzz_regressions.rs` includes too, so a saved input replays through the very code
//! the fuzzer ran.

mod checks;

pub use checks::{
    api_bodies, config, mgmt_lines, occtl_users, openvpn_env, registry_csv, registry_json,
    vici_packets,
};
