//! Every error path of loading, overriding and validating a recipe, asserting
//! on the message: the file, line and column, the field path and the `--set`.

use std::path::Path;

use rsb_recipes::{load, load_str, to_yaml, validate, Origin, Recipe, RecipeError};

/// A valid recipe; the line numbers in the comments are what the tests expect.
const BASE: &str = "\
name: base
model:
  name: resnet18
  num_classes: 10
data:
  root: data/x
augment:
  input_size: 32
  scale: [0.08, 1.0]
  rand_augment: rand-m6-mstd0.5-inc1
mixup:
  mixup_alpha: 0.1
  cutmix_alpha: 1.0
loss:
  bce:
    target_threshold: 0.2
optimizer:
  lamb:
    lr: 8.0e-3
    weight_decay: 0.02
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
// Lines: lr 19, weight_decay 20, epochs 23, min_lr 26, step_on 27, micro_size 30, crop_pct 33.

const FILE: &str = "recipes/x.yaml";

fn sets(overrides: &[&str]) -> Vec<String> {
    overrides.iter().map(|s| s.to_string()).collect()
}

fn parse(source: &str, overrides: &[&str]) -> Result<Recipe, RecipeError> {
    load_str(source, Path::new(FILE), &sets(overrides))
}

fn ok(source: &str, overrides: &[&str]) -> Recipe {
    parse(source, overrides).unwrap_or_else(|e| panic!("{e}"))
}

fn err(source: &str, overrides: &[&str]) -> String {
    match parse(source, overrides) {
        Ok(_) => panic!("expected an error for {overrides:?}"),
        Err(e) => e.to_string(),
    }
}

fn edit(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from:?} not in BASE");
    BASE.replacen(from, to, 1)
}

fn assert_starts(msg: &str, prefix: &str) {
    assert!(msg.starts_with(prefix), "\n  got: {msg}\n want: {prefix}...");
}

#[test]
fn base_is_valid_and_defaults_apply() {
    let r = ok(BASE, &[]);
    assert_eq!(r.seed, 0);
    assert_eq!(r.batch.repeated_augmentation, 1);
    assert_eq!(r.eval.every_epochs, 1);
    assert_eq!(r.runtime.log_every_steps, 50);
    let rsb_recipes::OptimizerSection::Lamb(lamb) = &r.optimizer;
    assert_eq!(lamb.max_grad_norm, Some(1.0));
}

// ---- YAML and schema errors: file, line, column, field ----

#[test]
fn unknown_key_names_line_and_section() {
    let msg = err(&edit("    lr: 8.0e-3", "    lrr: 8.0e-3"), &[]);
    assert_starts(&msg, "recipes/x.yaml:19:5: optimizer.lamb: unknown field `lrr`, expected one of `lr`, `weight_decay`");
}

#[test]
fn unknown_top_level_key() {
    let msg = err(&format!("{BASE}extra: 1\n"), &[]);
    assert_starts(&msg, "recipes/x.yaml:35:1: unknown field `extra`, expected one of `name`");
}

#[test]
fn wrong_type_names_line_column_and_field() {
    let msg = err(&edit("lr: 8.0e-3", "lr: fast"), &[]);
    assert_eq!(
        msg,
        "recipes/x.yaml:19:9: optimizer.lamb.lr: invalid type: string \"fast\", expected f64"
    );
    let msg = err(&edit("  num_classes: 10", "  num_classes: -3"), &[]);
    assert_starts(
        &msg,
        "recipes/x.yaml:4:16: model.num_classes: invalid type: integer `-3`, expected u32",
    );
    let msg = err(&edit("  scale: [0.08, 1.0]", "  scale: [0.08]"), &[]);
    assert_starts(
        &msg,
        "recipes/x.yaml:9:10: augment.scale: invalid length 1, expected an array of length 2",
    );
}

#[test]
fn missing_required_field() {
    let msg = err(&edit("    warmup_lr: 1.0e-4\n", ""), &[]);
    assert_eq!(msg, "recipes/x.yaml:23:5: schedule.cosine: missing field `warmup_lr`");
    let msg = err(&edit("name: base\n", ""), &[]);
    assert_eq!(msg, "recipes/x.yaml:1:1: missing field `name`");
}

