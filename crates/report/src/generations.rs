//! Whether a run trained in one go: its generations, read from the
//! `generation` records ([`MetricsRecord::Generation`]) that the coordinator
//! writes into a run's `metrics.jsonl` each time its job starts one: at the
//! start, after a lost host, a failed rank (every rank restarts from the
//! newest checkpoint), an admitted host (elastic growth) or a coordinator
//! restart, and at the start of each new attempt of a sweep run retried
//! after a failure.
//!
//! A restart matters to a seed study: a resume draws no data again, but a
//! change of world size maps the data streams onto other ranks, and the
//! updates made after the checkpoint a generation resumes from are trained
//! again. So each run's generations are counted, each one after the first
//! is described in one line (its reasons, ranks, and where it resumed from),
//! and a run whose world size changed is flagged.
//!
//! A run without generation records (one `worker train` process) trained in
//! one generation, with no reason recorded.

use rsb_job::{GenerationReason, MetricsRecord};
use std::path::Path;

/// One generation of a run, as its record says.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Its number in its attempt's job (1: the job's start).
    pub number: u64,
    /// Ranks in all.
    pub world_size: u32,
    /// Member hosts, in rank order.
    pub hosts: Vec<String>,
    /// Checkpoint it resumed from (none: a fresh start).
    pub resume_from: Option<String>,
    /// Updates done in that checkpoint, when the record says (a record of
    /// a build before the retries recorded it does not).
    pub resume_step: Option<u64>,
    /// Why it opened, oldest first.
    pub reasons: Vec<GenerationReason>,
    /// Updates recorded before it opened that it trains again (the run had
    /// got further than the checkpoint it resumes from); `None` where it
    /// cannot be told (no record before it, or a resume step not recorded).
    pub trained_again: Option<u64>,
}

impl Generation {
    /// Where the generation starts training: `Some(0)` from scratch, the
    /// checkpoint's updates where recorded, `None` where not.
    fn resume_point(&self) -> Option<u64> {
        match (&self.resume_from, self.resume_step) {
            (_, Some(step)) => Some(step),
            (None, None) => Some(0),
            (Some(_), None) => None,
        }
    }

    /// Whether it opens a new attempt of the run (its job's start) rather
    /// than restarting the ranks of a running job.
    pub fn starts_an_attempt(&self) -> bool {
        self.reasons.contains(&GenerationReason::Start)
    }

    /// One line: `lost host h2: missed heartbeats; 1 rank(s), resumed from
    /// update 20 (10 recorded update(s) trained again)`.
    pub fn describe(&self) -> String {
        let mut why: Vec<String> =
            self.reasons.iter().map(|r| one_line(&r.to_string(), REASON_CHARS)).collect();
        if why.is_empty() {
            why.push("no reason recorded".into());
        }
        let attempt = if self.starts_an_attempt() { "new attempt: " } else { "" };
        let from = match (&self.resume_from, self.resume_step) {
            (_, Some(step)) => format!("resumed from update {step}"),
            (Some(path), None) => format!("resumed from checkpoint `{}`", checkpoint_name(path)),
            (None, None) => "from scratch".to_string(),
        };
        let again = match self.trained_again {
            Some(n) if n > 0 => format!(" ({n} recorded update(s) trained again)"),
            _ => String::new(),
        };
        format!("{attempt}{}; {} rank(s), {from}{again}", why.join("; "), self.world_size)
    }
}

/// The characters of a reason a line shows (a rank's failure may carry a
/// whole traceback).
pub const REASON_CHARS: usize = 200;

/// `text` on one line (every run of whitespace, newlines included, one
/// space), cut to `max` characters with `…`.
fn one_line(text: &str, max: usize) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let joined = words.join(" ");
    match joined.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &joined[..cut]),
        None => joined,
    }
}

/// A checkpoint as a line names it: its folder's name (`epoch-0002`), or
/// the whole path when it has none.
fn checkpoint_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map_or_else(|| path.to_string(), |name| name.to_string_lossy().into_owned())
}

