//! `pforte serve`: binds the listeners, loads the state and the stored sessions, runs the API
//! and the background tasks, and drains on shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};

use crate::api::{self, Api, Token};
use crate::app::App;
use crate::audit::{Audit, PseudonymKey};
use crate::config::Backend;
use crate::config::{Config, ServerConfig};
use crate::metrics::Metrics;
use crate::sessions::Sessions;
use crate::state::{self, State};
use crate::store::{self, SessionStore, SqliteStore, StoreHandle};
use crate::{bandwidth, net, vpn};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] net::BindError),
    /// Config or registry.
    #[error(transparent)]
    Load(#[from] state::LoadError),
    /// The session store.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Anything else at start.
    #[error("{0}")]
    Start(String),
}

/// The bound listeners.
pub struct Listeners {
    /// TCP.
    pub tcp: Option<TcpListener>,
    /// Unix socket.
    pub unix: Option<UnixListener>,
    /// The RADIUS front's UDP sockets.
    pub radius: Option<vpn::radius::server::Sockets>,
}

/// Binds what the config asks for: removes a stale socket file first and sets the socket's
/// mode right after binding; the RADIUS sockets too, so they are bound before `/readyz`.
pub async fn bind_all(config: &Config) -> Result<Listeners, ServeError> {
    let mut l = bind(&config.server).await?;
    if let Some(r) = &config.radius {
        l.radius = Some(vpn::radius::server::bind(r)?);
    }
    Ok(l)
}

/// Binds the API's listeners.
pub async fn bind(server: &ServerConfig) -> Result<Listeners, ServeError> {
    let unix = match &server.socket {
        Some(path) => Some(net::bind_unix(path, server.socket_mode)?),
        None => None,
    };
    let tcp = match server.listen {
        Some(addr) => Some(net::bind_tcp(addr)?),
        None => None,
    };
    Ok(Listeners {
        tcp,
        unix,
        radius: None,
    })
}

/// How the caller steers a running daemon.
pub struct Control {
    /// Becomes `true` to stop.
    pub shutdown: watch::Receiver<bool>,
    /// A message asks for a reload (SIGHUP).
    pub reload: mpsc::Receiver<()>,
}

/// Runs the daemon on bound listeners until `control.shutdown` turns true.
pub async fn run(
    config: Config,
    listeners: Listeners,
    mut control: Control,
) -> Result<(), ServeError> {
    let metrics = Metrics::new().map_err(|e| ServeError::Start(format!("metrics: {e}")))?;
    let token = match &config.server.api_token_file {
        Some(p) => Some(Token::read(p).map_err(ServeError::Start)?),
        None => None,
    };
    let load_config = config.clone();
    let snapshot = tokio::task::spawn_blocking(move || state::build(&load_config))
        .await
        .map_err(|e| ServeError::Start(format!("loading the registry: {e}")))??;
    metrics.apply_rules(&snapshot.rules);
    metrics.apply_registry(
        snapshot.registry.device_counts(),
        snapshot.registry.user_count(),
        snapshot.loaded_at,
    );
    tracing::info!(
        devices = snapshot.registry.devices().len(),
        users = snapshot.registry.user_count(),
        "registry loaded"
    );
    let state = Arc::new(State::new(&config, snapshot));

    let audit = match &config.audit.path {
        Some(p) => {
            let key = match &config.audit.pseudonymise_key_file {
                Some(k) => Some(PseudonymKey::read(k).map_err(ServeError::Start)?),
                None => None,
            };
            Some(Arc::new(
                Audit::open(p, config.audit.max_bytes, config.audit.keep, key)
                    .map_err(|e| ServeError::Start(format!("{}: audit log: {e}", p.display())))?,
            ))
        }
        None => None,
    };
    let (store, stored) = match &config.store.backend {
        Backend::Sqlite => {
            let mut sqlite = SqliteStore::open(&config.store.path, config.store.durability)?;
            let stored = sqlite.load()?;
            store::spawn_checkpointer(
                &config.store.path,
                sqlite.wal_frames(),
                store::CheckpointPace::default(),
            )?;
            let (store, _writer) = store::spawn_writer(
                sqlite,
                metrics.clone(),
                audit.clone(),
                config.store.fail_mode == crate::config::FailMode::Open,
            )?;
            (store, stored)
        }
        Backend::Postgres(pg) => {
            metrics
                .enable_cluster(&pg.node)
                .map_err(|e| ServeError::Start(format!("metrics: {e}")))?;
            let (handle, stored) = store::postgres::open(
                pg,
                &config.rules,
                metrics.clone(),
                audit.clone(),
                config.store.fail_mode == crate::config::FailMode::Open,
                Duration::from_secs(30),
            )
            .await?;
            (StoreHandle::shared(handle), stored)
        }
    };
    let sessions = Sessions::new(store, metrics.clone(), config.store.fail_mode);
    sessions.set_pools(
        config
            .rules
            .zones
            .values()
            .filter_map(|z| z.pool.map(|p| (z.name.clone(), p, z.network.unwrap_or(p)))),
    );
    tracing::info!(sessions = stored.len(), "sessions restored from the store");
    sessions.restore(stored);

    let app = App::new(state.clone(), sessions.clone(), metrics.clone(), audit);
    let api = Api::new(app.clone(), config.server.clone(), token);

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(l) = listeners.unix {
        tasks.spawn(api::serve_unix(l, api.clone(), control.shutdown.clone()));
    }
    if let Some(l) = listeners.tcp {
        tasks.spawn(api::serve_tcp(l, api.clone(), control.shutdown.clone()));
    }
    tasks.spawn(bandwidth::run(
        config.links.clone(),
        metrics.clone(),
        control.shutdown.clone(),
    ));
    tasks.spawn(watch_files(
        app.clone(),
        config.registry.watch_interval,
        control.shutdown.clone(),
    ));
    vpn::spawn_all(
        &config,
        listeners.radius,
        app.clone(),
        &mut tasks,
        &control.shutdown,
    );
    tasks.spawn(watchdog(control.shutdown.clone()));
    if let Some(pg) = sessions.store().cluster() {
        tasks.spawn(crate::cluster::run(
            app.clone(),
            pg.clone(),
            control.shutdown.clone(),
        ));
    }

    api.set_ready(true);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(config = %config.source.display(), "pforte ready");

    loop {
        tokio::select! {
            changed = control.shutdown.changed() => {
                if changed.is_err() || *control.shutdown.borrow() {
                    break;
                }
            }
            Some(()) = control.reload.recv() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                let _ = app.reload("SIGHUP", false).await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }

    tracing::info!("shutting down: draining connections");
    api.set_ready(false);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(api::DRAIN_DEADLINE + Duration::from_secs(2), drain)
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop in time");
    }
    match sessions.store().flush().await {
        Ok(()) => tracing::info!("session store flushed"),
        Err(e) => tracing::error!(error = %e, "session store flush failed"),
    }
    Ok(())
}

async fn watch_files(app: Arc<App>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    if every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if app.state.files_changed() {
                    let _ = app.reload("file change", false).await;
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn watchdog(mut shutdown: watch::Receiver<bool>) {
    let Some(every) = sd_notify::watchdog_enabled().filter(|d| !d.is_zero()) else {
        return;
    };
    let mut tick = tokio::time::interval(every / 2);
    loop {
        tokio::select! {
            _ = tick.tick() => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
            _ = shutdown.changed() => return,
        }
    }
}
