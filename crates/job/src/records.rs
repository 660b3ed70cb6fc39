//! The metrics records of a run: one typed enum for every line of
//! `metrics.jsonl` (serialized with a `kind` tag, so each line reads
//! `{"kind":"step","epoch":0,...}`), written by every rank into its own file
//! and sent by rank 0 to the coordinator, which writes the job's file.
//!
//! Epochs are 0-based; `step` is always the number of optimizer updates done
//! since the start of the run (resumed invocations included).
//!
//! One kind is written by the coordinator alone: [`MetricsRecord::Generation`],
//! when a job's membership changes and its ranks restart from a checkpoint.
//! The records of the updates lost by such a restart (made after the
//! checkpoint it resumes from) stay in the file before it. One exception:
//! the records rank 0 made while no coordinator ran, of a job it finished
//! then, are taken from its own file by the restarted coordinator as it
//! ends the job ([`not_taken`]), after the generation record of its restart.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsRecord {
    /// The loader of an epoch is starting (sent before its first update).
    Loading {
        /// Epoch.
        epoch: u64,
        /// Updates done before it.
        step: u64,
        /// Wall time since the start of this invocation, in seconds.
        elapsed_s: f64,
    },
    /// The first update of this invocation is done.
    FirstUpdate {
        /// Epoch.
        epoch: u64,
        /// Updates done after it.
        step: u64,
        /// Wall time since the start of this invocation, in seconds.
        elapsed_s: f64,
    },
    /// A log step: the mean over the updates since the previous one.
    Step {
        /// Epoch.
        epoch: u64,
        /// Updates done.
        step: u64,
        /// Learning rate of the last update.
        lr: f64,
        /// Mean training loss of the window (all ranks).
        loss: f64,
        /// Training images per second of the window (all ranks).
        images_per_sec: f64,
        /// Updates of the whole run.
        total_updates: u64,
        /// Updates of the window skipped because their gradient norm was
        /// not finite (counted in `step`, left out of `loss`).
        #[serde(default)]
        skipped_updates: u64,
        /// Peak GPU memory held by tensors during the window on rank 0's
        /// device, in MiB (`torch.cuda.max_memory_allocated`, reset at each
        /// log step); absent on a CPU.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peak_gpu_memory_mib: Option<f64>,
        /// Which rank held the others back during the window, and by how
        /// much; absent in one process, and where the host cannot tell (see
        /// [`RankBalance`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rank_balance: Option<RankBalance>,
        /// Of the window's wall time, the share (0 to 1) that rank 0's host
        /// spent waiting for its loader's micro-batches. A host waiting for
        /// input leaves its device idle once the work it queued is done, so
        /// a share well above 0 means the job is input-bound: more loader
        /// threads or cores help, a faster device does not. Absent in
        /// records written before it was measured.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input_wait_share: Option<f64>,
    },
    /// A finished epoch.
    Epoch {
        /// Epoch.
        epoch: u64,
        /// Updates done.
        step: u64,
        /// Learning rate of the epoch's last update.
        lr: f64,
        /// Mean training loss of the epoch.
        loss: f64,
        /// Training images per second (loading included, evaluation excluded).
        images_per_sec: f64,
        /// Validation top-1 in percent, when evaluated.
        top1: Option<f64>,
        /// Validation top-5 in percent, when evaluated.
        top5: Option<f64>,
        /// Validation mean cross-entropy, when evaluated.
        val_loss: Option<f64>,
        /// Undecodable training images replaced so far.
        replaced_samples: u64,
        /// Wall time since the start of this invocation, in seconds.
        elapsed_s: f64,
        /// The recipe's further evaluation sets by name, when evaluated.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        eval_sets: BTreeMap<String, EvalSetAccuracy>,
        /// Updates of the epoch skipped because their gradient norm was not
        /// finite (counted in `step`, left out of `loss`).
        #[serde(default)]
        skipped_updates: u64,
        /// Validation images left out of `top1`, `top5` and `val_loss`
        /// because they could not be read or decoded, when evaluated (each
        /// is logged once by the rank that met it).
        #[serde(default)]
        val_skipped_images: Option<u64>,
    },
    /// Sum and sum of squares of every parameter after an update (replica checks).
    Checksum {
        /// Rank that computed it.
        rank: u64,
        /// Updates done.
        step: u64,
        /// Sum of every parameter.
        sum: f64,
        /// Sum of the squares of every parameter.
        sum_of_squares: f64,
    },
    /// The fabric as measured at the start of a run (or generation) of two
    /// or more ranks, before its first update (`distributed.fabric_probe_mib`).
    Fabric(FabricProbe),
    /// A generation of the job starts (written by the coordinator): its
    /// ranks, in rank order over the hosts, restart from `resume_from`.
    Generation {
        /// Generation number (1 for the job's start).
        generation: u64,
        /// Member hosts in rank order (join order).
        hosts: Vec<String>,
        /// Ranks in all.
        world_size: u32,
        /// Micro-batches each rank accumulates per update (the global batch
        /// stays the recipe's).
        accumulation: u32,
        /// Checkpoint rank 0 resumes from (none: a fresh start).
        resume_from: Option<String>,
        /// Updates done in that checkpoint (none: a fresh start, or a
        /// checkpoint whose state could not say).
        resume_step: Option<u64>,
        /// Why the generation opened, oldest first.
        reasons: Vec<GenerationReason>,
    },
}

