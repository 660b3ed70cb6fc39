//! The recipe parser, fuzzed with proptest (a bounded number of cases):
//! arbitrary text, every committed recipe cut short or with one line
//! replaced, and arbitrary `--set` overrides never panic; each either loads
//! or fails with an error that names the file (or the `--set` at fault).

use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn committed_recipes() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    for dir in [root.to_path_buf(), root.join("debug")] {
        for entry in std::fs::read_dir(&dir).expect("recipes folder") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).expect("readable");
                found.push((path, text));
            }
        }
    }
    assert!(found.len() >= 6, "expected the committed recipes, found {}", found.len());
    found.sort();
    found
}

/// Loads `text` as `fuzzed.yaml` and checks that a failure names the file,
/// or the `--set` override at fault.
fn load_checked(text: &str, overrides: &[String]) -> Result<(), TestCaseError> {
    let name = Path::new("fuzzed.yaml");
    if let Err(e) = rsb_recipes::load_str(text, name, overrides) {
        let shown = e.to_string();
        let named = shown.contains("fuzzed.yaml")
            || overrides.iter().any(|o| shown.contains("--set") && shown.contains(o.as_str()));
        prop_assert!(named, "the error names neither the file nor the override: {shown}");
    }
    Ok(())
}

fn yaml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("-1".to_string()),
        Just("1e400".to_string()),
        Just(".nan".to_string()),
        Just("[1, 2".to_string()),
        Just("{a: b}".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just("&a [*a]".to_string()),
        "[ -~]{0,30}",
        ".{0,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        // Fixed, so that CI runs the same cases every time; change it to explore.
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_0001),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,400}") {
        load_checked(&text, &[])?;
    }

    #[test]
    fn a_recipe_cut_short_never_panics(which in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>()) {
        let recipes = committed_recipes();
        let (_, text) = &recipes[which.index(recipes.len())];
        let mut at = cut.index(text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        load_checked(&text[..at], &[])?;
    }

    #[test]
    fn a_recipe_with_one_value_replaced_never_panics(
        which in any::<prop::sample::Index>(),
        line in any::<prop::sample::Index>(),
        value in yaml_value(),
    ) {
        let recipes = committed_recipes();
        let (_, text) = &recipes[which.index(recipes.len())];
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let i = line.index(lines.len());
        // Keep the key and its indentation, replace what follows the colon.
        if let Some(colon) = lines[i].find(':') {
            lines[i] = format!("{}: {value}", &lines[i][..colon]);
        } else {
            lines[i] = value;
        }
        load_checked(&lines.join("\n"), &[])?;
    }

    #[test]
    fn arbitrary_overrides_never_panic(
        which in any::<prop::sample::Index>(),
        key in prop_oneof!["[a-z_.]{0,40}", Just("optimizer.lamb.lr".to_string()), Just("batch.global_size".to_string()), Just("augment.input_size".to_string())],
        value in yaml_value(),
    ) {
        let recipes = committed_recipes();
        let (_, text) = &recipes[which.index(recipes.len())];
        load_checked(text, &[format!("{key}={value}")])?;
    }
}
