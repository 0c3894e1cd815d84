//! The log archive: every build's event stream, compressed, where its ledger is
//! (`logs/YYYY/MM/DD/<build>/<attempt>.ndjson.zst` in the bucket, or beside the SQLite
//! file), so a failed CI step's log outlives the machine and the terminal that showed it.
//!
//! # Guarantees
//! - The stream is written as it comes, in bounded chunks ([`CHUNK_BYTES`] or
//!   [`CHUNK_AGE`], whichever comes first), each one complete zstd frame: a controller
//!   killed with SIGKILL loses at most the chunk it had not written yet.
//! - What is archived is exactly the lines `--json` prints (already redacted by the
//!   agent and the controller), one file per attempt; attempt 0 holds the build's own
//!   lines (its start, its notes, its final record).
//! - A reader gets every complete frame, in order, also while the build still runs.
//!
//! # Caveats
//! - In a bucket an object cannot be appended to: while a build runs its chunks are
//!   objects of their own (`<attempt>.ndjson.zst.part-NNNNNN`), joined into
//!   `<attempt>.ndjson.zst` when the build ends. Readers take either.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use super::LedgerError;
use crate::objects::ObjectStore;

/// The largest chunk the writer holds before writing it.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// The longest the writer holds a line before writing it.
pub const CHUNK_AGE: Duration = Duration::from_secs(2);

/// One attempt's log of one build (instance group).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogKey {
    pub build_id: String,
    /// 0: the build's own lines; 1, 2, …: its attempts.
    pub attempt: u32,
}

impl LogKey {
    /// `logs/YYYY/MM/DD/<build>/<attempt>.ndjson.zst`, dated by the build id.
    pub fn path(&self) -> String {
        format!("{}/{}.ndjson.zst", build_dir(&self.build_id), self.attempt)
    }
}

/// `logs/YYYY/MM/DD/<build>`: the day comes from the build id (its first part is the
/// start in milliseconds, base 36), so a reader needs nothing but the id.
pub fn build_dir(build_id: &str) -> String {
    let day = started_of(build_id)
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .map(|s| s[..10].replace('-', "/"))
        .unwrap_or_else(|| "unknown".into());
    format!("logs/{day}/{build_id}")
}

/// When a build started, from its id (`new_build_id`).
pub fn started_of(build_id: &str) -> Option<SystemTime> {
    let ms = u64::from_str_radix(build_id.split('-').next()?, 36).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

/// Where logs are kept. Implemented beside a SQLite ledger and in a ledger's bucket.
pub trait LogArchive: Send + Sync {
    /// Where a log is, for messages and the ledger's record.
    fn place(&self, key: &LogKey) -> String;

    /// Adds one complete zstd frame to the log.
    fn append<'a>(&'a self, key: &'a LogKey, frame: Vec<u8>) -> BoxFuture<'a, Result<(), LedgerError>>;

    /// The log is complete (joins a bucket's parts).
    fn finish<'a>(&'a self, key: &'a LogKey) -> BoxFuture<'a, Result<(), LedgerError>>;

    /// Every frame written so far, in order; `None` when there is no such log.
    fn read<'a>(&'a self, key: &'a LogKey) -> BoxFuture<'a, Result<Option<Vec<u8>>, LedgerError>>;

    /// The attempts (0 included) this build has logs of, in order.
    fn attempts<'a>(&'a self, build_id: &'a str) -> BoxFuture<'a, Result<Vec<u32>, LedgerError>>;
}

/// One chunk of lines as one zstd frame.
pub fn frame(lines: &[u8]) -> Vec<u8> {
    // Level 3, zstd's default: fast enough to keep up with any event stream.
    zstd::bulk::compress(lines, 3).expect("compressing into memory does not fail")
}

/// The lines of every complete frame in `bytes`, and whether a torn frame was left at the
/// end (what a write cut short by SIGKILL leaves).
pub fn lines(bytes: &[u8]) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    let mut decoder = match zstd::stream::read::Decoder::with_buffer(bytes) {
        Ok(d) => d,
        Err(_) => return (Vec::new(), !bytes.is_empty()),
    };
    let mut text = Vec::new();
    let torn = std::io::Read::read_to_end(&mut decoder, &mut text).is_err();
    // Only whole lines: a torn frame may end mid-line.
    let whole = match text.iter().rposition(|b| *b == b'\n') {
        Some(i) => &text[..=i],
        None => &[][..],
    };
    for l in whole.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        out.push(String::from_utf8_lossy(l).into_owned());
    }
    (out, torn || whole.len() < text.len())
}

