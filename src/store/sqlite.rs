//! The SQLite backend: one file in WAL mode, for a single concentrator.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, params};

use super::{SessionStore, StoreError, StoreOp};
use crate::config::Durability;
use crate::session::Session;

/// How often the writer tries again while another connection (the checkpointer's RESTART)
/// holds the database: every 200 µs, for 5 s. SQLite's own busy handler sleeps 1, 2, 5, 10,
/// 15, 20, 25, 25, 25, 50, 50, 100 ms…: a commit held back 60 ms woke only at 78 ms, one held
/// back 130 ms at 178 ms.
pub(crate) const SHORT_BUSY_WAIT: fn(i32) -> bool = |attempt| {
    if attempt >= 25_000 {
        return false;
    }
    std::thread::sleep(Duration::from_micros(200));
    true
};

/// The writer connection's page cache, in KiB (as a negative `cache_size`).
const WRITER_CACHE_KIB: i64 = -131_072;

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
        conn.busy_handler(Some(SHORT_BUSY_WAIT))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // The writer's own page cache, in pforte's memory: the session table and its indexes
        // of a large storm (100,000 sessions: ~40 MiB) stay there, so a commit never reads its
        // pages back from disk when the machine has reclaimed the file cache (SQLite's default
        // of 2 MiB made commits take 20-50 ms then; docs/BENCHMARKS.md, "Commit stalls").
        // Pages are allocated only as they are used.
        conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
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
                node: String::new(),
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
