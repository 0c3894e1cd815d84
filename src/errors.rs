//! What every module's errors share: rendering an error with its causes on one line.

/// An error and its causes on one line (`failed to X: because Y: because Z`), each cause
/// left out when the message before it already says it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = c.source();
    }
    s
}
