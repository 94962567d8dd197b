//! The node's part in a cluster sharing a PostgreSQL store: renews its lease, ends the
//! sessions of nodes whose lease lapsed (counted and audited), ends at its VPN server the
//! sessions of its own that were ended elsewhere, publishes its limits when it starts or
//! reloads, and keeps the cluster's metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::app::App;
use crate::audit::AuditRecord;
use crate::store::PgHandle;
use crate::store::postgres::limits_of;

/// How often this node looks for its sessions ended elsewhere.
const KILL_POLL: Duration = Duration::from_millis(250);

/// Runs until shutdown.
pub async fn run(app: Arc<App>, pg: PgHandle, mut shutdown: watch::Receiver<bool>) {
    let beat = (pg.lease() / 3).max(Duration::from_millis(500));
    let mut kills = tokio::time::interval(KILL_POLL);
    kills.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beats = tokio::time::interval(beat);
    beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published = Some(limits_of(&app.state.current().rules));
    // Since when this node has renewed its lease without a miss (None: its last renewal
    // failed). It ends other nodes' sessions only after a whole lease of renewals: after an
    // outage of the database every lease looks lapsed, and the live nodes must first have had
    // the time to renew theirs.
    let mut renewing_since = Some(Instant::now());
    loop {
        tokio::select! {
            _ = kills.tick() => take_kills(&app, &pg).await,
            _ = beats.tick() => {
                heartbeat(&app, &pg, &mut published, &mut renewing_since).await;
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn take_kills(app: &App, pg: &PgHandle) {
    match pg.take_kills().await {
        Ok(list) => {
            for (id, why) in list {
                if app.sessions.ended_elsewhere(&id, &why) {
                    tracing::info!(session = %id, why, "session ended elsewhere in the cluster; dropped at the VPN server");
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "polling for sessions ended elsewhere failed"),
    }
}

/// Renews the lease, expires lapsed nodes (once this node has renewed its own for a whole
/// lease), publishes changed limits, refreshes the metrics.
async fn heartbeat(
    app: &App,
    pg: &PgHandle,
    published: &mut Option<serde_json::Value>,
    renewing_since: &mut Option<Instant>,
) {
    let m = &app.metrics.cluster;
    if let Err(e) = pg.heartbeat().await {
        if renewing_since.take().is_some() {
            tracing::error!(error = %e, node = pg.node(), "lease not renewed");
        }
        return;
    }
    let since = *renewing_since.get_or_insert_with(|| {
        tracing::warn!(node = pg.node(), "lease renewed again");
        Instant::now()
    });
    let expired = if since.elapsed() >= pg.lease() {
        pg.expire().await
    } else {
        Ok(Vec::new())
    };
    match expired {
        Ok(ended) => {
            for s in ended {
                m.sessions_expired.inc();
                let why = format!("lease of node {} lapsed", s.node);
                if let Some(audit) = &app.audit {
                    audit.record(&AuditRecord::end(&s, &why), &app.metrics);
                }
                tracing::warn!(session = %s.id, node = %s.node, "session ended: its node's lease lapsed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "expiring lapsed nodes failed"),
    }
    let mine = limits_of(&app.state.current().rules);
    if published.as_ref() != Some(&mine) {
        // This node reloaded: its limits are the cluster's now.
        match pg.publish_limits(&mine).await {
            Ok(()) => {
                tracing::info!(
                    node = pg.node(),
                    "cluster limits set from this node's config"
                );
                *published = Some(mine.clone());
            }
            Err(e) => tracing::warn!(error = %e, "publishing the cluster's limits failed"),
        }
    }
    match pg.status().await {
        Ok(st) => {
            m.seats_used.set(st.seats_used);
            for n in &st.nodes {
                m.sessions.with_label_values(&[&n.node]).set(n.sessions);
                m.node_lease_ok
                    .with_label_values(&[&n.node])
                    .set(i64::from(n.lease_ok));
            }
            let mismatch = st.limits != mine;
            if mismatch && m.config_mismatch.get() == 0 {
                tracing::warn!(
                    node = pg.node(),
                    set_by = st.limits_node.as_deref().unwrap_or("?"),
                    "this node's capacity or quotas differ from the cluster's limits in force (set by the node that started or reloaded last); the cluster's apply"
                );
            }
            m.config_mismatch.set(i64::from(mismatch));
        }
        Err(e) => tracing::debug!(error = %e, "reading the cluster's status failed"),
    }
}
