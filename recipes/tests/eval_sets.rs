//! `eval.sets` (ImageNet-ReaL, ImageNet-V2, labelled flat folders) and
//! `data.scaled_decode`: parsing, defaults, round trip, and every validation
//! error with its file, line and field.

use std::path::Path;

use rsb_recipes::{load_str, to_yaml, EvalSetKind, Recipe, RecipeError};

const BASE: &str = "\
name: base
model:
  name: resnet18
  num_classes: 10
data:
  root: data/x
augment:
  input_size: 32
optimizer:
  lamb:
    lr: 8.0e-3
    weight_decay: 0.02
loss:
  bce: {}
schedule:
  cosine:
    epochs: 8
    warmup_epochs: 1
    warmup_lr: 1.0e-4
    min_lr: 1.0e-6
    step_on: update
batch:
  global_size: 128
  micro_size: 64
eval:
  input_size: 32
  crop_pct: 0.95
  batch_size: 256
";

const SETS: &str = "  sets:
    - name: real
      kind: real
      root: val
      labels: real.json
    - name: v2
      kind: v2
      root: /data/imagenetv2-matched-frequency-format-val
";
// With SETS appended, `- name: real` is line 29 and `- name: v2` line 33.

fn parse(source: &str, overrides: &[&str]) -> Result<Recipe, RecipeError> {
    let sets: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    load_str(source, Path::new("recipes/x.yaml"), &sets)
}

fn with_sets(sets: &str) -> String {
    format!("{BASE}{sets}")
}

fn err(source: &str) -> String {
    match parse(source, &[]) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_parse_and_round_trip() {
    let r = parse(BASE, &[]).unwrap();
    assert!(r.data.scaled_decode, "scaled decoding is on by default for training");
    assert!(r.eval.sets.is_empty());
    assert!(!to_yaml(&r).contains("sets"), "no empty `sets` in resolved recipes");

    let r = parse(&with_sets(SETS), &["data.scaled_decode=false"]).unwrap();
    assert!(!r.data.scaled_decode);
    assert_eq!(r.eval.sets.len(), 2);
    assert_eq!(r.eval.sets[0].kind, EvalSetKind::Real);
    assert_eq!(r.eval.sets[0].labels.as_deref(), Some("real.json"));
    assert_eq!(r.eval.sets[1].kind, EvalSetKind::V2);
    assert_eq!(r.eval.sets[1].labels, None);
    let again = parse(&to_yaml(&r), &[]).unwrap();
    assert_eq!(again, r);
}

#[test]
fn unknown_keys_and_kinds_are_refused_with_their_line() {
    let msg = err(&with_sets(&SETS.replace("      labels: real.json", "      label: real.json")));
    assert!(msg.starts_with("recipes/x.yaml:33:7: "), "{msg}");
    assert!(msg.contains("unknown field `label`"), "{msg}");
    let msg = err(&with_sets(&SETS.replace("kind: v2", "kind: imagenet_v2")));
    assert!(msg.starts_with("recipes/x.yaml:35:13: "), "{msg}");
    assert!(msg.contains("unknown variant `imagenet_v2`"), "{msg}");
}

#[test]
fn validation_names_the_set_field_and_line() {
    let msg = err(&with_sets(&SETS.replace("      labels: real.json\n", "")));
    assert_eq!(
        msg,
        "recipes/x.yaml:31:7: eval.sets.0.kind: a `real` set needs `labels` (the ReaL real.json)"
    );
    let msg = err(&with_sets(&format!("{SETS}      labels: x.txt\n")));
    assert!(msg.starts_with("recipes/x.yaml:37:7: eval.sets.1.labels: a `v2` set takes"), "{msg}");
    let msg = err(&with_sets(&SETS.replace("name: v2", "name: real")));
    assert_eq!(
        msg,
        "recipes/x.yaml:34:7: eval.sets.1.name: `real` is already the name of eval.sets.0"
    );
    let msg = err(&with_sets(&SETS.replace("name: v2", "name: val")));
    assert!(
        msg.starts_with("recipes/x.yaml:34:7: eval.sets.1.name: `val` is the validation"),
        "{msg}"
    );
    let msg = err(&with_sets(&SETS.replace("root: val", "root: ''")));
    assert!(msg.starts_with("recipes/x.yaml:32:7: eval.sets.0.root: must not be empty"), "{msg}");
}
