//! Where an error is in the file, as the YAML parser itself reports it.
//!
//! An error found while serde reads the file carries the parser's position
//! ([`serde_yaml_ng::Error::location`]). An error found afterwards (a tier no API key may name, a
//! route cost no tier can hold) has a [`FieldPath`]; [`line_of`] reads the text again with a
//! [`DeserializeSeed`] that walks down that path and raises an error inside the node it names,
//! which the parser stamps with the node's position. serde_yaml_ng keeps positions to itself
//! otherwise, and the second reading happens only for an error, so loading a good file reads it
//! once.

use std::cell::Cell;
use std::fmt;
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::ConfigError;

/// One step down the document: the value of a mapping key, or an element of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// A field of the file, as a path from the top (`routes[2].limit.burst_limit`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct FieldPath(Vec<Step>);

impl FieldPath {
    /// A top-level key.
    pub(super) fn top(key: &str) -> FieldPath {
        FieldPath(vec![Step::Key(key.to_owned())])
    }

    /// The value of `key` in the mapping here.
    pub(super) fn key(mut self, key: &str) -> FieldPath {
        self.0.push(Step::Key(key.to_owned()));
        self
    }

    /// Element `index` (from 0) of the sequence here.
    pub(super) fn index(mut self, index: usize) -> FieldPath {
        self.0.push(Step::Index(index));
        self
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, step) in self.0.iter().enumerate() {
            match step {
                Step::Key(key) if i == 0 => f.write_str(key)?,
                Step::Key(key) => write!(f, ".{key}")?,
                Step::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// The 1-based line of `path` in `text`, as the YAML parser numbers lines: the line of its key
/// (of the element, for a sequence index). A path that leaves the document (a field the file does
/// not give, such as the `window` a `limit` needs) is answered with the line of its deepest part
/// that is there; `None` when not even its first step is.
pub(super) fn line_of(text: &str, path: &FieldPath) -> Option<usize> {
    let mut steps = &path.0[..];
    // At most twice: a path that leaves the document is looked up again up to where it left.
    while !steps.is_empty() {
        match seek(text, steps) {
            Seek::Found(line) => return Some(line),
            Seek::Missing { there } if there < steps.len() => steps = &steps[..there],
            Seek::Missing { .. } | Seek::Failed => return None,
        }
    }
    None
}

/// What one reading of the text found.
enum Seek {
    /// The line of the node.
    Found(usize),
    /// The first `there` steps of the path are in the document, the next one is not.
    Missing { there: usize },
    /// The reading failed otherwise (not for a file that loaded).
    Failed,
}

/// The message of the error raised at the node; its text is never shown.
const HERE: &str = "the node sought";

fn seek(text: &str, steps: &[Step]) -> Seek {
    let hit = Cell::new(false);
    let seeker = Seeker {
        steps,
        depth: 0,
        hit: &hit,
    };
    match seeker.deserialize(serde_yaml_ng::Deserializer::from_str(text)) {
        Ok(there) => Seek::Missing { there },
        Err(e) if hit.get() => e
            .location()
            .map_or(Seek::Failed, |at| Seek::Found(at.line())),
        Err(_) => Seek::Failed,
    }
}

/// Reads the node at `steps[depth]` of the path: answers how many steps were found when the
/// path leaves the document, or fails inside the last step's node (setting `hit`).
struct Seeker<'a> {
    steps: &'a [Step],
    depth: usize,
    hit: &'a Cell<bool>,
}

impl Seeker<'_> {
    fn deeper(&self) -> Seeker<'_> {
        Seeker {
            steps: self.steps,
            depth: self.depth + 1,
            hit: self.hit,
        }
    }

    fn is_last(&self) -> bool {
        self.depth + 1 == self.steps.len()
    }
}

impl<'de> DeserializeSeed<'de> for Seeker<'_> {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seeker<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
        let Step::Key(wanted) = &self.steps[self.depth] else {
            // A mapping where the path wants a sequence: the path leaves the document here.
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(self.depth);
        };
        let last = self.is_last();
        loop {
            let key = KeySeeker {
                wanted,
                last,
                hit: self.hit,
            };
            match map.next_key_seed(key)? {
                None => return Ok(self.depth),
                Some(true) => {
                    let there = map.next_value_seed(self.deeper())?;
                    // Not there after all: read the rest, as serde_yaml_ng wants a mapping read
                    // to its end when no error stops it.
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    return Ok(there);
                }
                Some(false) => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let Step::Index(wanted) = self.steps[self.depth] else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(self.depth);
        };
        for _ in 0..wanted {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(self.depth);
            }
        }
        let there = if self.is_last() {
            seq.next_element_seed(Here { hit: self.hit })?
        } else {
            seq.next_element_seed(self.deeper())?
        };
        // As for a mapping: the rest is read.
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(there.unwrap_or(self.depth))
    }

    // A scalar where the path goes on: the path leaves the document here.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<usize, E> {
        Ok(self.depth)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<usize, E> {
        Ok(self.depth)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<usize, E> {
        Ok(self.depth)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<usize, E> {
        Ok(self.depth)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<usize, E> {
        Ok(self.depth)
    }

    fn visit_unit<E: de::Error>(self) -> Result<usize, E> {
        Ok(self.depth)
    }

    fn visit_none<E: de::Error>(self) -> Result<usize, E> {
        Ok(self.depth)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        self.deserialize(d)
    }
}

/// Reads a mapping key: whether it is the one wanted; the wanted key of the path's last step
/// fails where it is, so the parser gives its position.
struct KeySeeker<'a> {
    wanted: &'a str,
    last: bool,
    hit: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for KeySeeker<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeeker<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        if key != self.wanted {
            Ok(false)
        } else if self.last {
            self.hit.set(true);
            Err(E::custom(HERE))
        } else {
            Ok(true)
        }
    }
}

/// Fails inside the node it is given (a sequence element), whatever it is, for its position.
struct Here<'a> {
    hit: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for Here<'_> {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        self.hit.set(true);
        // A visitor that accepts nothing: every node is refused where it starts.
        d.deserialize_any(Nothing)
    }
}

struct Nothing;

impl Visitor<'_> for Nothing {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HERE)
    }
}

/// A serde_yaml_ng error as a [`ConfigError`]: the parser's position and field path, its
/// message without its own copy of the position.
pub(super) fn yaml_error(file: &Path, e: &serde_yaml_ng::Error) -> ConfigError {
    let message = e.to_string();
    // serde_yaml_ng writes "path.to.field: what ... at line L column C".
    let (field, rest) = match message.split_once(": ") {
        Some((field, rest))
            if !field.contains(' ') && field.chars().all(|c| c.is_ascii_graphic()) =>
        {
            (Some(field.to_owned()), rest.to_owned())
        }
        _ => (None, message.clone()),
    };
    // The position is reported as the line of the error; drop the parser's own copy of it
    // ("... at line 3 column 34, while parsing a flow mapping" -> "..., while parsing a flow
    // mapping").
    let rest = match rest.find(" at line ") {
        Some(i) => {
            let tail = &rest[i + " at line ".len()..];
            let skip = tail
                .find(|c: char| !(c.is_ascii_digit() || c == ' ' || c.is_ascii_alphabetic()))
                .unwrap_or(tail.len());
            format!("{}{}", &rest[..i], &tail[skip..])
        }
        None => rest,
    };
    ConfigError {
        file: file.to_path_buf(),
        line: e.location().map(|at| at.line()),
        field,
        message: rest,
    }
}
