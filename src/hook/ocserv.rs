//! `pforte hook ocserv`: ocserv's `connect-script` and `disconnect-script` (ocserv runs the same
//! program for both, with `REASON=connect` or `REASON=disconnect`, no arguments). The connect
//! asks the daemon and exits 0 to admit or 1 to refuse (ocserv then drops the client: a real
//! check before admission); the disconnect hands over the final byte counts. ocserv reads
//! nothing back from the script but its exit code, so nothing is written.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::{ACCEPT, DEFAULT_SOCKET, DEFAULT_TIMEOUT, REFUSE, parse_duration};
use crate::client::request_once;
use crate::vpn::ocserv::{self, DeviceField, OcservSettings};
use crate::wire::ConnectResponse;

/// The name under which the binary, called through a link, is `pforte hook ocserv` (ocserv
/// passes a script no arguments).
pub const LINK_NAME: &str = "pforte-hook-ocserv";

/// Default instance name of `pforte hook ocserv`.
pub const DEFAULT_INSTANCE: &str = "ocserv";

/// The ocserv hook's options.
#[derive(Debug, Clone)]
pub struct OcservHookOptions {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Instance, zone and where the device id is.
    pub settings: OcservSettings,
    /// Time allowed for the whole request.
    pub timeout: Duration,
    /// Admit when the daemon cannot be asked (explicit choice; the default refuses).
    pub fail_open: bool,
}

/// Reads `pforte hook ocserv …` (everything after `ocserv`) without clap, as
/// [`super::fast_args`] does for OpenVPN. `None` for anything unusual; clap then answers.
pub fn fast_args(
    args: &[std::ffi::OsString],
    env: impl Fn(&str) -> Option<String>,
) -> Option<OcservHookOptions> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    let mut values: [Option<String>; 5] = Default::default();
    let names = [
        "--socket",
        "--zone",
        "--instance",
        "--timeout",
        "--device-from",
    ];
    let mut fail_open = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let arg = arg.to_str()?;
        if arg == "--fail-open" {
            fail_open = true;
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (arg, None),
        };
        let i = names.iter().position(|n| *n == name)?;
        if values[i].is_some() {
            return None;
        }
        values[i] = Some(match inline {
            Some(v) => v,
            None => it.next()?.to_str()?.to_string(),
        });
    }
    let [socket, zone, instance, timeout, device_from] = values;
    let timeout = timeout
        .or_else(|| var("PFORTE_TIMEOUT"))
        .unwrap_or_else(|| DEFAULT_TIMEOUT.into());
    let device_from = device_from
        .or_else(|| var("PFORTE_DEVICE_FROM"))
        .unwrap_or_else(|| "groupname".into());
    Some(OcservHookOptions {
        socket: PathBuf::from(
            socket
                .or_else(|| var("PFORTE_SOCKET"))
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
        ),
        settings: OcservSettings {
            instance: instance
                .or_else(|| var("PFORTE_INSTANCE"))
                .unwrap_or_else(|| DEFAULT_INSTANCE.into()),
            zone: zone.or_else(|| var("PFORTE_ZONE")).unwrap_or_default(),
            device_from: DeviceField::parse(&device_from)?,
        },
        timeout: parse_duration(&timeout).ok()?,
        fail_open,
    })
}

fn who(env: &HashMap<String, String>) -> String {
    let pick = |k: &str| -> String {
        env.get(k)
            .map(String::as_str)
            .unwrap_or("")
            .chars()
            .take(64)
            .filter(|c| !c.is_control())
            .collect()
    };
    format!(
        "{}/{}@{} (id {})",
        pick("USERNAME"),
        pick("GROUPNAME"),
        pick("IP_REAL"),
        pick("ID")
    )
}

/// Runs the hook; returns the exit code.
pub fn run(opts: &OcservHookOptions, env: &HashMap<String, String>) -> i32 {
    match env.get("REASON").map(String::as_str).unwrap_or("") {
        "connect" => connect(opts, env),
        "disconnect" => disconnect(opts, env),
        // host-update-script: nothing to decide.
        "host-update" => ACCEPT,
        other => {
            eprintln!(
                "pforte hook ocserv: unsupported REASON `{other}`; use it as connect-script and disconnect-script"
            );
            REFUSE
        }
    }
}

