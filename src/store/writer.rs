//! The group-commit writer: queues changes, commits them in batches on a thread of its own
//! (or on an idle caller's), acknowledges each after its commit, and retries what no caller
//! waits for.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{CommitError, SessionStore, StoreError, StoreOp};
use crate::audit::Audit;
use crate::metrics::Metrics;
use crate::sync::{lock, try_lock, wait_timeout};

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
    /// The last commit succeeded (or none was tried yet).
    healthy: AtomicBool,
    epoch: Instant,
}

/// Hands changes to the store. Cheap to clone; when the last clone is dropped, the writer
/// thread commits what is queued and stops.
#[derive(Clone)]
pub struct StoreHandle {
    backend: Backend,
}

/// The writer behind a handle: this box's own (SQLite) or the cluster's (PostgreSQL).
#[derive(Clone)]
enum Backend {
    Local(Arc<Token>),
    Shared(super::PgHandle),
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

/// A commit that takes longer is logged (a held-back writer, a slow disk).
const SLOW_COMMIT: Duration = Duration::from_millis(20);

/// Most changes one transaction takes.
const MAX_BATCH: usize = 4096;

/// A caller of [`StoreHandle::commit`] commits on its own thread only if no commit has ended
/// for this long: under load the writer thread commits, and gathers more changes per
/// transaction than callers committing one by one would (docs/BENCHMARKS-HISTORY.md).
const IDLE_GAP: Duration = Duration::from_millis(1);

/// After committing, the writer thread looks at the queue again this much later before it goes
/// to sleep, and while it waits callers do not wake it: under load the next changes are
/// queued by then, and each wake-up of a sleeping thread on the other CPU costs the request
/// thread more than a decision's worth of work on a VM. Longer waits starve the request
/// thread of answers (300 µs: fewer pairs/s than none); docs/BENCHMARKS-HISTORY.md.
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
        healthy: AtomicBool::new(true),
        epoch: Instant::now(),
    });
    let thread = Arc::clone(&shared);
    let handle = std::thread::Builder::new()
        .name("pforte-store".into())
        .spawn(move || thread.writer_thread())?;
    Ok((
        StoreHandle {
            backend: Backend::Local(Arc::new(Token(shared))),
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
        let started = Instant::now();
        let applied = w.store.apply(&ops);
        let took = started.elapsed();
        metrics.store_commit_duration.observe(took.as_secs_f64());
        if took > SLOW_COMMIT {
            tracing::warn!(?took, changes = ops.len(), "slow session store commit");
        }
        self.last_commit.store(self.now_ns(), Ordering::Relaxed);
        match applied {
            Ok(()) => {
                self.healthy.store(true, Ordering::Relaxed);
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
                self.healthy.store(false, Ordering::Relaxed);
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
    /// A handle on the shared PostgreSQL store.
    pub fn shared(pg: super::PgHandle) -> StoreHandle {
        StoreHandle {
            backend: Backend::Shared(pg),
        }
    }

    /// The shared store, if this is one: admission is then the cluster's
    /// ([`super::PgHandle::admit`]).
    pub fn cluster(&self) -> Option<&super::PgHandle> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::Shared(pg) => Some(pg),
        }
    }

    /// A store of this node alone (SQLite) whose last commit succeeded: a decision taken in
    /// memory is then final, and only its durability is still to come. False for a shared
    /// store (the cluster decides capacity at the commit) and after a failed commit.
    pub fn local_and_healthy(&self) -> bool {
        match &self.backend {
            Backend::Local(token) => token.0.healthy.load(Ordering::Relaxed),
            Backend::Shared(_) => false,
        }
    }

    fn push(token: &Token, job: Job) -> Result<(), CommitError> {
        let mut q = lock(&token.0.queue);
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
        let token = match &self.backend {
            Backend::Local(token) => token,
            Backend::Shared(pg) => return pg.commit(op, audit_line).await,
        };
        let (tx, rx) = oneshot::channel();
        Self::push(token, Job::Op(op, Some(tx), audit_line))?;
        token.0.commit_here_if_idle();
        rx.await.map_err(|_| CommitError::Stopped)?
    }

    /// Queues a change (with its audit line) without waiting; the writer thread commits it.
    pub fn queue(&self, op: StoreOp, audit_line: Option<Vec<u8>>) {
        let token = match &self.backend {
            Backend::Local(token) => token,
            Backend::Shared(pg) => return pg.queue(op, audit_line),
        };
        if Self::push(token, Job::Op(op, None, audit_line)).is_err() {
            tracing::warn!("session store writer has stopped; change dropped");
            return;
        }
        token.0.wake_writer();
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) -> Result<(), CommitError> {
        let token = match &self.backend {
            Backend::Local(token) => token,
            Backend::Shared(pg) => return pg.flush().await,
        };
        let (tx, rx) = oneshot::channel();
        Self::push(token, Job::Flush(tx))?;
        token.0.commit_here_if_idle();
        rx.await.map_err(|_| CommitError::Stopped)?
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::session::Session;
    use crate::store::test_session as session;

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
