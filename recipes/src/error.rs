//! The crate's error type, [`RecipeError`], and where a bad value came from
//! ([`Origin`], [`Location`]).
//!
//! Every message names the field (as a dotted path such as
//! `optimizer.lamb.lr`) and, when it is known, where the value was written:
//! `recipes/x.yaml:12:5` for the file, or `--set key=value` for an override.

use std::fmt;
use std::path::PathBuf;

/// A 1-based line and column in a recipe file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Line, counting from 1.
    pub line: usize,
    /// Column, counting from 1.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Where the offending value of a [`RecipeError::Invalid`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Not known: [`crate::validate`] was called on an in-memory recipe.
    Unknown,
    /// A recipe file; `location` is absent when the field is not written in
    /// the file (its value is the schema default).
    File {
        /// The recipe file.
        path: PathBuf,
        /// Line and column of the field's key in the file.
        location: Option<Location>,
    },
    /// A command-line override.
    Override {
        /// The override as given, `key=value`.
        set: String,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Unknown => f.write_str("recipe"),
            Origin::File { path, location } => f.write_str(&at(path, location)),
            Origin::Override { set } => write!(f, "--set {set}"),
        }
    }
}

/// Everything that can go wrong while loading, overriding or validating a recipe.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The recipe file could not be read.
    #[error("{}: cannot read recipe: {source}", path.display())]
    Io {
        /// The recipe file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The file is not well-formed YAML (bad indentation, unclosed bracket,
    /// duplicate key, ...).
    #[error("{}: invalid YAML: {message}", at(path, location))]
    Yaml {
        /// The recipe file.
        path: PathBuf,
        /// Where the parser stopped, when known.
        location: Option<Location>,
        /// The parser's message.
        message: String,
    },

    /// The YAML does not match the schema: unknown key, wrong type, missing
    /// required field or unknown enum variant.
    #[error("{}: {}{message}", at(path, location), field_prefix(field))]
    Schema {
        /// The recipe file.
        path: PathBuf,
        /// Where the offending value (or the mapping missing a field) is, when known.
        location: Option<Location>,
        /// Dotted path of the offending value (for an unknown key or variant,
        /// of the mapping holding it); empty for the top level.
        field: String,
        /// What is wrong.
        message: String,
    },

    /// A `--set` argument is malformed: no `=`, an empty key segment, or a
    /// value that is not a YAML scalar or flow value.
    #[error("--set {set}: {message}")]
    OverrideSyntax {
        /// The override as given, `key=value`.
        set: String,
        /// What is wrong.
        message: String,
    },

    /// A `--set` key goes through a value that is not a mapping
    /// (e.g. `name.x=1` when `name` is a string).
    #[error("--set {set}: cannot set `{key}`: {} is {found}", parent_name(parent))]
    OverridePath {
        /// The override as given, `key=value`.
        set: String,
        /// The full dotted key of the override.
        key: String,
        /// The dotted prefix of `key` that holds a non-mapping value
        /// (empty for the top level).
        parent: String,
        /// What `parent` holds instead and why it does not do (`a string,
        /// not a mapping`, `a sequence without an element ...`).
        found: String,
    },

    /// After the `--set` overrides were applied the recipe no longer matches
    /// the schema (the file alone did, or the error lies under an overridden key).
    #[error("--set {set}: {}{message}", field_prefix(field))]
    OverrideSchema {
        /// The override blamed for the error, `key=value`.
        set: String,
        /// Dotted path of the offending value; empty for the top level.
        field: String,
        /// What is wrong.
        message: String,
    },

    /// A value is out of its allowed range or inconsistent with another field.
    #[error("{}{field}: {message}", origin_prefix(origin))]
    Invalid {
        /// Where the value was written.
        origin: Origin,
        /// Dotted path of the field (`batch.micro_size`).
        field: String,
        /// What is wrong, with the value found.
        message: String,
    },
}

/// `path:line:column`, or `path` when the location is unknown.
fn at(path: &std::path::Path, location: &Option<Location>) -> String {
    match location {
        Some(location) => format!("{}:{location}", path.display()),
        None => path.display().to_string(),
    }
}

/// `` `parent` ``, or `the top level`.
fn parent_name(parent: &str) -> String {
    if parent.is_empty() {
        "the top level".to_owned()
    } else {
        format!("`{parent}`")
    }
}

/// `field: `, or nothing for the top level.
fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

/// `origin: `, or nothing when the origin is unknown.
fn origin_prefix(origin: &Origin) -> String {
    match origin {
        Origin::Unknown => String::new(),
        origin => format!("{origin}: "),
    }
}
