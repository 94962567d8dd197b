//! The `pforte` command: parses the command line, sets up logging, calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

use pforte::{check, config, ctl, hook, serve, vpn::openvpn::HookSettings};

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
        /// Device inventory id (asset tag), instead of a certificate.
        #[arg(long, conflicts_with_all = ["cert_sha256", "cert_serial"])]
        device: Option<String>,
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
    /// List live sessions (a table, or --json), filtered by zone, org unit, user or device.
    Sessions {
        #[command(flatten)]
        daemon: DaemonArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End live sessions (by session id, user or device), through the VPN server.
    Kill {
        #[command(flatten)]
        daemon: DaemonArgs,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Reload config and registry; live sessions now refused are ended.
    Reload {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Accept a registry that drops more devices than registry.max_removed_percent.
        #[arg(long)]
        force: bool,
    },
    /// Seats used and free, sessions per zone and org unit, quotas, management connections,
    /// the registry's age.
    Status {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The newest decisions for a person or a device, from the audit log (for the help desk).
    Decisions {
        /// Config file (names the audit log and its pseudonymisation key).
        #[arg(long, default_value = "/etc/pforte/pforte.toml")]
        config: PathBuf,
        /// User name.
        #[arg(long)]
        user: Option<String>,
        /// Device inventory id.
        #[arg(long)]
        device: Option<String>,
        /// How many of the newest to show.
        #[arg(long, default_value_t = 20)]
        last: usize,
    },
    /// Run as a VPN server's hook script.
    Hook {
        #[command(subcommand)]
        vpn: HookKind,
    },
}

/// Where the daemon is.
#[derive(clap::Args)]
struct DaemonArgs {
    /// The daemon's Unix socket (default: the config's server.socket, else /run/pforte/pforte.sock).
    #[arg(long, env = "PFORTE_SOCKET")]
    socket: Option<PathBuf>,
    /// Config file to read the socket path from.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Which sessions.
#[derive(clap::Args)]
struct FilterArgs {
    /// Session id.
    #[arg(long)]
    id: Option<String>,
    /// Zone.
    #[arg(long)]
    zone: Option<String>,
    /// Org unit.
    #[arg(long)]
    org_unit: Option<String>,
    /// User name.
    #[arg(long)]
    user: Option<String>,
    /// Device inventory id.
    #[arg(long)]
    device: Option<String>,
}

impl From<FilterArgs> for ctl::Filter {
    fn from(f: FilterArgs) -> ctl::Filter {
        ctl::Filter {
            id: f.id,
            zone: f.zone,
            org_unit: f.org_unit,
            user: f.user,
            device: f.device,
        }
    }
}

/// Runs an operator command: its exit code, or its error on stderr with code 2.
fn operator(
    name: &str,
    daemon: Option<DaemonArgs>,
    run: impl FnOnce(&std::path::Path) -> Result<u8, ctl::CtlError>,
) -> ExitCode {
    let socket = match daemon {
        Some(d) => ctl::socket_path(d.socket, d.config.as_deref()),
        None => Ok(PathBuf::new()),
    };
    match socket.and_then(|s| run(&s)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("pforte {name}: {e}");
            ExitCode::from(ctl::ERROR)
        }
    }
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
    /// ocserv connect-script / disconnect-script.
    Ocserv {
        /// The daemon's Unix socket.
        #[arg(long, env = "PFORTE_SOCKET", default_value = hook::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Zone of this ocserv instance.
        #[arg(long, env = "PFORTE_ZONE", default_value = "")]
        zone: String,
        /// Name of this ocserv instance.
        #[arg(long, env = "PFORTE_INSTANCE", default_value = hook::ocserv::DEFAULT_INSTANCE)]
        instance: String,
        /// Time allowed for the daemon's answer, e.g. 2s or 500ms.
        #[arg(long, env = "PFORTE_TIMEOUT", default_value = hook::DEFAULT_TIMEOUT, value_parser = hook::parse_duration)]
        timeout: Duration,
        /// Which variable carries the device's inventory id: groupname (ocserv's cert-group-oid)
        /// or username (cert-user-oid). The same as `device_from` of the [[ocserv]] entry.
        #[arg(long, env = "PFORTE_DEVICE_FROM", default_value = "groupname", value_parser = ["groupname", "username"])]
        device_from: String,
        /// Admit when the daemon cannot be asked (dangerous; the default refuses).
        #[arg(long)]
        fail_open: bool,
    },
}

/// Runs a hook given in full (through clap).
fn run_hook(vpn: HookKind) -> i32 {
    match vpn {
        HookKind::Ocserv {
            socket,
            zone,
            instance,
            timeout,
            device_from,
            fail_open,
        } => {
            let opts = hook::ocserv::OcservHookOptions {
                socket,
                settings: pforte::vpn::ocserv::OcservSettings {
                    instance,
                    zone,
                    device_from: pforte::vpn::ocserv::DeviceField::parse(&device_from)
                        .unwrap_or_default(),
                },
                timeout,
                fail_open,
            };
            hook::ocserv::run(&opts, &hook::environment())
        }
        openvpn => hook::run_openvpn(&hook_options(openvpn), &hook::environment()),
    }
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
    } = vpn
    else {
        return hook::HookOptions {
            socket: PathBuf::from(hook::DEFAULT_SOCKET),
            settings: HookSettings::default(),
            timeout: Duration::from_secs(2),
            fail_open: false,
            args: Vec::new(),
            deferred: false,
            deferred_child: false,
        };
    };
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
    // ocserv runs its scripts with no arguments: a link named `pforte-hook-ocserv` to this
    // binary is `pforte hook ocserv` with its settings from the environment (PFORTE_*).
    let as_ocserv_hook = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == hook::ocserv::LINK_NAME);
    let ocserv_args = if as_ocserv_hook {
        argv.get(1..)
    } else if argv.get(1).is_some_and(|a| a == "hook") && argv.get(2).is_some_and(|a| a == "ocserv")
    {
        argv.get(3..)
    } else {
        None
    };
    if let Some(args) = ocserv_args
        && let Some(opts) = hook::ocserv::fast_args(args, |k| std::env::var(k).ok())
    {
        return ExitCode::from(hook::ocserv::run(&opts, &hook::environment()) as u8);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Hook { vpn } => ExitCode::from(run_hook(vpn) as u8),
        Command::Sessions {
            daemon,
            filter,
            json,
        } => operator("sessions", Some(daemon), |s| {
            ctl::sessions(s, &filter.into(), json)
        }),
        Command::Kill { daemon, filter } => {
            operator("kill", Some(daemon), |s| ctl::kill(s, &filter.into()))
        }
        Command::Reload { daemon, force } => {
            operator("reload", Some(daemon), |s| ctl::reload(s, force))
        }
        Command::Status { daemon, json } => {
            operator("status", Some(daemon), |s| ctl::status(s, json))
        }
        Command::Decisions {
            config,
            user,
            device,
            last,
        } => operator("decisions", None, |_| {
            ctl::decisions(&config, &ctl::DecisionQuery { user, device, last })
        }),
        Command::Check {
            config,
            device,
            cert_sha256,
            cert_serial,
            user,
            zone,
            hwaddr,
        } => {
            let args = check::CheckArgs {
                config,
                device,
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
    // Before any socket is opened: systemd and most shells start processes with a soft limit
    // of 1,024 open files, fewer than `server.max_connections` hooks at once need.
    match pforte::net::raise_open_files_limit() {
        Ok(n) if (n as usize) < config.server.max_connections + 64 => tracing::warn!(
            open_files = n,
            max_connections = config.server.max_connections,
            "the open-files limit is below server.max_connections; raise LimitNOFILE="
        ),
        Ok(n) => tracing::debug!(open_files = n, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
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
