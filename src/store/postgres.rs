//! The PostgreSQL backend: several pforte nodes (one per concentrator) share one session table,
//! one seat count, the org-unit quotas and the per-user limit.
//!
//! The decision stays local (policy, registry); the capacity part is done in the database. A
//! writer task takes every change queued at that moment (admissions, ends, byte counts) and
//! sends them as ONE call of `pforte_apply(batch)`: one statement, one transaction, one round
//! trip. The function takes the row lock of the singleton `pforte_cluster` row, so batches of
//! all nodes are serialised, and decides each candidate in order against the counters
//! (`pforte_counts`) and the limits stored in that row: N nodes racing for K free seats admit
//! exactly K. Schema: [`schema`].
//!
//! The database gone: every statement has a timeout (server side and client side), a lost
//! connection is made again with backoff, admissions fail (the caller applies the fail mode),
//! and ends and byte counts are kept and retried until the database takes them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, Statement};

use super::{CommitError, StoreError, StoreOp};
use crate::audit::Audit;
use crate::config::{PostgresConfig, Rules};
use crate::metrics::Metrics;
use crate::session::Session;
use crate::wire::Reason;

mod schema;

use schema::pg;

/// Most changes one batch takes.
const MAX_BATCH: usize = 2048;
/// Longest wait between two attempts to reach the database.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

type Ack = oneshot::Sender<Result<(), CommitError>>;
type AdmitAck = oneshot::Sender<Result<Option<Reason>, CommitError>>;

enum Job {
    /// A candidate session: admitted in the database if the cluster's limits allow.
    Admit(Box<Session>, Option<Vec<u8>>, AdmitAck),
    /// A change (with who waits and its audit line).
    Op(StoreOp, Option<Ack>, Option<Vec<u8>>),
    Flush(Ack),
}

/// A writer batch: decided and recorded, committed without waiting for the WAL flush.
const APPLY: &str = "SELECT pforte_apply($1), set_config('synchronous_commit', 'off', true)";
/// Behind it: a transaction that writes WAL and commits with the server's setting.
const FLUSH: &str = "SELECT pg_logical_emit_message(true, 'pforte', '')::text";

/// One connection that is made again when lost, with backoff between failed attempts; while
/// the backoff runs, calls fail at once instead of waiting.
struct Conn {
    config: tokio_postgres::Config,
    timeout: Duration,
    state: Mutex<ConnState>,
    metrics: Metrics,
    what: &'static str,
}

struct ConnState {
    client: Option<Arc<Client>>,
    /// The writer's two statements, prepared on `client` (parsed and planned once per
    /// connection instead of once per batch).
    batch: Option<(Statement, Statement)>,
    next_try: Instant,
    backoff: Duration,
    down_since: Option<Instant>,
}

impl Conn {
    fn new(
        config: tokio_postgres::Config,
        timeout: Duration,
        metrics: Metrics,
        what: &'static str,
    ) -> Conn {
        Conn {
            config,
            timeout,
            state: Mutex::new(ConnState {
                client: None,
                batch: None,
                next_try: Instant::now(),
                backoff: Duration::from_millis(100),
                down_since: None,
            }),
            metrics,
            what,
        }
    }