/// Why a job opened a new generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GenerationReason {
    /// The job started (generation 1).
    Start,
    /// A member host was lost and dropped from the job.
    LostHost {
        /// The host.
        host: String,
        /// What happened (missed heartbeats, ...).
        detail: String,
    },
    /// A rank failed; its host stays (its agent is alive) and every rank restarts.
    RankFailed {
        /// Global rank in the generation that failed.
        rank: u32,
        /// Its host.
        host: String,
        /// The failure it reported.
        detail: String,
    },
    /// Data on the link from one rank to another failed its integrity check
    /// (altered, injected or replayed on the network, or sent by a peer of
    /// another job): neither rank failed, and every rank restarts.
    TamperedLink {
        /// Global rank that sent the data.
        from_rank: u32,
        /// Its host.
        from_host: String,
        /// Global rank that found the data failed its check.
        to_rank: u32,
        /// Its host.
        to_host: String,
        /// What that rank reported.
        detail: String,
    },
    /// A host that joined the running job was admitted.
    Admitted {
        /// The host.
        host: String,
    },
    /// A host of an elastic job stands by, pending: with its ranks the
    /// hosts left cannot split the global batch, without them they can
    /// ([`crate::plan::hosts_that_split`]). It is admitted when a later
    /// generation can take it (another host joined).
    StandingBy {
        /// The host.
        host: String,
        /// Why, with the figures.
        detail: String,
    },
    /// The coordinator restarted and continues the job from its state file.
    CoordinatorRestarted,
    /// A sweep's run is tried again (with [`GenerationReason::Start`] of its
    /// new attempt's job): its last attempt failed.
    Retry {
        /// The attempt this is (2 for the first retry).
        attempt: u32,
        /// Why the last attempt failed.
        failure: String,
    },
    /// A reason of a later build (a `kind` this one does not know): read,
    /// so that a record with one is not an error, and shown as unknown.
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for GenerationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GenerationReason::Start => write!(f, "start"),
            GenerationReason::LostHost { host, detail } => write!(f, "lost host {host}: {detail}"),
            GenerationReason::RankFailed { rank, host, detail } => {
                write!(f, "rank {rank} on {host} failed: {detail}")
            }
            GenerationReason::TamperedLink { from_rank, from_host, to_rank, to_host, detail } => {
                write!(
                    f,
                    "the link from rank {from_rank} on {from_host} to rank {to_rank} on \
                     {to_host} carried data that failed its integrity check: {detail}"
                )
            }
            GenerationReason::Admitted { host } => write!(f, "admitted host {host}"),
            GenerationReason::StandingBy { host, detail } => {
                write!(f, "host {host} stands by: {detail}")
            }
            GenerationReason::CoordinatorRestarted => write!(f, "the coordinator restarted"),
            GenerationReason::Retry { attempt, failure } => {
                write!(f, "attempt {attempt}, after: {failure}")
            }
            GenerationReason::Unknown => write!(f, "a reason this build does not know"),
        }
    }
}

/// `, N update(s) skipped (non-finite gradients)` for a record's
/// `skipped_updates` when any were, nothing otherwise: how progress lines say it.
pub fn skipped_updates_note(skipped_updates: u64) -> String {
    if skipped_updates == 0 {
        String::new()
    } else {
        format!(", {skipped_updates} update(s) skipped (non-finite gradients)")
    }
}

/// Shares of a window below which waiting for input is not mentioned.
pub const INPUT_WAIT_NOTED: f64 = 0.05;

/// `, waiting for input N% of the time` for a step record's
/// `input_wait_share` from [`INPUT_WAIT_NOTED`] on, nothing otherwise: how
/// progress lines say that the loader holds the job back.
pub fn input_wait_note(input_wait_share: Option<f64>) -> String {
    match input_wait_share {
        Some(share) if share >= INPUT_WAIT_NOTED => {
            format!(", waiting for input {:.0}% of the time", share.min(1.0) * 100.0)
        }
        _ => String::new(),
    }
}

/// `, evaluation images unreadable and left out: N in val, M in real` for
/// an epoch's validation images and further sets' images that could not be
/// read or decoded, when any were (each is logged once by the rank that met
/// it), nothing otherwise: how progress lines say it.
pub fn skipped_images_note<'a>(
    val_skipped_images: Option<u64>,
    sets: impl IntoIterator<Item = (&'a str, u64)>,
) -> String {
    let mut parts = Vec::new();
    if let Some(n) = val_skipped_images.filter(|n| *n > 0) {
        parts.push(format!("{n} in val"));
    }
    for (name, n) in sets {
        if n > 0 {
            parts.push(format!("{n} in {name}"));
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(", evaluation images unreadable and left out: {}", parts.join(", "))
    }
}

/// Accuracy on one further evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSetAccuracy {
    /// Top-1 in percent.
    pub top1: f64,
    /// Top-5 in percent.
    pub top5: f64,
    /// Images scored.
    pub count: u64,
    /// Images left out (ReaL: no valid label).
    pub excluded: u64,
    /// Images left out because they could not be read or decoded (0 in
    /// records of builds before this field).
    #[serde(default)]
    pub skipped: u64,
}

