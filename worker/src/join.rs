//! `worker join`: one worker host in a coordinated job. The agent joins the
//! coordinator with its devices, starts one rank process per GPU (or the CPU
//! ranks asked for), heartbeats while they run, and stops them if the job
//! fails (a rank that dies is reported to the coordinator at once), if it is
//! stopped itself (SIGINT, SIGTERM, or its parent's death) or if the
//! coordinator stays unreachable past `--coordinator-deadline-secs`; the
//! ranks die with it whatever kills it. Each rank process (`worker rank`,
//! started by the agent) asks for its assignment, rendezvous with the others
//! (NCCL unique id for GPUs, ring addresses for CPUs), trains its share with
//! the code of `worker train`, and reports metrics and checkpoints to the
//! coordinator (sent off the training thread, in order, and sent again
//! while the coordinator does not answer: [`crate::reports`]). A rank's log lines go to its stderr and, without colour, to
//! `<run dir>/ranks/rank-N.log`.
//!
//! Generations: when the coordinator opens a new generation of an elastic
//! job (a host lost, a rank failed, a host admitted), the heartbeat answers
//! carry its number; the agent then kills its ranks (the new generation
//! resumes from the coordinator's committed checkpoint) and starts new ones,
//! which fetch the new assignment.
//!
//! Stopping: a rank given SIGTERM or SIGINT (the agent at its coordinator
//! deadline or its own stop), or whose agent died (its death signal,
//! SIGCONT, continues it even if it was stopped: see `rsb_process`), stops
//! after its current update, with the other ranks, rank 0 writing a
//! checkpoint there (see `rsb_train::stop`); it exits within
//! [`RANK_STOP_DEADLINE`] in any case. A rank that fails does not end the
//! agent while the job goes on: it waits for the next generation, or for
//! the job's end.
//!
//! A coordinator that answers but does not know this member (it started a
//! new job in the old one's place: one that never started, or could not be
//! restored) has the agent stop its ranks and join again, at most
//! [`MAX_JOINS_AS_UNKNOWN`] times in a row.
//!
//! Sweeps (`coordinator up --seeds/--grid`): the coordinator places the host
//! in one run at a time. When that run ends, finished or failed, the agent
//! joins again and is placed in the next run; it is told to join again later
//! while no run can take it, and exits successfully once the sweep has no
//! run left. Between runs, a coordinator that does not answer is retried
//! until `--coordinator-deadline-secs`.
//!
//! Credentials: the agent reads the job token from `--token-file` or
//! `RSB_JOB_TOKEN` (never from the command line) and gets a member secret at
//! join; its rank processes receive both through their environment. Every
//! call carries them ([`Credentials`]); the ring's links authenticate with a
//! key derived from the token ([`RingKey`]).

use crate::relay::relay_lines;
use anyhow::{bail, Context, Result};
use clap::Args;
use rsb_collective::ring::{RingConfig, RingKey, RingListener};
use rsb_collective::Collective;
use rsb_job::{BatchPlan, MetricsRecord};
use rsb_proto::agent_calls::{self, HEARTBEAT_BACKOFF_MAX, HEARTBEAT_DEADLINE};
use rsb_proto::auth::{self, Credentials, Secret};
use rsb_proto::v1 as pb;
use rsb_proto::v1::coordinator_client::CoordinatorClient;
use rsb_recipes::CollectiveBackend;
use rsb_train::stop::StopRequest;
use rsb_train::trainer::{CommittedCheckpoint, Distributed, RunOptions, Trainer};
use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tch::Device;
use tonic::transport::Channel;

use crate::reports::{Client, Report, Reporter};

/// Longest `Leave` message the coordinator accepts (longer ones are cut).
const MAX_LEAVE_MESSAGE: usize = 16 * 1024;

/// Arguments of `worker join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Coordinator URL, e.g. https://10.0.0.1:50051 (with --tls-ca) or
    /// http://127.0.0.1:50051.
    #[arg(long)]
    pub coordinator: String,
    /// `all` (every GPU), `cpu`, or a list of GPU indices like `0,1`.
    #[arg(long, default_value = "all")]
    pub devices: String,
    /// Number of CPU ranks with `--devices cpu`.
    #[arg(long, default_value_t = 1)]
    pub cpu_ranks: u32,
    /// Name reported to the coordinator (default: the host name).
    #[arg(long)]
    pub host_name: Option<String>,
    /// Address other hosts reach this one at (default: the local address of
    /// the route to the coordinator).
    #[arg(long)]
    pub advertise: Option<IpAddr>,
    /// Run folder for checkpoints (default: the coordinator's).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// File holding the job token (`coordinator up` writes one to
    /// OUT/job.token; default: the environment variable RSB_JOB_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) of an https:// coordinator (TLS).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Allow an http:// coordinator beyond loopback: the job token and this
    /// host's member secret then cross the network in clear text (and so do
    /// its ranks' calls). Without it, a coordinator beyond loopback needs
    /// https:// and --tls-ca.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// CPU cores this worker's ranks share, split evenly between them for
    /// libtorch and loader threads (default: every core this process may
    /// use). `coordinator up --local` gives each local worker its share.
    #[arg(long)]
    pub cores: Option<usize>,
    /// Seconds without a successful heartbeat after which this agent stops
    /// its ranks and exits: the coordinator is dead or cut off. Until then
    /// it keeps trying, waiting twice as long after each failure (up to 8 s),
    /// so a coordinator restarted with `up --restore` finds it again.
    #[arg(long, env = "RSB_COORDINATOR_DEADLINE_SECS", default_value_t = 60)]
    pub coordinator_deadline_secs: u64,
}

/// Arguments of `worker rank` (started by `worker join`).
#[derive(Debug, Args)]
pub struct RankArgs {
    /// Coordinator URL.
    #[arg(long)]
    pub coordinator: String,
    /// Member id from the join.
    #[arg(long)]
    pub member: String,
    /// Local rank on this host.
    #[arg(long)]
    pub local_rank: u32,
    /// `cpu` or `cuda` (the agent restricts CUDA_VISIBLE_DEVICES to this rank's GPU).
    #[arg(long)]
    pub device: String,
    /// Address other hosts reach this one at.
    #[arg(long)]
    pub advertise: IpAddr,
    /// Run folder override.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// CA certificate (PEM) of an https:// coordinator.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Allow an http:// coordinator beyond loopback (the agent's option).
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// libtorch threads of this rank (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub torch_threads: i32,
    /// Loader threads of this rank where the recipe leaves them automatic
    /// (`data.loader_threads: 0`); 0 keeps the automatic choice.
    #[arg(long, default_value_t = 0)]
    pub loader_threads: u32,
    /// How long the rank asks again for its assignment while the
    /// coordinator does not answer (restarting): its agent's own
    /// `--coordinator-deadline-secs`.
    #[arg(long, default_value_t = 60)]
    pub coordinator_deadline_secs: u64,
}

/// How long a rank may take to stop on its own after `SIGTERM` (train on
/// to its next sync point, at most `runtime.log_every_steps` updates: 50
/// with the RSB recipes; agree with the other ranks to stop, rank 0 writing a checkpoint,
/// or, at an epoch's last update, that epoch's end with its evaluation and
/// checkpoint) before it gives up and exits without finishing. A ResNet-50
/// checkpoint with its LAMB moments is about 300 MB: seconds on a local
/// disk, tens of seconds on a slow network file system.
const RANK_STOP_DEADLINE: Duration = Duration::from_secs(90);

/// How long the agent waits for a rank to exit after `SIGTERM` before it
/// kills it: the rank's own stop deadline plus a margin for its last words
/// (its `Leave`, bounded by [`RANK_CALL_DEADLINE`]).
const RANK_STOP_GRACE: Duration =
    Duration::from_secs(RANK_STOP_DEADLINE.as_secs() + RANK_CALL_DEADLINE.as_secs() + 5);

/// Deadline of a rank's `Leave`: a frozen or cut-off coordinator never
/// holds a rank that ends for longer. (Its metrics and checkpoint reports
/// never hold it: [`crate::reports`].)
const RANK_CALL_DEADLINE: Duration = Duration::from_secs(5);

async fn connect(url: &str, tls_ca: Option<&Path>, plaintext: auth::Plaintext) -> Result<Channel> {
    let endpoint = auth::endpoint(url, tls_ca, plaintext)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "coordinator not reachable yet");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("connecting to the coordinator at {url}"))
            }
        }
    }
}

/// The local address of the route towards `url`'s host: what peers can reach.
fn route_address(url: &str) -> Result<IpAddr> {
    let authority = url.split("://").nth(1).unwrap_or(url).split('/').next().unwrap_or_default();
    let target: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to nothing"))?;
    let socket = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    socket.connect(target)?;
    Ok(socket.local_addr()?.ip())
}

/// `worker join`.
pub fn join(args: JoinArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(join_async(args))
}

