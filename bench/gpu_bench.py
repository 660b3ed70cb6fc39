#!/usr/bin/env python3
"""The measurements of `bench/gpu.sh`, ours against timm 1.0.31 on one device.

Four checks, each bounded by its own timeout, each ours and (where timm has a
counterpart) timm on the same device, the same settings, one after the other:

  synthetic  ResNet-50 training steps (A2's LAMB + BCE, bf16, channels-last)
             on random input, micro-batch 256 at 224 px: `worker bench step`
             against `bench/timm/step_bench.py`, alternated over two rounds,
             then one call each with `--phase-times` whose phase medians
             (forward, backward, update) go into the row's note;
  jpeg       the same model trained on a folder of real JPEG photos through
             each side's own loader (16 threads / DataLoader workers):
             `worker train` against `bench/timm/reference_train.py` (timm's
             components, the oracle, fed with train.py's default GPU input
             path: its prefetcher, FastCollateMixup in the workers), given
             the resolved recipe ours wrote;
  nccl1      NCCL at world size 1 with every collective call made
             (`distributed.collectives_at_world_size_one: true`), with
             libtorch's sync debug mode on within every update
             (RSB_CUDA_SYNC_DEBUG=warn): the note counts the synchronising
             CUDA calls an update made (the goal is none);
  ring2      a 2-rank job on the one device over the TCP ring
             (`distributed.backend: ring`, CUDA tensors staged through pinned
             host memory): the multi-rank GPU path, since NCCL refuses two
             ranks on one GPU (no timm counterpart). The two jobs run one
             epoch each, with a 60 s collective timeout.

Throughput is images per second of the training steps: the images of the
logged windows after the first (which holds start-up) over their time, a
ratio of sums, not a median of the windows' rates. A loader that keeps
several batches in flight delivers them in bursts: a median would see only
the windows that found batches waiting, and report the device's speed. Peak memory is the
device memory in use (nvidia-smi, minus what was in use before the run) on a
GPU, the resident set of the process on a CPU; both sides are measured the
same way.

The runs work in a scratch folder (`--work`, a fresh temporary one by
default: the photo folder and the checkpoints are gigabytes). OUT receives
three files only, since the device tool brings back at most 8: summary.md
and summary.json (its rows typed as below), rewritten after every check so
that a run cut short still leaves its table, and logs.tar.gz (every
command's output, each run's metrics.jsonl and resolved recipe).

`--dry-run` rehearses everything on the CPU at toy sizes (CI runs it): same
commands, same parsing, same table.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# MLPerf Training v4.0, ResNet-50, 8x H200 (MXNet + DALI): about 7,950 img/s per GPU
# (mlcommons/training_results_v4.0, NVIDIA/results/h200_ngc24.04_mxnet/resnet/result_0.txt:
# steady ~63,600 img/s over 8 GPUs).
MLPERF_IMAGES_PER_SEC_PER_H200 = 7950.0
MLPERF_SOURCE = "MLPerf Training v4.0, 8x H200, MXNet + DALI, h200_ngc24.04_mxnet"
# Collective timeout of the two jobs: a hang ends in two minutes, not in the
# recipe's ten, and leaves the other checks their time.
JOB_COLLECTIVE_TIMEOUT_S = 120
# A log file larger than this goes into logs.tar.gz as its head and tail.
LOG_BYTES_KEPT = 2 << 20
# libtorch's sync debug mode, which the worker turns on within every update
# on a GPU when asked (RSB_CUDA_SYNC_DEBUG), and its warning.
SYNC_DEBUG_ENV = "RSB_CUDA_SYNC_DEBUG"
SYNC_WARNING = "called a synchronizing CUDA operation"


@dataclass
class Sizes:
    """What each check runs at: the real sizes on a GPU, toy ones in a dry run."""

    device: str
    model: str
    micro_batch: int
    image_size: int
    num_classes: int
    steps: int
    warmup: int
    train_updates: int
    loader_threads: int
    classes: int
    train_per_class: int
    val_per_class: int

    @staticmethod
    def for_mode(dry_run: bool) -> "Sizes":
        if dry_run:
            return Sizes("cpu", "resnet50", 8, 32, 10, 2, 1, 4, 2, 4, 12, 2)
        # The jpeg check's 48 updates of 256 stay within one epoch of 8 x 1,600
        # photos (50 updates): no epoch-end evaluation or checkpoint in its
        # windows, which span 8 updates (half a round of the 16 loader threads).
        return Sizes("cuda", "resnet50", 256, 224, 1000, 30, 10, 48, 16, 8, 1600, 8)


@dataclass
class Side:
    """One side's result of a check."""

    images_per_sec: float | None = None
    step_ms: float | None = None
    peak_memory_mib: float | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass
