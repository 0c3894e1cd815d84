//! The event stream: numbers every event, writes it as one JSON line to stdout and appends
//! it to the events file, with secrets redacted, and replays the file after a given `seq`.
//!
//! A single writer task owns the sequence counter, so `seq` order is emission order and has
//! no gaps. Producers wait when the writer is behind (bounded channel): output is slowed,
//! never dropped.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::redact::{Redactor, Shared};
use crate::protocol::{Envelope, Event, Stream, VERSION};

enum Msg {
    Event(Event),
    /// Flush everything so far, then answer.
    Flush(oneshot::Sender<()>),
}

/// A cheap, cloneable handle for emitting events.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Msg>,
    redactor: Shared,
}

/// The writer task, and word of its failure: the events file is what a controller resumes
/// from, so a writer that cannot write it (a full disk) must stop the agent, loudly.
pub struct Writer {
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Set to why, if writing the events file failed.
    pub failed: watch::Receiver<Option<String>>,
}

impl Events {
    /// Starts the writer. Events go to `out` (stdout in the agent) and are appended to
    /// `file`. Returns the handle and the writer, whose task ends when every handle is
    /// dropped, after flushing, or at the first failure to write the file.
    pub fn start<W>(out: W, file: &Path, secrets: Vec<String>) -> std::io::Result<(Events, Writer)>
    where
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(file)?;
        let (tx, rx) = mpsc::channel::<Msg>(1024);
        let (failed_tx, failed) = watch::channel(None);
        let path = file.to_path_buf();
        let redactor: Shared = std::sync::Arc::new(std::sync::RwLock::new(Redactor::new(&secrets)));
        let shared = redactor.clone();
        let task = tokio::spawn(async move {
            let written = writer(rx, out, tokio::fs::File::from_std(log), shared).await;
            if let Err(e) = &written {
                let why = format!("failed to write the events file {}: {e}", path.display());
                // In the agent's log, whatever else happens.
                eprintln!("error: {why}");
                failed_tx.send_replace(Some(why));
            }
            written
        });
        Ok((Events { tx, redactor }, Writer { task, failed }))
    }

    /// Adds secrets learnt while the job runs (an ECR token): every event written from
    /// now on, queued ones included, is redacted of them too.
    pub fn add_secrets(&self, secrets: &[String]) {
        self.redactor.write().unwrap_or_else(std::sync::PoisonError::into_inner).add(secrets);
    }

    /// The redactor output readers use to mask secrets before cutting long lines.
    pub fn redactor(&self) -> Shared {
        self.redactor.clone()
    }

    pub async fn emit(&self, event: Event) {
        // The writer only goes away at the end of the job; late events have nowhere to go.
        let _ = self.tx.send(Msg::Event(event)).await;
    }

    pub async fn log(&self, step: &str, stream: Stream, line: String) {
        self.emit(Event::Log {
            step: step.to_string(),
            stream,
            line,
        })
        .await
    }

    /// Says something about a step as the agent.
    pub async fn say(&self, step: &str, line: impl Into<String>) {
        self.log(step, Stream::Agent, line.into()).await
    }

    /// Waits until everything emitted so far is written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

async fn writer<W>(
    mut rx: mpsc::Receiver<Msg>,
    mut out: W,
    log: tokio::fs::File,
    redactor: Shared,
) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut log = tokio::io::BufWriter::with_capacity(256 * 1024, log);
    let mut seq = 0u64;
    let mut buf = Vec::with_capacity(256 * 1024);
    // The controller may go away (a dropped SSH connection); the file must still get
    // every event so that it can resume. Stdout errors are therefore remembered, not fatal.
    let mut out_ok = true;
    while let Some(first) = rx.recv().await {
        // Batch whatever is queued: one write per batch, not per event.
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut flushes = Vec::new();
        let redactor = redactor.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for msg in batch {
            match msg {
                Msg::Flush(done) => flushes.push(done),
                Msg::Event(mut event) => {
                    if let Event::Log { line, .. } = &mut event {
                        *line = redactor.redact(line);
                    }
                    seq += 1;
                    let env = Envelope {
                        v: VERSION,
                        seq,
                        ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                        event,
                    };
                    let json = serde_json::to_string(&env).expect("events always serialise");
                    // Secrets in other fields (or in their escaped form) are caught here.
                    let json = redactor.redact(&json);
                    buf.extend_from_slice(json.as_bytes());
                    buf.push(b'\n');
                }
            }
        }
        log.write_all(&buf).await?;
        log.flush().await?;
        if out_ok {
            out_ok = out.write_all(&buf).await.is_ok() && out.flush().await.is_ok();
        }
        buf.clear();
        for done in flushes {
            log.get_ref().sync_data().await?;
            let _ = done.send(());
        }
    }
    log.flush().await?;
    log.get_ref().sync_data().await?;
    Ok(())
}

/// Writes every complete event line of `file` whose `seq` is greater than `after` to `out`.
/// Returns the last `seq` written (or `after`) and whether a `result` event was seen.
pub fn replay(file: &Path, after: u64, out: &mut impl Write) -> std::io::Result<(u64, bool)> {
    let mut at = Replay { last: after, ..Replay::default() };
    at.more(file, out)?;
    Ok((at.last, at.done))
}