impl MetricsRecord {
    /// The record's `kind` as written to `metrics.jsonl`.
    pub fn kind(&self) -> &'static str {
        match self {
            MetricsRecord::Loading { .. } => "loading",
            MetricsRecord::FirstUpdate { .. } => "first_update",
            MetricsRecord::Step { .. } => "step",
            MetricsRecord::Epoch { .. } => "epoch",
            MetricsRecord::Checksum { .. } => "checksum",
            MetricsRecord::Fabric(_) => "fabric",
            MetricsRecord::Generation { .. } => "generation",
        }
    }

    /// The epoch the record belongs to (checksums and generations: none; a
    /// fabric probe: the epoch its run starts in).
    pub fn epoch(&self) -> Option<u64> {
        match self {
            MetricsRecord::Loading { epoch, .. }
            | MetricsRecord::FirstUpdate { epoch, .. }
            | MetricsRecord::Step { epoch, .. }
            | MetricsRecord::Epoch { epoch, .. }
            | MetricsRecord::Fabric(FabricProbe { epoch, .. }) => Some(*epoch),
            MetricsRecord::Checksum { .. } | MetricsRecord::Generation { .. } => None,
        }
    }

    /// Updates done when the record was made (a generation: the updates
    /// of the checkpoint it resumes from).
    pub fn step(&self) -> u64 {
        match self {
            MetricsRecord::Loading { step, .. }
            | MetricsRecord::FirstUpdate { step, .. }
            | MetricsRecord::Step { step, .. }
            | MetricsRecord::Epoch { step, .. }
            | MetricsRecord::Checksum { step, .. }
            | MetricsRecord::Fabric(FabricProbe { step, .. }) => *step,
            MetricsRecord::Generation { resume_step, .. } => resume_step.unwrap_or(0),
        }
    }

    /// Whether rank 0 reports the record to its coordinator: every kind
    /// but the ranks' checksums, which stay in their own files, and the
    /// generations, which the coordinator writes itself.
    pub fn reported_by_rank_zero(&self) -> bool {
        !matches!(self, MetricsRecord::Checksum { .. } | MetricsRecord::Generation { .. })
    }
}

/// The records of rank 0's own file (`rank_zero`, in the order written)
/// that the job's file (`taken`) lacks: those rank 0 reported after the
/// last report the job's file holds, found by its value, the newest equal
/// record first (rank 0's file holds every generation's records, as the
/// job's file does), or after all of them when the job's file holds no
/// report yet. Of those, only the last rank 0 process's: where their steps
/// go back (a rank 0 that resumed from a checkpoint), the records before
/// were made by a process whose generation had ended, which its coordinator
/// refused. `None` when rank 0's file does not hold the job's last report
/// (not the same run, or a file cut short): where to go on cannot be told.
pub fn not_taken(
    taken: &[MetricsRecord],
    rank_zero: &[MetricsRecord],
) -> Option<Vec<MetricsRecord>> {
    let after = match taken.iter().rev().find(|r| r.reported_by_rank_zero()) {
        None => 0,
        Some(last) => rank_zero.iter().rposition(|r| r == last)? + 1,
    };
    let reported: Vec<&MetricsRecord> =
        rank_zero[after..].iter().filter(|r| r.reported_by_rank_zero()).collect();
    let last_process =
        reported.windows(2).rposition(|w| w[1].step() < w[0].step()).map_or(0, |i| i + 1);
    Some(reported[last_process..].iter().map(|&r| r.clone()).collect())
}

/// Which rank held the others back in a log step's window (PyTorch DDP
/// waits for its slowest rank at every update and never says which one).
///
/// A rank's *own time* is its updates' wall time less the time it waited,
/// after its backward pass, for the gradient sums: what the other ranks wait
/// for when it is the slowest. Its input is part of it, since a rank starved
/// by its loader holds the job back as much as a slow device does. Known on
/// CPU ranks only: a GPU rank's host does not wait for its own device's
/// backward pass (and NCCL sums on a stream the host does not wait for), so
/// its wait would mix its device's time with its peers'; a GPU job has no
/// balance to report (CUDA events could measure one).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankBalance {
    /// The rank with the longest own time.
    pub slowest_rank: u64,
    /// Its own seconds per update.
    pub slowest_s: f64,
    /// Of those, the seconds per update it waited for its input.
    pub slowest_input_wait_s: f64,
    /// The median own seconds per update of the other ranks.
    pub others_median_s: f64,
}

impl RankBalance {
    /// From each rank's own seconds and input-wait seconds (indexed by
    /// rank) over `updates` updates; `None` with fewer than two ranks, no
    /// update, or a time that is not a finite number of seconds.
    pub fn of_ranks(own_s: &[f64], input_wait_s: &[f64], updates: u64) -> Option<RankBalance> {
        let finite = |v: &[f64]| v.iter().all(|s| s.is_finite() && *s >= 0.0);
        if own_s.len() < 2
            || input_wait_s.len() != own_s.len()
            || updates == 0
            || !finite(own_s)
            || !finite(input_wait_s)
        {
            return None;
        }
        let slowest = (0..own_s.len()).max_by(|&a, &b| own_s[a].total_cmp(&own_s[b]))?;
        let median = median_without(own_s, slowest);
        let per_update = updates as f64;
        Some(RankBalance {
            slowest_rank: slowest as u64,
            slowest_s: own_s[slowest] / per_update,
            slowest_input_wait_s: input_wait_s[slowest] / per_update,
            others_median_s: median / per_update,
        })
    }

    /// How many times the other ranks' median own time the slowest rank's
    /// is (1 when neither took any time).
    pub fn ratio(&self) -> f64 {
        times(self.slowest_s, self.others_median_s)
    }

    /// Whether the slowest rank straggles: took at least `warn_ratio` times
    /// the others' median (`distributed.straggler_warn_ratio`).
    pub fn straggles(&self, warn_ratio: f64) -> bool {
        self.ratio() >= warn_ratio
    }

