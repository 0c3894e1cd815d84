//! The ledger in one SQLite file: the default, for a single machine or a shared volume.
//! Entries are stored whole as JSON, with the columns queries filter on beside them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::future::BoxFuture;
use futures::FutureExt;
use rusqlite::{params, Connection};

use super::{Beat, BuildEntry, DeployEntry, Interruption, LedgerError, LedgerStore};

pub struct SqliteLedger {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

pub(super) fn store_error(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> LedgerError {
    LedgerError::Store {
        place: format!("sqlite:{}", path.display()),
        message: e.to_string(),
        source: Some(Box::new(e)),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl SqliteLedger {
    /// Opens (creating the file and its directory if needed) and migrates.
    pub fn open(path: &Path) -> Result<SqliteLedger, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| store_error(path, e))?;
        }
        let conn = Connection::open(path).map_err(|e| store_error(path, e))?;
        // Several CI jobs on one machine may write at once: wait for the lock, briefly.
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(|e| store_error(path, e))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS builds (
                 build_id   TEXT PRIMARY KEY,
                 started_at TEXT NOT NULL,
                 entry      TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS builds_started ON builds (started_at);
             CREATE TABLE IF NOT EXISTS interruptions (
                 at       TEXT NOT NULL,
                 build_id TEXT NOT NULL,
                 attempt  INTEGER NOT NULL,
                 entry    TEXT NOT NULL,
                 PRIMARY KEY (build_id, attempt)
             );
             CREATE INDEX IF NOT EXISTS interruptions_at ON interruptions (at);
             CREATE TABLE IF NOT EXISTS beats (
                 build_id TEXT PRIMARY KEY,
                 entry    TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS deploys (
                 deploy_id TEXT NOT NULL,
                 project   TEXT NOT NULL,
                 at        TEXT NOT NULL,
                 entry     TEXT NOT NULL,
                 PRIMARY KEY (deploy_id, project)
             );
             CREATE INDEX IF NOT EXISTS deploys_at ON deploys (at);",
        )
        .map_err(|e| store_error(path, e))?;
        Ok(SqliteLedger {
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection off the async threads.
    fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, LedgerError>> {
        let conn = self.conn.clone();
        let path = self.path.clone();
        async move {
            let joined = tokio::task::spawn_blocking(move || {
                let conn = conn.lock().expect("not poisoned");
                f(&conn)
            })
            .await;
            match joined {
                Ok(r) => r.map_err(|e| store_error(&path, e)),
                Err(e) => Err(store_error(&path, e)),
            }
        }
        .boxed()
    }
}

/// Timestamps are compared as text: normalise to one RFC 3339 form first.
fn normalised(ts: &str) -> String {
    humantime::parse_rfc3339_weak(ts).map(rfc3339).unwrap_or_else(|_| ts.to_string())
}

impl LedgerStore for SqliteLedger {
    fn archive(&self) -> Option<Arc<dyn super::archive::LogArchive>> {
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        // The untrusted part (`<stem>-untrusted.sqlite`) keeps its logs apart too.
        let untrusted = self.path.file_stem().is_some_and(|s| s.to_string_lossy().ends_with("-untrusted"));
        Some(Arc::new(super::archive::DirArchive::new(if untrusted { dir.join("untrusted") } else { dir.to_path_buf() })))
    }

    fn place(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    fn put<'a>(&'a self, entry: &'a BuildEntry) -> BoxFuture<'a, Result<(), LedgerError>> {
        let json = serde_json::to_string(entry).expect("an entry always serialises");
        let (id, started) = (entry.build_id.clone(), normalised(&entry.started_at));
        self.with(move |c| {
            c.execute(
                "INSERT INTO builds (build_id, started_at, entry) VALUES (?1, ?2, ?3)
                 ON CONFLICT (build_id) DO UPDATE SET started_at = excluded.started_at, entry = excluded.entry",
                params![id, started, json],
            )
            .map(|_| ())
        })
    }

    fn list(&self, since: SystemTime, until: SystemTime) -> BoxFuture<'_, Result<Vec<BuildEntry>, LedgerError>> {
        let (since, until) = (rfc3339(since), rfc3339(until));
        let path = self.path.clone();
        async move {
            let rows: Vec<String> = self
                .with(move |c| {
                    let mut stmt = c.prepare("SELECT entry FROM builds WHERE started_at >= ?1 AND started_at < ?2 ORDER BY started_at, build_id")?;
                    let rows = stmt.query_map(params![since, until], |r| r.get::<_, String>(0))?;
                    rows.collect()
                })
                .await?;
            rows.iter()
                .map(|r| serde_json::from_str(r).map_err(|e| store_error(&path, e)))
                .collect()
        }
        .boxed()
    }

    fn record_interruption<'a>(&'a self, i: &'a Interruption) -> BoxFuture<'a, Result<(), LedgerError>> {
        let json = serde_json::to_string(i).expect("serialisable");
        let (at, id, attempt) = (normalised(&i.at), i.build_id.clone(), i.attempt);
        self.with(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO interruptions (at, build_id, attempt, entry) VALUES (?1, ?2, ?3, ?4)",
                params![at, id, attempt, json],
            )
            .map(|_| ())
        })
    }

    fn interruptions(&self, since: SystemTime) -> BoxFuture<'_, Result<Vec<SystemTime>, LedgerError>> {
        let since = rfc3339(since);
        async move {
            let rows: Vec<String> = self
                .with(move |c| {
                    let mut stmt = c.prepare("SELECT at FROM interruptions WHERE at >= ?1 ORDER BY at")?;
                    let rows = stmt.query_map(params![since], |r| r.get::<_, String>(0))?;
                    rows.collect()
                })
                .await?;
            Ok(rows.iter().filter_map(|t| humantime::parse_rfc3339_weak(t).ok()).collect())
        }
        .boxed()
    }

    fn get<'a>(&'a self, build_id: &'a str, _started_at: &'a str) -> BoxFuture<'a, Result<Option<BuildEntry>, LedgerError>> {
        let id = build_id.to_string();
        let path = self.path.clone();
        async move {
            let row: Option<String> = self
                .with(move |c| {
                    let mut stmt = c.prepare("SELECT entry FROM builds WHERE build_id = ?1")?;
                    let mut rows = stmt.query_map(params![id], |r| r.get::<_, String>(0))?;
                    rows.next().transpose()
                })
                .await?;
            row.map(|r| serde_json::from_str(&r).map_err(|e| store_error(&path, e))).transpose()
        }
        .boxed()
    }