#[test]
fn schedule_step_on_is_required_and_names_its_choices() {
    let msg = err(&edit("    step_on: update\n", ""), &[]);
    // The position is the `cosine:` key whose mapping lacks the field.
    assert_starts(
        &msg,
        "recipes/x.yaml:22:3: schedule.cosine: missing field `step_on`: choose `epoch`",
    );
    assert!(msg.contains("or `update`"), "{msg}");
    assert!(msg.contains("t_in_epochs=True"), "{msg}");
    // An override may complete the file.
    let r = ok(&edit("    step_on: update\n", ""), &["schedule.cosine.step_on=epoch"]);
    let rsb_recipes::ScheduleSection::Cosine(cosine) = &r.schedule;
    assert_eq!(cosine.step_on, rsb_recipes::StepOn::Epoch);
}

#[test]
fn schedule_step_on_refuses_other_values_with_the_choices() {
    let msg = err(&edit("step_on: update", "step_on: epochs"), &[]);
    assert_eq!(
        msg,
        "recipes/x.yaml:27:14: schedule.cosine.step_on: unknown variant `epochs`, \
         expected `epoch` or `update`"
    );
    let msg = err(BASE, &["schedule.cosine.step_on=batch"]);
    assert_starts(
        &msg,
        "--set schedule.cosine.step_on=batch: schedule.cosine.step_on: unknown variant `batch`, \
         expected `epoch` or `update`",
    );
}

#[test]
fn schedule_step_on_survives_the_resolved_yaml() {
    for step_on in ["epoch", "update"] {
        let r = ok(BASE, &[&format!("schedule.cosine.step_on={step_on}")]);
        let yaml = to_yaml(&r);
        assert!(yaml.contains(&format!("    step_on: {step_on}\n")), "{yaml}");
        assert_eq!(ok(&yaml, &[]), r);
    }
}

#[test]
fn bad_enum_variants() {
    let msg = err(&edit("  bce:", "  bcee:"), &[]);
    assert_eq!(
        msg,
        "recipes/x.yaml:15:3: loss: unknown variant `bcee`, expected `bce` or `cross_entropy`"
    );
    let msg = err(
        &edit("  input_size: 32\n  scale", "  input_size: 32\n  interpolation: cubic\n  scale"),
        &[],
    );
    assert_starts(&msg, "recipes/x.yaml:9:18: augment.interpolation: unknown variant `cubic`, expected one of `bilinear`, `bicubic`, `random`");
    let msg = err(&edit("  lamb:", "  sgd:"), &[]);
    assert_starts(&msg, "recipes/x.yaml:18:3: optimizer: unknown variant `sgd`, expected `lamb`");
}

#[test]
fn yaml_syntax_error() {
    let msg = err(&edit("  scale: [0.08, 1.0]", "  scale: [0.08, 1.0"), &[]);
    assert_starts(&msg, "recipes/x.yaml:");
    assert!(msg.contains("invalid YAML"), "{msg}");
    let e = parse(&edit("  scale: [0.08, 1.0]", "  scale: [0.08, 1.0"), &[]).unwrap_err();
    assert!(matches!(e, RecipeError::Yaml { location: Some(_), .. }), "{e:?}");
}

#[test]
fn missing_file_is_an_io_error() {
    let e = load(Path::new("/nonexistent/recipe.yaml"), &[]).unwrap_err();
    assert!(matches!(e, RecipeError::Io { .. }));
    assert_starts(&e.to_string(), "/nonexistent/recipe.yaml: cannot read recipe: ");
}

#[test]
fn load_reports_the_real_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, edit("    lr: 8.0e-3", "    lrr: 8.0e-3")).unwrap();
    let msg = load(&path, &[]).unwrap_err().to_string();
    assert_starts(&msg, &format!("{}:19:5: optimizer.lamb: unknown field `lrr`", path.display()));
}

// ---- overrides ----

#[test]
fn overrides_set_scalars_strings_null_and_lists() {
    let r = ok(
        BASE,
        &[
            "optimizer.lamb.lr=0.004",
            "model.name=resnet50",
            "augment.rand_augment=null",
            "data.root=/x",
            "augment.scale=[0.35,1.0]",
            "seed=7",
        ],
    );
    let rsb_recipes::OptimizerSection::Lamb(lamb) = &r.optimizer;
    assert_eq!(lamb.lr, 0.004);
    assert_eq!(r.model.name, "resnet50");
    assert_eq!(r.augment.rand_augment, None);
    assert_eq!(r.data.root, "/x");
    assert_eq!(r.augment.scale, [0.35, 1.0]);
    assert_eq!(r.seed, 7);
}

