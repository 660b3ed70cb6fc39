//! The job state machine: members join until the expected number of hosts is
//! there, ranks are assigned in join order (then local rank), the ranks
//! rendezvous, train, report and leave. A member that stops heartbeating, or
//! a rank that leaves with a failure, fails the job (restarts are the job of a
//! supervisor or of `--resume`; the job says so instead of hanging).
//!
//! Each member gets a session secret at join; [`Job::authenticate`] checks a
//! call's member credentials (in constant time), and every later operation
//! names the calling member, which may act only for its own ranks.

use crate::plan::{BatchPlan, PlanError};
use rsb_job::records::skipped_updates_note;
use rsb_job::MetricsRecord;
use rsb_proto::auth::Secret;
use rsb_recipes::Recipe;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What runs the ranks of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// CPU ranks (TCP ring).
    Cpu,
    /// One rank per GPU (NCCL).
    Cuda,
}

/// A joined worker host.
#[derive(Debug, Clone)]
pub struct Member {
    /// Identifier handed out at join.
    pub id: String,
    /// Host name it reported.
    pub host: String,
    /// Device kind of its ranks.
    pub kind: DeviceKind,
    /// Ranks it runs.
    pub local_ranks: u32,
    /// First global rank of this member.
    pub first_rank: u32,
    /// Last heartbeat.
    pub last_seen: Instant,
    /// The address it said other hosts reach it at (its ranks' ring
    /// listeners must be there).
    pub advertise: Option<IpAddr>,
    /// Session secret handed out at join (never shown).
    pub secret: Secret,
}

impl Member {
    /// The global ranks this member runs.
    pub fn ranks(&self) -> std::ops::Range<u32> {
        self.first_rank..self.first_rank + self.local_ranks
    }
}

/// Where the job is.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Waiting for hosts to join.
    Waiting,
    /// Ranks assigned; training.
    Running,
    /// Every rank left successfully.
    Finished,
    /// Something failed; the reason.
    Failed(String),
}

/// Rendezvous data a rank publishes.
#[derive(Debug, Clone, PartialEq)]
pub enum RendezvousPayload {
    /// 128-byte NCCL unique id (rank 0 of a CUDA job).
    NcclId(Vec<u8>),
    /// `host:port` of a CPU rank's ring listener.
    RingAddress(String),
}

/// A rank's assignment.
#[derive(Debug, Clone, PartialEq)]
pub struct RankAssignment {
    /// Global rank.
    pub global_rank: u32,
    /// World size.
    pub world_size: u32,
    /// The batch plan.
    pub plan: BatchPlan,
}

/// Errors the service maps onto gRPC statuses.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JobError {
    /// The caller named something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The job cannot do this now (full, failed, wrong generation).
    #[error("{0}")]
    Precondition(String),
    /// The caller's member credentials are missing or wrong.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is a member, but acts for something that is not its own.
    #[error("{0}")]
    Denied(String),
}

/// The whole coordinator state.
#[derive(Debug)]
pub struct Job {
    /// Job identifier.
    pub id: String,
    /// Generation (bumped when the membership of a running job changes).
    pub generation: u64,
    /// Hosts to wait for.
    pub nodes_expected: u32,
    /// The resolved recipe.
    pub recipe: Recipe,
    /// The resolved recipe as YAML (sent to ranks).
    pub recipe_yaml: String,
    /// Run folder.
    pub out_dir: PathBuf,
    /// Heartbeat interval members are told to use.
    pub heartbeat_interval: Duration,
    /// A member silent for this long fails the job.
    pub heartbeat_timeout: Duration,
    /// Current phase.
    pub phase: Phase,
    /// Members in join order.
    pub members: Vec<Member>,
    /// Published rendezvous payloads by global rank.
    pub rendezvous: BTreeMap<u32, RendezvousPayload>,
    /// Ranks that left successfully.
    pub finished_ranks: u32,
    /// Global ranks that left (successfully or not).
    pub left_ranks: BTreeSet<u32>,
    /// Latest epoch / update / global images per second reported.
    pub progress: (u64, u64, f64),
    /// Checkpoints committed, newest last.
    pub checkpoints: Vec<(u64, String)>,
    /// Checkpoint (or run folder) rank 0 resumes from.
    pub resume_from: Option<String>,
    metrics: Option<std::fs::File>,
    next_member: u64,
}

