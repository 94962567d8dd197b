//! `pforte hook openvpn`: run by OpenVPN as tls-verify, client-connect and client-disconnect
//! script. One request to the daemon over the Unix socket, a dynamic config file on allow, exit
//! 0 or 1. The daemon unreachable or slower than the timeout: refuse (fail closed), unless
//! `--fail-open` says otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::{ClientError, request_once};
use crate::vpn::openvpn::{self, HookSettings};
use crate::wire::ConnectResponse;

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

/// Deferred client-connect (OpenVPN 2.5+): write `2` into the deferred file, start a detached
/// child that asks the daemon and writes the config file and the verdict, and return as soon
/// as the child is watching the deferred file (see [`deferred_child`]).
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
    // Exit 0 with anything but `2` in the file is success to OpenVPN: never leave a `0` there
    // and exit 0. If the child cannot take over, decide at once, with the file emptied.
    let decide_now = |why: String| {
        eprintln!("pforte hook: cannot start the deferred decision: {why}; deciding at once");
        if let Err(e) = std::fs::write(deferred, "") {
            eprintln!("pforte hook: cannot write {deferred}: {e}; refusing");
            return REFUSE;
        }
        client_connect(opts, env)
    };
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return decide_now(format!("cannot find my own binary: {e}")),
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
        .stdout(std::process::Stdio::piped())
        .process_group(0);
    if opts.fail_open {
        cmd.arg("--fail-open");
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return decide_now(e.to_string()),
    };
    // The child says `1` on its stdout once it watches the deferred file; only then may
    // OpenVPN read it (which it does right after this process exits).
    let ready = child
        .stdout
        .take()
        .map(|out| read_ready(out, DEFERRED_READY_WAIT))
        .unwrap_or(false);
    if ready {
        ACCEPT
    } else {
        let _ = child.kill();
        let _ = child.wait();
        decide_now("the decision process did not get ready".into())
    }
}

/// How long the hook waits for its deferred child to watch the deferred file.
const DEFERRED_READY_WAIT: Duration = Duration::from_secs(1);

/// Reads the child's readiness byte, bounded by `wait`.
fn read_ready(out: std::process::ChildStdout, wait: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::io::Read as _;
    use std::os::fd::AsFd as _;
    let ms = PollTimeout::try_from(wait).unwrap_or(PollTimeout::NONE);
    let readable = {
        let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, ms), Ok(n) if n > 0)
    };
    let mut byte = [0u8; 1];
    let mut out = out;
    readable && matches!(out.read(&mut byte), Ok(1)) && byte[0] == b'1'
}

/// The detached half of a deferred client-connect.
///
/// OpenVPN 2.6 reads the deferred file once right after the hook exits
/// (`multi_client_connect_call_script` in multi.c) and takes anything but `2` there, a `0` or
/// an empty file included, for success; later reads are the deferred polls, where `0` refuses.
/// A refusal written before that first read would admit the client (seen with fast answers in
/// `benches/openvpn_connect.rs`). So the child watches the file with inotify before the hook
/// exits, and:
/// - an allow is written at once (the config file first, then `1`): success at any read;
/// - a refusal is written only after a read of the file has been seen (nobody else reads
///   it: the hook only wrote it), so OpenVPN's first read has happened; if none is seen
///   within the time bound, the `2` stays and OpenVPN's own deferred timeout refuses the
///   client.
fn deferred_child(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    let started = Instant::now();
    let (Some(deferred), Some(config)) = (
        env.get("client_connect_deferred_file"),
        env.get("client_connect_config_file"),
    ) else {
        return REFUSE;
    };
    let watch = match watch_reads(Path::new(deferred)) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("pforte hook: cannot watch {deferred}: {e}");
            return REFUSE; // no readiness byte: the hook decides at once
        }
    };
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if out.write_all(b"1").and_then(|()| out.flush()).is_err() {
            return REFUSE;
        }
    }
    let verdict = match ask(opts, env) {
        Verdict::Allow(text) => match write_config(Path::new(config), &text) {
            Ok(()) => "1",
            Err(e) => {
                eprintln!("pforte hook: cannot write {config}: {e}; refusing");
                "0"
            }
        },
        Verdict::Refuse => "0",
    };
    if verdict == "0" {
        let left = opts.timeout.saturating_sub(started.elapsed());
        if !wait_for_read(&watch, left) {
            eprintln!(
                "pforte hook: OpenVPN did not read {deferred} within the time bound; leaving it deferred (OpenVPN's own timeout refuses)"
            );
            return REFUSE;
        }
    }
    // Written over the `2` in place (no truncation first): a poll never sees an empty file.
    match write_config(Path::new(deferred), verdict) {
        Ok(()) => ACCEPT,
        Err(e) => {
            eprintln!("pforte hook: cannot write {deferred}: {e}");
            REFUSE
        }
    }
}

