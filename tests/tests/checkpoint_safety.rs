//! End-to-end checks of the `worker` binary that a run folder and its
//! checkpoints are never mixed, lost or read unverified: a `--resume` of
//! another run into a folder that holds a run is refused and changes
//! nothing there; a checkpoint replaced by a resumed run is set aside, not
//! deleted; `worker eval` and `worker infer` verify a checkpoint's weights
//! (and take a checkpoint or run folder as `--weights`), and name a PyTorch
//! pickle as such; a second trainer on a run folder is refused while the
//! first one lives (a `worker train`, or a job's rank 0), and the folder is
//! free again once it is killed; a job's rank 0 that cannot get the lock
//! (a previous rank 0 not stopped yet) trains on without it, saying so,
//! but writes no checkpoint before it has it (it waits for it there, and
//! fails naming the holder when it never comes); a
//! second `coordinator up` on a live coordinator's folder is refused before
//! it writes there; `--auto-resume` starts a run, continues it from its
//! newest checkpoint, and starts one that wrote no checkpoint again with its
//! earlier records set aside.

use rsb_integration_tests::processes::{signal, wait_with_timeout};
use rsb_integration_tests::{
    binary, fashion_subset, small_batch_sets, tiny_recipe, workspace_root,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn worker(args: &[String]) -> Command {
    let mut command = Command::new(binary("worker"));
    command.args(args).current_dir(workspace_root());
    command
}

/// The arguments of `worker train` of the tiny recipe on `data` into `out`.
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--recipe",
        tiny_recipe().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--set",
        &format!("data.root={}", data.display()),
        "--set",
        "model.num_classes=10",
        "--set",
        "runtime.keep_last_checkpoints=5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    worker(&train_args(data, out, extra)).output().expect("running worker train")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every file under `dir` with its bytes, sorted by path.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else {
                files.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// The `abandoned-*` folders in `dir`: what a run set aside.
fn set_aside_folders(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with(rsb_job::checkpoint::SET_ASIDE_PREFIX)
        })
        .collect()
}

#[test]
fn a_resume_of_another_run_is_refused_and_a_replaced_checkpoint_is_set_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 16, 4);
    let three_epochs = ["--set", "schedule.cosine.epochs=3"];
    let run1 = tmp.path().join("run1");
    let first = train(&data, &run1, &three_epochs);
    assert!(first.status.success(), "{}", stderr(&first));
    let run6 = tmp.path().join("run6");
    let other = ["--set", "schedule.cosine.epochs=1", "--set", "optimizer.lamb.lr=0.004"];
    let sixth = train(&data, &run6, &other);
    assert!(sixth.status.success(), "{}", stderr(&sixth));

    // run6's checkpoint into run1: refused, run1 left byte for byte as it
    // was (but for the lock file, which names the last process that held it).
    let lock = run1.join(rsb_job::run_folder::LOCK_FILE);
    let unlocked = |dir: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        snapshot(dir).into_iter().filter(|(p, _)| p != &lock).collect()
    };
    let before = unlocked(&run1);
    let foreign = run6.join("checkpoints/epoch-0001");
    let mut args = other.to_vec();
    args.extend(["--resume", foreign.to_str().unwrap()]);
    let mixed = train(&data, &run1, &args);
    let log = stderr(&mixed);
    assert!(!mixed.status.success(), "another run was resumed into run1:\n{log}");
    for said in [run1.to_str().unwrap(), foreign.to_str().unwrap(), "fresh --out"] {
        assert!(log.contains(said), "{said} missing:\n{log}");
    }
    assert_eq!(unlocked(&run1), before, "run1 changed");

    // run1's own epoch 1 resumed: epoch 2 is trained again, and the
    // epoch-0002 it replaces is set aside whole with epoch-0003.
    let old_second = snapshot(&run1.join("checkpoints/epoch-0002"));
    let mut args = three_epochs.to_vec();
    let own = run1.join("checkpoints/epoch-0001");
    args.extend(["--resume", own.to_str().unwrap()]);
    let resumed = train(&data, &run1, &args);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let asides = set_aside_folders(&run1.join("checkpoints"));
    assert_eq!(asides.len(), 1, "{asides:?}");
    let kept = asides[0].join("epoch-0002");
    assert!(kept.join("manifest.json").is_file(), "the replaced epoch-0002 was not set aside");
    let kept_files: Vec<(String, Vec<u8>)> = snapshot(&kept)
        .into_iter()
        .map(|(p, bytes)| (p.file_name().unwrap().to_string_lossy().into_owned(), bytes))
        .collect();
    let old_files: Vec<(String, Vec<u8>)> = old_second
        .into_iter()
        .map(|(p, bytes)| (p.file_name().unwrap().to_string_lossy().into_owned(), bytes))
        .collect();
    assert_eq!(kept_files, old_files, "the replaced epoch-0002 was not kept as it was");
    assert!(asides[0].join("epoch-0003/manifest.json").is_file());
}