async fn join_async(args: JoinArgs) -> Result<()> {
    let (kind, gpus): (pb::DeviceKind, Vec<usize>) = match args.devices.as_str() {
        "cpu" => (pb::DeviceKind::Cpu, Vec::new()),
        "all" => {
            let n = tch::Cuda::device_count() as usize;
            if n == 0 {
                bail!("--devices all: this host has no CUDA device; use --devices cpu");
            }
            (pb::DeviceKind::Cuda, (0..n).collect())
        }
        list => {
            let ids: Vec<usize> = list
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse::<usize>()
                        .with_context(|| format!("--devices `{list}`: `{s}` is not a GPU index"))
                })
                .collect::<Result<_>>()?;
            let n = tch::Cuda::device_count() as usize;
            if let Some(bad) = ids.iter().find(|&&i| i >= n) {
                bail!("--devices {list}: GPU {bad} does not exist ({n} on this host)");
            }
            if let Some(shared) = ids.iter().find(|&&i| ids.iter().filter(|&&j| j == i).count() > 1)
            {
                tracing::warn!(
                    "--devices {list}: GPU {shared} runs more than one rank; NCCL refuses that \
                     (the job's ranks fail as they meet), so such a job needs \
                     `distributed.backend: ring`"
                );
            }
            (pb::DeviceKind::Cuda, ids)
        }
    };
    let ranks = if kind == pb::DeviceKind::Cpu { args.cpu_ranks.max(1) } else { gpus.len() as u32 };
    let host = args.host_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into())
    });
    let advertise = match args.advertise {
        Some(a) => a,
        None => route_address(&args.coordinator)?,
    };
    let token = Secret::job_token(args.token_file.as_deref())?.with_context(|| {
        format!(
            "no job token: pass --token-file FILE (`coordinator up` writes OUT/{}) or set {}",
            auth::TOKEN_FILE_NAME,
            auth::TOKEN_ENV
        )
    })?;
    let host = Host { kind, gpus, ranks, name: host, advertise, token };
    // Listening before the (up to 2-minute) wait for the coordinator: as a
    // container's process 1, which the kernel sends no signal it has no
    // handler for, the agent ignored a SIGTERM meanwhile, and a pod stopped
    // then waited out its grace period for the SIGKILL.
    let mut stop_signals = rsb_process::stop_signal().context("installing signal handlers")?;
    let channel = tokio::select! {
        channel = connect(
            &args.coordinator,
            args.tls_ca.as_deref(),
            auth::Plaintext::allowed_anywhere(args.insecure_plaintext),
        ) => channel?,
        signal = stop_signals.recv() => bail!(
            "worker stopped by {} while connecting to the coordinator at {}",
            stop_cause(signal, "coordinator"),
            args.coordinator
        ),
    };
    let coordinator_deadline = Duration::from_secs(args.coordinator_deadline_secs.max(1));
    // A sweep's member joins again after each run; the first join of all
    // fails at once when the coordinator cannot be reached.
    let mut in_sweep = false;
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    let mut join_backoff = JOIN_RETRY;
    let mut told_to_wait = false;
    let mut unknown_in_a_row = 0;
    loop {
        let request = pb::JoinRequest {
            host_name: host.name.clone(),
            advertise_address: host.advertise.to_string(),
            device_kind: host.kind as i32,
            local_ranks: host.ranks,
        };
        let mut client = CoordinatorClient::with_interceptor(
            channel.clone(),
            Credentials::token(host.token.clone()),
        );
        let answer = tokio::time::timeout(HEARTBEAT_DEADLINE, client.join(request)).await;
        let joined = match answer {
            Ok(Ok(joined)) => joined.into_inner(),
            Ok(Err(e)) if !in_sweep || e.code() != tonic::Code::Unavailable => {
                return Err(anyhow::Error::new(e)
                    .context(format!("joining the coordinator at {}", args.coordinator)))
            }
            Err(_) if !in_sweep => bail!(
                "joining the coordinator at {}: no answer within {HEARTBEAT_DEADLINE:?}",
                args.coordinator
            ),
            // Between two runs of a sweep: the coordinator may be busy or
            // restarting; join again until the coordinator deadline.
            failed => {
                let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > coordinator_deadline {
                    bail!(
                        "the coordinator at {} has not answered a join for {coordinator_deadline:?}",
                        args.coordinator
                    );
                }
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {HEARTBEAT_DEADLINE:?}"),
                };
                tracing::warn!(
                    "joining the coordinator again failed ({why}); retrying in {join_backoff:?}"
                );
                wait_or_stop(&mut stop_signals, join_backoff).await?;
                join_backoff = (join_backoff * 2).min(HEARTBEAT_BACKOFF_MAX);
                continue;
            }
        };
        unreachable_since = None;
        join_backoff = JOIN_RETRY;
        in_sweep |= joined.sweep;
        if joined.sweep_over {
            tracing::info!("the sweep has no run left for this host; done");
            return Ok(());
        }
        if joined.job_finished {
            tracing::info!("the job is finished: nothing is left to train; done");
            return Ok(());
        }
        if joined.member_id.is_empty() {
            let after = Duration::from_millis(u64::from(joined.retry_after_ms).max(100));
            if !std::mem::replace(&mut told_to_wait, true) {
                if joined.sweep {
                    tracing::info!(
                        "no run of the sweep can take this host now; joining again every {after:?}"
                    );
                } else {
                    tracing::info!(
                        "the coordinator restarted and first waits for the job's own hosts to \
                         come back; joining again every {after:?}"
                    );
                }
            }
            wait_or_stop(&mut stop_signals, after).await?;
            continue;
        }
        told_to_wait = false;
        let end = serve_member(&args, &host, &channel, &joined, &mut stop_signals).await?;
        if !matches!(end, MemberEnd::Unknown(_)) {
            unknown_in_a_row = 0;
        }
        match (joined.sweep, end) {
            (_, MemberEnd::Unknown(why)) => {
                unknown_in_a_row += 1;
                if unknown_in_a_row > MAX_JOINS_AS_UNKNOWN {
                    bail!("{why}, {unknown_in_a_row} times in a row; giving up");
                }
                tracing::warn!("{why}; joining it again");
            }
            (false, MemberEnd::Finished) => return Ok(()),
            (false, MemberEnd::Failed(reason)) => bail!("{reason}"),
            (true, MemberEnd::Finished) => {
                tracing::info!("the run finished; joining again for the sweep's next run")
            }
            (true, MemberEnd::Failed(reason)) => {
                tracing::warn!("the run ended: {reason}; joining again for the sweep's next run")
            }
        }
    }
}

/// First delay between joins that found no coordinator, between two runs of
/// a sweep (it doubles, up to [`HEARTBEAT_BACKOFF_MAX`]).
const JOIN_RETRY: Duration = Duration::from_secs(2);

/// What this worker host brings, as it joins.
struct Host {
    kind: pb::DeviceKind,
    /// GPU indices of its ranks (CUDA).
    gpus: Vec<usize>,
    ranks: u32,
    name: String,
    advertise: IpAddr,
    token: Secret,
}

/// How the job of one membership ended for this host.
enum MemberEnd {
    /// Every local rank finished.
    Finished,
    /// A local rank or the job failed (why).
    Failed(String),
    /// The coordinator answers but does not know this member (why): it
    /// started a new job in the old one's place (one that never started,
    /// or could not be restored). The ranks are stopped, and the host
    /// joins again.
    Unknown(String),
}

/// Joins in a row that ended with the coordinator not knowing the member
/// ([`MemberEnd::Unknown`]) before the agent gives up.
const MAX_JOINS_AS_UNKNOWN: u32 = 3;

/// Sleeps `after`, unless this agent is stopped first (an error).
async fn wait_or_stop(stop_signals: &mut rsb_process::StopSignals, after: Duration) -> Result<()> {
    tokio::select! {
        () = tokio::time::sleep(after) => Ok(()),
        signal = stop_signals.recv() => {
            bail!("worker stopped by {}", stop_cause(signal, "coordinator"))
        }
    }
}

/// Names what stopped this process, for its reasons: the signal, or the
/// death of its `parent` (the agent of a rank; the `coordinator up --local`
/// of an agent), which [`rsb_process::die_with_parent`] armed.
fn stop_cause(signal: rsb_process::StopSignal, parent: &str) -> String {
    match signal {
        rsb_process::StopSignal::ParentDied { parent: pid } => {
            format!("the death of its {parent} (pid {pid})")
        }
        signal => signal.to_string(),
    }
}

/// How long after the first stop signal the same signal again is taken as
/// one of the same stop, not a hurry: Slurm signals every process of a
/// cancelled step from more than one place, milliseconds apart.
const SAME_STOP_WITHIN: Duration = Duration::from_secs(1);

/// Completes at a second `first` (the SIGTERM or SIGINT the agent stops
/// at) more than [`SAME_STOP_WITHIN`] after it, saying so: a user's second
/// Ctrl-C, a second `kill`. Another signal is no hurry: one Ctrl-C at a
/// terminal reaches `coordinator up --local` and its agents at once, and the
/// coordinator then stops its agents with SIGTERM, while their ranks write
/// their stop checkpoint. Never after the parent's death, which would be
/// seen again at once.
async fn second_stop_signal(
    stop_signals: &mut rsb_process::StopSignals,
    first: rsb_process::StopSignal,
) {
    let first_at = tokio::time::Instant::now();
    if matches!(first, rsb_process::StopSignal::ParentDied { .. }) {
        return std::future::pending().await;
    }
    loop {
        match stop_signals.recv().await {
            rsb_process::StopSignal::ParentDied { .. } => std::future::pending().await,
            signal if signal == first && first_at.elapsed() < SAME_STOP_WITHIN => {
                tracing::info!(
                    "{signal} again within {SAME_STOP_WITHIN:?}: taken as the same stop (a \
                     scheduler signals each process of a step more than once)"
                );
            }
            signal if signal == first => {
                tracing::warn!("{signal} again: killing the local ranks at once");
                return;
            }
            signal => tracing::info!(
                "{signal} after {first}: the local ranks go on stopping (a second {first} kills \
                 them at once)"
            ),
        }
    }
}