    async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut st = self.state.lock().await;
        self.client_in(&mut st, self.timeout).await
    }

    /// The connection and the writer's statements on it, prepared the first time; connecting
    /// and preparing take at most `within`.
    async fn batch_client(
        &self,
        within: Duration,
    ) -> Result<(Arc<Client>, Statement, Statement), StoreError> {
        let started = Instant::now();
        let mut st = self.state.lock().await;
        let client = self.client_in(&mut st, within).await?;
        if let Some((apply, flush)) = &st.batch {
            return Ok((client, apply.clone(), flush.clone()));
        }
        let both = async {
            let apply = client.prepare_typed(APPLY, &[Type::JSONB]).await?;
            let flush = client.prepare_typed(FLUSH, &[]).await?;
            Ok::<_, tokio_postgres::Error>((apply, flush))
        };
        let left = within.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, both).await {
            Ok(Ok((apply, flush))) => {
                st.batch = Some((apply.clone(), flush.clone()));
                Ok((client, apply, flush))
            }
            outcome => {
                st.client = None;
                Err(match outcome {
                    Ok(Err(e)) => pg(e),
                    _ => StoreError::Postgres(format!(
                        "PostgreSQL did not answer within {} ms",
                        within.as_millis()
                    )),
                })
            }
        }
    }

    /// The connection, made again (within `within` at most) if there is none.
    async fn client_in(
        &self,
        st: &mut ConnState,
        within: Duration,
    ) -> Result<Arc<Client>, StoreError> {
        if let Some(c) = &st.client
            && !c.is_closed()
        {
            return Ok(Arc::clone(c));
        }
        st.client = None;
        st.batch = None;
        if Instant::now() < st.next_try {
            return Err(StoreError::Postgres(
                "PostgreSQL unreachable; waiting before the next attempt".into(),
            ));
        }
        match tokio::time::timeout(within.min(self.timeout), self.config.connect(NoTls)).await {
            Ok(Ok((client, connection))) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "PostgreSQL connection closed");
                    }
                });
                let client = Arc::new(client);
                st.client = Some(Arc::clone(&client));
                st.backoff = Duration::from_millis(100);
                if let Some(since) = st.down_since.take() {
                    tracing::warn!(
                        connection = self.what,
                        down_ms = since.elapsed().as_millis() as u64,
                        "PostgreSQL reachable again"
                    );
                }
                Ok(client)
            }
            outcome => {
                let e = match outcome {
                    Ok(Err(e)) => pg(e),
                    _ => StoreError::Postgres("connecting to PostgreSQL timed out".into()),
                };
                if st.down_since.is_none() {
                    st.down_since = Some(Instant::now());
                    tracing::error!(connection = self.what, error = %e, "PostgreSQL unreachable; retrying with backoff");
                }
                self.metrics.store_healthy.set(0);
                st.next_try = Instant::now() + st.backoff;
                st.backoff = (st.backoff * 2).min(MAX_BACKOFF);
                Err(e)
            }
        }
    }

    /// Forgets the connection (after an error or a timeout): the next call makes a new one,
    /// to whichever host is the primary now.
    async fn reset(&self) {
        let mut st = self.state.lock().await;
        st.client = None;
        st.batch = None;
    }

    /// Runs one statement returning one jsonb value, with the statement timeout on this side
    /// too (a hung server or network never holds a caller longer).
    async fn json(
        &self,
        sql: &str,
        params: &[(&(dyn tokio_postgres::types::ToSql + Sync), Type)],
    ) -> Result<Value, StoreError> {
        let client = self.client().await?;
        let outcome = tokio::time::timeout(self.timeout, client.query_typed(sql, params)).await;
        self.settle(outcome, self.timeout).await
    }

    /// The first column of the first row as JSON; after an error or a timeout the connection is
    /// dropped (the next call makes a new one, to whichever host is the primary now).
    async fn settle(
        &self,
        outcome: Result<
            Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
            tokio::time::error::Elapsed,
        >,
        within: Duration,
    ) -> Result<Value, StoreError> {
        match outcome {
            Ok(Ok(rows)) => Ok(rows
                .first()
                .and_then(|r| r.try_get::<_, Option<Value>>(0).ok().flatten())
                .unwrap_or(Value::Null)),
            Ok(Err(e)) => {
                self.reset().await;
                Err(pg(e))
            }
            Err(_) => {
                self.reset().await;
                Err(StoreError::Postgres(format!(
                    "PostgreSQL did not answer within {} ms",
                    within.as_millis()
                )))
            }
        }
    }
}

