//! `coordinator`: schedules data-parallel training across worker hosts. It
//! never links libtorch or CUDA, so it runs on any small CPU node.
//!
//! `coordinator up --nodes N --recipe FILE --out DIR` waits for N `worker join`
//! hosts, assigns ranks, streams the job's progress, writes `DIR/metrics.jsonl`
//! and the resolved `DIR/recipe.yaml`, and exits 0 when every rank finished
//! (1 when the job failed). With `--local` it also starts the N workers itself.
//! `--min-nodes M --max-nodes X` make the job elastic: it goes on with as few
//! as M hosts when hosts are lost (resuming every rank from the newest
//! committed checkpoint), waits up to `--rejoin-timeout-secs` for joins below
//! M, and admits hosts that join while it runs, up to X. Without them the job
//! is fail-stop. `--restore` continues the job after the coordinator itself
//! was killed or restarted, from its state file in OUT (see
//! `rsb_coordinator::saved`). `--auto-resume`, for a command line that a
//! scheduler starts again as it is, restores such a job too, or continues
//! the run from its checkpoints.
//! `--procedure a1|a2|a3 --model NAME` instead of `--recipe` trains a Table-3
//! model with one of the paper's procedures at its Table-3 resolutions.
//!
//! `--seeds 0..20` and `--grid KEY=V1,V2` (repeatable) make `up` a sweep:
//! one run per seed and grid cell, each in `OUT/runs/<id>/`, queued over the
//! joined hosts (`--ranks-per-run`, `--max-parallel-runs`), a failed run
//! retried from its own last checkpoint (`--max-retries`); `--resume OUT`
//! continues an interrupted sweep, running only what did not finish.
//!
//! `coordinator report DIR [DIR_B]` writes a sweep's seed-study report
//! (tables, histogram, curves) into `DIR/report/`, or compares sweep B
//! against A (see `rsb-report`).
//!
//! Every RPC needs the job token. `up` reads it from `--token-file FILE` or
//! the environment variable `RSB_JOB_TOKEN` (never from the command line);
//! without either it generates one into `DIR/job.token` (mode 0600), and its
//! `--local` workers receive it through their environment. It listens on
//! loopback unless `--listen` says otherwise, and serves TLS (rustls) when
//! given `--tls-cert` and `--tls-key`; beyond loopback it needs them, or
//! `--insecure-plaintext`.

use anyhow::{bail, Context, Result};
use clap::builder::TypedValueParser;
use clap::{Parser, Subcommand};
use rsb_coordinator::job::{Job, Phase};
use rsb_coordinator::plan::BatchPlan;
use rsb_coordinator::progress::SweepProgress;
use rsb_coordinator::saved::{SavedJob, STATE_FILE};
use rsb_coordinator::service::Shared;
use rsb_coordinator::state::Coordination;
use rsb_coordinator::sweep::{RunState, Scheduler, SweepRun, SweepSettings};
use rsb_job::{GridAxis, RunEnd, RunOutcome, SweepLayout, SweepManifest};
use rsb_proto::auth::{self, Credentials, Secret};
use rsb_proto::v1 as pb;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default gRPC listen address of `coordinator up`: loopback only; other
/// hosts need `--listen 0.0.0.0:50051` (or the address of an interface), with
/// TLS or `--insecure-plaintext`.
const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Plan and coordinate ResNet-strikes-back training runs over worker hosts.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr: text (colour only to a terminal) or json (one
    /// object per line); the processes this one starts log the same way.
    #[arg(long, global = true, value_enum, env = rsb_logging::FORMAT_ENV, default_value = "text")]
    log_format: rsb_logging::LogFormat,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a job: wait for N worker hosts, train, exit when done.
    Up(UpArgs),
    /// Show members, generation and progress of a running coordinator.
    Status {
        /// Coordinator URL, e.g. https://10.0.0.1:50051 (with --tls-ca) or
        /// http://127.0.0.1:50051.
        #[arg(long)]
        coordinator: String,
        /// File holding the job token (default: the environment variable RSB_JOB_TOKEN).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// CA certificate (PEM) of an https:// coordinator.
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<PathBuf>,
        /// Allow an http:// coordinator beyond loopback: the job token then
        /// crosses the network in clear text.
        #[arg(long)]
        insecure_plaintext: bool,
    },
    /// Show how a recipe's global batch splits over a number of ranks.
    Plan {
        /// The recipe: `--recipe FILE`, or `--procedure a1|a2|a3 --model NAME`.
        #[command(flatten)]
        recipe: rsb_recipes::RecipeArgs,
        /// Override a recipe field (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Data-parallel ranks (GPUs in all).
        #[arg(long)]
        ranks: u32,
    },
    /// Report a seed study: tables and charts of a sweep folder into
    /// DIR/report/, or (with DIR_B) the comparison of sweep B against A.
    Report {
        /// Sweep folder (`sweep.json`, `runs/<id>/metrics.jsonl`).
        dir: PathBuf,
        /// A second sweep folder, compared against the first.
        dir_b: Option<PathBuf>,
    },
}

/// Elastic membership of `up`.
#[derive(Debug, clap::Args)]
struct ElasticArgs {
    /// Fewest hosts the job goes on with (default: --nodes, so that a lost
    /// host fails the job). Below it the job waits for joins.
    #[arg(long)]
    min_nodes: Option<u32>,
    /// Most hosts the job takes, running and pending: hosts that join while
    /// it runs are admitted at the first committed checkpoint after which a
    /// larger world can run with them (default: --nodes).
    #[arg(long)]
    max_nodes: Option<u32>,
    /// How long a job left with fewer than --min-nodes hosts (or with hosts
    /// no --min-nodes of which can split the batch) waits for joins before
    /// it fails, naming the lost hosts.
    #[arg(
        long,
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS)
    )]
    rejoin_timeout_secs: u64,
    /// An elastic job restarts every rank when one fails, at most this many
    /// times in a row without a committed checkpoint; then it fails.
    #[arg(long, default_value_t = rsb_coordinator::job::DEFAULT_MAX_RESTARTS)]
    max_restarts: u32,
}