impl Job {
    /// A job waiting for `nodes_expected` hosts.
    pub fn new(recipe: Recipe, out_dir: PathBuf, nodes_expected: u32) -> Job {
        let recipe_yaml = rsb_recipes::to_yaml(&recipe);
        let id = format!("{}-{}", recipe.name, std::process::id());
        Job {
            id,
            generation: 1,
            nodes_expected,
            recipe,
            recipe_yaml,
            out_dir,
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(30),
            phase: Phase::Waiting,
            members: Vec::new(),
            rendezvous: BTreeMap::new(),
            finished_ranks: 0,
            left_ranks: BTreeSet::new(),
            progress: (0, 0, 0.0),
            checkpoints: Vec::new(),
            resume_from: None,
            metrics: None,
            next_member: 0,
        }
    }

    /// Total ranks of the joined members.
    pub fn world_size(&self) -> u32 {
        self.members.iter().map(|m| m.local_ranks).sum()
    }

    /// A host joins; when the last expected host has joined, ranks are
    /// assigned and the job starts (or fails if the world cannot run the
    /// recipe). Returns the member id and its session secret.
    pub fn join(
        &mut self,
        host: &str,
        kind: DeviceKind,
        local_ranks: u32,
        advertise: Option<IpAddr>,
    ) -> Result<(String, Secret), JobError> {
        if local_ranks == 0 {
            return Err(JobError::Invalid("local_ranks must be at least 1".into()));
        }
        if self.phase != Phase::Waiting {
            return Err(JobError::Precondition(format!(
                "the job is {:?}; it takes no new members",
                self.phase
            )));
        }
        if let Some(first) = self.members.first() {
            if first.kind != kind {
                return Err(JobError::Invalid(format!(
                    "host {host} brings {kind:?} ranks but the job already has {:?} ranks",
                    first.kind
                )));
            }
        }
        if kind == DeviceKind::Cpu && advertise.is_none() {
            return Err(JobError::Invalid(format!(
                "advertise_address is required: host {host} brings CPU ranks, whose ring \
                 listeners other hosts must reach"
            )));
        }
        let secret = Secret::generate()
            .map_err(|e| JobError::Precondition(format!("cannot make a member secret: {e}")))?;
        self.next_member += 1;
        let id = format!("m{}-{}", self.next_member, host);
        let first_rank = self.world_size();
        self.members.push(Member {
            id: id.clone(),
            host: host.to_string(),
            kind,
            local_ranks,
            first_rank,
            last_seen: Instant::now(),
            advertise,
            secret: secret.clone(),
        });
        tracing::info!(member = %id, host, local_ranks, "joined ({}/{} hosts)", self.members.len(), self.nodes_expected);
        if self.members.len() as u32 == self.nodes_expected {
            match BatchPlan::new(&self.recipe, self.world_size()) {
                Ok(plan) => {
                    self.phase = Phase::Running;
                    tracing::info!(
                        world = self.world_size(),
                        "all hosts joined: global batch {} = {} x {} x {} ranks",
                        plan.global_size,
                        plan.micro_size,
                        plan.accumulation,
                        plan.world_size
                    );
                }
                Err(e) => self.fail(format!("cannot start: {e}")),
            }
        }
        Ok((id, secret))
    }

    /// The member whose credentials a call presents: its id and session
    /// secret (compared in constant time). Unknown ids and wrong secrets get
    /// the same answer.
    pub fn authenticate(&self, presented: Option<(&str, &[u8])>) -> Result<&Member, JobError> {
        let Some((id, secret)) = presented else {
            return Err(JobError::Unauthenticated(
                "this call needs the member's credentials (x-rsb-member and \
                 x-rsb-member-secret from Join)"
                    .into(),
            ));
        };
        match self.members.iter().find(|m| m.id == id) {
            Some(m) if m.secret.matches(secret) => Ok(m),
            _ => Err(JobError::Unauthenticated(
                "member credentials not accepted: unknown member or wrong secret".into(),
            )),
        }
    }

