//! A rank's reports to the coordinator (rank 0's metrics records and
//! checkpoint commits), sent in order by a task of the rank's runtime, off
//! the training thread: a coordinator that is slow, frozen or cut off for a
//! while neither holds up the training (and, through the collective, every
//! rank) nor loses the reports of that while. Each report is numbered; one
//! whose answer did not come is sent again with its number until the
//! coordinator answers, and the coordinator takes a number once. A report
//! the coordinator refuses (a generation it has left, a record it cannot
//! write) is logged and not sent again. Before its `Leave`, the rank waits,
//! within a deadline, until every report is through ([`Reporter::finish`]).

use rsb_proto::agent_calls::{HEARTBEAT_BACKOFF_MAX, HEARTBEAT_DEADLINE};
use rsb_proto::auth::Credentials;
use rsb_proto::v1 as pb;
use rsb_proto::v1::coordinator_client::CoordinatorClient;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A coordinator client that presents its credentials with every call.
pub type Client = CoordinatorClient<InterceptedService<Channel, Credentials>>;

/// Reports that may wait for the coordinator: at the default
/// `runtime.log_every_steps` (50) far more updates than an agent trains
/// without its coordinator (`--coordinator-deadline-secs`). Past it a
/// report is dropped, counted and logged.
pub const QUEUED_REPORTS: usize = 4096;

/// Deadline of one try of a report: [`HEARTBEAT_DEADLINE`], as an agent's
/// calls.
const TRY_DEADLINE: Duration = HEARTBEAT_DEADLINE;

/// First wait before a report is sent again (it doubles, up to
/// [`HEARTBEAT_BACKOFF_MAX`]).
pub(crate) const FIRST_RETRY: Duration = Duration::from_millis(250);

/// How often [`Reporter::finish`] looks whether the coordinator is gone.
const REFUSED_CHECK: Duration = Duration::from_millis(100);

/// One report to the coordinator.
#[derive(Debug, Clone)]
pub enum Report {
    /// A metrics record (rank 0).
    Metrics(pb::MetricsReport),
    /// A committed checkpoint (rank 0).
    Checkpoint(pb::CheckpointCommit),
}

impl Report {
    fn number(&mut self, sequence: u64) {
        match self {
            Report::Metrics(r) => r.sequence = sequence,
            Report::Checkpoint(c) => c.sequence = sequence,
        }
    }

    /// What it reports, for the log.
    fn what(&self) -> String {
        match self {
            Report::Metrics(r) => match &r.record {
                Some(record) => format!("a {} record", record_kind(record)),
                None => "a metrics record".into(),
            },
            Report::Checkpoint(c) => format!("the checkpoint {}", c.path),
        }
    }

    async fn send(&self, client: &mut Client) -> Result<(), tonic::Status> {
        match self {
            Report::Metrics(r) => client.report_metrics(r.clone()).await.map(drop),
            Report::Checkpoint(c) => client.commit_checkpoint(c.clone()).await.map(drop),
        }
    }
}

fn record_kind(record: &pb::metrics_report::Record) -> &'static str {
    use pb::metrics_report::Record;
    match record {
        Record::Loading(_) => "loading",
        Record::FirstUpdate(_) => "first-update",
        Record::Step(_) => "step",
        Record::Epoch(_) => "epoch",
        Record::Checksum(_) => "checksum",
        Record::GenerationStart(_) => "generation",
        Record::Fabric(_) => "fabric",
    }
}

/// What goes through the queue: a report, or a request to be told once
/// every report before it is through.
enum Queued {
    Report(Report),
    Flush(oneshot::Sender<()>),
}

/// Counts shared by the senders and the task.
#[derive(Default)]
struct Counts {
    /// Reports handed to the queue.
    queued: AtomicU64,
    /// Reports through: taken or refused by the coordinator.
    through: AtomicU64,
    /// Reports dropped because the queue was full.
    dropped: AtomicU64,
    /// Whether the drop of one was logged (once is enough).
    drop_logged: AtomicBool,
    /// Whether the last try found nobody at the coordinator's address
    /// (connection refused: its process is gone), until a try succeeds.
    refused: AtomicBool,
}

/// The task that sends a rank's reports, and its queue.
pub struct Reporter {
    queue: mpsc::Sender<Queued>,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
    runtime: Arc<Runtime>,
}

/// Hands reports to a [`Reporter`]'s queue without waiting (cloned into
/// the trainer's callbacks).
#[derive(Clone)]
pub struct ReportSender {
    queue: mpsc::Sender<Queued>,
    counts: Arc<Counts>,
}

