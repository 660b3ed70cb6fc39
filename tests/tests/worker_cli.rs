//! End-to-end runs of the `worker` binary on real Fashion-MNIST images (a
//! subset of Debian's `dataset-fashion-mnist`, imported by `worker data
//! import`): training with every RSB ingredient, the run folder it leaves
//! (metrics, resolved recipe, checkpoints with timm keys), an exact resume,
//! evaluation and inference from the checkpoint, undecodable files survived,
//! recipe errors that name the file and line, and the checkpoint and
//! run-folder rules: torn or corrupt checkpoints skipped (or, named, refused),
//! a changed recipe refused unless `--set` explains it, an `--out` holding a
//! run refused without `--resume`.

use rsb_integration_tests::run_records as records;
use rsb_integration_tests::tiny_recipe;
use rsb_integration_tests::{binary, fashion_subset, workspace_root};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tiny_dataset(root: &Path) -> PathBuf {
    fashion_subset(root, 16, 4)
}

fn worker(args: &[&str]) -> Output {
    Command::new(binary("worker"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("running worker")
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let run = train_with(&tiny_recipe(), data, out, extra);
    assert!(run.status.success(), "worker train failed:\n{}", String::from_utf8_lossy(&run.stderr));
    run
}

/// `worker train` with `recipe`, the tiny dataset and two epochs, whatever its outcome.
fn train_with(recipe: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let args = train_args(recipe, data, out, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    worker(&args)
}

/// The arguments of [`train_with`] (`extra` last: a `--set` there wins).
fn train_args(recipe: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "train".into(),
        "--recipe".into(),
        recipe.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--device".into(),
        "cpu".into(),
        "--set".into(),
        format!("data.root={}", data.display()),
        "--set".into(),
        "model.num_classes=10".into(),
        "--set".into(),
        "schedule.cosine.epochs=2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn train_resume_eval_infer_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_dataset(tmp.path());

    // Not ImageNet's normalisation (as a ViT's, 0.5): `worker eval` of the
    // checkpoint without --recipe normalises as the run did.
    let normalised = ["--set", "data.mean=[0.5,0.5,0.5]", "--set", "data.std=[0.5,0.5,0.5]"];

    // Uninterrupted: two epochs.
    let full = tmp.path().join("full");
    train(&data, &full, &normalised);
    let steps = records(&full, "step");
    let epochs = records(&full, "epoch");
    assert_eq!(epochs.len(), 2);
    for r in &steps {
        for field in ["step", "epoch", "lr", "loss", "images_per_sec"] {
            assert!(r[field].is_number(), "step record lacks {field}: {r}");
        }
    }
    for r in &epochs {
        for field in ["step", "epoch", "lr", "loss", "images_per_sec", "top1", "top5"] {
            assert!(r[field].is_number(), "epoch record lacks {field}: {r}");
        }
    }
    let resolved = std::fs::read_to_string(full.join("recipe.yaml")).unwrap();
    assert!(resolved.contains("num_classes: 10"), "resolved recipe lacks the override");
    let ckpt = full.join("checkpoints/epoch-0002");
    for part in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(ckpt.join(part).is_file(), "checkpoint lacks {part}");
    }
    // keep_last_checkpoints = 1 in the tiny recipe, and the best top-1 is kept too.
    let top1: Vec<f64> = epochs.iter().map(|e| e["top1"].as_f64().unwrap()).collect();
    assert_eq!(
        full.join("checkpoints/epoch-0001").exists(),
        top1[0] >= top1[1],
        "epoch 1 (top-1 {}) is kept only while it is the best (epoch 2: {})",
        top1[0],
        top1[1]
    );

    // Interrupted after one epoch, then resumed: the second epoch's losses are identical.
    let split = tmp.path().join("split");
    train(
        &data,
        &split,
        &[
            &normalised[..],
            &[
                "--set",
                "runtime.keep_last_checkpoints=3",
                "--max-updates",
                &steps.len().div_ceil(2).to_string(),
            ],
        ]
        .concat(),
    );
    assert!(split.join("checkpoints/epoch-0001/state.json").is_file());
    train(
        &data,
        &split,
        &[
            &normalised[..],
            &["--set", "runtime.keep_last_checkpoints=3", "--resume", split.to_str().unwrap()],
        ]
        .concat(),
    );
    let resumed = records(&split, "step");
    assert_eq!(resumed.len(), steps.len());
    for (a, b) in steps.iter().zip(&resumed) {
        assert_eq!(a["step"], b["step"]);
        assert_eq!(a["loss"], b["loss"], "loss after resume differs at update {}", a["step"]);
    }
    assert_eq!(records(&split, "epoch").last().unwrap()["top1"], epochs.last().unwrap()["top1"]);

    // worker eval on the checkpoint reproduces the epoch's top-1.
    let weights = ckpt.join("model.safetensors");
    let eval_checkpoint = |options: &[&str]| {
        let mut args = vec!["eval", "--model", "resnet18", "--weights"];
        args.extend([weights.to_str().unwrap(), "--data", data.to_str().unwrap()]);
        args.extend(["--device", "cpu"]);
        args.extend(options);
        worker(&args)
    };
    let eval = eval_checkpoint(&["--input-size", "32", "--crop-pct", "0.95"]);
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let text = String::from_utf8_lossy(&eval.stdout);
    let top1 = epochs.last().unwrap()["top1"].as_f64().unwrap();
    let loss = epochs.last().unwrap()["val_loss"].as_f64().unwrap();
    assert!(
        text.contains(&format!("top-1 {top1:.3}%")) && text.contains(&format!("loss {loss:.4}")),
        "eval printed `{text}`, epoch record says top-1 {top1}, loss {loss}"
    );
    assert!(!String::from_utf8_lossy(&eval.stderr).contains("its run scored"));
    // Without them, the model's defaults (224 px, crop 0.875) are used, and
    // the run's own size and crop are named.
    let eval = eval_checkpoint(&[]);
    let log = String::from_utf8_lossy(&eval.stderr);
    assert!(eval.status.success(), "{log}");
    assert!(
        log.contains("its run scored its validation at 32 px with crop 0.95")
            && log.contains("--input-size 32 --crop-pct 0.95"),
        "{log}"
    );

    // worker infer maps an .npy batch to logits of the right shape.
    let input = tmp.path().join("x.npy");
    tch::Tensor::randn([3, 3, 32, 32], (tch::Kind::Float, tch::Device::Cpu))
        .write_npy(&input)
        .unwrap();
    let output = tmp.path().join("y.npy");
    let infer = worker(&[
        "infer",
        "--model",
        "resnet18",
        "--num-classes",
        "10",
        "--weights",
        ckpt.join("model.safetensors").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(infer.status.success(), "{}", String::from_utf8_lossy(&infer.stderr));
    let logits = tch::Tensor::read_npy(&output).unwrap();
    assert_eq!(logits.size(), vec![3, 10]);

    // A header that gives more data than the file holds (a copy cut short,
    // an edited header) is an error naming the file, not logits made of
    // whatever lay past the data (or a crash, for a larger shape); the
    // same batch read whole gives the same logits as before.
    let bytes = std::fs::read(&input).unwrap();
    let header_end = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    let find = |what: &[u8], from: usize| {
        from + bytes[from..header_end].windows(what.len()).position(|w| w == what).unwrap()
    };
    let shape_at = find(b"'shape': (", 0) + 9;
    let shape_end = find(b")", shape_at) + 1;
    let run_infer = |input: &Path| {
        let weights = ckpt.join("model.safetensors");
        let args = ["--num-classes", "10", "--weights", weights.to_str().unwrap()];
        let files = ["--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()];
        worker(&[&["infer", "--model", "resnet18"][..], &args, &files].concat())
    };
    let claims = |shape: &str, name: &str| {
        let path = tmp.path().join(name);
        // Of the same length: the header's own length field stays right.
        assert_eq!(shape.len(), shape_end - shape_at, "{shape}");
        let edited = [&bytes[..shape_at], shape.as_bytes(), &bytes[shape_end..]].concat();
        std::fs::write(&path, edited).unwrap();
        path
    };
    for (input, what) in [
        (claims("(9,3,32,32,)", "nine.npy"), "only"),
        (claims("(99,3,99,99)", "huge.npy"), "only"),
        (claims("(3,3,32,32,)", "same.npy"), ""),
    ] {
        let run = run_infer(&input);
        let text = String::from_utf8_lossy(&run.stderr);
        if what.is_empty() {
            assert!(run.status.success(), "{text}");
            let again = tch::Tensor::read_npy(&output).unwrap();
            assert_eq!(again.size(), vec![3, 10]);
            assert!(again.allclose(&logits, 1e-5, 1e-5, false), "{again} vs {logits}");
        } else {
            assert_eq!(run.status.code(), Some(1), "{text}");
            let name = input.file_name().unwrap().to_string_lossy().into_owned();
            assert!(text.contains(&name) && text.contains(what), "{text}");
        }
    }
    let cut = tmp.path().join("cut.npy");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let run = run_infer(&cut);
    let text = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && text.contains("cut.npy"), "{text}");
}

fn stderr(run: &Output) -> String {
    String::from_utf8_lossy(&run.stderr).into_owned()
}

/// The `checkpoint=...` named by the log line `resumed` in `stderr`.
fn resumed_from(stderr: &str) -> String {
    let line = stderr
        .lines()
        .find(|l| l.contains("resumed"))
        .unwrap_or_else(|| panic!("no `resumed` line:\n{stderr}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("checkpoint="))
        .unwrap_or_else(|| panic!("no checkpoint in `{line}`"))
        .to_string()
}

#[test]
fn torn_or_corrupt_checkpoints_are_skipped_and_resumes_keep_their_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_dataset(tmp.path());
    let run = tmp.path().join("run");
    let keep = ["--set", "runtime.keep_last_checkpoints=2"];
    train(&data, &run, &keep);
    let first = run.join("checkpoints/epoch-0001");
    let newest = run.join("checkpoints/epoch-0002");
    for checkpoint in [&first, &newest] {
        assert!(
            checkpoint.join("manifest.json").is_file(),
            "{} has no manifest",
            checkpoint.display()
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(newest.join("manifest.json")).unwrap())
            .unwrap();
    for part in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        let size = std::fs::metadata(newest.join(part)).unwrap().len();
        assert_eq!(manifest["parts"][part]["bytes"], size, "{part}");
        assert_eq!(manifest["parts"][part]["sha256"].as_str().unwrap().len(), 64, "{part}");
    }
    // Resuming the run folder without training (--max-updates 0) says which
    // checkpoint it took.
    let resume = |extra: &[&str]| {
        let mut args = keep.to_vec();
        args.extend(["--max-updates", "0"]);
        args.extend(extra);
        train_with(&tiny_recipe(), &data, &run, &args)
    };
    let intact = resume(&["--resume", run.to_str().unwrap()]);
    assert!(intact.status.success(), "{}", stderr(&intact));
    assert_eq!(resumed_from(&stderr(&intact)), newest.display().to_string());

    // Each kind of damage to the newest: the one before is taken, and the log
    // names the damaged file and why.
    let model = newest.join("model.safetensors");
    let optimizer = newest.join("optimizer.safetensors");
    let manifest_path = newest.join("manifest.json");
    let good_model = std::fs::read(&model).unwrap();
    let good_optimizer = std::fs::read(&optimizer).unwrap();
    let good_manifest = std::fs::read(&manifest_path).unwrap();
    let mut flipped = good_model.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    // What is done, how, which file it damages, and the reason the log gives.
    type Damage<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a Path, &'a str);
    let damages: [Damage; 3] = [
        (
            "flipped byte",
            Box::new(|| std::fs::write(&model, &flipped).unwrap()),
            model.as_path(),
            "SHA-256",
        ),
        (
            "truncated part",
            Box::new(|| std::fs::write(&optimizer, &good_optimizer[..100]).unwrap()),
            optimizer.as_path(),
            "truncated",
        ),
        (
            "deleted manifest",
            Box::new(|| std::fs::remove_file(&manifest_path).unwrap()),
            manifest_path.as_path(),
            "no manifest",
        ),
    ];
    for (what, damage, file, reason) in damages {
        damage();
        let skipped = resume(&["--resume", run.to_str().unwrap()]);
        let log = stderr(&skipped);
        assert!(skipped.status.success(), "{what}: {log}");
        assert_eq!(resumed_from(&log), first.display().to_string(), "{what}:\n{log}");
        let warning = log
            .lines()
            .find(|l| l.contains("skipping a torn or corrupt checkpoint"))
            .unwrap_or_else(|| panic!("{what}: no warning:\n{log}"));
        assert!(
            warning.contains(&file.display().to_string()) && warning.contains(reason),
            "{what}: the warning does not name {} and `{reason}`: {warning}",
            file.display()
        );
        // Named explicitly, the damaged checkpoint is refused, naming the file.
        let refused = resume(&["--resume", newest.to_str().unwrap()]);
        let log = stderr(&refused);
        assert!(!refused.status.success(), "{what}: resumed from a damaged checkpoint");
        assert!(log.contains(&file.display().to_string()), "{what}: {log}");
        std::fs::write(&model, &good_model).unwrap();
        std::fs::write(&optimizer, &good_optimizer).unwrap();
        std::fs::write(&manifest_path, &good_manifest).unwrap();
    }

    // A recipe changed in its file is refused, listing the field ...
    let changed = tmp.path().join("changed.yaml");
    let source = std::fs::read_to_string(tiny_recipe()).unwrap();
    assert!(source.contains("    lr: 5.0e-3\n"));
    std::fs::write(&changed, source.replace("    lr: 5.0e-3\n", "    lr: 4.0e-3\n")).unwrap();
    let mut args = keep.to_vec();
    args.extend(["--max-updates", "0", "--resume", run.to_str().unwrap()]);
    let refused = train_with(&changed, &data, &run, &args);
    let log = stderr(&refused);
    assert!(!refused.status.success(), "a changed recipe was resumed");
    assert!(log.contains("optimizer.lamb.lr (checkpoint 0.005, now 0.004)"), "{log}");
    assert!(!log.contains("data.root"), "a field --set gave the same value is listed: {log}");
    // ... and accepted when --set says so, which is logged.
    args.extend(["--set", "optimizer.lamb.lr=0.004"]);
    let accepted = train_with(&changed, &data, &run, &args);
    let log = stderr(&accepted);
    assert!(accepted.status.success(), "{log}");
    assert!(
        log.contains("recipe field changed by --set") && log.contains("optimizer.lamb.lr"),
        "{log}"
    );

    // Reusing the folder without --resume is refused and leaves the run as it was.
    let before = std::fs::read(newest.join("state.json")).unwrap();
    let reused = train_with(&tiny_recipe(), &data, &run, &keep);
    let log = stderr(&reused);
    assert!(!reused.status.success(), "a second run was started in a run folder");
    assert!(log.contains("already holds a run") && log.contains("--resume"), "{log}");
    assert_eq!(std::fs::read(newest.join("state.json")).unwrap(), before);
    assert!(first.is_dir() && newest.join("manifest.json").is_file());

    // A corrupt newest checkpoint, resumed for real: the epoch is trained
    // again from the one before and its checkpoint is written anew, intact.
    std::fs::write(&model, &flipped).unwrap();
    let mut args = keep.to_vec();
    args.extend(["--resume", run.to_str().unwrap()]);
    let redo = train_with(&tiny_recipe(), &data, &run, &args);
    assert!(redo.status.success(), "{}", stderr(&redo));
    assert_eq!(resumed_from(&stderr(&redo)), first.display().to_string());
    let again = resume(&["--resume", run.to_str().unwrap()]);
    assert_eq!(resumed_from(&stderr(&again)), newest.display().to_string(), "{}", stderr(&again));
}

#[test]
fn undecodable_images_are_replaced_logged_once_and_counted_in_training_and_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_dataset(tmp.path());
    let class_dir = data.join("train/03_dress");
    let good = std::fs::read(
        class_dir.join(std::fs::read_dir(&class_dir).unwrap().next().unwrap().unwrap().file_name()),
    )
    .unwrap();
    std::fs::write(class_dir.join("zz_empty.png"), b"").unwrap();
    std::fs::write(class_dir.join("zz_text.png"), b"not an image").unwrap();
    std::fs::write(class_dir.join("zz_truncated.png"), &good[..good.len() / 2]).unwrap();
    // Two validation images that do not decode: left out of the accuracy,
    // and counted in the epoch record and line.
    let val_dir = data.join("val/03_dress");
    assert!(val_dir.is_dir(), "{} is not the tiny set's val class", val_dir.display());
    std::fs::write(val_dir.join("zz_val_text.png"), b"not an image").unwrap();
    std::fs::write(val_dir.join("zz_val_truncated.png"), &good[..good.len() / 3]).unwrap();
    let out = tmp.path().join("run");
    let run = train(&data, &out, &["--set", "schedule.cosine.epochs=1"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    for bad in ["zz_empty.png", "zz_text.png", "zz_truncated.png"] {
        let mentions = stderr.matches(bad).count();
        assert!(mentions <= 1, "{bad} logged {mentions} times:\n{stderr}");
    }
    let epoch = records(&out, "epoch");
    let replaced = epoch.last().unwrap()["replaced_samples"].as_u64().unwrap();
    let logged = ["zz_empty.png", "zz_text.png", "zz_truncated.png"]
        .iter()
        .filter(|b| stderr.contains(*b))
        .count();
    assert!(logged >= 1, "no undecodable file was logged:\n{stderr}");
    assert!(replaced >= logged as u64, "replaced {replaced} < logged {logged}");
    assert_eq!(epoch.last().unwrap()["val_skipped_images"], 2, "{epoch:?}");
    assert!(
        stderr.contains("evaluation images unreadable and left out: 2 in val"),
        "the epoch line does not say 2 validation images were left out:\n{stderr}"
    );
    // Resumed for one more epoch: the count goes on from the checkpoint's
    // (every epoch visits the undecodable files again).
    let more = train(
        &data,
        &out,
        &["--set", "schedule.cosine.epochs=2", "--resume", out.to_str().unwrap()],
    );
    assert!(more.status.success(), "{}", String::from_utf8_lossy(&more.stderr));
    let epochs = records(&out, "epoch");
    let after = epochs.last().unwrap()["replaced_samples"].as_u64().unwrap();
    assert_eq!(epochs.last().unwrap()["epoch"], 1, "{epochs:?}");
    assert!(after > replaced, "the count restarted after the resume: {after} after {replaced}");

    // When no validation image decodes, there is no accuracy to record:
    // the run fails naming the set, instead of recording 0% and a loss of 0.
    for file in std::fs::read_dir(data.join("val")).unwrap() {
        for image in std::fs::read_dir(file.unwrap().path()).unwrap() {
            std::fs::write(image.unwrap().path(), b"not an image").unwrap();
        }
    }
    let broken = tmp.path().join("broken-val");
    let run = train_with(&tiny_recipe(), &data, &broken, &["--set", "schedule.cosine.epochs=1"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(stderr.contains("eval set `val`: none of its"), "{stderr}");
    assert!(records(&broken, "epoch").is_empty(), "an epoch was recorded:\n{stderr}");
}

/// A recipe its user keeps in the run folder and trains with (`--recipe
/// exp1/recipe.yaml --out exp1`) is moved aside, with its comments, not
/// replaced by the resolved recipe.
#[test]
fn a_recipe_kept_in_the_run_folder_is_set_aside_not_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_dataset(tmp.path());
    let out = tmp.path().join("exp1");
    std::fs::create_dir_all(&out).unwrap();
    let mine = format!("# my tuning notes\n{}", std::fs::read_to_string(tiny_recipe()).unwrap());
    std::fs::write(out.join("recipe.yaml"), &mine).unwrap();
    let run = train_with(&out.join("recipe.yaml"), &data, &out, &["--max-updates", "0"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let kept: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("recipe-replaced-"))
        .collect();
    assert_eq!(kept.len(), 1, "{stderr}");
    assert_eq!(std::fs::read_to_string(&kept[0]).unwrap(), mine);
    assert!(stderr.contains("held another recipe"), "{stderr}");
    let resolved = std::fs::read_to_string(out.join("recipe.yaml")).unwrap();
    assert!(!resolved.contains("my tuning notes"), "{resolved}");
}

/// An error whose type shows its cause in its message and also chains it
/// (here the data folder's I/O error) says the cause once.
#[test]
fn a_missing_data_folder_is_named_with_its_cause_said_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("not-mounted");
    let run = train_with(&tiny_recipe(), &missing, &tmp.path().join("run"), &[]);
    assert!(!run.status.success());
    let err = stderr(&run);
    let cause = std::io::Error::from_raw_os_error(nix::libc::ENOENT).to_string();
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains(&format!("{}/train", missing.display())), "{line}");
    assert_eq!(line.matches(&cause).count(), 1, "{line}");
}

#[test]
fn recipe_errors_name_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("bad.yaml");
    let source =
        std::fs::read_to_string(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
            .unwrap();
    std::fs::write(
        &recipe,
        source.replace("  weight_decay: 0.01", "  weight_decay: 0.01\n    wieght_decay: 0.02"),
    )
    .unwrap();
    let run = worker(&[
        "train",
        "--recipe",
        recipe.to_str().unwrap(),
        "--out",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("bad.yaml:") && err.contains("wieght_decay"), "{err}");
    let run = worker(&[
        "train",
        "--recipe",
        recipe.to_str().unwrap(),
        "--out",
        "x",
        "--set",
        "optimizer.lamb.lr",
    ]);
    assert!(String::from_utf8_lossy(&run.stderr).contains("--set optimizer.lamb.lr"));
    let run = worker(&[
        "eval",
        "--model",
        "resnet5O",
        "--weights",
        "w.safetensors",
        "--data",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(!run.status.success());
}

#[test]
fn every_recipe_in_the_tree_parses() {
    for entry in walk(&workspace_root().join("recipes")) {
        if entry.extension().is_some_and(|e| e == "yaml") {
            rsb_recipes::load(&entry, &[]).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The dynamic libraries a binary asks the loader for (`readelf -d`).
fn needed_libraries(binary: &Path) -> Vec<String> {
    let out = std::process::Command::new("readelf")
        .arg("-d")
        .arg(binary)
        .output()
        .expect("readelf (binutils) is needed for this test");
    assert!(out.status.success(), "readelf -d {}", binary.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1).map(|s| s.trim_end_matches(']').to_string()))
        .collect()
}

#[test]
fn the_worker_links_libtorch_cuda_and_the_coordinator_no_libtorch() {
    // The linker drops libtorch_cuda.so under --as-needed (nothing refers to
    // it by symbol), and then a CUDA host shows no GPU: the build forces it.
    let torch_lib = rsb_integration_tests::workspace_root().join(".venv/libtorch/lib");
    let worker_libs = needed_libraries(&rsb_integration_tests::binary("worker"));
    assert!(worker_libs.iter().any(|l| l == "libtorch_cpu.so"), "{worker_libs:?}");
    // The pinned wheel is the CUDA build: under CI a libtorch without
    // libtorch_cuda.so fails the test instead of skipping its CUDA half.
    if rsb_integration_tests::require(
        torch_lib.join("libtorch_cuda.so").exists(),
        "libtorch_cuda.so in .venv/libtorch/lib (the CUDA torch wheel of python/torch.txt)",
    ) {
        assert!(
            worker_libs.iter().any(|l| l == "libtorch_cuda.so"),
            "the worker does not load libtorch_cuda.so: {worker_libs:?}"
        );
    }
    let coordinator_libs = needed_libraries(&rsb_integration_tests::binary("coordinator"));
    assert!(
        !coordinator_libs.iter().any(|l| l.contains("torch") || l.contains("cuda")),
        "the coordinator links {coordinator_libs:?}"
    );
    // And `worker doctor` reports what it loaded.
    let doctor = worker(&["doctor"]);
    assert!(doctor.status.success(), "{}", String::from_utf8_lossy(&doctor.stderr));
    let text = String::from_utf8_lossy(&doctor.stdout).to_string();
    for field in ["2.11.0", "CUDA", "NCCL"] {
        assert!(text.contains(field), "worker doctor does not report {field}:\n{text}");
    }
    // NCCL as a rank loads it: the CUDA wheel's libnccl.so.2 (the name
    // cudarc's own loader never tries), which makes a unique id without a GPU.
    if torch_lib.join("libtorch_cuda.so").exists() {
        let nccl = text.lines().find(|l| l.starts_with("NCCL")).unwrap_or_default();
        assert!(
            nccl.contains("found: ")
                && nccl.contains("nvidia/nccl/lib/libnccl.so.2 (version 2.")
                && nccl.contains("a unique id made"),
            "worker doctor: {nccl}"
        );
    }
}

fn coordinator(args: &[&str]) -> Output {
    Command::new(binary("coordinator"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("running coordinator")
}

#[test]
fn a_table_3_model_and_procedure_is_one_command() {
    // Table 3 of the paper: efficientnetv2_rw_s trains A3 at 224 and tests
    // at 288; A2 at 288 and 384; every procedure tests with crop 0.95.
    for (procedure, train, test) in [("a3", 224, 288), ("a2", 288, 384)] {
        let plan = coordinator(&[
            "plan",
            "--procedure",
            procedure,
            "--model",
            "efficientnetv2_rw_s",
            "--ranks",
            "2",
        ]);
        assert!(plan.status.success(), "{}", String::from_utf8_lossy(&plan.stderr));
        let text = String::from_utf8_lossy(&plan.stdout).to_string();
        assert!(
            text.starts_with(&format!("efficientnetv2_rw_s_{procedure}: global batch")),
            "{text}"
        );
        let sizes = format!(
            "model efficientnetv2_rw_s: train at {train} px, test at {test} px (crop 0.95)"
        );
        assert!(text.contains(&sizes), "{text}");
    }
    // --set still applies, after the table.
    let plan = coordinator(&[
        "plan",
        "--procedure",
        "a3",
        "--model",
        "resnet18",
        "--set",
        "eval.input_size=256",
        "--ranks",
        "2",
    ]);
    let text = String::from_utf8_lossy(&plan.stdout).to_string();
    assert!(text.contains("model resnet18: train at 160 px, test at 256 px"), "{text}");

    // Exactly one of --recipe and --procedure/--model.
    let recipe = workspace_root().join("recipes/resnet50_a3.yaml").display().to_string();
    for args in [
        vec!["plan", "--ranks", "2"],
        vec![
            "plan",
            "--recipe",
            &recipe,
            "--procedure",
            "a3",
            "--model",
            "resnet18",
            "--ranks",
            "2",
        ],
        vec!["plan", "--procedure", "a3", "--ranks", "2"],
        vec!["plan", "--model", "resnet18", "--ranks", "2"],
    ] {
        let refused = coordinator(&args);
        assert!(!refused.status.success(), "{args:?} was accepted");
    }

    // An unknown model is refused, naming the closest ones, by both binaries.
    let unknown = coordinator(&["plan", "--procedure", "a1", "--model", "resnet5", "--ranks", "2"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr).to_string();
    assert!(!unknown.status.success() && stderr.contains("closest: resnet50"), "{stderr}");
    let out = tempfile::tempdir().unwrap();
    let unknown = worker(&[
        "train",
        "--procedure",
        "a2",
        "--model",
        "efficientnet_b9",
        "--out",
        &out.path().display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&unknown.stderr).to_string();
    assert!(!unknown.status.success(), "worker train accepted efficientnet_b9");
    assert!(stderr.contains("unknown model `efficientnet_b9`"), "{stderr}");
}

#[test]
fn worker_models_prints_table_3() {
    let listed = worker(&["models"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let table = String::from_utf8_lossy(&listed.stdout).to_string();
    // Rows of the paper's Table 3 (A1/A2 train, test; A3 train, test; crop;
    // the paper's A1/A2/A3 top-1).
    for (name, cells) in [
        ("resnet50", "224 224 160 224 0.95 80.4/79.8/78.1"),
        ("efficientnet_b2", "260 260 192 256 0.95 80.4/80.1/77.5"),
        ("efficientnetv2_rw_s", "288 384 224 288 0.95 82.3/82.9/80.9"),
        ("ecaresnet269d", "320 416 256 320 0.95 83.3/83.9/83.3"),
    ] {
        let row = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing from `worker models`:\n{table}"));
        let words: Vec<&str> = row.split_whitespace().collect();
        // name, family, parameter count, then the Table-3 cells.
        assert!(words[2].parse::<u64>().is_ok_and(|n| n > 1_000_000), "{row}");
        assert_eq!(words[3..].join(" "), cells, "{row}");
    }
}

/// A printing command whose reader went away (`worker models | head -3`)
/// ends quietly and successfully; one whose output cannot be written (a full
/// disk behind `>`) fails naming stdout and the cause. `println!` panicked
/// in both, with a backtrace and exit code 101.
#[test]
fn a_closed_or_full_stdout_ends_a_printing_command_without_a_panic() {
    let mut models = Command::new(binary("worker"))
        .arg("models")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running worker models");
    // Closed before the worker (still loading libtorch) writes its header:
    // every line it writes meets a pipe without a reader.
    drop(models.stdout.take());
    let closed = models.wait_with_output().expect("waiting for worker models");
    let said = String::from_utf8_lossy(&closed.stderr);
    assert!(closed.status.success() && !said.contains("panicked"), "{:?}: {said}", closed.status);

    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let doctor = Command::new(binary("worker"))
        .arg("doctor")
        .stdout(full)
        .output()
        .expect("running worker doctor");
    let said = String::from_utf8_lossy(&doctor.stderr);
    assert_eq!(doctor.status.code(), Some(1), "{said}");
    assert!(
        said.contains("writing the output to stdout: No space left on device")
            && !said.contains("panicked"),
        "{said}"
    );
}

#[test]
fn coordinator_up_keeps_the_same_run_folder_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    std::fs::create_dir_all(out.join("checkpoints/epoch-0001")).unwrap();
    std::fs::write(out.join("checkpoints/epoch-0001/state.json"), "{}").unwrap();
    let recipe = tiny_recipe().display().to_string();
    let out_arg = out.display().to_string();
    let up = |extra: &[&str]| {
        let mut args = vec!["up", "--nodes", "1", "--recipe", &recipe, "--out", &out_arg];
        args.extend(["--listen", "127.0.0.1:0"]);
        args.extend(extra);
        coordinator(&args)
    };
    // Another run's folder, without --resume: refused before anything starts.
    let refused = up(&[]);
    let log = stderr(&refused);
    assert!(!refused.status.success(), "coordinator up started a second run in {out_arg}");
    assert!(log.contains("already holds a run") && log.contains("--resume"), "{log}");
    // With --resume, its only checkpoint is torn (no manifest): refused, naming it.
    let torn = up(&["--resume", &out_arg]);
    let log = stderr(&torn);
    assert!(!torn.status.success(), "coordinator up resumed from a torn checkpoint");
    assert!(log.contains("no intact checkpoint") && log.contains("manifest.json"), "{log}");
}

#[test]
fn an_unknown_cuda_sync_debug_mode_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let run = Command::new(binary("worker"))
        .args(["train", "--recipe"])
        .arg(tiny_recipe())
        .arg("--out")
        .arg(tmp.path().join("run"))
        .args(["--device", "cpu", "--set"])
        .arg(format!("data.root={}", tmp.path().join("data").display()))
        .env("RSB_CUDA_SYNC_DEBUG", "sometimes")
        .current_dir(workspace_root())
        .output()
        .expect("running worker");
    assert!(!run.status.success());
    let said = stderr(&run);
    assert!(
        said.contains("RSB_CUDA_SYNC_DEBUG=`sometimes`: expected off, warn or error"),
        "{said}"
    );
}

/// Numbers on a command line past what the programs can hold are refused
/// by name before anything runs, instead of a panic (an overflowing clock,
/// a capacity overflow), an abort (an allocation of terabytes) or a wrapped
/// count (2^31 + 1 local hosts of 2 ranks made a world of 2).
#[test]
fn command_line_numbers_past_what_can_be_held_are_refused_naming_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run").display().to_string();
    let recipe = tiny_recipe().display().to_string();
    let weights = ["--weights", "missing.safetensors"];
    let cases: Vec<(Output, &str, &str)> = vec![
        (
            worker(&[&["eval", "--num-classes=-1"][..], &weights].concat()),
            "--num-classes",
            "must be between 1 and 1000000, got -1",
        ),
        (
            worker(&[&["eval", "--crop-pct=NaN"][..], &weights].concat()),
            "--crop-pct",
            "must be in (0, 1], got NaN",
        ),
        (
            worker(
                &[
                    &["eval", "--model", "resnet18", "--input-size", "32", "--crop-pct", "0.0001"]
                        [..],
                    &weights,
                ]
                .concat(),
            ),
            "--input-size 32 --crop-pct 0.0001",
            "past 9459 px",
        ),
        (
            worker(&[&["eval", "--batch-size=0"][..], &weights].concat()),
            "--batch-size",
            "0 is not in 1..=65536",
        ),
        (
            worker(&[
                "infer",
                "--model",
                "resnet18",
                "--num-classes=100000000000",
                "--weights",
                "w",
                "--input",
                "i",
                "--output",
                "o",
            ]),
            "--num-classes",
            "must be between 1 and 1000000",
        ),
        (
            coordinator(&[
                "up",
                "--nodes",
                "1",
                "--recipe",
                &recipe,
                "--out",
                &out,
                "--heartbeat-timeout-secs",
                "18446744073709551615",
            ]),
            "--heartbeat-timeout-secs",
            "is not in 1..=604800",
        ),
        (
            coordinator(&[
                "up",
                "--local",
                "--nodes",
                "2147483649",
                "--devices",
                "0,1",
                "--recipe",
                &recipe,
                "--out",
                &out,
            ]),
            "--local --nodes 2147483649 --devices 0,1",
            "too many ranks",
        ),
        (
            // A sweep none of whose runs the local workers could start
            // waited for ever.
            coordinator(&[
                "up",
                "--local",
                "--nodes",
                "1",
                "--seeds",
                "0..2",
                "--ranks-per-run",
                "2",
                "--recipe",
                &recipe,
                "--out",
                &out,
            ]),
            "--ranks-per-run 2",
            "bring 1 rank(s) in all, so no run could start",
        ),
        (
            // A sweep whose runs' batch does not split over their ranks
            // (the tiny recipe's 2 micro-batches over 3): each attempt of
            // each run failed at its start, and was retried for it.
            coordinator(&[
                "up",
                "--local",
                "--nodes",
                "3",
                "--seeds",
                "0..2",
                "--ranks-per-run",
                "3",
                "--recipe",
                &recipe,
                "--out",
                &out,
            ]),
            "sweep run seed-000: --ranks-per-run 3",
            "do not split over 3 ranks",
        ),
    ];
    for (run, option, needle) in cases {
        let log = stderr(&run);
        assert!(!run.status.success(), "{option}: accepted");
        // An error exit (clap's 2, or 1), not a panic's 101 or an abort.
        assert!(matches!(run.status.code(), Some(1 | 2)), "{:?}: {log}", run.status);
        assert!(log.contains(option) && log.contains(needle), "{option}: {log}");
    }
    assert!(!tmp.path().join("run/recipe.yaml").exists(), "a refused job wrote its recipe");
}

/// A memory cgroup limited to a number of bytes (the v1 `memory`
/// hierarchy, or v2 where its root delegates the memory controller),
/// removed when dropped. `None` where none can be made (not root, no
/// memory controller).
struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    fn new(limit: u64) -> Option<MemoryCgroup> {
        let name = format!("rsb-test-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = Path::new("/sys/fs/cgroup");
        let (dir, file) = if v1.join("memory.limit_in_bytes").is_file() {
            (v1.join(&name), "memory.limit_in_bytes")
        } else if std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
        {
            (v2.join(&name), "memory.max")
        } else {
            return None;
        };
        std::fs::create_dir(&dir).ok()?;
        let cgroup = MemoryCgroup { dir };
        std::fs::write(cgroup.dir.join(file), limit.to_string()).ok()?;
        Some(cgroup)
    }

    /// `worker args` run inside the cgroup (it moves itself in, then execs).
    fn worker(&self, args: &[&str]) -> Output {
        Command::new("sh")
            .args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
            .arg(&self.dir)
            .arg(binary("worker"))
            .args(args)
            .current_dir(workspace_root())
            .output()
            .expect("running worker in a cgroup")
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Its processes have exited; the kernel may take a moment to say so.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("could not remove the cgroup {}", self.dir.display());
    }
}

/// `worker eval` on the CPU at 1000 px with the default batch of 256, in
/// a cgroup of 1.75 GiB: 10 images at once take about 2 GiB, and the kernel
/// killed the evaluation (SIGKILL, no word of why). It now measures one
/// image's forward pass, evaluates in batches that fit the memory its
/// cgroup leaves, saying so, and scores as a run of one image a batch does.
/// At 3000 px in a cgroup of 1.5 GiB, one image does not fit: refused,
/// naming the figures, not killed.
#[test]
fn an_evaluation_larger_than_the_memory_it_may_take_runs_in_batches_that_fit() {
    use rsb_integration_tests::{is_root, require};
    if !require(is_root(), "root, to make a memory cgroup") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 1, 1);
    let weights = tmp.path().join("resnet18.safetensors");
    let model = rsb_vision::Model::new(
        "resnet18",
        rsb_vision::ModelConfig { num_classes: 10, ..Default::default() },
        tch::Device::Cpu,
    )
    .unwrap();
    model.save_safetensors(&weights).unwrap();
    let weights = weights.display().to_string();
    let data = data.display().to_string();
    let args = [
        "eval",
        "--model",
        "resnet18",
        "--weights",
        &weights,
        "--data",
        &data,
        "--input-size",
        "1000",
        "--threads",
        "2",
    ];
    let cgroup = MemoryCgroup::new(7 << 28);
    if !require(cgroup.is_some(), "a memory cgroup (v1, or v2 with the memory controller)") {
        return;
    }
    let limited = cgroup.as_ref().unwrap().worker(&args);
    drop(cgroup);
    let log = String::from_utf8_lossy(&limited.stderr);
    assert!(limited.status.success(), "{:?}: {log}", limited.status);
    let batch: usize = log
        .split("evaluating ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no smaller batch announced: {log}"));
    assert!((1..10).contains(&batch), "{batch}: {log}");
    assert!(log.contains("--batch-size 256 at 1000 px would take about"), "{log}");
    assert!(log.contains("for 10 images"), "{log}");
    // The scores of the same images one at a time.
    let alone = worker(&[&args[..], &["--batch-size", "1"]].concat());
    assert!(alone.status.success(), "{}", String::from_utf8_lossy(&alone.stderr));
    let scores = |run: &Output| String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(scores(&limited).contains("10 images"), "{}", scores(&limited));
    assert_eq!(scores(&limited), scores(&alone));
    // One image too large for the cgroup: refused, naming the figures,
    // before a pass at full size could be killed.
    let small = MemoryCgroup::new(3 << 29).expect("a second cgroup");
    let args = [&args[..args.len() - 4], &["--input-size", "3000", "--threads", "1"]].concat();
    let refused = small.worker(&args);
    drop(small);
    let log = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{:?}: {log}", refused.status);
    assert!(log.contains("one 3000 px image would take about"), "{log}");
    assert!(log.contains("choose a smaller --input-size"), "{log}");
    println!("1000 px, cgroup of 1.75 GiB: evaluated in batches of {batch}");
}

/// Every step logged, overriding an earlier `--set` of the same field.
const LOG_EVERY_STEP: [&str; 2] = ["--set", "runtime.log_every_steps=1"];

/// `worker train` stopped by SIGTERM (a scheduler's preemption) or SIGINT
/// (Ctrl-C) stops after the update it is in (not at its next log point,
/// here the epoch's end), logs that step, writes a checkpoint of that
/// position, says where, and exits 1; `--auto-resume` continues from it.
/// Before, either signal killed it outright, losing every update since its
/// last periodic checkpoint (here: since the start).
#[test]
fn a_signalled_train_stops_after_its_update_with_a_checkpoint_of_it() {
    for signal in ["TERM", "INT"] {
        let tmp = tempfile::tempdir().unwrap();
        let data = tiny_dataset(tmp.path());
        let out = tmp.path().join("run");
        let log = tmp.path().join("train.log");
        let file = std::fs::File::create(&log).unwrap();
        // Far more epochs than the test waits for: it is stopped mid-epoch,
        // between log points (the first is the epoch's end).
        let epochs =
            ["--set", "schedule.cosine.epochs=100", "--set", "runtime.log_every_steps=1000"];
        let mut child = Command::new(binary("worker"))
            .args(train_args(&tiny_recipe(), &data, &out, &epochs))
            .current_dir(workspace_root())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let metrics = out.join("metrics.jsonl");
        // Counted as written: the record of the first update.
        let first_update_done = || {
            let text = std::fs::read_to_string(&metrics).unwrap_or_default();
            text.lines().any(|line| line.contains(r#""kind":"first_update""#))
        };
        let started = std::time::Instant::now();
        while !first_update_done() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(180),
                "no first update:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            assert!(child.try_wait().unwrap().is_none(), "it ended before the signal");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(rsb_integration_tests::processes::signal(child.id(), signal));
        let ended = rsb_integration_tests::processes::wait_with_timeout(
            child,
            std::time::Duration::from_secs(60),
            "the signalled train",
        );
        let said = std::fs::read_to_string(&log).unwrap();
        assert_eq!(ended.status.code(), Some(1), "SIG{signal}: {:?}\n{said}", ended.status);
        let checkpoints = rsb_job::checkpoint::list(&out);
        let stop = checkpoints.last().unwrap_or_else(|| panic!("SIG{signal}: none\n{said}"));
        let position = rsb_job::checkpoint::read_position(stop).unwrap();
        assert!(
            said.contains(&format!(
                "stopped by SIG{signal} after update {}: checkpoint {} written; resume from it",
                position.updates,
                stop.display()
            )),
            "{said}"
        );
        // The stop's position is the last logged step's: nothing after it
        // was trained, nothing before it is lost.
        let steps = rsb_integration_tests::records_in(&metrics, "step");
        let last = steps.last().unwrap()["step"].as_u64();
        assert_eq!(last, Some(position.updates), "SIG{signal}");
        assert!(position.updates >= 1 && position.updates < 10, "mid-epoch: {position:?}");
        assert_eq!(steps.len(), 1, "SIG{signal}: only the stop's step was logged");
        if signal == "INT" {
            continue;
        }
        // `--auto-resume` continues from it (for two updates).
        let resumed = train_with(
            &tiny_recipe(),
            &data,
            &out,
            &[&epochs[..], &["--auto-resume", "--max-updates", "2"], &LOG_EVERY_STEP].concat(),
        );
        let resumed_said = String::from_utf8_lossy(&resumed.stderr);
        assert!(resumed.status.success(), "{resumed_said}");
        assert!(resumed_said.contains(&stop.display().to_string()), "{resumed_said}");
        let after = rsb_integration_tests::records_in(&metrics, "step");
        let first_after = after[steps.len()]["step"].as_u64();
        assert_eq!(first_after, Some(position.updates + 1), "{resumed_said}");
    }
}
