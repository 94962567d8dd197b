//! The configured RADIUS clients (NASes): found by the source address of a packet, the most
//! specific prefix first, each with its shared secret ready for the codec.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{RadiusClient, RadiusConfig};

use super::auth::Secret;

/// One NAS with its secret in the codec's form.
#[derive(Debug)]
pub struct Nas {
    /// The config entry.
    pub config: RadiusClient,
    /// The shared secret.
    pub secret: Secret,
}

/// Every NAS, most specific prefix first.
#[derive(Debug, Default)]
pub struct Clients {
    list: Vec<Arc<Nas>>,
}

impl Clients {
    /// From the config; `Err` names a client whose secret the codec refuses.
    pub fn new(config: &RadiusConfig) -> Result<Clients, String> {
        let mut list = Vec::with_capacity(config.clients.len());
        for c in &config.clients {
            let secret = Secret::new(c.secret.expose())
                .map_err(|e| format!("radius client {}: {e}", c.name))?;
            list.push(Arc::new(Nas {
                config: c.clone(),
                secret,
            }));
        }
        list.sort_by_key(|n| std::cmp::Reverse(n.config.prefix.prefix_len()));
        Ok(Clients { list })
    }

    /// The NAS a packet from `ip` comes from. An IPv4-mapped IPv6 source is read as IPv4.
    pub fn find(&self, ip: IpAddr) -> Option<&Arc<Nas>> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.list.iter().find(|n| n.config.prefix.contains(&ip))
    }

    /// The NAS with this name.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Nas>> {
        self.list.iter().find(|n| n.config.name == name)
    }

    /// Every NAS.
    pub fn all(&self) -> &[Arc<Nas>] {
        &self.list
    }
}
