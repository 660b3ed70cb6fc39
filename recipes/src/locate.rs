//! Finds the line and column of a dotted key (`optimizer.lamb.lr`) in YAML source.
//!
//! serde_norway exposes no spans, but it stamps the position of the current
//! event on any error a visitor returns. So we walk the document with a
//! visitor that follows the path and fails on purpose, with a marker message,
//! when it reads the last key: the error's location is that key's position.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::Location;

/// Message of the deliberate error; cannot be a key of a real recipe.
const MARKER: &str = "\u{0}rsb-recipes-locate\u{0}";

/// Line and column of the key at `path` (mapping keys only), if present.
pub(crate) fn locate(source: &str, path: &str) -> Option<Location> {
    let segments: Vec<&str> = path.split('.').collect();
    if path.is_empty() {
        return None;
    }
    let de = serde_norway::Deserializer::from_str(source);
    match (Navigate { path: &segments }).deserialize(de) {
        Err(e) if e.to_string().contains(MARKER) => {
            e.location().map(|l| Location { line: l.line(), column: l.column() })
        }
        _ => None,
    }
}

/// Follows a non-empty path through nested mappings.
struct Navigate<'a> {
    path: &'a [&'a str],
}

impl<'de> DeserializeSeed<'de> for Navigate<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Navigate<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((head, rest)) = self.path.split_first() else {
            return Ok(());
        };
        while let Some(found) = map.next_key_seed(Key { wanted: head, last: rest.is_empty() })? {
            if found {
                return map.next_value_seed(Navigate { path: rest });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    /// A numeric path segment indexes a sequence (`eval.sets.1.name`).
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((head, rest)) = self.path.split_first() else {
            return Ok(());
        };
        let Ok(index) = head.parse::<usize>() else {
            return Ok(());
        };
        if rest.is_empty() {
            return Ok(());
        }
        for _ in 0..index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Navigate { path: rest })?;
        Ok(())
    }
}

/// Reads one mapping key: `true` if it is the wanted one; the marker error
/// if it is the wanted one and the last of the path.
struct Key<'a> {
    wanted: &'a str,
    last: bool,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        match (key == self.wanted, self.last) {
            (true, true) => Err(E::custom(MARKER)),
            (found, _) => Ok(found),
        }
    }
}

/// The first mapping key that repeats an earlier key of its mapping: its
/// dotted path and its own position (the parser reports a duplicate at the
/// mapping's). `None` when there is none, or the source does not parse.
pub(crate) fn locate_duplicate_key(source: &str) -> Option<(String, Location)> {
    let de = serde_norway::Deserializer::from_str(source);
    let mut found = None;
    match (Walk { path: String::new(), found: &mut found }).deserialize(de) {
        Err(e) if e.to_string().contains(MARKER) => {
            let at = e.location().map(|l| Location { line: l.line(), column: l.column() })?;
            Some((found?, at))
        }
        _ => None,
    }
}

/// Walks a whole document, failing with the marker at the first key that a
/// mapping holds twice (its dotted path put in `found`).
struct Walk<'a> {
    path: String,
    found: &'a mut Option<String>,
}

/// The dotted path of `segment` under `path` (`segment` alone at the top).
fn child_path(path: &str, segment: &str) -> String {
    if path.is_empty() {
        segment.to_owned()
    } else {
        format!("{path}.{segment}")
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        loop {
            let unique = UniqueKey { seen: &mut seen, path: &self.path, found: &mut *self.found };
            let Some(key) = map.next_key_seed(unique)? else { return Ok(()) };
            let path = child_path(&self.path, &key);
            map.next_value_seed(Walk { path, found: &mut *self.found })?;
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for index in 0.. {
            let path = child_path(&self.path, &index.to_string());
            if seq.next_element_seed(Walk { path, found: &mut *self.found })?.is_none() {
                break;
            }
        }
        Ok(())
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        IgnoredAny.visit_enum(data).map(|_| ())
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// Reads one mapping key as text; the marker error (its path put in
/// `found`) if its mapping already had it.
struct UniqueKey<'a> {
    seen: &'a mut std::collections::HashSet<String>,
    path: &'a str,
    found: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for UniqueKey<'_> {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for UniqueKey<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<String, E> {
        if !self.seen.insert(key.to_owned()) {
            *self.found = Some(child_path(self.path, key));
            return Err(E::custom(MARKER));
        }
        Ok(key.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "\
name: x
optimizer:
  lamb:
    lr: 0.1   # comment
    betas: [0.9, 0.999]
flow: {a: 1, b: {c: 2}}
sets:
  - name: a
  - name: b
    root: r
";

    fn at(path: &str) -> Option<(usize, usize)> {
        locate(SOURCE, path).map(|l| (l.line, l.column))
    }

    #[test]
    fn finds_nested_keys() {
        assert_eq!(at("name"), Some((1, 1)));
        assert_eq!(at("optimizer"), Some((2, 1)));
        assert_eq!(at("optimizer.lamb.lr"), Some((4, 5)));
        assert_eq!(at("optimizer.lamb.betas"), Some((5, 5)));
        assert_eq!(at("flow.b.c"), Some((6, 18)));
        assert_eq!(at("sets.1.root"), Some((10, 5)));
        assert_eq!(at("sets.0.name"), Some((8, 5)));
    }

    #[test]
    fn a_duplicate_key_is_found_at_its_second_place() {
        let twice = "name: x\noptimizer:\n  lamb:\n    lr: 0.1\n    eps: 1\n    lr: 0.2\n";
        let (path, at) = locate_duplicate_key(twice).unwrap();
        assert_eq!((path.as_str(), at.line, at.column), ("optimizer.lamb.lr", 6, 5));
        let in_list = "sets:\n  - name: a\n  - name: b\n    root: r\n    name: c\n";
        let (path, at) = locate_duplicate_key(in_list).unwrap();
        assert_eq!((path.as_str(), at.line, at.column), ("sets.1.name", 5, 5));
        assert!(locate_duplicate_key(SOURCE).is_none());
        assert!(locate_duplicate_key("[1, 2").is_none());
    }

    #[test]
    fn missing_or_malformed_paths_give_none() {
        assert_eq!(at("optimizer.lamb.eps"), None);
        assert_eq!(at("name.x"), None);
        assert_eq!(at(""), None);
        assert_eq!(locate("[1, 2", "a"), None);
    }
}
