//! What a coordinator keeps on disk so that, killed and restarted
//! (`coordinator up --restore`), it continues its job: the job id and
//! recipe, the generation, the members (with their session secrets, so
//! that their agents' calls are accepted again) and the committed
//! checkpoints. The file, `OUT/coordinator-state.json`, is written
//! atomically (temporary file, fsync, rename) whenever one of these
//! changes, with mode 0600 since it holds the secrets.
//!
//! A restored job opens a new generation over the saved members (pending
//! ones admitted) from its newest committed checkpoint (one that never
//! started waits for its hosts again, keeping none): the agents see the
//! generation move on in their next heartbeat and restart their ranks, as
//! after any regroup. At most the updates since that checkpoint are lost.
//! A member that does not come back within the heartbeat timeout, or the
//! time an agent takes to call a coordinator that was away if longer, is
//! silent, and handled as such (a fixed
//! job fails naming it; an elastic one drops it). `coordinator up
//! --auto-resume` restores such a job too, but cannot know whether the
//! agents outlived the old coordinator: if none of its members comes back
//! in the time agents take to call again, it takes new hosts instead
//! ([`Job::await_restored_members`]).

use crate::job::{CommittedCheckpoint, DeviceKind, Job, JobError, Member, Phase};
use rsb_files::Readers;
use rsb_job::GenerationReason;
use rsb_proto::auth::Secret;
use rsb_recipes::Recipe;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The state file in the run folder.
pub const STATE_FILE: &str = "coordinator-state.json";
/// Version of the state format this build writes and reads (2: with the
/// job token's fingerprint).
pub const STATE_FORMAT: u32 = 2;

/// A member as saved (its `Debug` output leaves the secret out).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedMember {
    /// Member id.
    pub id: String,
    /// Host name.
    pub host: String,
    /// `true`: CUDA ranks; `false`: CPU ranks.
    pub cuda: bool,
    /// Ranks it runs.
    pub local_ranks: u32,
    /// Address its ring listeners are reached at.
    pub advertise: Option<IpAddr>,
    /// Its session secret.
    pub secret: String,
}

impl std::fmt::Debug for SavedMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedMember")
            .field("id", &self.id)
            .field("host", &self.host)
            .field("cuda", &self.cuda)
            .field("local_ranks", &self.local_ranks)
            .field("advertise", &self.advertise)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A committed checkpoint as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedCheckpoint {
    /// Epoch it was written in.
    pub epoch: u64,
    /// Updates done at it.
    pub step: u64,
    /// Its folder.
    pub path: String,
}

/// The largest generation or member count a state file may hold: 2^32, far
/// past any job's, far below where counting on would overflow.
pub const MAX_SAVED_COUNTER: u64 = 1 << 32;

/// The saved job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedJob {
    /// [`STATE_FORMAT`] of the writer.
    pub format: u32,
    /// Job id.
    pub job_id: String,
    /// The resolved recipe (YAML), compared with the one given at restore.
    pub recipe_yaml: String,
    /// Generation when saved.
    pub generation: u64,
    /// Hosts the job started with, and its bounds.
    pub nodes_expected: u32,
    /// Fewest hosts.
    pub min_nodes: u32,
    /// Most hosts.
    pub max_nodes: u32,
    /// Whether a generation ever ran.
    pub started: bool,
    /// Why the job ended, when it did (`finished`, or the failure).
    pub ended: Option<String>,
    /// Members in join order.
    pub members: Vec<SavedMember>,
    /// Members waiting to be admitted.
    pub pending: Vec<SavedMember>,
    /// Committed checkpoints, newest last.
    pub checkpoints: Vec<SavedCheckpoint>,
    /// What the current generation resumed from.
    pub resume_from: Option<String>,
    /// Updates done in it.
    pub resume_step: Option<u64>,
    /// Member ids handed out so far (ids stay unique after a restore).
    pub next_member: u64,
    /// Restarts of every rank in a row without a committed checkpoint
    /// (`--max-restarts` counts on across a coordinator restart). Absent
    /// from the files of earlier builds: 0.
    #[serde(default)]
    pub restarts: u32,
    /// [`Secret::fingerprint`] of the job token (`null` only for a job
    /// that never had one, which restores with any token).
    pub token_fingerprint: Option<String>,
}

/// Why a state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    /// It cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// It is not a valid state file.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field and line.
        message: String,
    },
}

fn saved_member(m: &Member) -> SavedMember {
    SavedMember {
        id: m.id.clone(),
        host: m.host.clone(),
        cuda: m.kind == DeviceKind::Cuda,
        local_ranks: m.local_ranks,
        advertise: m.advertise,
        secret: m.secret.expose().to_string(),
    }
}

impl SavedJob {
    /// The state of `job` worth keeping.
    pub fn of(job: &Job) -> SavedJob {
        SavedJob {
            format: STATE_FORMAT,
            job_id: job.id.clone(),
            recipe_yaml: job.recipe_yaml.clone(),
            generation: job.generation,
            nodes_expected: job.nodes_expected,
            min_nodes: job.min_nodes,
            max_nodes: job.max_nodes,
            started: job.started(),
            ended: match &job.phase {
                Phase::Finished => Some("finished".into()),
                Phase::Failed(reason) => Some(format!("failed: {reason}")),
                Phase::Waiting | Phase::Running => None,
            },
            // A host leaving at its ranks' stop request is not waited for
            // by a restored job: its agent is gone, or going.
            members: job
                .members
                .iter()
                .filter(|m| !job.is_leaving(&m.id))
                .map(saved_member)
                .collect(),
            pending: job.pending.iter().map(saved_member).collect(),
            checkpoints: job
                .checkpoints
                .iter()
                .map(|c| SavedCheckpoint { epoch: c.epoch, step: c.step, path: c.path.clone() })
                .collect(),
            resume_from: job.resume_from.clone(),
            resume_step: job.resume_step,
            next_member: job.next_member(),
            restarts: job.restarts(),
            token_fingerprint: job.token_fingerprint.clone(),
        }
    }