/// One membership: starts the ranks, heartbeats while they run, restarts
/// them at a new generation, and stops them when the job fails. Returns
/// how the job ended for this host; an error means the agent itself must
/// stop (a signal, or the coordinator unreachable past its deadline).
async fn serve_member(
    args: &JoinArgs,
    host: &Host,
    channel: &Channel,
    joined: &pb::JoinResponse,
    stop_signals: &mut rsb_process::StopSignals,
) -> Result<MemberEnd> {
    let Host { kind, gpus, ranks, advertise, token, .. } = host;
    let (kind, ranks, advertise) = (*kind, *ranks, *advertise);
    tracing::info!(member = %joined.member_id, ranks, %advertise, "joined");
    let secret = Secret::new(joined.member_secret.clone(), "member secret from the coordinator")?;
    let credentials = Credentials::member(token.clone(), &joined.member_id, secret.clone())?;
    let mut client = CoordinatorClient::with_interceptor(channel.clone(), credentials);
    let available = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cores = args.cores.unwrap_or(available).clamp(1, available);
    let cores_per_rank = (cores / ranks as usize).max(1);
    let exe = std::env::current_exe()?;
    let start_ranks = || -> Result<(Vec<tokio::process::Child>, Vec<StderrRelay>)> {
        let mut children = Vec::new();
        let mut relays = Vec::new();
        for local_rank in 0..ranks {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(["rank", "--coordinator", &args.coordinator, "--member", &joined.member_id])
                .args(["--local-rank", &local_rank.to_string()])
                .args(["--advertise", &advertise.to_string()]);
            cmd.args(["--loader-threads", &cores_per_rank.to_string()]);
            cmd.args(["--coordinator-deadline-secs", &args.coordinator_deadline_secs.to_string()]);
            // The host's cores are shared out: a rank's libtorch threads
            // too (on a GPU they serve the host-side work).
            cmd.args(["--torch-threads", &cores_per_rank.to_string()]);
            if kind == pb::DeviceKind::Cpu {
                cmd.args(["--device", "cpu"]);
            } else {
                // One process per GPU, which sees only its own GPU as cuda:0.
                let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
                let gpu = physical_gpu(visible.as_deref(), gpus[local_rank as usize]);
                cmd.args(["--device", "cuda"]).env("CUDA_VISIBLE_DEVICES", gpu);
            }
            if let Some(dir) = &args.run_dir {
                cmd.arg("--run-dir").arg(dir);
            }
            if let Some(ca) = &args.tls_ca {
                cmd.arg("--tls-ca").arg(ca);
            }
            if args.insecure_plaintext {
                cmd.arg(auth::INSECURE_PLAINTEXT_FLAG);
            }
            // Credentials travel in the environment, never on the command line.
            cmd.env(auth::TOKEN_ENV, token.expose()).env(auth::MEMBER_SECRET_ENV, secret.expose());
            // stderr is relayed line by line, and its last error line kept
            // for the report of a rank that dies; stdout (what libraries
            // print there, NCCL_DEBUG's lines) is relayed too, so that the
            // rank never writes to the agent's own, which may stall.
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
            cmd.kill_on_drop(true);
            rsb_process::die_with_parent(&mut cmd);
            let mut child = cmd.spawn().context("starting a rank process")?;
            relays.push(StderrRelay::start(child.stderr.take()));
            relay_stdout(child.stdout.take());
            children.push(child);
        }
        Ok((children, relays))
    };
    if joined.pending {
        tracing::info!("the job is running: admitted at its next generation");
    }
    let (mut children, mut relays) = start_ranks()?;
    let coordinator_deadline = Duration::from_secs(args.coordinator_deadline_secs.max(1));
    // A partitioned coordinator never answers: every call has a deadline.
    let call_deadline = HEARTBEAT_DEADLINE.min(coordinator_deadline);
    let mut last_heartbeat = tokio::time::Instant::now();
    // When to heartbeat next, and the wait after a failed one.
    let mut next_heartbeat = last_heartbeat;
    let interval = loop_interval(joined.heartbeat_interval_ms);
    let mut backoff = interval;
    // A failure of one of the current ranks, then of the job.
    let mut failed = None;
    let mut job_failed = None;
    let mut done = vec![false; children.len()];
    // Ranks this agent killed because the job failed elsewhere: their end
    // is no failure of theirs.
    let mut killed_here = vec![false; children.len()];
    let mut job_over = false;
    // When the coordinator said the job is over: the ranks still running
    // get `RANK_STOP_GRACE` from then to exit on their own.
    let mut job_over_at: Option<tokio::time::Instant> = None;
    // The generation the current ranks run in (known from the first
    // heartbeat answer that does not say "pending").
    let mut rank_generation: Option<u64> = None;
    loop {
        // The ranks found dead in this pass (unsuccessful, and not killed
        // here) are collected first and their stderr drained at once: when
        // a host's ranks die together (the OOM killer on an 8-GPU host),
        // the last one's report must not wait out each earlier one's drain.
        let mut dead = Vec::new();
        // A failed wait ends the agent, but only once the ranks already
        // found dead in this pass are reported, as they would have been
        // before it.
        let mut wait_error = None;
        for (i, child) in children.iter_mut().enumerate() {
            if !done[i] {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        done[i] = true;
                        if !status.success() && !killed_here[i] {
                            dead.push((i, status));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        wait_error = Some(e);
                        break;
                    }
                }
            }
        }
        let dead_ranks: Vec<usize> = dead.iter().map(|&(i, _)| i).collect();
        let last_lines = last_errors(&mut relays, &dead_ranks).await;
        // Reported at once, all together: a rank killed outright (OOM
        // killer, kill -9) cannot say so itself, and a frozen coordinator
        // costs one deadline, not one per dead rank. The first dead rank's
        // reason (in index order) is the one kept in `failed`, as the
        // agent's own failure. A rank that already left is refused, which
        // is harmless.
        let mut reports = tokio::task::JoinSet::new();
        for ((i, status), last_line) in dead.into_iter().zip(last_lines) {
            let reason = match last_line {
                Some(line) => {
                    format!("rank process {i} exited with {status}; its last error: {line}")
                }
                None => format!("rank process {i} exited with {status}"),
            };
            let reason = truncated(reason, MAX_LEAVE_MESSAGE);
            let leave = pb::LeaveRequest {
                member_id: joined.member_id.clone(),
                local_rank: i as u32,
                success: false,
                message: reason.clone(),
                generation: rank_generation.unwrap_or(0),
                collective_peer: None,
                stop_requested_by: Vec::new(),
                // Ended by NCCL's exit timer for a collective that timed
                // out (its thread blocked on the aborted stream): not its
                // own failure, and the rank could not say so itself.
                collective_peer_unknown: ended_for_a_collective(status),
                tampered_link_from: None,
                stopped_before_training: false,
            };
            failed.get_or_insert(reason.clone());
            let mut client = client.clone();
            reports.spawn(async move {
                match tokio::time::timeout(HEARTBEAT_DEADLINE, client.leave(leave)).await {
                    Ok(Ok(_)) => tracing::error!("{reason}; reported to the coordinator"),
                    Ok(Err(e)) => tracing::debug!(error = %e, "{reason}; not reported again"),
                    Err(_) => tracing::warn!("{reason}; the coordinator did not answer"),
                }
            });
        }
        while reports.join_next().await.is_some() {}
        if let Some(e) = wait_error {
            return Err(e.into());
        }
        // Every rank is done: they all succeeded, or the job is over. After
        // a failure the job may go on in a new generation: wait for it.
        if done.iter().all(|d| *d) && (failed.is_none() || job_over) {
            break;
        }
        if !job_over && tokio::time::Instant::now() >= next_heartbeat {
            let answer = heartbeat_within(&mut client, &joined.member_id, call_deadline).await;
            let heartbeat_ok = answer.is_ok();
            match answer {
                Ok(r) if !r.get_ref().keep_going => {
                    job_over = true;
                    job_over_at = Some(tokio::time::Instant::now());
                    let failure = &r.get_ref().failure;
                    if !failure.is_empty() {
                        // The job failed elsewhere: stop our ranks instead of
                        // letting them wait on dead peers.
                        tracing::warn!(%failure, "the coordinator ended the job; stopping local ranks");
                        let running: Vec<usize> =
                            (0..children.len()).filter(|&i| !done[i]).collect();
                        let killed = children
                            .iter_mut()
                            .enumerate()
                            .filter(|(i, _)| running.contains(i))
                            .map(|(_, child)| child);
                        rsb_process::kill_all_within(killed, rsb_process::REAP_LIMIT).await;
                        // Killed here, for the job's failure: no failure of
                        // theirs to report, nor to end this agent with. One
                        // the kernel has not let go of (warned about) is
                        // reaped by the loop above when it is, unreported.
                        for i in running {
                            killed_here[i] = true;
                            done[i] = matches!(children[i].try_wait(), Ok(Some(_)));
                        }
                        job_failed = Some(format!("job failed: {failure}"));
                    }
                    // A finished job: every rank of it has reported success
                    // and ours are exiting on their own (those of a host
                    // admitted too late are told the job finished, and exit
                    // successfully without a share).
                }
                // Pending after running a generation: this host stands by
                // (the hosts left cannot split the batch with its ranks).
                // Its ranks, whose peers are gone, are replaced by fresh
                // ones that wait for the generation that admits it.
                Ok(r) if r.get_ref().pending && rank_generation.is_some() => {
                    tracing::warn!(
                        "the job's next generation runs without this host (standing by, \
                         pending); restarting the local ranks to wait for one that takes them"
                    );
                    kill_ranks(&mut children).await;
                    (children, relays) = start_ranks()?;
                    done = vec![false; children.len()];
                    killed_here = vec![false; children.len()];
                    failed = None;
                    rank_generation = None;
                }
                Ok(r) if r.get_ref().pending => {}
                Ok(r) => {
                    let generation = r.get_ref().generation;
                    let fetched =
                        (r.get_ref().ranks_generation, r.get_ref().newest_ranks_generation);
                    let each = &r.get_ref().rank_fetches;
                    if !ranks_are_behind(rank_generation, generation, fetched, each) {
                        rank_generation = rank_generation.max(Some(generation));
                    } else {
                        tracing::warn!(
                            generation,
                            "the job opened a new generation; restarting the local ranks"
                        );
                        if let Some(late) = generation_kill_delay() {
                            // Test hook: an agent that learns of the
                            // generation late; its ranks train on.
                            tokio::time::sleep(late).await;
                        }
                        // Killed, not stopped: the new generation resumes
                        // from the committed checkpoint the coordinator
                        // chose, and a stop checkpoint written now could
                        // race with the new ranks' own.
                        kill_ranks(&mut children).await;
                        (children, relays) = start_ranks()?;
                        done = vec![false; children.len()];
                        killed_here = vec![false; children.len()];
                        failed = None;
                        rank_generation = Some(generation);
                    }
                }
                Err(e) if e.code() == tonic::Code::Unauthenticated => {
                    // It answers, but not for this member (a new job in
                    // the old one's place) or not with this token.
                    let why = format!(
                        "the coordinator at {} does not know member {} ({})",
                        args.coordinator,
                        joined.member_id,
                        e.message()
                    );
                    tracing::warn!("{why}; stopping the local ranks");
                    rsb_process::terminate(&mut children, RANK_STOP_GRACE).await;
                    return Ok(MemberEnd::Unknown(why));
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
            if heartbeat_ok {
                last_heartbeat = tokio::time::Instant::now();
                backoff = interval;
            } else {
                // Back off while the coordinator is away (restarting, or cut
                // off), up to HEARTBEAT_BACKOFF_MAX between tries.
                backoff = (backoff * 2).min(HEARTBEAT_BACKOFF_MAX).max(interval);
                next_heartbeat = tokio::time::Instant::now() + backoff;
                tracing::info!("next heartbeat try in {backoff:?}");
            }
        }
        if job_over_at.is_some_and(|at| at.elapsed() > RANK_STOP_GRACE) {
            // Every rank has already told the coordinator how it ended; one
            // that does not exit (hung in a library's exit handler) must not
            // keep its GPU, or this agent, for ever.
            let running: Vec<String> =
                (0..children.len()).filter(|&i| !done[i]).map(|i| i.to_string()).collect();
            tracing::warn!(
                "local rank process(es) {} still running {RANK_STOP_GRACE:?} after the job \
                 ended; stopping them",
                running.join(", ")
            );
            rsb_process::terminate(&mut children, Duration::from_secs(5)).await;
            break;
        }
        if !job_over && last_heartbeat.elapsed() > coordinator_deadline {
            let reason = format!(
                "the coordinator at {} has not answered a heartbeat for {:?}",
                args.coordinator, coordinator_deadline
            );
            tracing::error!("{reason}; stopping the local ranks");
            rsb_process::terminate(&mut children, RANK_STOP_GRACE).await;
            bail!("{reason}");
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            signal = stop_signals.recv() => {
                let cause = stop_cause(signal, "coordinator");
                tracing::warn!(
                    "stopped by {cause}; stopping the local ranks (rank 0 writes a stop \
                     checkpoint; the same signal again kills them at once, without it)"
                );
                let stopping = rsb_process::terminate_unless_hurried(
                    &mut children,
                    RANK_STOP_GRACE,
                    second_stop_signal(stop_signals, signal),
                );
                let hurried = tokio::select! {
                    hurried = stopping => hurried,
                    never = heartbeat_while_stopping(
                        &mut client,
                        &joined.member_id,
                        interval,
                        call_deadline,
                    ) => {
                        match never {}
                    }
                };
                if hurried {
                    bail!("worker stopped by {cause}, and its ranks killed at a second signal");
                }
                bail!("worker stopped by {cause}");
            }
        }
    }
    Ok(match failed.or(job_failed) {
        Some(reason) => MemberEnd::Failed(reason),
        None => MemberEnd::Finished,
    })
}

/// One heartbeat of member `member_id`, answered within `within` or failed
/// as `DEADLINE_EXCEEDED`.
async fn heartbeat_within(
    client: &mut Client,
    member_id: &str,
    within: Duration,
) -> Result<tonic::Response<pb::HeartbeatResponse>, tonic::Status> {
    let request = pb::HeartbeatRequest { member_id: member_id.to_string() };
    match tokio::time::timeout(within, client.heartbeat(request)).await {
        Ok(answer) => answer,
        Err(_) => {
            Err(tonic::Status::deadline_exceeded(format!("no heartbeat answer within {within:?}")))
        }
    }
}

/// Heartbeats the coordinator every `interval` while the local ranks stop,
/// each call within `within`, for ever (the caller ends it): rank 0's stop
/// checkpoint may take longer than the heartbeat timeout, and a host found
/// silent meanwhile is dropped from an elastic job, which then opens its
/// next generation from the checkpoint before the stop one. What the
/// coordinator answers changes nothing: the ranks are stopping.
async fn heartbeat_while_stopping(
    client: &mut Client,
    member_id: &str,
    interval: Duration,
    within: Duration,
) -> std::convert::Infallible {
    loop {
        if let Err(e) = heartbeat_within(client, member_id, within).await {
            tracing::debug!(error = %e, "heartbeat while the ranks stop failed");
        }
        tokio::time::sleep(interval).await;
    }
}

/// Whether the local ranks must be restarted for the job's `generation`:
/// the agent knew them at `known` (`None` until its first answer past
/// admission), and the coordinator says the generation whose assignment
/// each of them last fetched (`each`, by local rank; 0: not yet, and it will
/// fetch the current one), and the oldest and the newest of those
/// (`fetched`; what a coordinator before `each` sends, and 0 for the newest
/// before that). They are behind when the job opened a generation after
/// one a rank fetched, also before the agent's first answer (admitted at
/// one generation, another opened before its next heartbeat), also when
/// only some of them had fetched it: left running, such a rank would fail
/// at the rendezvous as stale, counted against the new generation.
///
/// Once known, a fetch older than `known` is a killed process's: `known` is
/// the generation the agent last restarted its ranks for (each new process
/// fetches that one or a later one), or one that no live fetch was behind.
/// Ranks that fetched a generation opened within a heartbeat of their
/// restart are so left in it. A fetch of 0 still restarts them: a restored
/// coordinator knows no fetch, and its generation is one they are not in.
/// Without `each`, the oldest decides, as before it was sent.
fn ranks_are_behind(
    known: Option<u64>,
    generation: u64,
    fetched: (u64, u64),
    each: &[u64],
) -> bool {
    let (oldest, newest) = fetched;
    let older = |fetched: u64| fetched > 0 && fetched < generation;
    match known {
        None if each.is_empty() => older(oldest) || older(newest),
        None => each.iter().any(|&fetched| older(fetched)),
        Some(current) if generation <= current => false,
        Some(_) if each.is_empty() => oldest < generation,
        Some(current) => {
            each.iter().any(|&fetched| fetched == 0 || (fetched >= current && fetched < generation))
        }
    }
}

/// Test hook (`RSB_GENERATION_KILL_DELAY_MS`): how much later than it
/// learns of a new generation the agent restarts its ranks.
fn generation_kill_delay() -> Option<Duration> {
    let ms = std::env::var("RSB_GENERATION_KILL_DELAY_MS").ok()?;
    match ms.parse() {
        Ok(ms) => Some(Duration::from_millis(ms)),
        Err(_) => {
            tracing::warn!("RSB_GENERATION_KILL_DELAY_MS=`{ms}` is not a number of milliseconds");
            None
        }
    }
}

/// Kills every rank process at once (SIGKILL) and reaps them (one the kernel
/// cannot end, stuck in a hung file system or driver, is left with a warning
/// after [`rsb_process::REAP_LIMIT`] for them all).
async fn kill_ranks(children: &mut [tokio::process::Child]) {
    rsb_process::kill_all_within(children.iter_mut(), rsb_process::REAP_LIMIT).await;
}

/// Relays a rank process's stderr to the agent's (through its non-blocking
/// stderr, `rsb_logging::init_non_blocking`), line by line, and keeps
/// its last error line (`error: ...`, as `worker` prints a failure, or a
/// tracing `ERROR` line) for the report of a rank that dies.
struct StderrRelay {
    last_error: Arc<std::sync::Mutex<Option<String>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl StderrRelay {
    /// Longest wait for a dead rank's last stderr lines (the coordinator's
    /// wait for NCCL ranks' reports counts with it).
    const DRAIN: Duration = agent_calls::DEAD_RANK_STDERR_DRAIN;

    fn start(stderr: Option<tokio::process::ChildStderr>) -> StderrRelay {
        let last_error = Arc::new(std::sync::Mutex::new(None));
        let task = stderr.map(|stderr| {
            let keep = Arc::clone(&last_error);
            tokio::spawn(relay_lines(stderr, move |line| {
                // Never waits (the agent's stderr is non-blocking, lines
                // that do not fit are dropped and counted) and never
                // panics (a closed pipe): the relay must keep draining
                // the rank's pipe, or the rank blocks on its next log
                // line, and the agent's threads must keep answering.
                rsb_logging::stderr_line(&rsb_logging::relayed_line(line));
                if let Some(error) = rsb_logging::error_reported_by(line) {
                    *keep.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
                }
            }))
        });
        StderrRelay { last_error, task }
    }

    /// The last error line, once the stream has ended (or `deadline` passed).
    async fn last_error_by(&mut self, deadline: tokio::time::Instant) -> Option<String> {
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The last error lines of the relays of `ranks` (in their order), once
/// their streams have ended, waiting at most [`StderrRelay::DRAIN`] for them
/// all together, not for each in turn.
///
/// The relays already run as tasks of their own, draining their pipes side
/// by side: awaiting them one after the other against one shared deadline
/// waits for the slowest of them, never the sum, with no extra task.
async fn last_errors(relays: &mut [StderrRelay], ranks: &[usize]) -> Vec<Option<String>> {
    let deadline = tokio::time::Instant::now() + StderrRelay::DRAIN;
    let mut errors = Vec::with_capacity(ranks.len());
    for &rank in ranks {
        errors.push(relays[rank].last_error_by(deadline).await);
    }
    errors
}

/// Relays a rank process's stdout to the agent's stderr, line by line, as
/// [`StderrRelay`] does its stderr (never waiting, never panicking), until
/// the rank closes it.
fn relay_stdout(stdout: Option<tokio::process::ChildStdout>) {
    if let Some(stdout) = stdout {
        tokio::spawn(relay_lines(stdout, |line| {
            rsb_logging::stderr_line(&rsb_logging::relayed_line(line));
        }));
    }
}

/// The credentials `worker join` hands its rank processes through the environment.
fn rank_credentials(member: &str) -> Result<(Secret, Credentials)> {
    let missing =
        |var: &str| format!("{var} is not set (`worker rank` is started by `worker join`)");
    let token = Secret::from_env(auth::TOKEN_ENV)?.with_context(|| missing(auth::TOKEN_ENV))?;
    let secret = Secret::from_env(auth::MEMBER_SECRET_ENV)?
        .with_context(|| missing(auth::MEMBER_SECRET_ENV))?;
    let credentials = Credentials::member(token.clone(), member, secret)?;
    Ok((token, credentials))
}

/// `message` cut to at most `max` bytes, at a character boundary.
fn truncated(message: String, max: usize) -> String {
    if message.len() <= max {
        return message;
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

/// Makes a panic in this process say itself in one error line on stderr
/// ([`rsb_logging::panic_error_line`]: thread, place, message; in a JSON
/// log with the stack when `RUST_BACKTRACE` asks), before the default
/// report (left out of a JSON log, which it would break), so that the agent
/// relays it as the rank's last error: the coordinator's failure then says
/// why the rank died instead of only `exited with exit status: 101`. A
/// panic that is caught and handled (a loader job's, turned into an error)
/// prints the line too; a rank that then fails prints its own error line
/// last, which is the one relayed.
fn report_panics_in_one_line() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        rsb_logging::stderr_line(&rsb_logging::panic_error_line(info));
        if rsb_logging::format_from_env() == rsb_logging::LogFormat::Text {
            default(info);
        }
    }));
}

/// `worker rank`.
pub fn rank(args: RankArgs) -> Result<()> {
    report_panics_in_one_line();
    let (token, credentials) = rank_credentials(&args.member)?;
    let runtime = Arc::new(tokio::runtime::Runtime::new()?);
    let channel = runtime.block_on(connect(
        &args.coordinator,
        args.tls_ca.as_deref(),
        auth::Plaintext::allowed_anywhere(args.insecure_plaintext),
    ))?;
    let mut client = CoordinatorClient::with_interceptor(channel, credentials);
    let stop = StopRequest::new();
    let stopped_before_training = pb::LeaveRequest {
        member_id: args.member.clone(),
        local_rank: args.local_rank,
        ..pb::LeaveRequest::default()
    };
    watch_stop_signals(&runtime, stop.clone(), client.clone(), stopped_before_training)?;
    // After the signal watch: a stop during its 75 ms is a stop before
    // training, told to the coordinator, not the default death.
    let ring_key = RingKey::derive(token.expose().as_bytes());
    let mut generation = 0;
    let outcome = match run_rank(&args, &runtime, &mut client, &ring_key, &mut generation, &stop) {
        Ok(RankEnd::NothingToTrain) => {
            // Never a rank of the job: there is nothing to leave.
            tracing::info!(
                "the job finished before this rank had a share of it: nothing is left to train"
            );
            return Ok(());
        }
        Ok(RankEnd::Trained) => Ok(()),
        Err(e) => Err(e),
    };
    let (success, message) = match &outcome {
        Ok(()) => (true, String::new()),
        Err(e) => (false, truncated(rsb_logging::error_chain(e.as_ref()), MAX_LEAVE_MESSAGE)),
    };
    let blame = outcome.as_ref().err().map_or(CollectiveBlame::None, collective_blame);
    let leave = pb::LeaveRequest {
        member_id: args.member.clone(),
        local_rank: args.local_rank,
        success,
        message,
        generation,
        collective_peer: match blame {
            CollectiveBlame::Peer(peer) => Some(peer),
            _ => None,
        },
        stop_requested_by: outcome.as_ref().err().map(stop_requested_by).unwrap_or_default(),
        collective_peer_unknown: blame == CollectiveBlame::PeerUnknown,
        tampered_link_from: match blame {
            CollectiveBlame::TamperedLinkFrom(peer) => Some(peer),
            _ => None,
        },
        stopped_before_training: false,
    };
    // Its own Leave says how it ended: a stop signal's before training
    // must not take its place.
    ASSIGNED_GENERATION.store(0, std::sync::atomic::Ordering::SeqCst);
    runtime.block_on(send_leave(&mut client, leave, &stop));
    outcome
}

/// Tells the coordinator that this rank left. A coordinator that does not
/// answer (frozen, restarting, cut off) is asked again, each call within
/// [`RANK_CALL_DEADLINE`], until [`REPORT_FLUSH_DEADLINE`] after the rank
/// began flushing its reports (one budget for both; from now for a rank
/// that never trained) or until the rank is told to stop (its agent gave
/// up on the coordinator): a Leave lost to a coordinator frozen for a few
/// seconds left the job waiting for this rank after its agent had exited,
/// and then failed it for that host's silence. A try that reached the
/// coordinator late makes the next one refused (the rank already left, or
/// its generation is over): that is taken as done. What is worth another
/// try is what a report's is ([`crate::reports::worth_another_try`]).
async fn send_leave(client: &mut Client, leave: pb::LeaveRequest, stop: &StopRequest) {
    let from = LAST_WORDS_FROM.get().copied().unwrap_or_else(tokio::time::Instant::now);
    let deadline = from + report_flush_deadline();
    let mut wait = crate::reports::FIRST_RETRY;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let why_not = match tokio::time::timeout(RANK_CALL_DEADLINE, client.leave(leave.clone()))
            .await
        {
            Ok(Ok(_)) => return,
            Ok(Err(e)) if tries > 1 && e.code() == tonic::Code::FailedPrecondition => {
                tracing::info!(
                    "the coordinator had taken this rank's Leave from an earlier try ({})",
                    e.message()
                );
                return;
            }
            Ok(Err(e)) if !crate::reports::worth_another_try(e.code()) => {
                tracing::warn!(error = %e, "could not tell the coordinator that this rank left");
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {RANK_CALL_DEADLINE:?}"),
        };
        if tokio::time::Instant::now() >= deadline || stop.reason().is_some() {
            tracing::warn!(
                "the coordinator did not take this rank's Leave after {tries} tries \
                 ({why_not}); giving up"
            );
            return;
        }
        if tries == 1 {
            tracing::warn!(
                "the coordinator did not take this rank's Leave ({why_not}); trying again"
            );
        }
        // Backing off as a report and an assignment request do.
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(HEARTBEAT_BACKOFF_MAX);
    }
}

/// On the first `SIGTERM` or `SIGINT` (from the agent), or the agent's
/// death (its death signal, `SIGCONT`, with the agent gone: see
/// [`rsb_process::die_with_parent`]; also one that came before this rank
/// listened, or while it was stopped), asks the training to stop at its
/// next sync point (rank 0 writes a checkpoint there); if the rank is still
/// running [`RANK_STOP_DEADLINE`] later (a peer gone silent, a hung disk)
/// it exits at once, saying so. A rank that has not begun training exits at
/// once; one that has an assignment (`leave` names it) first tells the
/// coordinator so, within [`RANK_CALL_DEADLINE`], so that the job fails or
/// goes on at once, naming it, not when its host is found silent or at the
/// rendezvous deadline (its agent, stopped by the same preemption, reports
/// nothing).
fn watch_stop_signals(
    runtime: &tokio::runtime::Runtime,
    stop: StopRequest,
    mut client: Client,
    leave: pb::LeaveRequest,
) -> Result<()> {
    let mut signals = {
        let _inside = runtime.enter();
        rsb_process::stop_signal().context("installing signal handlers")?
    };
    runtime.spawn(async move {
        let cause = stop_cause(signals.recv().await, "agent");
        if !TRAINING.load(std::sync::atomic::Ordering::SeqCst) {
            // Nothing to checkpoint yet (joining, rendezvous, building).
            // Not `eprintln!`, which panics when stderr is gone (a dead agent).
            let message = format!("stopped by {cause} before training began");
            rsb_logging::stderr_line(&rsb_logging::error_line(&message));
            let generation = ASSIGNED_GENERATION.load(std::sync::atomic::Ordering::SeqCst);
            if generation > 0 {
                let leave = pb::LeaveRequest {
                    success: false,
                    message,
                    generation,
                    stopped_before_training: true,
                    ..leave
                };
                let not_taken =
                    match tokio::time::timeout(RANK_CALL_DEADLINE, client.leave(leave)).await {
                        Ok(Ok(_)) => None,
                        Ok(Err(e)) => Some(format!("refused it: {}", e.message())),
                        Err(_) => Some(format!("did not answer within {RANK_CALL_DEADLINE:?}")),
                    };
                if let Some(why) = not_taken {
                    // A warning: the stop, said above, stays the last error.
                    tracing::warn!("the coordinator {why}, of this rank's Leave");
                }
            }
            rsb_process::exit_now(STOP_DEADLINE_EXIT_CODE);
        }
        stop.request_within(cause.clone(), RANK_STOP_DEADLINE);
        tracing::warn!(
            "{cause}: stopping after the current update (rank 0 writes a checkpoint); exiting \
             within {RANK_STOP_DEADLINE:?} in any case"
        );
        tokio::time::sleep(RANK_STOP_DEADLINE).await;
        let line = rsb_logging::error_line(&format!(
            "stopped by {cause}, but the stop did not finish within {RANK_STOP_DEADLINE:?} \
             (a peer gone, or a slow checkpoint write); exiting without it"
        ));
        rsb_logging::stderr_line(&line);
        rsb_process::exit_now(STOP_DEADLINE_EXIT_CODE);
    });
    Ok(())
}

/// Exit status of a rank that stopped past [`RANK_STOP_DEADLINE`], or
/// before it began training.
const STOP_DEADLINE_EXIT_CODE: i32 = 3;

/// The generation of this rank's assignment, which a rank stopped before
/// training leaves; 0 until it has one, and again once the rank ended
/// (successfully or not, from the flush of its reports on): its own Leave
/// follows, which a stop's must not overtake.
static ASSIGNED_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether this rank process trains (a stop signal then stops it at an
/// update boundary; before, it exits at once).
static TRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// When this rank began its last words to the coordinator (the flush of its
/// reports): its `Leave` is tried until [`REPORT_FLUSH_DEADLINE`] after it,
/// one budget for both.
static LAST_WORDS_FROM: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();

/// How a rank process that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RankEnd {
    /// It trained its share of the job.
    Trained,
    /// The coordinator said the job finished before this rank had a share
    /// (its host admitted too late, or the rank started after the end).
    NothingToTrain,
}

fn run_rank(
    args: &RankArgs,
    runtime: &Arc<tokio::runtime::Runtime>,
    client: &mut Client,
    ring_key: &RingKey,
    generation: &mut u64,
    stop: &StopRequest,
) -> Result<RankEnd> {
    if args.torch_threads > 0 {
        tch::set_num_threads(args.torch_threads);
    }
    let assignment = runtime.block_on(fetch_assignment(client, args)).with_context(|| {
        format!(
            "member {} local rank {}: waiting for an assignment from {}",
            args.member, args.local_rank, args.coordinator
        )
    })?;
    if assignment.job_finished {
        return Ok(RankEnd::NothingToTrain);
    }
    *generation = assignment.generation;
    ASSIGNED_GENERATION.store(assignment.generation, std::sync::atomic::Ordering::SeqCst);
    let rank = assignment.global_rank as usize;
    let run_dir = args.run_dir.clone().unwrap_or_else(|| PathBuf::from(&assignment.run_dir));
    let log = RankLog::install(&run_dir, rank)?;
    let outcome = train_rank(args, runtime, client, &assignment, &run_dir, ring_key, stop);
    if let Err(e) = &outcome {
        log.note_failure(e);
    }
    outcome.map(|()| RankEnd::Trained)
}

/// Asks the coordinator for this rank's assignment; the call waits until
/// the generation that includes it opens. A call that finds the coordinator
/// away, or that its stop or restart cuts, is made again, waiting as a
/// report does (from 250 ms, twice as long after each failure, up to 8 s), until the coordinator has not
/// answered for `--coordinator-deadline-secs`, as the agent heartbeats: a
/// restored coordinator opens a generation over the saved hosts, this one
/// included, and the call made again gets its assignment there. Before,
/// the rank died with the connection, and an agent that had not yet seen a
/// generation of its own took the restored one for its dead rank's.
async fn fetch_assignment(client: &mut Client, args: &RankArgs) -> Result<pb::Assignment> {
    let request =
        pb::AssignmentRequest { member_id: args.member.clone(), local_rank: args.local_rank };
    let deadline = Duration::from_secs(args.coordinator_deadline_secs.max(1));
    let mut wait = crate::reports::FIRST_RETRY;
    let mut away_since: Option<tokio::time::Instant> = None;
    tracing::info!("asking the coordinator for this rank's assignment");
    loop {
        let status = match client.get_assignment(request.clone()).await {
            Ok(answer) => {
                if away_since.is_some() {
                    tracing::info!("the coordinator answered: assignment received");
                }
                return Ok(answer.into_inner());
            }
            Err(status) if crate::reports::worth_another_try(status.code()) => status,
            Err(status) => return Err(status.into()),
        };
        let since = *away_since.get_or_insert_with(|| {
            tracing::warn!(
                error = %status,
                "no assignment from the coordinator (away, or restarting); asking again until \
                 it answers, for at most {deadline:?}"
            );
            tokio::time::Instant::now()
        });
        if since.elapsed() > deadline {
            return Err(anyhow::Error::from(status)
                .context(format!("the coordinator has not answered for {deadline:?}")));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(HEARTBEAT_BACKOFF_MAX);
    }
}

/// The rank's share of the job, once it has its assignment.
fn train_rank(
    args: &RankArgs,
    runtime: &Arc<tokio::runtime::Runtime>,
    client: &mut Client,
    assignment: &pb::Assignment,
    run_dir: &Path,
    ring_key: &RingKey,
    stop: &StopRequest,
) -> Result<()> {
    let rank = assignment.global_rank as usize;
    let world = assignment.world_size as usize;
    let mut recipe =
        rsb_recipes::load_str(&assignment.recipe_yaml, Path::new("<coordinator recipe>"), &[])?;
    if recipe.data.loader_threads == 0 && args.loader_threads > 0 {
        // The host's share of cores, split by `worker join` between its ranks.
        recipe.data.loader_threads = args.loader_threads;
    }
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("rank {rank}: assigned a GPU but CUDA is not available in this process");
            }
            Device::Cuda(0)
        }
        other => bail!("--device `{other}`: expected cpu or cuda"),
    };
    let rendezvous = |payload: Option<pb::rendezvous_request::Payload>| {
        runtime.block_on(client.clone().rendezvous(pb::RendezvousRequest {
            job_id: assignment.job_id.clone(),
            generation: assignment.generation,
            global_rank: assignment.global_rank,
            payload,
        }))
    };
    let backend = collective_backend(recipe.distributed.backend, device)
        .with_context(|| format!("rank {rank}"))?;
    if std::env::var("RSB_STOP_BEFORE_RENDEZVOUS").is_ok_and(|r| r == rank.to_string()) {
        // Test hook, inherited from `coordinator up --local`: this rank
        // freezes (SIGSTOP to itself) before publishing, as a stopped or
        // frozen process would; the coordinator's rendezvous deadline ends it.
        tracing::warn!("RSB_STOP_BEFORE_RENDEZVOUS: stopping before the rendezvous");
        rsb_process::stop_self();
    }
    if std::env::var("RSB_PANIC_BEFORE_RENDEZVOUS").is_ok_and(|r| r == rank.to_string()) {
        // Test hook, as above: this rank panics, as a bug would.
        panic!("RSB_PANIC_BEFORE_RENDEZVOUS: rank {rank} panics as asked");
    }
    let timeout = Duration::from_secs(recipe.distributed.collective_timeout_secs);
    let collective: Box<dyn Collective> = match backend {
        CollectiveBackend::Nccl => nccl_collective(rank, world, timeout, rendezvous)?,
        _ => {
            let listener = ring_listener(args.advertise)?;
            let port = listener.local_addr()?.port();
            let address = SocketAddr::new(args.advertise, port).to_string();
            let reply = rendezvous(Some(pb::rendezvous_request::Payload::RingAddress(address)))
                .with_context(|| format!("rank {rank}: ring rendezvous at {}", args.coordinator))?
                .into_inner();
            let config = RingConfig { timeout, ..RingConfig::default() };
            // Only this generation's ranks link up: one of another
            // generation or sweep run, under the same token, is a stranger.
            let ring_key = ring_key.for_ring(&assignment.job_id, assignment.generation);
            Box::new(listener.connect(rank, &reply.ring_addresses, &ring_key, config)?)
        }
    };
    tracing::info!(rank, world, ?backend, ?timeout, "collective ready");
    let mut options = RunOptions::new(run_dir.to_path_buf(), device);
    options.metrics_file = rsb_job::run_folder::rank_records_name(rank);
    options.checksum_every_update = std::env::var_os("RSB_CHECKSUM_EVERY_UPDATE").is_some();
    // Test hooks, inherited from `coordinator up --local`: the sample trace,
    // and a stop after some updates (a resume at another world size follows).
    options.trace_samples = std::env::var_os("RSB_TRACE_SAMPLES").is_some();
    options.stop = Some(stop.clone());
    if let Ok(ms) = std::env::var("RSB_CHECKPOINT_DELAY_MS") {
        // Test hook: a disk slower than the collective timeout.
        options.checkpoint_delay = Duration::from_millis(ms.parse().with_context(|| {
            format!("rank {rank}: RSB_CHECKPOINT_DELAY_MS=`{ms}` is not a number of milliseconds")
        })?);
    }
    if let Ok(ms) = std::env::var("RSB_STOP_CHECKPOINT_DELAY_MS") {
        // Test hook: a stop checkpoint slower than the heartbeat timeout.
        options.stop_checkpoint_delay = Duration::from_millis(ms.parse().with_context(|| {
            format!(
                "rank {rank}: RSB_STOP_CHECKPOINT_DELAY_MS=`{ms}` is not a number of milliseconds"
            )
        })?);
    }
    if let Ok(ms) = std::env::var("RSB_WRITER_LOCK_WAIT_MS") {
        // Test hook: rank 0 gives up on a run folder lock held elsewhere
        // sooner than a real run's two minutes.
        options.writer_lock_wait = Duration::from_millis(ms.parse().with_context(|| {
            format!("rank {rank}: RSB_WRITER_LOCK_WAIT_MS=`{ms}` is not a number of milliseconds")
        })?);
    }
    options.cuda_sync_debug = crate::commands::cuda_sync_debug_from_env()?;
    if let Ok(max) = std::env::var("RSB_MAX_UPDATES") {
        options.max_updates = Some(max.parse().with_context(|| {
            format!("rank {rank}: RSB_MAX_UPDATES=`{max}` is not a number of updates")
        })?);
    }
    if !assignment.resume_from.is_empty() && rank == 0 {
        let mut resume = PathBuf::from(&assignment.resume_from);
        if let Some(newer) = rsb_job::checkpoint::successor_of_deleted(&resume) {
            // The last generation trained on until it was stopped, and its
            // retention deleted the checkpoint the coordinator chose.
            tracing::warn!(
                "the checkpoint to resume from, {}, was deleted by the last generation's \
                 retention after it wrote newer ones; resuming from the newest intact one \
                 after it, {}",
                resume.display(),
                newer.path().display()
            );
            resume = newer.path().to_path_buf();
        }
        options.resume = Some(resume);
        // `coordinator up --resume` compared the recipes, knowing the `--set`s.
        options.recipe_check = rsb_train::trainer::RecipeCheck::Done;
    }
    let plan = BatchPlan::new(&recipe, assignment.world_size)?;
    if plan.accumulation != assignment.accumulation_steps {
        bail!(
            "rank {rank}: the coordinator assigned {} micro-batches per update, the recipe plans {}",
            assignment.accumulation_steps,
            plan.accumulation
        );
    }
    // Reports go to the coordinator from a task of the runtime, in order:
    // the training never waits for the coordinator's answer.
    let reporter = Reporter::start(runtime, client.clone());
    let metrics = reporter.sender();
    let (job_id, generation) = (assignment.job_id.clone(), assignment.generation);
    let on_metrics = Box::new(move |record: &MetricsRecord| {
        metrics.send(Report::Metrics(pb::MetricsReport {
            job_id: job_id.clone(),
            generation,
            global_rank: 0,
            record: Some(record.into()),
            sequence: 0,
        }));
    });
    let commits = reporter.sender();
    let job_id = assignment.job_id.clone();
    let on_checkpoint = Box::new(move |checkpoint: &CommittedCheckpoint| {
        commits.send(Report::Checkpoint(pb::CheckpointCommit {
            job_id: job_id.clone(),
            generation,
            epoch: checkpoint.epoch,
            path: checkpoint.path.display().to_string(),
            updates: checkpoint.updates,
            sequence: 0,
            disk_warning: checkpoint.disk_warning.clone().unwrap_or_default(),
        }));
    });
    let trained = Trainer::new(recipe, options).and_then(|trainer| {
        let mut trainer = trainer.into_distributed(Distributed {
            collective,
            on_metrics: Some(on_metrics),
            on_checkpoint: Some(on_checkpoint),
        })?;
        TRAINING.store(true, std::sync::atomic::Ordering::SeqCst);
        trainer.run()
    });
    // Its last records (the final epoch's) reach the coordinator before
    // this rank's `Leave` ends the job, failed or not: a coordinator that
    // does not answer is waited for until the agent gives up on it (it
    // then stops this rank) or at most REPORT_FLUSH_DEADLINE. A rank told
    // to stop waits no longer than its `Leave` would.
    let _ = LAST_WORDS_FROM.set(tokio::time::Instant::now());
    // Ended: a failure before training says itself in the rank's own Leave.
    ASSIGNED_GENERATION.store(0, std::sync::atomic::Ordering::SeqCst);
    reporter.finish(report_flush_deadline(), RANK_CALL_DEADLINE, || stop.reason().is_some());
    trained?;
    Ok(())
}

