//! Session persistence behind one narrow interface ([`SessionStore`]), with SQLite (WAL) as the
//! backend, and a writer thread that commits in groups.
//!
//! Group commit: every connect and disconnect queues its change and waits for the commit before
//! it answers. The writer thread takes everything queued at that moment into one transaction,
//! so under load one commit carries many decisions; an idle store is committed to by the caller
//! itself ([`spawn_writer`]). A decision is acknowledged only after its commit: a crash loses
//! nothing already acknowledged.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use tokio::sync::oneshot;

use crate::audit::Audit;
use crate::config::Durability;
use crate::metrics::Metrics;
use crate::session::Session;
use crate::sync::{lock, try_lock, wait_timeout};

/// A store error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("session store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The store's folder could not be made.
    #[error("session store: {0}")]
    Io(#[from] std::io::Error),
    /// The writer thread is gone.
    #[error("session store writer has stopped")]
    Stopped,
}

/// Why a change was not committed. Cloned to every caller that waited on the same batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The writer thread is gone.
    #[error("session store writer has stopped")]
    Stopped,
    /// The batch holding the change failed.
    #[error(transparent)]
    Failed(Arc<StoreError>),
}

/// One change to the persisted session table.
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// A new session.
    Insert(Box<Session>),
    /// A session ended.
    Delete(String),
    /// Live byte counters.
    Bytes {
        /// Session id.
        id: String,
        /// Received from the client.
        received: u64,
        /// Sent to the client.
        sent: u64,
    },
}

/// What any session backend must do. Kept narrow so a shared backend (PostgreSQL) can follow.
pub trait SessionStore: Send + 'static {
    /// All persisted sessions.
    fn load(&mut self) -> Result<Vec<Session>, StoreError>;
    /// Applies the changes atomically: all or none.
    fn apply(&mut self, ops: &[StoreOp]) -> Result<(), StoreError>;
}

/// SQLite in WAL mode.
pub struct SqliteStore {
    conn: Connection,
    frames: WalFrames,
}

/// How many frames (pages) the store's commits have appended to the WAL since it was opened,
/// counted by SQLite's WAL hook on the writer's connection. The checkpointer paces itself by
/// it. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct WalFrames(Arc<AtomicU64>);

impl WalFrames {
    /// Frames appended so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store file and its folder.
    pub fn open(path: &Path, durability: Durability) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            match durability {
                Durability::Full => "FULL",
                Durability::Normal => "NORMAL",
            },
        )?;
        // Checkpoints run on their own connection and thread (see `spawn_checkpointer`), not
        // inside a commit that someone waits for.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // After `wal_autocheckpoint`, which would replace it. SQLite reports the WAL's length
        // after each commit; it starts over from zero when the WAL is restarted.
        let frames = WalFrames::default();
        let counter = Arc::clone(&frames.0);
        let mut length: i32 = 0;
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
            let added = if pages >= length {
                pages - length
            } else {
                pages
            };
            length = pages;
            counter.fetch_add(u64::try_from(added).unwrap_or(0), Ordering::Relaxed);
            Ok(())
        }))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sessions (
                id TEXT PRIMARY KEY,
                vpn TEXT NOT NULL,
                instance TEXT NOT NULL,
                session_key TEXT NOT NULL,
                zone TEXT NOT NULL,
                org_unit TEXT NOT NULL,
                level INTEGER NOT NULL,
                priority INTEGER NOT NULL,
                device_id TEXT NOT NULL,
                username TEXT NOT NULL,
                common_name TEXT NOT NULL,
                remote_addr TEXT NOT NULL,
                tunnel_ip TEXT,
                pool_ip INTEGER NOT NULL,
                started_at INTEGER NOT NULL,
                bytes_received INTEGER NOT NULL,
                bytes_sent INTEGER NOT NULL
            ) WITHOUT ROWID;",
        )?;
        Ok(SqliteStore { conn, frames })
    }

    /// The counter of frames this store's commits append to the WAL (for the checkpointer).
    pub fn wal_frames(&self) -> WalFrames {
        self.frames.clone()
    }
}