#[test]
fn overrides_apply_in_order_and_replace_whole_sections() {
    let r = ok(BASE, &["optimizer.lamb.lr=0.1", "optimizer.lamb.lr=0.2"]);
    let rsb_recipes::OptimizerSection::Lamb(lamb) = &r.optimizer;
    assert_eq!(lamb.lr, 0.2);
    let r = ok(BASE, &["loss={cross_entropy: {smoothing: 0.1}}"]);
    assert!(
        matches!(r.loss, rsb_recipes::LossSection::CrossEntropy(ref ce) if ce.smoothing == 0.1)
    );
    let r = ok(BASE, &["mixup=null"]);
    assert!(r.mixup.is_none());
}

#[test]
fn override_creates_an_absent_section() {
    let without = edit("mixup:\n  mixup_alpha: 0.1\n  cutmix_alpha: 1.0\n", "");
    assert!(ok(&without, &[]).mixup.is_none());
    let r = ok(&without, &["mixup.mixup_alpha=0.2", "mixup.cutmix_alpha=1.0", "mixup.prob=0.5"]);
    let mixup = r.mixup.expect("mixup created");
    assert_eq!((mixup.mixup_alpha, mixup.cutmix_alpha, mixup.prob), (0.2, 1.0, 0.5));
    // Runtime is absent from BASE too.
    assert_eq!(ok(BASE, &["runtime.log_every_steps=5"]).runtime.log_every_steps, 5);
    // A half-created section is blamed on the override that created it.
    let msg = err(&without, &["seed=1", "mixup.mixup_alpha=0.2"]);
    assert_eq!(msg, "--set mixup.mixup_alpha=0.2: mixup: missing field `cutmix_alpha`");
}

#[test]
fn overrides_may_complete_a_file() {
    let without_root = edit("  root: data/x\n", "  train_split: train\n");
    let msg = err(&without_root, &[]);
    assert_eq!(msg, "recipes/x.yaml:6:3: data: missing field `root`");
    assert_eq!(ok(&without_root, &["data.root=/mnt/x"]).data.root, "/mnt/x");
}

#[test]
fn bad_override_syntax() {
    let msg = err(BASE, &["foo"]);
    assert_eq!(
        msg,
        "--set foo: expected `key=value` (e.g. `optimizer.lamb.lr=0.004`), found no `=`"
    );
    assert!(matches!(parse(BASE, &["foo"]), Err(RecipeError::OverrideSyntax { .. })));
    assert_starts(&err(BASE, &["=3"]), "--set =3: the key before `=` is empty");
    assert_starts(
        &err(BASE, &["model..name=x"]),
        "--set model..name=x: the key `model..name` has an empty segment",
    );
    assert_starts(
        &err(BASE, &["augment.scale=[0.1, 1"]),
        "--set augment.scale=[0.1, 1: the value `[0.1, 1` is not a YAML scalar or flow value",
    );
}

#[test]
fn override_into_a_scalar_names_the_key() {
    let msg = err(BASE, &["model.name.depth=50"]);
    assert_eq!(
        msg,
        "--set model.name.depth=50: cannot set `model.name.depth`: `model.name` is a string, not a mapping"
    );
    // Elements are addressed by index; past the end is an error naming the range.
    let msg = err(BASE, &["augment.scale.2=0.5"]);
    assert_eq!(
        msg,
        "--set augment.scale.2=0.5: cannot set `augment.scale.2`: `augment.scale` is a sequence \
         without an element `2` (indices 0..2)",
    );
}

#[test]
fn schema_errors_from_overrides_name_the_override() {
    let msg = err(BASE, &["seed=3", "optimizer.lamb.lr=abc", "model.name=resnet50"]);
    assert_eq!(msg, "--set optimizer.lamb.lr=abc: optimizer.lamb.lr: invalid type: string \"abc\", expected f64");
    let msg = err(BASE, &["optimizer.lamb.lrr=1"]);
    assert_starts(
        &msg,
        "--set optimizer.lamb.lrr=1: optimizer.lamb: unknown field `lrr`, expected one of",
    );
    let msg = err(BASE, &["augment.interpolation=cubic"]);
    assert_starts(
        &msg,
        "--set augment.interpolation=cubic: augment.interpolation: unknown variant `cubic`",
    );
    let msg = err(BASE, &["augment.scale=[0.35]"]);
    assert_starts(&msg, "--set augment.scale=[0.35]: augment.scale: invalid length 1");
}

