//! The coordinator's whole state: the one job of `coordinator up`, or the
//! jobs (one per run attempt) and the queue of a sweep. Members are routed
//! to their job by their id, which is unique across the jobs.

use crate::job::{DeviceKind, Job, JobError, Member, MetricsSink, PendingSave, Phase};
use crate::sweep::{Placement, Scheduler};
use std::net::IpAddr;
use std::sync::Arc;

/// Every job the service answers for.
#[derive(Debug)]
pub struct Coordination {
    /// The jobs: one for `up`; a sweep's attempts in the order they started.
    pub jobs: Vec<Job>,
    /// The sweep's queue, when this is a sweep.
    pub sweep: Option<Scheduler>,
    /// The coordinator is stopping ([`Coordination::fail_all`]): the jobs it
    /// failed are not a sweep's runs failing (no outcome is recorded, no
    /// retry queued: `--resume` runs them again), and no host is placed.
    stopping: bool,
    /// Joins answered that the job is finished (by hosts that joined it
    /// after its end, each of which then exits): a coordinator that found
    /// its job finished waits for as many as it has hosts, not longer.
    /// Counted, not named: hosts may share a name.
    pub joins_told_finished: usize,
}

impl Coordination {
    /// One job.
    pub fn one(job: Job) -> Coordination {
        Coordination { jobs: vec![job], sweep: None, stopping: false, joins_told_finished: 0 }
    }

    /// A sweep (its jobs start as hosts join).
    pub fn sweep(scheduler: Scheduler) -> Coordination {
        Coordination {
            jobs: Vec::new(),
            sweep: Some(scheduler),
            stopping: false,
            joins_told_finished: 0,
        }
    }

    /// The hosts told that the job of `up` is finished: those that joined
    /// it after its end, and its members whose heartbeat was answered so
    /// (agents that outlived the coordinator). Each of them then exits.
    pub fn hosts_told_finished(&self) -> usize {
        self.joins_told_finished + self.jobs.first().map_or(0, Job::members_told_finished)
    }

    /// The index of the job `member_id` belongs (or belonged) to.
    pub fn job_of(&self, member_id: &str) -> Option<usize> {
        self.jobs.iter().position(|j| j.knows_member(member_id))
    }

    /// The job and member whose credentials a call presents (see
    /// [`Job::authenticate`]); unknown ids and wrong secrets get the same answer.
    pub fn authenticate(
        &self,
        presented: Option<(&str, &[u8])>,
    ) -> Result<(usize, &Member), JobError> {
        let Some((id, _)) = presented else { return Err(JobError::no_credentials()) };
        match self.job_of(id) {
            Some(i) => self.jobs[i].authenticate(presented).map(|m| (i, m)),
            // Refused as a wrong secret would be.
            None => Err(JobError::credentials_refused()),
        }
    }

    /// A host joins: the job of `up`, or the sweep's placement.
    pub fn join(
        &mut self,
        host: &str,
        kind: DeviceKind,
        local_ranks: u32,
        advertise: Option<IpAddr>,
    ) -> Result<Placement, JobError> {
        match &mut self.sweep {
            // Told to come back: to a coordinator that resumes the sweep, or
            // to none, past its agent's deadline.
            Some(_) if self.stopping => Ok(Placement::JoinAgain(crate::sweep::JOIN_AGAIN_AFTER)),
            Some(sweep) => sweep.place(&mut self.jobs, host, kind, local_ranks, advertise),
            None => {
                // Told so, not refused: the host has nothing left to do.
                if self.jobs[0].phase == Phase::Finished {
                    self.joins_told_finished += 1;
                    return Ok(Placement::JobFinished);
                }
                // A restored job whose members may still come back.
                if let Some(after) = self.jobs[0].join_later() {
                    return Ok(Placement::JoinAgain(after));
                }
                let (id, secret, pending) =
                    self.jobs[0].join(host, kind, local_ranks, advertise)?;
                Ok(Placement::Member { job: 0, id, secret, pending })
            }
        }
    }

    /// Liveness checks of every job still going, then (sweeps) moves the
    /// runs whose job ended, unless the coordinator is stopping.
    pub fn check_liveness(&mut self) {
        for job in self.jobs.iter_mut().filter(|j| !j.is_over()) {
            job.check_liveness();
        }
        self.tick_sweep();
    }

    /// Moves a sweep's runs whose job ended, unless the coordinator is
    /// stopping (its stop is not theirs to record).
    fn tick_sweep(&mut self) {
        if let Some(sweep) = self.sweep.as_mut().filter(|_| !self.stopping) {
            sweep.tick(&self.jobs);
        }
    }

    /// What a restarted coordinator needs, where it changed: each job's
    /// index and its state to write once the lock is released.
    pub fn states_to_save(&mut self) -> Vec<(usize, PendingSave)> {
        let mut pending = Vec::new();
        for (index, job) in self.jobs.iter_mut().enumerate() {
            pending.extend(job.state_to_save().map(|save| (index, save)));
        }
        pending
    }

    /// A sweep's run files (recipes, outcomes) to write once the lock is
    /// released.
    pub fn run_files_to_write(&mut self) -> Vec<crate::sweep::RunFile> {
        self.sweep.as_mut().map(Scheduler::files_to_write).unwrap_or_default()
    }

    /// Where the sweep's run files still queued go (left queued).
    pub fn queued_run_file_paths(&self) -> Vec<std::path::PathBuf> {
        self.sweep.as_ref().map(Scheduler::queued_file_paths).unwrap_or_default()
    }

    /// The metrics sinks of the jobs whose records wait to be appended to
    /// their `metrics.jsonl`, to write once the lock is released
    /// ([`MetricsSink::write_pending`]): a slow disk holds up no other call.
    pub fn metrics_to_write(&self) -> Vec<Arc<MetricsSink>> {
        self.jobs.iter().filter_map(Job::metrics_to_write).collect()
    }

    /// Fails every job still going: the coordinator is stopping. A sweep's
    /// runs are left as they stood (see `stopping`).
    pub fn fail_all(&mut self, reason: &str) {
        // Runs whose job ended before the stop (a Leave, between two
        // passes) are recorded as they ended, once.
        self.tick_sweep();
        self.stopping = true;
        for job in &mut self.jobs {
            job.fail(reason.to_string());
        }
    }

    /// The job `coordinator status` describes first: the one of `up`, or a
    /// sweep's first running attempt (else its latest).
    pub fn primary(&self) -> Option<&Job> {
        match &self.sweep {
            None => self.jobs.first(),
            Some(sweep) => sweep.running_jobs().next().map(|j| &self.jobs[j]).or(self.jobs.last()),
        }
    }
}
