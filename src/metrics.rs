//! Prometheus metrics in our own registry. Labels come only from a bounded set fixed by the
//! config (zone, org unit, reason, decision, link, instance, ownership, status): never a
//! username, device id, address or certificate.
//!
//! Aggregates are kept incrementally, so a scrape costs the same with 100 or 100,000 sessions.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::Rules;
use crate::wire::Reason;

/// Every metric pforte exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Decisions by decision and reason.
    pub decisions: IntCounterVec,
    /// Time from request to decision.
    pub decision_duration: Histogram,
    /// Live sessions by zone and org unit.
    pub sessions: IntGaugeVec,
    /// All seats.
    pub seats_capacity: IntGauge,
    /// Reserved seats.
    pub seats_reserved: IntGauge,
    /// Seats in use.
    pub seats_used: IntGauge,
    /// Quota per org unit.
    pub org_unit_quota: IntGaugeVec,
    /// Registry devices by ownership and status.
    pub registry_devices: IntGaugeVec,
    /// Registry users.
    pub registry_users: IntGauge,
    /// Unix time of the last successful registry load.
    pub registry_last_success: IntGauge,
    /// Failed registry reloads.
    pub registry_reload_failures: IntCounter,
    /// Bytes received from clients, by zone and org unit.
    pub session_received_bytes: IntCounterVec,
    /// Bytes sent to clients, by zone and org unit.
    pub session_sent_bytes: IntCounterVec,
    /// Session duration at its end, by zone.
    pub session_duration: HistogramVec,
    /// Link receive bytes.
    pub link_receive_bytes: IntCounterVec,
    /// Link transmit bytes.
    pub link_transmit_bytes: IntCounterVec,
    /// Link speed.
    pub link_speed: IntGaugeVec,
    /// Link present.
    pub link_up: IntGaugeVec,
    /// Failed writes to the session store.
    pub store_errors: IntCounter,
    /// Store writable (1) or failing (0).
    pub store_healthy: IntGauge,
    /// Management interface connected, by instance.
    pub openvpn_management_connected: IntGaugeVec,
    /// Sessions ended because the VPN server no longer had them, by instance.
    pub sessions_reaped: IntCounterVec,
    /// Audit log write failures.
    pub audit_errors: IntCounter,
    /// Time a session store commit takes (one transaction, many decisions under load).
    pub store_commit_duration: Histogram,
    /// Capacity refusals by org unit and reason.
    pub capacity_refusals: IntCounterVec,
    /// Live sessions a reload ended because they would now be refused, by reason.
    pub sessions_revoked: IntCounterVec,
    /// Connects of a device that held a session from another address, by action taken.
    pub duplicate_devices: IntCounterVec,
    /// Reloads refused because they would remove too many devices at once.
    pub registry_mass_removals: IntCounter,
    /// RADIUS requests by client (NAS name) and type.
    pub radius_requests: IntCounterVec,
    /// Access-Accepts sent, by client.
    pub radius_accepts: IntCounterVec,
    /// RADIUS packets dropped unanswered, by client (`unknown` for none) and reason.
    pub radius_dropped: IntCounterVec,
    /// RADIUS retransmissions answered from the duplicate cache, by client.
    pub radius_duplicates: IntCounterVec,
    /// Round-trip time to an upstream credential server, by upstream name.
    pub radius_upstream_rtt: HistogramVec,
    /// Upstream requests that timed out, by upstream name.
    pub radius_upstream_timeouts: IntCounterVec,
    /// Disconnect-Requests by client and result (ack, nak, timeout, error, no_dae).
    pub radius_disconnects: IntCounterVec,
    /// Accepted RADIUS sessions ended because their Accounting Start did not come, by client.
    pub radius_start_timeouts: IntCounterVec,
    /// Accounting Starts naming a pforte session this node has no record of.
    pub radius_unrecorded_starts: IntCounterVec,
    /// Control channel of a strongSwan (VICI) or ocserv (`occtl`) instance answering, by vpn
    /// and instance.
    pub vpn_control_connected: IntGaugeVec,
    /// strongSwan: time from an IKE_SA coming up to its termination after a refusal.
    pub strongswan_enforcement: HistogramVec,
    /// Cluster figures (PostgreSQL store only; registered by [`Metrics::enable_cluster`]).
    pub cluster: ClusterMetrics,
}