#[test]
fn file_errors_keep_their_line_despite_unrelated_overrides() {
    let msg = err(&edit("    lr: 8.0e-3", "    lrr: 8.0e-3"), &["seed=1", "data.root=/x"]);
    assert_starts(&msg, "recipes/x.yaml:19:5: optimizer.lamb: unknown field `lrr`");
}

// ---- validation: one case per rule ----

/// `--set` the value, expect the error to name the field and the override.
fn assert_invalid_set(set: &str, field: &str, needle: &str) {
    let e = parse(BASE, &[set]).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(&e, RecipeError::Invalid { origin: Origin::Override { .. }, .. }), "{msg}");
    assert_starts(&msg, &format!("--set {set}: {field}: "));
    assert!(msg.contains(needle), "{msg} lacks {needle:?}");
}

#[test]
fn each_validation_rule_names_its_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("name=''", "name", "must not be empty"),
        ("model.name=''", "model.name", "must not be empty"),
        ("model.num_classes=0", "model.num_classes", "at least 1, got 0"),
        ("model.drop_path_rate=1.0", "model.drop_path_rate", "in [0, 1), got 1"),
        ("model.drop_path_rate=-0.1", "model.drop_path_rate", "in [0, 1)"),
        ("data.root=''", "data.root", "must not be empty"),
        ("data.train_split=''", "data.train_split", "must not be empty"),
        ("data.mean=[0.5, 1.5, 0.5]", "data.mean", "channel 1 must be in [0, 1], got 1.5"),
        ("data.std=[0.2, 0.2, 0]", "data.std", "channel 2 must be in (0, 1], got 0"),
        ("augment.input_size=0", "augment.input_size", "at least 1"),
        ("augment.scale=[0.9, 0.5]", "augment.scale", "0 < low <= high <= 1, got [0.9, 0.5]"),
        ("augment.scale=[0, 1]", "augment.scale", "0 < low"),
        ("augment.scale=[0.5, 1.5]", "augment.scale", "<= 1"),
        ("augment.ratio=[1.33, 0.75]", "augment.ratio", "0 < low <= high, got [1.33, 0.75]"),
        ("augment.ratio=[-1, 2]", "augment.ratio", "0 < low"),
        ("augment.hflip=1.5", "augment.hflip", "probability in [0, 1], got 1.5"),
        ("data.loader_threads=5000", "data.loader_threads", "between 0 (the default) and 4096"),
        ("runtime.torch_threads=3000000000", "runtime.torch_threads", "got 3000000000"),
        ("augment.rand_augment=m9-mstd0.5", "augment.rand_augment", "must start with 'rand'"),
        // What timm refuses is refused at load, naming the section, not at
        // every rank's start.
        ("augment.rand_augment=rand-m9-w0", "augment.rand_augment", "section \"w0\""),
        ("augment.rand_augment=rand-m7.5", "augment.rand_augment", "invalid value in"),
        ("augment.rand_augment=rand-m9-tweights", "augment.rand_augment", "not supported"),
        (
            "augment.rand_augment=random-m9",
            "augment.rand_augment",
            "config \"random-m9\" must start with 'rand'",
        ),
        ("mixup.mixup_alpha=-1", "mixup.mixup_alpha", ">= 0, got -1"),
        ("mixup.cutmix_alpha=-0.5", "mixup.cutmix_alpha", ">= 0"),
        (
            "mixup={mixup_alpha: 0, cutmix_alpha: 0}",
            "mixup.mixup_alpha",
            "so is mixup.cutmix_alpha",
        ),
        ("mixup.prob=2", "mixup.prob", "probability in [0, 1], got 2"),
        ("mixup.switch_prob=-0.1", "mixup.switch_prob", "probability"),
        ("mixup.label_smoothing=1", "mixup.label_smoothing", "in [0, 1), got 1"),
        ("loss.bce.target_threshold=1.2", "loss.bce.target_threshold", "probability in [0, 1]"),
        ("loss.bce.smoothing=1", "loss.bce.smoothing", "in [0, 1)"),
        ("loss={cross_entropy: {smoothing: -0.1}}", "loss.cross_entropy.smoothing", "in [0, 1)"),
        ("optimizer.lamb.lr=0", "optimizer.lamb.lr", "> 0, got 0"),
        ("optimizer.lamb.lr=.nan", "optimizer.lamb.lr", "> 0, got NaN"),
        ("optimizer.lamb.weight_decay=-0.01", "optimizer.lamb.weight_decay", ">= 0, got -0.01"),
        (
            "optimizer.lamb.betas=[0.9, 1.0]",
            "optimizer.lamb.betas",
            "beta2 must be in [0, 1), got 1",
        ),
        ("optimizer.lamb.eps=0", "optimizer.lamb.eps", "> 0"),
        ("optimizer.lamb.max_grad_norm=0", "optimizer.lamb.max_grad_norm", "> 0"),
        ("schedule.cosine.epochs=0", "schedule.cosine.epochs", "at least 1"),
        (
            "schedule.cosine.warmup_epochs=8",
            "schedule.cosine.warmup_epochs",
            "less than schedule.cosine.epochs (8), got 8",
        ),
        ("schedule.cosine.warmup_epochs=-1", "schedule.cosine.warmup_epochs", ">= 0"),
        ("schedule.cosine.warmup_lr=-1", "schedule.cosine.warmup_lr", ">= 0"),
        (
            "schedule.cosine.min_lr=0.01",
            "schedule.cosine.min_lr",
            "must be <= optimizer.lamb.lr (0.008), got 0.01",
        ),
        ("batch.global_size=0", "batch.global_size", "at least 1"),
        ("batch.micro_size=0", "batch.micro_size", "at least 1"),
        (
            "batch.micro_size=48",
            "batch.micro_size",
            "must divide batch.global_size (128), got 48 (remainder 32)",
        ),
        ("batch.repeated_augmentation=0", "batch.repeated_augmentation", "at least 1"),
        ("eval.input_size=0", "eval.input_size", "at least 1"),
        ("eval.crop_pct=0", "eval.crop_pct", "in (0, 1], got 0"),
        ("eval.crop_pct=1.05", "eval.crop_pct", "in (0, 1], got 1.05"),
        ("eval.batch_size=0", "eval.batch_size", "at least 1"),
        ("eval.every_epochs=0", "eval.every_epochs", "at least 1"),
        ("runtime.log_every_steps=0", "runtime.log_every_steps", "at least 1"),
        // Sizes that could only abort, panic, hang or (the epochs' u32 sum
        // wrapping around) train nothing.
        ("model.num_classes=4000000000", "model.num_classes", "at most 1000000, got"),
        ("augment.input_size=100000", "augment.input_size", "at most 4096, got 100000"),
        ("eval.input_size=5000", "eval.input_size", "at most 4096, got 5000"),
        ("eval.batch_size=100000", "eval.batch_size", "at most 65536, got 100000"),
        ("batch.micro_size=131072", "batch.micro_size", "at most 65536, got 131072"),
        ("batch.global_size=4194304", "batch.global_size", "at most 1048576, got 4194304"),
        ("schedule.cosine.epochs=4294967295", "schedule.cosine.epochs", "at most 9999"),
        (
            "schedule.cosine.cooldown_epochs=4294967295",
            "schedule.cosine.cooldown_epochs",
            "at most 9999, got 4294967295",
        ),
        // More epochs than checkpoint folders number with four digits
        // (`epoch-10000` would sort before `epoch-9999`).
        ("schedule.cosine.epochs=10000", "schedule.cosine.epochs", "at most 9999, got 10000"),
        (
            "schedule.cosine.cooldown_epochs=9992",
            "schedule.cosine.cooldown_epochs",
            "schedule.cosine.epochs + cooldown_epochs (the epochs a run trains) must be at most \
             9999, checkpoint folders number epochs with four digits; got 8 + 9992 = 10000",
        ),
        (
            "augment.rand_augment=rand-m7-n1000000000",
            "augment.rand_augment",
            "`n1000000000`: at most 100 operations per image",
        ),
    ];
    for (set, field, needle) in cases {
        assert_invalid_set(set, field, needle);
    }
    // Boundaries that are allowed.
    for set in [
        "augment.rand_augment=rand",
        "augment.scale=[1.0, 1.0]",
        "eval.crop_pct=1.0",
        "mixup.prob=0",
        "loss.bce.target_threshold=null",
        "optimizer.lamb.max_grad_norm=null",
        "optimizer.lamb.weight_decay=0",
        "schedule.cosine.warmup_epochs=0",
        "schedule.cosine.min_lr=0.008",
        "mixup.mixup_alpha=0",
        "model.num_classes=1000000",
        "augment.rand_augment=rand-m9-n100",
        "schedule.cosine.cooldown_epochs=9991",
    ] {
        ok(BASE, &[set]);
    }
}