/// Where a replay of an events file has got to, so that following a growing file reads
/// each byte once (not the whole file on every poll).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    /// The last `seq` written.
    pub last: u64,
    /// Bytes of the file read so far: complete lines only (a line still being written is
    /// read again, whole, next time).
    pub offset: u64,
    /// A `result` event was seen.
    pub done: bool,
}

impl Replay {
    /// Writes the complete event lines added to `file` since the last call whose `seq` is
    /// greater than [`Replay::last`].
    pub fn more(&mut self, file: &Path, out: &mut impl Write) -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(file)?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else { return Ok(()) };
        for line in buf[..end].split(|b| *b == b'\n') {
            let Some((seq, is_result)) = peek(line) else { continue };
            if seq > self.last {
                out.write_all(line)?;
                out.write_all(b"\n")?;
                self.last = seq;
            }
            self.done |= is_result;
        }
        self.offset += end as u64 + 1;
        Ok(())
    }
}

/// The `seq` of an event line, and whether it is a result, without a full parse.
fn peek(line: &[u8]) -> Option<(u64, bool)> {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        seq: u64,
        #[serde(rename = "type", borrow)]
        kind: &'a str,
    }
    let head: Head = serde_json::from_slice(line).ok()?;
    Some((head.seq, head.kind == "result"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk: every write to /dev/full fails with ENOSPC.
    #[tokio::test]
    async fn a_writer_that_cannot_write_the_file_says_so() {
        let (events, mut writer) = Events::start(tokio::io::sink(), Path::new("/dev/full"), Vec::new()).unwrap();
        events.say("x", "one line").await;
        let why = writer.failed.wait_for(|f| f.is_some()).await.unwrap().clone().unwrap();
        assert!(why.contains("/dev/full") && why.contains("No space left"), "{why}");
        assert!(writer.task.await.unwrap().is_err());
        // Emitting afterwards neither blocks nor panics.
        events.say("x", "lost").await;
    }

    #[tokio::test]
    async fn secrets_added_later_are_redacted_from_then_on() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("events.ndjson");
        let (events, writer) = Events::start(tokio::io::sink(), &file, vec!["first-secret".into()]).unwrap();
        events.say("x", "first-secret and ecr-token-1234").await;
        events.flush().await;
        events.add_secrets(&["ecr-token-1234".into()]);
        events.say("x", "ecr-token-1234 again").await;
        drop(events);
        writer.task.await.unwrap().unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains("first-secret"));
        assert!(text.contains("****** again"), "{text}");
    }

    #[tokio::test]
    async fn events_are_numbered_written_twice_and_replayable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("events.ndjson");
        let (out_tx, mut out_rx) = tokio::io::duplex(1 << 20);
        let (events, writer) = Events::start(out_tx, &file, vec!["s3cret".into()]).unwrap();
        for i in 0..10 {
            events.say("x", format!("line {i} s3cret")).await;
        }
        drop(events);
        writer.task.await.unwrap().unwrap();
        let mut streamed = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut out_rx, &mut streamed).await.unwrap();
        let on_disk = std::fs::read_to_string(&file).unwrap();
        assert_eq!(streamed, on_disk);
        assert!(!on_disk.contains("s3cret"));
        let seqs: Vec<u64> = on_disk
            .lines()
            .map(|l| serde_json::from_str::<Envelope>(l).unwrap().seq)
            .collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());

        let mut rest = Vec::new();
        let (last, done) = replay(&file, 7, &mut rest).unwrap();
        assert_eq!((last, done), (10, false));
        let expected: String = on_disk.lines().skip(7).map(|l| format!("{l}\n")).collect();
        assert_eq!(String::from_utf8(rest).unwrap(), expected);
    }

    #[test]
    fn following_a_growing_file_reads_each_line_once_and_waits_for_half_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("events.ndjson");
        let line = |seq: u64, kind: &str| format!("{{\"v\":1,\"seq\":{seq},\"ts\":\"t\",\"type\":\"{kind}\"}}\n");
        std::fs::write(&file, format!("{}{}", line(1, "heartbeat"), &line(2, "heartbeat")[..10])).unwrap();
        let mut at = Replay::default();
        let mut out = Vec::new();
        at.more(&file, &mut out).unwrap();
        assert_eq!(String::from_utf8(out.clone()).unwrap(), line(1, "heartbeat"));
        assert_eq!((at.last, at.offset as usize, at.done), (1, line(1, "heartbeat").len(), false));
        // The rest of line 2 arrives, then the result.
        let mut f = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(line(2, "heartbeat")[10..].as_bytes()).unwrap();
        f.write_all(line(3, "result").as_bytes()).unwrap();
        out.clear();
        at.more(&file, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), format!("{}{}", line(2, "heartbeat"), line(3, "result")));
        assert_eq!((at.last, at.done), (3, true));
        assert_eq!(at.offset, std::fs::metadata(&file).unwrap().len());
    }
}
