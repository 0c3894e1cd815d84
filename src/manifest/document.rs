//! Manifest text (JSON or YAML) turned into one JSON value, keeping what plain parsers drop:
//! the line of every key, so that a key written twice can be reported with both lines.
//!
//! # Guarantees
//! - JSON and YAML that write the same entries give the same [`Value`] (object keys in
//!   document order), so they hash alike.
//! - A syntax error carries a 1-based line and column.
//! - A key repeated in one object is never silently resolved: with the same value it is a
//!   [`Repeat`] with `same: true` (a warning); with a different value, `same: false` (the
//!   caller fails the entry it belongs to). The first occurrence is kept either way.
//!
//! # Caveats
//! - YAML is read with the core schema (plain `null`, `~`, `true`, `false`, numbers);
//!   anchors, aliases and `<<` merge keys are supported; only one document is read.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Which syntax a manifest file is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    /// The format a file name implies: `.yml` and `.yaml` are YAML, anything else JSON.
    pub fn of(file: &str) -> Format {
        if file.ends_with(".yml") || file.ends_with(".yaml") {
            Format::Yaml
        } else {
            Format::Json
        }
    }
}

/// A key written more than once in one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repeat {
    /// The keys from the root down to the repeated one (`["api", "buildDir"]`).
    pub path: Vec<String>,
    pub first_line: usize,
    pub line: usize,
    /// Whether both occurrences have the same value.
    pub same: bool,
}

/// A parsed manifest document.
#[derive(Debug)]
pub struct Document {
    pub root: Value,
    pub repeats: Vec<Repeat>,
}

/// A syntax error, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

pub fn parse(text: &[u8], format: Format) -> Result<Document, SyntaxError> {
    match format {
        Format::Json => parse_json(text),
        Format::Yaml => parse_yaml(text),
    }
}

/// Builds objects key by key, recording where each key was and what repeats.
#[derive(Default)]
struct Builder {
    repeats: Vec<Repeat>,
    path: Vec<String>,
}

/// An object under construction: the map and the line of each key in it.
#[derive(Default)]
struct Object {
    map: Map<String, Value>,
    lines: HashMap<String, usize>,
}

impl Builder {
    fn insert(&mut self, obj: &mut Object, key: String, line: usize, value: Value) {
        match obj.map.get(&key) {
            Some(existing) => {
                let mut path = self.path.clone();
                let same = *existing == value;
                path.push(key.clone());
                self.repeats.push(Repeat {
                    path,
                    first_line: obj.lines[&key],
                    line,
                    same,
                });
            }
            None => {
                obj.lines.insert(key.clone(), line);
                obj.map.insert(key, value);
            }
        }
    }

    fn finish(self, root: Value) -> Document {
        Document {
            root,
            repeats: self.repeats,
        }
    }
}

// ---- JSON ----------------------------------------------------------------------------

fn parse_json(text: &[u8]) -> Result<Document, SyntaxError> {
    // One pass with serde_json, whose errors are precise, noting whether any key repeats.
    // Only then is the text walked again, for the lines of each repeat.
    let mut de = serde_json::Deserializer::from_slice(text);
    let mut repeated = false;
    let root = serde::de::DeserializeSeed::deserialize(NoticeRepeats(&mut repeated), &mut de)
        .and_then(|root| de.end().map(|()| root))
        .map_err(|e| {
            let s = e.to_string();
            let message = match s.rfind(" at line ") {
                Some(i) => s[..i].to_string(),
                None => s,
            };
            SyntaxError {
                line: e.line(),
                column: e.column(),
                message,
            }
        })?;
    if !repeated {
        return Ok(Document {
            root,
            repeats: Vec::new(),
        });
    }
    let text = std::str::from_utf8(text).map_err(|e| SyntaxError {
        line: 1,
        column: e.valid_up_to() + 1,
        message: "invalid UTF-8".into(),
    })?;
    let mut walk = JsonWalk {
        text,
        pos: 0,
        line: 1,
        builder: Builder::default(),
    };
    walk.skip_ws();
    let root = walk.value();
    Ok(walk.builder.finish(root))
}

/// Deserializes any JSON value as serde_json's `Value` does, keeping the first of repeated
/// keys and setting the flag when there is one.
struct NoticeRepeats<'f>(&'f mut bool);

impl<'de> serde::de::DeserializeSeed<'de> for NoticeRepeats<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NoticeRepeats<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(NoticeRepeats(&mut *self.0))? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(NoticeRepeats(&mut *self.0))?;
            if obj.contains_key(&key) {
                *self.0 = true;
            } else {
                obj.insert(key, value);
            }
        }
        Ok(Value::Object(obj))
    }
}

/// A walk over JSON text that serde_json has already accepted, so it need not report errors.
struct JsonWalk<'t> {
    text: &'t str,
    pos: usize,
    line: usize,
    builder: Builder,
}