impl ReportSender {
    /// Queues `report`; when [`QUEUED_REPORTS`] wait already, drops it (the
    /// first drop is logged, and [`Reporter::finish`] counts them all).
    pub fn send(&self, report: Report) {
        self.counts.queued.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(Queued::Report(report)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(Queued::Report(report))) => {
                self.counts.dropped.fetch_add(1, Ordering::SeqCst);
                self.counts.through.fetch_add(1, Ordering::SeqCst);
                if !self.counts.drop_logged.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        "{QUEUED_REPORTS} reports wait for the coordinator: {} is dropped, as are \
                         the next ones until it answers (this rank's own ranks/rank-N.jsonl \
                         keeps every record)",
                        report.what()
                    );
                }
            }
            // The task is gone (the runtime is shutting down).
            Err(_) => {
                self.counts.through.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// What [`Reporter::finish`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Finished {
    /// Reports the coordinator did not answer before the deadline.
    pub undelivered: u64,
    /// Reports dropped because too many waited.
    pub dropped: u64,
}

impl Reporter {
    /// Starts the task on `runtime`, sending with `client`.
    pub fn start(runtime: &Arc<Runtime>, client: Client) -> Reporter {
        let (queue, receiver) = mpsc::channel(QUEUED_REPORTS);
        let counts = Arc::new(Counts::default());
        let task = runtime.spawn(deliver(client, receiver, Arc::clone(&counts)));
        Reporter { queue, counts, task, runtime: Arc::clone(runtime) }
    }

    /// A handle that queues reports.
    pub fn sender(&self) -> ReportSender {
        ReportSender { queue: self.queue.clone(), counts: Arc::clone(&self.counts) }
    }

    /// Waits until every report queued so far is through, then stops the
    /// task; logs and returns what did not get through. The wait ends
    /// earlier: at once when the coordinator's address refuses connections
    /// (it is gone; a new one would not take this generation's reports);
    /// `after_stop` after `stopping()` turns true (the rank was told to
    /// stop: its agent gave up on the coordinator, or was stopped); and at
    /// `longest` in any case. A coordinator that does not answer (frozen,
    /// cut off) is otherwise waited for: its agent decides when it is lost.
    pub fn finish(
        self,
        longest: Duration,
        after_stop: Duration,
        stopping: impl Fn() -> bool,
    ) -> Finished {
        let (done, mut flushed) = oneshot::channel();
        let queue = self.queue.clone();
        let counts = Arc::clone(&self.counts);
        let started = tokio::time::Instant::now();
        let through = self.runtime.block_on(async move {
            let mut deadline = started + longest;
            let mut stop_seen = false;
            // Waits for room when the queue is full, within the deadline.
            match tokio::time::timeout_at(deadline, queue.send(Queued::Flush(done))).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
            loop {
                if counts.refused.load(Ordering::SeqCst) {
                    return false;
                }
                if !stop_seen && stopping() {
                    stop_seen = true;
                    deadline = deadline.min(tokio::time::Instant::now() + after_stop);
                }
                let next = deadline.min(tokio::time::Instant::now() + REFUSED_CHECK);
                match tokio::time::timeout_at(next, &mut flushed).await {
                    Ok(answer) => return answer.is_ok(),
                    Err(_) if tokio::time::Instant::now() >= deadline => return false,
                    Err(_) => continue,
                }
            }
        });
        self.task.abort();
        let queued = self.counts.queued.load(Ordering::SeqCst);
        let finished = Finished {
            undelivered: if through {
                0
            } else {
                queued.saturating_sub(self.counts.through.load(Ordering::SeqCst))
            },
            dropped: self.counts.dropped.load(Ordering::SeqCst),
        };
        if finished.undelivered > 0 {
            tracing::warn!(
                "the coordinator did not take {} of this rank's {queued} reports within {:?}; \
                 they are lost to metrics.jsonl (this rank's own ranks/rank-N.jsonl keeps \
                 every record)",
                finished.undelivered,
                started.elapsed()
            );
        }
        if finished.dropped > 0 {
            tracing::warn!(
                "{} of this rank's {queued} reports were dropped while {QUEUED_REPORTS} waited \
                 for the coordinator",
                finished.dropped
            );
        }
        finished
    }
}

