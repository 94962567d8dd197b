//! `pforte hook openvpn`: run by OpenVPN as tls-verify, client-connect and client-disconnect
//! script. One request to the daemon over the Unix socket, a dynamic config file on allow, exit
//! 0 or 1. The daemon unreachable or slower than the timeout: refuse (fail closed), unless
//! `--fail-open` says otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::app::ConnectResponse;
use crate::client::{ClientError, request_once};
use crate::vpn::openvpn::{self, HookSettings};

/// Exit code that accepts.
pub const ACCEPT: i32 = 0;
/// Exit code that refuses.
pub const REFUSE: i32 = 1;

/// The hook's options.
#[derive(Debug, Clone)]
pub struct HookOptions {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Instance and zone.
    pub settings: HookSettings,
    /// Time allowed for the whole request.
    pub timeout: Duration,
    /// Admit when the daemon cannot be asked (explicit choice; the default refuses).
    pub fail_open: bool,
    /// Arguments OpenVPN appended (depth and subject for tls-verify; the dynamic config file
    /// for client-connect).
    pub args: Vec<String>,
    /// Use OpenVPN's deferred client-connect: answer "deferred" at once and decide in a
    /// detached child, so a slow daemon never stalls OpenVPN's event loop.
    pub deferred: bool,
    /// Internal: this process is the detached child of a deferred client-connect.
    pub deferred_child: bool,
}

/// The process environment as text (odd bytes replaced; the policy refuses control bytes).
pub fn environment() -> HashMap<String, String> {
    std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// Runs the hook; returns the exit code. Each call is one blocking request
/// ([`request_once`]): no async runtime, which would cost a short-lived process more than the
/// request.
pub fn run_openvpn(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    let script_type = env.get("script_type").map(String::as_str).unwrap_or("");
    match script_type {
        "client-connect" if opts.deferred_child => deferred_child(opts, env),
        "client-connect" if opts.deferred => deferred_connect(opts, env),
        "client-connect" => client_connect(opts, env),
        "client-disconnect" => client_disconnect(opts, env),
        "tls-verify" => tls_verify(opts, env),
        other => {
            eprintln!(
                "pforte hook: unsupported script_type `{other}`; use it as tls-verify, client-connect or client-disconnect"
            );
            REFUSE
        }
    }
}

fn who(env: &HashMap<String, String>) -> String {
    let cn = env.get("common_name").map(String::as_str).unwrap_or("");
    let cn: String = cn.chars().take(64).filter(|c| !c.is_control()).collect();
    let addr: String = openvpn::remote_addr(env).chars().take(64).collect();
    format!("{cn}@{addr}")
}

/// What the daemon said, as OpenVPN needs it.
enum Verdict {
    /// Admit, with the dynamic config text.
    Allow(String),
    /// Refuse (the reason is already on stderr).
    Refuse,
}

/// `POST` of a JSON body to the daemon, bounded by the hook's timeout.
fn post(
    opts: &HookOptions,
    uri: &str,
    body: &impl serde::Serialize,
) -> Result<(u16, Vec<u8>), ClientError> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    request_once(&opts.socket, "POST", uri, &body, opts.timeout)
}

fn ask(opts: &HookOptions, env: &HashMap<String, String>) -> Verdict {
    let req = openvpn::connect_request(env, &opts.settings);
    let down = |why: String| {
        if daemon_down(opts, env, &why) == ACCEPT {
            Verdict::Allow(String::new())
        } else {
            Verdict::Refuse
        }
    };
    let resp: ConnectResponse = match post(opts, "/v1/connect", &req) {
        Ok((status, bytes)) => match serde_json::from_slice(&bytes) {
            Ok(resp) => resp,
            Err(_) => {
                let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
                return down(format!("unexpected answer (status {status}): {text}"));
            }
        },
        Err(e) => return down(e.to_string()),
    };
    if !resp.allowed() {
        let reason = resp.reason.map(|r| r.as_str()).unwrap_or("unknown");
        eprintln!("pforte: refused {}: {reason}: {}", who(env), resp.message);
        return Verdict::Refuse;
    }
    Verdict::Allow(
        resp.push
            .as_ref()
            .map(openvpn::dynamic_config)
            .unwrap_or_default(),
    )
}

fn client_connect(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    let Verdict::Allow(text) = ask(opts, env) else {
        return REFUSE;
    };
    let target = opts
        .args
        .last()
        .cloned()
        .or_else(|| env.get("client_connect_config_file").cloned());
    if let Some(path) = target
        && let Err(e) = std::fs::write(Path::new(&path), text)
    {
        eprintln!("pforte hook: cannot write {path}: {e}; refusing");
        return REFUSE;
    }
    ACCEPT
}