    /// `rank 1 on HOST took 2.0x the other ranks' median time per update
    /// (0.840 s against 0.420 s, 0.100 s of it waiting for its input)`,
    /// naming the rank's host where it is known.
    pub fn describe(&self, host: Option<&str>) -> String {
        let on_host = host.map_or_else(String::new, |h| format!(" on {h}"));
        format!(
            "rank {}{on_host} took {:.1}x the other ranks' median time per update ({:.3} s \
             against {:.3} s, {:.3} s of it waiting for its input)",
            self.slowest_rank,
            self.ratio(),
            self.slowest_s,
            self.others_median_s,
            self.slowest_input_wait_s
        )
    }
}

impl std::fmt::Display for RankBalance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe(None))
    }
}

/// How many times `base` `value` is: infinite over a base of 0, and 1 when
/// both are 0.
fn times(value: f64, base: f64) -> f64 {
    if base > 0.0 {
        value / base
    } else if value > 0.0 {
        f64::INFINITY
    } else {
        1.0
    }
}

/// The median of `values` without the one at `left_out` (at least two values).
fn median_without(values: &[f64], left_out: usize) -> f64 {
    let mut others: Vec<f64> =
        values.iter().enumerate().filter(|&(i, _)| i != left_out).map(|(_, &v)| v).collect();
    others.sort_by(f64::total_cmp);
    let middle = others.len() / 2;
    if others.len() % 2 == 1 {
        others[middle]
    } else {
        (others[middle - 1] + others[middle]) / 2.0
    }
}

/// What the fabric delivered at the start of a run of two or more ranks:
/// an all-reduce of `probe_bytes` through the gradients' own path (the
/// training device, staging and backend), and, where the backend has links
/// of its own (the TCP ring), each link's rate with every link busy at once.
/// A fabric that under-delivers (a misconfigured NIC, a congested switch
/// port, a host on a slower network) costs every update of the run; this
/// says so before the first, and names the link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FabricProbe {
    /// The epoch the run starts in.
    pub epoch: u64,
    /// Updates done before it.
    pub step: u64,
    /// Ranks in all.
    pub world_size: u32,
    /// Bytes of the all-reduce, and of each link's stream.
    pub probe_bytes: u64,
    /// Wall time of the all-reduce on its slowest rank, in seconds (the
    /// mean of a few, after a warm-up; through the gradients' path, so a
    /// bucket's copies in and out are included).
    pub all_reduce_s: f64,
    /// Its bus bandwidth in GB/s: `probe_bytes / all_reduce_s x 2 (N-1) / N`
    /// (nccl-tests' formula, the rate each link carried; over a time that
    /// includes the copies, so somewhat below `all_reduce_perf`'s figure).
    pub bus_gb_per_s: f64,
    /// The rate of every link, where the backend has links of its own (one
    /// per rank in a ring); empty otherwise (NCCL picks its own paths).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkSpeed>,
}

/// The measured rate of one link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkSpeed {
    /// The rank at the sending end.
    pub from_rank: u64,
    /// The rank at the receiving end.
    pub to_rank: u64,
    /// GB/s (10^9 bytes per second) that arrived.
    pub gb_per_s: f64,
}

/// The slowest link of a probe, against the others.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowLink {
    /// The link.
    pub link: LinkSpeed,
    /// The median rate of the other links, in GB/s.
    pub others_median_gb_per_s: f64,
}

impl FabricProbe {
    /// nccl-tests' bus bandwidth, in GB/s, of an all-reduce of `bytes` over
    /// `world_size` ranks that took `seconds` (0 for a world of one, or a
    /// time that is not a positive number of seconds).
    pub fn bus_bandwidth(bytes: u64, seconds: f64, world_size: u32) -> f64 {
        if world_size < 2 || !seconds.is_finite() || seconds <= 0.0 {
            return 0.0;
        }
        let n = f64::from(world_size);
        bytes as f64 / seconds * 2.0 * (n - 1.0) / n / 1e9
    }

    /// The slowest link and the median of the others; `None` with fewer
    /// than two links or a rate that is not a finite, non-negative number.
    pub fn slowest_link(&self) -> Option<SlowLink> {
        let rates: Vec<f64> = self.links.iter().map(|l| l.gb_per_s).collect();
        if rates.len() < 2 || !rates.iter().all(|r| r.is_finite() && *r >= 0.0) {
            return None;
        }
        let slowest = (0..rates.len()).min_by(|&a, &b| rates[a].total_cmp(&rates[b]))?;
        Some(SlowLink {
            link: self.links[slowest],
            others_median_gb_per_s: median_without(&rates, slowest),
        })
    }

    /// Whether the bus bandwidth fell short of `expected_gb_per_s`
    /// (`distributed.expected_bus_gb_per_s`, when set).
    pub fn below(&self, expected_gb_per_s: Option<f64>) -> bool {
        expected_gb_per_s.is_some_and(|e| self.bus_gb_per_s < e)
    }