impl SessionStore for SqliteStore {
    fn load(&mut self) -> Result<Vec<Session>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, vpn, instance, session_key, zone, org_unit, level, priority, device_id,
                    username, common_name, remote_addr, tunnel_ip, pool_ip, started_at,
                    bytes_received, bytes_sent FROM sessions",
        )?;
        let rows = stmt.query_map([], |r| {
            let tunnel: Option<String> = r.get(12)?;
            Ok(Session {
                id: r.get(0)?,
                vpn: r.get(1)?,
                instance: r.get(2)?,
                session_key: r.get(3)?,
                zone: r.get(4)?,
                org_unit: r.get(5)?,
                level: r.get(6)?,
                priority: r.get(7)?,
                device_id: r.get(8)?,
                username: r.get(9)?,
                common_name: r.get(10)?,
                remote_addr: r.get(11)?,
                tunnel_ip: tunnel.and_then(|t| t.parse().ok()),
                pool_ip: r.get(13)?,
                started_at: r.get(14)?,
                bytes_received: u64::try_from(r.get::<_, i64>(15)?).unwrap_or(0),
                bytes_sent: u64::try_from(r.get::<_, i64>(16)?).unwrap_or(0),
            })
        })?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row?);
        }
        Ok(out)
    }

    fn apply(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR REPLACE INTO sessions VALUES
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM sessions WHERE id = ?1")?;
            let mut bytes = tx.prepare_cached(
                "UPDATE sessions SET bytes_received = ?2, bytes_sent = ?3 WHERE id = ?1",
            )?;
            for op in ops {
                match op {
                    StoreOp::Insert(s) => {
                        insert.execute(params![
                            s.id,
                            s.vpn,
                            s.instance,
                            s.session_key,
                            s.zone,
                            s.org_unit,
                            s.level,
                            s.priority,
                            s.device_id,
                            s.username,
                            s.common_name,
                            s.remote_addr,
                            s.tunnel_ip.map(|ip| ip.to_string()),
                            s.pool_ip,
                            s.started_at,
                            i64::try_from(s.bytes_received).unwrap_or(i64::MAX),
                            i64::try_from(s.bytes_sent).unwrap_or(i64::MAX),
                        ])?;
                    }
                    StoreOp::Delete(id) => {
                        delete.execute(params![id])?;
                    }
                    StoreOp::Bytes { id, received, sent } => {
                        bytes.execute(params![
                            id,
                            i64::try_from(*received).unwrap_or(i64::MAX),
                            i64::try_from(*sent).unwrap_or(i64::MAX)
                        ])?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// WAL size (in 4 KiB frames) above which the checkpointer also restarts the WAL.
const WAL_RESTART_FRAMES: i64 = 16384;

/// When the checkpointer copies the WAL into the database.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPace {
    /// How often it looks.
    pub tick: Duration,
    /// It checkpoints once the commits since the last checkpoint have appended this many frames…
    pub frames: u64,
    /// …or when anything at all was appended and the last checkpoint is this old.
    pub idle: Duration,
}

impl Default for CheckpointPace {
    /// Looks every 100 ms; 512 frames (2 MiB) are half a second of single-decision commits at
    /// 1,000 decisions/s (one frame each, measured), less under heavier load, where commits
    /// carry many decisions and more frames; sparse connects are checkpointed every 10 s.
    fn default() -> Self {
        CheckpointPace {
            tick: Duration::from_millis(100),
            frames: 512,
            idle: Duration::from_secs(10),
        }
    }
}

/// Keeps the WAL short from a connection of its own: a PASSIVE checkpoint copies committed
/// frames into the database without waiting for the writer (and without the writer waiting
/// for it); when the WAL has grown past [`WAL_RESTART_FRAMES`] (64 MiB) a RESTART checkpoint
/// finishes the few frames left, holding the writer back only for those, and lets the WAL
/// start over from its beginning. Under continuous writes a PASSIVE checkpoint alone never
/// completes, and the WAL would grow without end. RESTART rather than TRUNCATE: the file keeps
/// its size and is written over, where truncating it held the writer for a further 25 ms
/// (ftruncate of 64 MiB on a filesystem mounted with `discard`) and a 30 ms fsync, every few
/// seconds under load (steady-rate max latency 38 ms; docs/BENCHMARKS.md).
///
/// Paced by the frames committed ([`CheckpointPace`]), not by the clock alone: a checkpoint
/// that has copied everything lets the next commit start the WAL over, and that commit writes
/// and fsyncs a new WAL header (0.3 ms here) while a caller waits. Checkpointing after every
/// sparse commit (a VPN connect now and then) put that fsync on nearly every one of them.
/// Returns the count of checkpoints run; runs for the life of the process.
pub fn spawn_checkpointer(
    path: &Path,
    frames: WalFrames,
    pace: CheckpointPace,
) -> Result<Arc<AtomicU64>, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(2))?;
    let runs = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&runs);
    std::thread::Builder::new()
        .name("pforte-checkpoint".into())
        .spawn(move || {
            let checkpoint = |mode: &str| -> rusqlite::Result<(i64, i64)> {
                conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                    Ok((r.get(1)?, r.get(2)?))
                })
            };
            let mut copied = frames.get();
            let mut last = Instant::now();
            loop {
                std::thread::sleep(pace.tick);
                let now = frames.get();
                let pending = now.saturating_sub(copied);
                if pending == 0 || (pending < pace.frames && last.elapsed() < pace.idle) {
                    continue;
                }
                copied = now;
                last = Instant::now();
                match checkpoint("PASSIVE") {
                    Ok((log, _)) if log > WAL_RESTART_FRAMES => {
                        if let Err(e) = checkpoint("RESTART") {
                            tracing::debug!(error = %e, "WAL restart did not run");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "WAL checkpoint did not run"),
                }
                counted.fetch_add(1, Ordering::Relaxed);
            }
        })?;
    Ok(runs)
}

