//! Integration tests: one crate, one binary. They start the real `pforte`.
//!
//! The harness is libtest-mimic (`harness = false` in `Cargo.toml`): each module lists its tests
//! in `tests()`, and a test that needs a part of the system declares it there, so that where the
//! part is missing the summary counts it as ignored and says why (`common/harness.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli;
mod cluster;
mod cluster_openvpn_e2e;
mod common;
mod ctl;
mod daemon;
mod faults;
mod fuzz_regressions;
mod hook;
mod hostile;
mod lifecycle;
mod limits;
mod monitoring_e2e;
mod ocserv_e2e;
mod openvpn_e2e;
mod openvpn_mgmt_e2e;
mod ops;
mod radius_codec;
mod radius_front;
mod radius_ocserv_e2e;
mod radius_upstream;
mod revocation;
mod strongswan_e2e;

fn main() -> std::process::ExitCode {
    let cases = [
        cli::tests(),
        cluster::tests(),
        cluster_openvpn_e2e::tests(),
        common::tests(),
        ctl::tests(),
        daemon::tests(),
        faults::tests(),
        fuzz_regressions::tests(),
        hook::tests(),
        hostile::tests(),
        lifecycle::tests(),
        limits::tests(),
        monitoring_e2e::tests(),
        ocserv_e2e::tests(),
        openvpn_e2e::tests(),
        openvpn_mgmt_e2e::tests(),
        ops::tests(),
        radius_codec::tests(),
        radius_front::tests(),
        radius_ocserv_e2e::tests(),
        radius_upstream::tests(),
        revocation::tests(),
        strongswan_e2e::tests(),
    ];
    common::harness::main(cases.into_iter().flatten().collect())
}