    /// Reads `OUT/coordinator-state.json`.
    pub fn read(out: &Path) -> Result<SavedJob, SavedError> {
        let path = out.join(STATE_FILE);
        let text = rsb_files::read_regular_file(&path)
            .map_err(|source| SavedError::Io { path: path.clone(), source })?;
        let mut de = serde_json::Deserializer::from_str(&text);
        let saved: SavedJob = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let inner = e.inner();
            SavedError::Invalid {
                path: path.clone(),
                message: format!("line {}: {}: {}", inner.line(), e.path(), inner),
            }
        })?;
        if saved.format != STATE_FORMAT {
            return Err(SavedError::Invalid {
                path,
                message: format!(
                    "format: {} is not the format this build reads ({STATE_FORMAT})",
                    saved.format
                ),
            });
        }
        Ok(saved)
    }

    /// Writes it to `path` (the job's `OUT/coordinator-state.json`, which
    /// [`SavedJob::read`] reads), atomically, mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), SavedError> {
        // Plain data: serialization cannot fail.
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        rsb_files::write_atomically(path, text.as_bytes(), Readers::Owner)
            .map_err(|source| SavedError::Io { path: path.to_path_buf(), source })
    }
}

/// Rebuilds a member (its heartbeat clock starts now).
fn member(saved: &SavedMember) -> Result<Member, JobError> {
    let secret = Secret::new(saved.secret.clone(), "saved member secret")
        .map_err(|e| JobError::Invalid(format!("member {}: {e}", saved.id)))?;
    if saved.local_ranks == 0 || saved.local_ranks > crate::service::MAX_LOCAL_RANKS {
        return Err(JobError::Invalid(format!(
            "member {}: `local_ranks` {} is not in 1..={}",
            saved.id,
            saved.local_ranks,
            crate::service::MAX_LOCAL_RANKS
        )));
    }
    Ok(Member {
        id: saved.id.clone(),
        host: saved.host.clone(),
        kind: if saved.cuda { DeviceKind::Cuda } else { DeviceKind::Cpu },
        local_ranks: saved.local_ranks,
        first_rank: 0,
        last_seen: Instant::now(),
        advertise: saved.advertise,
        secret,
        rank_generations: vec![0; saved.local_ranks as usize],
    })
}

impl Job {
    /// The job `saved` describes, continued by a restarted coordinator with
    /// `recipe` (which must be the saved one) and `token` (which must be the
    /// job's: its agents present it) in `out_dir`: a new generation over the
    /// saved members from the newest committed checkpoint, or, if it never
    /// started, still waiting for hosts.
    pub fn restore(
        recipe: Recipe,
        out_dir: PathBuf,
        saved: SavedJob,
        token: &Secret,
    ) -> Result<Job, JobError> {
        if let Some(ended) = &saved.ended {
            return Err(JobError::Precondition(format!(
                "the job in {} already ended ({ended}); nothing to continue",
                out_dir.display()
            )));
        }
        // Counters a job cannot reach: a damaged file, not a job to count on
        // from (one more would overflow).
        for (field, value) in [("generation", saved.generation), ("next_member", saved.next_member)]
        {
            if value > MAX_SAVED_COUNTER {
                return Err(JobError::Invalid(format!(
                    "{STATE_FILE}: `{field}` {value} is past any a job reaches (at most \
                     {MAX_SAVED_COUNTER}): the file is damaged"
                )));
            }
        }
        let fingerprint = token.fingerprint();
        if saved.token_fingerprint.as_ref().is_some_and(|saved| *saved != fingerprint) {
            return Err(JobError::Precondition(format!(
                "the job token is not the one job {} was started with (its fingerprint is \
                 saved in {STATE_FILE}): its agents would all be refused; restore with the \
                 same token (--token-file FILE, or {})",
                saved.job_id,
                rsb_proto::auth::TOKEN_ENV
            )));
        }
        let mut job = Job::new(recipe, out_dir, saved.nodes_expected);
        if job.recipe_yaml != saved.recipe_yaml {
            return Err(JobError::Invalid(format!(
                "the recipe differs from the one job {} ran with (saved in {}); restore it \
                 with the same recipe and --set options",
                saved.job_id, STATE_FILE
            )));
        }
        job.set_node_bounds(saved.min_nodes, saved.max_nodes)?;
        job.id = saved.job_id.clone();
        job.generation = saved.generation;
        job.restore_counters(saved.next_member, saved.started, saved.restarts);
        let members: Vec<Member> = saved.members.iter().map(member).collect::<Result<_, _>>()?;
        let pending: Vec<Member> = saved.pending.iter().map(member).collect::<Result<_, _>>()?;
        // A job that never started is waited for again, keeping none of
        // the hosts that had joined: their ranks, asking again for the
        // assignment the old coordinator's stop cut, are refused as unknown,
        // and their agents, refused too, stop them and join again.
        // Pending members are admitted by the restored generation, which
        // records their admission.
        if saved.started {
            job.members = members;
            job.pending = pending;
        }
        job.checkpoints = saved
            .checkpoints
            .iter()
            .map(|c| CommittedCheckpoint { epoch: c.epoch, step: c.step, path: c.path.clone() })
            .collect();
        job.resume_from = saved.resume_from.clone();
        job.resume_step = saved.resume_step;
        job.token_fingerprint = Some(fingerprint);
        if saved.started {
            job.restart_generation(GenerationReason::CoordinatorRestarted);
        }
        Ok(job)
    }
}

