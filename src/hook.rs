//! `pforte hook openvpn`: run by OpenVPN as tls-verify, client-connect and client-disconnect
//! script. One request to the daemon over the Unix socket, a dynamic config file on allow, exit
//! 0 or 1. The daemon unreachable or slower than the timeout: refuse (fail closed), unless
//! `--fail-open` says otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::UnixClient;
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

/// Runs the hook; returns the exit code.
pub fn run_openvpn(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    let script_type = env.get("script_type").map(String::as_str).unwrap_or("");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pforte hook: cannot start: {e}");
            return unreachable_code(opts);
        }
    };
    match script_type {
        "client-connect" => runtime.block_on(client_connect(opts, env)),
        "client-disconnect" => runtime.block_on(client_disconnect(opts, env)),
        "tls-verify" => runtime.block_on(tls_verify(opts, env)),
        other => {
            eprintln!(
                "pforte hook: unsupported script_type `{other}`; use it as tls-verify, client-connect or client-disconnect"
            );
            REFUSE
        }
    }
}

fn unreachable_code(opts: &HookOptions) -> i32 {
    if opts.fail_open { ACCEPT } else { REFUSE }
}

fn who(env: &HashMap<String, String>) -> String {
    let cn = env.get("common_name").map(String::as_str).unwrap_or("");
    let cn: String = cn.chars().take(64).filter(|c| !c.is_control()).collect();
    let addr: String = openvpn::remote_addr(env).chars().take(64).collect();
    format!("{cn}@{addr}")
}

async fn client_connect(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    let req = openvpn::connect_request(env, &opts.settings);
    let call = async {
        let mut c = UnixClient::connect(&opts.socket).await?;
        c.connect_request(&req).await
    };
    let resp = match tokio::time::timeout(opts.timeout, call).await {
        Ok(Ok((_, resp))) => resp,
        Ok(Err(e)) => return daemon_down(opts, env, &e.to_string()),
        Err(_) => return daemon_down(opts, env, &format!("no answer within {:?}", opts.timeout)),
    };
    if !resp.allowed() {
        let reason = resp.reason.map(|r| r.as_str()).unwrap_or("unknown");
        eprintln!("pforte: refused {}: {reason}: {}", who(env), resp.message);
        return REFUSE;
    }
    let target = opts
        .args
        .last()
        .cloned()
        .or_else(|| env.get("client_connect_config_file").cloned());
    if let (Some(path), Some(push)) = (target, &resp.push) {
        let text = openvpn::dynamic_config(push);
        if let Err(e) = std::fs::write(Path::new(&path), text) {
            eprintln!("pforte hook: cannot write {path}: {e}; refusing");
            return REFUSE;
        }
    }
    ACCEPT
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

async fn client_disconnect(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    let req = openvpn::disconnect_request(env, &opts.settings);
    let call = async {
        let mut c = UnixClient::connect(&opts.socket).await?;
        c.disconnect_request(&req).await
    };
    match tokio::time::timeout(opts.timeout, call).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("pforte hook: disconnect of {} not recorded: {e}", who(env)),
        Err(_) => eprintln!(
            "pforte hook: disconnect of {} not recorded: no answer within {:?}",
            who(env),
            opts.timeout
        ),
    }
    // OpenVPN ignores the exit code of client-disconnect; the daemon reconciles later.
    ACCEPT
}

async fn tls_verify(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    // OpenVPN calls tls-verify once per certificate depth, the CA first; only depth 0 is the
    // client's own certificate.
    if opts.args.first().map(String::as_str) != Some("0") {
        return ACCEPT;
    }
    let req = openvpn::connect_request(env, &opts.settings);
    let call = async {
        let mut c = UnixClient::connect(&opts.socket).await?;
        let body = serde_json::to_vec(&req).unwrap_or_default();
        c.request(hyper::Method::POST, "/v1/verify", Some(body))
            .await
    };
    match tokio::time::timeout(opts.timeout, call).await {
        Ok(Ok((200, _))) => ACCEPT,
        Ok(Ok((_, body))) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            eprintln!(
                "pforte: refused {} at TLS: {}: {}",
                who(env),
                v["reason"].as_str().unwrap_or("unknown"),
                v["message"].as_str().unwrap_or("")
            );
            REFUSE
        }
        Ok(Err(e)) => daemon_down(opts, env, &e.to_string()),
        Err(_) => daemon_down(opts, env, &format!("no answer within {:?}", opts.timeout)),
    }
}