/// An eval set addressed by its name is blamed as one addressed by its
/// index: the `--set`, not the file's line (validation names the set by
/// index); and removing a set blames nothing about the sets after it.
#[test]
fn a_set_that_addresses_an_eval_set_by_name_is_blamed_for_its_errors() {
    let source = format!(
        "{BASE}  sets:\n    - name: real\n      kind: real\n      root: val\n      labels: r.json\n    \
         - name: v2\n      kind: v2\n      root: v2\n    - name: extra\n      kind: v2\n      \
         root: x\n"
    );
    ok(&source, &[]);
    for set in ["eval.sets.real.name=val", "eval.sets.0.name=val"] {
        let msg = err(&source, &[set]);
        assert_starts(&msg, &format!("--set {set}: eval.sets.0.name: `val` is the validation"));
    }
    let msg = err(&source, &["eval.sets.v2.root=''"]);
    assert_starts(&msg, "--set eval.sets.v2.root='': eval.sets.1.root: must not be empty");
    // After `v2` is removed, `extra` is eval.sets.1: its own error is the
    // file's.
    let broken = source.replace("root: x", "root: ''");
    let extra_root = broken.lines().position(|l| l.contains("root: ''")).unwrap() + 1;
    for removal in ["eval.sets.v2=null", "eval.sets.1=null"] {
        let msg = err(&broken, &[removal]);
        let at = format!("recipes/x.yaml:{extra_root}:7: eval.sets.1.root: must not be empty");
        assert_starts(&msg, &at);
    }
    // Two removals before it: two places down.
    let msg = err(&broken, &["eval.sets.v2=null", "eval.sets.0=null"]);
    assert_starts(&msg, &format!("recipes/x.yaml:{extra_root}:7: eval.sets.0.root"));
    // A clash of names a --set made is blamed on it (the field is the
    // later set's, the --set wrote the earlier one's).
    let msg = err(&source, &["eval.sets.real.name=v2"]);
    assert_starts(&msg, "--set eval.sets.real.name=v2: eval.sets.1.name: `v2` is already");
    // A set named, then moved down by a later removal: still blamed, not
    // the line of the set removed.
    for removal in ["eval.sets.real=null", "eval.sets.0=null"] {
        let msg = err(&source, &["eval.sets.v2.root=''", removal]);
        assert_starts(&msg, "--set eval.sets.v2.root='': eval.sets.0.root: must not be empty");
    }
}