/// Arguments of `coordinator up`.
#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Worker hosts to wait for.
    #[arg(long)]
    nodes: u32,
    /// The recipe: `--recipe FILE`, or `--procedure a1|a2|a3 --model NAME`.
    #[command(flatten)]
    recipe: rsb_recipes::RecipeArgs,
    /// Override a recipe field (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Run folder (metrics.jsonl, recipe.yaml; ranks write checkpoints
    /// under it); for a sweep, the sweep folder (`sweep.json`, `runs/<id>/`).
    /// A sweep resumed with `--resume DIR` defaults to DIR.
    #[arg(long)]
    out: Option<PathBuf>,
    /// gRPC listen address (default 127.0.0.1:50051, loopback only;
    /// `--local` defaults to 127.0.0.1 and a free port). Beyond loopback it
    /// needs --tls-cert and --tls-key, or --insecure-plaintext.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Start the N workers on this host too (CPU ranks unless GPUs are present).
    #[arg(long)]
    local: bool,
    /// Devices of each local worker (`--local`): all, cpu, or a list like 0,1.
    #[arg(long, default_value = "cpu")]
    devices: String,
    /// File holding the job token every call must present (default: the
    /// environment variable RSB_JOB_TOKEN; without either, a new token is
    /// written to OUT/job.token).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Continue from a checkpoint folder or run folder (read by rank 0);
    /// or, given a sweep folder (with its sweep.json), continue that sweep:
    /// finished runs are kept, the others run again (from their own newest
    /// checkpoint when they have one).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Continue what --out holds, or start it: for a job that a scheduler
    /// may start again with the same command line (a Slurm requeue after a
    /// time limit, a preemption or a lost node; a Kubernetes Job applied
    /// again, a coordinator pod started again). A job whose coordinator
    /// was stopped while it ran is restored as with --restore: its hosts
    /// have --heartbeat-timeout-secs, or 25 s if longer, to come back
    /// (agents that outlived the old coordinator), else the job takes the
    /// hosts that join. Otherwise
    /// a run continues from its newest intact checkpoint (one that wrote
    /// none starts again, its earlier records moved to
    /// OUT/abandoned-<unix seconds>/); a sweep continues as with
    /// `--resume OUT`; an empty or absent folder starts. A SIGTERM or
    /// SIGINT leaves the job (not a sweep) to that restart instead of
    /// failing it.
    #[arg(long, conflicts_with_all = ["resume", "restore"])]
    auto_resume: bool,
    /// A job found finished as the coordinator starts (--auto-resume on a
    /// finished job, or --restore of one whose ranks finished while no
    /// coordinator ran: nothing is left to train): how many seconds the
    /// coordinator still answers the workers that join, telling them the
    /// job is finished (they exit successfully, where they would retry a
    /// coordinator that had gone and fail), and the job's agents that
    /// outlived the last coordinator at their heartbeat, before it exits
    /// successfully itself; it exits as soon as --nodes hosts (--max-nodes
    /// if more) have been told. 0 exits at once.
    #[arg(
        long,
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_SECS)
    )]
    finished_linger_secs: u64,
    /// Continue the job this coordinator ran in OUT before it was killed or
    /// restarted (from OUT/coordinator-state.json, with the same recipe):
    /// its members keep their credentials, and the job goes on in a new
    /// generation from its newest committed checkpoint once their agents
    /// (still within --coordinator-deadline-secs) heartbeat again.
    #[arg(long, conflicts_with = "resume")]
    restore: bool,
    /// A worker host silent (no heartbeat) for this many seconds fails
    /// the job, naming the host (hosts beat every 2 s, or every quarter of
    /// this when that is shorter).
    #[arg(
        long,
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS)
    )]
    heartbeat_timeout_secs: u64,
    /// Each generation's ranks must publish their rendezvous data (ring
    /// address, NCCL id) within this many seconds of its start; a rank
    /// stuck before that (stopped, frozen, hung on its device) while its
    /// host heartbeats fails the job (an elastic one restarts), naming it.
    #[arg(
        long,
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS)
    )]
    rendezvous_timeout_secs: u64,
    /// A job whose --nodes hosts have not all joined within this many
    /// seconds of the start (of the restore, for a restored job that never
    /// ran) fails, saying how many came and which (torchrun's rendezvous
    /// `join_timeout`); a sweep that no host joined in that time fails too,
    /// and so does one that had no host for that long since (its hosts all
    /// gone: none in a run, none asking for one) with runs left.
    #[arg(
        long,
        default_value_t = 600,
        value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS)
    )]
    join_timeout_secs: u64,
    /// Connections open at once from one address; more are closed at once
    /// (a stranger's idle connections take one address's share). Hosts
    /// behind one NAT address share it, and an 8-GPU host holds about 10:
    /// raise it for more than 6 such hosts behind one address.
    #[arg(
        long,
        default_value_t = rsb_coordinator::incoming::MAX_CONNECTIONS_PER_PEER,
        value_parser = clap::value_parser!(u64).range(1..=1 << 20).map(|n| n as usize)
    )]
    max_connections_per_address: usize,
    /// Connections open at once, from every address; more are closed at
    /// once. Default: 16 per host the job may have (--max-nodes, else
    /// --nodes), at least 512. The process's open-files limit is raised to
    /// hold them (up to its hard limit, which is said when too low).
    #[arg(
        long,
        value_parser = clap::value_parser!(u64).range(1..=1 << 20).map(|n| n as usize)
    )]
    max_connections: Option<usize>,
    #[command(flatten)]
    elastic: ElasticArgs,
    #[command(flatten)]
    sweep: SweepArgs,
}

/// Raises the open-files limit to hold `max_connections` connections and the
/// coordinator's own files, saying so, or warning where the hard limit is
/// lower: connections past it would fail to be accepted.
fn room_for_connections(max_connections: usize) {
    use rsb_coordinator::incoming::{
        descriptors_for, raise_open_files_limit, FILES_BESIDES_CONNECTIONS,
    };
    let wanted = descriptors_for(max_connections) as u64 + FILES_BESIDES_CONNECTIONS;
    match raise_open_files_limit(wanted) {
        Ok(limit) if limit.soft >= wanted => tracing::info!(
            open_files = limit.soft,
            "up to {max_connections} connections at once (--max-connections)"
        ),
        Ok(limit) => tracing::warn!(
            "up to {max_connections} connections at once (--max-connections) and the \
             coordinator's files need {wanted} open files, but the hard limit (RLIMIT_NOFILE) is \
             {}: connections past about {} are refused; raise it (ulimit -Hn, LimitNOFILE=, a \
             container's nofile ulimit) or lower --max-connections",
            limit.hard,
            // Connections c hold up to c + c/8 descriptors (those closing).
            limit.soft.saturating_sub(FILES_BESIDES_CONNECTIONS) * 8 / 9
        ),
        Err(e) => tracing::warn!(
            "cannot raise the open-files limit for {max_connections} connections \
             (--max-connections): {e}"
        ),
    }
}

/// Longest timeout a command line may set, in seconds (a week): a wait
/// past it is a mistake, and one past the clock's range cannot be kept.
const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// Sweeps of `up`: many runs of one recipe.
#[derive(Debug, clap::Args)]
struct SweepArgs {
    /// Run the recipe once per seed: a half-open range `0..20`, one seed
    /// `7`, or a list `0,3,9` (the seed sets every random stream).
    #[arg(long, value_name = "SEEDS")]
    seeds: Option<String>,
    /// Run once per value of a recipe field: `KEY=V1,V2,...` (a dotted
    /// `--set` key). Several make a product; combined with --seeds (default:
    /// the recipe's seed).
    #[arg(long = "grid", value_name = "KEY=V1,V2,...")]
    grid: Vec<String>,
    /// Ranks of each run of a sweep (hosts whose ranks divide it).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    ranks_per_run: u32,
    /// Most runs of a sweep at once (default: as many as the hosts allow).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_parallel_runs: Option<u32>,
    /// A failed run of a sweep is retried from its own last checkpoint at
    /// most this many times; then it is recorded as failed. Each invocation
    /// gives it these retries: a sweep resumed with `--resume` tries a run
    /// that failed before again, as many times.
    #[arg(long, default_value_t = 2)]
    max_retries: u32,
}

impl SweepArgs {
    /// Whether any sweep option was given.
    fn given(&self) -> bool {
        self.seeds.is_some() || !self.grid.is_empty()
    }
}

/// TLS of the coordinator's gRPC port.
#[derive(Debug, clap::Args)]
struct TlsArgs {
    /// Serve TLS with this certificate (PEM, the chain from the leaf); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that signed --tls-cert: the `--local` workers
    /// check the coordinator against it (needed with `--local`).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Listen beyond loopback without TLS: calls, the job token and the
    /// members' secrets in them, then cross the network in clear text,
    /// readable by anyone on the path. Without it, `--listen` beyond
    /// loopback needs --tls-cert and --tls-key.
    #[arg(long, conflicts_with = "tls_cert")]
    insecure_plaintext: bool,
}

impl TlsArgs {
    /// The server identity, when TLS is asked for.
    fn identity(&self) -> Result<Option<tonic::transport::Identity>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else { return Ok(None) };
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        Ok(Some(tonic::transport::Identity::from_pem(read(cert)?, read(key)?)))
    }
}

