//! Range and consistency checks that the type system cannot express.
//!
//! [`validate`] returns the first violation in file order, naming the field by
//! its dotted path (`schedule.cosine.min_lr`). [`crate::load`] adds where the
//! value came from (file line or `--set`). Every float check also rejects NaN
//! and infinities.

use crate::error::{Origin, RecipeError};
use crate::schema::{EvalSetKind, LossSection, OptimizerSection, Recipe, ScheduleSection};

/// A failed check, before its origin is known.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Violation {
    /// Dotted path of the field the message is about.
    pub field: String,
    /// Another field whose value takes part in the check (cross-field rules),
    /// used to blame a `--set` that changed it.
    pub related: Option<String>,
    /// What is wrong, with the value found.
    pub message: String,
}

impl Violation {
    /// The public error, with `origin` attached.
    pub fn into_error(self, origin: Origin) -> RecipeError {
        RecipeError::Invalid { origin, field: self.field, message: self.message }
    }
}

/// Checks every value of `recipe` against its allowed range and the
/// cross-field rules (`micro_size` divides `global_size`, `warmup_epochs <
/// epochs`, `min_lr <= lr`, ...). The error names the field.
pub fn validate(recipe: &Recipe) -> Result<(), RecipeError> {
    check(recipe).map_err(|v| v.into_error(Origin::Unknown))
}

type Check = Result<(), Violation>;

/// Longest collective timeout a recipe may ask for: a week.
const MAX_COLLECTIVE_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// Most threads a recipe may ask for (`data.loader_threads`,
/// `runtime.torch_threads`): more than any host has cores.
pub const MAX_THREADS: u32 = 4096;
/// The largest fabric probe, in MiB (`distributed.fabric_probe_mib`).
const MAX_FABRIC_PROBE_MIB: u32 = 1024;
/// Most classes a model may have (ImageNet-21k has 21,843): far more would
/// only fail to allocate the classifier, with an abort instead of an error.
pub const MAX_CLASSES: u32 = 1_000_000;
/// Largest training or evaluation image side, in pixels.
const MAX_INPUT_SIZE: u32 = 4096;
/// Largest shorter side the evaluation resize may make,
/// `floor(eval.input_size / eval.crop_pct)`: the largest at which an image
/// of up to [`MAX_EVAL_ASPECT`] stays within the loader's pixel limit
/// (`rsb_data::decode::MAX_PIXELS`, Pillow's decompression-bomb threshold),
/// which refuses each resized image past it.
pub const MAX_EVAL_RESIZE_SIDE: u32 = 9_459;
/// The widest aspect ratio (longer side over shorter) that
/// [`MAX_EVAL_RESIZE_SIDE`] keeps resizable: photos are 4:3 or 3:2.
pub const MAX_EVAL_ASPECT: u32 = 2;
/// Most evaluation sets (`eval.sets`) a recipe may list: the most an epoch
/// record may carry to the coordinator.
pub const MAX_EVAL_SETS: usize = 64;
/// Longest evaluation-set name, in bytes: the longest name the coordinator
/// accepts in an epoch record.
pub const MAX_EVAL_SET_NAME_LEN: usize = 255;
/// Most finished batches the loader may hold ready (`data.prefetch_batches`):
/// each is a whole micro-batch of pixels.
const MAX_PREFETCH_BATCHES: u32 = 1024;
/// Most images in one micro-batch, or in one evaluation batch.
const MAX_BATCH_IMAGES: u32 = 65_536;
/// Most images in one update (LARS/LAMB large-batch studies reach 64k).
const MAX_GLOBAL_BATCH: u32 = 1 << 20;
/// Most epochs a run may train, cooldown included (RSB A1 trains 600):
/// checkpoint folders number the epochs done with four digits
/// (`checkpoints/epoch-9999`), and tools that sort them by name would put
/// an `epoch-10000` before it, resuming or pruning the wrong checkpoint.
pub const MAX_EPOCHS: u32 = 9_999;
/// Most RandAugment operations per image (RSB uses 2).
const MAX_RAND_AUGMENT_OPS: usize = 100;

fn fail(field: &str, message: String) -> Check {
    Err(Violation { field: field.to_owned(), related: None, message })
}