    fn beat<'a>(&'a self, beat: &'a Beat) -> BoxFuture<'a, Result<(), LedgerError>> {
        let json = serde_json::to_string(beat).expect("a beat always serialises");
        let id = beat.build_id.clone();
        self.with(move |c| {
            c.execute(
                "INSERT INTO beats (build_id, entry) VALUES (?1, ?2)
                 ON CONFLICT (build_id) DO UPDATE SET entry = excluded.entry",
                params![id, json],
            )
            .map(|_| ())
        })
    }

    fn beats<'a>(&'a self, build_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Beat>, LedgerError>> {
        let ids = build_ids.to_vec();
        let path = self.path.clone();
        async move {
            let rows: Vec<String> = self
                .with(move |c| {
                    let mut stmt = c.prepare("SELECT entry FROM beats WHERE build_id = ?1")?;
                    let mut out = Vec::new();
                    for id in &ids {
                        let mut rows = stmt.query_map(params![id], |r| r.get::<_, String>(0))?;
                        if let Some(r) = rows.next() {
                            out.push(r?);
                        }
                    }
                    Ok(out)
                })
                .await?;
            rows.iter().map(|r| serde_json::from_str(r).map_err(|e| store_error(&path, e))).collect()
        }
        .boxed()
    }

    fn record_deploy<'a>(&'a self, entry: &'a DeployEntry) -> BoxFuture<'a, Result<(), LedgerError>> {
        let json = serde_json::to_string(entry).expect("an entry always serialises");
        let (id, project, at) = (entry.deploy_id.clone(), entry.project.clone(), normalised(&entry.at));
        self.with(move |c| {
            c.execute(
                "INSERT INTO deploys (deploy_id, project, at, entry) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (deploy_id, project) DO UPDATE SET at = excluded.at, entry = excluded.entry",
                params![id, project, at, json],
            )
            .map(|_| ())
        })
    }

    fn deploys(&self, since: SystemTime, until: SystemTime) -> BoxFuture<'_, Result<Vec<DeployEntry>, LedgerError>> {
        let (since, until) = (rfc3339(since), rfc3339(until));
        let path = self.path.clone();
        async move {
            let rows: Vec<String> = self
                .with(move |c| {
                    let mut stmt = c.prepare("SELECT entry FROM deploys WHERE at >= ?1 AND at < ?2 ORDER BY at, deploy_id, project")?;
                    let rows = stmt.query_map(params![since, until], |r| r.get::<_, String>(0))?;
                    rows.collect()
                })
                .await?;
            rows.iter().map(|r| serde_json::from_str(r).map_err(|e| store_error(&path, e))).collect()
        }
        .boxed()
    }
}