#[test]
fn eval_and_infer_verify_checkpoint_weights_and_name_a_pytorch_pickle() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 16, 4);
    let run = tmp.path().join("run");
    let trained = train(&data, &run, &["--set", "schedule.cosine.epochs=1"]);
    assert!(trained.status.success(), "{}", stderr(&trained));
    let checkpoint = run.join("checkpoints/epoch-0001");
    let eval = |weights: &Path| {
        let args: Vec<String> = [
            "eval",
            "--model",
            "resnet18",
            "--num-classes",
            "10",
            "--weights",
            weights.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--input-size",
            "32",
            "--device",
            "cpu",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        worker(&args).output().unwrap()
    };
    let input = tmp.path().join("x.npy");
    tch::Tensor::zeros([1, 3, 32, 32], (tch::Kind::Float, tch::Device::Cpu))
        .write_npy(&input)
        .unwrap();
    let infer = |weights: &Path| {
        let args: Vec<String> = [
            "infer",
            "--model",
            "resnet18",
            "--num-classes",
            "10",
            "--weights",
            weights.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            tmp.path().join("logits.npy").to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        worker(&args).output().unwrap()
    };

    // One value changed: refused by both, naming the file and the checksum.
    let model = checkpoint.join("model.safetensors");
    let good = std::fs::read(&model).unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    std::fs::write(&model, &flipped).unwrap();
    for (what, output) in [("eval", eval(&model)), ("infer", infer(&model))] {
        let log = stderr(&output);
        assert!(!output.status.success(), "{what} read corrupt weights:\n{log}");
        assert!(log.contains(model.to_str().unwrap()) && log.contains("SHA-256"), "{what}: {log}");
    }
    std::fs::write(&model, &good).unwrap();

    // A checkpoint folder and a run folder stand for their weights.
    let by_file = eval(&model);
    assert!(by_file.status.success(), "{}", stderr(&by_file));
    let scores = String::from_utf8_lossy(&by_file.stdout).into_owned();
    for folder in [&checkpoint, &run] {
        let by_folder = eval(folder);
        assert!(by_folder.status.success(), "{}: {}", folder.display(), stderr(&by_folder));
        assert_eq!(String::from_utf8_lossy(&by_folder.stdout), scores);
        let logits = infer(folder);
        assert!(logits.status.success(), "{}: {}", folder.display(), stderr(&logits));
    }

    // timm's .pth (torch.save's zip): named as such, with the conversion.
    let pth = tmp.path().join("resnet18_a1_in1k.pth");
    std::fs::write(&pth, b"PK\x03\x04\x00\x00\x08\x08archive/data.pkl").unwrap();
    let output = infer(&pth);
    let log = stderr(&output);
    assert!(!output.status.success());
    assert!(log.contains("PyTorch zip file") && log.contains("safetensors.torch"), "{log}");
    assert_eq!(log.matches("HeaderTooLarge").count(), 0, "{log}");
}

#[test]
fn a_second_trainer_on_a_run_folder_is_refused_while_the_first_lives() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 16, 4);
    let run = tmp.path().join("run");
    let long = ["--set", "schedule.cosine.epochs=500"];
    let first: Child = worker(&train_args(&data, &run, &long))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = first.id();
    // It trains on, well past its first checkpoint.
    let started = Instant::now();
    while !run.join("checkpoints/epoch-0001/manifest.json").is_file() {
        assert!(started.elapsed() < Duration::from_secs(300), "no first checkpoint");
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut args = long.to_vec();
    args.extend(["--resume", run.to_str().unwrap(), "--max-updates", "0"]);
    let asked = Instant::now();
    let second = train(&data, &run, &args);
    let log = stderr(&second);
    assert!(!second.status.success(), "a second trainer ran on a live run folder:\n{log}");
    assert!(asked.elapsed() < Duration::from_secs(60), "refused only after {:?}", asked.elapsed());
    for said in [run.to_str().unwrap(), "in use", &format!("pid {pid} ")] {
        assert!(log.contains(said), "{said} missing:\n{log}");
    }

    // Killed, the first one lets go: the folder can be resumed at once.
    assert!(signal(pid, "KILL"));
    let _ = wait_with_timeout(first, Duration::from_secs(30), "the killed trainer");
    let third = train(&data, &run, &args);
    assert!(third.status.success(), "{}", stderr(&third));
}