/// Logs in a folder (beside a SQLite ledger): each log one file, frames appended.
pub struct DirArchive {
    root: PathBuf,
}

impl DirArchive {
    pub fn new(root: impl Into<PathBuf>) -> DirArchive {
        DirArchive { root: root.into() }
    }

    fn file(&self, key: &LogKey) -> PathBuf {
        self.root.join(key.path())
    }

    fn error(&self, key: &LogKey, e: std::io::Error) -> LedgerError {
        LedgerError::Store {
            place: self.place(key),
            message: e.to_string(),
            source: Some(Box::new(e)),
        }
    }
}

impl LogArchive for DirArchive {
    fn place(&self, key: &LogKey) -> String {
        self.file(key).display().to_string()
    }

    fn append<'a>(&'a self, key: &'a LogKey, frame: Vec<u8>) -> BoxFuture<'a, Result<(), LedgerError>> {
        let path = self.file(key);
        Box::pin(async move {
            let write = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
                // One write of the whole frame, then to disk: a crash leaves whole frames
                // and at most one torn one at the end.
                f.write_all(&frame)?;
                f.sync_data()
            });
            match write.await {
                Ok(r) => r.map_err(|e| self.error(key, e)),
                Err(e) => Err(self.error(key, std::io::Error::other(e))),
            }
        })
    }

    fn finish<'a>(&'a self, _key: &'a LogKey) -> BoxFuture<'a, Result<(), LedgerError>> {
        Box::pin(async { Ok(()) })
    }

    fn read<'a>(&'a self, key: &'a LogKey) -> BoxFuture<'a, Result<Option<Vec<u8>>, LedgerError>> {
        Box::pin(async move {
            match tokio::fs::read(self.file(key)).await {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.error(key, e)),
            }
        })
    }

    fn attempts<'a>(&'a self, build_id: &'a str) -> BoxFuture<'a, Result<Vec<u32>, LedgerError>> {
        Box::pin(async move {
            let dir = self.root.join(build_dir(build_id));
            let mut out = Vec::new();
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(self.error(&LogKey { build_id: build_id.into(), attempt: 0 }, e)),
            };
            while let Ok(Some(e)) = entries.next_entry().await {
                if let Some(n) = attempt_of(&e.file_name().to_string_lossy()) {
                    out.push(n);
                }
            }
            out.sort_unstable();
            out.dedup();
            Ok(out)
        })
    }
}

/// `3.ndjson.zst` (or a part of it) → 3.
fn attempt_of(name: &str) -> Option<u32> {
    let (n, rest) = name.split_once('.')?;
    rest.starts_with("ndjson.zst").then(|| n.parse().ok()).flatten()
}

/// Logs in a ledger's bucket: chunks are objects of their own while the build runs, one
/// object once it has ended.
pub struct ObjectArchive {
    objects: Arc<dyn ObjectStore>,
    prefix: String,
    /// The next part number of each log this process writes (listed once, then counted).
    next: std::sync::Mutex<std::collections::BTreeMap<LogKey, usize>>,
}

impl ObjectArchive {
    pub fn new(objects: Arc<dyn ObjectStore>, prefix: impl Into<String>) -> ObjectArchive {
        ObjectArchive {
            objects,
            prefix: prefix.into().trim_matches('/').to_string(),
            next: Default::default(),
        }
    }

    fn key(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    fn error(&self, e: crate::objects::ObjectError) -> LedgerError {
        LedgerError::Store {
            place: format!("s3://{}/{}", self.objects.bucket(), e.key),
            message: e.message.clone(),
            source: Some(Box::new(e)),
        }
    }

    /// The parts of a log still being written, in order.
    async fn parts(&self, key: &LogKey) -> Result<Vec<String>, LedgerError> {
        let prefix = self.key(&format!("{}.part-", key.path()));
        self.objects.list(&prefix, None).await.map_err(|e| self.error(e))
    }
}

impl LogArchive for ObjectArchive {
    fn place(&self, key: &LogKey) -> String {
        format!("s3://{}/{}", self.objects.bucket(), self.key(&key.path()))
    }