    /// What a person should hear of the probe beyond its [`summary`]: the
    /// slowest link, when it carried `slow_link_warn_ratio` times less than
    /// the other links' median, and the shortfall, when the bus bandwidth is
    /// below `expected_gb_per_s`. `host_of` names a rank's host where known.
    ///
    /// [`summary`]: FabricProbe::summary
    pub fn warnings<'h>(
        &self,
        slow_link_warn_ratio: f64,
        expected_gb_per_s: Option<f64>,
        host_of: impl Fn(u64) -> Option<&'h str>,
    ) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(slow) = self.slowest_link().filter(|s| s.is_slow(slow_link_warn_ratio)) {
            warnings.push(format!(
                "slow link: {}; every all-reduce runs at its pace \
                 (distributed.slow_link_warn_ratio {slow_link_warn_ratio})",
                slow.describe(host_of(slow.link.from_rank), host_of(slow.link.to_rank))
            ));
        }
        if let Some(expected) = expected_gb_per_s.filter(|_| self.below(expected_gb_per_s)) {
            warnings.push(format!(
                "the fabric under-delivers: bus bandwidth {}, below the expected {} \
                 (distributed.expected_bus_gb_per_s)",
                gb_per_s(self.bus_gb_per_s),
                gb_per_s(expected)
            ));
        }
        warnings
    }

    /// `all-reduce of 25.0 MiB over 3 ranks in 40.1 ms: bus bandwidth 0.837
    /// GB/s; links 0.950 GB/s to 1.10 GB/s`.
    pub fn summary(&self) -> String {
        let mut text = format!(
            "all-reduce of {:.1} MiB over {} ranks in {:.1} ms: bus bandwidth {}",
            self.probe_bytes as f64 / (1024.0 * 1024.0),
            self.world_size,
            self.all_reduce_s * 1e3,
            gb_per_s(self.bus_gb_per_s)
        );
        let rates = self.links.iter().map(|l| l.gb_per_s);
        if let (Some(low), Some(high)) =
            (rates.clone().min_by(f64::total_cmp), rates.max_by(f64::total_cmp))
        {
            text += &format!("; links {} to {}", gb_per_s(low), gb_per_s(high));
        }
        text
    }
}

/// A rate in GB/s with three significant digits (`0.00512 GB/s`, `2.04 GB/s`).
fn gb_per_s(rate: f64) -> String {
    let decimals = if rate > 0.0 { (2 - rate.log10().floor() as i64).clamp(0, 6) } else { 2 };
    format!("{rate:.*} GB/s", decimals as usize)
}

impl SlowLink {
    /// How many times slower than the others' median the link is (1 when
    /// every link carried nothing).
    pub fn ratio(&self) -> f64 {
        times(self.others_median_gb_per_s, self.link.gb_per_s)
    }

    /// Whether it is at least `warn_ratio` times slower than the others'
    /// median (`distributed.slow_link_warn_ratio`).
    pub fn is_slow(&self, warn_ratio: f64) -> bool {
        self.ratio() >= warn_ratio
    }

