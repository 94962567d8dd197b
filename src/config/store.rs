//! `[store]` keys for several concentrators sharing one session table on PostgreSQL:
//! `backend`, `url`, `password_file`, `node`, `lease_s`, `statement_timeout_ms`.

use std::path::PathBuf;
use std::time::Duration;

use super::raw::RawStore;
use super::validate::{Invalid, bad};

/// Which store holds the sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file for this concentrator alone (the default).
    Sqlite,
    /// A PostgreSQL database shared by every pforte of a cluster.
    Postgres(PostgresConfig),
}

/// How to reach the shared database, and this node's place in the cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// libpq-style URL or key=value string (several hosts, `target_session_attrs=read-write`).
    pub url: String,
    /// File holding the password (read at start); libpq's usual ways work too.
    pub password_file: Option<PathBuf>,
    /// This pforte's name in the cluster.
    pub node: String,
    /// Sessions of a node that has not renewed its lease for this long are ended.
    pub lease: Duration,
    /// Longest a statement may take (server side, and the client gives up after it too).
    pub statement_timeout: Duration,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &mask_url(&self.url))
            .field("password_file", &self.password_file)
            .field("node", &self.node)
            .field("lease", &self.lease)
            .field("statement_timeout", &self.statement_timeout)
            .finish()
    }
}

/// The URL with a password in it replaced by `***` (for logs).
pub fn mask_url(url: &str) -> String {
    if let Some(rest) = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
    {
        let scheme = &url[..url.len() - rest.len()];
        let (auth, tail) = match rest.find('@') {
            Some(i) if !rest[..i].contains('/') => (&rest[..i], &rest[i..]),
            _ => return url.to_string(),
        };
        return match auth.split_once(':') {
            Some((user, _)) => format!("{scheme}{user}:***{tail}"),
            None => url.to_string(),
        };
    }
    // key=value form
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The host name, the default node name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pforte".to_string())
}

pub(super) fn backend(raw: &RawStore) -> Result<Backend, Invalid> {
    let kind = raw.backend.as_deref().unwrap_or("sqlite");
    let pg_only = [
        ("store.url", raw.url.is_some()),
        ("store.password_file", raw.password_file.is_some()),
        ("store.node", raw.node.is_some()),
        ("store.lease_s", raw.lease_s.is_some()),
        (
            "store.statement_timeout_ms",
            raw.statement_timeout_ms.is_some(),
        ),
    ];
    match kind {
        "sqlite" => {
            if let Some((key, _)) = pg_only.iter().find(|(_, set)| *set) {
                return Err(bad(
                    *key,
                    "only used with backend = \"postgres\" (the backend is sqlite)",
                ));
            }
            Ok(Backend::Sqlite)
        }
        "postgres" => {
            let url = raw
                .url
                .clone()
                .filter(|u| !u.trim().is_empty())
                .ok_or_else(|| {
                    bad(
                        "store.url",
                        "missing: the PostgreSQL connection string (postgresql://user@host/db)",
                    )
                })?;
            if url.parse::<tokio_postgres::Config>().is_err() {
                return Err(bad(
                    "store.url",
                    format!("`{}` is not a PostgreSQL connection string", mask_url(&url)),
                ));
            }
            let node = raw.node.clone().unwrap_or_else(host_name);
            if node.is_empty()
                || node.len() > 63
                || !node
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            {
                return Err(bad(
                    "store.node",
                    format!("`{node}`: 1 to 63 letters, digits, `.`, `-` or `_`"),
                ));
            }
            let lease_s = raw.lease_s.unwrap_or(60);
            if !(3..=86_400).contains(&lease_s) {
                return Err(bad(
                    "store.lease_s",
                    format!("{lease_s} is not between 3 and 86400 seconds"),
                ));
            }
            let timeout_ms = raw.statement_timeout_ms.unwrap_or(1500);
            if !(50..=60_000).contains(&timeout_ms) {
                return Err(bad(
                    "store.statement_timeout_ms",
                    format!("{timeout_ms} is not between 50 and 60000 ms"),
                ));
            }
            Ok(Backend::Postgres(PostgresConfig {
                url,
                password_file: raw.password_file.clone().map(PathBuf::from),
                node,
                lease: Duration::from_secs(lease_s),
                statement_timeout: Duration::from_millis(timeout_ms),
            }))
        }
        other => Err(bad(
            "store.backend",
            format!("`{other}` is not one of sqlite, postgres"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_masked() {
        assert_eq!(
            mask_url("postgresql://pforte:s3cret@db1,db2/pforte?target_session_attrs=read-write"),
            "postgresql://pforte:***@db1,db2/pforte?target_session_attrs=read-write"
        );
        assert_eq!(
            mask_url("postgresql://pforte@db1/pforte"),
            "postgresql://pforte@db1/pforte"
        );
        assert_eq!(
            mask_url("host=db1 user=pforte password=s3cret"),
            "host=db1 user=pforte password=***"
        );
    }

    #[test]
    fn postgres_keys_are_checked() {
        let raw = RawStore {
            backend: Some("postgres".into()),
            url: Some("postgresql://pforte@127.0.0.1:5432/pforte".into()),
            node: Some("gw1".into()),
            ..RawStore::default()
        };
        match backend(&raw).unwrap() {
            Backend::Postgres(pg) => {
                assert_eq!(pg.node, "gw1");
                assert_eq!(pg.lease, Duration::from_secs(60));
                assert_eq!(pg.statement_timeout, Duration::from_millis(1500));
            }
            Backend::Sqlite => panic!("postgres expected"),
        }
        let sqlite_with_url = RawStore {
            url: Some("postgresql://x@y/z".into()),
            ..RawStore::default()
        };
        assert_eq!(backend(&sqlite_with_url).unwrap_err().0, "store.url");
        let bad_node = RawStore {
            node: Some("gw 1".into()),
            ..raw
        };
        assert_eq!(backend(&bad_node).unwrap_err().0, "store.node");
    }
}
