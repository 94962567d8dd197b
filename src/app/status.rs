//! The daemon at a glance (`GET /v1/status`, `pforte status`): seats, sessions per zone and org
//! unit, quotas, control channels to the VPN servers, the registry's age.

use serde::{Deserialize, Serialize};

use super::App;
use crate::session::Session;
use crate::state::unix_now;

/// The daemon at a glance (`GET /v1/status`, `pforte status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Seats: all, reserved for priority org units, used, free.
    pub seats: Seats,
    /// Live sessions per zone, every configured zone listed.
    pub zones: Vec<Count>,
    /// Live sessions and quota per org unit, every configured org unit listed.
    pub org_units: Vec<OrgUnitCount>,
    /// Most sessions one user may hold (0: no limit).
    pub max_sessions_per_user: u32,
    /// OpenVPN management connections by instance.
    pub management: Vec<Management>,
    /// The registry in force.
    pub registry: RegistryStatus,
    /// Whether the session store accepts writes.
    pub store_healthy: bool,
}

/// Seat figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Seats {
    /// All seats.
    pub capacity: u32,
    /// Seats only priority org units may use.
    pub reserved: u32,
    /// Seats in use.
    pub used: u32,
    /// Seats free (for a priority org unit).
    pub free: u32,
}

/// Sessions of a named part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Count {
    /// Zone.
    pub name: String,
    /// Live sessions.
    pub sessions: u32,
}

/// An org unit's sessions and quota.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrgUnitCount {
    /// Org unit.
    pub name: String,
    /// Live sessions.
    pub sessions: u32,
    /// Concurrent-session quota (0: none).
    pub quota: u32,
}

/// One control channel to a VPN server: OpenVPN's management interface, strongSwan's VICI
/// socket, ocserv's occtl.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Management {
    /// `openvpn`, `strongswan` or `ocserv` (absent from older daemons' answers: OpenVPN).
    #[serde(default = "openvpn")]
    pub vpn: String,
    /// VPN instance.
    pub instance: String,
    /// Connected (VICI, management) or answering (occtl) now.
    pub connected: bool,
}

fn openvpn() -> String {
    "openvpn".into()
}

/// The registry in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistryStatus {
    /// Devices.
    pub devices: usize,
    /// Users.
    pub users: usize,
    /// Unix time of the load.
    pub loaded_at: i64,
    /// Seconds since.
    pub age_s: i64,
}

impl App {
    /// The daemon at a glance: seats, sessions per zone and org unit, quotas, management
    /// connections, the registry's age.
    pub fn status(&self) -> Status {
        let snap = self.state.current();
        let sessions = self.sessions.list();
        let count = |f: &dyn Fn(&Session) -> bool| sessions.iter().filter(|s| f(s)).count() as u32;
        let cap = &snap.rules.capacity;
        let used = sessions.len() as u32;
        let mut zones: Vec<Count> = snap
            .rules
            .zones
            .keys()
            .map(|z| Count {
                name: z.clone(),
                sessions: count(&|s| &s.zone == z),
            })
            .collect();
        zones.sort_by(|a, b| a.name.cmp(&b.name));
        let mut org_units: Vec<OrgUnitCount> = snap
            .rules
            .org_units
            .values()
            .map(|o| OrgUnitCount {
                name: o.name.clone(),
                sessions: count(&|s| s.org_unit == o.name),
                quota: o.quota,
            })
            .collect();
        org_units.sort_by(|a, b| a.name.cmp(&b.name));
        let mut management: Vec<Management> = snap
            .managed_instances
            .iter()
            .map(|(vpn, i)| {
                let gauge = if vpn == "openvpn" {
                    self.metrics
                        .openvpn_management_connected
                        .get_metric_with_label_values(&[i])
                } else {
                    self.metrics
                        .vpn_control_connected
                        .get_metric_with_label_values(&[vpn, i])
                };
                Management {
                    vpn: vpn.clone(),
                    instance: i.clone(),
                    connected: gauge.is_ok_and(|g| g.get() == 1),
                }
            })
            .collect();
        management.sort_by(|a, b| (&a.vpn, &a.instance).cmp(&(&b.vpn, &b.instance)));
        Status {
            seats: Seats {
                capacity: cap.max_sessions,
                reserved: cap.reserved_seats,
                used,
                free: cap.max_sessions.saturating_sub(used),
            },
            zones,
            org_units,
            max_sessions_per_user: cap.max_sessions_per_user,
            management,
            registry: RegistryStatus {
                devices: snap.registry.devices().len(),
                users: snap.registry.user_count(),
                loaded_at: snap.loaded_at,
                age_s: unix_now() - snap.loaded_at,
            },
            store_healthy: self.metrics.store_healthy.get() == 1,
        }
    }
}