/// A key given twice in one mapping is reported at its second place, with
/// its path, not at the mapping's line.
#[test]
fn a_duplicate_key_is_named_at_its_own_line() {
    let msg = err(&edit("    weight_decay: 0.02", "    weight_decay: 0.02\n    lr: 0.1"), &[]);
    assert_eq!(
        msg,
        "recipes/x.yaml:21:5: invalid YAML: optimizer.lamb.lr: given twice in one mapping \
         (first at line 19)"
    );
    // Keys the finder would take for the same (1 and "1") while the parser
    // names another: the parser's message is kept.
    let msg = err(&format!("{BASE}extra: {{1: x, \"1\": y, b: 1, b: 2}}\n"), &[]);
    assert!(msg.contains("duplicate entry with key \"b\""), "{msg}");
    let msg = err(&format!("{BASE}name: again\n"), &[]);
    assert_eq!(
        msg,
        "recipes/x.yaml:35:1: invalid YAML: name: given twice in one mapping (first at line 1)"
    );
}

#[test]
fn validation_errors_from_the_file_name_the_line() {
    let msg = err(&edit("  micro_size: 64", "  micro_size: 48"), &[]);
    assert_eq!(msg, "recipes/x.yaml:30:3: batch.micro_size: must divide batch.global_size (128), got 48 (remainder 32)");
    let msg = err(&edit("    lr: 8.0e-3", "    lr: -1"), &[]);
    assert_eq!(msg, "recipes/x.yaml:19:5: optimizer.lamb.lr: must be a finite number > 0, got -1");
    let msg = err(&edit("  crop_pct: 0.95", "  crop_pct: 1.5"), &[]);
    assert_eq!(msg, "recipes/x.yaml:33:3: eval.crop_pct: must be in (0, 1], got 1.5");
    let msg = err(&edit("    min_lr: 1.0e-6", "    min_lr: 1.0"), &[]);
    assert_starts(
        &msg,
        "recipes/x.yaml:26:5: schedule.cosine.min_lr: must be <= optimizer.lamb.lr",
    );
}