/// The cluster's figures, exported only with a shared (PostgreSQL) store. Node names come from
/// the nodes' configs: a bounded set.
#[derive(Clone)]
pub struct ClusterMetrics {
    /// Seats used in the whole cluster.
    pub seats_used: IntGauge,
    /// Live sessions by node.
    pub sessions: IntGaugeVec,
    /// 1 while a node's lease is current, by node.
    pub node_lease_ok: IntGaugeVec,
    /// Sessions this node ended because their node's lease lapsed.
    pub sessions_expired: IntCounter,
    /// 1 while the limits in force (set by the node that started or reloaded last) differ
    /// from this node's config.
    pub config_mismatch: IntGauge,
    /// 1 on every node: its name.
    pub node_info: IntGaugeVec,
}

impl ClusterMetrics {
    fn new() -> prometheus::Result<ClusterMetrics> {
        Ok(ClusterMetrics {
            seats_used: IntGauge::new(
                "pforte_cluster_seats_used",
                "Seats in use in the whole cluster (every node sharing the store).",
            )?,
            sessions: IntGaugeVec::new(
                Opts::new(
                    "pforte_cluster_sessions",
                    "Live sessions by node, cluster-wide.",
                ),
                &["node"],
            )?,
            node_lease_ok: IntGaugeVec::new(
                Opts::new(
                    "pforte_cluster_node_lease_ok",
                    "1 while the node's lease in the shared store is current.",
                ),
                &["node"],
            )?,
            sessions_expired: IntCounter::new(
                "pforte_cluster_sessions_expired_total",
                "Sessions of other nodes this node ended because their lease lapsed.",
            )?,
            config_mismatch: IntGauge::new(
                "pforte_cluster_config_mismatch",
                "1 while the cluster's limits (set by the node that started or reloaded last) differ from this node's config.",
            )?,
            node_info: IntGaugeVec::new(
                Opts::new(
                    "pforte_cluster_node_info",
                    "This pforte's node name in the cluster.",
                ),
                &["node"],
            )?,
        })
    }
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let m = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let m = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let m = IntGauge::new(name, help)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let m = IntCounter::new(name, help)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> prometheus::Result<Histogram> {
    let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    let m = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> prometheus::Result<Metrics> {
        let r = Registry::new();
        let build = gauge_vec(&r, "pforte_build_info", "Build information.", &["version"])?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let decision_duration = histogram(
            &r,
            "pforte_decision_duration_seconds",
            "Time from a connect request's arrival to its decision.",
            &[
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0,
            ],
        )?;
        let store_commit_duration = histogram(
            &r,
            "pforte_store_commit_duration_seconds",
            "Time one session store commit (a transaction of one or many changes) takes.",
            &[
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ],
        )?;
        let session_duration = histogram_vec(
            &r,
            "pforte_session_duration_seconds",
            "Duration of ended sessions.",
            &[
                60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0, 86400.0,
            ],
            &["zone"],
        )?;
        let radius_upstream_rtt = histogram_vec(
            &r,
            "pforte_radius_upstream_rtt_seconds",
            "Round-trip time of Access-Requests proxied to an upstream credential server.",
            &[
                0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0,
            ],
            &["upstream"],
        )?;
        let strongswan_enforcement = histogram_vec(
            &r,
            "pforte_strongswan_enforcement_seconds",
            "strongSwan: from a refused IKE_SA's ike-updown event to charon's answer to its terminate.",
            &[
                0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
            &["vpn_instance"],
        )?;
        Ok(Metrics {
            strongswan_enforcement,
            vpn_control_connected: gauge_vec(
                &r,
                "pforte_vpn_control_connected",
                "1 while strongSwan's VICI socket (vpn=strongswan) or ocserv's occtl (vpn=ocserv) answers.",
                &["vpn", "vpn_instance"],
            )?,
            decisions: counter_vec(
                &r,
                "pforte_decisions_total",
                "Connect decisions by decision and reason.",
                &["decision", "reason"],
            )?,
            decision_duration,
            store_commit_duration,
            sessions: gauge_vec(
                &r,
                "pforte_sessions",
                "Live sessions.",
                &["zone", "org_unit"],
            )?,
            seats_capacity: gauge(&r, "pforte_seats_capacity", "VPN seats in all.")?,
            seats_reserved: gauge(
                &r,
                "pforte_seats_reserved",
                "Seats only priority org units may use.",
            )?,
            seats_used: gauge(&r, "pforte_seats_used", "Seats in use.")?,
            org_unit_quota: gauge_vec(
                &r,
                "pforte_org_unit_quota",
                "Concurrent-session quota of an org unit (0: none).",
                &["org_unit"],
            )?,
            registry_devices: gauge_vec(
                &r,
                "pforte_registry_devices",
                "Registered devices.",
                &["ownership", "status"],
            )?,
            registry_users: gauge(&r, "pforte_registry_users", "Registered users.")?,
            registry_last_success: gauge(
                &r,
                "pforte_registry_last_success_timestamp_seconds",
                "Unix time of the last successful registry load.",
            )?,
            registry_reload_failures: counter(
                &r,
                "pforte_registry_reload_failures_total",
                "Registry or config reloads refused because a file was invalid.",
            )?,
            session_received_bytes: counter_vec(
                &r,
                "pforte_session_received_bytes_total",
                "Bytes the VPN server received from clients.",
                &["zone", "org_unit"],
            )?,
            session_sent_bytes: counter_vec(
                &r,
                "pforte_session_sent_bytes_total",
                "Bytes the VPN server sent to clients.",
                &["zone", "org_unit"],
            )?,
            session_duration,
            link_receive_bytes: counter_vec(
                &r,
                "pforte_link_receive_bytes_total",
                "Bytes received on a link.",
                &["link"],
            )?,
            link_transmit_bytes: counter_vec(
                &r,
                "pforte_link_transmit_bytes_total",
                "Bytes transmitted on a link.",
                &["link"],
            )?,
            link_speed: gauge_vec(
                &r,
                "pforte_link_speed_bytes_per_second",
                "Nominal link speed.",
                &["link"],
            )?,
            link_up: gauge_vec(
                &r,
                "pforte_link_up",
                "1 if the link's interface exists.",
                &["link"],
            )?,
            store_errors: counter(
                &r,
                "pforte_store_errors_total",
                "Failed writes to the session store.",
            )?,
            store_healthy: gauge(
                &r,
                "pforte_store_healthy",
                "1 while the session store accepts writes.",
            )?,
            openvpn_management_connected: gauge_vec(
                &r,
                "pforte_openvpn_management_connected",
                "1 while connected to the OpenVPN management interface.",
                &["vpn_instance"],
            )?,
            sessions_reaped: counter_vec(
                &r,
                "pforte_sessions_reaped_total",
                "Sessions ended because the VPN server no longer had them.",
                &["vpn_instance"],
            )?,
            audit_errors: counter(
                &r,
                "pforte_audit_errors_total",
                "Audit log writes that failed.",
            )?,
            capacity_refusals: counter_vec(
                &r,
                "pforte_capacity_refusals_total",
                "Refusals for capacity (capacity_full, org_unit_quota, user_session_limit) by org unit.",
                &["org_unit", "reason"],
            )?,
            sessions_revoked: counter_vec(
                &r,
                "pforte_sessions_revoked_total",
                "Live sessions ended by a reload because the new registry or policy refuses them.",
                &["reason"],
            )?,
            duplicate_devices: counter_vec(
                &r,
                "pforte_duplicate_devices_total",
                "Connects of a device that held a live session from another address (replaced: the old session was ended; refused).",
                &["action"],
            )?,
            registry_mass_removals: counter(
                &r,
                "pforte_registry_mass_removals_refused_total",
                "Registry reloads refused because they would remove more than registry.max_removed_percent of the devices.",
            )?,
            radius_requests: counter_vec(
                &r,
                "pforte_radius_requests_total",
                "Verified RADIUS requests by client (NAS) and type.",
                &["client", "type"],
            )?,
            radius_accepts: counter_vec(
                &r,
                "pforte_radius_accepts_total",
                "Access-Accepts sent, by client (NAS).",
                &["client"],
            )?,
            radius_dropped: counter_vec(
                &r,
                "pforte_radius_dropped_total",
                "RADIUS packets dropped without an answer, by client (unknown: no configured client) and reason.",
                &["client", "reason"],
            )?,
            radius_duplicates: counter_vec(
                &r,
                "pforte_radius_duplicates_total",
                "RADIUS retransmissions answered from the duplicate cache (RFC 5080), by client.",
                &["client"],
            )?,
            radius_upstream_rtt,
            radius_upstream_timeouts: counter_vec(
                &r,
                "pforte_radius_upstream_timeouts_total",
                "Access-Requests an upstream credential server did not answer in time.",
                &["upstream"],
            )?,
            radius_disconnects: counter_vec(
                &r,
                "pforte_radius_disconnects_total",
                "Disconnect-Requests (RFC 5176) sent to a client, by result.",
                &["client", "result"],
            )?,
            radius_start_timeouts: counter_vec(
                &r,
                "pforte_radius_accounting_start_timeouts_total",
                "Accepted RADIUS sessions ended because no Accounting Start came in time.",
                &["client"],
            )?,
            radius_unrecorded_starts: counter_vec(
                &r,
                "pforte_radius_unrecorded_starts_total",
                "Accounting Starts naming a pforte session this node has no record of (accepted just before a crash, or ended already); the NAS is asked to drop each.",
                &["client"],
            )?,
            cluster: ClusterMetrics::new()?,
            registry: r,
        })
    }

    /// Registers the cluster's metrics (with a PostgreSQL store), for this node.
    pub fn enable_cluster(&self, node: &str) -> prometheus::Result<()> {
        let c = &self.cluster;
        self.registry.register(Box::new(c.seats_used.clone()))?;
        self.registry.register(Box::new(c.sessions.clone()))?;
        self.registry.register(Box::new(c.node_lease_ok.clone()))?;
        self.registry
            .register(Box::new(c.sessions_expired.clone()))?;
        self.registry
            .register(Box::new(c.config_mismatch.clone()))?;
        self.registry.register(Box::new(c.node_info.clone()))?;
        c.node_info.with_label_values(&[node]).set(1);
        Ok(())
    }

    /// Creates every labelled series the rules make possible, at zero, and sets the capacity
    /// gauges. Called at start and after every reload.
    pub fn apply_rules(&self, rules: &Rules) {
        for reason in Reason::ALL {
            self.decisions.with_label_values(&["deny", reason.as_str()]);
        }
        self.decisions.with_label_values(&["allow", "allowed"]);
        for reason in Reason::ALL {
            self.sessions_revoked.with_label_values(&[reason.as_str()]);
        }
        for action in ["replaced", "refused"] {
            self.duplicate_devices.with_label_values(&[action]);
        }
        self.seats_capacity
            .set(i64::from(rules.capacity.max_sessions));
        self.seats_reserved
            .set(i64::from(rules.capacity.reserved_seats));
        for ou in rules.org_units.values() {
            for reason in [
                Reason::CapacityFull,
                Reason::OrgUnitQuota,
                Reason::UserSessionLimit,
            ] {
                self.capacity_refusals
                    .with_label_values(&[&ou.name, reason.as_str()]);
            }
            self.org_unit_quota
                .with_label_values(&[&ou.name])
                .set(i64::from(ou.quota));
        }
        for zone in rules.zones.keys() {
            self.session_duration.with_label_values(&[zone]);
            for ou in rules.org_units.keys() {
                self.sessions.with_label_values(&[zone, ou]);
                self.session_received_bytes.with_label_values(&[zone, ou]);
                self.session_sent_bytes.with_label_values(&[zone, ou]);
            }
        }
    }

    /// Sets the registry gauges: devices by (ownership, status) label pair, users, load time.
    pub fn apply_registry<'a>(
        &self,
        devices: impl IntoIterator<Item = ((&'a str, &'a str), i64)>,
        users: usize,
        loaded_at_unix: i64,
    ) {
        for ((ownership, status), n) in devices {
            self.registry_devices
                .with_label_values(&[ownership, status])
                .set(n);
        }
        self.registry_users.set(users as i64);
        self.registry_last_success.set(loaded_at_unix);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(%e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