type Ack = oneshot::Sender<Result<(), CommitError>>;

enum Job {
    /// A change, who waits for its commit, and its audit line.
    Op(StoreOp, Option<Ack>, Option<Vec<u8>>),
    Flush(Ack),
}

/// Changes waiting for a commit.
struct Queue {
    jobs: Vec<Job>,
    /// False once every [`StoreHandle`] is gone: the writer thread commits what is left and stops.
    open: bool,
    /// The writer thread waits for work.
    sleeping: bool,
}

/// The store and the changes whose commit failed and that no caller waits for (ends, byte
/// counts): retried until the disk takes them, so a disk-full spell does not leave ended
/// sessions behind.
struct Writer {
    store: Box<dyn SessionStore>,
    retry: Vec<StoreOp>,
}

/// What the handles and the writer thread share.
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer thread.
    wake: Condvar,
    /// Held by whoever commits: a caller of [`StoreHandle::commit`] or the writer thread.
    writer: Mutex<Writer>,
    metrics: Metrics,
    audit: Option<Arc<Audit>>,
    admit_unrecorded: bool,
    /// When the last commit ended, in nanoseconds since `epoch`.
    last_commit: AtomicU64,
    epoch: Instant,
}

/// Hands changes to the store. Cheap to clone; when the last clone is dropped, the writer
/// thread commits what is queued and stops.
#[derive(Clone)]
pub struct StoreHandle {
    token: Arc<Token>,
}

/// Dropped with the last [`StoreHandle`].
struct Token(Arc<Shared>);

impl Drop for Token {
    fn drop(&mut self) {
        lock(&self.0.queue).open = false;
        self.0.wake.notify_one();
    }
}

/// The writer thread; joining it flushes everything queued.
pub struct StoreWriter {
    handle: Option<JoinHandle<()>>,
}

impl StoreWriter {
    /// Waits for the writer to commit what is queued and stop. Every [`StoreHandle`] must be
    /// dropped first.
    pub fn join(mut self) {
        if let Some(h) = self.handle.take()
            && h.join().is_err()
        {
            tracing::error!("session store writer panicked");
        }
    }
}

/// Most changes one transaction takes.
const MAX_BATCH: usize = 4096;

/// A caller of [`StoreHandle::commit`] commits on its own thread only if no commit has ended
/// for this long: under load the writer thread commits, and gathers more changes per
/// transaction than callers committing one by one would (docs/BENCHMARKS.md).
const IDLE_GAP: Duration = Duration::from_millis(1);

/// After committing, the writer thread looks at the queue again this much later before it goes
/// to sleep, and while it waits callers do not wake it: under load the next changes are
/// queued by then, and each wake-up of a sleeping thread on the other CPU costs the request
/// thread more than a decision's worth of work on a VM. Longer waits starve the request
/// thread of answers (300 µs: fewer pairs/s than none); docs/BENCHMARKS.md.
const WRITER_POLL: Duration = Duration::from_micros(100);