impl Conn {
    /// Runs one writer batch (`pforte_apply`) durably, with the cluster's lock held as briefly
    /// as PostgreSQL allows. The batch's transaction commits asynchronously, so its row locks
    /// (the cluster row, the counters) are let go without waiting for the WAL flush; pipelined
    /// behind it in the same round trip, a second transaction commits with the server's own
    /// `synchronous_commit`: it returns only once the WAL is flushed (and, where the operator runs
    /// synchronous replication, replicated) past its commit record, and so past the batch's,
    /// which was written before it. Nobody is answered before that. Another node may see the
    /// batch's counts before they are durable; its own batch is written after them, so it is
    /// never durable without them.
    ///
    /// The second transaction must write WAL: PostgreSQL commits a transaction that wrote none
    /// without flushing, even with an xid and `synchronous_commit = on` (xact.c,
    /// `RecordTransactionCommit`). A transactional logical message is the smallest write there
    /// is (no table, no row lock, any role may send it, at any `wal_level`); logical decoding
    /// consumers see it with the prefix `pforte` and an empty body.
    ///
    /// All of it (connecting included) takes at most `within`: the time the batch's oldest
    /// waiter has left of the statement timeout.
    async fn apply(&self, batch: &Value, within: Duration) -> Result<Value, StoreError> {
        if within < Duration::from_millis(1) {
            // Its waiters have given up by now; the connection is left alone.
            return Err(StoreError::Postgres(
                "the batch waited its whole statement timeout for the one before it".into(),
            ));
        }
        let started = Instant::now();
        let (client, apply, flush) = self.batch_client(within).await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [batch];
        let mut apply = std::pin::pin!(client.query(&apply, &params));
        // The batch's request must reach the server first (tokio-postgres sends a query on its
        // first poll; the server runs one connection's requests in order): poll it once here.
        let early = tokio::select! {
            biased;
            r = &mut apply => Some(r),
            () = std::future::ready(()) => None,
        };
        let flush = client.query(&flush, &[]);
        let both = async {
            match early {
                Some(r) => (r, flush.await),
                None => tokio::join!(apply, flush),
            }
        };
        let outcome = tokio::time::timeout(within.saturating_sub(started.elapsed()), both)
            .await
            .map(|(rows, flushed)| rows.and_then(|rows| flushed.map(|_| rows)));
        self.settle(outcome, within).await
    }
}

/// Hands changes to the PostgreSQL writer task and asks the shared tables. Cheap to clone.
#[derive(Clone)]
pub struct PgHandle {
    /// Each change with the moment it was queued (its waiter's statement timeout runs from it).
    jobs: mpsc::UnboundedSender<(Instant, Job)>,
    side: Arc<Conn>,
    node: Arc<str>,
    lease: Duration,
}

impl std::fmt::Debug for PgHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgHandle")
            .field("node", &self.node)
            .finish()
    }
}

/// A node's figures in the cluster.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub node: String,
    /// Its lease is current.
    pub lease_ok: bool,
    /// Its live sessions.
    pub sessions: i64,
}

/// The cluster at a glance.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ClusterStatus {
    /// Seats used in the whole cluster.
    pub seats_used: i64,
    /// Every node that ever held a lease.
    pub nodes: Vec<NodeStatus>,
    /// The limits in force (written by the node that started or reloaded last).
    pub limits: Value,
    /// Who wrote them.
    pub limits_node: Option<String>,
}

/// The limits this node's config sets: seats, reserved seats, per-user limit, org-unit quotas.
pub fn limits_of(rules: &Rules) -> Value {
    let quotas: serde_json::Map<String, Value> = rules
        .org_units
        .values()
        .filter(|o| o.quota > 0)
        .map(|o| (o.name.clone(), json!(o.quota)))
        .collect();
    json!({
        "max_sessions": rules.capacity.max_sessions,
        "reserved_seats": rules.capacity.reserved_seats,
        "max_sessions_per_user": rules.capacity.max_sessions_per_user,
        "quotas": quotas,
    })
}

fn connection_config(cfg: &PostgresConfig) -> Result<tokio_postgres::Config, StoreError> {
    let mut c: tokio_postgres::Config = cfg
        .url
        .parse()
        .map_err(|e| StoreError::Postgres(format!("store.url: {e}")))?;
    if let Some(file) = &cfg.password_file {
        let pw = std::fs::read_to_string(file).map_err(|e| {
            StoreError::Postgres(format!("store.password_file {}: {e}", file.display()))
        })?;
        c.password(pw.trim_end_matches(['\n', '\r']));
    } else if c.get_password().is_none()
        && let Ok(pw) = std::env::var("PGPASSWORD")
    {
        c.password(pw);
    }
    if c.get_user().is_none()
        && let Ok(user) = std::env::var("PGUSER")
    {
        c.user(user);
    }
    let ms = cfg.statement_timeout.as_millis();
    c.options(format!(
        "-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={}",
        ms * 4
    ));
    c.application_name(format!("pforte-{}", cfg.node));
    c.connect_timeout(cfg.statement_timeout.max(Duration::from_millis(500)));
    c.keepalives_idle(Duration::from_secs(10));
    Ok(c)
}