/// Sends the queued reports one at a time, in order, numbering them from 1.
async fn deliver(mut client: Client, mut queue: mpsc::Receiver<Queued>, counts: Arc<Counts>) {
    let mut sequence = 0;
    while let Some(queued) = queue.recv().await {
        match queued {
            Queued::Flush(done) => {
                let _ = done.send(());
            }
            Queued::Report(mut report) => {
                sequence += 1;
                report.number(sequence);
                deliver_one(&mut client, &report, &counts.refused).await;
                counts.through.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Sends `report` until the coordinator takes or refuses it; `refused`
/// says whether the last try found its address refusing connections.
async fn deliver_one(client: &mut Client, report: &Report, refused: &AtomicBool) {
    let mut wait = FIRST_RETRY;
    let mut tries = 0u64;
    loop {
        tries += 1;
        let answer = tokio::time::timeout(TRY_DEADLINE, report.send(client)).await;
        refused.store(
            matches!(&answer, Ok(Err(status)) if connection_refused(status)),
            Ordering::SeqCst,
        );
        let failure = match answer {
            Ok(Ok(())) => {
                if tries > 1 {
                    tracing::info!("the coordinator took {} at try {tries}", report.what());
                }
                return;
            }
            Ok(Err(status)) if !worth_another_try(status.code()) => {
                tracing::warn!(
                    "the coordinator refused {} ({}: {}); not sent again",
                    report.what(),
                    status.code(),
                    status.message()
                );
                return;
            }
            Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
            Err(_) => format!("no answer within {TRY_DEADLINE:?}"),
        };
        if tries == 1 {
            tracing::warn!(
                "could not report {} ({failure}); sending it again until the coordinator \
                 answers, while training goes on",
                report.what()
            );
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(HEARTBEAT_BACKOFF_MAX);
    }
}

/// Whether a call failed because nothing listens at the coordinator's
/// address (its process is gone), as the transport's cause says.
fn connection_refused(status: &tonic::Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cause = error.source();
    }
    false
}

/// Whether a report that failed with `code` may be taken if sent again: the
/// coordinator was not reached, did not answer in time, or was busy.
/// Refusals (a stale generation, a bad record, credentials) are final.
pub(crate) fn worth_another_try(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsb_proto::auth::Secret;
    use std::time::Instant;

    fn reporter_to(runtime: &Arc<Runtime>, port: u16) -> Reporter {
        let channel = {
            let _inside = runtime.enter();
            Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy()
        };
        let credentials = Credentials::token(Secret::generate().unwrap());
        Reporter::start(runtime, CoordinatorClient::with_interceptor(channel, credentials))
    }

    fn commit() -> Report {
        Report::Checkpoint(pb::CheckpointCommit {
            job_id: "job".into(),
            generation: 1,
            epoch: 0,
            path: "ckpt".into(),
            updates: 1,
            sequence: 0,
            disk_warning: String::new(),
        })
    }

    #[test]
    fn a_coordinator_that_is_gone_is_not_waited_for_one_that_does_not_answer_is() {
        let runtime = Arc::new(Runtime::new().unwrap());
        // Nothing listens: connections are refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let reporter = reporter_to(&runtime, port);
        reporter.sender().send(commit());
        let started = Instant::now();
        let finished = reporter.finish(Duration::from_secs(20), Duration::from_secs(20), || false);
        assert_eq!(finished, Finished { undelivered: 1, dropped: 0 });
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        // A listener that never answers (a frozen coordinator): waited for,
        // up to the deadline.
        let frozen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let reporter = reporter_to(&runtime, frozen.local_addr().unwrap().port());
        reporter.sender().send(commit());
        let started = Instant::now();
        let finished = reporter.finish(Duration::from_secs(2), Duration::from_secs(20), || false);
        assert_eq!(finished, Finished { undelivered: 1, dropped: 0 });
        assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
        // A stop cuts the wait for one that does not answer to `after_stop`.
        let reporter = reporter_to(&runtime, frozen.local_addr().unwrap().port());
        reporter.sender().send(commit());
        let started = Instant::now();
        let stopped_at = Instant::now() + Duration::from_millis(500);
        let finished = reporter.finish(Duration::from_secs(60), Duration::from_secs(1), || {
            Instant::now() >= stopped_at
        });
        assert_eq!(finished, Finished { undelivered: 1, dropped: 0 });
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(5), "{took:?}");
        // With nothing queued there is nothing to wait for.
        let reporter = reporter_to(&runtime, port);
        let started = Instant::now();
        assert_eq!(
            reporter.finish(Duration::from_secs(20), Duration::ZERO, || true),
            Finished::default()
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
