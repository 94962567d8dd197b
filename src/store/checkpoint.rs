//! SQLite's WAL checkpointer: keeps the write-ahead log short from a connection of its own.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::{StoreError, WalFrames};

/// WAL size (in 4 KiB frames) above which the checkpointer also restarts the WAL.
const WAL_RESTART_FRAMES: i64 = 16384;

/// Frames a RESTART checkpoint may still have to copy. A RESTART holds every writer back while
/// it copies what PASSIVE checkpoints left and syncs the database: with a few dozen frames that
/// is a few milliseconds, whatever the page cache holds.
const RESTART_FRAMES_LEFT: i64 = 64;

/// PASSIVE checkpoints (which never hold the writer back) run back to back, at most this many,
/// to bring the frames left down to [`RESTART_FRAMES_LEFT`].
const CATCH_UP_PASSES: usize = 8;

/// A WAL this long is restarted even when the PASSIVE checkpoints cannot catch up (a disk
/// slower than the commits): a commit may wait for it, but the WAL stays bounded (256 MiB).
const WAL_FORCE_RESTART_FRAMES: i64 = 4 * WAL_RESTART_FRAMES;

/// What the checkpointer does after a PASSIVE checkpoint reported the WAL's length (`log`) and
/// the frames still to copy (`left`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Nothing more: the WAL is short.
    Done,
    /// Another PASSIVE checkpoint, to leave fewer frames for the RESTART.
    CatchUp,
    /// RESTART: few frames left (or the WAL must be bounded now).
    Restart,
}

fn next(log: i64, left: i64, passes: usize) -> Next {
    if log <= WAL_RESTART_FRAMES {
        Next::Done
    } else if left <= RESTART_FRAMES_LEFT || log > WAL_FORCE_RESTART_FRAMES {
        Next::Restart
    } else if passes < CATCH_UP_PASSES {
        Next::CatchUp
    } else {
        Next::Done
    }
}

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
/// for it); when the WAL has grown past [`WAL_RESTART_FRAMES`] (64 MiB), further PASSIVE
/// checkpoints bring the frames left to copy down to [`RESTART_FRAMES_LEFT`], and only then a
/// RESTART checkpoint finishes those, holding the writer back for a few milliseconds, and lets
/// the WAL start over from its beginning. Under continuous writes a PASSIVE checkpoint alone
/// never completes, and the WAL would grow without end. A RESTART issued with thousands of
/// frames left held commits for up to a fifth of a second when the frames had to be read back
/// from disk (a page cache the machine had reclaimed); the writer's busy handler then added
/// SQLite's coarse sleeps on top (`sqlite::SHORT_BUSY_WAIT`). RESTART rather than TRUNCATE: the file keeps
/// its size and is written over, where truncating it held the writer for a further 25 ms
/// (ftruncate of 64 MiB on a filesystem mounted with `discard`) and a 30 ms fsync, every few
/// seconds under load (steady-rate max latency 38 ms; docs/BENCHMARKS-HISTORY.md).
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
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let mut prefetch = WalPrefetch::new(path, page_size);
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
                let mut passes = 0;
                loop {
                    let (log, done) = match checkpoint("PASSIVE") {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::debug!(error = %e, "WAL checkpoint did not run");
                            break;
                        }
                    };
                    passes += 1;
                    prefetch.ahead_of(log);
                    match next(log, log - done, passes) {
                        Next::Done => break,
                        Next::CatchUp => continue,
                        Next::Restart => {
                            let started = Instant::now();
                            match checkpoint("RESTART") {
                                Ok(_) => prefetch.ahead_of(0),
                                Err(e) => tracing::debug!(error = %e, "WAL restart did not run"),
                            }
                            tracing::debug!(
                                took = ?started.elapsed(),
                                frames_left = log - done,
                                "WAL restarted"
                            );
                            break;
                        }
                    }
                }
                counted.fetch_add(1, Ordering::Relaxed);
            }
        })?;
    Ok(runs)
}

/// How much of the WAL ahead of the writer is kept in the file cache.
const PREFETCH_BYTES: i64 = 16 << 20;

/// Keeps the part of the WAL file that the writer writes next in the kernel's file cache.
///
/// A restarted WAL is written over from its beginning, and its frames (a page plus a 24-byte
/// header) do not line up with the file's 4 KiB pages: a frame written into a page the kernel
/// has reclaimed makes it read that page back from disk first. With the file cache reclaimed
/// (measured by dropping it every 250 ms during a 100,000-connect storm), `strace -T` showed
/// the writer's `pwrite64` into the WAL taking 5-7 ms each and commits 20-57 ms; asking for the
/// next 16 MiB ahead of the writer (`posix_fadvise(WILLNEED)`, an asynchronous read-ahead)
/// after every checkpoint keeps those pages in memory.
struct WalPrefetch {
    path: std::path::PathBuf,
    frame_bytes: i64,
    file: Option<std::fs::File>,
}

impl WalPrefetch {
    fn new(db: &Path, page_size: i64) -> WalPrefetch {
        let mut path = db.as_os_str().to_owned();
        path.push("-wal");
        WalPrefetch {
            path: path.into(),
            frame_bytes: page_size + 24,
            file: None,
        }
    }

    /// Asks for the WAL's bytes from the end of frame `frames` on to be read ahead.
    fn ahead_of(&mut self, frames: i64) {
        if self.file.is_none() {
            self.file = std::fs::File::open(&self.path).ok();
        }
        let Some(file) = &self.file else {
            return;
        };
        let offset = 32 + frames * self.frame_bytes;
        let advice = nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED;
        if let Err(e) = nix::fcntl::posix_fadvise(file, offset, PREFETCH_BYTES, advice) {
            tracing::debug!(error = %e, "WAL read-ahead not taken");
            self.file = None;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use crate::store::test_session as session;
    use crate::store::{SessionStore, SqliteStore, StoreOp};

    #[test]
    fn a_restart_waits_until_few_frames_are_left() {
        let long = WAL_RESTART_FRAMES + 1;
        assert_eq!(next(WAL_RESTART_FRAMES, 5_000, 1), Next::Done);
        assert_eq!(next(long, 5_000, 1), Next::CatchUp);
        assert_eq!(next(long, RESTART_FRAMES_LEFT, 1), Next::Restart);
        assert_eq!(
            next(long, 5_000, CATCH_UP_PASSES),
            Next::Done,
            "tried again next tick"
        );
        assert_eq!(next(WAL_FORCE_RESTART_FRAMES + 1, 5_000, 1), Next::Restart);
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
}