/// Opens the shared store: creates or migrates the schema, renews this node's lease, loads this
/// node's live sessions (a restarted pforte adopts them) and starts the writer task. Tries for
/// `wait` before giving up when the database cannot be reached.
pub async fn open(
    cfg: &PostgresConfig,
    rules: &Rules,
    metrics: Metrics,
    audit: Option<Arc<Audit>>,
    admit_unrecorded: bool,
    wait: Duration,
) -> Result<(PgHandle, Vec<Session>), StoreError> {
    let config = connection_config(cfg)?;
    let deadline = Instant::now() + wait;
    let mut client = loop {
        match config.connect(NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                break client;
            }
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %pg(e), "PostgreSQL not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(pg(e)),
        }
    };
    let version = schema::migrate(&mut client).await?;
    // Every batch waits for its WAL flush with this statement: a role that may not run it would
    // have every connect refused, so it is refused here, saying what to grant.
    client.batch_execute(FLUSH).await.map_err(|e| {
        StoreError::Postgres(format!(
            "{}; pforte waits for each commit's WAL flush with pg_logical_emit_message \
             (GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO this role)",
            pg(e)
        ))
    })?;
    drop(client);
    let side = Arc::new(Conn::new(
        config.clone(),
        cfg.statement_timeout,
        metrics.clone(),
        "side",
    ));
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = PgHandle {
        jobs: tx,
        side,
        node: Arc::from(cfg.node.as_str()),
        lease: cfg.lease,
    };
    handle.heartbeat().await?;
    handle.publish_limits(&limits_of(rules)).await?;
    let stored = handle.load_own().await?;
    tracing::info!(node = %cfg.node, schema = version, sessions = stored.len(), "PostgreSQL store opened");
    metrics.store_healthy.set(1);
    let writer = PgWriter {
        conn: Conn::new(config, cfg.statement_timeout, metrics.clone(), "writer"),
        metrics,
        audit,
        admit_unrecorded,
        retry: Vec::new(),
        failing: false,
    };
    tokio::spawn(writer.run(rx));
    Ok((handle, stored))
}

fn sessions_from(v: Value) -> Result<Vec<Session>, StoreError> {
    if v.is_null() {
        return Ok(Vec::new());
    }
    serde_json::from_value(v).map_err(|e| StoreError::Postgres(format!("a stored session: {e}")))
}