class Check:
    """A row of the summary."""

    name: str
    what: str
    ours: Side = field(default_factory=Side)
    timm: Side | None = None
    note: str | None = None

    def ratio(self) -> float | None:
        if self.timm is None or not self.ours.images_per_sec or not self.timm.images_per_sec:
            return None
        return self.ours.images_per_sec / self.timm.images_per_sec

    def ok(self) -> bool:
        sides = [self.ours] + ([self.timm] if self.timm is not None else [])
        return all(s.error is None and s.images_per_sec for s in sides)


class PeakMemory:
    """Samples the memory a run uses while it runs: the device's memory in
    use (nvidia-smi) on a GPU, the process's resident set on a CPU."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.pid: int | None = None
        self.peak = 0.0
        self.baseline = self._gpu_used() if on_gpu else 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _gpu_used() -> float:
        """MiB in use on the GPU the checks run on (NaN when nvidia-smi cannot say)."""
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  f"--id={gpu}"], capture_output=True, text=True, timeout=20)
            return float(out.stdout.strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return float("nan")

    def _rss_mib(self) -> float:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return 0.0

    def _poll(self):
        # Half a second: nvidia-smi is a process start per look, beside 16
        # loader threads.
        while not self._stop.wait(0.5 if self.on_gpu else 0.1):
            if self.on_gpu:
                self.peak = max(self.peak, self._gpu_used() - self.baseline)
            elif self.pid is not None:
                self.peak = max(self.peak, self._rss_mib())

    def peak_mib(self) -> float | None:
        """The peak, or None when it could not be measured (nvidia-smi failed)."""
        if math.isnan(self.peak) or math.isnan(self.baseline) or self.peak <= 0:
            return None
        return self.peak

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def archived(log: Path) -> str:
    """Where `log` is found afterwards: its member of OUT/logs.tar.gz (the
    work folder is temporary)."""
    return f"logs.tar.gz: logs/{log.name}" if log.parent.name == "logs" else f"logs.tar.gz: {log.name}"


# The process groups of the commands running now (each in a session of its
# own): a SIGTERM kills them before the bench exits, so none keeps the GPU
# or writes into the work folder as it is removed.
RUNNING: set[int] = set()


def on_sigterm(signum, frame):
    for pgid in list(RUNNING):
        try:
            os.killpg(pgid, 9)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def run(cmd: list[str], log: Path, timeout: float, memory: PeakMemory | None = None,
        env: dict | None = None) -> tuple[str, float]:
    """Runs `cmd` (stdout and stderr to `log`), returns (stdout text, seconds).
    Raises RuntimeError naming the command, its exit status and its last
    output lines when it fails or outlives `timeout`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True,
                                env={**os.environ, **(env or {})}, cwd=REPO, start_new_session=True)
        RUNNING.add(proc.pid)
        if memory is not None:
            memory.pid = proc.pid
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rest, _ = proc.communicate()
            # What it printed before the kill is what a hang is diagnosed from.
            out.write(rest or "")
            raise RuntimeError(f"{Path(cmd[0]).name} ran past its {timeout:.0f} s limit ({archived(log)})")
        finally:
            RUNNING.discard(proc.pid)
        out.write(stdout)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        tail = " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"{Path(cmd[0]).name} exited with {proc.returncode}: {tail[-400:]} ({archived(log)})")
    return stdout, seconds