/// The generations of a run, in the order of its records.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Generations {
    /// One per generation record; empty for a run without any (one
    /// generation, nothing recorded about it).
    pub recorded: Vec<Generation>,
}

impl Generations {
    /// The generations of a run's records (in file order). The updates a
    /// generation trains again are those recorded since the generation
    /// before it (or its resume point, if further) past its own resume point.
    pub fn of_records(records: &[MetricsRecord]) -> Generations {
        let mut recorded: Vec<Generation> = Vec::new();
        // The furthest update recorded since the last generation record.
        let mut reached: Option<u64> = None;
        for record in records {
            let MetricsRecord::Generation {
                generation,
                hosts,
                world_size,
                resume_from,
                resume_step,
                reasons,
                ..
            } = record
            else {
                reached = Some(reached.map_or(record.step(), |r| r.max(record.step())));
                continue;
            };
            let before = match (reached, recorded.last().and_then(Generation::resume_point)) {
                (Some(r), Some(p)) => Some(r.max(p)),
                (r, p) => r.or(p),
            };
            let mut next = Generation {
                number: *generation,
                world_size: *world_size,
                hosts: hosts.clone(),
                resume_from: resume_from.clone(),
                resume_step: *resume_step,
                reasons: reasons.clone(),
                trained_again: None,
            };
            next.trained_again = before.zip(next.resume_point()).map(|(b, p)| b.saturating_sub(p));
            recorded.push(next);
            reached = None;
        }
        Generations { recorded }
    }

    /// Generations trained: at least 1.
    pub fn count(&self) -> usize {
        self.recorded.len().max(1)
    }

    /// Generations after the first.
    pub fn restarts(&self) -> usize {
        self.count() - 1
    }

    /// The generations after the first, each with its 1-based position
    /// among the run's generations.
    pub fn after_first(&self) -> impl Iterator<Item = (usize, &Generation)> {
        self.recorded.iter().enumerate().skip(1).map(|(i, g)| (i + 1, g))
    }

    /// The world size of each recorded generation.
    pub fn world_sizes(&self) -> Vec<u32> {
        self.recorded.iter().map(|g| g.world_size).collect()
    }

    /// Whether the world size differs between generations (the data
    /// streams were mapped onto other ranks).
    pub fn world_size_changed(&self) -> bool {
        self.recorded.windows(2).any(|w| w[0].world_size != w[1].world_size)
    }

    /// The world sizes joined by ` → ` (`2 → 1 → 2`); `—` when none is recorded.
    pub fn world_sizes_text(&self) -> String {
        if self.recorded.is_empty() {
            return "—".into();
        }
        self.world_sizes().iter().map(u32::to_string).collect::<Vec<_>>().join(" → ")
    }