/// Starts the store's writer thread.
///
/// Group commit: the writer thread takes everything queued at that moment into one
/// transaction, so under load one commit carries many decisions. An idle store is the
/// exception: a caller of [`StoreHandle::commit`] that finds nobody committing and no commit
/// ended in the last [`IDLE_GAP`] commits its change itself, on its own thread, and so spares
/// a sparse decision (a VPN connect now and then) the hand-over to a sleeping thread and back,
/// 0.1-0.2 ms on a VM. Whoever commits looks at the queue again after letting go of the store
/// and wakes the writer thread for what was queued meanwhile, so no change is left behind.
/// After a commit the writer thread looks at the queue once more, [`WRITER_POLL`] later, before
/// it sleeps and can be woken: the changes queued meanwhile cost nobody a wake-up.
/// The writer thread also commits changes that nobody waits for ([`StoreHandle::queue`]) and
/// retries failed ones.
///
/// Audit lines that ride with a change are written with its batch, right after the commit and
/// before anyone is answered: one write for many decisions. The line of an insert that fails
/// is written only when `admit_unrecorded` (fail mode open: the session is admitted anyway).
pub fn spawn_writer<S: SessionStore>(
    store: S,
    metrics: Metrics,
    audit: Option<Arc<Audit>>,
    admit_unrecorded: bool,
) -> Result<(StoreHandle, StoreWriter), StoreError> {
    metrics.store_healthy.set(1);
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            jobs: Vec::new(),
            open: true,
            sleeping: false,
        }),
        wake: Condvar::new(),
        writer: Mutex::new(Writer {
            store: Box::new(store),
            retry: Vec::new(),
        }),
        metrics,
        audit,
        admit_unrecorded,
        last_commit: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let thread = Arc::clone(&shared);
    let handle = std::thread::Builder::new()
        .name("pforte-store".into())
        .spawn(move || thread.writer_thread())?;
    Ok((
        StoreHandle {
            token: Arc::new(Token(shared)),
        },
        StoreWriter {
            handle: Some(handle),
        },
    ))
}

impl Shared {
    /// Takes up to [`MAX_BATCH`] queued jobs, in order.
    fn take_jobs(&self) -> Vec<Job> {
        let mut q = lock(&self.queue);
        if q.jobs.len() <= MAX_BATCH {
            std::mem::take(&mut q.jobs)
        } else {
            q.jobs.drain(..MAX_BATCH).collect()
        }
    }

    fn queue_is_empty(&self) -> bool {
        lock(&self.queue).jobs.is_empty()
    }

    /// Commits what is queued here, on the caller's thread, if the store is idle: nobody is
    /// committing and the last commit ended more than [`IDLE_GAP`] ago. Otherwise (and for
    /// what was queued meanwhile) the writer thread commits. See [`spawn_writer`].
    fn commit_here_if_idle(&self) {
        if self.elapsed_since_commit() < IDLE_GAP {
            self.wake_writer();
            return;
        }
        // Whoever holds it looks at the queue after letting go.
        let Some(mut w) = try_lock(&self.writer) else {
            return;
        };
        let jobs = self.take_jobs();
        if !jobs.is_empty() {
            self.commit_jobs(&mut w, jobs);
        }
        drop(w);
        // Changes queued while this thread held the store, and a failed commit's retries.
        self.wake_writer();
    }

    /// Nanoseconds since `epoch`, as stored in `last_commit`.
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn elapsed_since_commit(&self) -> Duration {
        Duration::from_nanos(
            self.now_ns()
                .saturating_sub(self.last_commit.load(Ordering::Relaxed)),
        )
    }

    /// Wakes the writer thread if it sleeps and has something to do. Once woken it counts as
    /// awake: callers that queue before it runs do not wake it again (it takes everything
    /// queued when it runs), which spares each of them a futex call.
    fn wake_writer(&self) {
        let mut q = lock(&self.queue);
        if q.sleeping && (!q.jobs.is_empty() || !q.open) {
            q.sleeping = false;
            drop(q);
            self.wake.notify_one();
        }
    }

