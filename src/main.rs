//! The `pforte` command: parses the command line, sets up logging, calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

use pforte::{check, config, hook, serve, vpn::openvpn::HookSettings};

/// mimalloc instead of glibc's malloc: the daemon allocates a request's state on a tokio worker
/// and frees much of it on the store thread; glibc serialises such cross-thread frees on its
/// arena locks. The v2 line without transparent huge pages: v3 and huge pages each cost every
/// hook process a few tenths of a millisecond at start and exit (docs/BENCHMARKS-HISTORY.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "pforte",
    version,
    about = "The gate next to a VPN concentrator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// Config file.
        #[arg(long, default_value = "/etc/pforte/pforte.toml")]
        config: PathBuf,
    },
    /// Validate a config file and its registry; exit non-zero naming file, key and problem.
    CheckConfig {
        /// Config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Explain a decision without connecting (for the help desk).
    Check {
        /// Config file.
        #[arg(long, default_value = "/etc/pforte/pforte.toml")]
        config: PathBuf,
        /// Certificate SHA-256 fingerprint (hex, with or without colons).
        #[arg(long)]
        cert_sha256: Option<String>,
        /// Certificate serial (decimal, or hex with colons).
        #[arg(long)]
        cert_serial: Option<String>,
        /// User name.
        #[arg(long)]
        user: String,
        /// Zone.
        #[arg(long)]
        zone: Option<String>,
        /// Hardware address reported by the client.
        #[arg(long)]
        hwaddr: Option<String>,
    },
    /// Run as a VPN server's hook script.
    Hook {
        #[command(subcommand)]
        vpn: HookKind,
    },
}

#[derive(Subcommand)]
enum HookKind {
    /// OpenVPN tls-verify / client-connect / client-disconnect script.
    Openvpn {
        /// The daemon's Unix socket.
        #[arg(long, env = "PFORTE_SOCKET", default_value = hook::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Zone of this OpenVPN instance.
        #[arg(long, env = "PFORTE_ZONE", default_value = "")]
        zone: String,
        /// Name of this OpenVPN instance.
        #[arg(long, env = "PFORTE_INSTANCE", default_value = hook::DEFAULT_INSTANCE)]
        instance: String,
        /// Time allowed for the daemon's answer, e.g. 2s or 500ms.
        #[arg(long, env = "PFORTE_TIMEOUT", default_value = hook::DEFAULT_TIMEOUT, value_parser = hook::parse_duration)]
        timeout: Duration,
        /// Admit when the daemon cannot be asked (dangerous; the default refuses).
        #[arg(long)]
        fail_open: bool,
        /// Use OpenVPN's deferred client-connect (2.5+): OpenVPN's event loop never waits for
        /// the daemon; give a longer --timeout with it, e.g. 10s.
        #[arg(long)]
        deferred: bool,
        /// Internal: the detached child of a deferred client-connect.
        #[arg(long, hide = true)]
        deferred_child: bool,
        /// Arguments OpenVPN appends.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn hook_options(vpn: HookKind) -> hook::HookOptions {
    let HookKind::Openvpn {
        socket,
        zone,
        instance,
        timeout,
        fail_open,
        deferred,
        deferred_child,
        args,
    } = vpn;
    hook::HookOptions {
        socket,
        settings: HookSettings { instance, zone },
        timeout,
        fail_open,
        args,
        deferred,
        deferred_child,
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PFORTE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    // The hook runs once per VPN connect: its usual command lines are read without building
    // the whole command tree; anything else (help, errors) goes through clap below.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "hook")
        && argv.get(2).is_some_and(|a| a == "openvpn")
        && let Some(opts) = hook::fast_args(&argv[3..], |k| std::env::var(k).ok())
    {
        return ExitCode::from(hook::run_openvpn(&opts, &hook::environment()) as u8);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Hook { vpn } => {
            ExitCode::from(hook::run_openvpn(&hook_options(vpn), &hook::environment()) as u8)
        }
        Command::Check {
            config,
            cert_sha256,
            cert_serial,
            user,
            zone,
            hwaddr,
        } => {
            let args = check::CheckArgs {
                config,
                cert_sha256,
                cert_serial,
                user,
                zone,
                hwaddr,
            };
            ExitCode::from(check::run(&args) as u8)
        }
        Command::CheckConfig { config } => match config::load(&config)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                pforte::state::build(&c)
                    .map_err(|e| format!("{}: registry: {e}", c.source.display()))
                    .map(|s| (c, s))
            }) {
            Ok((c, s)) => {
                println!(
                    "{}: valid ({} devices, {} users, {} zones, {} org units)",
                    c.source.display(),
                    s.registry.devices().len(),
                    s.registry.user_count(),
                    c.rules.zones.len(),
                    c.rules.org_units.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => {
            init_tracing();
            match serve_main(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("pforte serve: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve_main(path: &std::path::Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.server.workers)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listeners = serve::bind_all(&config).await?;
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
        // One signal loop, registered once: TERM/INT drain and exit, HUP reloads.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hup.recv() => { let _ = reload_tx.try_send(()); }
                }
            }
            let _ = shutdown_tx.send(true);
        });
        let control = serve::Control {
            shutdown: shutdown_rx,
            reload: reload_rx,
        };
        serve::run(config, listeners, control).await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hook's fast reader and clap agree on every command line the fast one accepts, and
    /// leave the rest to clap. (No PFORTE_* variables here: clap would read them.)
    #[test]
    fn fast_hook_args_agree_with_clap() {
        let lines = [
            "",
            "/tmp/cc.conf",
            "--zone office /tmp/cc.conf",
            "--zone=office --instance ovpn-a --socket /run/x.sock /tmp/cc.conf",
            "--timeout 500ms --fail-open 0 CN=alice,O=City",
            "--deferred --timeout=10s /tmp/cc.conf",
            "--deferred-child --socket /s --zone z --instance i --timeout 2000ms",
            "--zone office -- /tmp/-odd-name",
            "/tmp/cc.conf --zone looks-like-a-flag",
            "--zone office --zone home /tmp/cc.conf",
            "--help",
            "--timeout soon /tmp/cc.conf",
            "--bogus /tmp/cc.conf",
            "--zone",
            "--fail-open=yes",
        ];
        for line in lines {
            let words: Vec<std::ffi::OsString> = line.split_whitespace().map(Into::into).collect();
            let fast = hook::fast_args(&words, |_| None);
            let mut argv: Vec<std::ffi::OsString> =
                vec!["pforte".into(), "hook".into(), "openvpn".into()];
            argv.extend(words.iter().cloned());
            let full = Cli::try_parse_from(&argv)
                .ok()
                .and_then(|c| match c.command {
                    Command::Hook { vpn } => Some(hook_options(vpn)),
                    _ => None,
                });
            match (fast, full) {
                (Some(f), Some(c)) => assert_eq!(format!("{f:?}"), format!("{c:?}"), "{line}"),
                (Some(f), None) => {
                    panic!("`{line}`: fast reader accepted what clap refuses: {f:?}")
                }
                (None, _) => {} // clap answers it
            }
        }
        // The usual lines do take the fast way.
        for line in ["/tmp/cc.conf", "--zone office /tmp/cc.conf", "0 CN=x"] {
            let words: Vec<std::ffi::OsString> = line.split_whitespace().map(Into::into).collect();
            assert!(hook::fast_args(&words, |_| None).is_some(), "{line}");
        }
    }
}
