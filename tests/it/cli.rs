//! The command line: check-config over every shipped and fixture file, `pforte check`.

use std::path::PathBuf;
use std::process::Command;

use crate::common::harness::{Case, trial};
use crate::common::*;

fn toml_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

/// `pforte check-config --config FILE`, run from the repository root.
fn check_config(f: &std::path::Path) -> std::process::Output {
    Command::new(bin())
        .args(["check-config", "--config"])
        .arg(f)
        .current_dir(repo())
        .output()
        .unwrap()
}

fn assert_valid(f: &std::path::Path) {
    let out = check_config(f);
    assert!(
        out.status.success(),
        "{}: {}",
        f.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn every_shipped_config_is_valid() {
    let files = toml_files(&repo().join("config"));
    assert!(!files.is_empty(), "no config files found");
    for f in files {
        assert_valid(&f);
    }
}

fn fixture_configs_valid_and_invalid() {
    let root = repo().join("tests/fixtures/config");
    let valid = toml_files(&root.join("valid"));
    let invalid = toml_files(&root.join("invalid"));
    assert!(
        !valid.is_empty() && !invalid.is_empty(),
        "fixture folders are empty"
    );
    for f in valid {
        assert_valid(&f);
    }
    for f in invalid {
        // Each invalid fixture says on its first line which key the error must name.
        let text = std::fs::read_to_string(&f).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: first line must be `# expect: <key>`", f.display()))
            .trim()
            .to_string();
        let out = check_config(&f);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was accepted", f.display());
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            err.contains(&name),
            "{name}: error does not name the file: {err}"
        );
        assert!(
            err.contains(&expect),
            "{name}: error does not name `{expect}`: {err}"
        );
    }
}

fn example_fp(id: &str) -> String {
    let csv = std::fs::read_to_string(repo().join("config/devices.csv")).unwrap();
    csv.lines()
        .find(|l| l.starts_with(&format!("{id},")))
        .map(|l| l.split(',').nth(7).unwrap().to_string())
        .unwrap()
}

fn check(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin())
        .arg("check")
        .args(["--config", "config/pforte.toml"])
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn check_explains_the_example_registry() {
    let cases = [
        ("D-1001", "alice", "", 0, "ALLOWED"),
        ("D-1003", "alice", "", 1, "private_device"),
        ("D-1003", "alice", "mail", 0, "ALLOWED"),
        ("D-1004", "alice", "", 1, "device_blocked"),
        ("D-1005", "alice", "", 1, "not_encrypted"),
        ("D-1006", "alice", "", 1, "patch_overdue"),
        ("D-1007", "alice", "", 1, "user_not_assigned"),
        ("D-1008", "dora", "", 1, "remote_work_not_permitted"),
        ("D-1009", "erik", "", 1, "device_clearance"),
        ("D-1011", "zoe", "", 1, "unknown_user"),
        ("D-1001", "alice", "lab", 1, "unknown_zone"),
    ];
    for (id, user, zone, code, needle) in cases {
        let fp = example_fp(id);
        let mut args = vec!["--cert-sha256", fp.as_str(), "--user", user];
        if !zone.is_empty() {
            args.extend(["--zone", zone]);
        }
        let (got, text) = check(&args);
        assert_eq!(got, code, "{id} {user}: {text}");
        assert!(text.contains(needle), "{id} {user}: {text}");
    }
    let fp = example_fp("D-1010");
    let (got, text) = check(&[
        "--cert-sha256",
        &fp,
        "--user",
        "alice",
        "--hwaddr",
        "aa:bb:cc:99:99:99",
    ]);
    assert_eq!(got, 1);
    assert!(text.contains("device_mismatch"), "{text}");
    let (got, text) = check(&["--cert-sha256", &"ab".repeat(32), "--user", "alice"]);
    assert_eq!(got, 1);
    assert!(text.contains("unregistered_device"), "{text}");
    // An error (missing config) is exit 2.
    let out = Command::new(bin())
        .args([
            "check",
            "--config",
            "/nonexistent.toml",
            "--user",
            "a",
            "--cert-sha256",
            "00",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The packages after `apt-get install` in `text` (continuation lines joined, options and the
/// command words dropped): the first such command only.
fn apt_packages(text: &str) -> Vec<String> {
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.trim_start().starts_with("apt-get install"))
        .unwrap_or_else(|| panic!("no `apt-get install` line in {text:?}"));
    line.split_whitespace()
        .skip(2)
        .filter(|w| !w.starts_with('-'))
        .map(str::to_owned)
        .collect()
}

/// The README's apt-get line and the one `.ci/run` runs name the same packages in the same order.
fn readme_and_ci_install_the_same_packages() {
    let read = |p: &str| std::fs::read_to_string(repo().join(p)).unwrap();
    let readme = apt_packages(&read("README.md"));
    let ci = apt_packages(&read(".ci/run"));
    assert!(readme.iter().any(|p| p == "openvpn"), "{readme:?}");
    assert_eq!(readme, ci, "README.md vs .ci/run");
}

/// The tests of this module, for the harness (`tests/it/main.rs`).
pub fn tests() -> Vec<Case> {
    vec![
        trial!(every_shipped_config_is_valid),
        trial!(fixture_configs_valid_and_invalid),
        trial!(check_explains_the_example_registry),
        trial!(readme_and_ci_install_the_same_packages),
    ]
}