fn fail_with(field: &str, related: &str, message: String) -> Check {
    Err(Violation { field: field.to_owned(), related: Some(related.to_owned()), message })
}

/// Why a centre crop of `input_size` keeping `crop_pct` (in (0, 1]) of the
/// resized image cannot evaluate photos: its resize side
/// `floor(input_size / crop_pct)` is past [`MAX_EVAL_RESIZE_SIDE`]. `None`
/// when it can.
pub fn eval_resize_problem(input_size: u32, crop_pct: f64) -> Option<String> {
    let resize_side = (f64::from(input_size) / crop_pct).floor();
    (resize_side > f64::from(MAX_EVAL_RESIZE_SIDE)).then(|| {
        format!(
            "{} resizes the shorter side of every image to {} px (floor(input size {} / crop \
             share)), past {MAX_EVAL_RESIZE_SIDE} px, where an image of {MAX_EVAL_ASPECT}:1 or \
             wider exceeds the loader's pixel limit and is skipped (a photo is 4:3 or 3:2): use \
             a crop share of at least {:.4}",
            readable(crop_pct),
            readable(resize_side),
            input_size,
            smallest_crop_pct(input_size)
        )
    })
}

/// The smallest `eval.crop_pct` of 4 decimals whose resize of an
/// `input_size` crop stays within [`MAX_EVAL_RESIZE_SIDE`].
fn smallest_crop_pct(input_size: u32) -> f64 {
    let bound = f64::from(input_size) / f64::from(MAX_EVAL_RESIZE_SIDE + 1);
    ((bound * 1e4).floor() + 1.0) / 1e4
}

/// `x` as text of a readable length, whatever its magnitude (`1e-300`).
fn readable(x: f64) -> String {
    if x != 0.0 && !(1e-4..1e9).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

fn non_empty(field: &str, v: &str) -> Check {
    if v.trim().is_empty() {
        return fail(field, "must not be empty".into());
    }
    Ok(())
}

fn at_least_one(field: &str, v: u32) -> Check {
    if v == 0 {
        return fail(field, "must be at least 1, got 0".into());
    }
    Ok(())
}

/// In `1..=max`: a size past `max` could only fail to allocate, or run
/// for ever.
fn between_one_and(field: &str, v: u32, max: u32) -> Check {
    at_least_one(field, v)?;
    if v > max {
        return fail(field, format!("must be at most {max}, got {v}"));
    }
    Ok(())
}

fn positive(field: &str, v: f64) -> Check {
    if !(v.is_finite() && v > 0.0) {
        return fail(field, format!("must be a finite number > 0, got {v}"));
    }
    Ok(())
}

fn non_negative(field: &str, v: f64) -> Check {
    if !(v.is_finite() && v >= 0.0) {
        return fail(field, format!("must be a finite number >= 0, got {v}"));
    }
    Ok(())
}

/// In `[0, 1]` (a probability).
fn probability(field: &str, v: f64) -> Check {
    if !(0.0..=1.0).contains(&v) {
        return fail(field, format!("must be a probability in [0, 1], got {v}"));
    }
    Ok(())
}

/// In `[0, 1)`.
fn unit_open(field: &str, v: f64) -> Check {
    if !(0.0..1.0).contains(&v) {
        return fail(field, format!("must be in [0, 1), got {v}"));
    }
    Ok(())
}

/// A `[low, high]` range with `0 < low <= high` (and `high <= max` if given).
fn ordered_range(field: &str, [low, high]: [f64; 2], max: Option<f64>) -> Check {
    let ok = low.is_finite() && high.is_finite() && low > 0.0 && low <= high;
    let under_max = max.is_none_or(|max| high <= max);
    if !(ok && under_max) {
        let bound = match max {
            Some(max) => format!(" <= {max}"),
            None => String::new(),
        };
        return fail(
            field,
            format!("must be [low, high] with 0 < low <= high{bound}, got [{low}, {high}]"),
        );
    }
    Ok(())
}

fn kind_name(kind: EvalSetKind) -> &'static str {
    match kind {
        EvalSetKind::Folder => "folder",
        EvalSetKind::V2 => "v2",
        EvalSetKind::Labelled => "labelled",
        EvalSetKind::Real => "real",
    }
}