/// The longest a rank that ends waits for the coordinator to take its
/// reports before its `Leave`: past the agent's default
/// `--coordinator-deadline-secs` (60 s), at which the agent stops the rank
/// (its wait is then cut to [`RANK_CALL_DEADLINE`]), and within the rank's
/// own stop deadline.
const REPORT_FLUSH_DEADLINE: Duration = Duration::from_secs(80);

/// [`REPORT_FLUSH_DEADLINE`], or for tests whose ranks end while no
/// coordinator runs, and whose agents are patient, what the test hook
/// `RSB_REPORT_FLUSH_DEADLINE_SECS` says (read once; it can only shorten
/// the wait): those ranks would otherwise wait the whole 80 s before they
/// exit.
fn report_flush_deadline() -> Duration {
    static DEADLINE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *DEADLINE.get_or_init(|| {
        let Ok(secs) = std::env::var("RSB_REPORT_FLUSH_DEADLINE_SECS") else {
            return REPORT_FLUSH_DEADLINE;
        };
        match secs.parse() {
            Ok(secs) => Duration::from_secs(secs).min(REPORT_FLUSH_DEADLINE),
            Err(_) => {
                tracing::warn!(
                    "RSB_REPORT_FLUSH_DEADLINE_SECS=`{secs}` is not a number of seconds; \
                     waiting up to {REPORT_FLUSH_DEADLINE:?}"
                );
                REPORT_FLUSH_DEADLINE
            }
        }
    })
}

