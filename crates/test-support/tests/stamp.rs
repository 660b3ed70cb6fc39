//! The fixture-stamp check on temporary folders: a stamp with the current
//! oracle scripts' sha256 and timm 1.0.31 passes; a changed, new or removed
//! script, another timm, or no stamp at all fails with the regenerate command.

use rsb_test_support::{check_stamp, StampError, GENERATE_FIXTURES, STAMP_FILE};
use std::path::Path;

/// sha256("abc"), the FIPS 180-2 test vector.
const SHA256_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
/// sha256(""), the FIPS 180-2 empty-message digest.
const SHA256_EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn oracle(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("models.py"), "abc").unwrap();
    std::fs::write(dir.join("gen_fixtures.py"), "").unwrap();
    // Not a Python file: not part of the stamp.
    std::fs::write(dir.join("README.txt"), "ignored").unwrap();
}

fn stamp(fixtures: &Path, timm: &str, sources: serde_json::Value) {
    std::fs::create_dir_all(fixtures).unwrap();
    let stamp = serde_json::json!({
        "timm": timm, "torch": "2.11.0", "pillow": "12.0.0", "sources": sources,
    });
    std::fs::write(fixtures.join(STAMP_FILE), serde_json::to_string_pretty(&stamp).unwrap())
        .unwrap();
}

fn matching_sources() -> serde_json::Value {
    serde_json::json!({ "models.py": SHA256_ABC, "gen_fixtures.py": SHA256_EMPTY })
}

#[test]
fn a_matching_stamp_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let (fixtures, scripts) = (tmp.path().join("fixtures"), tmp.path().join("oracle"));
    oracle(&scripts);
    stamp(&fixtures, "1.0.31", matching_sources());
    check_stamp(&fixtures, &scripts).unwrap();
}

#[test]
fn a_changed_script_makes_the_fixtures_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let (fixtures, scripts) = (tmp.path().join("fixtures"), tmp.path().join("oracle"));
    oracle(&scripts);
    stamp(&fixtures, "1.0.31", matching_sources());
    std::fs::write(scripts.join("models.py"), "abd").unwrap();
    let err = check_stamp(&fixtures, &scripts).unwrap_err();
    assert!(matches!(err, StampError::Stale { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("fixtures are stale, regenerate with"), "{message}");
    assert!(message.contains(GENERATE_FIXTURES), "{message}");
    assert!(message.contains("models.py changed"), "{message}");
}

#[test]
fn a_new_or_removed_script_makes_the_fixtures_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let (fixtures, scripts) = (tmp.path().join("fixtures"), tmp.path().join("oracle"));
    oracle(&scripts);
    stamp(&fixtures, "1.0.31", matching_sources());
    std::fs::write(scripts.join("train_mode.py"), "abc").unwrap();
    let message = check_stamp(&fixtures, &scripts).unwrap_err().to_string();
    assert!(message.contains("train_mode.py is new"), "{message}");

    std::fs::remove_file(scripts.join("train_mode.py")).unwrap();
    std::fs::remove_file(scripts.join("gen_fixtures.py")).unwrap();
    let message = check_stamp(&fixtures, &scripts).unwrap_err().to_string();
    assert!(message.contains("gen_fixtures.py is gone"), "{message}");
}

#[test]
fn another_timm_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (fixtures, scripts) = (tmp.path().join("fixtures"), tmp.path().join("oracle"));
    oracle(&scripts);
    stamp(&fixtures, "1.0.30", matching_sources());
    let err = check_stamp(&fixtures, &scripts).unwrap_err();
    assert!(matches!(&err, StampError::WrongTimm { found, .. } if found == "1.0.30"), "{err:?}");
    assert!(err.to_string().contains("timm 1.0.31"), "{err}");
}

#[test]
fn a_missing_or_malformed_stamp_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (fixtures, scripts) = (tmp.path().join("fixtures"), tmp.path().join("oracle"));
    oracle(&scripts);
    std::fs::create_dir_all(fixtures.join("models")).unwrap();
    let err = check_stamp(&fixtures, &scripts).unwrap_err();
    assert!(matches!(err, StampError::Missing { .. }), "{err:?}");
    assert!(err.to_string().contains(GENERATE_FIXTURES), "{err}");

    std::fs::write(fixtures.join(STAMP_FILE), "{\"timm\": \"1.0.31\"}").unwrap();
    let err = check_stamp(&fixtures, &scripts).unwrap_err();
    assert!(err.to_string().contains("sources"), "{err}");
}