    fn append<'a>(&'a self, key: &'a LogKey, frame: Vec<u8>) -> BoxFuture<'a, Result<(), LedgerError>> {
        Box::pin(async move {
            let known = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(key).copied();
            let n = match known {
                Some(n) => n,
                None => self.parts(key).await?.len(),
            };
            self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key.clone(), n + 1);
            let part = self.key(&format!("{}.part-{n:06}", key.path()));
            self.objects.put(&part, frame).await.map_err(|e| self.error(e))
        })
    }

    fn finish<'a>(&'a self, key: &'a LogKey) -> BoxFuture<'a, Result<(), LedgerError>> {
        Box::pin(async move {
            let parts = self.parts(key).await?;
            if parts.is_empty() {
                return Ok(());
            }
            let mut whole = Vec::new();
            for p in &parts {
                whole.extend(self.objects.get(p).await.map_err(|e| self.error(e))?.unwrap_or_default());
            }
            self.objects.put(&self.key(&key.path()), whole).await.map_err(|e| self.error(e))?;
            // Only once the whole log is written: a reader in between takes the whole one.
            for p in &parts {
                self.objects.delete(p).await.map_err(|e| self.error(e))?;
            }
            Ok(())
        })
    }

    fn read<'a>(&'a self, key: &'a LogKey) -> BoxFuture<'a, Result<Option<Vec<u8>>, LedgerError>> {
        Box::pin(async move {
            // The joined object is written once, with every part: when it is there it is
            // the whole log (its parts may not be deleted yet).
            if let Some(whole) = self.objects.get(&self.key(&key.path())).await.map_err(|e| self.error(e))? {
                return Ok(Some(whole));
            }
            let parts = self.parts(key).await?;
            if parts.is_empty() {
                return Ok(None);
            }
            let mut out = Vec::new();
            for p in &parts {
                // A part deleted since the listing was just joined: the next read has it.
                if let Some(b) = self.objects.get(p).await.map_err(|e| self.error(e))? {
                    out.extend(b);
                }
            }
            Ok(Some(out))
        })
    }

    fn attempts<'a>(&'a self, build_id: &'a str) -> BoxFuture<'a, Result<Vec<u32>, LedgerError>> {
        Box::pin(async move {
            let dir = self.key(&format!("{}/", build_dir(build_id)));
            let keys = self.objects.list(&dir, None).await.map_err(|e| self.error(e))?;
            let mut out: Vec<u32> = keys.iter().filter_map(|k| attempt_of(k.rsplit('/').next().unwrap_or(k))).collect();
            out.sort_unstable();
            out.dedup();
            Ok(out)
        })
    }
}

/// A step that failed, and the last lines it wrote: what a report shows of a failed build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FailedStep {
    pub step: String,
    pub exit_code: i64,
    pub last_lines: Vec<String>,
}

/// The agent steps of an archived log that ended with a non-zero exit code, each with its
/// last `keep` log lines, in the order they ended.
pub fn failed_steps(lines: &[String], keep: usize) -> Vec<FailedStep> {
    use std::collections::{BTreeMap, VecDeque};
    let mut tails: BTreeMap<String, VecDeque<String>> = BTreeMap::new();
    let mut failed = Vec::new();
    for line in lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(step) = v["step"].as_str() else { continue };
        match v["type"].as_str() {
            Some("log") => {
                let tail = tails.entry(step.to_string()).or_default();
                if tail.len() == keep {
                    tail.pop_front();
                }
                tail.push_back(v["line"].as_str().unwrap_or_default().to_string());
            }
            Some("step_end") => {
                let code = v["exit_code"].as_i64().unwrap_or(-1);
                if code != 0 {
                    failed.push(FailedStep {
                        step: step.to_string(),
                        exit_code: code,
                        last_lines: tails.remove(step).map(Vec::from).unwrap_or_default(),
                    });
                }
            }
            _ => {}
        }
    }
    failed
}

