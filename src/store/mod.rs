//! Session persistence behind one narrow interface ([`SessionStore`]), one file per backend
//! (SQLite: [`sqlite`]; PostgreSQL, shared by several nodes, with the admission done in the
//! database: [`postgres`]), the group-commit writer that every backend sits behind ([`writer`]) and
//! SQLite's WAL checkpointer ([`checkpoint`]).
//!
//! Group commit: every connect and disconnect queues its change and waits for the commit before
//! it answers. The writer thread takes everything queued at that moment into one transaction,
//! so under load one commit carries many decisions; an idle store is committed to by the caller
//! itself ([`spawn_writer`]). A decision is acknowledged only after its commit: a crash loses
//! nothing already acknowledged.

use std::sync::Arc;

use crate::session::Session;

mod checkpoint;
pub mod postgres;
mod sqlite;
mod writer;

pub use checkpoint::{CheckpointPace, spawn_checkpointer};
pub use postgres::PgHandle;
pub use sqlite::{SqliteStore, WalFrames};
pub use writer::{StoreHandle, StoreWriter, spawn_writer};

/// A store error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("session store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The store's folder could not be made.
    #[error("session store: {0}")]
    Io(#[from] std::io::Error),
    /// PostgreSQL refused, or could not be reached in time.
    #[error("session store (PostgreSQL): {0}")]
    Postgres(String),
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

#[cfg(test)]
pub(crate) fn test_session(i: usize) -> Session {
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
        node: String::new(),
    }
}