/// The ring listener, on the advertised address; on every interface only
/// when that address is not one of this host's (behind NAT), with a warning.
fn ring_listener(advertise: IpAddr) -> Result<RingListener> {
    match RingListener::bind(SocketAddr::new(advertise, 0)) {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
            let any = if advertise.is_ipv4() {
                IpAddr::from([0, 0, 0, 0])
            } else {
                IpAddr::from([0u16; 8])
            };
            tracing::warn!(
                %advertise,
                "the advertised address is not on this host; the ring listens on {any} \
                 (its links still authenticate)"
            );
            Ok(RingListener::bind(SocketAddr::new(any, 0))?)
        }
        Err(e) => Err(e).with_context(|| format!("binding a ring port on {advertise}")),
    }
}

/// The rank's log file, `<run dir>/ranks/rank-N.log`: while installed, this
/// thread's log lines go to stderr as before and, without colour, appended
/// to the file.
struct RankLog {
    path: PathBuf,
    _guard: tracing::subscriber::DefaultGuard,
}

impl RankLog {
    /// Creates `<run_dir>/ranks/` and routes this thread's log lines to
    /// stderr and the rank's file.
    fn install(run_dir: &Path, rank: usize) -> Result<RankLog> {
        use tracing_subscriber::layer::SubscriberExt;
        let folder = run_dir.join("ranks");
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("creating {}", folder.display()))?;
        let path = folder.join(format!("rank-{rank}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let subscriber = tracing_subscriber::registry()
            .with(filter)
            // On stderr in the process's log format (a JSON log stays JSON
            // through the agent's relay); the file is for people: text.
            .with(rsb_logging::stderr_layer(rsb_logging::format_from_env()))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::sync::Mutex::new(file))
                    .with_ansi(false),
            );
        let guard = tracing::subscriber::set_default(subscriber);
        Ok(RankLog { path, _guard: guard })
    }

    /// Appends why the rank failed (the process prints it on stderr itself).
    fn note_failure(&self, error: &anyhow::Error) {
        let written = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "error: {}", rsb_logging::error_chain(error.as_ref())));
        if let Err(e) = written {
            tracing::warn!("{}: {e}", self.path.display());
        }
    }
}