/// Deferred client-connect (OpenVPN 2.5+): write `2` into the deferred file, start a detached
/// child that asks the daemon, writes the config file and then `1` or `0`, and return at once.
fn deferred_connect(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    let (Some(deferred), Some(_)) = (
        env.get("client_connect_deferred_file"),
        env.get("client_connect_config_file"),
    ) else {
        eprintln!("pforte hook: OpenVPN offers no deferred client-connect here; deciding at once");
        return client_connect(opts, env);
    };
    if let Err(e) = std::fs::write(deferred, "2") {
        eprintln!("pforte hook: cannot write {deferred}: {e}; refusing");
        return REFUSE;
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pforte hook: cannot find my own binary: {e}; refusing");
            return REFUSE;
        }
    };
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["hook", "openvpn", "--deferred-child", "--socket"])
        .arg(&opts.socket)
        .args([
            "--zone",
            &opts.settings.zone,
            "--instance",
            &opts.settings.instance,
        ])
        .arg("--timeout")
        .arg(format!("{}ms", opts.timeout.as_millis()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .process_group(0);
    if opts.fail_open {
        cmd.arg("--fail-open");
    }
    // The child waits for this process to end before it writes anything (see
    // `wait_until_openvpn_has_read`).
    cmd.env(PARENT_ENV, std::process::id().to_string());
    match cmd.spawn() {
        Ok(_) => ACCEPT,
        Err(e) => {
            // Exit 0 with anything but `2` in the file is success to OpenVPN: never leave a
            // `0` there and exit 0. Decide at once instead, with the file emptied.
            eprintln!("pforte hook: cannot start the deferred decision: {e}; deciding at once");
            if let Err(e) = std::fs::write(deferred, "") {
                eprintln!("pforte hook: cannot write {deferred}: {e}; refusing");
                return REFUSE;
            }
            client_connect(opts, env)
        }
    }
}

/// Environment variable that hands the hook's process id to its deferred child.
const PARENT_ENV: &str = "PFORTE_DEFERRED_PARENT";

/// How long the deferred child waits after the hook process has ended before it writes.
const DEFERRED_GRACE: Duration = Duration::from_millis(200);

/// Waits until OpenVPN has read the `2` the hook wrote, as far as a script can tell.
///
/// OpenVPN 2.6 reads the deferred file once right after the script exits
/// (`multi_client_connect_call_script` in multi.c) and takes anything but `2` there, a `0` or
/// an empty file included, for success: a refusal written before that read admits the client
/// (seen with fast answers in `benches/openvpn_connect.rs`). The child therefore waits until
/// the hook process has ended (its parent changes) and then [`DEFERRED_GRACE`] more, for
/// OpenVPN's read that follows at once; later reads are the deferred polls, which treat `0`
/// as refusal. Bounded by `timeout`.
fn wait_until_openvpn_has_read(env: &HashMap<String, String>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    if let Some(parent) = env.get(PARENT_ENV).and_then(|p| p.parse::<u32>().ok()) {
        while std::os::unix::process::parent_id() == parent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    std::thread::sleep(DEFERRED_GRACE.min(deadline.saturating_duration_since(Instant::now())));
}

/// The detached half of a deferred client-connect.
fn deferred_child(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    let (Some(deferred), Some(config)) = (
        env.get("client_connect_deferred_file"),
        env.get("client_connect_config_file"),
    ) else {
        return REFUSE;
    };
    let answer = ask(opts, env);
    wait_until_openvpn_has_read(env, opts.timeout);
    let verdict = match answer {
        Verdict::Allow(text) => match std::fs::write(config, text) {
            Ok(()) => "1",
            Err(e) => {
                eprintln!("pforte hook: cannot write {config}: {e}; refusing");
                "0"
            }
        },
        Verdict::Refuse => "0",
    };
    match std::fs::write(deferred, verdict) {
        Ok(()) => ACCEPT,
        Err(e) => {
            eprintln!("pforte hook: cannot write {deferred}: {e}");
            REFUSE
        }
    }
}

fn daemon_down(opts: &HookOptions, env: &HashMap<String, String>, why: &str) -> i32 {
    if opts.fail_open {
        eprintln!(
            "pforte hook: daemon at {} unreachable ({why}); ADMITTING {} because --fail-open is set",
            opts.socket.display(),
            who(env)
        );
        ACCEPT
    } else {
        eprintln!(
            "pforte hook: daemon at {} unreachable ({why}); refusing {} (fail closed)",
            opts.socket.display(),
            who(env)
        );
        REFUSE
    }
}

fn client_disconnect(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    let req = openvpn::disconnect_request(env, &opts.settings);
    match post(opts, "/v1/disconnect", &req) {
        Ok((200, _)) => {}
        Ok((status, bytes)) => eprintln!(
            "pforte hook: disconnect of {} not recorded: status {status}: {}",
            who(env),
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ),
        Err(e) => eprintln!("pforte hook: disconnect of {} not recorded: {e}", who(env)),
    }
    // OpenVPN ignores the exit code of client-disconnect; the daemon reconciles later.
    ACCEPT
}

fn tls_verify(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    // OpenVPN calls tls-verify once per certificate depth, the CA first; only depth 0 is the
    // client's own certificate.
    if opts.args.first().map(String::as_str) != Some("0") {
        return ACCEPT;
    }
    let req = openvpn::connect_request(env, &opts.settings);
    match post(opts, "/v1/verify", &req) {
        Ok((200, _)) => ACCEPT,
        Ok((_, body)) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            eprintln!(
                "pforte: refused {} at TLS: {}: {}",
                who(env),
                v["reason"].as_str().unwrap_or("unknown"),
                v["message"].as_str().unwrap_or("")
            );
            REFUSE
        }
        Err(e) => daemon_down(opts, env, &e.to_string()),
    }
}
