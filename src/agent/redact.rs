//! Keeping secrets out of events: every form a secret can take in a log line is replaced
//! by `******` — as it is, JSON-escaped, URL-encoded, base64-encoded on its own, and
//! base64-encoded inside a longer value (`user:password` in a Basic header, at any of the
//! three byte alignments).
//!
//! Guarantees: a form of a secret is found wherever it is in the text, also across the
//! points where a long line is cut into several events (see `agent::lines`). Caveats: a
//! secret shorter than [`MIN_SECRET`] is not looked for (it would match ordinary text), and
//! a base64 form inside a longer value is matched by its fully determined characters only
//! (so at least [`MIN_DERIVED`] of them).

use std::sync::{Arc, RwLock};

use base64::Engine;

/// What a secret is replaced by.
pub const MASK: &str = "******";
/// Secrets shorter than this are not redacted: they would hide ordinary words.
pub const MIN_SECRET: usize = 4;
/// Derived forms (encodings) shorter than this are not looked for.
pub const MIN_DERIVED: usize = 6;

/// The secrets' forms, as one search.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Every form of every secret, longest first, as one alternation.
    re: Option<regex::bytes::Regex>,
    forms: Vec<String>,
}

/// A redactor shared by the event writer and the output readers, to which secrets learnt
/// while the job runs (an ECR token) are added.
pub type Shared = Arc<RwLock<Redactor>>;

impl Redactor {
    pub fn new(secrets: &[String]) -> Redactor {
        let mut r = Redactor::default();
        r.add(secrets);
        r
    }

    /// Adds `secrets` (and their forms).
    pub fn add(&mut self, secrets: &[String]) {
        for s in secrets.iter().filter(|s| s.len() >= MIN_SECRET) {
            for f in forms(s) {
                if !self.forms.contains(&f) {
                    self.forms.push(f);
                }
            }
        }
        self.forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
        let alternation = self.forms.iter().map(|f| regex::escape(f)).collect::<Vec<_>>().join("|");
        self.re = (!self.forms.is_empty()).then(|| regex::bytes::Regex::new(&alternation).expect("escaped literals always compile"));
    }

    /// The longest form: a cut in a line keeps this many bytes minus one for the next piece.
    pub fn longest(&self) -> usize {
        self.forms.first().map(String::len).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.forms.is_empty()
    }

    pub fn redact_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        match &self.re {
            Some(re) => re.replace_all(bytes, MASK.as_bytes()).into_owned(),
            None => bytes.to_vec(),
        }
    }

    pub fn redact(&self, text: &str) -> String {
        match &self.re {
            Some(re) if re.is_match(text.as_bytes()) => String::from_utf8_lossy(&re.replace_all(text.as_bytes(), MASK.as_bytes())).into_owned(),
            _ => text.to_string(),
        }
    }
}