/// The backend `distributed.backend` asks for on `device`: `auto` is NCCL
/// on CUDA and the ring on the CPU; NCCL on the CPU is an error.
fn collective_backend(asked: CollectiveBackend, device: Device) -> Result<CollectiveBackend> {
    match (asked, device) {
        (CollectiveBackend::Auto, Device::Cpu) => Ok(CollectiveBackend::Ring),
        (CollectiveBackend::Auto, _) => Ok(CollectiveBackend::Nccl),
        (CollectiveBackend::Nccl, Device::Cpu) => bail!(
            "distributed.backend: nccl needs a CUDA rank, but this rank runs on the CPU \
             (use `auto` or `ring`)"
        ),
        (backend, _) => Ok(backend),
    }
}

/// Whether a rank process that sent no Leave was ended by NCCL's exit
/// timer for a collective that timed out or failed remotely
/// ([`rsb_collective::nccl::PEER_UNKNOWN_EXIT_STATUS`]): its agent reports
/// the peer as unknown, as the rank would have.
fn ended_for_a_collective(status: std::process::ExitStatus) -> bool {
    status.code() == Some(rsb_collective::nccl::PEER_UNKNOWN_EXIT_STATUS)
}

/// The agent's loop interval (its heartbeats, and its checks of its ranks)
/// for the heartbeat interval the coordinator gave: at least 100 ms, and at
/// most [`agent_calls::HEARTBEAT_INTERVAL_MAX`], which the coordinator's
/// waits for the agents' reports count with (a coordinator that asked for
/// longer gets more heartbeats than it asked for, never later reports).
fn loop_interval(heartbeat_interval_ms: u32) -> Duration {
    Duration::from_millis(u64::from(heartbeat_interval_ms))
        .clamp(Duration::from_millis(100), agent_calls::HEARTBEAT_INTERVAL_MAX)
}