/// An inotify watch for reads of one file.
fn watch_reads(path: &Path) -> nix::Result<nix::sys::inotify::Inotify> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    ino.add_watch(
        path,
        AddWatchFlags::IN_ACCESS | AddWatchFlags::IN_CLOSE_NOWRITE,
    )?;
    Ok(ino)
}

/// Waits until the watched file has been read, at most `wait`. Reads seen before the call
/// count (they are queued in the watch).
fn wait_for_read(ino: &nix::sys::inotify::Inotify, wait: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::inotify::AddWatchFlags;
    use std::os::fd::AsFd as _;
    let deadline = Instant::now() + wait;
    loop {
        match ino.read_events() {
            Ok(events)
                if events.iter().any(|e| {
                    e.mask
                        .intersects(AddWatchFlags::IN_ACCESS | AddWatchFlags::IN_CLOSE_NOWRITE)
                }) =>
            {
                return true;
            }
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
            Err(_) => return false,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::NONE);
        if poll(&mut fds, ms).is_err() {
            return false;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The deferred child may write a refusal only after the deferred file has been read:
    /// a read is seen (also one that came before the wait), a write is not, and without a
    /// read the wait ends at its bound.
    #[test]
    fn deferred_child_sees_reads_of_the_deferred_file_and_only_reads() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("deferred");
        std::fs::write(&file, "2").unwrap();
        let watch = watch_reads(&file).unwrap();
        // Writes (the hook's own, or ours) are not reads.
        std::fs::write(&file, "2").unwrap();
        let t = Instant::now();
        assert!(!wait_for_read(&watch, Duration::from_millis(100)));
        assert!(t.elapsed() >= Duration::from_millis(100));
        // A read from elsewhere, while the child waits.
        let reader = {
            let file = file.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                std::fs::read_to_string(&file).unwrap()
            })
        };
        assert!(wait_for_read(&watch, Duration::from_secs(5)));
        assert_eq!(reader.join().unwrap(), "2");
        // A read that happened before the wait began counts too.
        let watch = watch_reads(&file).unwrap();
        std::fs::read_to_string(&file).unwrap();
        assert!(wait_for_read(&watch, Duration::from_millis(1)));
    }

    #[test]
    fn read_ready_wants_the_byte_within_its_bound() {
        use std::process::{Command, Stdio};
        let spawn = |script: &str| {
            Command::new("/bin/sh")
                .args(["-c", script])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut ok = spawn("printf 1; sleep 5");
        assert!(read_ready(
            ok.stdout.take().unwrap(),
            Duration::from_secs(5)
        ));
        let _ = ok.kill();
        let _ = ok.wait();
        let mut silent = spawn("sleep 5");
        let t = Instant::now();
        assert!(!read_ready(
            silent.stdout.take().unwrap(),
            Duration::from_millis(100)
        ));
        assert!(t.elapsed() < Duration::from_secs(2));
        let _ = silent.kill();
        let _ = silent.wait();
        let mut wrong = spawn("printf 0");
        assert!(!read_ready(
            wrong.stdout.take().unwrap(),
            Duration::from_secs(5)
        ));
        let _ = wrong.wait();
        let mut gone = spawn("exit 0");
        assert!(!read_ready(
            gone.stdout.take().unwrap(),
            Duration::from_secs(5)
        ));
        let _ = gone.wait();
    }

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
