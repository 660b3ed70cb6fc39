//! The gRPC service over a [`Job`]: wire types are converted to domain
//! values at the edge (a malformed request is answered `INVALID_ARGUMENT`),
//! job errors map onto statuses in one place, and the calls that wait
//! (assignment, rendezvous) long-poll on the job's change notifications.

use crate::job::{DeviceKind, Job, JobError, Phase, RendezvousPayload};
use rsb_job::MetricsRecord;
use rsb_proto::v1 as pb;
use rsb_proto::v1::coordinator_server::Coordinator;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

/// The shared job plus its change notification.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The job state.
    pub job: Arc<Mutex<Job>>,
    /// Woken on every state change.
    pub changed: Arc<Notify>,
}

impl Shared {
    /// Wraps a job.
    pub fn new(job: Job) -> Shared {
        Shared { job: Arc::new(Mutex::new(job)), changed: Arc::new(Notify::new()) }
    }

    /// Runs `f` on the job and wakes waiters.
    pub fn update<T>(&self, f: impl FnOnce(&mut Job) -> T) -> T {
        let out = f(&mut self.job.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_waiters();
        out
    }

    /// Waits until `ready` returns `Some`, re-checking on every change (and
    /// at least every second, so liveness failures are seen).
    async fn wait_for<T>(
        &self,
        mut ready: impl FnMut(&mut Job) -> Result<Option<T>, JobError>,
    ) -> Result<T, Status> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let outcome = {
                let mut job = self.job.lock().unwrap_or_else(|p| p.into_inner());
                job.check_liveness();
                ready(&mut job)
            };
            match outcome {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                }
                Err(e) => return Err(status(e)),
            }
        }
    }
}

/// The one mapping of job errors onto gRPC statuses.
fn status(e: JobError) -> Status {
    match e {
        JobError::NotFound(m) => Status::not_found(m),
        JobError::Invalid(m) => Status::invalid_argument(m),
        JobError::Precondition(m) => Status::failed_precondition(m),
    }
}

fn require(field: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        return Err(Status::invalid_argument(format!("`{field}` is required")));
    }
    Ok(())
}

/// A validated join request.
struct Join {
    host: String,
    kind: DeviceKind,
    local_ranks: u32,
    token: String,
}

impl TryFrom<pb::JoinRequest> for Join {
    type Error = Status;

    fn try_from(r: pb::JoinRequest) -> Result<Join, Status> {
        require("host_name", &r.host_name)?;
        let kind = match pb::DeviceKind::try_from(r.device_kind) {
            Ok(pb::DeviceKind::Cpu) => DeviceKind::Cpu,
            Ok(pb::DeviceKind::Cuda) => DeviceKind::Cuda,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "device_kind {} is not CPU or CUDA",
                    r.device_kind
                )))
            }
        };
        if r.local_ranks == 0 || r.local_ranks > 1024 {
            return Err(Status::invalid_argument(format!(
                "local_ranks {} is not in 1..=1024",
                r.local_ranks
            )));
        }
        Ok(Join { host: r.host_name, kind, local_ranks: r.local_ranks, token: r.auth_token })
    }
}

fn payload(r: &pb::RendezvousRequest) -> Result<Option<RendezvousPayload>, Status> {
    Ok(match &r.payload {
        None => None,
        Some(pb::rendezvous_request::Payload::NcclUniqueId(id)) => {
            Some(RendezvousPayload::NcclId(id.clone()))
        }
        Some(pb::rendezvous_request::Payload::RingAddress(a)) => {
            if a.parse::<std::net::SocketAddr>().is_err() && !a.contains(':') {
                return Err(Status::invalid_argument(format!(
                    "ring_address `{a}` is not host:port"
                )));
            }
            Some(RendezvousPayload::RingAddress(a.clone()))
        }
    })
}