def last_json(stdout: str, what: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{what} printed no JSON line")


def step_windows(metrics: Path) -> list[tuple[int, float, dict]]:
    """The step windows of a metrics.jsonl after the first (the first holds
    the start-up): (updates, seconds, record) each, a window's updates being
    `step` minus the previous record's, its seconds its updates over its
    rate (the batch size cancels out)."""
    if not metrics.exists():
        raise RuntimeError(f"{metrics} was not written")
    windows = []
    previous = 0
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RuntimeError(f"{metrics}:{n}: not JSON: {e}")
        if record.get("kind") == "step" and record.get("images_per_sec"):
            updates = int(record["step"]) - previous
            if updates > 0:
                windows.append((updates, updates / float(record["images_per_sec"]), record))
            previous = int(record["step"])
        elif record.get("kind") == "epoch" and "step" in record:
            previous = int(record["step"])
    if not windows:
        raise RuntimeError(f"{metrics} holds no step record with images_per_sec")
    return windows[1:] if len(windows) > 1 else windows


def step_throughput(metrics: Path) -> float:
    """Images/s over the step windows of a metrics.jsonl after the first:
    the windows' images over their time."""
    windows = step_windows(metrics)
    return sum(u for u, _, _ in windows) / sum(t for _, t, _ in windows)


def input_wait_note(metrics: Path) -> str | None:
    """How much of the windows' time (after the first) our trainer's host
    waited for its loader (`input_wait_share` of each step record, weighted
    by the window's time): near 0, the device sets the pace; well above,
    the loader does. None where the records do not say."""
    windows = [(t, r["input_wait_share"]) for _, t, r in step_windows(metrics)
               if r.get("input_wait_share") is not None]
    if not windows:
        return None
    share = sum(t * w for t, w in windows) / sum(t for t, _ in windows)
    return f"ours waited for input {100 * share:.0f}% of the time"


def fabric_note(metrics: Path) -> str:
    """What the job's fabric probe (its `fabric` record, written before the
    first update) measured: the all-reduce through the gradients' path and
    each link's rate."""
    probes = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "fabric":
            probes.append(record)
    if not probes:
        return "fabric probe: no record"
    p = probes[-1]
    rates = [link["gb_per_s"] for link in p.get("links", [])]
    links = f", links {min(rates):.3g} to {max(rates):.3g} GB/s" if rates else ""
    return (f"fabric probe: all-reduce of {p['probe_bytes'] / 2**20:.1f} MiB in "
            f"{p['all_reduce_s'] * 1e3:.1f} ms, bus bandwidth {p['bus_gb_per_s']:.3g} GB/s{links}")


class Bench:
    def __init__(self, args, work: Path):
        self.args = args
        self.sizes = Sizes.for_mode(args.dry_run)
        self.out = args.out.resolve()
        self.work = work
        self.logs = work / "logs"
        self.on_gpu = not args.dry_run
        self.photos = work / "photos"
        self.checks: list[Check] = []
        # The whole script must end within 8 minutes on the GPU host: the
        # budget counts from here, before nvidia-smi is asked anything.
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.device = device_name(args.dry_run)

    def limit(self, seconds: float) -> float:
        """`seconds`, or what is left of the overall budget if less."""
        left = self.deadline - time.monotonic()
        if left < 5:
            raise RuntimeError("skipped: the overall time budget is spent")
        return min(seconds, left)

    def side(self, fn) -> Side:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - every failure becomes the row's error, the bench goes on
            return Side(error=str(e))

    def make_photos(self):
        s = self.sizes
        cmd = [self.args.python, str(REPO / "bench" / "make_photo_folder.py"), "--out", str(self.photos),
               "--classes", str(s.classes), "--train-per-class", str(s.train_per_class),
               "--val-per-class", str(s.val_per_class), "--jobs", str(max(1, os.cpu_count() or 1))]
        if self.args.photos_src:
            cmd += ["--photos", str(self.args.photos_src)]
        run(cmd, self.logs / "photos.log", timeout=self.limit(300))

    def recipe_sets(self, micro: int, global_size: int, threads: int) -> list[str]:
        s = self.sizes
        sets = {
            "data.root": str(self.photos),
            "model.num_classes": s.classes,
            "batch.global_size": global_size,
            "batch.micro_size": micro,
            "batch.repeated_augmentation": 1,
            "augment.input_size": s.image_size,
            "eval.input_size": s.image_size,
            "eval.batch_size": 64,
            "runtime.log_every_steps": 2 if self.args.dry_run else 8,
            "data.loader_threads": threads,
            # The RSB recipes also score ImageNet-ReaL and -V2 at the end; not here.
            "eval.sets": "[]",
        }
        return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]

    # -- synthetic -----------------------------------------------------------------
    def synthetic(self) -> Check:
        s = self.sizes
        check = Check("synthetic", f"{s.model} train step, batch {s.micro_batch}, {s.image_size} px, random input",
                      timm=Side())
        common = ["--model", s.model, "--batch", str(s.micro_batch), "--size", str(s.image_size),
                  "--num-classes", str(s.num_classes), "--steps", str(s.steps), "--warmup", str(s.warmup),
                  "--channels-last"]
        ours_cmd = [self.args.worker, "bench", "step", *common, "--device", "cuda:0" if self.on_gpu else "cpu"]
        timm_cmd = [self.args.python, str(REPO / "bench" / "timm" / "step_bench.py"), *common,
                    "--device", s.device, "--precision", "bf16" if self.on_gpu else "fp32"]
        # The same intra-op threads on both sides (on a GPU they hardly matter).
        threads = ["--threads", str(s.loader_threads)]
        ours_cmd += threads
        timm_cmd += threads
        if self.on_gpu:
            ours_cmd.append("--bf16")
        results = {"ours": [], "timm": []}
        for round_ in (1, 2):
            for name, cmd in (("ours", ours_cmd), ("timm", timm_cmd)):
                if results[name] and results[name][0].error is not None:
                    continue  # a side that failed (or hung) once is not given the time again
                def one(cmd=cmd, name=name):
                    with PeakMemory(self.on_gpu) as memory:
                        stdout, secs = run(cmd, self.logs / f"synthetic-{name}-{round_}.log",
                                           timeout=self.limit(150), memory=memory)
                    report = last_json(stdout, name)
                    return Side(report["images_per_sec"], report["step_ms_median"], memory.peak_mib(), secs)
                results[name].append(self.side(one))
        for name in ("ours", "timm"):
            sides = results[name]
            good = [x for x in sides if x.error is None]
            if not good:
                setattr(check, name, sides[0])
                continue
            best = max(good, key=lambda x: x.images_per_sec)
            peaks = [x.peak_memory_mib for x in good if x.peak_memory_mib is not None]
            best.peak_memory_mib = max(peaks) if peaks else None
            setattr(check, name, best)
        # Where the time goes: one more call per side that times each phase
        # apart (a device synchronisation between phases, so not the rows'
        # throughput), in the note. Not given to a side that failed.
        phases = []
        for name, cmd in (("ours", ours_cmd), ("timm", timm_cmd)):
            if getattr(check, name).error is not None:
                continue
            try:
                stdout, _ = run([*cmd, "--phase-times"], self.logs / f"synthetic-{name}-phases.log",
                                timeout=self.limit(150))
                phases.append(f"{name} {phase_times(last_json(stdout, name))}")
            except Exception as e:  # noqa: BLE001 - the phases are a note, the row stands
                phases.append(f"{name} phases not measured ({e})")
        check.note = "; ".join(phases) if phases else None
        return check

    # -- jpeg ----------------------------------------------------------------------
    def jpeg(self) -> Check:
        s = self.sizes
        check = Check("jpeg", f"{s.model} A2 training on real JPEGs, batch {s.micro_batch}, {s.image_size} px, "
                      f"{s.loader_threads} loader threads", timm=Side())
        ours_dir = self.work / "jpeg-ours"
        timm_dir = self.work / "jpeg-timm"
        for d in (ours_dir, timm_dir):
            shutil.rmtree(d, ignore_errors=True)

        def train_cmd(out: Path, device: str, updates: int) -> list[str]:
            return [self.args.worker, "train", "--recipe", "recipes/resnet50_a2.yaml", "--out", str(out),
                    "--device", device, "--max-updates", str(updates),
                    *self.recipe_sets(s.micro_batch, s.micro_batch, s.loader_threads)]

        def ours():
            cmd = train_cmd(ours_dir, "cuda:0" if self.on_gpu else "cpu", s.train_updates)
            with PeakMemory(self.on_gpu) as memory:
                _, secs = run(cmd, self.logs / "jpeg-ours.log", timeout=self.limit(240), memory=memory)
            return Side(step_throughput(ours_dir / "metrics.jsonl"), None, memory.peak_mib(), secs)

        def timm():
            recipe = ours_dir / "recipe.yaml"
            if not recipe.exists():
                # Ours failed before writing its resolved recipe: resolve the
                # same one on the CPU, with no update, so that timm's side is
                # still measured.
                resolve_dir = self.work / "jpeg-recipe"
                shutil.rmtree(resolve_dir, ignore_errors=True)
                run(train_cmd(resolve_dir, "cpu", 0), self.logs / "jpeg-recipe.log", timeout=self.limit(120))
                recipe = resolve_dir / "recipe.yaml"
                if not recipe.exists():
                    raise RuntimeError(f"{recipe} missing: the recipe could not be resolved")
            cmd = [self.args.python, str(REPO / "bench" / "timm" / "reference_train.py"), "--recipe", str(recipe),
                   "--data", str(self.photos), "--out", str(timm_dir), "--workers", str(s.loader_threads),
                   "--threads", str(s.loader_threads if self.on_gpu else 2), "--max-steps", str(s.train_updates),
                   "--device", s.device, "--prefetcher"]
            with PeakMemory(self.on_gpu) as memory:
                _, secs = run(cmd, self.logs / "jpeg-timm.log", timeout=self.limit(240), memory=memory)
            return Side(step_throughput(timm_dir / "metrics.jsonl"), None, memory.peak_mib(), secs)

        check.ours = self.side(ours)
        check.timm = self.side(timm)
        if check.ours.error is None:
            try:
                check.note = input_wait_note(ours_dir / "metrics.jsonl")
            except Exception as e:  # noqa: BLE001 - the wait is a note, the row stands
                check.note = f"input wait not read: {e}"
        return check

    # -- multi-rank jobs through the coordinator -----------------------------------------
    def job(self, name: str, what: str, devices: list[str], extra_sets: list[str],
            env: dict | None = None) -> Check:
        s = self.sizes
        check = Check(name, what)
        out = self.work / f"job-{name}"
        shutil.rmtree(out, ignore_errors=True)
        ranks = 2 if name == "ring2" else 1
        micro = max(1, s.micro_batch // 2) if ranks == 2 else s.micro_batch

        def ours():
            cmd = [self.args.coordinator, "up", "--local", *devices, "--recipe", "recipes/resnet50_a2.yaml",
                   "--out", str(out), *self.recipe_sets(micro, micro * ranks, max(1, s.loader_threads // ranks)),
                   "--set", "schedule.cosine.epochs=1",
                   "--set", "schedule.cosine.warmup_epochs=0",
                   "--set", f"distributed.collective_timeout_secs={JOB_COLLECTIVE_TIMEOUT_S}", *extra_sets]
            with PeakMemory(self.on_gpu) as memory:
                _, secs = run(cmd, self.logs / f"job-{name}.log", timeout=self.limit(240), memory=memory,
                              env=env)
            return Side(step_throughput(out / "metrics.jsonl"), None,
                        memory.peak_mib() if self.on_gpu else None, secs)

        check.ours = self.side(ours)
        if ranks == 2:
            check.note = fabric_note(out / "metrics.jsonl")
        if env and env.get(SYNC_DEBUG_ENV) == "warn":
            check.note = (sync_note(self.logs / f"job-{name}.log", self.on_gpu) if check.ours.error is None
                          else "synchronising CUDA calls within updates: not measured (the job failed)")
        return check

    def add(self, check: Check):
        """Records a finished check and rewrites the summary with it."""
        self.checks.append(check)
        self.save()

    def save(self, final: bool = False, stopped: str | None = None):
        """OUT/summary.md, summary.json and logs.tar.gz as they stand: a run
        cut short still leaves what it measured, and why."""
        self.out.mkdir(parents=True, exist_ok=True)
        text = summary(self.checks, self.args, self.device, self.args.bundle_version)
        text += f"- wall time {time.monotonic() - self.started:.0f} s" + ("" if final else " (unfinished)") + "\n"
        if stopped:
            text += f"- stopped before the end: {stopped}\n"
        (self.out / "summary.md").write_text(text)
        (self.out / "summary.json").write_text(json.dumps(summary_json(self.checks, self.args), indent=2) + "\n")
        pack_logs(self.work, self.out / "logs.tar.gz")
        return text

    def all(self):
        self.add(self.synthetic())
        try:
            self.make_photos()
            photos_error = None
        except Exception as e:  # noqa: BLE001 - the table still gets its rows
            photos_error = f"photo folder: {e}"
        if photos_error:
            for name in ("jpeg", "nccl1", "ring2"):
                self.add(Check(name, "needs the photo folder", ours=Side(error=photos_error)))
            return
        self.add(self.jpeg())
        if self.on_gpu:
            two = ["--nodes", "1", "--devices", "0,0"]
            one = ["--nodes", "1", "--devices", "0"]
            backend = "nccl"
        else:
            two = ["--nodes", "2", "--devices", "cpu"]
            one = ["--nodes", "1", "--devices", "cpu"]
            backend = "ring"
        # nccl1 first: the ring's CUDA staging has never run on a GPU, and a
        # hang there must not take NCCL's time.
        self.add(self.job("nccl1", f"world size 1 over {backend} with every collective call made",
                          one, ["--set", f"distributed.backend={backend}",
                                "--set", "distributed.collectives_at_world_size_one=true"],
                          env={SYNC_DEBUG_ENV: "warn"}))
        self.add(self.job("ring2", "2 ranks on one device over the TCP ring (CUDA tensors staged via pinned host memory)",
                          two, ["--set", "distributed.backend=ring"]))


def sync_note(log: Path, on_gpu: bool) -> str:
    """What libtorch's sync debug mode, on within every update of the run
    (RSB_CUDA_SYNC_DEBUG=warn), saw: one warning per synchronising CUDA call."""
    if not on_gpu:
        return "synchronising CUDA calls within updates: not checked on a CPU"
    try:
        text = log.read_text(errors="replace")
    except OSError as e:
        return f"synchronising CUDA calls within updates: log unreadable ({e})"
    count = text.count(SYNC_WARNING)
    return (f"synchronising CUDA calls within updates ({SYNC_DEBUG_ENV}=warn): {count}"
            + ("" if count == 0 else f" (see {archived(log)})"))


PHASES = (("zero_grad", "zero_grad_ms_median"), ("forward", "forward_ms_median"),
          ("backward", "backward_ms_median"), ("update", "optimizer_ms_median"))


def phase_times(report: dict) -> str:
    """`forward 25.6, backward 29.7, update 4.9 ms (zero_grad 0.28)`-like: the
    median phase times of a `--phase-times` step report (a phase the side
    does not time apart is left out)."""
    parts = [f"{label} {report[key]:.2f}" for label, key in PHASES if report.get(key) is not None]
    if not parts:
        raise ValueError("the report has no phase times")
    return "phase medians (ms): " + ", ".join(parts)


def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def cell(text: str) -> str:
    """`text` made safe for a Markdown table cell."""
    return text.replace("|", "/").replace("\n", " ")


def mlperf_share(checks: list[Check]) -> float | None:
    """Our real-JPEG end-to-end img/s as a fraction of MLPerf's per H200."""
    jpeg = next((c for c in checks if c.name == "jpeg"), None)
    if jpeg is None or not jpeg.ours.images_per_sec:
        return None
    return jpeg.ours.images_per_sec / MLPERF_IMAGES_PER_SEC_PER_H200


def summary(checks: list[Check], args, device_name: str, bundle_version: str | None) -> str:
    binaries = f" (binaries: {bundle_version})" if bundle_version else ""
    lines = [f"bench/gpu.sh{' --dry-run' if args.dry_run else ''} on {device_name}{binaries}", "",
             "| check | ours img/s | timm img/s | ours / timm | ours step ms | timm step ms | "
             "ours peak MiB | timm peak MiB | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        t = c.timm or Side()
        ratio = c.ratio()
        errors = [f"{who}: {side.error}" for who, side in (("ours", c.ours), ("timm", c.timm))
                  if side is not None and side.error]
        status = "ok" if c.ok() else "FAILED " + "; ".join(errors)
        lines.append(f"| {c.name} | {fmt(c.ours.images_per_sec)} | {fmt(t.images_per_sec) if c.timm else 'n/a'} | "
                     f"{fmt(ratio, 2) + 'x' if ratio else '—'} | {fmt(c.ours.step_ms)} | {fmt(t.step_ms)} | "
                     f"{fmt(c.ours.peak_memory_mib, 0)} | {fmt(t.peak_memory_mib, 0)} | {cell(status)} |")
    lines.append("")
    for c in checks:
        lines.append(f"- {c.name}: {c.what}" + (f"; {c.note}" if c.note else ""))
    if not args.dry_run and any(c.name == "jpeg" for c in checks):
        share = mlperf_share(checks)
        lines.append("- real-JPEG end to end: " + (f"{share:.0%}" if share is not None else "not measured")
                     + f" of MLPerf's ~{MLPERF_IMAGES_PER_SEC_PER_H200:,.0f} img/s per H200 ({MLPERF_SOURCE})")
    lines.append("- goals: synthetic ours/timm >= 1.0x, jpeg ours/timm >= 1.3x")
    return "\n".join(lines) + "\n"


def summary_json(checks: list[Check], args) -> dict:
    return {
        "dry_run": args.dry_run,
        "binaries": args.bundle_version,
        "mlperf_images_per_sec_per_h200": MLPERF_IMAGES_PER_SEC_PER_H200,
        "mlperf_source": MLPERF_SOURCE,
        "jpeg_share_of_mlperf": None if args.dry_run else mlperf_share(checks),
        "checks": [{**asdict(c), "ratio": c.ratio(), "ok": c.ok()} for c in checks],
    }


def pack_logs(work: Path, tarball: Path):
    """Every log, metrics.jsonl and resolved recipe under `work` into one
    gzipped tar (photos and checkpoints stay behind); a log over
    LOG_BYTES_KEPT keeps its head and tail."""
    keep = [p for p in sorted(work.rglob("*")) if p.is_file() and not p.is_symlink()
            and (p.suffix in (".log", ".jsonl") or p.name in ("recipe.yaml", "summary.json"))
            and "photos" not in p.relative_to(work).parts]
    with tarfile.open(tarball, "w:gz") as tar:
        for path in keep:
            name = str(path.relative_to(work))
            size = path.stat().st_size
            if size <= LOG_BYTES_KEPT:
                tar.add(path, arcname=name)
                continue
            half = LOG_BYTES_KEPT // 2
            with open(path, "rb") as f:
                head = f.read(half)
                f.seek(size - half)
                tail = f.read()
            data = head + f"\n[... {size - 2 * half:,} bytes left out ...]\n".encode() + tail
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))


def device_name(dry_run: bool) -> str:
    if not dry_run:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "an unknown GPU (nvidia-smi failed)"
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({model}, {os.cpu_count()} cores; dry run at toy sizes: the numbers mean nothing)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", required=True)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--python", default=sys.executable, help="the Python with torch and timm 1.0.31")
    p.add_argument("--photos-src", type=Path, default=None, help="folder of source JPEGs (default: the wheels')")
    p.add_argument("--out", type=Path, required=True, help="summary.md, summary.json and logs.tar.gz go here")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch folder of the runs (default: a fresh temporary one, removed at the end)")
    p.add_argument("--bundle-version", default=None, help="what the binaries were built from, for the summary")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget-s", type=float, default=450.0, help="overall time limit of the checks")
    args = p.parse_args(argv)
    # A SIGTERM (the device tool's limit) ends the run through the `finally`
    # below, as an exception would: the summary and the logs are written.
    signal.signal(signal.SIGTERM, on_sigterm)
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="rsb-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    stopped = None
    try:
        bench.all()
    except BaseException as e:
        stopped = f"SIGTERM (exit {e.code})" if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
        raise
    finally:
        # Whatever happened above, the table of what was measured is written.
        text = bench.save(final=True, stopped=stopped)
        print(text, flush=True)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if bench.checks and all(c.ok() for c in bench.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