// The coordinator's wait for the reports of NCCL ranks ended by the exit
// timer is built on the protocol's copy of its grace: they must agree.
const _: () = assert!(
    agent_calls::NCCL_EXIT_GRACE.as_millis() == rsb_collective::nccl::EXIT_GRACE.as_millis(),
    "rsb_proto::agent_calls::NCCL_EXIT_GRACE must be rsb_collective::nccl::EXIT_GRACE"
);

// How long a pod must be given to stop (the Kubernetes manifest's
// terminationGracePeriodSeconds, which a deploy test checks) is built on
// the protocol's copies of the agent's stop grace and reap limit.
const _: () = assert!(
    agent_calls::AGENT_STOP_GRACE.as_millis() == RANK_STOP_GRACE.as_millis()
        && agent_calls::KILLED_RANKS_REAPED_WITHIN.as_millis()
            == rsb_process::REAP_LIMIT.as_millis(),
    "rsb_proto::agent_calls::AGENT_STOP_GRACE and KILLED_RANKS_REAPED_WITHIN must be \
     RANK_STOP_GRACE and rsb_process::REAP_LIMIT"
);

/// Whom a collective that made the rank fail points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CollectiveBlame {
    /// The rank did not fail in a collective because of a peer.
    None,
    /// The peer it failed on (silent past the collective timeout, or its
    /// link closed): the coordinator follows these reports to the rank to
    /// blame.
    Peer(u32),
    /// A collective that did not finish in time or failed asynchronously,
    /// on a backend that cannot say which peer held it up (NCCL): the
    /// coordinator names the ranks that report nothing.
    PeerUnknown,
    /// Data from this peer failed its integrity check on their link (the
    /// network altered it, or a peer of another job sent it): the
    /// coordinator names the link, not the rank.
    TamperedLinkFrom(u32),
}

/// Whom the collective that made the rank fail points at, in training or
/// forming the ring.
fn collective_blame(error: &anyhow::Error) -> CollectiveBlame {
    use rsb_collective::CollectiveError::{self, Link, NcclCollectiveFailed, Tampered, Timeout};
    let blame_of = |error: &CollectiveError| match error {
        Timeout { peer, .. } | Link { peer, .. } => {
            u32::try_from(*peer).ok().map(CollectiveBlame::Peer)
        }
        Tampered { peer, .. } => u32::try_from(*peer).ok().map(CollectiveBlame::TamperedLinkFrom),
        NcclCollectiveFailed(_) => Some(CollectiveBlame::PeerUnknown),
        _ => None,
    };
    let found = error.chain().find_map(|cause| {
        // In training, or forming the ring (a bare collective error).
        match cause.downcast_ref::<rsb_train::TrainError>() {
            Some(rsb_train::TrainError::Collective { error, .. }) => blame_of(error),
            _ => cause.downcast_ref::<CollectiveError>().and_then(blame_of),
        }
    });
    found.unwrap_or(CollectiveBlame::None)
}

/// The ranks whose stop request every rank stopped at, when that is why
/// the rank stopped: the coordinator names them, not whichever rank's
/// Leave it gets first.
fn stop_requested_by(error: &anyhow::Error) -> Vec<u32> {
    error
        .chain()
        .find_map(|cause| match cause.downcast_ref::<rsb_train::TrainError>() {
            Some(rsb_train::TrainError::Stopped { requested_by, .. }) => {
                Some(requested_by.iter().filter_map(|&r| u32::try_from(r).ok()).collect())
            }
            _ => None,
        })
        .unwrap_or_default()
}

/// The `CUDA_VISIBLE_DEVICES` entry that gives a rank the agent's GPU
/// `index`: the agent's own `--devices` indices count the GPUs it sees, so
/// under an inherited `CUDA_VISIBLE_DEVICES` (a scheduler's `3,5`, or GPU
/// and MIG UUIDs) the rank gets that list's entry, not physical GPU `index`.
fn physical_gpu(inherited: Option<&str>, index: usize) -> String {
    inherited
        .map(|list| list.split(',').map(str::trim).filter(|e| !e.is_empty()).collect::<Vec<_>>())
        .and_then(|entries| entries.get(index).map(|e| (*e).to_string()))
        .unwrap_or_else(|| index.to_string())
}