/// What to say when the job in the run folder `out` is over: its state file
/// says it finished, and its newest committed checkpoint ends the last
/// epoch of `recipe`, trained with it, intact
/// ([`rsb_job::run_folder::finished_run`]). A coordinator killed between
/// saving that end and exiting, started again as it was (a Kubernetes pod
/// restarted), found nothing to restore and started a job from that end,
/// waiting for hosts that had gone (their ranks done) until the join
/// timeout failed a finished run. The records rank 0 made that no
/// coordinator took are appended to `metrics.jsonl`, as at a job's end.
/// `None` otherwise (no state file, another
/// end, or a recipe that trains further): the run goes on as before.
pub fn finished_already(recipe: &rsb_recipes::Recipe, out: &Path) -> Option<String> {
    let saved = SavedJob::read(out).ok()?;
    if saved.ended.as_deref() != Some("finished") {
        return None;
    }
    let (checkpoint, position) = rsb_job::run_folder::finished_run(out, recipe)?;
    // A coordinator killed after saving the end and before appending the
    // records rank 0 made that it had not taken left them in rank 0's file:
    // they are taken now, each once.
    let metrics = out.join(rsb_job::sweep::RUN_METRICS);
    let records = crate::job::append_records_made_while_away(out, &metrics)
        .unwrap_or_else(|e| format!("the records rank 0 made were not taken: {e}"));
    Some(format!(
        "the job in {} finished ({} says so, and {} ends its last epoch: {} of {}, {} updates); \
         nothing is left to train; {records}",
        out.display(),
        out.join(STATE_FILE).display(),
        checkpoint.path().display(),
        position.next_epoch,
        recipe.total_epochs(),
        position.updates
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::job::RendezvousPayload;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    pub(crate) fn recipe() -> Recipe {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/debug/resnet18_tiny_cpu.yaml");
        rsb_recipes::load(&path, &[]).unwrap()
    }

    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));

    #[test]
    fn a_restored_job_goes_on_from_its_newest_checkpoint_with_the_same_members() {
        let tmp = tempfile::tempdir().unwrap();
        let token = Secret::generate().unwrap();
        let mut job = Job::new(recipe(), tmp.path().to_path_buf(), 2);
        job.state_file = Some(tmp.path().join(STATE_FILE));
        job.token_fingerprint = Some(token.fingerprint());
        let (a, secret_a, _) = job.join("a", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        let (b, _, _) = job.join("b", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        job.publish(&a, 1, 0, Some(RendezvousPayload::RingAddress("127.0.0.1:1".into()))).unwrap();
        job.commit_checkpoint(1, 0, 4, "/run/checkpoints/epoch-0000-update-000000004".into())
            .unwrap();
        job.state_to_save().expect("the state changed").write().unwrap();
        let saved = SavedJob::read(tmp.path()).unwrap();
        assert_eq!(saved, SavedJob::of(&job));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(tmp.path().join(STATE_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the state file holds secrets");
        }
        assert!(
            !format!("{saved:?}").contains(secret_a.expose()),
            "a saved state's Debug output leaves the members' secrets out"
        );
        // Another job token is refused before anything is restored: the
        // agents would all be refused.
        let metrics = tmp.path().join("metrics.jsonl");
        let recorded = std::fs::read_to_string(&metrics).unwrap_or_default();
        let other_token = Secret::generate().unwrap();
        let e = Job::restore(recipe(), tmp.path().to_path_buf(), saved.clone(), &other_token)
            .unwrap_err();
        assert!(e.to_string().contains("job token is not the one"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&metrics).unwrap_or_default(),
            recorded,
            "a refused restore records nothing"
        );
        // A job that never had a token fingerprint restores with any token.
        let unbound = SavedJob { token_fingerprint: None, ..saved.clone() };
        let restored =
            Job::restore(recipe(), tmp.path().to_path_buf(), unbound, &other_token).unwrap();
        assert_eq!(restored.token_fingerprint, Some(other_token.fingerprint()));
        std::fs::write(&metrics, &recorded).unwrap();
        let restored =
            Job::restore(recipe(), tmp.path().to_path_buf(), saved.clone(), &token).unwrap();
        assert_eq!((restored.generation, restored.phase.clone()), (2, Phase::Running));
        assert_eq!(restored.id, job.id);
        assert_eq!(
            restored.resume_from.as_deref(),
            Some("/run/checkpoints/epoch-0000-update-000000004")
        );
        assert_eq!(restored.resume_step, Some(4));
        // The members' credentials still work; new ids stay unique.
        let presented = (a.as_str(), secret_a.expose().as_bytes());
        assert_eq!(restored.authenticate(Some(presented)).unwrap().id, a);
        assert!(restored.knows_member(&b));
        let mut restored = restored;
        assert!(restored.join("c", DeviceKind::Cpu, 1, LOOPBACK).is_err(), "a fixed job is full");
        assert_eq!(restored.next_member(), 2);
        let text = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
        assert!(text.contains("coordinator_restarted"), "{text}");
        // Another recipe, or a job that ended, is refused.
        let mut other = recipe();
        other.seed += 1;
        let e = Job::restore(other, tmp.path().to_path_buf(), saved.clone(), &token).unwrap_err();
        assert!(e.to_string().contains("recipe differs"), "{e}");
        let ended = SavedJob { ended: Some("finished".into()), ..saved.clone() };
        let e = Job::restore(recipe(), tmp.path().to_path_buf(), ended, &token).unwrap_err();
        assert!(e.to_string().contains("already ended"), "{e}");
        // Restarts in a row count on across the coordinator's restart.
        let twice = SavedJob { restarts: 2, ..saved.clone() };
        let restored = Job::restore(recipe(), tmp.path().to_path_buf(), twice, &token).unwrap();
        assert_eq!((restored.restarts(), SavedJob::of(&restored).restarts), (2, 2));
        // Counters no job reaches (a corrupt file) are named, not counted on from.
        for (field, corrupt) in [
            ("generation", SavedJob { generation: u64::MAX, ..saved.clone() }),
            ("next_member", SavedJob { next_member: u64::MAX, ..saved.clone() }),
        ] {
            let e = Job::restore(recipe(), tmp.path().to_path_buf(), corrupt, &token).unwrap_err();
            assert!(e.to_string().contains(&format!("`{field}` {}", u64::MAX)), "{e}");
        }
        // A member's rank count out of range (a corrupt file) is named, not allocated.
        for local_ranks in [0, u32::MAX] {
            let mut corrupt = saved.clone();
            corrupt.members[1].local_ranks = local_ranks;
            let e = Job::restore(recipe(), tmp.path().to_path_buf(), corrupt, &token).unwrap_err();
            let expected = format!("member {b}: `local_ranks` {local_ranks} is not in 1..=1024");
            assert!(e.to_string().contains(&expected), "{e}");
        }
    }

    /// A 2-host job joined by `hosts` (both: started, with one committed
    /// checkpoint), saved, and the state read back, with the job's token and
    /// the members' ids and secrets.
    fn saved_job(dir: &Path, hosts: &[&str]) -> (SavedJob, Secret, Vec<(String, Secret)>) {
        let token = Secret::generate().unwrap();
        let mut job = Job::new(recipe(), dir.to_path_buf(), 2);
        job.state_file = Some(dir.join(STATE_FILE));
        job.token_fingerprint = Some(token.fingerprint());
        let members = hosts
            .iter()
            .map(|host| {
                let (id, secret, _) = job.join(host, DeviceKind::Cpu, 1, LOOPBACK).unwrap();
                (id, secret)
            })
            .collect();
        if job.started() {
            job.commit_checkpoint(1, 0, 4, "/run/checkpoints/epoch-0000-update-000000004".into())
                .unwrap();
        }
        job.state_to_save().expect("the state changed").write().unwrap();
        (SavedJob::read(dir).unwrap(), token, members)
    }

    /// [`saved_job`] of a started job.
    fn saved_running_job(dir: &Path) -> (SavedJob, Secret, Vec<(String, Secret)>) {
        saved_job(dir, &["a", "b"])
    }

    /// Restores `saved` as `up --auto-resume` does, with a heartbeat timeout
    /// of `timeout` (the agents taking no longer to call again).
    fn auto_restored(dir: &Path, saved: SavedJob, token: &Secret, timeout: Duration) -> Job {
        let mut job = Job::restore(recipe(), dir.to_path_buf(), saved, token).unwrap();
        job.heartbeat_timeout = timeout;
        job.agents_call_again_within = Duration::ZERO;
        job.await_restored_members(true);
        job
    }

    #[test]
    fn restored_members_have_the_time_agents_take_to_call_again_even_past_the_heartbeat_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        // The agents' pace is far past the heartbeat timeout, so that a
        // loaded machine's late check still falls between the two.
        let step = Duration::from_millis(100);
        for may_be_gone in [false, true] {
            let (saved, token, members) = saved_running_job(tmp.path());
            let mut job = Job::restore(recipe(), tmp.path().to_path_buf(), saved, &token).unwrap();
            job.heartbeat_timeout = step;
            job.agents_call_again_within = 10 * step;
            job.await_restored_members(may_be_gone);
            assert_eq!(job.restored_members_wait(), 10 * step);
            // Past the heartbeat timeout, within the agents' pace: no one
            // is silent, and joins still wait.
            std::thread::sleep(2 * step);
            job.check_liveness();
            assert_eq!(job.phase, Phase::Running, "may_be_gone {may_be_gone}");
            assert_eq!(job.join_later().is_some(), may_be_gone);
            // Past it: --restore's fixed job fails naming a silent member;
            // --auto-resume's drops them and takes joins.
            std::thread::sleep(9 * step);
            job.check_liveness();
            if may_be_gone {
                assert_eq!((job.phase.clone(), job.dropped.len()), (Phase::Waiting, 2));
            } else {
                let failure = job.failure().expect("a silent member fails the job").to_string();
                assert!(failure.contains(&members[0].0), "{failure}");
                assert_eq!(job.join_later(), None, "an ended job takes no one back");
            }
        }
        // A job that ended while its members could still come back stays
        // ended: they are not dropped, nor is it reopened for joins.
        let (saved, token, _) = saved_running_job(tmp.path());
        let mut job = auto_restored(tmp.path(), saved, &token, step);
        job.fail("stopped".into());
        std::thread::sleep(2 * step);
        assert_eq!(job.join_later(), None);
        job.check_liveness();
        assert_eq!((job.phase.clone(), job.dropped.len()), (Phase::Failed("stopped".into()), 0));
    }

    #[test]
    fn an_auto_restored_job_waits_for_its_members_and_goes_on_with_those_that_come_back() {
        let tmp = tempfile::tempdir().unwrap();
        let (saved, token, members) = saved_running_job(tmp.path());
        let mut job = auto_restored(tmp.path(), saved, &token, Duration::from_secs(30));
        assert_eq!((job.generation, job.phase.clone()), (2, Phase::Running));
        // A stranger's join (a host started again) is told to come back.
        assert!(job.join_later().is_some(), "joins wait while the members may come back");
        // A member's heartbeat ends the wait: the job is the restored one.
        let beat = job.heartbeat(&members[0].0).unwrap();
        assert!(beat.keep_going && beat.failure.is_none(), "{beat:?}");
        assert_eq!(job.join_later(), None);
        assert_eq!((job.generation, job.members.len()), (2, 2));
        let e = job.join("c", DeviceKind::Cpu, 1, LOOPBACK).unwrap_err();
        assert!(e.to_string().contains("takes no new members"), "{e}");
    }

    #[test]
    fn an_auto_restored_job_whose_members_do_not_come_back_takes_the_hosts_that_join() {
        for checkpoint_on_disk in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let (saved, token, members) = saved_running_job(tmp.path());
            if checkpoint_on_disk {
                // The newest one on disk may be newer than the last one the
                // coordinator committed (ranks stopped by their agents write
                // one as they stop): rank 0 chooses from the run folder.
                std::fs::create_dir_all(tmp.path().join("checkpoints/epoch-0000-update-000000006"))
                    .unwrap();
            }
            let timeout = Duration::from_secs(1);
            let mut job = auto_restored(tmp.path(), saved, &token, timeout);
            // A rendezvous deadline shorter than the wait fails nothing:
            // the ranks of members that may not come back are not late.
            job.rendezvous_timeout = Duration::from_millis(1);
            std::thread::sleep(Duration::from_millis(20));
            job.check_liveness();
            assert_eq!(job.phase, Phase::Running);
            assert!(job.join_later().is_some());
            std::thread::sleep(timeout + Duration::from_millis(50));
            // Silence is not checked first: a fixed job does not fail.
            job.check_liveness();
            assert_eq!((job.generation, job.phase.clone()), (3, Phase::Waiting));
            assert!(job.members.is_empty() && job.dropped.len() == 2, "{job:?}");
            assert_eq!(job.join_later(), None, "joins are taken");
            for (id, _) in &members {
                let beat = job.heartbeat(id).unwrap();
                assert!(!beat.keep_going, "a member that came back late is told it was dropped");
                assert!(beat.failure.unwrap().contains("did not come back"));
            }
            job.join("c", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
            assert_eq!(job.phase, Phase::Waiting, "the job waits for --nodes hosts");
            let (_, _, pending) = job.join("d", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
            assert!(!pending);
            assert_eq!((job.generation, job.phase.clone()), (3, Phase::Running));
            let hosts: Vec<&str> = job.members.iter().map(|m| m.host.as_str()).collect();
            assert_eq!(hosts, ["c", "d"]);
            let expected = if checkpoint_on_disk {
                tmp.path().display().to_string()
            } else {
                "/run/checkpoints/epoch-0000-update-000000004".to_string()
            };
            assert_eq!(job.resume_from.as_deref(), Some(expected.as_str()));
            assert_eq!(job.resume_step, (!checkpoint_on_disk).then_some(4));
            job.flush_metrics();
            let text = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
            let last = text.lines().last().unwrap();
            assert!(
                last.contains("\"generation\":3")
                    && last.matches("did not come back").count() == 2
                    && last.contains("\"hosts\":[\"c\",\"d\"]"),
                "{last}"
            );
        }
    }

    /// Writes a committed checkpoint `run/checkpoints/NAME` of [`recipe`]
    /// whose state says training continues with epoch `next_epoch`, step 0.
    pub(crate) fn committed_at_epoch_end(run: &Path, name: &str, next_epoch: u64) -> PathBuf {
        use rsb_job::checkpoint::{Manifest, CHECKPOINTS, MANIFEST, PARTS, STATE};
        let dir = run.join(CHECKPOINTS).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for part in &PARTS[..2] {
            std::fs::write(dir.join(part), b"tensors").unwrap();
        }
        let state = serde_json::json!({
            "next_epoch": next_epoch, "next_step": 0, "updates": 60,
            rsb_job::run_folder::STATE_RECIPE_KEY: rsb_job::run_folder::recipe_value(&recipe()),
        });
        std::fs::write(dir.join(STATE), state.to_string()).unwrap();
        let manifest = Manifest::of_parts(&dir, &PARTS).unwrap();
        std::fs::write(dir.join(MANIFEST), manifest.to_json()).unwrap();
        dir
    }

    /// Rank 0's records of updates 1 to `updates`, one log step each.
    pub(crate) fn recorded_steps(updates: u64) -> Vec<rsb_job::MetricsRecord> {
        (1..=updates)
            .map(|step| rsb_job::MetricsRecord::Step {
                epoch: 0,
                step,
                lr: 0.01,
                loss: 2.0 / step as f64,
                images_per_sec: 100.0,
                total_updates: updates,
                skipped_updates: 0,
                peak_gpu_memory_mib: None,
                rank_balance: None,
                input_wait_share: None,
            })
            .collect()
    }

    fn checksum_at(step: u64) -> rsb_job::MetricsRecord {
        rsb_job::MetricsRecord::Checksum { rank: 0, step, sum: 1.5, sum_of_squares: 3.0 }
    }

    /// A saved running job whose run folder's newest committed checkpoint
    /// ends epoch `next_epoch`, whose metrics.jsonl holds `taken` and whose
    /// rank 0 file holds `rank_zero`: a job its ranks trained while no
    /// coordinator ran. Returns the saved job, its token and members, and
    /// the checkpoint.
    fn trained_while_away(
        run: &Path,
        next_epoch: u64,
        taken: &[rsb_job::MetricsRecord],
        rank_zero: &[rsb_job::MetricsRecord],
    ) -> (SavedJob, Secret, Vec<(String, Secret)>, PathBuf) {
        let (saved, token, members) = saved_running_job(run);
        let end = committed_at_epoch_end(
            run,
            &format!("{}{next_epoch:04}", rsb_job::checkpoint::FOLDER_PREFIX),
            next_epoch,
        );
        let lines = |records: &[rsb_job::MetricsRecord]| -> String {
            records.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect()
        };
        std::fs::write(run.join("metrics.jsonl"), lines(taken)).unwrap();
        let rank_zero_file = rsb_job::run_folder::rank_records_file(run, 0);
        std::fs::create_dir_all(rank_zero_file.parent().unwrap()).unwrap();
        std::fs::write(&rank_zero_file, lines(rank_zero)).unwrap();
        (saved, token, members, end)
    }

    /// The records of `run`'s metrics.jsonl, the coordinator's generations aside.
    pub(crate) fn reported_records(run: &Path) -> Vec<rsb_job::MetricsRecord> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .filter(|r: &rsb_job::MetricsRecord| r.reported_by_rank_zero())
            .collect()
    }

    /// The ranks trained the job to its end while no coordinator ran, and
    /// their agents left: the restored job is finished once the wait for
    /// them is over, rather than waiting for hosts to train it anew (and
    /// failing a finished job at the join timeout). A run folder whose
    /// newest checkpoint is not the end waits for hosts.
    #[test]
    fn an_auto_restored_job_its_ranks_finished_while_no_coordinator_ran_is_finished() {
        let epochs = recipe().total_epochs();
        for (next_epoch, finished) in [(epochs, true), (epochs - 1, false)] {
            let tmp = tempfile::tempdir().unwrap();
            // The first coordinator took updates 1 and 2; rank 0 made 3 and
            // 4 (and its checksums) while none ran.
            let (steps, checksum) = (recorded_steps(4), checksum_at(4));
            let rank_zero = [steps.as_slice(), &[checksum]].concat();
            let (saved, token, _, end) =
                trained_while_away(tmp.path(), next_epoch, &steps[..2], &rank_zero);
            let timeout = Duration::from_millis(200);
            let mut job = auto_restored(tmp.path(), saved, &token, timeout);
            job.check_liveness();
            assert_eq!(job.phase, Phase::Running, "the members may still come back");
            std::thread::sleep(timeout + Duration::from_millis(50));
            job.check_liveness();
            job.flush_metrics();
            let taken = reported_records(tmp.path());
            if finished {
                assert_eq!(job.phase, Phase::Finished, "{end:?}");
                // Saved as ended: a later restore does not run it again.
                assert_eq!(SavedJob::of(&job).ended.as_deref(), Some("finished"));
                assert_eq!(taken, steps, "rank 0's records of updates 3 and 4 are taken, once");
                // A run folder whose rank 0 file does not hold the last record
                // taken: nothing is guessed, and the job still finishes.
                let tmp = tempfile::tempdir().unwrap();
                let other = &recorded_steps(5)[2..];
                let (saved, token, _, _) =
                    trained_while_away(tmp.path(), next_epoch, &steps[..2], other);
                let mut job = auto_restored(tmp.path(), saved, &token, timeout);
                std::thread::sleep(timeout + Duration::from_millis(50));
                job.check_liveness();
                job.flush_metrics();
                assert_eq!(job.phase, Phase::Finished);
                assert_eq!(reported_records(tmp.path()), steps[..2]);
            } else {
                assert_eq!(taken, steps[..2], "a job that goes on takes no record from a file");
                assert_eq!((job.generation, job.phase.clone()), (3, Phase::Waiting));
            }
            assert_eq!(job.dropped.len(), 2);
        }
    }

    /// A job saved as finished whose end is in the run folder is over for
    /// `up --auto-resume` (the records rank 0 made that its coordinator,
    /// killed before taking them, did not take are appended, once); saved
    /// as running, failed, or one epoch short, it is not.
    #[test]
    fn a_job_saved_as_finished_with_its_end_in_the_folder_is_finished_already() {
        let epochs = recipe().total_epochs();
        for (next_epoch, ended) in [
            (epochs, Some("finished")),
            (epochs, None),
            (epochs, Some("rank 0 on a failed: boom")),
            (epochs - 1, Some("finished")),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let steps = recorded_steps(3);
            let (saved, _, _, end) =
                trained_while_away(tmp.path(), next_epoch, &steps[..1], &steps);
            let saved = SavedJob { ended: ended.map(str::to_string), ..saved };
            saved.write(&tmp.path().join(STATE_FILE)).unwrap();
            let said = finished_already(&recipe(), tmp.path());
            if next_epoch == epochs && ended == Some("finished") {
                let said = said.expect("finished already");
                assert!(said.contains(&end.display().to_string()), "{said}");
                assert!(said.contains("the 2 record(s) rank 0 made"), "{said}");
                assert_eq!(reported_records(tmp.path()), steps);
                // Asked again: nothing is taken twice.
                let again = finished_already(&recipe(), tmp.path()).unwrap();
                assert!(again.contains("rank 0 made no record that no coordinator took"));
                assert_eq!(reported_records(tmp.path()), steps);
            } else {
                assert_eq!(said, None, "{next_epoch} {ended:?}");
                assert_eq!(reported_records(tmp.path()), steps[..1]);
            }
        }
    }

    /// `--restore`d (its agents not taken for gone), the ranks end the job
    /// while their agents cannot reach the coordinator, and the agents give
    /// up: their silence finds the job's end in the run folder and
    /// finishes it, where it failed the job for the silence. A run folder
    /// whose newest checkpoint is not the end fails it as before.
    #[test]
    fn a_restored_job_its_ranks_finished_while_their_agents_were_cut_off_is_finished() {
        let epochs = recipe().total_epochs();
        for (next_epoch, finished) in [(epochs, true), (epochs - 1, false)] {
            let tmp = tempfile::tempdir().unwrap();
            let steps = recorded_steps(3);
            let (saved, token, _, end) =
                trained_while_away(tmp.path(), next_epoch, &steps[..1], &steps);
            let mut job = Job::restore(recipe(), tmp.path().to_path_buf(), saved, &token).unwrap();
            let timeout = Duration::from_millis(200);
            job.heartbeat_timeout = timeout;
            job.agents_call_again_within = Duration::ZERO;
            job.await_restored_members(false);
            std::thread::sleep(timeout + Duration::from_millis(50));
            job.check_liveness();
            job.flush_metrics();
            if finished {
                assert_eq!(job.phase, Phase::Finished, "{end:?}");
                assert_eq!(reported_records(tmp.path()), steps, "rank 0's records taken");
                // A live rank 0's report of one of them, late: refused (the
                // job is over), not written twice.
                let generation = job.generation;
                assert!(job.record_metrics(generation, &steps[2]).is_err());
                job.flush_metrics();
                assert_eq!(reported_records(tmp.path()), steps);
            } else {
                let Phase::Failed(reason) = &job.phase else { panic!("{:?}", job.phase) };
                assert!(reason.contains("missed heartbeats"), "{reason}");
            }
        }
    }

    /// The ranks ended the job before the restarted coordinator started:
    /// it is finished as it is restored, before it is served, neither its
    /// agents nor new hosts waited for, with rank 0's records taken. A run
    /// folder whose newest checkpoint is not the end leaves the job to wait
    /// for its members.
    #[test]
    fn an_auto_restored_job_whose_end_is_already_on_disk_is_finished_at_once() {
        let epochs = recipe().total_epochs();
        for (next_epoch, finished) in [(epochs, true), (epochs - 1, false)] {
            let tmp = tempfile::tempdir().unwrap();
            // The first coordinator took update 1; rank 0 made 2 and 3 while none ran.
            let steps = recorded_steps(3);
            let (saved, token, members, _) =
                trained_while_away(tmp.path(), next_epoch, &steps[..1], &steps);
            // The agents would have a minute to come back.
            let mut job = auto_restored(tmp.path(), saved, &token, Duration::from_secs(60));
            assert_eq!(job.end_if_finished_before_restart(), finished);
            if finished {
                assert_eq!(job.phase, Phase::Finished);
                assert_eq!(job.join_later(), None, "no host is told to join again");
                // An agent still there is told to stop, as at any job's end,
                // with no failure.
                for id in members.iter().map(|(id, _)| id) {
                    let beat = job.heartbeat(id).unwrap();
                    assert!(!beat.keep_going && beat.failure.is_none(), "{beat:?}");
                }
                assert!(job.dropped.is_empty());
                // Written already: the job is not under a lock yet.
                assert_eq!(reported_records(tmp.path()), steps);
                assert_eq!(SavedJob::of(&job).ended.as_deref(), Some("finished"));
            } else {
                assert_eq!(job.phase, Phase::Running);
                assert!(job.join_later().is_some(), "its members may still come back");
                assert_eq!(job.members.len(), 2);
                assert_eq!(reported_records(tmp.path()), steps[..1]);
            }
        }
    }

    #[test]
    fn hosts_leaving_at_their_stop_are_not_saved_as_members_to_wait_for() {
        let tmp = tempfile::tempdir().unwrap();
        let token = Secret::generate().unwrap();
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/debug/resnet18_tiny_cpu.yaml");
        let recipe = || rsb_recipes::load(&path, &["batch.global_size=48".into()]).unwrap();
        // Hosts a, b, c run ranks 0, 1, 2; rank 2 leaves at the stop request
        // of `askers` while rank 0 still writes its stop checkpoint.
        let stopping = |askers: Vec<u32>| {
            let mut job = Job::new(recipe(), tmp.path().to_path_buf(), 3);
            job.set_node_bounds(1, 3).unwrap();
            job.token_fingerprint = Some(token.fingerprint());
            job.join("a", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
            job.join("b", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
            let (c, _, _) = job.join("c", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
            let asked = crate::job::FailureCause::StopRequestedBy(askers);
            job.leave(&c, 1, 0, false, "stopped by SIGTERM", asked).unwrap();
            assert_eq!(job.phase, Phase::Running, "{:?}", job.phase);
            SavedJob::of(&job)
        };
        let saved = stopping(vec![1, 2]);
        let hosts: Vec<&str> = saved.members.iter().map(|m| m.host.as_str()).collect();
        assert_eq!(hosts, ["a"]);
        let restored = Job::restore(recipe(), tmp.path().to_path_buf(), saved, &token).unwrap();
        let hosts: Vec<&str> = restored.members.iter().map(|m| m.host.as_str()).collect();
        assert_eq!(hosts, ["a"]);
        // The whole job preempted: the restored job waits for new hosts.
        let saved = stopping(vec![0, 1, 2]);
        assert!(saved.members.is_empty());
        let mut restored = Job::restore(recipe(), tmp.path().to_path_buf(), saved, &token).unwrap();
        assert_eq!(restored.phase, Phase::Waiting, "{:?}", restored.phase);
        restored.join("d", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        assert_eq!(restored.phase, Phase::Running, "{:?}", restored.phase);
    }

    #[test]
    fn a_restored_job_admits_its_pending_host_and_records_it() {
        let tmp = tempfile::tempdir().unwrap();
        let token = Secret::generate().unwrap();
        // 6 micro-batches per update: worlds of 2 and 3 split them.
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/debug/resnet18_tiny_cpu.yaml");
        let recipe = || rsb_recipes::load(&path, &["batch.global_size=48".into()]).unwrap();
        let mut job = Job::new(recipe(), tmp.path().to_path_buf(), 2);
        job.set_node_bounds(1, 3).unwrap();
        job.state_file = Some(tmp.path().join(STATE_FILE));
        job.token_fingerprint = Some(token.fingerprint());
        for host in ["a", "b"] {
            job.join(host, DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        }
        job.commit_checkpoint(1, 0, 4, "/run/checkpoints/epoch-0000-update-000000004".into())
            .unwrap();
        let (_, _, pending) = job.join("c", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        assert!(pending, "a running job admits a host at its next checkpoint");
        job.state_to_save().expect("the state changed").write().unwrap();
        let saved = SavedJob::read(tmp.path()).unwrap();
        assert_eq!(saved.pending.len(), 1);

        let restored = Job::restore(recipe(), tmp.path().to_path_buf(), saved, &token).unwrap();
        restored.flush_metrics();
        let hosts: Vec<&str> = restored.members.iter().map(|m| m.host.as_str()).collect();
        assert_eq!((hosts, restored.pending.len()), (vec!["a", "b", "c"], 0));
        let text = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let reasons: Vec<&str> = last["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["kind"].as_str().unwrap())
            .collect();
        assert_eq!(reasons, ["coordinator_restarted", "admitted"], "{last}");
        assert_eq!(last["reasons"][1]["host"], "c", "{last}");
        assert_eq!(last["hosts"], serde_json::json!(["a", "b", "c"]), "{last}");
    }

    #[test]
    fn a_restored_job_that_never_started_waits_for_its_hosts_again_and_records_its_start() {
        let tmp = tempfile::tempdir().unwrap();
        let (saved, token, members) = saved_job(tmp.path(), &["a"]);
        assert!(!saved.started);
        let mut job = Job::restore(recipe(), tmp.path().to_path_buf(), saved, &token).unwrap();
        job.await_restored_members(false);
        // Its joined host is not kept (its rank's call for an assignment,
        // made again, is refused as its heartbeat is), and joins are taken
        // at once.
        assert!(job.members.is_empty());
        assert!(job.heartbeat(&members[0].0).is_err());
        assert_eq!(job.join_later(), None);
        job.join("b", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        assert_eq!(job.phase, Phase::Waiting);
        job.join("c", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        assert_eq!((job.generation, job.phase.clone()), (1, Phase::Running));
        job.flush_metrics();
        let text = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
        assert!(text.trim().lines().count() == 1 && text.contains("\"start\""), "{text}");
    }

    #[test]
    fn a_bad_state_file_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(STATE_FILE), "{\"format\": 1, \"job_id\": 3}").unwrap();
        let e = SavedJob::read(tmp.path()).unwrap_err().to_string();
        assert!(e.contains(STATE_FILE) && e.contains("job_id"), "{e}");
    }

    #[test]
    fn a_state_file_of_an_earlier_build_without_restarts_reads_as_0() {
        let tmp = tempfile::tempdir().unwrap();
        let mut job = Job::new(recipe(), tmp.path().to_path_buf(), 1);
        job.state_file = Some(tmp.path().join(STATE_FILE));
        let mut value = serde_json::to_value(SavedJob::of(&job)).unwrap();
        value.as_object_mut().unwrap().remove("restarts").expect("saved");
        std::fs::write(tmp.path().join(STATE_FILE), value.to_string()).unwrap();
        assert_eq!(SavedJob::read(tmp.path()).unwrap().restarts, 0);
    }
}
