//! Turning a child's output bytes into log lines: split on `\n`, never drop or reorder a
//! byte (but for secrets, masked), escape what is not UTF-8, and split lines too long for
//! one event. Secrets are masked before a long line is cut, so that none survives split
//! over two events.

use super::redact::Shared;
use crate::git::display_path;

/// Longest line carried by one event, in bytes before escaping; longer lines continue in
/// the next event.
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
    redactor: Option<Shared>,
}

impl LineSplitter {
    /// A splitter that masks the secrets `redactor` knows.
    pub fn redacting(redactor: Shared) -> LineSplitter {
        LineSplitter {
            pending: Vec::new(),
            redactor: Some(redactor),
        }
    }

    /// Masks secrets in `bytes`; returns how many trailing bytes must wait for more output
    /// before they are cut off (the start of a secret may be there).
    fn mask(&self, bytes: Vec<u8>) -> (Vec<u8>, usize) {
        let Some(r) = &self.redactor else { return (bytes, 0) };
        let r = r.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.is_empty() {
            return (bytes, 0);
        }
        (r.redact_bytes(&bytes), r.longest().saturating_sub(1))
    }

    /// Feeds bytes; calls `emit` for each completed line, in order.
    pub fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(String)) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            self.pending.extend_from_slice(&bytes[..nl]);
            self.flush_pending(emit);
            bytes = &bytes[nl + 1..];
        }
        self.pending.extend_from_slice(bytes);
        if self.pending.len() < MAX_LINE {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let (masked, hold) = self.mask(pending);
        self.pending = masked;
        // A secret that starts before the cut ends within the buffer, so it was masked;
        // what may be the start of one stays for the next piece.
        while self.pending.len() >= MAX_LINE + hold {
            let cut = split_point(&self.pending);
            let rest = self.pending.split_off(cut);
            emit(render(&self.pending));
            self.pending = rest;
        }
    }

    /// Emits a final unterminated line, if any.
    pub fn finish(&mut self, emit: &mut impl FnMut(String)) {
        if !self.pending.is_empty() {
            self.flush_pending(emit);
        }
    }

    fn flush_pending(&mut self, emit: &mut impl FnMut(String)) {
        let pending = std::mem::take(&mut self.pending);
        let (mut line, _) = self.mask(pending);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let mut rest: &[u8] = &line;
        while rest.len() > MAX_LINE {
            let cut = split_point(rest);
            emit(render(&rest[..cut]));
            rest = &rest[cut..];
        }
        emit(render(rest));
    }
}

/// A cut at or below MAX_LINE that does not split a UTF-8 character.
fn split_point(bytes: &[u8]) -> usize {
    let mut cut = MAX_LINE.min(bytes.len());
    // Step back over continuation bytes (10xxxxxx), at most 3.
    let mut back = 0;
    while cut > 0 && back < 3 && cut < bytes.len() && (bytes[cut] & 0xC0) == 0x80 {
        cut -= 1;
        back += 1;
    }
    if cut == 0 {
        MAX_LINE.min(bytes.len())
    } else {
        cut
    }
}

/// Valid UTF-8 passes through (tabs kept); invalid bytes and other control characters are
/// escaped so the line stays one printable line.
fn render(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(|c| c.is_control() && c != '\t') => s.to_string(),
        _ => display_path(bytes).replace("\\t", "\t"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut |l| out.push(l));
        }
        s.finish(&mut |l| out.push(l));
        out
    }

    #[test]
    fn splits_across_chunk_boundaries() {
        assert_eq!(lines(&[b"a\nb", b"c\n", b"d"]), ["a", "bc", "d"]);
        assert_eq!(lines(&[b"\n\n"]), ["", ""]);
        assert_eq!(lines(&[b"crlf\r\n"]), ["crlf"]);
    }

    #[test]
    fn escapes_invalid_utf8_and_control_bytes() {
        assert_eq!(lines(&[b"bad \xff byte\n"]), ["bad \\xff byte"]);
        assert_eq!(lines(&[b"bell\x07\ttab\n"]), ["bell\\x07\ttab"]);
    }

    #[test]
    fn a_secret_across_a_cut_of_a_long_line_is_masked() {
        let redactor: Shared = std::sync::Arc::new(std::sync::RwLock::new(crate::agent::redact::Redactor::new(&["s3cret-token".into()])));
        // The secret straddles the 16 KiB cut, arriving in two chunks.
        let head = "x".repeat(MAX_LINE - 5);
        let mut s = LineSplitter::redacting(redactor);
        let mut out = Vec::new();
        s.push(format!("{head}s3cr").as_bytes(), &mut |l| out.push(l));
        s.push(b"et-token tail\n", &mut |l| out.push(l));
        s.finish(&mut |l| out.push(l));
        let all = out.concat();
        assert!(!all.contains("s3cr") || !all.contains("et-token"), "{}", &all[all.len() - 40..]);
        assert!(all.ends_with("xxxxx****** tail"), "{}", &all[all.len() - 40..]);
        assert!(out.iter().all(|l| l.len() <= MAX_LINE));
    }

    #[test]
    fn splits_long_lines_without_breaking_characters() {
        let long = "é".repeat(MAX_LINE); // 2 bytes each
        let out = lines(&[long.as_bytes(), b"\n"]);
        assert!(out.len() >= 2);
        assert_eq!(out.concat(), long);
        assert!(out.iter().all(|l| l.len() <= MAX_LINE));
    }
}