    fn writer_thread(&self) {
        let mut just_committed = false;
        loop {
            if std::mem::take(&mut just_committed) {
                std::thread::sleep(WRITER_POLL);
            }
            let open = {
                let mut q = lock(&self.queue);
                if q.jobs.is_empty() && q.open {
                    q.sleeping = true;
                    q = wait_timeout(&self.wake, q, Duration::from_millis(500));
                    q.sleeping = false;
                }
                q.open
            };
            let mut w = lock(&self.writer);
            let mut failed = false;
            loop {
                let jobs = self.take_jobs();
                if jobs.is_empty() && w.retry.is_empty() {
                    break;
                }
                just_committed = true;
                if !self.commit_jobs(&mut w, jobs) {
                    failed = true;
                    break;
                }
            }
            let left = w.retry.len();
            drop(w);
            // Closed: stop once everything is written, or give up on a failing disk rather
            // than spin.
            if !open && (failed || self.queue_is_empty()) {
                if failed {
                    tracing::error!(lost = left, "session store changes not written at shutdown");
                }
                return;
            }
            if failed {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// Commits the jobs (and the changes to retry) in one transaction, writes their audit lines
    /// and answers whoever waits. False if the commit failed.
    fn commit_jobs(&self, w: &mut Writer, jobs: Vec<Job>) -> bool {
        let metrics = &self.metrics;
        let mut ops: Vec<StoreOp> = std::mem::take(&mut w.retry);
        let mut acks: Vec<(usize, Ack)> = Vec::new();
        let mut flushes: Vec<Ack> = Vec::new();
        // Audit lines of inserts (written only if the insert commits) and of everything else
        // (ends happened whether or not the disk takes them now).
        let mut insert_lines: Vec<u8> = Vec::new();
        let mut other_lines: Vec<u8> = Vec::new();
        for job in jobs {
            match job {
                Job::Op(op, ack, line) => {
                    if let Some(line) = line {
                        if matches!(op, StoreOp::Insert(_)) {
                            insert_lines.extend_from_slice(&line);
                        } else {
                            other_lines.extend_from_slice(&line);
                        }
                    }
                    if let Some(ack) = ack {
                        acks.push((ops.len(), ack));
                    }
                    ops.push(op);
                }
                Job::Flush(ack) => flushes.push(ack),
            }
        }
        let audit = self.audit.as_deref();
        if ops.is_empty() {
            if let Some(a) = audit {
                a.write(&other_lines, metrics);
            }
            for f in flushes {
                let _ = f.send(Ok(()));
            }
            return true;
        }
        let applied = w.store.apply(&ops);
        self.last_commit.store(self.now_ns(), Ordering::Relaxed);
        match applied {
            Ok(()) => {
                metrics.store_healthy.set(1);
                if let Some(a) = audit {
                    insert_lines.extend_from_slice(&other_lines);
                    a.write(&insert_lines, metrics);
                }
                for (_, ack) in acks {
                    let _ = ack.send(Ok(()));
                }
                for f in flushes {
                    let _ = f.send(Ok(()));
                }
                true
            }
            Err(e) => {
                metrics.store_errors.inc();
                metrics.store_healthy.set(0);
                if let Some(a) = audit {
                    if self.admit_unrecorded {
                        insert_lines.extend_from_slice(&other_lines);
                        a.write(&insert_lines, metrics);
                    } else {
                        a.write(&other_lines, metrics);
                    }
                }
                tracing::error!(error = %e, changes = ops.len(), "session store commit failed");
                let e = CommitError::Failed(Arc::new(e));
                let acked: std::collections::HashSet<usize> =
                    acks.iter().map(|(i, _)| *i).collect();
                // Inserts that someone waits for are answered (the caller undoes them);
                // everything else is kept for the next attempt.
                w.retry = ops
                    .into_iter()
                    .enumerate()
                    .filter(|(i, op)| !(acked.contains(i) && matches!(op, StoreOp::Insert(_))))
                    .map(|(_, op)| op)
                    .collect();
                for (_, ack) in acks {
                    let _ = ack.send(Err(e.clone()));
                }
                for f in flushes {
                    let _ = f.send(Err(e.clone()));
                }
                false
            }
        }
    }
}

impl StoreHandle {
    fn push(&self, job: Job) -> Result<(), CommitError> {
        let mut q = lock(&self.token.0.queue);
        if !q.open {
            return Err(CommitError::Stopped);
        }
        q.jobs.push(job);
        Ok(())
    }

    /// Queues a change (with its audit line) and waits for its commit, committing it (and
    /// whatever else is queued) on this thread if nobody else is committing.
    pub async fn commit(
        &self,
        op: StoreOp,
        audit_line: Option<Vec<u8>>,
    ) -> Result<(), CommitError> {
        let (tx, rx) = oneshot::channel();
        self.push(Job::Op(op, Some(tx), audit_line))?;
        self.token.0.commit_here_if_idle();
        rx.await.map_err(|_| CommitError::Stopped)?
    }

    /// Queues a change (with its audit line) without waiting; the writer thread commits it.
    pub fn queue(&self, op: StoreOp, audit_line: Option<Vec<u8>>) {
        if self.push(Job::Op(op, None, audit_line)).is_err() {
            tracing::warn!("session store writer has stopped; change dropped");
            return;
        }
        self.token.0.wake_writer();
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) -> Result<(), CommitError> {
        let (tx, rx) = oneshot::channel();
        self.push(Job::Flush(tx))?;
        self.token.0.commit_here_if_idle();
        rx.await.map_err(|_| CommitError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(i: usize) -> Session {
        Session {
            id: format!("s{i}"),
            vpn: "openvpn".into(),
            instance: "i".into(),
            session_key: format!("k{i}"),
            zone: "office".into(),
            org_unit: "it".into(),
            level: 1,
            priority: false,
            device_id: format!("d{i}"),
            username: format!("u{i}"),
            common_name: String::new(),
            remote_addr: String::new(),
            tunnel_ip: None,
            pool_ip: false,
            started_at: 0,
            bytes_received: 0,
            bytes_sent: 0,
        }
    }

    /// Sparse commits are not checkpointed one by one (each checkpoint would make the next
    /// commit fsync a new WAL header); enough frames, or enough time, are.
    #[test]
    fn checkpoints_follow_the_frames_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut store = SqliteStore::open(&path, Durability::Normal).unwrap();
        let pace = CheckpointPace {
            tick: Duration::from_millis(5),
            frames: 50,
            idle: Duration::from_secs(1),
        };
        let runs = spawn_checkpointer(&path, store.wal_frames(), pace).unwrap();
        let insert = |store: &mut SqliteStore, i| {
            store
                .apply(&[StoreOp::Insert(Box::new(session(i)))])
                .unwrap();
        };
        let wait_for = |n: u64, within: Duration| {
            let t0 = Instant::now();
            while runs.load(Ordering::Relaxed) < n && t0.elapsed() < within {
                std::thread::sleep(Duration::from_millis(5));
            }
            runs.load(Ordering::Relaxed)
        };
        // Ten commits 10 ms apart: ten frames, well within the second.
        let t0 = Instant::now();
        for i in 0..10 {
            insert(&mut store, i);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(store.wal_frames().get() >= 10);
        if t0.elapsed() < Duration::from_millis(800) {
            assert_eq!(
                runs.load(Ordering::Relaxed),
                0,
                "sparse commits were checkpointed"
            );
        }
        // Past 50 frames: a checkpoint follows within ticks.
        for i in 10..80 {
            insert(&mut store, i);
        }
        assert_eq!(wait_for(1, Duration::from_secs(5)), 1);
        // One more commit: checkpointed only once the last checkpoint is a second old.
        let t1 = Instant::now();
        insert(&mut store, 80);
        assert_eq!(wait_for(2, Duration::from_secs(10)), 2);
        assert!(
            t1.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t1.elapsed()
        );
        assert_eq!(store.load().unwrap().len(), 81);
    }

    /// Under continuous commits the WAL must start over now and then: a PASSIVE checkpoint
    /// alone never completes while a writer keeps writing, and the WAL grew by gigabytes.
    #[test]
    fn wal_stays_bounded_under_continuous_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut store = SqliteStore::open(&path, Durability::Normal).unwrap();
        let pace = CheckpointPace {
            tick: Duration::from_millis(10),
            ..CheckpointPace::default()
        };
        spawn_checkpointer(&path, store.wal_frames(), pace).unwrap();
        // 30,000 commits of one insert and one delete: without restarts over 200 MB of WAL.
        for i in 0..30_000 {
            store
                .apply(&[
                    StoreOp::Insert(Box::new(session(i))),
                    StoreOp::Delete(format!("s{}", i.saturating_sub(1))),
                ])
                .unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("s.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(wal < 100 * 1024 * 1024, "WAL is {wal} bytes");
        assert_eq!(store.load().unwrap().len(), 1);
    }

    /// The thread that applied a transaction, and its changes.
    type Batch = (Option<String>, Vec<String>);

    /// A store in memory that records which thread applied each transaction, and can be made
    /// to fail or to take its time.
    #[derive(Clone, Default)]
    struct Recorder {
        batches: Arc<Mutex<Vec<Batch>>>,
        failing: Arc<std::sync::atomic::AtomicBool>,
        slow: Duration,
    }

    impl SessionStore for Recorder {
        fn load(&mut self) -> Result<Vec<Session>, StoreError> {
            Ok(Vec::new())
        }
        fn apply(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
            std::thread::sleep(self.slow);
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Io(std::io::Error::other("disk full")));
            }
            let names = ops
                .iter()
                .map(|op| match op {
                    StoreOp::Insert(s) => format!("+{}", s.id),
                    StoreOp::Delete(id) => format!("-{id}"),
                    StoreOp::Bytes { id, .. } => format!("b{id}"),
                })
                .collect();
            let thread = std::thread::current().name().map(str::to_string);
            lock(&self.batches).push((thread, names));
            Ok(())
        }
    }

    fn applied(r: &Recorder) -> Vec<String> {
        lock(&r.batches)
            .iter()
            .flat_map(|(_, ops)| ops.clone())
            .collect()
    }

    fn insert(i: usize) -> StoreOp {
        StoreOp::Insert(Box::new(session(i)))
    }

    /// A sparse commit is made by its caller, without a hand-over to the writer thread; a burst
    /// is committed in groups, every change once, every caller answered after its commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_store_commits_on_the_callers_thread_and_a_busy_one_in_groups() {
        let rec = Recorder {
            slow: Duration::from_millis(2),
            ..Recorder::default()
        };
        let metrics = Metrics::new().unwrap();
        let (store, writer) = spawn_writer(rec.clone(), metrics, None, false).unwrap();
        tokio::time::sleep(IDLE_GAP * 2).await;
        store.commit(insert(0), None).await.unwrap();
        {
            let batches = lock(&rec.batches);
            assert_eq!(batches.len(), 1);
            assert_ne!(batches[0].0.as_deref(), Some("pforte-store"));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for i in 1..=200 {
            let store = store.clone();
            let rec = rec.clone();
            tasks.spawn(async move {
                store.commit(insert(i), None).await.unwrap();
                // Answered only once its change is applied.
                assert!(applied(&rec).contains(&format!("+s{i}")));
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let mut ops = applied(&rec);
        ops.sort();
        let mut want: Vec<String> = (0..=200).map(|i| format!("+s{i}")).collect();
        want.sort();
        assert_eq!(ops, want, "every change applied exactly once");
        let batches = lock(&rec.batches).len();
        assert!(batches < 100, "201 changes in {batches} transactions");
        drop(store);
        writer.join();
    }

    /// Changes nobody waits for are committed by the writer thread, and before it stops; a
    /// failed insert is answered with the error, a failed end is kept and committed once the
    /// disk takes it again.
    #[tokio::test]
    async fn queued_and_failed_changes_are_not_lost() {
        let rec = Recorder::default();
        let metrics = Metrics::new().unwrap();
        let (store, writer) = spawn_writer(rec.clone(), metrics, None, false).unwrap();
        store.queue(StoreOp::Delete("q1".into()), None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !applied(&rec).contains(&"-q1".to_string()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(lock(&rec.batches)[0].0.as_deref(), Some("pforte-store"));

        rec.failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(IDLE_GAP * 2).await;
        assert!(store.commit(insert(7), None).await.is_err());
        assert!(
            store
                .commit(StoreOp::Delete("s3".into()), None)
                .await
                .is_err()
        );
        rec.failing.store(false, Ordering::SeqCst);
        store.flush().await.unwrap();
        let ops = applied(&rec);
        assert!(ops.contains(&"-s3".to_string()), "{ops:?}");
        assert!(!ops.contains(&"+s7".to_string()), "{ops:?}");

        store.queue(StoreOp::Delete("q2".into()), None);
        store.queue(StoreOp::Delete("q3".into()), None);
        drop(store);
        writer.join();
        let ops = applied(&rec);
        assert!(
            ops.ends_with(&["-q2".to_string(), "-q3".to_string()]),
            "{ops:?}"
        );
    }
}
