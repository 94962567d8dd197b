//! `pforte hook openvpn`: run by OpenVPN as tls-verify, client-connect and client-disconnect
//! script. One request to the daemon over the Unix socket, a dynamic config file on allow, exit
//! 0 or 1. The daemon unreachable or slower than the timeout: refuse (fail closed), unless
//! `--fail-open` says otherwise. `pforte hook ocserv` ([`ocserv`]): ocserv's connect-script and
//! disconnect-script.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::{ClientError, request_once};
use crate::vpn::openvpn::{self, HookSettings};
mod deferred;
pub mod ocserv;

use crate::wire::ConnectResponse;
use deferred::{deferred_child, deferred_connect};

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

/// Defaults of the hook's options, shared with the full command line in `main.rs`.
pub const DEFAULT_SOCKET: &str = "/run/pforte/pforte.sock";
/// Default instance name.
pub const DEFAULT_INSTANCE: &str = "openvpn";
/// Default time bound.
pub const DEFAULT_TIMEOUT: &str = "2s";

/// Parses a duration like `2s` or `500ms` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 2s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        _ => Err(format!("`{s}` is not a duration like 2s or 500ms")),
    }
}

/// Reads the command line of `pforte hook openvpn …` (everything after `openvpn`) the way the
/// full parser in `main.rs` does, without building the whole command tree first: the hook runs
/// once per VPN connect and should cost little more than its one request. `None` for anything
/// unusual (help, an unknown or malformed option, bytes that are not UTF-8); the caller then
/// lets the full parser answer it, errors and help included.
pub fn fast_args(
    args: &[std::ffi::OsString],
    env: impl Fn(&str) -> Option<String>,
) -> Option<HookOptions> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    let mut socket: Option<String> = None;
    let mut zone: Option<String> = None;
    let mut instance: Option<String> = None;
    let mut timeout: Option<String> = None;
    let (mut fail_open, mut deferred, mut deferred_child) = (false, false, false);
    let mut rest: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let arg = arg.to_str()?;
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg, None),
        };
        let slot = match name {
            "--socket" => &mut socket,
            "--zone" => &mut zone,
            "--instance" => &mut instance,
            "--timeout" => &mut timeout,
            "--fail-open" | "--deferred" | "--deferred-child" if inline.is_none() => {
                match name {
                    "--fail-open" => fail_open = true,
                    "--deferred" => deferred = true,
                    _ => deferred_child = true,
                }
                continue;
            }
            "--" => {
                for a in it.by_ref() {
                    rest.push(a.to_str()?.to_string());
                }
                break;
            }
            _ if arg.starts_with('-') => return None,
            _ => {
                // The first positional starts the arguments OpenVPN appends; all after it
                // are taken as they are.
                rest.push(arg.to_string());
                for a in it.by_ref() {
                    rest.push(a.to_str()?.to_string());
                }
                break;
            }
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(match inline {
            Some(v) => v,
            None => it.next()?.to_str()?.to_string(),
        });
    }
    let timeout = timeout
        .or_else(|| var("PFORTE_TIMEOUT"))
        .unwrap_or_else(|| DEFAULT_TIMEOUT.into());
    Some(HookOptions {
        socket: PathBuf::from(
            socket
                .or_else(|| var("PFORTE_SOCKET"))
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
        ),
        settings: HookSettings {
            instance: instance
                .or_else(|| var("PFORTE_INSTANCE"))
                .unwrap_or_else(|| DEFAULT_INSTANCE.into()),
            zone: zone.or_else(|| var("PFORTE_ZONE")).unwrap_or_default(),
        },
        timeout: parse_duration(&timeout).ok()?,
        fail_open,
        args: rest,
        deferred,
        deferred_child,
    })
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
        && let Err(e) = write_config(Path::new(&path), &text)
    {
        eprintln!("pforte hook: cannot write {path}: {e}; refusing");
        return REFUSE;
    }
    ACCEPT
}

/// Writes the dynamic config file OpenVPN handed over (it made the file, empty). Written over
/// and cut to length only if it was longer, rather than opened with `O_TRUNC`: truncating a
/// file with data to zero makes ext4 (`auto_da_alloc`) flush it on close, a disk write inside
/// OpenVPN's event loop.
fn write_config(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let before = f.metadata()?.len();
    f.write_all(text.as_bytes())?;
    if before > text.len() as u64 {
        f.set_len(text.len() as u64)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_args_take_flags_over_environment_over_defaults() {
        let words =
            |s: &str| -> Vec<std::ffi::OsString> { s.split_whitespace().map(Into::into).collect() };
        let env = |k: &str| match k {
            "PFORTE_SOCKET" => Some("/env.sock".to_string()),
            "PFORTE_ZONE" => Some("env-zone".to_string()),
            "PFORTE_TIMEOUT" => Some("750ms".to_string()),
            "PFORTE_INSTANCE" => Some(String::new()), // empty: as if unset
            _ => None,
        };
        let o = fast_args(&words("--zone flag-zone /tmp/cc"), env).unwrap();
        assert_eq!(o.socket, PathBuf::from("/env.sock"));
        assert_eq!(o.settings.zone, "flag-zone");
        assert_eq!(o.settings.instance, DEFAULT_INSTANCE);
        assert_eq!(o.timeout, Duration::from_millis(750));
        assert_eq!(o.args, vec!["/tmp/cc".to_string()]);
        let o = fast_args(&words("/tmp/cc"), |_| None).unwrap();
        assert_eq!(o.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(o.timeout, Duration::from_secs(2));
        assert!(!o.fail_open && !o.deferred && !o.deferred_child);
        // A malformed time bound from the environment is not silently replaced by the default.
        assert!(
            fast_args(&words("/tmp/cc"), |k| (k == "PFORTE_TIMEOUT")
                .then(|| "soon".into()))
            .is_none()
        );
    }

    #[test]
    fn write_config_leaves_exactly_the_new_text() {
        let dir = tempfile::tempdir().unwrap();
        let text = "ifconfig-push 10.0.0.2 255.255.255.0\n";
        // OpenVPN's case: the file exists and is empty.
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "").unwrap();
        write_config(&empty, text).unwrap();
        assert_eq!(std::fs::read_to_string(&empty).unwrap(), text);
        // A longer file left over (a reused name): nothing of it may remain.
        let longer = dir.path().join("longer");
        std::fs::write(&longer, "x".repeat(500)).unwrap();
        write_config(&longer, text).unwrap();
        assert_eq!(std::fs::read_to_string(&longer).unwrap(), text);
        // An allow without anything to push empties it.
        write_config(&longer, "").unwrap();
        assert_eq!(std::fs::read_to_string(&longer).unwrap(), "");
        // A file that does not exist yet is made.
        let fresh = dir.path().join("fresh");
        write_config(&fresh, text).unwrap();
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), text);
    }
}