fn main() {
    // Before any thread starts: the death signal is the main thread's.
    rsb_process::forget_inherited_parent();
    let cli = Cli::parse();
    // A coordinator's lines are written while it holds a job's lock: one
    // that waited on a stdout or stderr nobody reads (a stalled log
    // collector, a terminal paused with Ctrl-S) would stop every call, and
    // the hosts would look silent. Its other commands print and end.
    let output = match cli.command {
        Command::Up(_) => Some(rsb_logging::init_non_blocking(cli.log_format)),
        _ => {
            rsb_logging::init(cli.log_format);
            None
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let outcome = runtime.block_on(run(cli));
    // Writes still running on the blocking pool (a metrics append stalled
    // on a hung disk) get a deadline, not a wait for ever.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_DEADLINE);
    if let Some(output) = &output {
        let dropped = (output.dropped_stdout_lines(), output.dropped_stderr_lines());
        if dropped != (0, 0) {
            rsb_logging::stderr_line(&rsb_logging::warning_line(&format!(
                "{} line(s) of stdout and {} of stderr were dropped: they were not read fast \
                 enough (metrics.jsonl in the run folder holds every record)",
                dropped.0, dropped.1
            )));
        }
    }
    if let Err(e) = outcome {
        rsb_logging::stderr_line(&rsb_logging::error_line(&rsb_logging::error_chain(e.as_ref())));
        drop(output);
        std::process::exit(1);
    }
}

/// How long the coordinator waits, once done, for work still running on its
/// runtime's threads.
const RUNTIME_SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Plan { recipe, overrides, ranks } => {
            let recipe = recipe.load(&overrides)?;
            let plan = BatchPlan::new(&recipe, ranks)?;
            rsb_logging::output!(
                "{}: global batch {} = micro-batch {} x {} accumulation step(s) x {} rank(s)",
                recipe.name,
                plan.global_size,
                plan.micro_size,
                plan.accumulation,
                plan.world_size
            );
            rsb_logging::output!(
                "  model {}: train at {} px, test at {} px (crop {})",
                recipe.model.name,
                recipe.augment.input_size,
                recipe.eval.input_size,
                recipe.eval.crop_pct
            );
            for rank in 0..ranks {
                rsb_logging::output!("  rank {rank}: sampler streams {:?}", plan.streams_of(rank));
            }
            Ok(())
        }
        Command::Report { dir, dir_b } => report(&dir, dir_b.as_deref()),
        Command::Status { coordinator, token_file, tls_ca, insecure_plaintext } => {
            let plaintext = auth::Plaintext::allowed_anywhere(insecure_plaintext);
            status(&coordinator, token_file.as_deref(), tls_ca.as_deref(), plaintext).await
        }
        Command::Up(args) => up(args).await,
    }
}

/// `coordinator report`: writes the report and prints its tables, the
/// skipped runs and the files written.
fn report(dir: &Path, dir_b: Option<&Path>) -> Result<()> {
    let written = match dir_b {
        None => rsb_report::report(dir)?,
        Some(b) => rsb_report::compare(dir, b)?,
    };
    rsb_logging::output!("{}", written.summary);
    if !written.skipped.is_empty() {
        rsb_logging::output!(
            "{}, {} reported (see the list above)",
            rsb_report::runs::skipped_text(&written.skipped),
            written.runs
        );
    }
    rsb_logging::output!("wrote {} file(s) into {}:", written.files.len(), written.dir.display());
    for file in &written.files {
        rsb_logging::output!("  {}", file.display());
    }
    Ok(())
}

async fn status(
    url: &str,
    token_file: Option<&Path>,
    tls_ca: Option<&Path>,
    plaintext: auth::Plaintext,
) -> Result<()> {
    let token = Secret::job_token(token_file)?.with_context(|| {
        format!("no job token: pass --token-file FILE or set {}", auth::TOKEN_ENV)
    })?;
    let channel = auth::endpoint(url, tls_ca, plaintext)?
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let mut client = pb::coordinator_client::CoordinatorClient::with_interceptor(
        channel,
        Credentials::token(token),
    );
    let s = client.status(pb::StatusRequest {}).await?.into_inner();
    rsb_logging::output!("job {} generation {}: {}", s.job_id, s.generation, s.state);
    rsb_logging::output!(
        "members {}/{} (min {}, max {}):",
        s.members.len(),
        s.nodes_expected,
        s.min_nodes,
        s.max_nodes
    );
    for m in &s.members {
        rsb_logging::output!(
            "  {} {} ranks={} last heartbeat {} ms ago",
            m.member_id,
            m.host_name,
            m.local_ranks,
            m.last_heartbeat_ms_ago
        );
    }
    if !s.pending.is_empty() {
        rsb_logging::output!("pending (admitted at the next generation):");
        for m in &s.pending {
            rsb_logging::output!(
                "  {} {} ranks={} last heartbeat {} ms ago",
                m.member_id,
                m.host_name,
                m.local_ranks,
                m.last_heartbeat_ms_ago
            );
        }
    }
    rsb_logging::output!("epoch {} step {} {:.0} img/s", s.epoch, s.step, s.images_per_sec);
    if !s.sweep_runs.is_empty() {
        rsb_logging::output!("runs:");
        for run in &s.sweep_runs {
            let state =
                pb::SweepRunState::try_from(run.state).map_or("unknown", |state| match state {
                    pb::SweepRunState::Queued => "queued",
                    pb::SweepRunState::Running => "running",
                    pb::SweepRunState::Finished => "finished",
                    pb::SweepRunState::Failed => "failed",
                    pb::SweepRunState::Unspecified => "unknown",
                });
            let progress = if run.total_updates > 0 {
                format!(" epoch {} update {}/{}", run.epoch, run.step, run.total_updates)
            } else {
                String::new()
            };
            let hosts = if run.hosts.is_empty() {
                String::new()
            } else {
                format!(" on {}", run.hosts.join(", "))
            };
            let failure = if run.failure.is_empty() {
                String::new()
            } else {
                format!("; last failure: {}", run.failure)
            };
            rsb_logging::output!(
                "  {} {state} (attempts {}){progress}{hosts}{failure}",
                run.id,
                run.attempts
            );
        }
    }
    Ok(())
}

/// What `up` runs: one job, or a sweep with its feedback.
enum Work {
    /// One job; elastic or not.
    Job { elastic: bool },
    /// A sweep.
    Sweep(SweepProgress),
}

/// Where `up` listens: `--listen`, else a free loopback port with `--local`,
/// else [`DEFAULT_LISTEN`].
fn listen_address(listen: Option<SocketAddr>, local: bool) -> SocketAddr {
    listen.unwrap_or_else(|| {
        if local {
            "127.0.0.1:0".parse().expect("literal")
        } else {
            DEFAULT_LISTEN.parse().expect("literal")
        }
    })
}

