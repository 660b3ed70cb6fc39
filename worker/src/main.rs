//! `worker`: the process that runs on a GPU host (or a CPU box) and does the
//! numerical work through libtorch — training a recipe in one process,
//! evaluating and running timm-compatible weights, importing data, and
//! reporting what the host can do (`doctor`).

mod bench;
mod bench_data;
mod commands;
mod data_shard;
mod doctor;
mod host_memory;
mod join;
mod relay;
mod reports;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Train and run timm-compatible ImageNet classifiers with the ResNet Strikes Back recipes.
#[derive(Debug, Parser)]
#[command(name = "worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr: text (colour only to a terminal) or json (one
    /// object per line); the processes this one starts log the same way.
    #[arg(long, global = true, value_enum, env = rsb_logging::FORMAT_ENV, default_value = "text")]
    log_format: rsb_logging::LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the libtorch in use, CUDA/cuDNN availability, GPU count and NCCL.
    Doctor {
        /// Also print the report as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// List every registered model with its parameter count and default resolutions.
    Models,
    /// Dataset tools.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Train a recipe in this process (CPU, or one GPU).
    Train(commands::TrainArgs),
    /// Evaluate weights on an image folder: top-1 / top-5.
    Eval(commands::EvalArgs),
    /// Run a model in eval mode on a float32 NCHW .npy and write the logits as .npy.
    Infer(commands::InferArgs),
    /// Join a coordinated job with this host's GPUs (or CPU ranks).
    Join(join::JoinArgs),
    /// One rank of a joined job (started by `worker join`).
    #[command(hide = true)]
    Rank(join::RankArgs),
    /// Benchmarks (numbers, not pass/fail).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Import a dataset into the ImageNet folder layout.
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// Pack a dataset into WebDataset tar shards (optionally pre-resized).
    Shard(data_shard::ShardArgs),
}

#[derive(Debug, Subcommand)]
enum ImportSource {
    /// Fashion-MNIST IDX files (Debian package `dataset-fashion-mnist`).
    FashionMnist {
        /// Folder with `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.
        #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
        idx_dir: PathBuf,
        /// Output folder (gets `train/<class>/*.png` and `val/<class>/*.png`).
        #[arg(long)]
        out: PathBuf,
        /// Keep only the first N training images of each class (the
        /// validation split stays whole): a smaller set for short runs.
        #[arg(long, value_name = "N")]
        train_per_class: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Time forward + BCE + backward + LAMB steps on random data; prints one JSON line.
    Step(bench::StepArgs),
    /// Images/s of the training input pipeline (decode, crop, RandAugment, batch).
    Data(bench_data::DataArgs),
}

/// Keeps glibc from handing large freed buffers back to the kernel.
///
/// Every training step frees and re-allocates the same activation and
/// gradient buffers. With glibc's defaults, buffers above its (adaptive) mmap
/// threshold are unmapped when freed and page-faulted in again on the next
/// step, and the top of the heap is trimmed; measured on this project's 2-core
/// machine, that kernel work made an EfficientNet-B0 step 10-20% slower than
/// the same libtorch calls in a Python process whose allocator happened to
/// settle differently. Buffers below 64 MiB now stay in the heap and the heap
/// is never trimmed, so memory use stays at its peak (as with PyTorch's
/// caching allocator on a GPU). `MALLOC_*` environment variables, read by
/// glibc before `main`, are overridden only where unset.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory_mapped() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only changes allocator parameters; it is called before
    // any other thread exists.
    unsafe {
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            mallopt(M_MMAP_THRESHOLD, 64 << 20);
        }
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory_mapped() {}

fn main() {
    // Before any thread starts: the death signal is the main thread's.
    rsb_process::forget_inherited_parent();
    keep_freed_memory_mapped();
    let cli = Cli::parse();
    // An agent relays its ranks' stderr and must keep answering the
    // coordinator whoever reads its own: it never waits on its stderr.
    let agent_stderr = match cli.command {
        Command::Join(_) => Some(rsb_logging::init_non_blocking(cli.log_format)),
        _ => {
            rsb_logging::init(cli.log_format);
            None
        }
    };
    // libtorch's warnings on this thread (start-up, the training loop) go
    // to the log as the process's own lines: JSON when the log is JSON, in a
    // rank's log file, never waiting on an agent's stderr.
    rsb_torch_shim::warnings::route_this_threads_warnings(log_libtorch_warning);
    let outcome = run(cli);
    if let Some(dropped) =
        agent_stderr.as_ref().map(|s| s.dropped_stderr_lines()).filter(|&n| n > 0)
    {
        rsb_logging::stderr_line(&rsb_logging::warning_line(&format!(
            "{dropped} line(s) of this agent's stderr (its ranks' included) were dropped: it was \
             not read fast enough (the ranks' own log files under the run folder hold theirs)"
        )));
    }
    if let Err(e) = outcome {
        rsb_logging::stderr_line(&rsb_logging::error_line(&rsb_logging::error_chain(e.as_ref())));
        drop(agent_stderr);
        std::process::exit(1);
    }
}

/// A warning of libtorch's, as a log line of this process.
fn log_libtorch_warning(warning: &rsb_torch_shim::warnings::LibtorchWarning<'_>) {
    tracing::warn!(
        target: "libtorch",
        file = warning.file,
        line = warning.line,
        deprecation = warning.deprecation,
        "{}",
        warning.message
    );
}

/// Ends a rank process once it has told the coordinator how it ended (its
/// `Leave`): at once, without exit-time handlers, as a rank past its stop
/// deadline does. CUDA's and NCCL's handlers can block for ever, and a rank
/// hung in them after a finished job would keep its GPU and its agent. Its
/// log lines are already written (unbuffered); stderr is unbuffered too.
fn end_rank(outcome: Result<()>) -> ! {
    let code = match outcome {
        Ok(()) => 0,
        Err(e) => {
            // Not `eprintln!`, which panics when stderr is gone (a dead agent).
            rsb_logging::stderr_line(&rsb_logging::error_line(&rsb_logging::error_chain(
                e.as_ref(),
            )));
            1
        }
    };
    rsb_process::exit_now(code)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Doctor { json } => {
            let report = doctor::run()?;
            if json {
                rsb_logging::output!("{report}");
            }
            Ok(())
        }
        Command::Models => commands::models(),
        Command::Data {
            command:
                DataCommand::Import {
                    source: ImportSource::FashionMnist { idx_dir, out, train_per_class },
                },
        } => commands::import_fashion_mnist(&idx_dir, &out, train_per_class),
        Command::Data { command: DataCommand::Shard(args) } => data_shard::shard(args),
        Command::Train(args) => commands::train(args),
        Command::Eval(args) => commands::eval(args),
        Command::Infer(args) => commands::infer(args),
        Command::Join(args) => join::join(args),
        Command::Rank(args) => end_rank(join::rank(args)),
        Command::Bench { command: BenchCommand::Step(args) } => bench::step(args),
        Command::Bench { command: BenchCommand::Data(args) } => bench_data::data(args),
    }
}
