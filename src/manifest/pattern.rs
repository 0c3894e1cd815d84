//! Rebuild patterns: regexes over repo-relative paths (searched, as `grep -E` does), with the
//! common `^literal/prefix` form recognised so the planner can match it without a regex.

use regex_syntax::hir::{HirKind, Look};

/// Why a pattern is not a valid regex, with the 1-based column of the fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at column {column}")]
pub struct PatternError {
    pub column: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    /// `Some(prefix)` when the pattern is exactly `^` followed by literal bytes: a path
    /// matches iff it starts with them.
    literal_prefix: Option<Vec<u8>>,
}

impl Pattern {
    pub fn new(text: &str) -> Result<Pattern, PatternError> {
        // The common `^dir/` form needs no parser: a manifest may have thousands of them.
        if let Some(rest) = text.strip_prefix('^') {
            if !rest.chars().any(regex_syntax::is_meta_character) {
                return Ok(Pattern {
                    text: text.to_string(),
                    literal_prefix: Some(rest.as_bytes().to_vec()),
                });
            }
        }
        let ast = regex_syntax::ast::parse::Parser::new()
            .parse(text)
            .map_err(|e| PatternError {
                column: e.span().start.column,
                message: e.kind().to_string(),
            })?;
        let hir = regex_syntax::hir::translate::TranslatorBuilder::new()
            .utf8(false)
            .build()
            .translate(text, &ast)
            .map_err(|e| PatternError {
                column: e.span().start.column,
                message: e.kind().to_string(),
            })?;
        let literal_prefix = anchored_literal(hir.kind());
        // Other patterns are compiled into one set by the planner; make sure compilation
        // cannot fail then (size limits), so every error surfaces here, with the pattern.
        if literal_prefix.is_none() {
            regex::bytes::Regex::new(text).map_err(|e| PatternError {
                column: 1,
                message: e.to_string(),
            })?;
        }
        Ok(Pattern {
            text: text.to_string(),
            literal_prefix,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn literal_prefix(&self) -> Option<&[u8]> {
        self.literal_prefix.as_deref()
    }
}

fn anchored_literal(kind: &HirKind) -> Option<Vec<u8>> {
    match kind {
        HirKind::Look(Look::Start) => Some(Vec::new()),
        HirKind::Concat(parts) => {
            let (first, rest) = parts.split_first()?;
            if !matches!(first.kind(), HirKind::Look(Look::Start)) {
                return None;
            }
            let mut out = Vec::new();
            for part in rest {
                match part.kind() {
                    HirKind::Literal(lit) => out.extend_from_slice(&lit.0),
                    _ => return None,
                }
            }
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchored_literals_are_recognised() {
        assert_eq!(Pattern::new("^a/b/").unwrap().literal_prefix(), Some(&b"a/b/"[..]));
        assert_eq!(Pattern::new(r"^a\.b/").unwrap().literal_prefix(), Some(&b"a.b/"[..]));
        assert_eq!(Pattern::new("^").unwrap().literal_prefix(), Some(&b""[..]));
        assert_eq!(Pattern::new("a/").unwrap().literal_prefix(), None);
        assert_eq!(Pattern::new(r"^a/.*\.ts$").unwrap().literal_prefix(), None);
        assert_eq!(Pattern::new("(?i)^a/").unwrap().literal_prefix(), None);
        assert_eq!(Pattern::new("(?m)^a/").unwrap().literal_prefix(), None);
        assert_eq!(Pattern::new("^a b/é/").unwrap().literal_prefix(), Some("a b/é/".as_bytes()));
        assert_eq!(Pattern::new("^a/^").unwrap().literal_prefix(), None);
    }

    #[test]
    fn errors_carry_the_column() {
        let e = Pattern::new("^src/(foo").unwrap_err();
        assert_eq!(e.column, 6, "{e}");
        let e = Pattern::new("^a/[z-a]").unwrap_err();
        assert_eq!(e.column, 5, "{e}");
    }
}
