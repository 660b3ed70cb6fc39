//! `--set key=value` overrides applied to the YAML tree of a recipe.
//!
//! The key is a dotted path of mapping keys (`optimizer.lamb.lr`); the value
//! is parsed as a YAML scalar or flow value (`0.004`, `resnet50`, `null`,
//! `[0.35, 1.0]`, `{cross_entropy: {smoothing: 0.1}}`). A missing key, or a
//! `null` on the way, becomes a fresh mapping, so `mixup.mixup_alpha=0.2`
//! works on a recipe without a `mixup` section. An element of a sequence is
//! addressed by its index (`eval.sets.0.root=...`) or, for a sequence of
//! mappings, by its `name` field (`eval.sets.real.root=...`); setting such an
//! element to `null` removes it (`eval.sets.v2=null`), and a whole list can be
//! replaced (`augment.scale=[0.35,1.0]`).

use serde_norway::{Mapping, Value};

use crate::error::RecipeError;

/// One parsed `--set key=value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The override as given, `key=value` (used in error messages).
    pub raw: String,
    /// The key split on `.`; never empty, no empty segment.
    pub key: Vec<String>,
    /// The parsed value.
    pub value: Value,
}

impl Override {
    /// Parses `key=value`, splitting at the first `=`.
    pub fn parse(raw: &str) -> Result<Override, RecipeError> {
        let syntax = |message: String| RecipeError::OverrideSyntax { set: raw.to_owned(), message };
        let Some((key, value)) = raw.split_once('=') else {
            return Err(syntax(
                "expected `key=value` (e.g. `optimizer.lamb.lr=0.004`), found no `=`".into(),
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(syntax("the key before `=` is empty".into()));
        }
        let segments: Vec<String> = key.split('.').map(|s| s.trim().to_owned()).collect();
        if segments.iter().any(String::is_empty) {
            return Err(syntax(format!("the key `{key}` has an empty segment")));
        }
        let value: Value = serde_norway::from_str(value).map_err(|e| {
            syntax(format!("the value `{value}` is not a YAML scalar or flow value: {e}"))
        })?;
        Ok(Override { raw: raw.to_owned(), key: segments, value })
    }

    /// The dotted key.
    pub fn dotted_key(&self) -> String {
        self.key.join(".")
    }

    /// Whether this override wrote `field` (a dotted path) or a value above
    /// or below it, i.e. one path is a segment-wise prefix of the other.
    pub fn touches(&self, field: &str) -> bool {
        key_touches(&self.key, field)
    }

    /// Writes the value into `root`, creating missing mappings on the way
    /// (see the module documentation for sequence elements). Says what it
    /// wrote, each element named by its index (`eval.sets.1.root` for
    /// `eval.sets.v2.root`), as validation names fields.
    pub fn apply(&self, root: &mut Value) -> Result<Applied, RecipeError> {
        let mut written = Vec::with_capacity(self.key.len());
        let mut node = root;
        for (depth, segment) in self.key.iter().enumerate() {
            if node.is_null() {
                *node = Value::Mapping(Mapping::new());
            }
            let path_error = |found: String| RecipeError::OverridePath {
                set: self.raw.clone(),
                key: self.dotted_key(),
                parent: self.key.get(..depth).unwrap_or_default().join("."),
                found,
            };
            node = match node {
                Value::Mapping(mapping) => {
                    written.push(segment.clone());
                    mapping.entry(Value::String(segment.clone())).or_insert(Value::Null)
                }
                Value::Sequence(elements) => {
                    let Some(index) = element_index(elements, segment) else {
                        return Err(path_error(format!(
                            "a sequence without an element `{segment}` ({})",
                            element_names(elements)
                        )));
                    };
                    if depth + 1 == self.key.len() && self.value.is_null() {
                        elements.remove(index);
                        return Ok(Applied::Removed { sequence: written, index });
                    }
                    written.push(index.to_string());
                    &mut elements[index]
                }
                other => return Err(path_error(format!("{}, not a mapping", describe(other)))),
            };
        }
        *node = self.value.clone();
        Ok(Applied::Set(written))
    }
}

/// What [`Override::apply`] did, sequence elements named by index.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// Wrote the value at this key.
    Set(Vec<String>),
    /// Removed element `index` of the sequence at `sequence`.
    Removed {
        /// The sequence's key.
        sequence: Vec<String>,
        /// The element's index.
        index: usize,
    },
}

/// Where `field` (a dotted path of the recipe after `applied`) is in the
/// file: the elements a removal moved down are numbered as they were
/// before it.
pub fn field_in_file(field: &str, applied: &[Applied]) -> String {
    let mut segments: Vec<String> = field.split('.').map(str::to_owned).collect();
    for a in applied.iter().rev() {
        let Applied::Removed { sequence, index } = a else { continue };
        if let Some(i) = element_within(&segments, sequence).filter(|i| i >= index) {
            segments[sequence.len()] = (i + 1).to_string();
        }
    }
    segments.join(".")
}

/// The keys `applied` wrote, in order, each as the elements are numbered
/// once every override was applied: an element a later override removed
/// names nothing (`None`), and one after it moves down.
pub fn keys_written(applied: &[Applied]) -> Vec<Option<Vec<String>>> {
    let mut keys: Vec<Option<Vec<String>>> = Vec::with_capacity(applied.len());
    for a in applied {
        match a {
            Applied::Set(key) => keys.push(Some(key.clone())),
            Applied::Removed { sequence, index } => {
                for key in keys.iter_mut() {
                    let Some(k) = key else { continue };
                    match element_within(k, sequence) {
                        Some(i) if i == *index => *key = None,
                        Some(i) if i > *index => k[sequence.len()] = (i - 1).to_string(),
                        _ => {}
                    }
                }
                keys.push(None);
            }
        }
    }
    keys
}

/// The index of the element of `sequence` that `key` is in or names, when
/// it is in that sequence.
fn element_within(key: &[String], sequence: &[String]) -> Option<usize> {
    if key.len() > sequence.len() && key.starts_with(sequence) {
        key[sequence.len()].parse().ok()
    } else {
        None
    }
}

/// Whether `key` and `field` (a dotted path) are the same path, or one is a
/// segment-wise prefix of the other.
pub fn key_touches(key: &[String], field: &str) -> bool {
    if field.is_empty() {
        return false;
    }
    key.iter().map(String::as_str).zip(field.split('.')).all(|(a, b)| a == b)
}

/// The element `segment` addresses: an index, or the element whose `name`
/// field equals it.
fn element_index(elements: &[Value], segment: &str) -> Option<usize> {
    if let Ok(index) = segment.parse::<usize>() {
        return (index < elements.len()).then_some(index);
    }
    elements.iter().position(|e| e.get("name").and_then(Value::as_str) == Some(segment))
}

/// What a sequence's elements can be called, for error messages.
fn element_names(elements: &[Value]) -> String {
    let names: Vec<&str> =
        elements.iter().filter_map(|e| e.get("name").and_then(Value::as_str)).collect();
    match (elements.len(), names.len()) {
        (0, _) => "it is empty".to_owned(),
        (n, k) if k == n => format!("its elements are {}, or indices 0..{n}", names.join(", ")),
        (n, _) => format!("indices 0..{n}"),
    }
}

/// `a string`, `a sequence`, ... for error messages.
fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(yaml: &str) -> Value {
        serde_norway::from_str(yaml).expect("test YAML parses")
    }