    /// `3 generations, world size changed (2 → 1 → 2)`: the head of a
    /// restarted run's entry in the report.
    pub fn summary(&self) -> String {
        let mut out = format!("{} generations", self.count());
        if self.world_size_changed() {
            out += &format!(", world size changed ({})", self.world_sizes_text());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(
        number: u64,
        world_size: u32,
        resume_step: Option<u64>,
        reasons: Vec<GenerationReason>,
    ) -> MetricsRecord {
        MetricsRecord::Generation {
            generation: number,
            hosts: (0..world_size).map(|i| format!("h{i}")).collect(),
            world_size,
            accumulation: 1,
            resume_from: resume_step.map(|s| format!("/runs/r/checkpoints/step-{s}")),
            resume_step,
            reasons,
        }
    }

    fn loading(step: u64) -> MetricsRecord {
        MetricsRecord::Loading { epoch: 0, step, elapsed_s: 0.0 }
    }

    #[test]
    fn a_reason_of_many_lines_is_shown_on_one_cut_short() {
        let detail = format!("Traceback:\n  File \"x.py\"\n{}", "é".repeat(300));
        let failed = GenerationReason::RankFailed { rank: 1, host: "h1".into(), detail };
        let g = Generations::of_records(&[
            generation(1, 2, None, vec![GenerationReason::Start]),
            generation(2, 2, Some(0), vec![failed]),
        ]);
        let line = g.recorded[1].describe();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("rank 1 on h1 failed: Traceback: File \"x.py\" éé"), "{line}");
        assert!(line.ends_with("é…; 2 rank(s), resumed from update 0"), "{line}");
        let tail = "…; 2 rank(s), resumed from update 0";
        assert_eq!(line.chars().count(), REASON_CHARS + tail.chars().count());
    }

    #[test]
    fn a_retry_says_its_attempt_and_why_and_a_reason_of_a_later_build_is_read() {
        let retry =
            GenerationReason::Retry { attempt: 2, failure: "rank 0 on a failed: boom".into() };
        let g = Generations::of_records(&[
            generation(1, 1, None, vec![GenerationReason::Start]),
            loading(0),
            loading(8),
            generation(1, 1, Some(6), vec![GenerationReason::Start, retry]),
        ]);
        let lines: Vec<String> = g.after_first().map(|(_, g)| g.describe()).collect();
        assert_eq!(
            lines,
            ["new attempt: start; attempt 2, after: rank 0 on a failed: boom; 1 rank(s), \
                 resumed from update 6 (2 recorded update(s) trained again)"]
        );
        let later = r#"{"kind":"generation","generation":2,"hosts":["a"],"world_size":1,"accumulation":1,"resume_from":null,"resume_step":null,"reasons":[{"kind":"evicted_by_a_later_build","why":"x"}]}"#;
        let record: MetricsRecord = serde_json::from_str(later).unwrap();
        let MetricsRecord::Generation { reasons, .. } = &record else { panic!("{record:?}") };
        assert_eq!(reasons, &[GenerationReason::Unknown]);
    }

    #[test]
    fn no_generation_record_is_one_generation() {
        let g = Generations::of_records(&[loading(0), loading(10)]);
        assert_eq!((g.count(), g.restarts(), g.world_size_changed()), (1, 0, false));
        assert_eq!(g.world_sizes_text(), "—");
        assert_eq!(g.after_first().count(), 0);
    }

    #[test]
    fn updates_past_the_resume_point_are_trained_again() {
        let lost = GenerationReason::LostHost { host: "h1".into(), detail: "gone".into() };
        let records = [
            generation(1, 2, None, vec![GenerationReason::Start]),
            loading(0),
            loading(30),
            generation(2, 1, Some(20), vec![lost]),
            // Lost again before any record: nothing past 20 to train again.
            generation(3, 1, Some(20), vec![GenerationReason::CoordinatorRestarted]),
            loading(25),
            // A retried attempt, resumed from a checkpoint of unknown step.
            MetricsRecord::Generation {
                generation: 1,
                hosts: vec!["h0".into()],
                world_size: 1,
                accumulation: 2,
                resume_from: Some("/runs/r/checkpoints/epoch-0002".into()),
                resume_step: None,
                reasons: vec![GenerationReason::Start],
            },
            loading(20),
            // And one from scratch: every recorded update again.
            generation(1, 1, None, vec![GenerationReason::Start]),
        ];
        let g = Generations::of_records(&records);
        let again: Vec<Option<u64>> = g.recorded.iter().map(|g| g.trained_again).collect();
        assert_eq!(again, [None, Some(10), Some(0), None, Some(20)]);
        assert_eq!((g.count(), g.restarts(), g.world_size_changed()), (5, 4, true));
        let lines: Vec<String> =
            g.after_first().map(|(i, g)| format!("{i}: {}", g.describe())).collect();
        assert_eq!(
            lines,
            [
                "2: lost host h1: gone; 1 rank(s), resumed from update 20 (10 recorded update(s) \
                 trained again)",
                "3: the coordinator restarted; 1 rank(s), resumed from update 20",
                "4: new attempt: start; 1 rank(s), resumed from checkpoint `epoch-0002`",
                "5: new attempt: start; 1 rank(s), from scratch (20 recorded update(s) trained \
                 again)",
            ]
        );
        assert_eq!(g.summary(), "5 generations, world size changed (2 → 1 → 1 → 1 → 1)");
    }
}