impl JsonWalk<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b) = self.peek() {
            match b {
                b'\n' => self.line += 1,
                b' ' | b'\t' | b'\r' => {}
                _ => break,
            }
            self.pos += 1;
        }
    }

    /// The end of the scalar token (string, number or literal) starting at `pos`.
    fn scalar_end(&self) -> usize {
        let bytes = self.text.as_bytes();
        let mut i = self.pos;
        if bytes[i] == b'"' {
            i += 1;
            while bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            return i + 1;
        }
        while i < bytes.len() && !b",]} \t\r\n".contains(&bytes[i]) {
            i += 1;
        }
        i
    }

    fn scalar(&mut self) -> Value {
        let end = self.scalar_end();
        let token = &self.text[self.pos..end];
        self.pos = end;
        serde_json::from_str(token).expect("serde_json accepted this token already")
    }

    fn value(&mut self) -> Value {
        self.skip_ws();
        match self.peek() {
            Some(b'{') => Value::Object(self.object().map),
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_ws();
                    match self.peek() {
                        Some(b']') => {
                            self.pos += 1;
                            break;
                        }
                        Some(b',') => self.pos += 1,
                        _ => {
                            let index = items.len().to_string();
                            self.builder.path.push(index);
                            items.push(self.value());
                            self.builder.path.pop();
                        }
                    }
                }
                Value::Array(items)
            }
            _ => self.scalar(),
        }
    }

    fn object(&mut self) -> Object {
        self.pos += 1;
        let mut obj = Object::default();
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    break;
                }
                Some(b',') => self.pos += 1,
                _ => {
                    let line = self.line;
                    let Value::String(key) = self.scalar() else {
                        unreachable!("serde_json accepted only string keys")
                    };
                    self.skip_ws();
                    self.pos += 1; // the colon
                    self.builder.path.push(key.clone());
                    let value = self.value();
                    self.builder.path.pop();
                    self.builder.insert(&mut obj, key, line, value);
                }
            }
        }
        obj
    }
}

// ---- YAML ----------------------------------------------------------------------------

#[derive(Default)]
struct Events(Vec<(Event, Marker)>);

impl MarkedEventReceiver for Events {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        self.0.push((ev, mark));
    }
}

fn parse_yaml(text: &[u8]) -> Result<Document, SyntaxError> {
    let text = std::str::from_utf8(text).map_err(|e| SyntaxError {
        line: 1,
        column: e.valid_up_to() + 1,
        message: "invalid UTF-8".into(),
    })?;
    let mut events = Events::default();
    Parser::new_from_str(text).load(&mut events, false).map_err(|e| SyntaxError {
        line: e.marker().line(),
        column: e.marker().col() + 1,
        message: e.info().to_string(),
    })?;
    let mut walk = YamlWalk {
        events: events.0,
        pos: 0,
        anchors: HashMap::new(),
        builder: Builder::default(),
    };
    // StreamStart, DocumentStart, then the root node (or StreamEnd for an empty file).
    while matches!(walk.events.get(walk.pos), Some((Event::StreamStart | Event::DocumentStart, _))) {
        walk.pos += 1;
    }
    if matches!(walk.events.get(walk.pos), None | Some((Event::StreamEnd | Event::DocumentEnd, _))) {
        return Ok(walk.builder.finish(Value::Null));
    }
    let root = walk.node()?;
    Ok(walk.builder.finish(root))
}

struct YamlWalk {
    events: Vec<(Event, Marker)>,
    pos: usize,
    anchors: HashMap<usize, Value>,
    builder: Builder,
}

impl YamlWalk {
    fn next(&mut self) -> (Event, Marker) {
        let e = self.events[self.pos].clone();
        self.pos += 1;
        e
    }

    fn error(mark: Marker, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            line: mark.line(),
            column: mark.col() + 1,
            message: message.into(),
        }
    }

    fn node(&mut self) -> Result<Value, SyntaxError> {
        let (event, mark) = self.next();
        let (value, anchor) = match event {
            Event::Scalar(text, style, anchor, tag) => (resolve_scalar(text, style, tag.as_ref()), anchor),
            Event::Alias(id) => {
                let v = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| Self::error(mark, "alias to an unknown anchor"))?;
                (v, 0)
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                while !matches!(self.events[self.pos].0, Event::SequenceEnd) {
                    self.builder.path.push(items.len().to_string());
                    items.push(self.node()?);
                    self.builder.path.pop();
                }
                self.pos += 1;
                (Value::Array(items), anchor)
            }
            Event::MappingStart(anchor, _) => (Value::Object(self.mapping()?), anchor),
            other => return Err(Self::error(mark, format!("unexpected {other:?}"))),
        };
        if anchor > 0 {
            self.anchors.insert(anchor, value.clone());
        }
        Ok(value)
    }

    fn mapping(&mut self) -> Result<Map<String, Value>, SyntaxError> {
        let mut obj = Object::default();
        let mut merged: Vec<Map<String, Value>> = Vec::new();
        while !matches!(self.events[self.pos].0, Event::MappingEnd) {
            let (key_event, mark) = self.events[self.pos].clone();
            let key = match key_event {
                Event::Scalar(text, ..) => {
                    self.pos += 1;
                    text
                }
                _ => return Err(Self::error(mark, "a mapping key must be a plain string")),
            };
            if key == "<<" {
                // A merge key: its mapping (or list of mappings) fills in absent keys.
                match self.node()? {
                    Value::Object(m) => merged.push(m),
                    Value::Array(items) => {
                        for item in items {
                            let Value::Object(m) = item else {
                                return Err(Self::error(mark, "`<<` merges only mappings"));
                            };
                            merged.push(m);
                        }
                    }
                    _ => return Err(Self::error(mark, "`<<` merges only mappings")),
                }
                continue;
            }
            self.builder.path.push(key.clone());
            let value = self.node()?;
            self.builder.path.pop();
            self.builder.insert(&mut obj, key, mark.line(), value);
        }
        self.pos += 1;
        for m in merged {
            for (k, v) in m {
                if !obj.map.contains_key(&k) {
                    obj.map.insert(k, v);
                }
            }
        }
        Ok(obj.map)
    }
}