/// Writes lines to an archive in chunks, from a task of its own, so the build never waits
/// on the store. Dropping it without [`ArchiveWriter::close`] still lets the task write
/// and finish what it holds (it ends when the last sender goes).
pub struct ArchiveWriter {
    tx: tokio::sync::mpsc::UnboundedSender<(LogKey, String)>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl ArchiveWriter {
    pub fn start(archive: Arc<dyn LogArchive>) -> ArchiveWriter {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        ArchiveWriter {
            tx,
            task: tokio::spawn(write_chunks(archive, rx)),
        }
    }

    /// Adds one line (without its newline) to `key`'s log. Never blocks.
    pub fn line(&self, key: LogKey, line: String) {
        let _ = self.tx.send((key, line));
    }

    /// Writes what is held, completes every log, and says what could not be written.
    pub async fn close(self) -> Vec<String> {
        drop(self.tx);
        self.task.await.unwrap_or_else(|e| vec![format!("the log writer ended abnormally: {e}")])
    }
}

async fn write_chunks(archive: Arc<dyn LogArchive>, mut rx: tokio::sync::mpsc::UnboundedReceiver<(LogKey, String)>) -> Vec<String> {
    use std::collections::BTreeMap;
    use tokio::time::Instant;
    let mut held: BTreeMap<LogKey, (Vec<u8>, Instant)> = BTreeMap::new();
    let mut seen: Vec<LogKey> = Vec::new();
    let mut failed: BTreeMap<LogKey, String> = BTreeMap::new();
    let mut tick = tokio::time::interval(CHUNK_AGE / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let flush = |key: LogKey, lines: Vec<u8>, failed: &mut BTreeMap<LogKey, String>| {
        let archive = archive.clone();
        let already = failed.contains_key(&key);
        async move {
            match archive.append(&key, frame(&lines)).await {
                Ok(()) => None,
                // A store that failed once is said once per log.
                Err(e) if !already => Some((key, crate::errors::error_chain(&e))),
                Err(_) => None,
            }
        }
    };
    loop {
        let due: Vec<LogKey> = tokio::select! {
            got = rx.recv() => match got {
                Some((key, line)) => {
                    if !seen.contains(&key) {
                        seen.push(key.clone());
                    }
                    let (buf, _) = held.entry(key.clone()).or_insert_with(|| (Vec::new(), Instant::now()));
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                    if buf.len() >= CHUNK_BYTES { vec![key] } else { continue }
                }
                None => break,
            },
            _ = tick.tick() => held.iter().filter(|(_, (_, since))| since.elapsed() >= CHUNK_AGE).map(|(k, _)| k.clone()).collect(),
        };
        for key in due {
            if let Some((lines, _)) = held.remove(&key) {
                if let Some((k, why)) = flush(key, lines, &mut failed).await {
                    failed.insert(k, why);
                }
            }
        }
    }
    // The build's own log last: its final record tells a follower the attempts are complete.
    let mut rest: Vec<(LogKey, Vec<u8>)> = std::mem::take(&mut held).into_iter().map(|(k, (lines, _))| (k, lines)).collect();
    rest.sort_by_key(|(k, _)| k.attempt == 0);
    for (key, lines) in rest {
        if let Some((k, why)) = flush(key, lines, &mut failed).await {
            failed.insert(k, why);
        }
    }
    seen.sort_by_key(|k| k.attempt == 0);
    for key in &seen {
        if let Err(e) = archive.finish(key).await {
            failed.entry(key.clone()).or_insert_with(|| crate::errors::error_chain(&e));
        }
    }
    failed.into_iter().map(|(k, why)| format!("the log {} was not fully archived: {why}", archive.place(&k))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_day_comes_from_the_build_id() {
        let id = crate::farm::build::new_build_id();
        let dir = build_dir(&id);
        let today = humantime::format_rfc3339_seconds(SystemTime::now()).to_string()[..10].replace('-', "/");
        assert_eq!(dir, format!("logs/{today}/{id}"));
        assert_eq!(LogKey { build_id: format!("{id}-2"), attempt: 3 }.path(), format!("logs/{today}/{id}-2/3.ndjson.zst"));
        assert_eq!(build_dir("not an id!"), "logs/unknown/not an id!");
    }

    #[test]
    fn frames_concatenate_and_a_torn_tail_keeps_the_whole_frames() {
        let mut bytes = frame(b"{\"a\":1}\n{\"a\":2}\n");
        bytes.extend(frame(b"{\"a\":3}\n"));
        assert_eq!(lines(&bytes), (vec!["{\"a\":1}".into(), "{\"a\":2}".into(), "{\"a\":3}".into()], false));
        let third = frame(b"{\"a\":4}\n{\"a\":5}\n");
        bytes.extend(&third[..third.len() / 2]);
        let (got, torn) = lines(&bytes);
        assert!(torn);
        assert_eq!(got.len(), 3, "{got:?}");
    }

    async fn round_trip(archive: &dyn LogArchive) {
        let key = LogKey { build_id: crate::farm::build::new_build_id(), attempt: 1 };
        assert_eq!(archive.read(&key).await.unwrap(), None);
        archive.append(&key, frame(b"one\n")).await.unwrap();
        archive.append(&key, frame(b"two\n")).await.unwrap();
        let zero = LogKey { attempt: 0, ..key.clone() };
        archive.append(&zero, frame(b"build\n")).await.unwrap();
        assert_eq!(lines(&archive.read(&key).await.unwrap().unwrap()).0, ["one", "two"], "readable while written");
        archive.finish(&key).await.unwrap();
        archive.finish(&zero).await.unwrap();
        assert_eq!(lines(&archive.read(&key).await.unwrap().unwrap()).0, ["one", "two"]);
        assert_eq!(archive.attempts(&key.build_id).await.unwrap(), [0, 1]);
        assert!(archive.place(&key).ends_with(&key.path()));
    }

    #[tokio::test]
    async fn a_folder_and_a_bucket_keep_logs_alike() {
        let dir = tempfile::tempdir().unwrap();
        round_trip(&DirArchive::new(dir.path())).await;
        let objects = Arc::new(crate::objects::memory::MemoryStore::default());
        let archive = ObjectArchive::new(objects.clone(), "ledger");
        round_trip(&archive).await;
        let keys = objects.list("ledger/logs/", None).await.unwrap();
        assert!(keys.iter().all(|k| k.ends_with(".ndjson.zst")), "parts joined: {keys:?}");
    }

    #[test]
    fn failed_steps_keep_their_last_lines() {
        let log = |step: &str, line: &str| format!(r#"{{"type":"log","step":"{step}","stream":"stdout","line":"{line}","attempt":1}}"#);
        let end = |step: &str, code: i32| format!(r#"{{"type":"step_end","step":"{step}","exit_code":{code},"duration_ms":1}}"#);
        let mut lines = vec![log("api:build", "ok"), end("api:build", 0)];
        for i in 0..30 {
            lines.push(log("api:test:unit", &format!("line {i}")));
            lines.push(log("web:build", "interleaved"));
        }
        lines.push(end("api:test:unit", 1));
        let failed = failed_steps(&lines, 5);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].step, "api:test:unit");
        assert_eq!(failed[0].exit_code, 1);
        assert_eq!(failed[0].last_lines, ["line 25", "line 26", "line 27", "line 28", "line 29"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_writer_writes_bounded_chunks_as_lines_come() {
        let dir = tempfile::tempdir().unwrap();
        let archive: Arc<dyn LogArchive> = Arc::new(DirArchive::new(dir.path()));
        let w = ArchiveWriter::start(archive.clone());
        let key = LogKey { build_id: crate::farm::build::new_build_id(), attempt: 1 };
        w.line(key.clone(), "first".into());
        // Held until it is CHUNK_AGE old, then written: a reader sees it while the build runs.
        tokio::time::sleep(CHUNK_AGE / 2).await;
        assert_eq!(archive.read(&key).await.unwrap(), None);
        tokio::time::sleep(CHUNK_AGE).await;
        assert_eq!(lines(&archive.read(&key).await.unwrap().unwrap()).0, ["first"]);
        // A burst past CHUNK_BYTES is written at once, in more than one frame.
        let long = "x".repeat(1000);
        for _ in 0..(CHUNK_BYTES / 1000 + 10) {
            w.line(key.clone(), long.clone());
        }
        tokio::task::yield_now().await;
        assert!(w.close().await.is_empty());
        let (all, torn) = lines(&archive.read(&key).await.unwrap().unwrap());
        assert!(!torn);
        assert_eq!(all.len(), 1 + CHUNK_BYTES / 1000 + 10);
    }
}
