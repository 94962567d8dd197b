//! Replays the fuzzers' inputs: every file under `fuzz/seeds/<target>/` (realistic examples) and
//! `fuzz/regressions/<target>/` (what the fuzzers found, minimised) goes through the very checks
//! the fuzz target runs (`fuzz/src/checks.rs`, included here unchanged), so a fixed crash stays
//! fixed under a plain `cargo test`, without cargo-fuzz or a nightly compiler.

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use std::path::Path;

use crate::common::harness::{Case, trial};

/// Runs every input of a target; fails naming the file that breaks, or when a target has none.
fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if path.is_file() && !hidden {
                inputs.push(path);
            }
        }
    }
    inputs.sort();
    assert!(
        !inputs.is_empty(),
        "no inputs for fuzz target {target} under {}",
        root.display()
    );
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "fuzz input {} fails", path.display());
    }
}

fn fuzz_openvpn_env_inputs() {
    replay("openvpn_env", checks::openvpn_env);
}

fn fuzz_registry_csv_inputs() {
    replay("registry_csv", checks::registry_csv);
}

fn fuzz_registry_json_inputs() {
    replay("registry_json", checks::registry_json);
}

fn fuzz_config_inputs() {
    replay("config", checks::config);
}

fn fuzz_api_bodies_inputs() {
    replay("api_bodies", checks::api_bodies);
}

fn fuzz_mgmt_lines_inputs() {
    replay("mgmt_lines", checks::mgmt_lines);
}

fn fuzz_vici_packets_inputs() {
    replay("vici_packets", checks::vici_packets);
}

fn fuzz_occtl_users_inputs() {
    replay("occtl_users", checks::occtl_users);
}

/// The tests of this module, for the harness (`tests/it/main.rs`).
pub fn tests() -> Vec<Case> {
    vec![
        trial!(fuzz_openvpn_env_inputs),
        trial!(fuzz_registry_csv_inputs),
        trial!(fuzz_registry_json_inputs),
        trial!(fuzz_config_inputs),
        trial!(fuzz_api_bodies_inputs),
        trial!(fuzz_mgmt_lines_inputs),
        trial!(fuzz_vici_packets_inputs),
        trial!(fuzz_occtl_users_inputs),
    ]
}