    /// Checks that `member_id` runs global rank `rank`.
    pub fn check_runs_rank(&self, member_id: &str, rank: u32) -> Result<&Member, JobError> {
        let member = self.member(member_id)?;
        if !member.ranks().contains(&rank) {
            return Err(JobError::Denied(format!(
                "member {member_id} runs global ranks {:?}, not rank {rank}",
                member.ranks()
            )));
        }
        Ok(member)
    }

    fn member(&self, id: &str) -> Result<&Member, JobError> {
        self.members
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| JobError::NotFound(format!("unknown member `{id}`")))
    }

    /// Records a heartbeat; false once the job is over.
    pub fn heartbeat(&mut self, id: &str) -> Result<bool, JobError> {
        let member = self
            .members
            .iter_mut()
            .find(|m| m.id == id)
            .ok_or_else(|| JobError::NotFound(format!("unknown member `{id}`")))?;
        member.last_seen = Instant::now();
        Ok(matches!(self.phase, Phase::Waiting | Phase::Running))
    }

    /// Why the job failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        match &self.phase {
            Phase::Failed(reason) => Some(reason),
            _ => None,
        }
    }

    /// Fails the job if a member has been silent too long.
    pub fn check_liveness(&mut self) {
        if !matches!(self.phase, Phase::Waiting | Phase::Running) {
            return;
        }
        let timeout = self.heartbeat_timeout;
        if let Some(m) = self.members.iter().find(|m| m.last_seen.elapsed() > timeout) {
            let msg = format!("member {} ({}) missed heartbeats for {:?}", m.id, m.host, timeout);
            self.fail(msg);
        }
    }

    /// Moves to `Failed` (once) and says why.
    pub fn fail(&mut self, reason: String) {
        if matches!(self.phase, Phase::Waiting | Phase::Running) {
            tracing::error!("job failed: {reason}");
            self.phase = Phase::Failed(reason);
        }
    }

    /// The assignment of a member's local rank, once the job runs (`None` while waiting).
    pub fn assignment(
        &self,
        member_id: &str,
        local_rank: u32,
    ) -> Result<Option<RankAssignment>, JobError> {
        let member = self.member(member_id)?;
        if local_rank >= member.local_ranks {
            return Err(JobError::Invalid(format!(
                "local_rank {local_rank}: member {member_id} runs {} rank(s)",
                member.local_ranks
            )));
        }
        match &self.phase {
            Phase::Waiting => Ok(None),
            Phase::Failed(reason) => Err(JobError::Precondition(format!("job failed: {reason}"))),
            Phase::Finished => Err(JobError::Precondition("job finished".into())),
            Phase::Running => {
                let plan = BatchPlan::new(&self.recipe, self.world_size())
                    .map_err(|e: PlanError| JobError::Precondition(e.to_string()))?;
                Ok(Some(RankAssignment {
                    global_rank: member.first_rank + local_rank,
                    world_size: self.world_size(),
                    plan,
                }))
            }
        }
    }

    /// Records the rendezvous payload of `rank`, published by `member_id`
    /// (which must run that rank); see [`Job::rendezvous_result`] for everybody's.
    /// A rank publishes once per generation (the same payload again is a no-op).
    pub fn publish(
        &mut self,
        member_id: &str,
        generation: u64,
        rank: u32,
        payload: Option<RendezvousPayload>,
    ) -> Result<(), JobError> {
        self.check_generation(generation)?;
        if rank >= self.world_size() {
            return Err(JobError::Invalid(format!(
                "global_rank {rank} is not in a world of {}",
                self.world_size()
            )));
        }
        let member = self.check_runs_rank(member_id, rank)?;
        let Some(p) = payload else { return Ok(()) };
        match (&p, member.kind) {
            (RendezvousPayload::NcclId(id), DeviceKind::Cuda) => {
                if rank != 0 {
                    return Err(JobError::Invalid(format!(
                        "nccl_unique_id comes from rank 0, not rank {rank}"
                    )));
                }
                if id.len() != 128 {
                    return Err(JobError::Invalid(format!(
                        "nccl_unique_id has {} bytes, expected 128",
                        id.len()
                    )));
                }
            }
            (RendezvousPayload::RingAddress(a), DeviceKind::Cpu) => {
                let address: SocketAddr = a.parse().map_err(|_| {
                    JobError::Invalid(format!("ring_address `{a}` is not an ip:port address"))
                })?;
                if Some(address.ip()) != member.advertise || address.port() == 0 {
                    return Err(JobError::Denied(format!(
                        "ring_address {address} is not on the address member {member_id} \
                         advertised ({})",
                        member.advertise.map_or_else(|| "none".into(), |a| a.to_string())
                    )));
                }
            }
            (RendezvousPayload::NcclId(_), DeviceKind::Cpu) => {
                return Err(JobError::Invalid(
                    "nccl_unique_id in a job of CPU ranks (they publish ring_address)".into(),
                ))
            }
            (RendezvousPayload::RingAddress(_), DeviceKind::Cuda) => {
                return Err(JobError::Invalid(
                    "ring_address in a job of CUDA ranks (rank 0 publishes nccl_unique_id)".into(),
                ))
            }
        }
        match self.rendezvous.get(&rank) {
            Some(existing) if *existing != p => Err(JobError::Precondition(format!(
                "rank {rank} already published its rendezvous data in generation {generation}"
            ))),
            _ => {
                self.rendezvous.insert(rank, p);
                Ok(())
            }
        }
    }

    /// The rendezvous result, once every rank (CPU) or rank 0 (CUDA) published.
    pub fn rendezvous_result(&self) -> Option<(Vec<u8>, Vec<String>)> {
        let kind = self.members.first()?.kind;
        match kind {
            DeviceKind::Cuda => match self.rendezvous.get(&0) {
                Some(RendezvousPayload::NcclId(id)) => Some((id.clone(), Vec::new())),
                _ => None,
            },
            DeviceKind::Cpu => {
                let world = self.world_size();
                let addresses: Option<Vec<String>> = (0..world)
                    .map(|r| match self.rendezvous.get(&r) {
                        Some(RendezvousPayload::RingAddress(a)) => Some(a.clone()),
                        _ => None,
                    })
                    .collect();
                addresses.map(|a| (Vec::new(), a))
            }
        }
    }

    fn check_generation(&self, generation: u64) -> Result<(), JobError> {
        if generation != self.generation {
            return Err(JobError::Precondition(format!(
                "stale generation {generation}, the job is at {}",
                self.generation
            )));
        }
        match &self.phase {
            Phase::Running => Ok(()),
            other => Err(JobError::Precondition(format!("the job is {other:?}"))),
        }
    }

    /// Appends a metrics record (from rank 0) to `metrics.jsonl` and returns
    /// the progress line to print, if the record has one.
    pub fn record_metrics(
        &mut self,
        generation: u64,
        record: &MetricsRecord,
    ) -> Result<Option<String>, JobError> {
        self.check_generation(generation)?;
        let path = self.out_dir.join("metrics.jsonl");
        if self.metrics.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| JobError::Precondition(format!("{}: {e}", path.display())))?;
            self.metrics = Some(file);
        }
        if let Some(file) = &mut self.metrics {
            let line = serde_json::to_string(record).map_err(|e| {
                JobError::Invalid(format!("{} record cannot be written: {e}", record.kind()))
            })?;
            writeln!(file, "{line}")
                .map_err(|e| JobError::Precondition(format!("{}: {e}", path.display())))?;
        }
        Ok(self.progress_line(record))
    }

    /// Updates the job's progress from a record and says it in one line.
    fn progress_line(&mut self, record: &MetricsRecord) -> Option<String> {
        match record {
            MetricsRecord::Loading { epoch, step, .. } => {
                self.progress = (*epoch, *step, self.progress.2);
                Some(format!("epoch {epoch}: loading"))
            }
            MetricsRecord::FirstUpdate { epoch, step, elapsed_s } => {
                self.progress = (*epoch, *step, self.progress.2);
                Some(format!("first update done in {elapsed_s:.1} s"))
            }
            MetricsRecord::Step {
                epoch,
                step,
                lr,
                loss,
                images_per_sec,
                total_updates,
                skipped_updates,
            } => {
                self.progress = (*epoch, *step, *images_per_sec);
                let eta = if *images_per_sec > 0.0 {
                    let secs = total_updates.saturating_sub(*step) as f64
                        * f64::from(self.recipe.batch.global_size)
                        / images_per_sec;
                    format!(" ETA {}", format_duration(secs))
                } else {
                    String::new()
                };
                Some(format!(
                    "epoch {epoch} step {step} loss {loss:.4} lr {lr:.3e} {images_per_sec:.0} img/s (all ranks){eta}{}",
                    skipped_updates_note(*skipped_updates)
                ))
            }
            MetricsRecord::Epoch {
                epoch,
                step,
                loss,
                images_per_sec,
                top1,
                top5,
                eval_sets,
                skipped_updates,
                ..
            } => {
                self.progress = (*epoch, *step, *images_per_sec);
                let percent = |v: &Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
                let mut sets = String::new();
                for (name, a) in eval_sets {
                    sets.push_str(&format!(" | {name} top1 {:.2} top5 {:.2}", a.top1, a.top5));
                }
                Some(format!(
                    "epoch {epoch} done: loss {loss:.4} top1 {} top5 {}{sets} ({images_per_sec:.0} img/s){}",
                    percent(top1),
                    percent(top5),
                    skipped_updates_note(*skipped_updates),
                ))
            }
            MetricsRecord::Checksum { .. } => None,
        }
    }

    /// Records a committed checkpoint.
    pub fn commit_checkpoint(
        &mut self,
        generation: u64,
        epoch: u64,
        path: String,
    ) -> Result<(), JobError> {
        self.check_generation(generation)?;
        self.checkpoints.push((epoch, path));
        Ok(())
    }

    /// A rank leaves; the job finishes when every rank left successfully.
    /// A rank leaves once; it cannot succeed before the job runs.
    pub fn leave(
        &mut self,
        member_id: &str,
        local_rank: u32,
        success: bool,
        message: &str,
    ) -> Result<(), JobError> {
        let member = self.member(member_id)?.clone();
        if local_rank >= member.local_ranks {
            return Err(JobError::Invalid(format!(
                "local_rank {local_rank}: member {member_id} runs {} rank(s)",
                member.local_ranks
            )));
        }
        let rank = member.first_rank + local_rank;
        if success && self.phase == Phase::Waiting {
            return Err(JobError::Precondition(format!(
                "rank {rank} cannot finish successfully: the job has not started"
            )));
        }
        if !self.left_ranks.insert(rank) {
            return Err(JobError::Precondition(format!("rank {rank} has already left")));
        }
        if !success {
            self.fail(format!(
                "rank {} on {} failed: {message}",
                member.first_rank + local_rank,
                member.host
            ));
            return Ok(());
        }
        self.finished_ranks += 1;
        if self.finished_ranks == self.world_size() && self.phase == Phase::Running {
            self.phase = Phase::Finished;
            tracing::info!("every rank finished");
        }
        Ok(())
    }
}