#[tonic::async_trait]
impl Coordinator for Shared {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let join = Join::try_from(request.into_inner())?;
        let (id, interval) = self
            .update(|job| {
                job.join(&join.host, join.kind, join.local_ranks, &join.token)
                    .map(|id| (id, job.heartbeat_interval))
            })
            .map_err(status)?;
        Ok(Response::new(pb::JoinResponse {
            member_id: id,
            heartbeat_interval_ms: interval.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        require("member_id", &r.member_id)?;
        let (keep_going, generation, failure) = self
            .update(|job| {
                job.check_liveness();
                let keep_going = job.heartbeat(&r.member_id)?;
                Ok((keep_going, job.generation, job.failure().unwrap_or_default().to_string()))
            })
            .map_err(status)?;
        Ok(Response::new(pb::HeartbeatResponse { keep_going, generation, failure }))
    }

    async fn get_assignment(
        &self,
        request: Request<pb::AssignmentRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let r = request.into_inner();
        require("member_id", &r.member_id)?;
        let assignment = self
            .wait_for(|job| {
                Ok(job.assignment(&r.member_id, r.local_rank)?.map(|a| pb::Assignment {
                    job_id: job.id.clone(),
                    generation: job.generation,
                    global_rank: a.global_rank,
                    world_size: a.world_size,
                    local_rank: r.local_rank,
                    micro_batch: a.plan.micro_size,
                    accumulation_steps: a.plan.accumulation,
                    recipe_yaml: job.recipe_yaml.clone(),
                    run_dir: job.out_dir.display().to_string(),
                    resume_from: job.resume_from.clone().unwrap_or_default(),
                }))
            })
            .await?;
        Ok(Response::new(assignment))
    }

    async fn rendezvous(
        &self,
        request: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        let r = request.into_inner();
        let published = payload(&r)?;
        self.update(|job| {
            if job.id != r.job_id {
                return Err(JobError::NotFound(format!("unknown job `{}`", r.job_id)));
            }
            job.publish(r.generation, r.global_rank, published)
        })
        .map_err(status)?;
        let (nccl_unique_id, ring_addresses) = self
            .wait_for(|job| match &job.phase {
                Phase::Failed(reason) => {
                    Err(JobError::Precondition(format!("job failed: {reason}")))
                }
                _ => Ok(job.rendezvous_result()),
            })
            .await?;
        Ok(Response::new(pb::RendezvousResponse { nccl_unique_id, ring_addresses }))
    }

    async fn report_metrics(
        &self,
        request: Request<pb::MetricsReport>,
    ) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let record = MetricsRecord::from(
            r.record.ok_or_else(|| Status::invalid_argument("`record` is required"))?,
        );
        let line = self.update(|job| job.record_metrics(r.generation, &record)).map_err(status)?;
        if let Some(line) = line {
            println!("{line}");
        }
        Ok(Response::new(pb::Ack {}))
    }

    async fn commit_checkpoint(
        &self,
        request: Request<pb::CheckpointCommit>,
    ) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        require("path", &r.path)?;
        self.update(|job| job.commit_checkpoint(r.generation, r.epoch, r.path.clone()))
            .map_err(status)?;
        println!("checkpoint committed: epoch {} at {}", r.epoch, r.path);
        Ok(Response::new(pb::Ack {}))
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        require("member_id", &r.member_id)?;
        self.update(|job| job.leave(&r.member_id, r.local_rank, r.success, &r.message))
            .map_err(status)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let job = self.job.lock().unwrap_or_else(|p| p.into_inner());
        let state = match &job.phase {
            Phase::Waiting => "waiting".to_string(),
            Phase::Running => "running".to_string(),
            Phase::Finished => "finished".to_string(),
            Phase::Failed(r) => format!("failed: {r}"),
        };
        Ok(Response::new(pb::StatusResponse {
            job_id: job.id.clone(),
            generation: job.generation,
            state,
            members: job
                .members
                .iter()
                .map(|m| pb::Member {
                    member_id: m.id.clone(),
                    host_name: m.host.clone(),
                    local_ranks: m.local_ranks,
                    last_heartbeat_ms_ago: m.last_seen.elapsed().as_millis() as u64,
                })
                .collect(),
            nodes_expected: job.nodes_expected,
            epoch: job.progress.0,
            step: job.progress.1,
            images_per_sec: job.progress.2,
        }))
    }
}