/// `worker train --auto-resume`, started again by a scheduler while the
/// earlier start still writes its stop's checkpoint (it holds the run
/// folder's lock), waits for it for longer than a plain `worker train`
/// would (`LOCK_WAIT`, 10 s) and trains once it is released (held 20 s).
#[test]
fn worker_train_auto_resume_waits_for_the_earlier_start_to_let_go_of_the_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 16, 4);
    let run = tmp.path().join("run");
    let held = rsb_job::RunFolderLock::acquire(&run, Duration::ZERO).unwrap();
    // Well past the plain wait, so that a slow start of the worker cannot
    // hide a wait that gave up at LOCK_WAIT.
    let hold_for = rsb_job::run_folder::LOCK_WAIT + Duration::from_secs(10);
    let asked = Instant::now();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(hold_for);
        drop(held);
    });
    let started = train(&data, &run, &["--auto-resume", "--max-updates", "1"]);
    let waited = asked.elapsed();
    releaser.join().unwrap();
    assert!(started.status.success(), "{}", stderr(&started));
    assert!(waited >= hold_for, "trained after {waited:?}, with the lock held {hold_for:?}");
}

/// `coordinator up --local --nodes 1` of the tiny recipe on `data` into
/// `out` for `epochs` epochs, its stderr (the ranks' lines too) piped.
fn local_job(data: &Path, out: &Path, epochs: u32) -> Child {
    local_job_command(data, out, epochs, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the coordinator")
}

/// The command of [`local_job`] with more `--set`s.
fn local_job_command(data: &Path, out: &Path, epochs: u32, sets: &[&str]) -> Command {
    let _ = binary("worker"); // built before the coordinator starts it
    let mut cmd = Command::new(binary("coordinator"));
    cmd.args(["up", "--local", "--nodes", "1", "--recipe"])
        .arg(tiny_recipe())
        .arg("--out")
        .arg(out);
    for set in small_batch_sets(data).into_iter().chain([
        "data.loader_threads=1".to_string(),
        format!("schedule.cosine.epochs={epochs}"),
        "eval.every_epochs=1000".to_string(),
    ]) {
        cmd.args(["--set", &set]);
    }
    for set in sets {
        cmd.args(["--set", set]);
    }
    cmd.current_dir(workspace_root());
    cmd
}

#[test]
fn a_jobs_rank_0_holds_the_run_folder_and_writes_no_checkpoint_without_its_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 12, 1);

    // While a job trains, its rank 0 holds the run folder: a `worker
    // train` on it is refused, naming the folder.
    let run = tmp.path().join("job");
    let job = local_job(&data, &run, 500);
    let started = Instant::now();
    while rsb_job::checkpoint::list(&run).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(300), "no first checkpoint");
        std::thread::sleep(Duration::from_millis(100));
    }
    let args = ["--resume", run.to_str().unwrap(), "--max-updates", "0"];
    let second = train(&data, &run, &args);
    let log = stderr(&second);
    assert!(!second.status.success(), "a trainer ran on a job's live run folder:\n{log}");
    assert!(log.contains("in use") && log.contains(run.to_str().unwrap()), "{log}");
    assert!(signal(job.id(), "TERM"));
    let _ = wait_with_timeout(job, Duration::from_secs(60), "the stopped job");

    // A lock held elsewhere (a previous rank 0 not stopped yet) delays a
    // job's rank 0 by its wait, then it trains without it, saying so, and
    // waits for it again before its first checkpoint write: released then,
    // the checkpoint is written under it and the job finishes.
    let run = tmp.path().join("held");
    let held = hold_run_folder_lock(&run);
    let log_path = tmp.path().join("held.log");
    let started = Instant::now();
    let mut job = local_job_command(&data, &run, 1, &[])
        .env("RSB_WRITER_LOCK_WAIT_MS", "60000")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("starting the coordinator");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    while !log().contains("waiting up to 60s for the run folder's lock before the first") {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no wait at the checkpoint:\n{}",
            log()
        );
        assert!(job.try_wait().unwrap().is_none(), "the job ended:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(log().contains("going on without it"), "no warning:\n{}", log());
    assert!(started.elapsed() >= rsb_job::run_folder::LOCK_WAIT, "{:?}", started.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    assert!(rsb_job::checkpoint::list(&run).is_empty(), "a checkpoint beside another writer");
    let released = std::time::SystemTime::now();
    drop(held);
    let output = wait_with_timeout(job, Duration::from_secs(300), "the job");
    assert!(output.status.success(), "the job failed after the lock was let go:\n{}", log());
    let first = rsb_job::checkpoint::list(&run).into_iter().next().expect("no checkpoint written");
    let written = first.join("manifest.json").metadata().and_then(|m| m.modified()).unwrap();
    assert!(written >= released, "{} was written before the lock was let go", first.display());

    // Held for good (a second trainer on the folder): the job fails at its
    // first checkpoint, naming the holder, and writes none.
    let run = tmp.path().join("held-for-good");
    let _held = hold_run_folder_lock(&run);
    let output = wait_with_timeout(
        local_job_command(&data, &run, 1, &[])
            .env("RSB_WRITER_LOCK_WAIT_MS", "1000")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the coordinator"),
        Duration::from_secs(300),
        "the job",
    );
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a job wrote beside another writer:\n{log}");
    let failure = log.lines().find(|l| l.contains("job failed")).unwrap_or_default();
    assert!(
        failure.contains("is in use") && failure.contains(HOLDER),
        "the failure does not name the holder: {failure}\n{log}"
    );
    assert!(rsb_job::checkpoint::list(&run).is_empty(), "a checkpoint beside another writer");
}

/// Who [`hold_run_folder_lock`] says holds the lock, as a process would.
const HOLDER: &str = "pid 4242 on another-host";

/// Creates `run` and holds its writer lock, as another process would, until
/// the value is dropped.
fn hold_run_folder_lock(run: &Path) -> nix::fcntl::Flock<std::fs::File> {
    std::fs::create_dir_all(run).unwrap();
    let path = run.join(rsb_job::run_folder::LOCK_FILE);
    std::fs::write(&path, format!("{HOLDER}\n")).unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("locking the run folder")
}

#[test]
fn a_second_coordinator_on_a_live_ones_folder_is_refused_before_it_writes_there() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let up = |lr: &str| {
        let mut cmd = Command::new(binary("coordinator"));
        cmd.args(["up", "--nodes", "1", "--listen", "127.0.0.1:0", "--recipe"])
            .arg(tiny_recipe())
            .arg("--out")
            .arg(&out)
            .args(["--set", &format!("optimizer.lamb.lr={lr}")])
            .env("RSB_JOB_TOKEN", "lock-test-token-5d1c")
            .current_dir(workspace_root())
            .stdin(Stdio::null());
        cmd
    };
    // The first waits for its worker host, which never comes.
    let first = up("0.001").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let recipe = out.join("recipe.yaml");
    let started = Instant::now();
    while !recipe.is_file() {
        assert!(started.elapsed() < Duration::from_secs(60), "the first coordinator wrote nothing");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = std::fs::read(&recipe).unwrap();
    // (Were it not refused, it would wait for its host no longer than this.)
    let second = up("0.5").args(["--join-timeout-secs", "5"]).output().unwrap();
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second coordinator ran on a live one's folder:\n{said}");
    let pid = format!("pid {} ", first.id());
    for expected in ["in use", out.to_str().unwrap(), pid.as_str()] {
        assert!(said.contains(expected), "{expected} missing:\n{said}");
    }
    assert_eq!(std::fs::read(&recipe).unwrap(), before, "the second coordinator wrote the recipe");
    // Once the first has exited, the folder is free: another starts, and
    // listens (until its join timeout, as no host joins).
    assert!(signal(first.id(), "KILL"));
    let _ = wait_with_timeout(first, Duration::from_secs(30), "the killed coordinator");
    let third = up("0.001").args(["--join-timeout-secs", "1"]).output().unwrap();
    let (said, printed) =
        (String::from_utf8_lossy(&third.stderr), String::from_utf8_lossy(&third.stdout));
    assert!(printed.contains("coordinator listening on"), "{printed}\n{said}");
}

#[test]
fn auto_resume_starts_a_run_continues_it_and_starts_one_without_a_checkpoint_again() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 8, 1);
    let run = tmp.path().join("run");
    let epochs = |n: u32| format!("schedule.cosine.epochs={n}");
    let auto = |extra: &[&str]| {
        let mut args = vec!["--auto-resume"];
        args.extend(extra);
        train(&data, &run, &args)
    };

    // Stopped within its first epoch, before any checkpoint.
    let two = epochs(2);
    let stopped = auto(&["--set", &two, "--max-updates", "2"]);
    assert!(stopped.status.success(), "{}", stderr(&stopped));
    assert!(stderr(&stopped).contains("no run there yet"), "{}", stderr(&stopped));
    assert!(rsb_job::checkpoint::list(&run).is_empty(), "a checkpoint after 2 updates");
    let first_records = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();

    // The same command again starts it again; the earlier records are set
    // aside whole, and the new log starts from update 1.
    let again = auto(&["--set", &two]);
    let log = stderr(&again);
    assert!(again.status.success(), "{log}");
    assert!(log.contains("wrote no checkpoint; starting it again"), "{log}");
    let asides = set_aside_folders(&run);
    assert_eq!(asides.len(), 1, "{asides:?}");
    assert_eq!(std::fs::read_to_string(asides[0].join("metrics.jsonl")).unwrap(), first_records);
    let records = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let step_records: Vec<rsb_job::MetricsRecord> = records
        .lines()
        .filter_map(|l| serde_json::from_str::<rsb_job::MetricsRecord>(l).ok())
        .filter(|r| matches!(r, rsb_job::MetricsRecord::Step { .. }))
        .collect();
    let steps: Vec<u64> = step_records.iter().map(rsb_job::MetricsRecord::step).collect();
    // Each log step says how much of its window the trainer waited for input.
    for record in &step_records {
        let rsb_job::MetricsRecord::Step { input_wait_share: Some(share), .. } = record else {
            panic!("a step record without its input wait: {record:?}")
        };
        assert!((0.0..=1.0).contains(share), "{record:?}");
    }
    assert_eq!(steps.first(), Some(&1), "{records}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "records of two starts mixed: {steps:?}");
    let second = run.join("checkpoints/epoch-0002");
    assert!(second.join("manifest.json").is_file(), "{log}");

    // Once more with a third epoch: it continues from epoch 2.
    let three = epochs(3);
    let more = auto(&["--set", &three]);
    let log = stderr(&more);
    assert!(more.status.success(), "{log}");
    assert!(log.contains(&format!("continuing from {}", second.display())), "{log}");
    assert!(run.join("checkpoints/epoch-0003/manifest.json").is_file(), "{log}");

    // Not with another recipe: the epochs left at the recipe's 1, unexplained.
    let other = auto(&[]);
    assert!(!other.status.success());
    assert!(stderr(&other).contains("schedule.cosine.epochs"), "{}", stderr(&other));
}

