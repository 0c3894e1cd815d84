//! A redrawn progress line on stderr for long waits, when stderr is a terminal: the
//! phase of a rented machine with its elapsed time, a deploy's bytes and rate. Off a
//! terminal (CI logs) nothing is drawn and the timestamped lines are the record; with
//! `--json` nothing is drawn either, so machine output is never mixed with it.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the line is redrawn (the spinner and the elapsed time move on their own).
const TICK: Duration = Duration::from_millis(120);

/// The line, or nothing where none is drawn. Dropping it clears it.
pub struct Line {
    bar: Option<ProgressBar>,
}

/// Whether a line may be drawn: stderr is a terminal that can redraw, and the output is
/// not for machines.
pub fn drawn(json: bool) -> bool {
    !json && std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

impl Line {
    /// A spinner with a message and the time since the message last changed.
    pub fn spinner(json: bool) -> Line {
        if !drawn(json) {
            return Line { bar: None };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(ProgressStyle::with_template("{spinner} {msg} · {elapsed}").expect("a valid template"));
        bar.enable_steady_tick(TICK);
        Line { bar: Some(bar) }
    }

    /// A bar of `total` bytes with the rate and what is left.
    pub fn bytes(json: bool, total: u64, what: &str) -> Line {
        if !drawn(json) {
            return Line { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} · {eta} left")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        bar.enable_steady_tick(TICK);
        Line { bar: Some(bar) }
    }

    pub fn is_drawn(&self) -> bool {
        self.bar.is_some()
    }

    /// A new message; the elapsed time starts again.
    pub fn set(&self, message: String) {
        if let Some(b) = &self.bar {
            b.reset_elapsed();
            b.set_message(message);
        }
    }

    pub fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    /// Runs `print` (which writes lines to stdout or stderr) with the line out of the way,
    /// so neither tears the other.
    pub fn above<R>(&self, print: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(b) => b.suspend(print),
            None => print(),
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
