//! Output streams through object storage, for a transport that holds no connection open
//! (SSM). On the instance, [`upload`] cuts its input into numbered chunks of whole lines
//! and ends with an `end` marker; the controller's [`follow`] reads the chunks in order.
//!
//! Guarantees: chunks are put one after another, so a listing never shows chunk N+1
//! without chunk N, and lines come out exactly once, in order. A stream without its `end`
//! marker ends (like a dropped connection) only once the command producing it has finished
//! and one more listing found nothing new.
//! Caveats: each idle poll is one LIST request; the interval backs off to `max_poll`.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncRead};

use super::Lines;
use crate::objects::{ObjectError, ObjectStore};

/// The key of chunk `index` under `prefix`; zero-padded so keys sort in chunk order.
pub fn chunk_key(prefix: &str, index: u64) -> String {
    format!("{prefix}/{index:010}")
}

/// The key whose presence says the stream ended normally. It sorts after every chunk key.
pub fn end_key(prefix: &str) -> String {
    format!("{prefix}/end")
}

#[derive(Debug, Clone, Copy)]
pub struct UploadSettings {
    /// A chunk is put at most this long after its first line arrived.
    pub flush_every: Duration,
    /// A chunk is put as soon as it holds this many bytes.
    pub max_chunk: usize,
}

impl Default for UploadSettings {
    fn default() -> Self {
        UploadSettings {
            flush_every: Duration::from_secs(1),
            max_chunk: 1 << 20,
        }
    }
}