fn format_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(nodes: u32) -> Job {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../recipes/debug/resnet18_tiny_cpu.yaml");
        let recipe = rsb_recipes::load(&path, &[]).unwrap();
        Job::new(recipe, std::env::temp_dir(), nodes)
    }

    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    /// Joins a CPU host advertising 127.0.0.1; returns its member id.
    fn join(j: &mut Job, host: &str, ranks: u32) -> Result<String, JobError> {
        j.join(host, DeviceKind::Cpu, ranks, LOOPBACK).map(|(id, _)| id)
    }

    fn ring(a: &str) -> Option<RendezvousPayload> {
        Some(RendezvousPayload::RingAddress(a.into()))
    }

    #[test]
    fn ranks_follow_join_order_and_the_job_starts_when_all_joined() {
        let mut j = job(2);
        let a = join(&mut j, "a", 1).unwrap();
        assert_eq!(j.assignment(&a, 0).unwrap(), None);
        let b = join(&mut j, "b", 1).unwrap();
        assert_eq!(j.phase, Phase::Running);
        assert_eq!(j.assignment(&a, 0).unwrap().unwrap().global_rank, 0);
        assert_eq!(j.assignment(&b, 0).unwrap().unwrap().global_rank, 1);
        assert!(join(&mut j, "c", 1).is_err());
        assert!(j.assignment(&b, 1).is_err());
    }

    #[test]
    fn rendezvous_completes_when_every_cpu_rank_published() {
        let mut j = job(2);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        j.publish(&b, 1, 1, ring("127.0.0.1:2")).unwrap();
        assert_eq!(j.rendezvous_result(), None);
        j.publish(&a, 1, 0, ring("127.0.0.1:1")).unwrap();
        assert_eq!(
            j.rendezvous_result(),
            Some((vec![], vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()]))
        );
        assert!(j.publish(&a, 7, 0, None).is_err(), "stale generation accepted");
        // The same address again is a retry; another one is refused.
        j.publish(&a, 1, 0, ring("127.0.0.1:1")).unwrap();
        let again = j.publish(&a, 1, 0, ring("127.0.0.1:9")).unwrap_err();
        assert!(matches!(again, JobError::Precondition(_)), "{again:?}");
    }

    #[test]
    fn a_member_publishes_only_for_its_own_ranks_on_its_own_address() {
        let mut j = job(2);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        let theirs = j.publish(&a, 1, 1, ring("127.0.0.1:2")).unwrap_err();
        assert!(matches!(&theirs, JobError::Denied(m) if m.contains("not rank 1")), "{theirs:?}");
        let elsewhere = j.publish(&b, 1, 1, ring("10.9.9.9:2")).unwrap_err();
        assert!(matches!(elsewhere, JobError::Denied(_)), "{elsewhere:?}");
        let garbage = j.publish(&b, 1, 1, ring("somewhere")).unwrap_err();
        assert!(matches!(garbage, JobError::Invalid(_)), "{garbage:?}");
        let nccl = j.publish(&b, 1, 1, Some(RendezvousPayload::NcclId(vec![0; 128])));
        assert!(matches!(nccl, Err(JobError::Invalid(_))), "{nccl:?}");
        assert!(matches!(j.publish(&b, 1, 5, None), Err(JobError::Invalid(_))));
        assert!(j.rendezvous.is_empty());
    }

    #[test]
    fn member_credentials_are_checked() {
        let mut j = job(2);
        let (a, secret) = j.join("a", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        let m = j.authenticate(Some((&a, secret.expose().as_bytes()))).unwrap();
        assert_eq!(m.id, a);
        for presented in [None, Some((a.as_str(), &b"wrong"[..])), Some(("m9-x", &b"wrong"[..]))] {
            let e = j.authenticate(presented).unwrap_err();
            assert!(matches!(e, JobError::Unauthenticated(_)), "{e:?}");
        }
        let (b, other) = j.join("b", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        assert_ne!(secret, other, "two members share a secret");
        let crossed = j.authenticate(Some((&b, secret.expose().as_bytes())));
        assert!(crossed.is_err(), "member b accepted with member a's secret");
        assert!(j.join("c", DeviceKind::Cpu, 1, None).is_err(), "full job accepted a member");
    }

    #[test]
    fn a_cpu_member_must_advertise_an_address() {
        let mut j = job(1);
        let e = j.join("a", DeviceKind::Cpu, 1, None).unwrap_err();
        assert!(e.to_string().contains("advertise_address"), "{e}");
    }

    #[test]
    fn a_rank_leaves_once_and_only_its_own_ranks() {
        let mut j = job(1);
        let a = join(&mut j, "a", 2).unwrap();
        assert!(matches!(j.leave(&a, 2, true, ""), Err(JobError::Invalid(_))));
        j.leave(&a, 0, true, "").unwrap();
        assert!(matches!(j.leave(&a, 0, true, ""), Err(JobError::Precondition(_))));
        assert_eq!(j.phase, Phase::Running, "one rank leaving twice finished the job");
        let mut w = job(2);
        let a = join(&mut w, "a", 1).unwrap();
        assert!(matches!(w.leave(&a, 0, true, ""), Err(JobError::Precondition(_))));
    }

    #[test]
    fn a_world_that_cannot_hold_the_batch_fails_with_the_reason() {
        let mut j = job(1);
        join(&mut j, "a", 3).unwrap(); // 2 streams over 3 ranks
        assert!(matches!(&j.phase, Phase::Failed(r) if r.contains("3 ranks")), "{:?}", j.phase);
    }

    #[test]
    fn failures_and_silence_fail_the_job() {
        let mut j = job(1);
        let a = join(&mut j, "a", 2).unwrap();
        j.leave(&a, 1, false, "boom").unwrap();
        assert!(matches!(&j.phase, Phase::Failed(r) if r.contains("boom")));
        let mut j = job(1);
        j.heartbeat_timeout = Duration::from_millis(0);
        join(&mut j, "a", 2).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        j.check_liveness();
        assert!(matches!(&j.phase, Phase::Failed(r) if r.contains("missed heartbeats")));
    }

    #[test]
    fn a_finished_job_stops_heartbeats_without_a_failure() {
        // Members must tell "finished" from "failed": a member whose ranks
        // are still exiting when the last rank leaves must not report an error.
        let mut j = job(1);
        let a = join(&mut j, "a", 2).unwrap();
        j.leave(&a, 0, true, "").unwrap();
        assert!(j.heartbeat(&a).unwrap());
        j.leave(&a, 1, true, "").unwrap();
        assert_eq!(j.phase, Phase::Finished);
        assert!(!j.heartbeat(&a).unwrap());
        assert_eq!(j.failure(), None);
        let mut j = job(1);
        let a = join(&mut j, "a", 2).unwrap();
        j.leave(&a, 0, false, "boom").unwrap();
        assert!(!j.heartbeat(&a).unwrap());
        assert!(j.failure().unwrap().contains("boom"));
    }

    #[test]
    fn typed_records_are_written_with_their_field_names_and_reported() {
        let dir = std::env::temp_dir().join(format!("rsb-job-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("metrics.jsonl"));
        let mut j = job(1);
        j.out_dir = dir.clone();
        join(&mut j, "a", 2).unwrap();
        let loading = MetricsRecord::Loading { epoch: 0, step: 0, elapsed_s: 1.0 };
        let line = j.record_metrics(1, &loading).unwrap().unwrap();
        assert_eq!(line, "epoch 0: loading");
        let first = MetricsRecord::FirstUpdate { epoch: 0, step: 1, elapsed_s: 12.34 };
        let line = j.record_metrics(1, &first).unwrap().unwrap();
        assert_eq!(line, "first update done in 12.3 s");
        let step = MetricsRecord::Step {
            epoch: 0,
            step: 2,
            lr: 1e-3,
            loss: 0.75,
            images_per_sec: 16.0,
            total_updates: 4,
            skipped_updates: 0,
        };
        let line = j.record_metrics(1, &step).unwrap().unwrap();
        assert!(line.starts_with("epoch 0 step 2 loss 0.7500"), "{line}");
        assert!(line.ends_with("ETA 0:00:02"), "2 updates of 16 images at 16 img/s: {line}");
        let mut skipping = step.clone();
        if let MetricsRecord::Step { skipped_updates, .. } = &mut skipping {
            *skipped_updates = 1;
        }
        let line = j.record_metrics(1, &skipping).unwrap().unwrap();
        assert!(
            line.ends_with("ETA 0:00:02, 1 update(s) skipped (non-finite gradients)"),
            "{line}"
        );
        assert_eq!(j.progress, (0, 2, 16.0));
        let checksum = MetricsRecord::Checksum { rank: 0, step: 2, sum: 1.0, sum_of_squares: 2.0 };
        assert_eq!(j.record_metrics(1, &checksum).unwrap(), None);
        assert!(j.record_metrics(9, &step).is_err(), "stale generation accepted");
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["loading", "first_update", "step", "step", "checksum"]);
        assert_eq!(lines[2]["loss"], 0.75);
        assert_eq!(lines[2]["total_updates"], 4);
        assert_eq!(lines[1]["elapsed_s"], 12.34);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