    #[test]
    fn parses_scalars_and_flow_values() {
        let o = Override::parse("optimizer.lamb.lr=0.004").unwrap();
        assert_eq!(o.key, ["optimizer", "lamb", "lr"]);
        assert_eq!(o.value, Value::from(0.004));
        assert_eq!(Override::parse("a=null").unwrap().value, Value::Null);
        assert_eq!(Override::parse("a=/x=y").unwrap().value, Value::from("/x=y"));
        let seq = Override::parse("augment.scale=[0.35,1.0]").unwrap().value;
        assert_eq!(seq, tree("[0.35, 1.0]"));
    }

    #[test]
    fn rejects_bad_syntax() {
        let msg = Override::parse("foo").unwrap_err().to_string();
        assert!(msg.starts_with("--set foo: expected `key=value`"), "{msg}");
        let msg = Override::parse("=1").unwrap_err().to_string();
        assert!(msg.contains("key before `=` is empty"), "{msg}");
        let msg = Override::parse("a..b=1").unwrap_err().to_string();
        assert!(msg.contains("empty segment"), "{msg}");
        let msg = Override::parse("a=[1, 2").unwrap_err().to_string();
        assert!(msg.contains("not a YAML scalar or flow value"), "{msg}");
    }

    #[test]
    fn sequence_elements_are_addressed_by_index_or_name_and_removed_by_null() {
        let yaml = "eval:\n  sets:\n  - {name: real, root: a}\n  - {name: v2, root: b}\n";
        let mut root = tree(yaml);
        Override::parse("eval.sets.real.root=/data/val").unwrap().apply(&mut root).unwrap();
        Override::parse("eval.sets.1.root=/data/v2").unwrap().apply(&mut root).unwrap();
        assert_eq!(
            root,
            tree("eval:\n  sets:\n  - {name: real, root: /data/val}\n  - {name: v2, root: /data/v2}\n")
        );
        Override::parse("eval.sets.v2=null").unwrap().apply(&mut root).unwrap();
        assert_eq!(root, tree("eval:\n  sets:\n  - {name: real, root: /data/val}\n"));
        let msg = Override::parse("eval.sets.v3.root=x").unwrap().apply(&mut root).unwrap_err();
        assert_eq!(
            msg.to_string(),
            "--set eval.sets.v3.root=x: cannot set `eval.sets.v3.root`: `eval.sets` is a sequence \
             without an element `v3` (its elements are real, or indices 0..1)"
        );
        let msg = Override::parse("eval.sets.4=null").unwrap().apply(&mut root).unwrap_err();
        assert!(msg.to_string().contains("without an element `4`"), "{msg}");
    }

    #[test]
    fn creates_missing_and_null_mappings() {
        let mut root = tree("a: 1\nb: null\n");
        Override::parse("b.c.d=2").unwrap().apply(&mut root).unwrap();
        Override::parse("e.f=3").unwrap().apply(&mut root).unwrap();
        assert_eq!(root, tree("a: 1\nb: {c: {d: 2}}\ne: {f: 3}\n"));
    }

    #[test]
    fn refuses_to_descend_into_a_scalar() {
        let mut root = tree("name: x\n");
        let err = Override::parse("name.y=1").unwrap().apply(&mut root).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--set name.y=1: cannot set `name.y`: `name` is a string, not a mapping"
        );
    }

    #[test]
    fn refuses_a_non_mapping_document() {
        let mut root = tree("[1, 2]\n");
        let err = Override::parse("a=1").unwrap().apply(&mut root).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--set a=1: cannot set `a`: the top level is a sequence without an element `a` (indices 0..2)"
        );
    }

    #[test]
    fn touches_is_a_prefix_relation() {
        let o = Override::parse("augment.scale=[0.1,1]").unwrap();
        assert!(o.touches("augment.scale"));
        assert!(o.touches("augment"));
        assert!(!o.touches("augment.ratio"));
        assert!(!o.touches("augmentation"));
        assert!(!o.touches(""));
    }
}