/// Reads `input` to its end, putting whole lines as chunks, then the end marker.
/// Returns how many chunks were put.
pub async fn upload(store: &dyn ObjectStore, prefix: &str, input: impl AsyncRead + Unpin + Send + 'static, settings: UploadSettings) -> Result<u64, ObjectError> {
    // A reader task keeps line reading out of the select below, so no partial line is
    // ever lost to a timer firing.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(256);
    let reader = tokio::spawn(async move {
        let mut input = tokio::io::BufReader::new(input);
        loop {
            let mut line = Vec::new();
            match input.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    if tx.send(line).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut index = 0u64;
    let mut chunk: Vec<u8> = Vec::new();
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let flush = tokio::select! {
            line = rx.recv() => match line {
                Some(line) => {
                    if chunk.is_empty() {
                        due = Some(tokio::time::Instant::now() + settings.flush_every);
                    }
                    chunk.extend_from_slice(&line);
                    chunk.len() >= settings.max_chunk
                }
                None => break,
            },
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => true,
        };
        if flush && !chunk.is_empty() {
            put_retrying(store, &chunk_key(prefix, index), std::mem::take(&mut chunk)).await?;
            index += 1;
            due = None;
        }
    }
    let _ = reader.await;
    if !chunk.is_empty() {
        put_retrying(store, &chunk_key(prefix, index), chunk).await?;
        index += 1;
    }
    put_retrying(store, &end_key(prefix), index.to_string().into_bytes()).await?;
    Ok(index)
}

/// Puts with a few bounded retries: a transient S3 error must not end a build's log.
async fn put_retrying(store: &dyn ObjectStore, key: &str, body: Vec<u8>) -> Result<(), ObjectError> {
    let mut delay = Duration::from_millis(200);
    for _ in 0..4 {
        match store.put(key, body.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => tracing::warn!(error = %e, "put failed; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    store.put(key, body).await
}

/// Says whether the command producing a stream has finished (successfully or not).
pub type Finished = Box<dyn FnMut() -> BoxFuture<'static, bool> + Send>;

#[derive(Debug, Clone, Copy)]
pub struct FollowSettings {
    /// The first interval between listings while nothing new arrives.
    pub poll: Duration,
    /// The interval backs off (doubling) to this.
    pub max_poll: Duration,
    /// Ask whether the command finished after this many idle listings in a row.
    pub check_every: u32,
}

impl Default for FollowSettings {
    fn default() -> Self {
        FollowSettings {
            poll: Duration::from_millis(250),
            max_poll: Duration::from_secs(2),
            check_every: 4,
        }
    }
}

struct Follower {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    last: Option<String>,
    settings: FollowSettings,
    interval: Duration,
    idle: u32,
    finished: Finished,
    /// The command finished; one more listing decides.
    last_look: bool,
    ended: bool,
    errors: u32,
}

/// Follows the chunks under `prefix`, yielding their lines, until the end marker (or, with
/// no marker, until `finished` says the producer is gone and one more listing is empty).
pub fn follow(store: Arc<dyn ObjectStore>, prefix: String, settings: FollowSettings, finished: Finished) -> Lines {
    let state = Follower {
        store,
        prefix,
        last: None,
        settings,
        interval: settings.poll,
        idle: 0,
        finished,
        last_look: false,
        ended: false,
        errors: 0,
    };
    futures::stream::unfold(state, |mut st| async move {
        let batch = st.next_batch().await?;
        Some((batch, st))
    })
    .flat_map(futures::stream::iter)
    .boxed()
}

impl Follower {
    /// The next lines, or `None` when the stream is over.
    async fn next_batch(&mut self) -> Option<Vec<std::io::Result<String>>> {
        loop {
            if self.ended {
                return None;
            }
            let end = end_key(&self.prefix);
            let listed = self.store.list(&format!("{}/", self.prefix), self.last.as_deref()).await;
            let keys = match listed {
                Ok(k) => {
                    self.errors = 0;
                    k
                }
                Err(e) => {
                    self.errors += 1;
                    if self.errors >= 5 {
                        self.ended = true;
                        return Some(vec![Err(std::io::Error::other(e))]);
                    }
                    self.wait().await;
                    continue;
                }
            };
            let mut lines = Vec::new();
            for key in keys {
                if key == end {
                    self.ended = true;
                    break;
                }
                match self.store.get(&key).await {
                    Ok(Some(body)) => {
                        let text = String::from_utf8_lossy(&body);
                        lines.extend(text.lines().filter(|l| !l.is_empty()).map(|l| Ok(l.to_string())));
                        self.last = Some(key);
                    }
                    // Listed but gone (deleted by a close elsewhere): the stream is over.
                    Ok(None) => {
                        self.ended = true;
                        break;
                    }
                    // Read this chunk again on the next listing.
                    Err(e) => {
                        tracing::warn!(error = %e, "failed to read a chunk; retrying");
                        break;
                    }
                }
            }
            if !lines.is_empty() {
                self.idle = 0;
                self.interval = self.settings.poll;
                return Some(lines);
            }
            if self.ended || self.last_look {
                return None;
            }
            self.idle += 1;
            if self.idle % self.settings.check_every.max(1) == 0 && (self.finished)().await {
                // Whatever it wrote before finishing is listed now: look once more.
                self.last_look = true;
                continue;
            }
            self.wait().await;
        }
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.interval).await;
        self.interval = (self.interval * 2).min(self.settings.max_poll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::memory::MemoryStore;
    use futures::FutureExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn never() -> Finished {
        Box::new(|| futures::future::ready(false).boxed())
    }

    #[tokio::test(start_paused = true)]
    async fn lines_arrive_once_in_order_across_chunks() {
        let store = Arc::new(MemoryStore::default());
        let text: String = (1..=500).map(|i| format!("{{\"seq\":{i}}}\n")).collect();
        let settings = UploadSettings {
            flush_every: Duration::from_secs(1),
            max_chunk: 1000,
        };
        let n = upload(&*store, "s/1", std::io::Cursor::new(text.clone().into_bytes()), settings).await.unwrap();
        assert!(n > 5, "small chunks: {n}");
        assert!(store.keys().contains(&"s/1/end".to_string()));
        let got: Vec<String> = follow(store.clone(), "s/1".into(), FollowSettings::default(), never())
            .map(|l| l.unwrap())
            .collect()
            .await;
        let want: Vec<String> = text.lines().map(String::from).collect();
        assert_eq!(got, want);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_writer_is_flushed_by_time_and_followed_live() {
        let store = Arc::new(MemoryStore::default());
        let (mut w, r) = tokio::io::duplex(1024);
        let up = {
            let store = store.clone();
            tokio::spawn(async move { upload(&*store, "live", r, UploadSettings::default()).await })
        };
        let mut lines = follow(store.clone(), "live".into(), FollowSettings::default(), never());
        use tokio::io::AsyncWriteExt;
        w.write_all(b"one\n").await.unwrap();
        // Not a full chunk: the timer puts it.
        assert_eq!(lines.next().await.unwrap().unwrap(), "one");
        w.write_all(b"two\nthree").await.unwrap();
        drop(w);
        assert_eq!(lines.next().await.unwrap().unwrap(), "two");
        assert_eq!(lines.next().await.unwrap().unwrap(), "three", "a last line without a newline is kept");
        assert!(lines.next().await.is_none(), "the end marker ends the stream");
        assert_eq!(up.await.unwrap().unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_end_marker_the_stream_ends_once_the_producer_finished() {
        let store = Arc::new(MemoryStore::default());
        store.put(&chunk_key("cut", 0), b"a\nb\n".to_vec()).await.unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let finished: Finished = {
            let done = done.clone();
            Box::new(move || futures::future::ready(done.load(Ordering::SeqCst)).boxed())
        };
        let mut lines = follow(store.clone(), "cut".into(), FollowSettings::default(), finished);
        assert_eq!(lines.next().await.unwrap().unwrap(), "a");
        assert_eq!(lines.next().await.unwrap().unwrap(), "b");
        // Still running: the follower keeps polling (time is paused, so this is instant).
        let waited = tokio::time::timeout(Duration::from_secs(60), lines.next()).await;
        assert!(waited.is_err(), "no end while the producer runs");
        // The producer wrote one more chunk and died without the marker.
        store.put(&chunk_key("cut", 1), b"c\n".to_vec()).await.unwrap();
        done.store(true, Ordering::SeqCst);
        assert_eq!(lines.next().await.unwrap().unwrap(), "c");
        assert!(lines.next().await.is_none());
    }
}