/// `coordinator up`.
async fn up(mut args: UpArgs) -> Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    // Before anything is written into --out: a refused start leaves no run
    // folder, token or sweep manifest behind.
    let listen = listen_address(args.listen, args.local);
    if args.tls.tls_cert.is_none()
        && !auth::is_loopback_ip(listen.ip())
        && !args.tls.insecure_plaintext
    {
        bail!(
            "--listen {listen} is beyond loopback, and without TLS every call (the job token \
             and the members' secrets in it) would cross the network in clear text: give \
             --tls-cert and --tls-key (workers then join https://... with --tls-ca), or \
             {} on a network you trust",
            auth::INSECURE_PLAINTEXT_FLAG
        );
    }
    if args.auto_resume {
        // A sweep folder is continued as `--resume OUT` does; a run folder
        // is handled by prepare_job, under the folder's lock.
        let out = args.out.as_deref().context("--auto-resume needs --out")?;
        if SweepLayout::new(out).manifest().is_file() {
            rsb_coordinator::print_line!(
                "--auto-resume: continuing the sweep in {}",
                out.display()
            );
            args.resume = args.out.clone();
        }
    }
    let resumes_sweep =
        args.resume.as_deref().is_some_and(|dir| SweepLayout::new(dir).manifest().is_file());
    if args.restore && (args.sweep.given() || args.local) {
        bail!(
            "--restore continues one job whose workers joined on their own; a sweep is \
             continued with --resume DIR, and --local workers die with their coordinator"
        );
    }
    let given_token = given_job_token(&args)?;
    // Held until this process ends, taken before anything is written there:
    // a second coordinator on the folder of a live one (by mistake, or a
    // restart while the old one still runs) is refused instead of replacing
    // its recipe and saved state. A restart after the old one died gets it.
    let folder = if resumes_sweep { args.resume.as_ref() } else { args.out.as_ref() };
    let _folder_lock = folder
        .map(|dir| {
            rsb_job::RunFolderLock::acquire_file(
                dir,
                rsb_job::run_folder::COORDINATOR_LOCK_FILE,
                rsb_job::run_folder::LOCK_WAIT,
            )
        })
        .transpose()?;
    let prepared = if args.sweep.given() || resumes_sweep {
        prepare_sweep(&args)?
    } else {
        prepare_job(&args, given_token.as_ref().map(|(token, _)| token))?
    };
    let (mut state, out, mut work) = prepared;
    // A job found finished already (said): its workers are told so for a
    // while, then the coordinator exits (its local workers, told so at
    // once, are waited for as at any end).
    let finished_already = matches!(work, Work::Job { .. })
        && state.jobs.first().is_some_and(|job| job.phase == Phase::Finished);
    let linger = (finished_already && !args.local)
        .then(|| Duration::from_secs(args.finished_linger_secs))
        .filter(|linger| !linger.is_zero());
    // Nothing to save (a restored job's end is saved by the first pass
    // below): the start serves only to tell the workers that join, and
    // what keeps it from that (no token they could present, a port or a
    // certificate it cannot use) ends it as the job is, finished.
    let nothing_to_save = state.jobs.first().is_some_and(|job| job.state_file.is_none());
    let only_tells_workers = finished_already && !args.local && nothing_to_save;
    if only_tells_workers && (linger.is_none() || given_token.is_none()) {
        if linger.is_some() {
            rsb_coordinator::print_line!(
                "no job token was given: no worker could present it, none is told the job is \
                 finished"
            );
        }
        return Ok(());
    }
    // As many as may come (an elastic job's --max-nodes).
    let hosts_to_tell =
        state.jobs.first().map_or(args.nodes, |job| job.max_nodes.max(args.nodes)) as usize;
    let max_connections = args
        .max_connections
        .unwrap_or_else(|| rsb_coordinator::incoming::connections_for(hosts_to_tell));
    room_for_connections(max_connections);
    let UpArgs { nodes, local, devices, tls, join_timeout_secs, .. } = args;
    let token = match given_token {
        Some((token, source)) => {
            rsb_coordinator::print_line!(
                "job token from {source}; workers need the same token (worker join \
                 --token-file FILE, or the environment variable {})",
                auth::TOKEN_ENV
            );
            token
        }
        None => generate_job_token(&out)?,
    };
    if let [job] = &mut state.jobs[..] {
        // Saved with the job's state: a restore must present the same token.
        job.token_fingerprint = Some(token.fingerprint());
    }
    let (listener, bound, server, with_tls) = match bind_server(listen, &tls, local).await {
        Ok(serving) => serving,
        Err(e) if only_tells_workers => {
            tracing::warn!("{e:#}: the workers that join are not told the job is finished");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if !with_tls && !auth::is_loopback_ip(bound.ip()) {
        tracing::warn!(
            "listening on {bound} without TLS ({}): calls, the job token included, cross \
             the network in clear text",
            auth::INSECURE_PLAINTEXT_FLAG
        );
    }
    let shared = Shared::new(state);
    let folder = if matches!(work, Work::Sweep(_)) { "sweep folder" } else { "run folder" };
    match linger {
        Some(linger) => rsb_coordinator::print_line!(
            "coordinator listening on {bound}: the worker hosts that join within {} s \
             (--finished-linger-secs), {nodes} at most, are told the job is finished",
            linger.as_secs()
        ),
        None => rsb_coordinator::print_line!(
            "coordinator listening on {bound}; waiting for {nodes} worker host(s); {folder} {}",
            out.display()
        ),
    }
    // From here on, Ctrl-C and `kill` stop the local workers before this
    // process exits (and `kill -9` stops them through their death signal).
    let mut stop_signals = rsb_process::stop_signal().context("installing signal handlers")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(rsb_coordinator::service::serve(
        server,
        shared.clone(),
        token.clone(),
        listener,
        rsb_coordinator::incoming::Limits {
            connections: max_connections,
            per_peer: args.max_connections_per_address,
            ..Default::default()
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut children = Vec::new();
    if local {
        let worker = sibling_binary("worker")?;
        let scheme = if tls.tls_cert.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{bound}");
        // The local workers share this host: give each its share of the cores
        // (GPU ranks only use theirs for loading).
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let share = (cores / nodes as usize).max(1);
        for i in 0..nodes {
            let mut cmd = tokio::process::Command::new(&worker);
            cmd.args([
                "join",
                "--coordinator",
                &url,
                "--devices",
                &devices,
                "--host-name",
                &format!("local{i}"),
                "--cores",
                &share.to_string(),
            ]);
            if let Some(ca) = &tls.tls_ca {
                cmd.arg("--tls-ca").arg(ca);
            }
            if tls.insecure_plaintext {
                cmd.arg(auth::INSECURE_PLAINTEXT_FLAG);
            }
            // The token travels in the environment, never on the command line.
            cmd.env(auth::TOKEN_ENV, token.expose());
            if std::env::var_os("RUST_LOG").is_none() {
                // This process already prints one progress line per logged
                // update; the local ranks keep their warnings and errors.
                cmd.env("RUST_LOG", "warn,worker::join=info");
            }
            cmd.kill_on_drop(true);
            rsb_process::die_with_parent(&mut cmd);
            children.push(cmd.spawn().with_context(|| format!("starting {}", worker.display()))?);
        }
    }
    if let Some(linger) = linger {
        // The job is finished: the workers that join meanwhile are told so
        // (Placement::JobFinished), as are the members whose agents
        // outlived the coordinator (at their heartbeat), until --nodes
        // hosts have been or the time is up; a stop signal ends the wait,
        // no failure. Then a restored job's end is saved, and nothing is
        // watched.
        let until = tokio::time::Instant::now() + linger;
        let told = loop {
            let told =
                shared.update_unless(stop_signals.recv(), |state| state.hosts_told_finished());
            match told.await {
                Ok(told) if told < hosts_to_tell && tokio::time::Instant::now() < until => {}
                ended => break ended,
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                signal = stop_signals.recv() => break Err(signal),
            }
        };
        match told {
            Ok(told) if told >= hosts_to_tell => {
                rsb_coordinator::print_line!("{told} host(s) told the job is finished")
            }
            Ok(_) => {}
            Err(signal) => tracing::info!("{signal}: no longer telling the workers that join"),
        }
        if shared.update_within(STATE_WRITE_AT_STOP, |_| ()).await.is_none() {
            tracing::warn!(
                "the job's end was not written to its state file within {STATE_WRITE_AT_STOP:?}"
            );
        }
    }
    let mut exited = vec![false; children.len()];
    // `--auto-resume` says a scheduler may start this command line again:
    // a stop signal leaves the job (not a sweep's, not --local's, whose
    // workers stop with it) to that restart instead of failing it.
    let leaves_job_to_restart = args.auto_resume && !local && matches!(work, Work::Job { .. });
    // Each pass's change of the state runs off this task, which listens
    // for stop signals meanwhile: a state write that hangs (a hung file
    // system) must not keep Ctrl-C or a scheduler's SIGTERM from acting.
    // A pass is `Ok(None)` to go on, `Ok(Some(outcome))` at the end, and
    // `Err(signal)` when a stop signal came first (also during one of its
    // changes of the state).
    let outcome = loop {
        if linger.is_some() {
            // Told its workers (above): a finished job has nothing to watch.
            break Ok(());
        }
        let pass = async {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                signal = stop_signals.recv() => return Err(signal),
            }
            for (i, child) in children.iter_mut().enumerate() {
                if exited[i] {
                    continue;
                }
                if let Ok(Some(code)) = child.try_wait() {
                    exited[i] = true;
                    if !code.success() {
                        let what = format!("local worker {i} exited with {code}");
                        match work {
                            // Its heartbeats stop: an elastic job drops it and
                            // goes on; a sweep's run fails and is retried.
                            Work::Job { elastic: true } | Work::Sweep(_) => {
                                tracing::warn!("{what}")
                            }
                            Work::Job { elastic: false } => {
                                shared
                                    .update_unless(stop_signals.recv(), move |state| {
                                        state.fail_all(&what)
                                    })
                                    .await?;
                            }
                        }
                    }
                }
            }
            match &mut work {
                Work::Job { .. } => {
                    let checked = shared.update_unless(stop_signals.recv(), |state| {
                        state.check_liveness();
                        state.jobs[0].phase.clone()
                    });
                    match checked.await? {
                        Phase::Finished => return Ok(Some(Ok(()))),
                        Phase::Failed(reason) => {
                            return Ok(Some(Err(anyhow::anyhow!("job failed: {reason}"))))
                        }
                        Phase::Waiting | Phase::Running => {}
                    }
                }
                Work::Sweep(progress) => {
                    let checked = shared.update_unless(stop_signals.recv(), |state| {
                        state.check_liveness();
                        let jobs = &state.jobs;
                        let snapshot = state.sweep.as_ref().map(|s| {
                            (s.counts(), s.views(jobs), s.is_over(), s.without_hosts_for())
                        });
                        (snapshot, jobs.is_empty())
                    });
                    let (snapshot, none_started) = checked.await?;
                    let Some((counts, views, over, without_hosts)) = snapshot else {
                        progress.finish();
                        return Ok(Some(Err(anyhow::anyhow!("the sweep's queue is gone"))));
                    };
                    // Its runs wait for the hosts earlier runs free, but not for
                    // hosts that are all gone, or that never came: the time
                    // without hosts counts from the scheduler's creation, and
                    // refused hosts do not stop it.
                    let join_timeout = Duration::from_secs(join_timeout_secs);
                    if without_hosts.is_some_and(|idle| idle > join_timeout) {
                        progress.finish();
                        if none_started {
                            return Ok(Some(Err(anyhow::anyhow!(
                                "no worker host joined the sweep within {join_timeout_secs} s \
                                 (--join-timeout-secs); `coordinator up --resume {}` starts it \
                                 again",
                                out.display()
                            ))));
                        }
                        let waiting: Vec<String> = views
                            .iter()
                            .filter(|v| v.state == RunState::Running)
                            .map(|v| match &v.hosts[..] {
                                [] => format!("{} waits with no host", v.id),
                                hosts => {
                                    format!("{} waits with host(s) {}", v.id, hosts.join(", "))
                                }
                            })
                            .collect();
                        let waiting = if waiting.is_empty() {
                            String::new()
                        } else {
                            format!("; {}", waiting.join("; "))
                        };
                        return Ok(Some(Err(anyhow::anyhow!(
                            "no run of the sweep trained and no worker host asked for one for \
                             {join_timeout_secs} s (--join-timeout-secs{waiting}), with {} of {} \
                             run(s) left ({} finished, {} failed); `coordinator up --resume {}` \
                             goes on with them",
                            counts.queued + counts.running,
                            counts.total,
                            counts.finished,
                            counts.failed,
                            out.display()
                        ))));
                    }
                    progress.update(counts, &views);
                    if over {
                        progress.finish();
                        let failed = rsb_coordinator::sweep::failed_runs(&views);
                        rsb_coordinator::print_line!(
                            "sweep over: {} finished, {} failed of {} run(s); report with \
                             `coordinator report {}`",
                            counts.finished,
                            counts.failed,
                            counts.total,
                            out.display()
                        );
                        return Ok(Some(if failed.is_empty() {
                            Ok(())
                        } else {
                            Err(anyhow::anyhow!(
                                "{} of {} run(s) failed: {} (why: runs/<id>/outcome.json, \
                                 unless said here; `coordinator up --resume {}` runs them \
                                 again)",
                                failed.len(),
                                counts.total,
                                failed.join(", "),
                                out.display()
                            ))
                        }));
                    }
                    // Checked after the end: workers exit once the sweep is over.
                    if !children.is_empty() && exited.iter().all(|e| *e) {
                        shared
                            .update_unless(stop_signals.recv(), |state| {
                                state.fail_all("every local worker exited")
                            })
                            .await?;
                        progress.finish();
                        return Ok(Some(Err(anyhow::anyhow!(
                            "every local worker exited before the sweep ended; `coordinator up \
                             --resume {}` runs what is left",
                            out.display()
                        ))));
                    }
                }
            }
            Ok(None)
        };
        match pass.await {
            Ok(None) => {}
            Ok(Some(outcome)) => break outcome,
            Err(signal) => {
                break Err(stop_for(
                    signal,
                    leaves_job_to_restart,
                    &shared,
                    &mut work,
                    &mut children,
                )
                .await)
            }
        }
    };
    // Let workers see the final state through their heartbeats (or their
    // next join, in a sweep) before stopping.
    let grace = tokio::time::Instant::now() + Duration::from_secs(5);
    for child in &mut children {
        let _ = tokio::time::timeout_at(grace, child.wait()).await;
    }
    let _ = stop_tx.send(());
    // A graceful stop waits for open connections, and those of a frozen or
    // cut-off host never close: bounded.
    let mut server = server;
    if tokio::time::timeout(Duration::from_secs(5), &mut server).await.is_err() {
        tracing::warn!("connections still open 5 s after the job ended; closing them");
        // It accepts nothing since the stop; the calls still running end
        // with the runtime (the run files they took are waited for below).
        server.abort();
    }
    // A sweep's run files still queued or being written (an outcome taken
    // by the last call's pass) are on disk before the coordinator exits,
    // or named in an error within RUN_FILES_EXIT_DEADLINE.
    shared.write_remaining_run_files().await;
    outcome
}

/// Binds `listen` and configures the gRPC server with `tls`: the listener,
/// its address, the server, and whether it serves TLS.
async fn bind_server(
    listen: SocketAddr,
    tls: &TlsArgs,
    local: bool,
) -> Result<(tokio::net::TcpListener, SocketAddr, rsb_coordinator::service::LimitedServer, bool)> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let bound = listener.local_addr()?;
    let identity = tls.identity()?;
    if local && identity.is_some() && tls.tls_ca.is_none() {
        bail!("--local with --tls-cert needs --tls-ca (the CA certificate that signed it)");
    }
    let with_tls = identity.is_some();
    let server = rsb_coordinator::service::server(identity).with_context(|| match tls {
        TlsArgs { tls_cert: Some(cert), tls_key: Some(key), .. } => {
            format!("TLS: the certificate {} or the key {}", cert.display(), key.display())
        }
        _ => "configuring the server".to_string(),
    })?;
    Ok((listener, bound, server, with_tls))
}

/// How long a stop signal waits for the job's end to be written to its
/// state file before the coordinator stops its local workers and exits
/// anyway (a hung file system).
const STATE_WRITE_AT_STOP: Duration = Duration::from_secs(10);

/// Acts on a stop signal of `coordinator up`: the job left to its restart
/// (`leaves_job_to_restart`), or every job failed, its end written within
/// [`STATE_WRITE_AT_STOP`], and the local workers stopped. The error to
/// exit with.
async fn stop_for(
    signal: rsb_process::StopSignal,
    leaves_job_to_restart: bool,
    shared: &Shared,
    work: &mut Work,
    children: &mut [tokio::process::Child],
) -> anyhow::Error {
    let reason = format!("coordinator stopped by {signal}");
    if leaves_job_to_restart {
        // A scheduler stops it to start it again elsewhere (a pod evicted,
        // a node drained): the job is not ended, so that the next start
        // restores it.
        tracing::warn!("{reason}; the job is left to its restart");
        return anyhow::anyhow!(
            "{reason}: the job is left to its restart (the same command line restores it, and \
             its hosts go on meanwhile, for their --coordinator-deadline-secs)"
        );
    }
    let failing = reason.clone();
    let written =
        shared.update_within(STATE_WRITE_AT_STOP, move |state| state.fail_all(&failing)).await;
    if written.is_none() {
        tracing::error!(
            "the job's end was not written to its state file within {STATE_WRITE_AT_STOP:?} \
             (a hung file system?); stopping anyway: a restart with --restore may find the job \
             as it was before the stop"
        );
    }
    if let Work::Sweep(progress) = work {
        progress.finish();
    }
    tracing::warn!("{reason}; stopping the local workers");
    rsb_process::terminate(children, Duration::from_secs(10)).await;
    anyhow::anyhow!("job failed: {reason}")
}

/// The one job of `up`: recipe, run folder and membership checked, the
/// resolved recipe written; a finished job (nothing written) when
/// `--auto-resume` found it finished already
/// ([`rsb_coordinator::saved::finished_already`], said), whose workers are
/// only told so.
fn prepare_job(args: &UpArgs, token: Option<&Secret>) -> Result<(Coordination, PathBuf, Work)> {
    let nodes = args.nodes;
    let elastic = &args.elastic;
    let (min_nodes, max_nodes) =
        (elastic.min_nodes.unwrap_or(nodes), elastic.max_nodes.unwrap_or(nodes));
    if min_nodes == 0 || min_nodes > nodes || max_nodes < nodes {
        bail!(
            "--min-nodes {min_nodes} --nodes {nodes} --max-nodes {max_nodes}: need \
             1 <= --min-nodes <= --nodes <= --max-nodes"
        );
    }
    if args.sweep.ranks_per_run != 1 || args.sweep.max_parallel_runs.is_some() {
        bail!("--ranks-per-run and --max-parallel-runs are for sweeps (--seeds or --grid)");
    }
    let out = args.out.clone().context("--out DIR is required (the run folder)")?;
    let recipe = args.recipe.load(&args.overrides)?;
    if let Some(ranks) = args.local.then(|| local_worker_ranks(&args.devices)).flatten() {
        // Refused before any worker starts, not once they all joined.
        let world = nodes.checked_mul(ranks).with_context(|| {
            format!("--local --nodes {nodes} --devices {}: too many ranks", args.devices)
        })?;
        BatchPlan::new(&recipe, world).with_context(|| {
            format!(
                "--local --nodes {nodes} --devices {}: a world of {world} rank(s)",
                args.devices
            )
        })?;
    }
    if args.restore {
        let token = token.context("--restore needs the job's token")?;
        return restore_job(args, recipe, &out, token);
    }
    if args.auto_resume {
        if let Some(finished) = rsb_coordinator::saved::finished_already(&recipe, &out) {
            rsb_coordinator::print_line!("--auto-resume: {finished}");
            let out = out.canonicalize().with_context(|| format!("resolving {}", out.display()))?;
            // No state file: the saved one says finished already.
            let mut job = Job::new(recipe, out.clone(), nodes);
            job.phase = Phase::Finished;
            return Ok((Coordination::one(job), out, Work::Job { elastic: false }));
        }
    }
    if args.auto_resume && !args.local {
        if let Some(restored) = auto_restore(args, &recipe, &out, token) {
            return Ok(restored);
        }
    }
    // The checkpoint rank 0 resumes from: intact, and trained with this recipe.
    let resume = if args.auto_resume {
        // The checkpoint writer's lock, held while the run's place is
        // chosen and its earlier records moved (see rsb_job::auto_resume);
        // the new job's rank 0 takes it after.
        let _writer =
            rsb_job::RunFolderLock::acquire(&out, rsb_job::run_folder::AUTO_RESUME_LOCK_WAIT)?;
        let found = rsb_job::auto_resume(&out, &recipe, &args.overrides)
            .with_context(|| format!("--auto-resume {}", out.display()))?;
        rsb_coordinator::print_line!("{found}");
        found.checkpoint().map(Path::to_owned)
    } else {
        rsb_job::check_out_folder(&out, args.resume.as_deref())?;
        args.resume
            .as_ref()
            .map(|path| {
                rsb_job::check_resume(path, &recipe, &args.overrides).map(|v| v.path().to_owned())
            })
            .transpose()?
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize().with_context(|| format!("resolving {}", out.display()))?;
    let recipe_file = out.join(rsb_job::run_folder::RESOLVED_RECIPE);
    let held_run = rsb_job::run_folder::holds_run(&out);
    rsb_job::write_resolved_recipe(&out, &rsb_recipes::to_yaml(&recipe), held_run)
        .with_context(|| format!("writing {}", recipe_file.display()))?;
    let mut job = Job::new(recipe, out.clone(), nodes);
    job.heartbeat_timeout = Duration::from_secs(args.heartbeat_timeout_secs);
    job.rendezvous_timeout = Duration::from_secs(args.rendezvous_timeout_secs);
    job.join_timeout = Some(Duration::from_secs(args.join_timeout_secs));
    job.set_node_bounds(min_nodes, max_nodes)?;
    job.rejoin_timeout = Duration::from_secs(elastic.rejoin_timeout_secs);
    job.max_restarts = elastic.max_restarts;
    let is_elastic = job.elastic();
    if let Some(path) = resume {
        let path = path.canonicalize().with_context(|| format!("--resume {}", path.display()))?;
        job.resume_from = Some(path.display().to_string());
    }
    job.state_file = Some(out.join(STATE_FILE));
    Ok((Coordination::one(job), out, Work::Job { elastic: is_elastic }))
}

/// The ranks each `--local` worker runs with `--devices devices`: one with
/// `cpu`, one per listed GPU; `None` for `all` (this process does not count
/// GPUs) or a list the worker will refuse.
fn local_worker_ranks(devices: &str) -> Option<u32> {
    match devices {
        "cpu" => Some(1),
        "all" => None,
        list => {
            let ids: Result<Vec<u32>, _> = list.split(',').map(|id| id.trim().parse()).collect();
            ids.ok().and_then(|ids| u32::try_from(ids.len()).ok())
        }
    }
}

/// `up --restore`: the job saved in `out` by a coordinator that was killed
/// or restarted, continued with the same recipe and hosts.
fn restore_job(
    args: &UpArgs,
    recipe: rsb_recipes::Recipe,
    out: &Path,
    token: &Secret,
) -> Result<(Coordination, PathBuf, Work)> {
    let out = out.canonicalize().with_context(|| format!("--restore: {}", out.display()))?;
    let job = SavedJob::read(&out)
        .map_err(anyhow::Error::new)
        .and_then(|saved| saved_job(args, recipe, &out, saved, token))
        .with_context(|| format!("--restore: {}", out.join(STATE_FILE).display()))?;
    Ok(serve_restored(args, job, out, false))
}

/// `up --auto-resume` on a run folder whose coordinator was killed or
/// restarted while its job ran (its state file says the job has not
/// ended): the job is restored as `--restore` does, and its agents, if they
/// outlived the old coordinator, continue it with their ranks' hosts; if
/// none comes back in time (they were stopped with it), the job takes
/// the hosts that join (see
/// [`Job::await_restored_members`]). A job that never started starts anew.
/// `None` when there is no such job, or it
/// cannot be restored with this command line (the reason is printed): the
/// run is then continued from its checkpoints.
fn auto_restore(
    args: &UpArgs,
    recipe: &rsb_recipes::Recipe,
    out: &Path,
    token: Option<&Secret>,
) -> Option<(Coordination, PathBuf, Work)> {
    let out = out.canonicalize().ok()?;
    if !out.join(STATE_FILE).is_file() {
        return None;
    }
    let restored = SavedJob::read(&out).map_err(anyhow::Error::new).and_then(|saved| {
        // A job that never started has no ranks that training could go on
        // with (and those of its hosts that waited for an assignment died
        // with the old coordinator's connection): it starts anew.
        if saved.ended.is_some() || !saved.started {
            return Ok(None);
        }
        let token = token.context(
            "no job token was given, and the run folder holds none that can be used: the \
             job's agents present the one it started with",
        )?;
        saved_job(args, recipe.clone(), &out, saved, token).map(Some)
    });
    match restored {
        Ok(Some(job)) => {
            let served = serve_restored(args, job, out, true);
            if served.0.jobs.first().is_some_and(Job::is_over) {
                return Some(served);
            }
            rsb_coordinator::print_line!(
                "--auto-resume: the job's coordinator stopped while it ran; its hosts have \
                 {:?} to come back (their agents outlived it), else the job takes the hosts \
                 that join",
                served.0.jobs.first().map(Job::restored_members_wait).unwrap_or_default()
            );
            Some(served)
        }
        Ok(None) => None,
        Err(e) => {
            rsb_coordinator::print_line!(
                "--auto-resume: not restoring the job saved in {} ({}); continuing the run \
                 from its checkpoints instead",
                out.join(STATE_FILE).display(),
                rsb_logging::error_chain(e.as_ref())
            );
            None
        }
    }
}

/// The job `saved` in `out`, restored with this command line's recipe,
/// `--nodes` and token (each must be the job's).
fn saved_job(
    args: &UpArgs,
    recipe: rsb_recipes::Recipe,
    out: &Path,
    saved: SavedJob,
    token: &Secret,
) -> Result<Job> {
    if saved.nodes_expected != args.nodes {
        bail!(
            "--nodes {}: the job in {} was started with --nodes {}",
            args.nodes,
            out.display(),
            saved.nodes_expected
        );
    }
    Ok(Job::restore(recipe, out.to_path_buf(), saved, token)?)
}

/// A restored job with this command line's timeouts, saved again to its
/// state file as it goes on, its members given time to call again (see
/// [`Job::await_restored_members`]).
fn serve_restored(
    args: &UpArgs,
    mut job: Job,
    out: PathBuf,
    members_may_be_gone: bool,
) -> (Coordination, PathBuf, Work) {
    job.heartbeat_timeout = Duration::from_secs(args.heartbeat_timeout_secs);
    job.rendezvous_timeout = Duration::from_secs(args.rendezvous_timeout_secs);
    job.join_timeout = Some(Duration::from_secs(args.join_timeout_secs));
    job.rejoin_timeout = Duration::from_secs(args.elastic.rejoin_timeout_secs);
    job.max_restarts = args.elastic.max_restarts;
    job.state_file = Some(out.join(STATE_FILE));
    job.await_restored_members(members_may_be_gone);
    rsb_coordinator::print_line!(
        "restored job {} in {}: generation {} over {} host(s), from {}",
        job.id,
        out.display(),
        job.generation,
        job.members.len(),
        job.resume_from.as_deref().unwrap_or("a fresh start (no checkpoint was committed)")
    );
    // Its ranks may have ended it before this start (they train on without
    // their coordinator, and their agents leave once they are done): then
    // it is over now, with `--restore` as with `--auto-resume`, where it
    // would wait for agents that are gone and fail a finished job.
    job.end_if_finished_before_restart();
    let elastic = job.elastic();
    (Coordination::one(job), out, Work::Job { elastic })
}

/// The sweep of `up`: its manifest written (or, with `--resume DIR`, read
/// and checked against the options given), every cell's recipe resolved,
/// the runs that finished before kept, and the rest queued, each resuming
/// from its own newest checkpoint when it has one.
fn prepare_sweep(args: &UpArgs) -> Result<(Coordination, PathBuf, Work)> {
    if args.elastic.min_nodes.is_some() || args.elastic.max_nodes.is_some() {
        bail!(
            "--min-nodes/--max-nodes: the runs of a sweep are fixed jobs; a failed run is \
             retried from its own last checkpoint instead (--max-retries)"
        );
    }
    if let Some(ranks) = args.local.then(|| local_worker_ranks(&args.devices)).flatten() {
        // Refused before any worker starts: no run could ever start.
        let local = u64::from(args.nodes) * u64::from(ranks);
        if local < u64::from(args.sweep.ranks_per_run) {
            bail!(
                "--ranks-per-run {}: the --local workers (--nodes {} --devices {}) bring {local} \
                 rank(s) in all, so no run could start",
                args.sweep.ranks_per_run,
                args.nodes,
                args.devices
            );
        }
    }
    let source = args.recipe.source()?;
    let grid = args.sweep.grid.iter().map(|g| GridAxis::parse(g)).collect::<Result<Vec<_>, _>>()?;
    let (dir, manifest) = match &args.resume {
        Some(dir) => {
            if let Some(out) = &args.out {
                if out.canonicalize().ok() != dir.canonicalize().ok() {
                    bail!(
                        "--out {} and --resume {}: a sweep is resumed in its own folder; \
                         give only --resume",
                        out.display(),
                        dir.display()
                    );
                }
            }
            let manifest = SweepManifest::read(dir)?;
            if let Some(seeds) = &args.sweep.seeds {
                if rsb_job::parse_seeds(seeds)? != manifest.seeds {
                    bail!(
                        "--seeds {seeds}: the sweep in {} has the seeds {:?}; leave --seeds out \
                         to resume it",
                        dir.display(),
                        manifest.seeds
                    );
                }
            }
            if !grid.is_empty() && grid != manifest.grid {
                bail!(
                    "--grid: the sweep in {} has another grid; leave --grid out to resume it",
                    dir.display()
                );
            }
            if args.overrides != manifest.overrides {
                bail!(
                    "--set: the sweep in {} was started with {:?}, not {:?}",
                    dir.display(),
                    manifest.overrides,
                    args.overrides
                );
            }
            (dir.clone(), manifest)
        }
        None => {
            let dir = args.out.clone().context("--out DIR is required (the sweep folder)")?;
            if SweepLayout::new(&dir).manifest().exists() {
                bail!(
                    "{} already holds a sweep; pass `--resume {}` to continue it, or choose \
                     another --out",
                    dir.display(),
                    dir.display()
                );
            }
            let base = source.load(&args.overrides)?;
            let seeds = match &args.sweep.seeds {
                Some(seeds) => rsb_job::parse_seeds(seeds)?,
                None => vec![base.seed],
            };
            let manifest = SweepManifest::new(
                &base.name,
                &source.to_string(),
                args.overrides.clone(),
                seeds,
                grid,
            )?;
            (dir, manifest)
        }
    };
    let layout = SweepLayout::new(&dir);
    let mut runs = Vec::with_capacity(manifest.cells.len());
    for cell in &manifest.cells {
        let recipe = cell.load(&source, &manifest.overrides)?;
        let run_dir = layout.run_dir(&cell.id);
        let mut outcome = RunOutcome::read(&layout, &cell.id)?;
        let mut finished = outcome.as_ref().is_some_and(|o| o.end == RunEnd::Finished);
        let (mut resume_from, mut resume_step) = (None, None);
        if args.resume.is_some() {
            // A study pools its runs as runs of one recipe.
            rsb_job::sweep::check_started_run_recipe(&layout, &cell.id, &recipe)?;
            // Its ranks may have ended it while no coordinator ran.
            if !finished {
                let kept = rsb_coordinator::sweep::keep_run_finished_while_away(
                    &layout,
                    &cell.id,
                    &recipe,
                    outcome.as_ref(),
                )
                .with_context(|| format!("sweep run {}", cell.id))?;
                if let Some((kept, said)) = kept {
                    rsb_coordinator::print_line!("[{}] {said}", cell.id);
                    outcome = Some(kept);
                    finished = true;
                } else if let Some(said) =
                    rsb_coordinator::sweep::take_records_of_unfinished_run(&layout, &cell.id)
                        .with_context(|| format!("sweep run {}", cell.id))?
                {
                    tracing::info!(run = %cell.id, "{said}");
                }
            }
        }
        if !finished {
            // Refused before any run starts: every attempt of every run
            // would fail at its first generation, and be retried for it.
            BatchPlan::new(&recipe, args.sweep.ranks_per_run).with_context(|| {
                format!("sweep run {}: --ranks-per-run {}", cell.id, args.sweep.ranks_per_run)
            })?;
        }
        if args.resume.is_none() {
            rsb_job::check_out_folder(&run_dir, None)?;
        } else if !finished && holds_checkpoints_folder(&run_dir)? {
            match rsb_job::check_resume(&run_dir, &recipe, &cell.overrides(&manifest.overrides)) {
                Ok(verified) => {
                    // The updates it holds, for the report's count of those
                    // trained again (unknown when its state cannot say).
                    resume_step = rsb_job::checkpoint::read_position(verified.path())
                        .ok()
                        .map(|position| position.updates);
                    resume_from = Some(verified.path().display().to_string());
                }
                Err(e @ rsb_job::RunFolderError::RecipeChanged { .. }) => {
                    return Err(anyhow::Error::new(e).context(format!("sweep run {}", cell.id)))
                }
                Err(rsb_job::RunFolderError::Checkpoint(
                    e @ rsb_job::CheckpointError::NotFound { .. },
                )) => {
                    // None was written (the run stopped within its first
                    // checkpoint interval), unless one could not be read.
                    rsb_job::run_folder::confirm_no_checkpoint_folders(&run_dir)
                        .with_context(|| format!("sweep run {}", cell.id))?;
                    tracing::warn!(
                        run = %cell.id,
                        "no checkpoint to resume from ({e}); the run starts afresh"
                    )
                }
                // Its checkpoints are there but none can be resumed from
                // (all torn or corrupt, or unreadable): refused, as `--auto-resume` refuses them, where the run
                // started afresh and its first save set them all aside.
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "sweep run {}: its checkpoints cannot be resumed from; move {} aside \
                         to run it afresh",
                        cell.id,
                        run_dir.join(rsb_job::checkpoint::CHECKPOINTS).display()
                    )))
                }
            }
        }
        // A run not over counts the attempts of every invocation, also of
        // one stopped while a retry ran (which wrote no outcome).
        let (attempts, failure) = match outcome {
            Some(outcome) if finished => (outcome.attempts, outcome.failure),
            outcome => rsb_coordinator::sweep::attempts_so_far(&layout, &cell.id, outcome.as_ref()),
        };
        runs.push(SweepRun {
            state: if finished { RunState::Finished } else { RunState::Queued },
            attempts,
            failure,
            resume_from,
            resume_step,
            ..SweepRun::queued(cell.clone(), recipe)
        });
    }
    if args.resume.is_none() {
        manifest.write(&dir)?;
    }
    let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
    let kept = runs.iter().filter(|r| r.state == RunState::Finished).count();
    rsb_coordinator::print_line!(
        "sweep of {} run(s) in {}: {kept} finished before (kept), {} to run; {} rank(s) per run{}",
        runs.len(),
        dir.display(),
        runs.len() - kept,
        args.sweep.ranks_per_run,
        args.sweep.max_parallel_runs.map_or_else(String::new, |n| format!(", at most {n} at once"))
    );
    let (progress, printer) = SweepProgress::new(runs.len(), std::io::stdout().is_terminal());
    let settings = SweepSettings {
        ranks_per_run: args.sweep.ranks_per_run,
        max_parallel: args.sweep.max_parallel_runs,
        max_retries: args.sweep.max_retries,
        heartbeat_timeout: Duration::from_secs(args.heartbeat_timeout_secs),
        rendezvous_timeout: Duration::from_secs(args.rendezvous_timeout_secs),
    };
    let scheduler = Scheduler::new(SweepLayout::new(&dir), settings, runs, printer)?;
    Ok((Coordination::sweep(scheduler), dir, Work::Sweep(progress)))
}