fn nccl_collective(
    rank: usize,
    world: usize,
    timeout: Duration,
    rendezvous: impl Fn(
        Option<pb::rendezvous_request::Payload>,
    ) -> Result<tonic::Response<pb::RendezvousResponse>, tonic::Status>,
) -> Result<Box<dyn Collective>> {
    use rsb_collective::nccl::{unique_id, NcclCollective};
    // NCCL enqueues on the CUDA context current on this thread: let libtorch
    // create its (primary) context for the rank's GPU, which it sees as
    // cuda:0, before the communicator is made (nothing else has touched the
    // GPU yet; the model is built later).
    let _context = tch::Tensor::f_zeros([1], (tch::Kind::Float, Device::Cuda(0)))
        .context("creating the CUDA context of this rank's GPU")?;
    let payload = if rank == 0 {
        Some(pb::rendezvous_request::Payload::NcclUniqueId(unique_id()?))
    } else {
        None
    };
    let reply =
        rendezvous(payload).with_context(|| format!("rank {rank}: NCCL rendezvous"))?.into_inner();
    Ok(Box::new(NcclCollective::new(&reply.nccl_unique_id, rank, world, timeout)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_that_fetched_an_older_generation_are_restarted_also_at_the_first_answer() {
        // A coordinator that sends only the oldest and newest fetch.
        let behind = |known, generation, fetched| ranks_are_behind(known, generation, fetched, &[]);
        // Admitted at generation 3, its ranks fetched it, and 4 opened
        // before the agent's first answer past admission: restarted.
        assert!(behind(None, 4, (3, 3)));
        // One rank fetched 3, the other not yet: the first would be stale.
        assert!(behind(None, 4, (0, 3)));
        // Not yet fetched (they will fetch 4), or fetched 4: left running.
        assert!(!behind(None, 4, (0, 0)));
        assert!(!behind(None, 4, (4, 4)));
        assert!(!behind(None, 4, (0, 4)));
        // A coordinator that does not send the newest: the oldest decides.
        assert!(behind(None, 4, (3, 0)));
        // Known at 3: a new generation they have not fetched restarts them;
        // one they fetched while starting does not; nor does an old one.
        assert!(behind(Some(3), 4, (3, 3)));
        assert!(!behind(Some(3), 4, (4, 4)));
        assert!(!behind(Some(4), 4, (3, 3)));
        // Without each rank's fetch, a killed process's (3, restarted for
        // 4) cannot be told from a live one's: restarted, as before.
        assert!(behind(Some(4), 5, (3, 5)));
    }

    #[test]
    fn a_killed_processes_fetch_is_told_from_a_live_ones_by_each_ranks_fetch() {
        let fetched = |each: &[u64]| {
            (each.iter().copied().min().unwrap_or(0), each.iter().copied().max().unwrap_or(0))
        };
        let behind = |known, generation, each: &[u64]| {
            ranks_are_behind(known, generation, fetched(each), each)
        };
        // Restarted for 4 (their killed processes had fetched 3), and 5
        // opened before the next heartbeat: a new process that fetched 5
        // is in it, and those that have not fetched yet will; left running.
        assert!(!behind(Some(4), 5, &[3, 5]));
        assert!(!behind(Some(4), 5, &[5, 3, 3, 5, 3, 3, 3, 3]));
        // One new process fetched 4 before 5 opened: restarted, also on a
        // host of 8 ranks where it is neither the oldest nor the newest.
        assert!(behind(Some(4), 5, &[3, 4]));
        assert!(behind(Some(4), 5, &[4, 5]));
        assert!(behind(Some(4), 5, &[4, 5, 3, 3, 3, 3, 3, 3]));
        // No fetch known (a restored coordinator): restarted.
        assert!(behind(Some(4), 5, &[0, 0]));
        // Nothing new: left running.
        assert!(!behind(Some(5), 5, &[4, 5]));
        // The first answer: any fetch older than the generation restarts.
        assert!(behind(None, 5, &[0, 4, 5]));
        assert!(!behind(None, 5, &[0, 5, 5]));
    }

    /// One Ctrl-C at a terminal reaches `coordinator up --local` and its
    /// agents (SIGINT), and the coordinator then stops its agents with
    /// SIGTERM: no hurry, the ranks write their stop checkpoint; nor is the
    /// same signal within a second (Slurm's, to a cancelled step). A second
    /// SIGINT after that (the user's second Ctrl-C) is one. The only test of this
    /// binary that signals itself: every signal is caught by the handlers.
    #[tokio::test]
    async fn only_the_same_signal_again_hurries_an_agents_stop() {
        let mut signals = rsb_process::stop_signal().unwrap();
        let raise = |signal: &str| {
            let me = std::process::id().to_string();
            assert!(std::process::Command::new("kill")
                .args(["-s", signal, &me])
                .status()
                .unwrap()
                .success());
        };
        let second = second_stop_signal(&mut signals, rsb_process::StopSignal::Interrupt);
        tokio::pin!(second);
        raise("TERM");
        let waited = tokio::time::timeout(Duration::from_millis(500), &mut second).await;
        assert!(waited.is_err(), "the coordinator's SIGTERM after a Ctrl-C hurried the stop");
        // Slurm's signals of one cancelled step, milliseconds apart.
        raise("INT");
        let waited = tokio::time::timeout(Duration::from_millis(200), &mut second).await;
        assert!(waited.is_err(), "the same signal within a second hurried the stop");
        tokio::time::sleep(SAME_STOP_WITHIN).await;
        raise("INT");
        tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("a second SIGINT did not hurry the stop");
    }

    #[test]
    fn a_rank_gets_the_gpu_the_agent_sees_as_its_index() {
        assert_eq!(physical_gpu(None, 1), "1");
        assert_eq!(physical_gpu(Some(""), 0), "0");
        assert_eq!(physical_gpu(Some("3,5"), 0), "3");
        assert_eq!(physical_gpu(Some("3, 5"), 1), "5");
        assert_eq!(physical_gpu(Some("GPU-8f2c,MIG-77ab"), 1), "MIG-77ab");
    }

    #[tokio::test]
    async fn a_ranks_last_error_arrives_after_bytes_that_are_not_utf8() {
        let mut rank = tokio::process::Command::new("sh")
            .args(["-c", r"printf 'NCCL says \377\376\nerror: rank 3 failed: boom\n' >&2; exit 1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut relays = [StderrRelay::start(rank.stderr.take())];
        let _ = rank.wait().await.unwrap();
        assert_eq!(last_errors(&mut relays, &[0]).await, [Some("rank 3 failed: boom".into())]);
    }

    #[tokio::test]
    async fn the_relays_of_ranks_dead_at_once_are_drained_together() {
        // Each rank's stderr stays open past the drain (as when a process
        // the rank started still holds it), so every relay waits out the
        // whole of `StderrRelay::DRAIN`: in turn, two would take twice it.
        let start_rank = |n: u32| {
            let script = format!("echo 'error: rank {n} failed' >&2; exec sleep 30");
            tokio::process::Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        };
        let mut ranks = [start_rank(0), start_rank(1)];
        let mut relays = ranks.each_mut().map(|rank| StderrRelay::start(rank.stderr.take()));
        let started = std::time::Instant::now();
        let errors = last_errors(&mut relays, &[0, 1]).await;
        let elapsed = started.elapsed();
        assert_eq!(errors, [Some("rank 0 failed".into()), Some("rank 1 failed".into())]);
        assert!(
            elapsed < StderrRelay::DRAIN + StderrRelay::DRAIN / 2,
            "drained in {elapsed:?}, not at once"
        );
    }

    #[test]
    fn a_collective_failure_names_its_peer_in_training_or_forming_the_ring() {
        use rsb_collective::CollectiveError;
        let link = || CollectiveError::Link {
            rank: 1,
            peer: 2,
            address: "10.0.0.3:29500".into(),
            source: std::io::Error::from(std::io::ErrorKind::TimedOut),
        };
        let forming = anyhow::Error::from(link()).context("forming the ring");
        assert_eq!(collective_blame(&forming), CollectiveBlame::Peer(2));
        let training = anyhow::Error::from(rsb_train::TrainError::Collective {
            operation: "gradients".into(),
            error: link(),
        });
        assert_eq!(collective_blame(&training), CollectiveBlame::Peer(2));
        // NCCL's timeout names no peer; its own failure blames the rank.
        let nccl_timeout = anyhow::Error::from(rsb_train::TrainError::Collective {
            operation: "gradients".into(),
            error: CollectiveError::NcclCollectiveFailed(
                "rank 1: ncclAllReduce did not complete within the collective timeout".into(),
            ),
        })
        .context("training");
        assert_eq!(collective_blame(&nccl_timeout), CollectiveBlame::PeerUnknown);
        let other = anyhow::Error::from(CollectiveError::Nccl("unhandled cuda error".into()));
        assert_eq!(collective_blame(&other), CollectiveBlame::None);
        let tampered = anyhow::Error::from(rsb_train::TrainError::Collective {
            operation: "gradients".into(),
            error: CollectiveError::Tampered {
                rank: 1,
                peer: 0,
                address: "10.0.0.1:29500".into(),
                message: 7,
            },
        })
        .context("training");
        assert_eq!(collective_blame(&tampered), CollectiveBlame::TamperedLinkFrom(0));
    }

    #[test]
    fn a_rank_ended_by_nccls_exit_timer_for_a_collective_is_reported_with_its_peer_unknown() {
        use std::os::unix::process::ExitStatusExt;
        let exited = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        let code = rsb_collective::nccl::PEER_UNKNOWN_EXIT_STATUS;
        assert!(ended_for_a_collective(exited(code)));
        assert!(!ended_for_a_collective(exited(1)));
        // Killed by a signal: no exit status.
        assert!(!ended_for_a_collective(std::process::ExitStatus::from_raw(9)));
    }

    /// The agent checks its ranks at least every
    /// [`agent_calls::HEARTBEAT_INTERVAL_MAX`], whatever interval its
    /// coordinator asks for (the wait for NCCL ranks' reports counts with
    /// it), and never more often than every 100 ms.
    #[test]
    fn the_agents_loop_interval_stays_within_what_the_coordinators_waits_count_with() {
        assert_eq!(loop_interval(500), Duration::from_millis(500));
        assert_eq!(loop_interval(0), Duration::from_millis(100));
        assert_eq!(loop_interval(60_000), agent_calls::HEARTBEAT_INTERVAL_MAX);
        assert_eq!(loop_interval(u32::MAX), agent_calls::HEARTBEAT_INTERVAL_MAX);
    }

    #[test]
    fn a_stop_names_the_ranks_that_asked() {
        let stopped = anyhow::Error::from(rsb_train::TrainError::Stopped {
            reason: "rank 3's stop request".into(),
            update: 12,
            checkpoint: "rank 0 wrote the checkpoint".into(),
            requested_by: vec![3, 5],
        })
        .context("training");
        assert_eq!(stop_requested_by(&stopped), [3, 5]);
        let other = anyhow::anyhow!("out of memory");
        assert!(stop_requested_by(&other).is_empty());
    }

    #[test]
    fn the_backend_follows_the_recipe_and_the_device() {
        use CollectiveBackend::*;
        assert_eq!(collective_backend(Auto, Device::Cpu).unwrap(), Ring);
        assert_eq!(collective_backend(Auto, Device::Cuda(0)).unwrap(), Nccl);
        assert_eq!(collective_backend(Ring, Device::Cuda(0)).unwrap(), Ring);
        assert_eq!(collective_backend(Nccl, Device::Cuda(0)).unwrap(), Nccl);
        let e = collective_backend(Nccl, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("distributed.backend") && e.contains("CPU"), "{e}");
    }

    #[test]
    fn a_rank_log_is_written_without_colour_and_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ranks/rank-3.log");
        {
            let _log = RankLog::install(dir.path(), 3).unwrap();
            tracing::info!(update = 7, "first line");
        }
        {
            let log = RankLog::install(dir.path(), 3).unwrap();
            tracing::warn!("second line");
            log.note_failure(&anyhow::anyhow!("boom"));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains("INFO") && lines[0].contains("first line"), "{text}");
        assert!(lines[0].contains("update=7"), "{text}");
        assert!(lines[1].contains("WARN") && lines[1].contains("second line"), "{text}");
        assert_eq!(lines[2], "error: boom");
        assert!(!text.contains('\u{1b}'), "ANSI escape in {text:?}");
    }
}