impl PgHandle {
    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The lease's length.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn push(&self, job: Job) -> Result<(), CommitError> {
        self.jobs
            .send((Instant::now(), job))
            .map_err(|_| CommitError::Stopped)
    }

    /// Asks the database to admit a session (seats, reserved seats, org-unit quota, per-user
    /// limit, all cluster-wide) and record it, in the next batch. `Ok(None)`: admitted and
    /// committed; `Ok(Some(reason))`: refused by the cluster's limits; `Err`: the database
    /// could not be asked.
    pub async fn admit(
        &self,
        session: Session,
        audit_line: Option<Vec<u8>>,
    ) -> Result<Option<Reason>, CommitError> {
        let (tx, rx) = oneshot::channel();
        self.push(Job::Admit(Box::new(session), audit_line, tx))?;
        rx.await.map_err(|_| CommitError::Stopped)?
    }

    /// Queues a change and waits for its commit.
    pub async fn commit(
        &self,
        op: StoreOp,
        audit_line: Option<Vec<u8>>,
    ) -> Result<(), CommitError> {
        let (tx, rx) = oneshot::channel();
        self.push(Job::Op(op, Some(tx), audit_line))?;
        rx.await.map_err(|_| CommitError::Stopped)?
    }

    /// Queues a change without waiting.
    pub fn queue(&self, op: StoreOp, audit_line: Option<Vec<u8>>) {
        if self.push(Job::Op(op, None, audit_line)).is_err() {
            tracing::warn!("session store writer has stopped; change dropped");
        }
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) -> Result<(), CommitError> {
        let (tx, rx) = oneshot::channel();
        self.push(Job::Flush(tx))?;
        rx.await.map_err(|_| CommitError::Stopped)?
    }

    async fn load_own(&self) -> Result<Vec<Session>, StoreError> {
        let node: &str = &self.node;
        let v = self
            .side
            .json(
                "SELECT jsonb_agg(to_jsonb(s)) FROM pforte_sessions s WHERE node = $1",
                &[(&node, Type::TEXT)],
            )
            .await?;
        sessions_from(v)
    }

    /// Every live session of the cluster, oldest first.
    pub async fn list(&self) -> Result<Vec<Session>, StoreError> {
        let v = self
            .side
            .json(
                "SELECT jsonb_agg(to_jsonb(s) ORDER BY started_at, id) FROM pforte_sessions s",
                &[],
            )
            .await?;
        sessions_from(v)
    }

    /// Ends a session of any node; its own node ends it at its VPN server. `None`: not live.
    pub async fn end_elsewhere(&self, id: &str, why: &str) -> Result<Option<Session>, StoreError> {
        let node: &str = &self.node;
        let v = self
            .side
            .json(
                "SELECT pforte_end($1, $2, $3)",
                &[(&id, Type::TEXT), (&why, Type::TEXT), (&node, Type::TEXT)],
            )
            .await?;
        if v.is_null() {
            return Ok(None);
        }
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| StoreError::Postgres(format!("a stored session: {e}")))
    }

    /// Sessions of this node ended elsewhere (id, why), taken off the list.
    pub async fn take_kills(&self) -> Result<Vec<(String, String)>, StoreError> {
        let node: &str = &self.node;
        let v = self
            .side
            .json(
                "WITH k AS (DELETE FROM pforte_kills WHERE node = $1 RETURNING session_id, why)
                 SELECT jsonb_agg(jsonb_build_array(session_id, why)) FROM k",
                &[(&node, Type::TEXT)],
            )
            .await?;
        if v.is_null() {
            return Ok(Vec::new());
        }
        serde_json::from_value(v).map_err(|e| StoreError::Postgres(e.to_string()))
    }

    /// Renews this node's lease.
    pub async fn heartbeat(&self) -> Result<(), StoreError> {
        let node: &str = &self.node;
        let secs = self.lease.as_secs_f64();
        self.side
            .json(
                "INSERT INTO pforte_nodes (node, lease_until) VALUES ($1, now() + make_interval(secs => $2))
                 ON CONFLICT (node) DO UPDATE SET lease_until = excluded.lease_until, seen_at = now()
                 RETURNING NULL::jsonb",
                &[(&node, Type::TEXT), (&secs, Type::FLOAT8)],
            )
            .await
            .map(|_| ())
    }

    /// Ends the sessions of nodes whose lease lapsed; returns them.
    pub async fn expire(&self) -> Result<Vec<Session>, StoreError> {
        let node: &str = &self.node;
        let v = self
            .side
            .json("SELECT pforte_expire($1)", &[(&node, Type::TEXT)])
            .await?;
        sessions_from(v)
    }

    /// Makes these the cluster's limits (at start and after a reload: the node that started or
    /// reloaded last sets them).
    pub async fn publish_limits(&self, limits: &Value) -> Result<(), StoreError> {
        let node: &str = &self.node;
        self.side
            .json(
                "UPDATE pforte_cluster SET limits = $1, limits_node = $2, limits_at = now()
                 WHERE id = 1 RETURNING NULL::jsonb",
                &[(limits, Type::JSONB), (&node, Type::TEXT)],
            )
            .await
            .map(|_| ())
    }

    /// Seats, nodes and their leases, the limits in force.
    pub async fn status(&self) -> Result<ClusterStatus, StoreError> {
        let v = self
            .side
            .json(
                "SELECT jsonb_build_object(
                    'seats_used', (SELECT n FROM pforte_counts WHERE kind = 't' AND key = ''),
                    'nodes', coalesce((SELECT jsonb_agg(jsonb_build_object(
                        'node', n.node, 'lease_ok', n.lease_until >= now(),
                        'sessions', (SELECT count(*) FROM pforte_sessions s WHERE s.node = n.node))
                        ORDER BY n.node) FROM pforte_nodes n), '[]'),
                    'limits', c.limits, 'limits_node', c.limits_node)
                 FROM pforte_cluster c WHERE c.id = 1",
                &[],
            )
            .await?;
        serde_json::from_value(v).map_err(|e| StoreError::Postgres(e.to_string()))
    }
}