/// The YAML 1.2 core schema for plain scalars; quoted and block scalars are strings.
fn resolve_scalar(text: String, style: TScalarStyle, tag: Option<&yaml_rust2::parser::Tag>) -> Value {
    if let Some(tag) = tag {
        if tag.suffix == "str" {
            return Value::String(text);
        }
    }
    if style != TScalarStyle::Plain {
        return Value::String(text);
    }
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(&text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = text.parse::<i64>() {
            return Value::Number(n.into());
        }
        if let Ok(n) = text.trim_start_matches('+').parse::<u64>() {
            return Value::Number(n.into());
        }
    }
    if let Some(hex) = text.strip_prefix("0x") {
        if let Ok(n) = i64::from_str_radix(hex, 16) {
            return Value::Number(n.into());
        }
    }
    if let Some(oct) = text.strip_prefix("0o") {
        if let Ok(n) = i64::from_str_radix(oct, 8) {
            return Value::Number(n.into());
        }
    }
    let looks_float = digits.bytes().any(|b| b.is_ascii_digit())
        && digits.bytes().all(|b| b.is_ascii_digit() || b"._eE+-".contains(&b));
    if looks_float {
        if let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_of_the_same_entries_are_equal() {
        let json = br#"{"api": {"buildDir": "api", "dependencies": ["base"], "cpus": 16, "x": null, "y": true}}"#;
        let yaml = b"api:\n  buildDir: api\n  dependencies:\n    - base\n  cpus: 16\n  x: ~\n  y: true\n";
        assert_eq!(parse(json, Format::Json).unwrap().root, parse(yaml, Format::Yaml).unwrap().root);
    }

    #[test]
    fn yaml_quoted_scalars_stay_strings() {
        let d = parse(b"a: '16'\nb: \"true\"\nc: 1.5\nd: 0x10\ne: abc\n", Format::Yaml).unwrap();
        assert_eq!(d.root, serde_json::json!({"a": "16", "b": "true", "c": 1.5, "d": 16, "e": "abc"}));
    }

    #[test]
    fn repeated_keys_are_reported_with_both_lines() {
        let yaml = b"api:\n  buildDir: api\n  buildDir: api\nweb:\n  buildDir: web\n  buildDir: www\n";
        let d = parse(yaml, Format::Yaml).unwrap();
        assert_eq!(
            d.repeats,
            vec![
                Repeat { path: vec!["api".into(), "buildDir".into()], first_line: 2, line: 3, same: true },
                Repeat { path: vec!["web".into(), "buildDir".into()], first_line: 5, line: 6, same: false },
            ]
        );
        assert_eq!(d.root["web"]["buildDir"], "web", "the first occurrence is kept");
        let json = b"{\n \"a\": {\"buildDir\": \"a\"},\n \"a\": {\"buildDir\": \"b\"}\n}";
        let d = parse(json, Format::Json).unwrap();
        assert_eq!(d.repeats, vec![Repeat { path: vec!["a".into()], first_line: 2, line: 3, same: false }]);
    }

    #[test]
    fn yaml_errors_have_line_and_column() {
        let e = parse(b"api:\n  buildDir: api\n   bad: [\n", Format::Yaml).unwrap_err();
        assert!(e.line >= 3, "{e:?}");
        let e = parse(b"{\n  \"a\": {\"buildDir\": \"a\",}\n}", Format::Json).unwrap_err();
        assert_eq!((e.line, e.column), (2, 25));
    }

    #[test]
    fn anchors_and_merge_keys() {
        let yaml = b"defaults: &d\n  buildDir: x\n  cpus: 8\napi:\n  <<: *d\n  buildDir: api\n";
        let d = parse(yaml, Format::Yaml).unwrap();
        assert_eq!(d.root["api"], serde_json::json!({"buildDir": "api", "cpus": 8}));
    }

    #[test]
    fn json_strings_with_escapes_and_braces_are_walked_correctly() {
        let json = br#"{"a": {"p": ["^a/\"{x}", "b]"], "q": "}"}, "b": {}}"#;
        let d = parse(json, Format::Json).unwrap();
        assert_eq!(d.root["a"]["p"][0], "^a/\"{x}");
        assert!(d.repeats.is_empty());
    }
}