/// Every form of `secret` that can appear in output.
pub fn forms(secret: &str) -> Vec<String> {
    let mut out = vec![secret.to_string()];
    let mut derived = Vec::new();
    // JSON-escaped (without the quotes).
    if let Ok(json) = serde_json::to_string(secret) {
        derived.push(json[1..json.len() - 1].to_string());
    }
    // URL-encoded: every byte but the unreserved ones, upper and lower hex, `+` for space.
    for upper in [true, false] {
        let encoded = percent_encode(secret.as_bytes(), upper);
        derived.push(encoded.clone());
        derived.push(encoded.replace("%20", "+"));
    }
    // Base64, on its own and inside a longer value at each byte alignment.
    for engine in [&base64::engine::general_purpose::STANDARD_NO_PAD, &base64::engine::general_purpose::URL_SAFE_NO_PAD] {
        derived.push(engine.encode(secret));
        for offset in 1..3 {
            derived.push(embedded_base64(engine, secret.as_bytes(), offset));
        }
        derived.push(embedded_base64(engine, secret.as_bytes(), 0));
    }
    for d in derived {
        if d.len() >= MIN_DERIVED && !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

fn percent_encode(bytes: &[u8], upper: bool) -> String {
    let mut s = String::new();
    for b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(b) {
            s.push(*b as char);
        } else if upper {
            s.push_str(&format!("%{b:02X}"));
        } else {
            s.push_str(&format!("%{b:02x}"));
        }
    }
    s
}

/// The base64 characters that `secret` alone determines when it starts `offset` bytes
/// (mod 3) into a longer encoded value: those whose 6 bits all come from its bytes.
fn embedded_base64(engine: &base64::engine::GeneralPurpose, secret: &[u8], offset: usize) -> String {
    let mut padded = vec![0u8; offset];
    padded.extend_from_slice(secret);
    let encoded = engine.encode(&padded);
    let first = (8 * offset).div_ceil(6);
    let last = (8 * (offset + secret.len())) / 6;
    encoded.get(first..last.min(encoded.len())).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(secrets: &[&str]) -> Redactor {
        Redactor::new(&secrets.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn every_occurrence_and_form_is_masked() {
        let red = r(&["hunter2-Sup3r/Secret", ""]);
        assert_eq!(red.redact("pw=hunter2-Sup3r/Secret again hunter2-Sup3r/Secret"), "pw=****** again ******");
        assert_eq!(red.redact("url: https://x/?p=hunter2-Sup3r%2FSecret"), "url: https://x/?p=******");
        let b64 = base64::engine::general_purpose::STANDARD.encode("ci:hunter2-Sup3r/Secret");
        assert!(!red.redact(&format!("Authorization: Basic {b64}")).contains(&b64[4..20]), "inside a Basic header");
        assert_eq!(red.redact("nothing here"), "nothing here");
    }

    #[test]
    fn a_json_escaped_secret_is_masked() {
        let red = r(&["quote\"and\\slash"]);
        let json = serde_json::to_string("quote\"and\\slash").unwrap();
        assert_eq!(red.redact(&format!("{{\"password\":{json}}}")), "{\"password\":\"******\"}");
    }

    #[test]
    fn short_secrets_are_not_looked_for() {
        let red = r(&["abc"]);
        assert!(red.is_empty());
        assert_eq!(red.redact("abc"), "abc");
    }

    #[test]
    fn base64_inside_a_longer_value_is_found_at_every_alignment() {
        let secret = "correct horse battery staple";
        let red = r(&[secret]);
        for prefix in ["", "a", "ab", "abc", "user:", "x:"] {
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{prefix}{secret}!"));
            let out = red.redact(&encoded);
            assert!(out.contains(MASK), "{prefix:?}: {out}");
            // What is left cannot be decoded back to the secret.
            assert!(!String::from_utf8_lossy(&base64::engine::general_purpose::STANDARD.decode(out.replace(MASK, "")).unwrap_or_default()).contains("battery"));
        }
    }
}

/// Random text with secrets embedded in every form, fed through the event path (the line
/// splitter, cut at random chunk sizes and across long-line boundaries, then the event
/// writer): no form of a secret survives. Bounded: 64 cases of up to ~70 KB each.
#[cfg(test)]
mod fuzz {
    use base64::Engine;
    use proptest::prelude::*;

    use super::*;
    use crate::agent::events::Events;
    use crate::agent::lines::{LineSplitter, MAX_LINE};
    use crate::protocol::Stream;

    fn secret() -> impl Strategy<Value = String> {
        // Printable ASCII, with the characters encodings treat specially.
        proptest::string::string_regex("[A-Za-z0-9/+=:%\"\\\\ _.~-]{8,24}").unwrap()
    }

    /// One form of `s`, as it might be printed.
    fn form(s: &str, which: u8, prefix: &str) -> String {
        let b64 = &base64::engine::general_purpose::STANDARD;
        match which % 5 {
            0 => s.to_string(),
            1 => serde_json::to_string(s).unwrap(),
            2 => percent_encode(s.as_bytes(), which % 2 == 0),
            3 => b64.encode(s),
            _ => b64.encode(format!("{prefix}{s}")),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn no_form_of_a_secret_survives_the_event_path(
            secret in secret(),
            filler in proptest::collection::vec(("[ -~]{0,200}", any::<u8>(), "[a-z:]{0,5}", any::<bool>()), 1..12),
            long in 0usize..(MAX_LINE + 2000),
            chunk in 1usize..5000,
        ) {
            // Text: filler, a form of the secret, sometimes a newline; once, a line long
            // enough to be cut right around where the secret sits.
            let mut text = String::new();
            for (i, (f, which, prefix, newline)) in filler.iter().enumerate() {
                text.push_str(f);
                if i == 0 {
                    text.push_str(&"y".repeat(long));
                }
                text.push_str(&form(&secret, *which, prefix));
                if *newline {
                    text.push('\n');
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("events.ndjson");
            rt.block_on(async {
                let (events, writer) = Events::start(tokio::io::sink(), &file, vec![secret.clone()]).unwrap();
                let mut splitter = LineSplitter::redacting(events.redactor());
                let mut lines = Vec::new();
                for piece in text.as_bytes().chunks(chunk) {
                    splitter.push(piece, &mut |l| lines.push(l));
                }
                splitter.finish(&mut |l| lines.push(l));
                for l in lines {
                    events.log("step", Stream::Stdout, l).await;
                }
                drop(events);
                writer.task.await.unwrap().unwrap();
            });
            let out = std::fs::read_to_string(&file).unwrap();
            for f in forms(&secret) {
                prop_assert!(!out.contains(&f), "a form of the secret survived: {f:?}");
            }
            // Also as a JSON string's content, the way the event file holds log lines.
            let escaped = serde_json::to_string(&secret).unwrap();
            prop_assert!(!out.contains(&escaped[1..escaped.len() - 1]));
        }
    }
}
