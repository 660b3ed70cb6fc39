//! End to end through the `worker` binary, on real Fashion-MNIST images:
//! `worker data shard` packs the training split into WebDataset shards
//! (pre-resized), `worker train` trains from the shards and reports every
//! `eval.sets` entry (ImageNet-V2 layout, a flat folder with a label file,
//! ReaL-style label sets) after each epoch, and `worker eval --recipe`
//! reports the same sets from the checkpoint.

use rsb_integration_tests::{binary, fashion_subset, workspace_root};
use std::path::Path;
use std::process::{Command, Output};

fn worker(args: &[&str]) -> Output {
    Command::new(binary("worker"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("running worker")
}

fn ok(run: Output) -> String {
    assert!(run.status.success(), "worker failed:\n{}", String::from_utf8_lossy(&run.stderr));
    String::from_utf8_lossy(&run.stdout).into_owned()
}

/// The validation split again, as ImageNet-V2 (`0`..`9`), flat with a label
/// file, and flat with ImageNet validation names plus a `real.json`.
fn eval_layouts(data: &Path) -> usize {
    let val = data.join("val");
    let mut classes: Vec<String> = std::fs::read_dir(&val)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    let (flat, real) = (data.join("flat"), data.join("realval"));
    std::fs::create_dir_all(&flat).unwrap();
    std::fs::create_dir_all(&real).unwrap();
    let (mut labels, mut real_json) = (String::new(), Vec::new());
    let mut k = 0;
    for (c, class) in classes.iter().enumerate() {
        let v2 = data.join("v2").join(c.to_string());
        std::fs::create_dir_all(&v2).unwrap();
        let mut files: Vec<_> =
            std::fs::read_dir(val.join(class)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            std::fs::copy(&f, v2.join(&name)).unwrap();
            std::fs::copy(&f, flat.join(format!("{class}_{name}"))).unwrap();
            labels.push_str(&format!("{class}_{name}\t{class}\n"));
            k += 1;
            std::fs::copy(&f, real.join(format!("ILSVRC2012_val_{k:08}.png"))).unwrap();
            // Every third image has no valid label (excluded), others one or two.
            real_json.push(match k % 3 {
                0 => vec![],
                1 => vec![c],
                _ => vec![c, (c + 1) % classes.len()],
            });
        }
    }
    std::fs::write(data.join("flat_labels.txt"), labels).unwrap();
    std::fs::write(data.join("real.json"), serde_json::to_string(&real_json).unwrap()).unwrap();
    k
}

#[test]
fn shards_train_and_every_eval_set_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 8, 3);
    let images = eval_layouts(&data);

    let shards = data.join("shards");
    let text = ok(worker(&[
        "data",
        "shard",
        "--src",
        data.join("train").to_str().unwrap(),
        "--out",
        shards.to_str().unwrap(),
        "--shard-size",
        "30",
        "--resize-shorter",
        "24",
        "--quality",
        "90",
    ]));
    assert!(text.contains("80 samples") && text.contains("in 3 shards"), "{text}");
    let classes = std::fs::read_to_string(shards.join("classes.txt")).unwrap();
    assert_eq!(classes.lines().count(), 10);
    let listed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shards.join("shards.json")).unwrap())
            .unwrap();
    let counts: Vec<u64> = listed["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["samples"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![30, 30, 20]);
    // Sharding again into the same folder is refused, not mixed with it.
    let again = worker(&[
        "data",
        "shard",
        "--src",
        data.join("val").to_str().unwrap(),
        "--out",
        shards.to_str().unwrap(),
        "--shard-size",
        "7",
    ]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && stderr.contains("already holds shards"), "{stderr}");
    assert!(!shards.join("shard-000003.tar").exists(), "{stderr}");

    let out = tmp.path().join("run");
    let recipe = workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml");
    let sets = "[{name: v2, kind: v2, root: v2}, \
                 {name: flat, kind: labelled, root: flat, labels: flat_labels.txt}, \
                 {name: real, kind: real, root: realval, labels: real.json}]";
    ok(worker(&[
        "train",
        "--recipe",
        recipe.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--set",
        &format!("data.root={}", data.display()),
        "--set",
        "data.train_split=shards",
        "--set",
        "model.num_classes=10",
        "--set",
        &format!("eval.sets={sets}"),
    ]));
    let epochs: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "epoch")
        .collect();
    let last = epochs.last().unwrap();
    let sets = last["eval_sets"].as_object().unwrap_or_else(|| panic!("no eval_sets in {last}"));
    // Same images, same labels: V2 layout and labelled flat folder agree with val.
    for name in ["v2", "flat"] {
        assert_eq!(sets[name]["top1"], last["top1"], "{name}: {last}");
        assert_eq!(sets[name]["count"], images);
    }
    assert_eq!(
        sets["real"]["count"].as_u64().unwrap() + sets["real"]["excluded"].as_u64().unwrap(),
        images as u64
    );
    assert_eq!(sets["real"]["excluded"], images / 3);

    // worker eval on a flat folder with a label file, without a recipe.
    let ckpt = out.join("checkpoints/epoch-0001/model.safetensors");
    let top1 = last["top1"].as_f64().unwrap();
    let text = ok(worker(&[
        "eval",
        "--model",
        "resnet18",
        "--num-classes",
        "10",
        "--input-size",
        "32",
        "--crop-pct",
        "0.95",
        "--weights",
        ckpt.to_str().unwrap(),
        "--device",
        "cpu",
        "--data",
        data.join("flat").to_str().unwrap(),
        "--labels",
        data.join("flat_labels.txt").to_str().unwrap(),
    ]));
    assert!(text.contains(&format!("top-1 {top1:.3}%")), "{text}");
    // worker eval with the resolved recipe reports the same numbers for every set.
    let text = ok(worker(&[
        "eval",
        "--recipe",
        out.join("recipe.yaml").to_str().unwrap(),
        "--weights",
        ckpt.to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    assert!(text.contains(&format!("top-1 {top1:.3}%")), "{text}");
    for name in ["v2", "flat", "real"] {
        let t1 = sets[name]["top1"].as_f64().unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains(&format!("top-1 {t1:.3}%")), "{line} vs {t1}");
    }

    // An ImageNet-V2 folder missing classes (a half-extracted archive) is
    // scored over what is there, saying how many class folders are missing.
    let part = data.join("v2-part");
    for class in ["0", "1", "2"] {
        let to = part.join(class);
        std::fs::create_dir_all(&to).unwrap();
        for file in std::fs::read_dir(data.join("v2").join(class)).unwrap() {
            let file = file.unwrap().path();
            std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
        }
    }
    let run = worker(&[
        "eval",
        "--model",
        "resnet18",
        "--num-classes",
        "10",
        "--input-size",
        "32",
        "--weights",
        ckpt.to_str().unwrap(),
        "--device",
        "cpu",
        "--v2",
        "--data",
        part.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("7 of the 10 class folders are missing"), "{stderr}");
}

/// The RSB recipe's own settings, shrunk to a few Fashion-MNIST images and
/// resnet18 at 32 px, 2 epochs.
fn rsb_a3_tiny(data: &Path, out: &Path) -> Vec<String> {
    let recipe = workspace_root().join("recipes/resnet50_a3.yaml");
    let mut args: Vec<String> = vec![
        "train".into(),
        "--recipe".into(),
        recipe.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--device".into(),
        "cpu".into(),
    ];
    for set in [
        format!("data.root={}", data.display()),
        "model.name=resnet18".into(),
        "model.num_classes=10".into(),
        "augment.input_size=32".into(),
        "eval.input_size=32".into(),
        "eval.batch_size=16".into(),
        "batch.global_size=24".into(),
        "batch.micro_size=8".into(),
        "schedule.cosine.epochs=2".into(),
        "schedule.cosine.warmup_epochs=0".into(),
    ] {
        args.push("--set".into());
        args.push(set);
    }
    args
}

#[test]
fn the_rsb_recipes_score_real_and_v2_after_the_last_epoch_and_refuse_missing_sets() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 8, 3);
    let images = eval_layouts(&data);

    // As shipped, ReaL's labels and V2's folder are not there: the run stops
    // before training, naming the missing path.
    let out = tmp.path().join("missing");
    let args = rsb_a3_tiny(&data, &out);
    let run = worker(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "ran without its evaluation sets:\n{stderr}");
    let error =
        stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(error.starts_with("error: eval.sets.real: ") && error.contains("real.json"), "{error}");
    assert!(!out.join("metrics.jsonl").exists(), "the run started: {stderr}");

    // Pointed at the sets (by name), both are scored after the last epoch only.
    let out = tmp.path().join("run");
    let mut args = rsb_a3_tiny(&data, &out);
    for set in
        ["eval.sets.real.root=realval", "eval.sets.real.labels=real.json", "eval.sets.v2.root=v2"]
    {
        args.push("--set".into());
        args.push(set.into());
    }
    ok(worker(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    let epochs = rsb_integration_tests::run_records(&out, "epoch");
    assert_eq!(epochs.len(), 2);
    assert!(
        epochs[0]["eval_sets"].as_object().is_none_or(|s| s.is_empty()),
        "sets marked `at: end` were scored before the end: {}",
        epochs[0]
    );
    let sets = epochs[1]["eval_sets"].as_object().unwrap_or_else(|| panic!("{}", epochs[1]));
    assert_eq!(sets.keys().collect::<Vec<_>>(), ["real", "v2"]);
    assert_eq!(sets["v2"]["count"], images);
    assert_eq!(sets["v2"]["top1"], epochs[1]["top1"]);

    // Leaving one out is explicit: `=null` removes it.
    let out = tmp.path().join("no-v2");
    let mut args = rsb_a3_tiny(&data, &out);
    for set in
        ["eval.sets.real.root=realval", "eval.sets.real.labels=real.json", "eval.sets.v2=null"]
    {
        args.push("--set".into());
        args.push(set.into());
    }
    args.extend(["--max-updates".into(), "1".into()]);
    ok(worker(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    let resolved = std::fs::read_to_string(out.join("recipe.yaml")).unwrap();
    assert!(resolved.contains("name: real") && !resolved.contains("name: v2"), "{resolved}");
}
