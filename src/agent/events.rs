//! The event stream: numbers every event, writes it as one JSON line to stdout and appends
//! it to the events file, with secrets redacted, and replays the file after a given `seq`.
//!
//! A single writer task owns the sequence counter, so `seq` order is emission order and has
//! no gaps. Producers wait when the writer is behind (bounded channel): output is slowed,
//! never dropped.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::SystemTime;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use crate::protocol::{Envelope, Event, Stream, VERSION};

const REDACTED: &str = "******";

enum Msg {
    Event(Event),
    /// Flush everything so far, then answer.
    Flush(oneshot::Sender<()>),
}

/// A cheap, cloneable handle for emitting events.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Msg>,
}

/// Replaces every secret with `******` in `text`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), REDACTED);
        }
    }
    out
}

impl Events {
    /// Starts the writer. Events go to `out` (stdout in the agent) and are appended to
    /// `file`. Returns the handle and the writer task, which ends when every handle is
    /// dropped, after flushing.
    pub fn start<W>(
        out: W,
        file: &Path,
        secrets: Vec<String>,
    ) -> std::io::Result<(Events, tokio::task::JoinHandle<std::io::Result<()>>)>
    where
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(file)?;
        let (tx, rx) = mpsc::channel::<Msg>(1024);
        let task = tokio::spawn(writer(rx, out, tokio::fs::File::from_std(log), secrets));
        Ok((Events { tx }, task))
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
    secrets: Vec<String>,
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
        for msg in batch {
            match msg {
                Msg::Flush(done) => flushes.push(done),
                Msg::Event(mut event) => {
                    if let Event::Log { line, .. } = &mut event {
                        *line = redact(line, &secrets);
                    }
                    seq += 1;
                    let env = Envelope {
                        v: VERSION,
                        seq,
                        ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                        event,
                    };
                    let json = serde_json::to_string(&env).expect("events always serialise");
                    // Secrets in other fields (or split across escapes) are caught here.
                    let json = redact(&json, &secrets);
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
    let reader = std::io::BufReader::new(std::fs::File::open(file)?);
    let mut last = after;
    let mut done = false;
    for line in reader.split(b'\n') {
        let line = line?;
        let Some((seq, is_result)) = peek(&line) else { continue };
        if seq > last {
            out.write_all(&line)?;
            out.write_all(b"\n")?;
            last = seq;
        }
        done |= is_result;
    }
    Ok((last, done))
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

    #[test]
    fn redaction_replaces_every_occurrence() {
        let s = vec!["hunter2".to_string(), String::new()];
        assert_eq!(redact("pw=hunter2 again hunter2", &s), "pw=****** again ******");
        assert_eq!(redact("nothing", &s), "nothing");
    }

    #[tokio::test]
    async fn events_are_numbered_written_twice_and_replayable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("events.ndjson");
        let (out_tx, mut out_rx) = tokio::io::duplex(1 << 20);
        let (events, task) = Events::start(out_tx, &file, vec!["s3cret".into()]).unwrap();
        for i in 0..10 {
            events.say("x", format!("line {i} s3cret")).await;
        }
        drop(events);
        task.await.unwrap().unwrap();
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
}
