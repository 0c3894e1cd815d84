//! Reading a Dockerfile's `FROM` lines: named stages (cached separately), and pinning a
//! `FROM <project>` to that project's exact `cache-<hash>` image.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub base: String,
    pub name: Option<String>,
}

/// `FROM [--flag=…]… image [AS name]`, with its byte range of the image token.
struct From<'a> {
    image: &'a str,
    image_start: usize,
    name: Option<&'a str>,
}

fn parse_from(line: &str) -> Option<From<'_>> {
    let trimmed = line.trim_start();
    let offset = line.len() - trimmed.len();
    let mut words = trimmed.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("FROM") {
        return None;
    }
    let mut image = words.next()?;
    while image.starts_with("--") {
        image = words.next()?;
    }
    let image_start = offset + trimmed.find(image)?;
    let name = match (words.next(), words.next()) {
        (Some(kw), Some(name)) if kw.eq_ignore_ascii_case("AS") => Some(name),
        _ => None,
    };
    Some(From { image, image_start, name })
}

/// Every stage of a Dockerfile, in order.
pub fn stages(text: &str) -> Vec<Stage> {
    text.lines()
        .filter_map(parse_from)
        .map(|f| Stage {
            base: f.image.to_string(),
            name: f.name.map(str::to_string),
        })
        .collect()
}

/// The project a `FROM` image names, if any: `base`, `base:tag`, `org/base`, or a registry
/// path ending in `/base`, where `base` is a project (and not an earlier stage's name).
fn project_of<'a>(image: &str, projects: &'a BTreeMap<String, String>) -> Option<&'a str> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let name = last.split(':').next().unwrap_or(last);
    let path_ok = without_digest == last || without_digest[..without_digest.len() - last.len()].ends_with('/');
    if !path_ok {
        return None;
    }
    projects.get_key_value(name).map(|(k, _)| k.as_str())
}

/// Rewrites `FROM <project>` lines to the project's pinned image (`images`: project →
/// `host/repo:cache-<hash>`). Returns the new text and the `(from, to)` replacements made.
pub fn pin(text: &str, images: &BTreeMap<String, String>) -> (String, Vec<(String, String)>) {
    let mut out = String::with_capacity(text.len() + 128);
    let mut changes = Vec::new();
    let mut stage_names: Vec<String> = Vec::new();
    for line in text.split_inclusive('\n') {
        match parse_from(line) {
            Some(f) => {
                let is_stage = stage_names.iter().any(|s| s.eq_ignore_ascii_case(f.image));
                match project_of(f.image, images).filter(|_| !is_stage) {
                    Some(project) => {
                        let pinned = &images[project];
                        out.push_str(&line[..f.image_start]);
                        out.push_str(pinned);
                        out.push_str(&line[f.image_start + f.image.len()..]);
                        changes.push((f.image.to_string(), pinned.clone()));
                    }
                    None => out.push_str(line),
                }
                if let Some(n) = f.name {
                    stage_names.push(n.to_string());
                }
            }
            None => out.push_str(line),
        }
    }
    (out, changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images() -> BTreeMap<String, String> {
        BTreeMap::from([("base".to_string(), "r:5000/p/base:cache-abc".to_string())])
    }

    #[test]
    fn pins_project_names_in_their_usual_spellings() {
        for from in ["base", "base:latest", "aztecprotocol/base", "reg.io/org/base:1"] {
            let (text, changes) = pin(&format!("FROM {from} AS build\nRUN x\n"), &images());
            assert_eq!(text, "FROM r:5000/p/base:cache-abc AS build\nRUN x\n", "{from}");
            assert_eq!(changes.len(), 1);
        }
        let (text, _) = pin("from --platform=linux/amd64 base\n", &images());
        assert_eq!(text, "from --platform=linux/amd64 r:5000/p/base:cache-abc\n");
    }

    #[test]
    fn leaves_other_images_and_stage_references_alone() {
        let src = "FROM scratch AS base\nFROM basement\nFROM base\nFROM ubuntu:22.04\n";
        let (text, changes) = pin(src, &images());
        assert_eq!(text, src);
        assert!(changes.is_empty());
    }

    #[test]
    fn lists_named_stages() {
        let s = stages("FROM a AS deps\nRUN x\nFROM b as build\nFROM deps\n");
        let names: Vec<_> = s.iter().map(|s| s.name.as_deref()).collect();
        assert_eq!(names, [Some("deps"), Some("build"), None]);
    }
}