/// All the checks, in file order; the first failure wins.
pub(crate) fn check(r: &Recipe) -> Check {
    non_empty("name", &r.name)?;

    let m = &r.model;
    non_empty("model.name", &m.name)?;
    between_one_and("model.num_classes", m.num_classes, MAX_CLASSES)?;
    unit_open("model.drop_path_rate", m.drop_path_rate)?;

    let d = &r.data;
    non_empty("data.root", &d.root)?;
    non_empty("data.train_split", &d.train_split)?;
    non_empty("data.val_split", &d.val_split)?;
    for (i, &mean) in d.mean.iter().enumerate() {
        if !(0.0..=1.0).contains(&mean) {
            return fail("data.mean", format!("channel {i} must be in [0, 1], got {mean}"));
        }
    }
    for (i, &std) in d.std.iter().enumerate() {
        if !(std.is_finite() && std > 0.0 && std <= 1.0) {
            return fail("data.std", format!("channel {i} must be in (0, 1], got {std}"));
        }
    }

    let a = &r.augment;
    between_one_and("augment.input_size", a.input_size, MAX_INPUT_SIZE)?;
    ordered_range("augment.scale", a.scale, Some(1.0))?;
    ordered_range("augment.ratio", a.ratio, None)?;
    probability("augment.hflip", a.hflip)?;
    if let Some(ra) = &a.rand_augment {
        match crate::rand_augment::RandAugmentConfig::parse(ra) {
            Err(e) => {
                return fail(
                    "augment.rand_augment",
                    format!(
                        "must be a timm RandAugment string (e.g. `rand-m7-mstd0.5-inc1`): {e}; \
                         use null to turn it off"
                    ),
                );
            }
            Ok(config) if config.num_layers > MAX_RAND_AUGMENT_OPS => {
                return fail(
                    "augment.rand_augment",
                    format!(
                        "`n{}`: at most {MAX_RAND_AUGMENT_OPS} operations per image",
                        config.num_layers
                    ),
                );
            }
            Ok(_) => {}
        }
    }

    if let Some(x) = &r.mixup {
        non_negative("mixup.mixup_alpha", x.mixup_alpha)?;
        non_negative("mixup.cutmix_alpha", x.cutmix_alpha)?;
        if x.mixup_alpha == 0.0 && x.cutmix_alpha == 0.0 {
            return fail_with(
                "mixup.mixup_alpha",
                "mixup.cutmix_alpha",
                "is 0 and so is mixup.cutmix_alpha; to turn Mixup/CutMix off, \
                 remove the `mixup` section (or set `mixup: null`)"
                    .into(),
            );
        }
        probability("mixup.prob", x.prob)?;
        probability("mixup.switch_prob", x.switch_prob)?;
        unit_open("mixup.label_smoothing", x.label_smoothing)?;
    }

    match &r.loss {
        LossSection::Bce(bce) => {
            if let Some(t) = bce.target_threshold {
                probability("loss.bce.target_threshold", t)?;
            }
            unit_open("loss.bce.smoothing", bce.smoothing)?;
        }
        LossSection::CrossEntropy(ce) => unit_open("loss.cross_entropy.smoothing", ce.smoothing)?,
    }

    let lr = match &r.optimizer {
        OptimizerSection::Lamb(o) => {
            positive("optimizer.lamb.lr", o.lr)?;
            non_negative("optimizer.lamb.weight_decay", o.weight_decay)?;
            for (i, &beta) in o.betas.iter().enumerate() {
                if !(0.0..1.0).contains(&beta) {
                    return fail(
                        "optimizer.lamb.betas",
                        format!("beta{} must be in [0, 1), got {beta}", i + 1),
                    );
                }
            }
            positive("optimizer.lamb.eps", o.eps)?;
            if let Some(norm) = o.max_grad_norm {
                positive("optimizer.lamb.max_grad_norm", norm)?;
            }
            ("optimizer.lamb.lr", o.lr)
        }
    };

    match &r.schedule {
        ScheduleSection::Cosine(s) => {
            between_one_and("schedule.cosine.epochs", s.epochs, MAX_EPOCHS)?;
            if s.cooldown_epochs > MAX_EPOCHS {
                return fail(
                    "schedule.cosine.cooldown_epochs",
                    format!("must be at most {MAX_EPOCHS}, got {}", s.cooldown_epochs),
                );
            }
            let total = u64::from(s.epochs) + u64::from(s.cooldown_epochs);
            if total > u64::from(MAX_EPOCHS) {
                return fail_with(
                    "schedule.cosine.cooldown_epochs",
                    "schedule.cosine.epochs",
                    format!(
                        "schedule.cosine.epochs + cooldown_epochs (the epochs a run trains) \
                         must be at most {MAX_EPOCHS}, checkpoint folders number epochs with \
                         four digits; got {} + {} = {total}",
                        s.epochs, s.cooldown_epochs
                    ),
                );
            }
            non_negative("schedule.cosine.warmup_epochs", s.warmup_epochs)?;
            if s.warmup_epochs >= f64::from(s.epochs) {
                return fail_with(
                    "schedule.cosine.warmup_epochs",
                    "schedule.cosine.epochs",
                    format!(
                        "must be less than schedule.cosine.epochs ({}), got {}",
                        s.epochs, s.warmup_epochs
                    ),
                );
            }
            non_negative("schedule.cosine.warmup_lr", s.warmup_lr)?;
            non_negative("schedule.cosine.min_lr", s.min_lr)?;
            if s.min_lr > lr.1 {
                return fail_with(
                    "schedule.cosine.min_lr",
                    lr.0,
                    format!("must be <= {} ({}), got {}", lr.0, lr.1, s.min_lr),
                );
            }
        }
    }

    let b = &r.batch;
    between_one_and("batch.global_size", b.global_size, MAX_GLOBAL_BATCH)?;
    between_one_and("batch.micro_size", b.micro_size, MAX_BATCH_IMAGES)?;
    let remainder = b.global_size % b.micro_size;
    if remainder != 0 {
        return fail_with(
            "batch.micro_size",
            "batch.global_size",
            format!(
                "must divide batch.global_size ({}), got {} (remainder {remainder})",
                b.global_size, b.micro_size
            ),
        );
    }
    at_least_one("batch.repeated_augmentation", b.repeated_augmentation)?;

    let e = &r.eval;
    between_one_and("eval.input_size", e.input_size, MAX_INPUT_SIZE)?;
    if !(e.crop_pct > 0.0 && e.crop_pct <= 1.0) {
        return fail("eval.crop_pct", format!("must be in (0, 1], got {}", e.crop_pct));
    }
    if let Some(problem) = eval_resize_problem(e.input_size, e.crop_pct) {
        return fail_with("eval.crop_pct", "eval.input_size", problem);
    }
    between_one_and("eval.batch_size", e.batch_size, MAX_BATCH_IMAGES)?;
    at_least_one("eval.every_epochs", e.every_epochs)?;
    if e.sets.len() > MAX_EVAL_SETS {
        return fail(
            "eval.sets",
            format!("lists {} sets; at most {MAX_EVAL_SETS} are accepted", e.sets.len()),
        );
    }
    for (i, set) in e.sets.iter().enumerate() {
        let field = |key: &str| format!("eval.sets.{i}.{key}");
        non_empty(&field("name"), &set.name)?;
        if set.name.len() > MAX_EVAL_SET_NAME_LEN {
            return fail(
                &field("name"),
                format!(
                    "is {} bytes long; at most {MAX_EVAL_SET_NAME_LEN} are accepted (it names \
                     the set in every epoch record)",
                    set.name.len()
                ),
            );
        }
        if set.name.chars().any(char::is_control) {
            return fail(&field("name"), "holds a control character".into());
        }
        if set.name == "val" {
            return fail(
                &field("name"),
                "`val` is the validation split's name in the metrics; choose another".into(),
            );
        }
        if let Some(j) = e.sets[..i].iter().position(|o| o.name == set.name) {
            return fail_with(
                &field("name"),
                &format!("eval.sets.{j}.name"),
                format!("`{}` is already the name of eval.sets.{j}", set.name),
            );
        }
        non_empty(&field("root"), &set.root)?;
        match (set.kind, &set.labels) {
            (EvalSetKind::Labelled | EvalSetKind::Real, None) => {
                return fail(
                    &field("kind"),
                    format!(
                        "a `{}` set needs `labels` ({})",
                        kind_name(set.kind),
                        if set.kind == EvalSetKind::Real {
                            "the ReaL real.json"
                        } else {
                            "a `file<TAB>class` file or LOC_val_solution.csv"
                        }
                    ),
                );
            }
            (EvalSetKind::Folder | EvalSetKind::V2, Some(_)) => {
                return fail(
                    &field("labels"),
                    format!(
                        "a `{}` set takes its labels from its folders; remove `labels` \
                         or use kind `labelled`",
                        kind_name(set.kind)
                    ),
                );
            }
            (_, Some(labels)) => non_empty(&field("labels"), labels)?,
            _ => {}
        }
    }

    for (field, threads) in [
        ("data.loader_threads", r.data.loader_threads),
        ("runtime.torch_threads", r.runtime.torch_threads),
    ] {
        if threads > MAX_THREADS {
            return fail(
                field,
                format!("must be between 0 (the default) and {MAX_THREADS}, got {threads}"),
            );
        }
    }
    if r.data.prefetch_batches > MAX_PREFETCH_BATCHES {
        return fail(
            "data.prefetch_batches",
            format!(
                "must be at most {MAX_PREFETCH_BATCHES} (each is a whole micro-batch held in \
                 memory), got {}",
                r.data.prefetch_batches
            ),
        );
    }
    at_least_one("runtime.log_every_steps", r.runtime.log_every_steps)?;
    at_least_one("runtime.max_nonfinite_updates", r.runtime.max_nonfinite_updates)?;
    let timeout = r.distributed.collective_timeout_secs;
    if !(1..=MAX_COLLECTIVE_TIMEOUT_SECS).contains(&timeout) {
        return fail(
            "distributed.collective_timeout_secs",
            format!("must be between 1 and {MAX_COLLECTIVE_TIMEOUT_SECS} (a week), got {timeout}"),
        );
    }
    let ratio = r.distributed.straggler_warn_ratio;
    if !(1.05..=1000.0).contains(&ratio) {
        return fail(
            "distributed.straggler_warn_ratio",
            format!("must be between 1.05 and 1000 (times the other ranks' median), got {ratio}"),
        );
    }
    let ratio = r.distributed.slow_link_warn_ratio;
    if !(1.05..=1000.0).contains(&ratio) {
        return fail(
            "distributed.slow_link_warn_ratio",
            format!("must be between 1.05 and 1000 (times the other links' median), got {ratio}"),
        );
    }
    let probe = r.distributed.fabric_probe_mib;
    if probe > MAX_FABRIC_PROBE_MIB {
        return fail(
            "distributed.fabric_probe_mib",
            format!("must be at most {MAX_FABRIC_PROBE_MIB} (0: no probe), got {probe}"),
        );
    }
    if let Some(expected) = r.distributed.expected_bus_gb_per_s {
        if !(expected.is_finite() && expected > 0.0) {
            return fail(
                "distributed.expected_bus_gb_per_s",
                format!("must be a positive number of GB/s, got {expected}"),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::{load, CollectiveBackend, RecipeError};
    use std::path::Path;

    fn tiny(overrides: &[&str]) -> Result<crate::Recipe, RecipeError> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("debug/resnet18_tiny_cpu.yaml");
        let sets: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        load(&path, &sets)
    }

    #[test]
    fn the_distributed_section_has_defaults_and_checked_ranges() {
        let r = tiny(&[]).unwrap();
        assert_eq!(r.distributed.backend, CollectiveBackend::Auto);
        assert_eq!(r.distributed.collective_timeout_secs, 600);
        assert!(!r.distributed.collectives_at_world_size_one);
        assert_eq!(r.distributed.straggler_warn_ratio, 1.5);
        assert_eq!(r.distributed.fabric_probe_mib, 25);
        assert_eq!(r.distributed.slow_link_warn_ratio, 3.0);
        assert_eq!(r.distributed.expected_bus_gb_per_s, None);
        let r = tiny(&[
            "distributed.backend=ring",
            "distributed.collective_timeout_secs=15",
            "distributed.collectives_at_world_size_one=true",
            "distributed.straggler_warn_ratio=1.2",
            "distributed.fabric_probe_mib=0",
            "distributed.slow_link_warn_ratio=10",
            "distributed.expected_bus_gb_per_s=370",
        ])
        .unwrap();
        assert_eq!(r.distributed.backend, CollectiveBackend::Ring);
        assert_eq!(r.distributed.collective_timeout_secs, 15);
        assert!(r.distributed.collectives_at_world_size_one);
        assert_eq!(r.distributed.straggler_warn_ratio, 1.2);
        assert_eq!(r.distributed.fabric_probe_mib, 0);
        assert_eq!(r.distributed.slow_link_warn_ratio, 10.0);
        assert_eq!(r.distributed.expected_bus_gb_per_s, Some(370.0));
        for (set, needle) in [
            ("distributed.straggler_warn_ratio=1", "between 1.05 and 1000"),
            ("distributed.straggler_warn_ratio=.nan", "got NaN"),
            ("distributed.slow_link_warn_ratio=1001", "times the other links' median), got 1001"),
            ("distributed.fabric_probe_mib=1025", "at most 1024 (0: no probe), got 1025"),
            ("distributed.expected_bus_gb_per_s=0", "positive number of GB/s, got 0"),
            ("distributed.expected_bus_gb_per_s=-3", "got -3"),
            ("distributed.collective_timeout_secs=0", "between 1 and 604800 (a week), got 0"),
            ("distributed.collective_timeout_secs=604801", "got 604801"),
            ("distributed.backend=gloo", "unknown variant `gloo`"),
            ("distributed.timeout=5", "unknown field `timeout`"),
        ] {
            let e = tiny(&[set]).unwrap_err().to_string();
            assert!(e.contains("distributed"), "{set}: the error names no field: {e}");
            assert!(e.contains(needle), "{set}: {e}");
        }
    }

    #[test]
    fn an_eval_crop_so_small_that_photos_could_not_be_resized_is_refused_with_the_share_that_works()
    {
        // The RSB test crop, and the smallest share the loader can resize.
        tiny(&["eval.input_size=224", "eval.crop_pct=0.95"]).unwrap();
        let smallest = super::smallest_crop_pct(224);
        let at = format!("eval.crop_pct={smallest}");
        let r = tiny(&["eval.input_size=224", &at]).unwrap();
        let side = (224.0 / r.eval.crop_pct).floor();
        assert!(side <= f64::from(super::MAX_EVAL_RESIZE_SIDE), "{side}");
        let just_below = format!("{:.4}", smallest - 1e-4);
        for (crop, side) in [("1e-300", "2.24e302"), ("0.000001", "224000000"), (&just_below, "9")]
        {
            let e = tiny(&["eval.input_size=224", &format!("eval.crop_pct={crop}")])
                .unwrap_err()
                .to_string();
            assert!(e.contains("eval.crop_pct") && e.len() < 600, "{e}");
            assert!(e.contains(&format!("to {side}")), "{crop}: {e}");
            assert!(
                e.contains("past 9459 px") && e.contains(&format!("at least {smallest}")),
                "{e}"
            );
        }
    }

    #[test]
    fn sizes_that_would_exhaust_memory_or_be_refused_later_are_refused_naming_the_field() {
        tiny(&["data.prefetch_batches=1024"]).unwrap();
        let long = "x".repeat(super::MAX_EVAL_SET_NAME_LEN + 1);
        let many: Vec<String> = (0..=super::MAX_EVAL_SETS)
            .map(|i| format!("{{name: s{i}, kind: folder, root: r}}"))
            .collect();
        let many = format!("eval.sets=[{}]", many.join(", "));
        for (set, field, needle) in [
            (
                "data.prefetch_batches=4294967295".to_string(),
                "data.prefetch_batches",
                "at most 1024",
            ),
            (
                format!("eval.sets=[{{name: {long}, kind: folder, root: r}}]"),
                "eval.sets.0.name",
                "256 bytes long; at most 255",
            ),
            (
                "eval.sets=[{name: \"a\\tb\", kind: folder, root: r}]".to_string(),
                "eval.sets.0.name",
                "control character",
            ),
            (many, "eval.sets", "lists 65 sets; at most 64"),
        ] {
            let e = tiny(&[set.as_str()]).unwrap_err().to_string();
            assert!(e.contains(&format!("{field}:")) && e.contains(needle), "{set}: {e}");
        }
    }
}