    /// `the link from rank 1 on b to rank 2 on c carried 0.00512 GB/s, 1/199
    /// of the other links' median 1.02 GB/s`, naming the hosts where known.
    pub fn describe(&self, from_host: Option<&str>, to_host: Option<&str>) -> String {
        let on = |host: Option<&str>| host.map_or_else(String::new, |h| format!(" on {h}"));
        format!(
            "the link from rank {}{} to rank {}{} carried {}, 1/{:.1} of the other links' \
             median {}",
            self.link.from_rank,
            on(from_host),
            self.link.to_rank,
            on(to_host),
            gb_per_s(self.link.gb_per_s),
            self.ratio(),
            gb_per_s(self.others_median_gb_per_s)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_records_a_job_did_not_take_are_those_rank_zero_reported_after_its_last() {
        let step = |step: u64, loss: f64| MetricsRecord::Step {
            epoch: step / 10,
            step,
            lr: 0.1,
            loss,
            images_per_sec: 100.0,
            total_updates: 40,
            skipped_updates: 0,
            peak_gpu_memory_mib: None,
            rank_balance: None,
            input_wait_share: None,
        };
        let checksum =
            |step: u64| MetricsRecord::Checksum { rank: 0, step, sum: 1.0, sum_of_squares: 2.0 };
        let generation = |generation: u64, resume_step: Option<u64>| MetricsRecord::Generation {
            generation,
            hosts: vec!["a".into()],
            world_size: 1,
            accumulation: 1,
            resume_from: None,
            resume_step,
            reasons: vec![GenerationReason::CoordinatorRestarted],
        };
        // Rank 0 trained updates 5 to 8, restarted from update 6 (its
        // records of 7 and 8 made again, with other values), and went on to 10.
        let rank_zero = [
            step(5, 1.0),
            checksum(5),
            step(6, 0.9),
            step(7, 0.8),
            step(8, 0.7),
            step(7, 0.85),
            step(8, 0.75),
            checksum(8),
            step(9, 0.6),
            step(10, 0.5),
        ];
        // The job took the first 8 of the new generation, then restarted itself.
        let taken = [
            step(5, 1.0),
            step(6, 0.9),
            step(7, 0.8),
            step(8, 0.7),
            generation(2, Some(6)),
            step(7, 0.85),
            step(8, 0.75),
            generation(3, None),
        ];
        assert_eq!(not_taken(&taken, &rank_zero), Some(vec![step(9, 0.6), step(10, 0.5)]));
        // Taken up to the first generation's update 8: the second's records
        // follow, its own 7 and 8 among them; checksums never.
        assert_eq!(
            not_taken(&taken[..4], &rank_zero),
            Some(vec![step(7, 0.85), step(8, 0.75), step(9, 0.6), step(10, 0.5)])
        );
        assert_eq!(not_taken(&taken[..4], &rank_zero[..5]), Some(vec![]));
        // A record made again with the same values (a restart from update
        // 5): the newest is the one taken last.
        let again = [step(5, 1.0), step(6, 0.9), step(7, 0.8), step(6, 0.9), step(7, 0.75)];
        let taken_again =
            [step(5, 1.0), step(6, 0.9), step(7, 0.8), generation(2, Some(5)), step(6, 0.9)];
        assert_eq!(not_taken(&taken_again, &again), Some(vec![step(7, 0.75)]));
        // The job took update 6 of a rank 0 whose generation then ended;
        // it made 7 and 8 (refused), and the next generation's rank 0,
        // resumed from update 5, made 6 and 7: only the latter are taken.
        let stale =
            [step(5, 1.0), step(6, 0.9), step(7, 0.8), step(8, 0.7), step(6, 0.95), step(7, 0.85)];
        assert_eq!(not_taken(&stale[..2], &stale), Some(vec![step(6, 0.95), step(7, 0.85)]));
        // Nothing taken but generations: all of the last rank 0 process's
        // reports (its steps never go back).
        let last_process = vec![step(7, 0.85), step(8, 0.75), step(9, 0.6), step(10, 0.5)];
        assert_eq!(not_taken(&[generation(1, None)], &rank_zero), Some(last_process.clone()));
        assert_eq!(not_taken(&[], &rank_zero), Some(last_process));
        assert_eq!(
            not_taken(&[], &rank_zero[..5]),
            Some(vec![step(5, 1.0), step(6, 0.9), step(7, 0.8), step(8, 0.7)])
        );
        // A last report rank 0's file does not hold (another run's, or the
        // file cut short): nothing is guessed.
        assert_eq!(not_taken(&taken, &rank_zero[..6]), None);
        assert_eq!(not_taken(&[step(8, 0.7001)], &rank_zero), None);
        assert!(
            !checksum(1).reported_by_rank_zero() && !generation(1, None).reported_by_rank_zero()
        );
    }

    #[test]
    fn the_balance_names_the_slowest_rank_against_the_others_median() {
        // Seconds over 4 updates; rank 2 is the slowest.
        let own = [4.0, 3.2, 9.6, 4.8];
        let input = [0.4, 0.0, 2.0, 0.0];
        let b = RankBalance::of_ranks(&own, &input, 4).unwrap();
        assert_eq!(b.slowest_rank, 2);
        assert_eq!(b.slowest_s, 2.4);
        assert_eq!(b.slowest_input_wait_s, 0.5);
        assert_eq!(b.others_median_s, 1.0, "the median of 3.2, 4.0 and 4.8, per update");
        assert!((b.ratio() - 2.4).abs() < 1e-12);
        assert!(b.straggles(1.5) && !b.straggles(2.5));
        assert!(b.to_string().starts_with("rank 2 took 2.4x"), "{b}");
        let named = b.describe(Some("node-c"));
        assert!(named.starts_with("rank 2 on node-c took 2.4x the other ranks' median"), "{named}");
        assert!(named.ends_with("(2.400 s against 1.000 s, 0.500 s of it waiting for its input)"));
        // Two ranks: the other rank is the median; an even count of others
        // takes the mean of the middle two.
        let b = RankBalance::of_ranks(&[1.0, 3.0], &[0.0, 0.0], 1).unwrap();
        assert_eq!((b.slowest_rank, b.others_median_s), (1, 1.0));
        let b = RankBalance::of_ranks(&[1.0, 2.0, 6.0], &[0.0; 3], 1).unwrap();
        assert_eq!(b.others_median_s, 1.5);
        // Nothing to compare, or nothing to trust.
        assert_eq!(RankBalance::of_ranks(&[1.0], &[0.0], 1), None);
        assert_eq!(RankBalance::of_ranks(&[1.0, 2.0], &[0.0, 0.0], 0), None);
        assert_eq!(RankBalance::of_ranks(&[1.0, f64::NAN], &[0.0, 0.0], 1), None);
        assert_eq!(RankBalance::of_ranks(&[1.0, 2.0], &[0.0], 1), None);
        let idle = RankBalance::of_ranks(&[0.0, 0.0], &[0.0, 0.0], 1).unwrap();
        assert_eq!(idle.ratio(), 1.0);
        assert!(!idle.straggles(1.5));
    }

    fn keys(record: &MetricsRecord) -> Vec<String> {
        let value = serde_json::to_value(record).unwrap();
        let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    #[test]
    fn step_and_epoch_lines_keep_their_field_names() {
        // The names tests and bench/*.py read from metrics.jsonl.
        let step = MetricsRecord::Step {
            epoch: 1,
            step: 20,
            lr: 1e-3,
            loss: 0.5,
            images_per_sec: 100.0,
            total_updates: 80,
            skipped_updates: 0,
            peak_gpu_memory_mib: None,
            rank_balance: None,
            input_wait_share: None,
        };
        assert_eq!(
            keys(&step),
            [
                "epoch",
                "images_per_sec",
                "kind",
                "loss",
                "lr",
                "skipped_updates",
                "step",
                "total_updates"
            ]
        );
        assert_eq!(serde_json::to_value(&step).unwrap()["kind"], "step");
        let mut epoch = MetricsRecord::Epoch {
            epoch: 0,
            step: 40,
            lr: 1e-3,
            loss: 0.5,
            images_per_sec: 100.0,
            top1: None,
            top5: None,
            val_loss: None,
            replaced_samples: 0,
            elapsed_s: 3.0,
            eval_sets: BTreeMap::new(),
            skipped_updates: 2,
            val_skipped_images: None,
        };
        let value = serde_json::to_value(&epoch).unwrap();
        assert_eq!(value["top1"], Value::Null, "not evaluated is written as null");
        assert!(value.get("eval_sets").is_none(), "no sets, no eval_sets key");
        if let MetricsRecord::Epoch { eval_sets, top1, val_skipped_images, .. } = &mut epoch {
            *top1 = Some(87.5);
            *val_skipped_images = Some(1);
            eval_sets.insert(
                "real".into(),
                EvalSetAccuracy { top1: 90.0, top5: 99.0, count: 10, excluded: 2, skipped: 3 },
            );
        }
        let value = serde_json::to_value(&epoch).unwrap();
        assert_eq!(value["top1"], 87.5);
        assert_eq!(value["eval_sets"]["real"]["excluded"], 2);
        assert_eq!(value["eval_sets"]["real"]["skipped"], 3);
        assert_eq!(value["val_skipped_images"], 1);
        // A record of an earlier build, without the skipped images, reads
        // as none skipped.
        let mut earlier = value.clone();
        earlier.as_object_mut().unwrap().remove("val_skipped_images");
        earlier["eval_sets"]["real"].as_object_mut().unwrap().remove("skipped");
        match serde_json::from_value::<MetricsRecord>(earlier).unwrap() {
            MetricsRecord::Epoch { val_skipped_images, eval_sets, .. } => {
                assert_eq!(val_skipped_images, None);
                assert_eq!(eval_sets["real"].skipped, 0);
            }
            other => panic!("read as {other:?}"),
        }
        assert_eq!(
            skipped_images_note(Some(1), [("real", 3), ("v2", 0)]),
            ", evaluation images unreadable and left out: 1 in val, 3 in real"
        );
        assert_eq!(skipped_images_note(Some(0), [("real", 0)]), "");
        assert_eq!(skipped_images_note(None, []), "");
        assert_eq!(value["kind"], "epoch");
        assert_eq!(value["skipped_updates"], 2);
    }

    #[test]
    fn a_gpu_step_line_carries_its_peak_memory_and_a_cpu_line_does_not() {
        let cpu = MetricsRecord::Step {
            epoch: 0,
            step: 1,
            lr: 1e-3,
            loss: 0.5,
            images_per_sec: 10.0,
            total_updates: 2,
            skipped_updates: 0,
            peak_gpu_memory_mib: None,
            rank_balance: None,
            input_wait_share: None,
        };
        let line = serde_json::to_string(&cpu).unwrap();
        assert!(!line.contains("peak_gpu_memory_mib"), "{line}");
        let mut gpu = cpu;
        if let MetricsRecord::Step { peak_gpu_memory_mib, .. } = &mut gpu {
            *peak_gpu_memory_mib = Some(1536.5);
        }
        let line = serde_json::to_string(&gpu).unwrap();
        assert!(line.contains("\"peak_gpu_memory_mib\":1536.5"), "{line}");
        assert_eq!(serde_json::from_str::<MetricsRecord>(&line).unwrap(), gpu);
    }
    #[test]
    fn a_step_line_carries_its_rank_balance_when_known() {
        let balance = RankBalance::of_ranks(&[1.0, 2.5], &[0.0, 0.5], 5).unwrap();
        let record = MetricsRecord::Step {
            epoch: 0,
            step: 5,
            lr: 1e-3,
            loss: 0.5,
            images_per_sec: 10.0,
            total_updates: 10,
            skipped_updates: 0,
            peak_gpu_memory_mib: None,
            rank_balance: Some(balance),
            input_wait_share: Some(0.25),
        };
        let value = serde_json::to_value(&record).unwrap();
        assert_eq!(value["rank_balance"]["slowest_rank"], 1);
        assert_eq!(value["rank_balance"]["slowest_s"], 0.5);
        assert_eq!(value["rank_balance"]["slowest_input_wait_s"], 0.1);
        assert_eq!(value["rank_balance"]["others_median_s"], 0.2);
        assert_eq!(value["input_wait_share"], 0.25);
        let back: MetricsRecord = serde_json::from_str(&value.to_string()).unwrap();
        assert_eq!(back, record);
    }

    #[test]
    fn waiting_for_input_is_said_from_five_percent_of_a_window() {
        assert_eq!(input_wait_note(Some(0.37)), ", waiting for input 37% of the time");
        assert_eq!(input_wait_note(Some(INPUT_WAIT_NOTED)), ", waiting for input 5% of the time");
        assert_eq!(input_wait_note(Some(0.049)), "");
        assert_eq!(input_wait_note(Some(5.0)), ", waiting for input 100% of the time");
        assert_eq!(input_wait_note(None), "");
    }

    #[test]
    fn lines_written_before_skipped_updates_still_read() {
        let old = r#"{"kind":"step","epoch":0,"step":3,"lr":0.1,"loss":2.0,"images_per_sec":5.0,"total_updates":9}"#;
        let record: MetricsRecord = serde_json::from_str(old).unwrap();
        assert!(matches!(record, MetricsRecord::Step { skipped_updates: 0, .. }), "{record:?}");
    }

    #[test]
    fn every_kind_round_trips_through_json() {
        let records = [
            MetricsRecord::Loading { epoch: 2, step: 10, elapsed_s: 0.5 },
            MetricsRecord::FirstUpdate { epoch: 0, step: 1, elapsed_s: 4.0 },
            MetricsRecord::Checksum { rank: 1, step: 3, sum: -2.0, sum_of_squares: 9.0 },
        ];
        let kinds: Vec<&str> = records.iter().map(MetricsRecord::kind).collect();
        assert_eq!(kinds, ["loading", "first_update", "checksum"]);
        for record in records {
            let line = serde_json::to_string(&record).unwrap();
            let value: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(value["kind"], record.kind(), "{line}");
            let back: MetricsRecord = serde_json::from_str(&line).unwrap();
            assert_eq!(back, record);
        }
    }

    fn probe(rates: &[f64]) -> FabricProbe {
        let n = rates.len();
        FabricProbe {
            epoch: 1,
            step: 40,
            world_size: n as u32,
            probe_bytes: 25 << 20,
            all_reduce_s: 0.05,
            bus_gb_per_s: FabricProbe::bus_bandwidth(25 << 20, 0.05, n as u32),
            links: (0..n)
                .map(|r| LinkSpeed {
                    from_rank: ((r + n - 1) % n) as u64,
                    to_rank: r as u64,
                    gb_per_s: rates[r],
                })
                .collect(),
        }
    }

    #[test]
    fn a_fabric_probe_names_its_slowest_link_against_the_others_median() {
        // nccl-tests: 2 (N-1)/N of the bytes over the time, here 4/3.
        let p = probe(&[1.0, 0.01, 1.2, 0.8]);
        assert!((p.bus_gb_per_s - (25u64 << 20) as f64 / 0.05 * 1.5 / 1e9).abs() < 1e-12);
        assert_eq!(FabricProbe::bus_bandwidth(100, 1.0, 1), 0.0);
        assert_eq!(FabricProbe::bus_bandwidth(100, 0.0, 2), 0.0);
        assert_eq!(FabricProbe::bus_bandwidth(100, f64::NAN, 2), 0.0);
        let slow = p.slowest_link().unwrap();
        assert_eq!((slow.link.from_rank, slow.link.to_rank), (0, 1));
        assert_eq!(slow.others_median_gb_per_s, 1.0);
        assert!((slow.ratio() - 100.0).abs() < 1e-9);
        assert!(slow.is_slow(3.0) && !slow.is_slow(101.0));
        assert_eq!(
            slow.describe(Some("a"), Some("b")),
            "the link from rank 0 on a to rank 1 on b carried 0.0100 GB/s, 1/100.0 of the \
             other links' median 1.00 GB/s"
        );
        // Two links: the other one is the median; equal links are not slow.
        let even = probe(&[2.0, 2.0]).slowest_link().unwrap();
        assert_eq!(even.ratio(), 1.0);
        assert!(!even.is_slow(1.05));
        // Nothing to compare: one link, none, a rate that is not a number.
        assert_eq!(probe(&[1.0]).slowest_link(), None);
        assert_eq!(FabricProbe { links: vec![], ..probe(&[1.0, 2.0]) }.slowest_link(), None);
        assert_eq!(probe(&[1.0, f64::NAN]).slowest_link(), None);
        assert!(p.below(Some(400.0)) && !p.below(Some(0.5)) && !p.below(None));
        let hosts = ["a", "b", "c", "d"];
        let host_of = |rank: u64| hosts.get(rank as usize).copied();
        assert_eq!(
            p.warnings(3.0, Some(400.0), host_of),
            [
                format!(
                    "slow link: {}; every all-reduce runs at its pace \
                     (distributed.slow_link_warn_ratio 3)",
                    slow.describe(Some("a"), Some("b"))
                ),
                format!(
                    "the fabric under-delivers: bus bandwidth {:.3} GB/s, below the expected \
                     400 GB/s (distributed.expected_bus_gb_per_s)",
                    p.bus_gb_per_s
                )
            ]
        );
        assert!(p.warnings(101.0, Some(0.5), host_of).is_empty());
        assert!(p.warnings(101.0, None, host_of).is_empty());
        assert_eq!(
            p.summary(),
            format!(
                "all-reduce of 25.0 MiB over 4 ranks in 50.0 ms: bus bandwidth {:.3} GB/s; \
                 links 0.0100 GB/s to 1.20 GB/s",
                p.bus_gb_per_s
            )
        );
        let line = serde_json::to_string(&MetricsRecord::Fabric(p.clone())).unwrap();
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["kind"], "fabric");
        assert_eq!(value["links"][1]["gb_per_s"], 0.01);
        let back: MetricsRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, MetricsRecord::Fabric(p));
        assert_eq!((back.epoch(), back.step(), back.kind()), (Some(1), 40, "fabric"));
        // NCCL's probe has no links: none are written.
        let nccl = FabricProbe { links: vec![], ..probe(&[1.0, 1.0]) };
        let line = serde_json::to_string(&MetricsRecord::Fabric(nccl)).unwrap();
        assert!(!line.contains("links"), "{line}");
    }

    #[test]
    fn a_generation_line_names_its_reasons() {
        let record = MetricsRecord::Generation {
            generation: 2,
            hosts: vec!["a".into(), "b".into()],
            world_size: 2,
            accumulation: 3,
            resume_from: Some("/run/checkpoints/epoch-0002".into()),
            resume_step: Some(10),
            reasons: vec![GenerationReason::LostHost { host: "c".into(), detail: "silent".into() }],
        };
        let value = serde_json::to_value(&record).unwrap();
        assert_eq!(value["kind"], "generation");
        assert_eq!(value["world_size"], 2);
        assert_eq!(value["reasons"][0]["kind"], "lost_host");
        assert_eq!(value["reasons"][0]["host"], "c");
        assert_eq!(record.step(), 10);
        let back: MetricsRecord = serde_json::from_str(&value.to_string()).unwrap();
        assert_eq!(back, record);
        let reason = GenerationReason::RankFailed { rank: 1, host: "b".into(), detail: "x".into() };
        assert_eq!(reason.to_string(), "rank 1 on b failed: x");
    }

    #[test]
    fn an_unknown_kind_is_refused() {
        let err = serde_json::from_str::<MetricsRecord>(r#"{"kind":"nope","epoch":1}"#);
        assert!(err.unwrap_err().to_string().contains("nope"));
    }
}