#[test]
fn cross_field_violations_blame_the_override_that_changed_either_field() {
    // micro_size (64) stays valid; the override of global_size breaks the rule.
    let msg = err(BASE, &["batch.global_size=100"]);
    assert_eq!(msg, "--set batch.global_size=100: batch.micro_size: must divide batch.global_size (100), got 64 (remainder 36)");
    let msg = err(BASE, &["optimizer.lamb.lr=1e-7"]);
    assert_starts(
        &msg,
        "--set optimizer.lamb.lr=1e-7: schedule.cosine.min_lr: must be <= optimizer.lamb.lr",
    );
    let no_mixup_alpha = edit("  mixup_alpha: 0.1", "  mixup_alpha: 0.0");
    let msg = err(&no_mixup_alpha, &["mixup.cutmix_alpha=0"]);
    assert_eq!(
        msg,
        "--set mixup.cutmix_alpha=0: mixup.mixup_alpha: is 0 and so is mixup.cutmix_alpha; \
         to turn Mixup/CutMix off, remove the `mixup` section (or set `mixup: null`)"
    );
    // Not blamed on an override of an unrelated field of the same section.
    let both_zero = no_mixup_alpha.replace("  cutmix_alpha: 1.0", "  cutmix_alpha: 0.0");
    let msg = err(&both_zero, &["mixup.prob=0.5"]);
    assert_starts(&msg, "recipes/x.yaml:12:3: mixup.mixup_alpha: is 0 and so is");
    let msg = err(BASE, &["schedule.cosine.epochs=1"]);
    assert_starts(
        &msg,
        "--set schedule.cosine.epochs=1: schedule.cosine.warmup_epochs: must be less than",
    );
    // The epochs of a run, cooldown included, are capped together: an
    // override of either field that passes the cap is blamed.
    let long_cooldown =
        edit("    step_on: update", "    step_on: update\n    cooldown_epochs: 9000");
    ok(&long_cooldown, &[]);
    let msg = err(&long_cooldown, &["schedule.cosine.epochs=1000"]);
    assert_eq!(
        msg,
        "--set schedule.cosine.epochs=1000: schedule.cosine.cooldown_epochs: \
         schedule.cosine.epochs + cooldown_epochs (the epochs a run trains) must be at most \
         9999, checkpoint folders number epochs with four digits; got 1000 + 9000 = 10000"
    );
    ok(&long_cooldown, &["schedule.cosine.epochs=999"]);
}

#[test]
fn validate_alone_has_no_origin() {
    let mut r = ok(BASE, &[]);
    r.batch.micro_size = 0;
    let e = validate(&r).unwrap_err();
    assert!(
        matches!(&e, RecipeError::Invalid { origin: Origin::Unknown, field, .. } if field == "batch.micro_size")
    );
    assert_eq!(e.to_string(), "batch.micro_size: must be at least 1, got 0");
}

// ---- resolved YAML ----

#[test]
fn to_yaml_round_trips_and_writes_enums_as_mappings() {
    let r =
        ok(BASE, &["mixup=null", "optimizer.lamb.max_grad_norm=null", "augment.rand_augment=null"]);
    let yaml = to_yaml(&r);
    assert!(yaml.contains("optimizer:\n  lamb:\n    lr: 0.008"), "{yaml}");
    assert!(yaml.contains("loss:\n  bce:\n"), "{yaml}");
    assert!(yaml.contains("schedule:\n  cosine:\n"), "{yaml}");
    assert!(!yaml.contains('!'), "no YAML tags: {yaml}");
    assert_eq!(ok(&yaml, &[]), r);
    let full = ok(BASE, &[]);
    assert_eq!(ok(&to_yaml(&full), &[]), full);
}