/// A tmpfs of `bytes` mounted at `dir` (made), unmounted when dropped.
/// `None` where it cannot be mounted (not root).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// A tmpfs of `bytes` at `dir` for a test, or `None`, said as
    /// [`rsb_integration_tests::require`] says it, where none can be
    /// mounted (not root, or no tmpfs).
    fn for_test(dir: &Path, bytes: u64) -> Option<Tmpfs> {
        use rsb_integration_tests::{is_root, require};
        if !require(is_root(), "root, to mount a tmpfs") {
            return None;
        }
        let mounted = Tmpfs::mount(dir, bytes);
        if !require(mounted.is_some(), "a tmpfs mount") {
            return None;
        }
        mounted
    }

    fn mount(dir: &Path, bytes: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .status()
            .ok()?
            .success();
        mounted.then(|| Tmpfs { dir: dir.to_path_buf() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A save killed midway (rank 0 preempted while it wrote) leaves its
/// staging folder, which only retention after a save that succeeded
/// deleted: on a disk the leftover nearly fills, the resumed run's saves
/// failed, every one, for want of space. The save that fails now deletes
/// the leftover and writes the checkpoint.
#[test]
fn a_save_killed_midway_leaves_nothing_that_makes_the_next_saves_fail() {
    let tmp = tempfile::tempdir().unwrap();
    // ResNet-18's checkpoint (10 classes) is about 128 MiB: two fit in
    // 300 MiB (the new one is written before retention deletes the old),
    // not with a leftover of 100 MiB beside them.
    let small = tmp.path().join("small");
    let Some(mounted) = Tmpfs::for_test(&small, 300 << 20) else {
        return;
    };
    let data = fashion_subset(tmp.path(), 6, 1);
    let run = small.join("run");
    let epoch = |n: u32| format!("schedule.cosine.epochs={n}");
    let first =
        train(&data, &run, &["--set", &epoch(1), "--set", "runtime.keep_last_checkpoints=1"]);
    assert!(first.status.success(), "{}", stderr(&first));
    // What the save of epoch-0002 left when it was killed: its staging
    // folder, its weights written, the optimizer's moments half.
    let torn = run.join("checkpoints/.epoch-0002.tmp-4242-00000000deadbeef");
    std::fs::create_dir(&torn).unwrap();
    std::fs::write(torn.join("model.safetensors"), vec![1u8; 45 << 20]).unwrap();
    std::fs::write(torn.join("optimizer.safetensors"), vec![2u8; 55 << 20]).unwrap();
    let resumed = train(
        &data,
        &run,
        &[
            "--resume",
            run.to_str().unwrap(),
            "--set",
            &epoch(2),
            "--set",
            "runtime.keep_last_checkpoints=1",
        ],
    );
    let checkpoints = rsb_job::checkpoint::list(&run);
    let newest = checkpoints.last().map(|c| rsb_job::checkpoint::verify(c).map(drop));
    let torn_left = torn.exists();
    drop(mounted);
    let log = stderr(&resumed);
    assert!(resumed.status.success(), "the save after a killed one failed:\n{log}");
    assert!(
        log.contains("deleted the 1 incomplete folder(s) that interrupted saves had left"),
        "{log}"
    );
    assert!(!torn_left, "the killed save's folder is still there");
    let names: Vec<String> =
        checkpoints.iter().map(|c| c.file_name().unwrap().to_string_lossy().into()).collect();
    // The best by top-1 (epoch-0001 at a tie) may be kept beside the newest.
    assert_eq!(names.last().map(String::as_str), Some("epoch-0002"), "{log}");
    assert!(matches!(newest, Some(Ok(()))), "epoch-0002 does not verify: {newest:?}");
}

/// A job whose run folder is on a file system that holds fewer checkpoints
/// than the recipe keeps: at its first checkpoint the coordinator warns,
/// with the figures, that one more fits, and at the second that the next
/// save fails; that save fails the job, naming "No space left on device"
/// and the checkpoint still intact, which verifies. (CI ran out of disk
/// this way in a test, 16 minutes in, with no word before.)
#[test]
fn a_run_folder_short_of_disk_is_warned_of_before_a_save_fails() {
    let tmp = tempfile::tempdir().unwrap();
    // ResNet-18's checkpoint (10 classes) is about 128 MiB: its weights
    // and LAMB's two moments. Two and a half fit.
    let small = tmp.path().join("small");
    let Some(mounted) = Tmpfs::for_test(&small, 330 << 20) else {
        return;
    };
    let data = fashion_subset(tmp.path(), 12, 1);
    let run = small.join("job");
    // The coordinator's console (stdout) and log (stderr), both read.
    let job = local_job_command(&data, &run, 3, &["runtime.keep_last_checkpoints=3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the coordinator");
    let ended = wait_with_timeout(job, Duration::from_secs(300), "the job on a small disk");
    let checkpoints = rsb_job::checkpoint::list(&run);
    let newest = checkpoints.last().map(|c| rsb_job::checkpoint::verify(c).map(drop));
    drop(mounted);
    let console = String::from_utf8_lossy(&ended.stdout).into_owned();
    let log = format!("{console}{}", stderr(&ended));
    assert!(!ended.status.success(), "the job fit:\n{log}");
    let warnings: Vec<&str> =
        console.lines().filter(|l| l.starts_with("warning: the run folder")).collect();
    assert_eq!(warnings.len(), 2, "{log}");
    assert!(warnings[0].contains("1 more save(s) fit, then one will fail"), "{log}");
    assert!(warnings[0].contains("keeps 3, 1 there now"), "{log}");
    assert!(warnings[1].contains("the next save will fail"), "{log}");
    for warning in &warnings {
        assert!(warning.contains(" MiB free") && warning.contains(" MiB: "), "{warning}");
    }
    // Said at the second save, an epoch before the save that fails, which
    // names its cause and what is intact.
    let said = console.find(warnings[1]).unwrap();
    assert!(console.find("epoch 2 done").is_some_and(|done| said < done), "{log}");
    let failure = stderr(&ended);
    assert!(failure.contains("job failed"), "{log}");
    assert!(failure.contains("checkpoint epoch-0003 not written"), "{log}");
    assert!(failure.contains("No space left on device"), "{log}");
    assert!(failure.contains("epoch-0002 is intact"), "{log}");
    let names: Vec<String> =
        checkpoints.iter().map(|c| c.file_name().unwrap().to_string_lossy().into()).collect();
    assert_eq!(names, ["epoch-0001", "epoch-0002"], "{log}");
    assert!(matches!(newest, Some(Ok(()))), "epoch-0002 does not verify: {newest:?}");
}
