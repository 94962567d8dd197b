//! pforte: the gate next to a VPN concentrator.
//!
//! The VPN server asks pforte, on every connection, whether this device and this person may come
//! in. pforte refuses private, unregistered, unencrypted, unpatched or blocked devices, enforces
//! data-protection levels and capacity, keeps the live session table (persisted in SQLite), and
//! exports session and bandwidth figures to Prometheus.
//!
//! Layers, from the entry points down (imports point only down; `cargo test --lib layers`
//! checks it): entry points (`serve`, `hook`, `check`) → transports (`api`, `client`, `vpn`) →
//! operations (`app`) → domain (`policy`, `sessions`, `registry`, `state`) → infrastructure
//! (`store`, `audit`, `metrics`, `config`, `bandwidth`, `net`, `sync`) → leaves (`wire`,
//! `session`). docs/ARCHITECTURE.md gives each module's job and traces a connect from the hook to
//! its answer.

pub mod api;
pub mod app;
pub mod audit;
pub mod bandwidth;
pub mod check;
pub mod client;
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod hook;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod registry;
pub mod serve;
pub mod session;
pub mod sessions;
pub mod state;
pub mod store;
pub mod sync;
pub mod vpn;
pub mod wire;

#[cfg(test)]
mod layers;
