//! Git tags as image tags: which tags of a commit can name an image, and whether a release
//! tag agrees with the repository's `VERSION` file (the Aztec build-system's `setup_env`
//! rule).

/// Whether `tag` is a valid image tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_image_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

/// Whether git tag `tag` names `version` (a `VERSION` file's first word): `v1.2.3` or
/// `1.2.3` for `1.2.3`; any `v1.2.x` for `v1.2` or `1.2`; a `name-` prefix before the
/// version and a `-suffix` after it are allowed (`api-v1.2.3-rc1`); a `refs/tags/`-style
/// path keeps its last part.
pub fn tag_names_version(tag: &str, version: &str) -> bool {
    let version = version.trim();
    let tag = tag.rsplit('/').next().unwrap_or(tag);
    // `name-v1.2.3`: the version starts at the last `-v<digit>`.
    let tag = match tag.match_indices("-v").filter(|(i, _)| tag[i + 2..].starts_with(|c: char| c.is_ascii_digit())).last() {
        Some((i, _)) => &tag[i + 1..],
        None => tag,
    };
    let base = tag.split('-').next().unwrap_or(tag);
    let minor = base.rsplit_once('.').map_or(base, |(head, _)| head);
    let strip = |s: &str| s.strip_prefix('v').unwrap_or(s).to_string();
    let want = strip(version);
    [tag, base, minor].iter().any(|t| strip(t) == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_tags_must_name_the_version() {
        for (tag, version) in [
            ("v1.2.3", "1.2.3"),
            ("1.2.3", "1.2.3"),
            ("v1.2.3", "v1.2.3"),
            ("v1.2.7", "v1.2"),
            ("v1.2.7", "1.2"),
            ("api-v1.2.3", "1.2.3"),
            ("v1.2.3-rc1", "1.2.3"),
            ("my-app-v2.0.1-beta", "2.0"),
            ("refs/tags/v3.1.0", "3.1.0"),
        ] {
            assert!(tag_names_version(tag, version), "{tag} should name {version}");
        }
        for (tag, version) in [("v1.2.4", "1.2.3"), ("v1.3.0", "1.2"), ("release", "1.0.0"), ("v10.2.3", "1.2.3")] {
            assert!(!tag_names_version(tag, version), "{tag} should not name {version}");
        }
    }

    #[test]
    fn image_tags_follow_the_distribution_grammar() {
        assert!(valid_image_tag("v1.2.3"));
        assert!(valid_image_tag("_x"));
        assert!(!valid_image_tag("-x"));
        assert!(!valid_image_tag("a/b"));
        assert!(!valid_image_tag(&"x".repeat(129)));
    }
}
