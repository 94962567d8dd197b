//! `pforte hook openvpn` as OpenVPN runs it: no inherited environment, only OpenVPN's
//! variables and `setenv` ones, arguments appended.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::harness::{Case, trial};
use crate::common::*;

fn ovpn_env(dev: &Dev, user: &str, port: u16, script_type: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = vec![
        ("script_type", script_type.to_string()),
        ("common_name", user.to_string()),
        ("tls_digest_sha256_0", dev.fp()),
        ("tls_serial_0", "4096".into()),
        ("IV_PLAT", "linux".into()),
        ("trusted_ip", "198.51.100.9".into()),
        ("trusted_port", port.to_string()),
        ("untrusted_ip", "198.51.100.9".into()),
        ("untrusted_port", port.to_string()),
        ("time_unix", "1795440000".into()),
        ("ifconfig_pool_remote_ip", "10.213.0.50".into()),
        ("password", "hunter2-should-never-appear".into()),
        ("PFORTE_ZONE", "office".into()),
        ("PFORTE_INSTANCE", "office-udp".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if !dev.hwaddr.is_empty() {
        v.push(("IV_HWADDR".into(), dev.hwaddr.clone()));
    }
    v
}

fn run_hook(socket: &std::path::Path, env: &[(String, String)], args: &[&str]) -> Output {
    Command::new(bin())
        .args(["hook", "openvpn", "--socket"])
        .arg(socket)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

fn client_connect_writes_the_dynamic_config_and_disconnect_frees_the_seat() {
    let good = Dev::good("D-H1", "alice");
    let private = Dev {
        ownership: "private",
        ..Dev::good("D-H2", "alice")
    };
    let f = Fixture::new(
        Setup {
            max_sessions: 1,
            ..Setup::default()
        },
        &[good.clone(), private.clone()],
    );
    let d = f.start();
    let ccd = f.path("ccd-out");
    let out = run_hook(
        &d.socket,
        &ovpn_env(&good, "alice", 40001, "client-connect"),
        &[ccd.to_str().unwrap()],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&ccd).unwrap();
    assert_eq!(
        text,
        "ifconfig-push 10.213.0.2 255.255.255.0\npush \"route 10.1.0.0 255.255.0.0\"\n"
    );
    assert_eq!(d.metric("pforte_seats_used"), Some(1.0));

    // A private device is refused with one line naming the reason.
    let out = run_hook(
        &d.socket,
        &ovpn_env(&private, "alice", 40002, "client-connect"),
        &[f.path("ccd2").to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("private_device"), "{err}");
    assert!(!f.path("ccd2").exists());
    // OpenVPN then runs client-disconnect for the refused client: it must not free alice's seat.
    let out = run_hook(
        &d.socket,
        &ovpn_env(&private, "alice", 40002, "client-disconnect"),
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(d.metric("pforte_seats_used"), Some(1.0));

    // The real disconnect frees it and counts the bytes.
    let mut env = ovpn_env(&good, "alice", 40001, "client-disconnect");
    env.push(("bytes_received".into(), "1234".into()));
    env.push(("bytes_sent".into(), "5678".into()));
    env.push(("time_duration".into(), "60".into()));
    let out = run_hook(&d.socket, &env, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.metric("pforte_seats_used"), Some(0.0));
    assert_eq!(
        d.metric("pforte_session_sent_bytes_total{org_unit=\"it\",zone=\"office\"}"),
        Some(5678.0)
    );
    assert!(
        !d.log().contains("hunter2"),
        "password leaked into the daemon log"
    );
    assert!(
        !std::fs::read_to_string(f.path("state/audit.log"))
            .unwrap()
            .contains("hunter2")
    );
}

fn tls_verify_checks_the_device_at_depth_zero_only() {
    let private = Dev {
        ownership: "private",
        ..Dev::good("D-T1", "alice")
    };
    let good = Dev {
        hwaddr: "aa:bb:cc:00:00:07".into(),
        ..Dev::good("D-T2", "alice")
    };
    let f = Fixture::new(Setup::default(), &[private.clone(), good.clone()]);
    let d = f.start();
    let out = run_hook(
        &d.socket,
        &ovpn_env(&private, "alice", 1, "tls-verify"),
        &["1", "CN=Test CA"],
    );
    assert_eq!(out.status.code(), Some(0), "CA depth passes");
    let out = run_hook(
        &d.socket,
        &ovpn_env(&private, "alice", 1, "tls-verify"),
        &["0", "CN=alice"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("private_device"));
    // At tls-verify OpenVPN has no IV_HWADDR yet: a registered address is not a mismatch here.
    let mut env = ovpn_env(&good, "alice", 1, "tls-verify");
    env.retain(|(k, _)| k != "IV_HWADDR");
    let out = run_hook(&d.socket, &env, &["0", "CN=alice"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        d.metric("pforte_seats_used"),
        Some(0.0),
        "verify admits nobody"
    );
}

fn daemon_unreachable_fails_closed_unless_fail_open() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.sock");
    let dev = Dev::good("D-X", "alice");
    let env = ovpn_env(&dev, "alice", 1, "client-connect");
    let out = run_hook(&missing, &env, &[dir.path().join("ccd").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fail closed") && err.lines().count() == 1,
        "{err}"
    );
    let out = run_hook(
        &missing,
        &env,
        &["--fail-open", dir.path().join("ccd").to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ADMITTING"));
}

fn slow_daemon_is_refused_after_the_timeout() {
    // A socket that accepts and never answers.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slow.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let holder = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        drop(conn);
    });
    let env = ovpn_env(&Dev::good("D-X", "alice"), "alice", 1, "client-connect");
    let started = Instant::now();
    let out = run_hook(
        &path,
        &env,
        &[
            "--timeout",
            "300ms",
            dir.path().join("ccd").to_str().unwrap(),
        ],
    );
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert!(took < Duration::from_secs(2), "hook waited {took:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no answer within"));
    holder.join().unwrap();
}

/// `--deferred` as OpenVPN 2.6 drives it: the hook writes `2` and exits; OpenVPN reads the file
/// right after the exit and takes anything but `2` there as success, so a refusal must not be
/// written before that read. An allow may be written at once.
fn deferred_refusal_waits_for_openvpns_first_read_and_an_allow_does_not() {
    let good = Dev::good("D-DF1", "alice");
    let private = Dev {
        ownership: "private",
        ..Dev::good("D-DF2", "alice")
    };
    let f = Fixture::new(Setup::default(), &[good.clone(), private.clone()]);
    let d = f.start();
    let run_deferred = |dev: &Dev, port: u16, tag: &str| {
        let deferred = f.path(&format!("deferred-{tag}"));
        let config = f.path(&format!("cc-{tag}"));
        // OpenVPN makes both files, empty, before it runs the script.
        std::fs::write(&deferred, "").unwrap();
        std::fs::write(&config, "").unwrap();
        let mut env = ovpn_env(dev, "alice", port, "client-connect");
        env.push((
            "client_connect_deferred_file".into(),
            deferred.display().to_string(),
        ));
        env.push((
            "client_connect_config_file".into(),
            config.display().to_string(),
        ));
        let log = std::fs::File::create(f.path(&format!("stderr-{tag}"))).unwrap();
        let started = Instant::now();
        let status = Command::new(bin())
            .args([
                "hook",
                "openvpn",
                "--deferred",
                "--timeout",
                "10s",
                "--socket",
            ])
            .arg(&d.socket)
            .arg(&config)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(0), "deferred hook exit");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the deferred hook waited {:?}",
            started.elapsed()
        );
        (deferred, config)
    };
    let until = |path: &std::path::Path, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = std::fs::read_to_string(path).unwrap_or_default();
            if now == want || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };

    // Refused: long after the daemon has answered, the file still says `2` at OpenVPN's first
    // read; the `0` follows that read.
    let (deferred, _) = run_deferred(&private, 41001, "refused");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        std::fs::read_to_string(&deferred).unwrap(),
        "2",
        "a refusal was written before OpenVPN's first read: {}",
        std::fs::read_to_string(f.path("stderr-refused")).unwrap_or_default()
    );
    assert_eq!(until(&deferred, "0"), "0");
    assert!(
        std::fs::read_to_string(f.path("stderr-refused"))
            .unwrap()
            .contains("private_device")
    );

    // Allowed: the config file and then `1`, without waiting for any read.
    let (deferred, config) = run_deferred(&good, 41002, "allowed");
    assert_eq!(until(&deferred, "1"), "1");
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .starts_with("ifconfig-push "),
        "config file: {:?}",
        std::fs::read_to_string(&config)
    );
    assert_eq!(d.metric("pforte_seats_used"), Some(1.0));
}

/// The tests of this module, for the harness (`tests/it/main.rs`).
pub fn tests() -> Vec<Case> {
    vec![
        trial!(client_connect_writes_the_dynamic_config_and_disconnect_frees_the_seat),
        trial!(tls_verify_checks_the_device_at_depth_zero_only),
        trial!(daemon_unreachable_fails_closed_unless_fail_open),
        trial!(slow_daemon_is_refused_after_the_timeout),
        trial!(deferred_refusal_waits_for_openvpns_first_read_and_an_allow_does_not),
    ]
}