fn post(
    opts: &OcservHookOptions,
    uri: &str,
    body: &impl serde::Serialize,
) -> Result<(u16, Vec<u8>), String> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    request_once(&opts.socket, "POST", uri, &body, opts.timeout).map_err(|e| e.to_string())
}

fn connect(opts: &OcservHookOptions, env: &HashMap<String, String>) -> i32 {
    let req = ocserv::connect_request(env, &opts.settings);
    let answer = post(opts, "/v1/connect", &req).and_then(|(status, bytes)| {
        serde_json::from_slice::<ConnectResponse>(&bytes).map_err(|_| {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            format!("unexpected answer (status {status}): {text}")
        })
    });
    match answer {
        Ok(resp) if resp.allowed() => ACCEPT,
        Ok(resp) => {
            let reason = resp.reason.map(|r| r.as_str()).unwrap_or("unknown");
            eprintln!("pforte: refused {}: {reason}: {}", who(env), resp.message);
            REFUSE
        }
        Err(why) if opts.fail_open => {
            eprintln!(
                "pforte hook ocserv: daemon at {} unreachable ({why}); ADMITTING {} because --fail-open is set",
                opts.socket.display(),
                who(env)
            );
            ACCEPT
        }
        Err(why) => {
            eprintln!(
                "pforte hook ocserv: daemon at {} unreachable ({why}); refusing {} (fail closed)",
                opts.socket.display(),
                who(env)
            );
            REFUSE
        }
    }
}

fn disconnect(opts: &OcservHookOptions, env: &HashMap<String, String>) -> i32 {
    let req = ocserv::disconnect_request(env, &opts.settings);
    match post(opts, "/v1/disconnect", &req) {
        Ok((200, _)) => {}
        Ok((status, bytes)) => eprintln!(
            "pforte hook ocserv: disconnect of {} not recorded: status {status}: {}",
            who(env),
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ),
        Err(e) => eprintln!(
            "pforte hook ocserv: disconnect of {} not recorded: {e}",
            who(env)
        ),
    }
    // ocserv ignores the disconnect-script's exit code; the occtl watcher reconciles later.
    ACCEPT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_args_read_flags_then_environment() {
        let words =
            |s: &str| -> Vec<std::ffi::OsString> { s.split_whitespace().map(Into::into).collect() };
        let env = |k: &str| match k {
            "PFORTE_ZONE" => Some("env-zone".to_string()),
            "PFORTE_DEVICE_FROM" => Some("username".to_string()),
            _ => None,
        };
        let o = fast_args(&words("--instance ssl --socket=/s.sock"), env).unwrap();
        assert_eq!(o.settings.instance, "ssl");
        assert_eq!(o.settings.zone, "env-zone");
        assert_eq!(o.settings.device_from, DeviceField::Username);
        assert_eq!(o.socket, PathBuf::from("/s.sock"));
        let o = fast_args(&words(""), |_| None).unwrap();
        assert_eq!(o.settings.instance, DEFAULT_INSTANCE);
        assert_eq!(o.settings.device_from, DeviceField::Groupname);
        assert!(!o.fail_open);
        assert!(fast_args(&words("--device-from cn"), |_| None).is_none());
        assert!(fast_args(&words("--zone a --zone b"), |_| None).is_none());
        assert!(fast_args(&words("positional"), |_| None).is_none());
    }

    #[test]
    fn unknown_reason_refuses_and_host_update_accepts() {
        let opts = fast_args(&[], |_| None).unwrap();
        let env = |r: &str| HashMap::from([("REASON".to_string(), r.to_string())]);
        assert_eq!(run(&opts, &env("host-update")), ACCEPT);
        assert_eq!(run(&opts, &env("")), REFUSE);
    }
}