/// The writer task: one connection, one call of `pforte_apply` per batch.
struct PgWriter {
    conn: Conn,
    metrics: Metrics,
    audit: Option<Arc<Audit>>,
    admit_unrecorded: bool,
    /// Changes whose commit failed and that nobody waits for any more: retried.
    retry: Vec<StoreOp>,
    /// The last commit failed (one error line per outage, not one per batch).
    failing: bool,
}

impl PgWriter {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<(Instant, Job)>) {
        let mut pause = Duration::from_millis(100);
        loop {
            let first = if self.retry.is_empty() {
                match rx.recv().await {
                    Some(j) => Some(j),
                    None => return,
                }
            } else {
                match tokio::time::timeout(pause, rx.recv()).await {
                    Ok(Some(j)) => Some(j),
                    // Time to try the failed changes again.
                    Err(_) => None,
                    Ok(None) => {
                        // Every handle is gone: one last attempt for what is left.
                        if !self.commit(Vec::new()).await {
                            tracing::error!(
                                lost = self.retry.len(),
                                "session store changes not written at shutdown"
                            );
                        }
                        return;
                    }
                }
            };
            let mut jobs: Vec<(Instant, Job)> = first.into_iter().collect();
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            if self.commit(jobs).await {
                pause = Duration::from_millis(100);
            } else {
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }

    /// Commits the jobs (and the changes to retry) in one call; answers everyone; false if it
    /// failed.
    async fn commit(&mut self, jobs: Vec<(Instant, Job)>) -> bool {
        // Everyone waiting is answered within the statement timeout from when they queued
        // (a hook gives up soon after): the batch gets what its oldest waiter has left.
        let timeout = self.conn.timeout;
        let now = Instant::now();
        let within = jobs
            .iter()
            .filter(|(_, job)| !matches!(job, Job::Op(_, None, _)))
            .map(|(queued, _)| (*queued + timeout).saturating_duration_since(now))
            .min()
            .unwrap_or(timeout);
        let mut upsert: Vec<Session> = Vec::new();
        let mut delete: Vec<String> = Vec::new();
        let mut bytes: Vec<(String, u64, u64)> = Vec::new();
        let mut acks: Vec<Ack> = Vec::new();
        let mut admits: Vec<(Box<Session>, Option<Vec<u8>>, AdmitAck)> = Vec::new();
        let mut other_lines: Vec<u8> = Vec::new();
        let add = |op: StoreOp,
                   upsert: &mut Vec<Session>,
                   delete: &mut Vec<String>,
                   bytes: &mut Vec<(String, u64, u64)>| match op {
            StoreOp::Insert(s) => upsert.push(*s),
            StoreOp::Delete(id) => delete.push(id),
            StoreOp::Bytes { id, received, sent } => bytes.push((id, received, sent)),
        };
        for op in std::mem::take(&mut self.retry) {
            add(op, &mut upsert, &mut delete, &mut bytes);
        }
        for (_, job) in jobs {
            match job {
                Job::Admit(s, line, ack) => admits.push((s, line, ack)),
                Job::Op(op, ack, line) => {
                    if let Some(line) = line {
                        other_lines.extend_from_slice(&line);
                    }
                    if let Some(ack) = ack {
                        acks.push(ack);
                    }
                    add(op, &mut upsert, &mut delete, &mut bytes);
                }
                Job::Flush(ack) => acks.push(ack),
            }
        }
        // The last byte count of a session wins.
        let mut seen = std::collections::HashSet::new();
        let bytes_json: Vec<Value> = bytes
            .iter()
            .rev()
            .filter(|(id, _, _)| seen.insert(id.clone()))
            .map(|(id, rx, tx)| json!({"id": id, "rx": rx, "tx": tx}))
            .collect();
        let mut batch = serde_json::Map::new();
        if !upsert.is_empty() {
            batch.insert("upsert".into(), json!(upsert));
        }
        if !admits.is_empty() {
            let list: Vec<&Session> = admits.iter().map(|(s, _, _)| s.as_ref()).collect();
            batch.insert("admit".into(), json!(list));
        }
        if !delete.is_empty() {
            batch.insert("delete".into(), json!(delete));
        }
        if !bytes_json.is_empty() {
            batch.insert("bytes".into(), Value::Array(bytes_json));
        }
        if batch.is_empty() {
            self.write_audit(&other_lines);
            for a in acks {
                let _ = a.send(Ok(()));
            }
            return true;
        }
        let batch = Value::Object(batch);
        let started = Instant::now();
        let result = self.conn.apply(&batch, within).await;
        self.metrics
            .store_commit_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(v) => {
                self.metrics.store_healthy.set(1);
                if std::mem::take(&mut self.failing) {
                    tracing::warn!("PostgreSQL commits succeed again");
                }
                let verdicts = v.get("admit").and_then(Value::as_array);
                let mut lines: Vec<u8> = Vec::new();
                let mut answers = Vec::with_capacity(admits.len());
                for (i, (_, line, ack)) in admits.into_iter().enumerate() {
                    let verdict = verdicts
                        .and_then(|a| a.get(i))
                        .and_then(Value::as_str)
                        .unwrap_or("capacity_full");
                    let answer = match verdict {
                        "ok" => {
                            if let Some(l) = line {
                                lines.extend_from_slice(&l);
                            }
                            None
                        }
                        "org_unit_quota" => Some(Reason::OrgUnitQuota),
                        "user_session_limit" => Some(Reason::UserSessionLimit),
                        _ => Some(Reason::CapacityFull),
                    };
                    answers.push((ack, answer));
                }
                lines.extend_from_slice(&other_lines);
                self.write_audit(&lines);
                for (ack, answer) in answers {
                    let _ = ack.send(Ok(answer));
                }
                for a in acks {
                    let _ = a.send(Ok(()));
                }
                true
            }
            Err(e) => {
                self.metrics.store_errors.inc();
                self.metrics.store_healthy.set(0);
                let changes = upsert.len() + delete.len() + bytes.len() + admits.len();
                if std::mem::replace(&mut self.failing, true) {
                    tracing::debug!(error = %e, changes, "PostgreSQL commit failed");
                } else {
                    tracing::error!(error = %e, changes, "PostgreSQL commit failed; connects follow store.fail_mode until it is back");
                }
                let err = CommitError::Failed(Arc::new(e));
                // Whether the call committed is unknown (a timeout may fall after the commit):
                // a refused candidate is deleted, one admitted anyway (fail mode open) is
                // recorded, once the database is back. Ends and byte counts are kept.
                let mut lines = Vec::new();
                for (s, line, ack) in admits {
                    if self.admit_unrecorded {
                        if let Some(l) = line {
                            lines.extend_from_slice(&l);
                        }
                        self.retry.push(StoreOp::Insert(s));
                    } else {
                        self.retry.push(StoreOp::Delete(s.id.clone()));
                    }
                    let _ = ack.send(Err(err.clone()));
                }
                lines.extend_from_slice(&other_lines);
                self.write_audit(&lines);
                self.retry
                    .extend(upsert.into_iter().map(|s| StoreOp::Insert(Box::new(s))));
                self.retry.extend(delete.into_iter().map(StoreOp::Delete));
                self.retry.extend(
                    bytes
                        .into_iter()
                        .map(|(id, received, sent)| StoreOp::Bytes { id, received, sent }),
                );
                for a in acks {
                    let _ = a.send(Err(err.clone()));
                }
                false
            }
        }
    }

    fn write_audit(&self, lines: &[u8]) {
        if let Some(a) = &self.audit
            && !lines.is_empty()
        {
            a.write(lines, &self.metrics);
        }
    }
}
