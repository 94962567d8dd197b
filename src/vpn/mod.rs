//! VPN server integrations.

pub mod ocserv;
pub mod openvpn;
pub mod radius;
pub mod strongswan;

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::app::App;
use crate::config::Config;

/// Starts the VPN integrations the config names (OpenVPN management clients, the RADIUS front
/// on its sockets bound beforehand, ocserv's occtl watchers, strongSwan VICI clients).
pub fn spawn_all(
    config: &Config,
    radius: Option<radius::server::Sockets>,
    app: Arc<App>,
    tasks: &mut JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) {
    if let (Some(rc), Some(sockets)) = (&config.radius, radius) {
        radius::server::spawn(rc.clone(), sockets, app.clone(), tasks, shutdown);
    }
    for instance in &config.openvpn {
        if instance.management.is_some() {
            tasks.spawn(openvpn::mgmt::run(
                instance.clone(),
                app.clone(),
                shutdown.clone(),
            ));
        }
    }
    for instance in &config.strongswan {
        tasks.spawn(strongswan::watch::run(
            instance.clone(),
            app.clone(),
            shutdown.clone(),
        ));
    }
    for instance in &config.ocserv {
        tasks.spawn(ocserv::occtl::run(
            instance.clone(),
            app.clone(),
            shutdown.clone(),
        ));
    }
}