/// The job token `up` was given, and where from: `--token-file`, else
/// `RSB_JOB_TOKEN`, else, with `--restore` or `--auto-resume`, the
/// `job.token` a first `up` wrote into the run folder (the job's workers
/// may read it). `None` for a new job given none. A restore
/// needs one: its agents present the token the job was started with, and a
/// new one would lock them all out.
/// Whether the run folder `run_dir` has a checkpoints folder (an entry
/// of that name, whatever it is or where it points): one that cannot be
/// looked at (a volume that is not mounted, no permission) is an error
/// naming it, where it was taken for none and the run started afresh.
fn holds_checkpoints_folder(run_dir: &Path) -> Result<bool> {
    let folder = run_dir.join(rsb_job::checkpoint::CHECKPOINTS);
    match std::fs::symlink_metadata(&folder) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context(format!("looking at {}", folder.display()))),
    }
}

fn given_job_token(args: &UpArgs) -> Result<Option<(Secret, String)>> {
    let saved = args.out.as_ref().map(|out| out.join(auth::TOKEN_FILE_NAME));
    let (file, source) = match (&args.token_file, &saved) {
        (Some(file), _) => (Some(file.clone()), format!("--token-file {}", file.display())),
        (None, Some(saved))
            if (args.restore || args.auto_resume)
                && std::env::var_os(auth::TOKEN_ENV).is_none()
                && saved.is_file() =>
        {
            let source = format!("{} (written by the job's first `up`)", saved.display());
            match Secret::job_token(Some(saved)) {
                Err(e) if !args.restore => {
                    // Not one agents could present either: a new one is
                    // written over it.
                    rsb_coordinator::print_line!(
                        "--auto-resume: {} cannot be used ({}); writing a new job token",
                        saved.display(),
                        rsb_logging::error_chain(&e)
                    );
                    return Ok(None);
                }
                read => return Ok(read?.map(|token| (token, source))),
            }
        }
        _ => (None, auth::TOKEN_ENV.to_string()),
    };
    let Some(token) = Secret::job_token(file.as_deref())? else {
        if args.restore {
            bail!(
                "--restore: no job token: the job's agents present the token it was started \
                 with; give it with --token-file FILE or {} (or keep the job.token the first \
                 `up` wrote into the run folder)",
                auth::TOKEN_ENV
            );
        }
        return Ok(None);
    };
    Ok(Some((token, source)))
}

/// A new job token, written to `<out>/job.token` (mode 0600). Says where
/// workers get it, never the token itself.
fn generate_job_token(out: &Path) -> Result<Secret> {
    let token = Secret::generate()?;
    let path = out.join(auth::TOKEN_FILE_NAME);
    auth::write_token_file(&path, &token)?;
    rsb_coordinator::print_line!(
        "job token written to {} (mode 0600); workers read it with \
         `worker join --token-file {}` or from the environment variable {}",
        path.display(),
        path.display(),
        auth::TOKEN_ENV
    );
    Ok(token)
}

/// A binary installed next to this one (`target/release/worker` beside `coordinator`).
fn sibling_binary(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating this executable")?;
    let path = me.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found next to {}; build it (cargo build --release -p rsb-{name})",
            path.display(),
            me.display()
        );
    }
    Ok(path)
}
