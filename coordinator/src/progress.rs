//! Feedback while a sweep runs. On a terminal: one bar for the sweep (runs
//! ended of all, with how many are running, queued and failed, and an ETA)
//! and one bar per running run (its updates done of all). Elsewhere (a log
//! file, CI): a plain line whenever the counts change. Progress lines of the
//! runs go through the returned [`Printer`], above the bars.

use crate::printer::Printer;
use crate::sweep::{Counts, RunState, RunView};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::time::Instant;

/// The sweep's feedback.
#[derive(Debug)]
pub struct SweepProgress {
    bars: Option<Bars>,
    last: Option<Counts>,
    started: Instant,
    /// Runs that had ended before this invocation (not in its ETA).
    ended_before: Option<u64>,
}

#[derive(Debug)]
struct Bars {
    all: MultiProgress,
    sweep: ProgressBar,
    runs: BTreeMap<String, ProgressBar>,
    /// The runs' lines, queued under the job's lock, printed above the bars
    /// at each update.
    printer: Printer,
}

/// `done D · running R · queued Q · failed F`.
fn counts_text(c: &Counts) -> String {
    format!(
        "finished {} · running {} · queued {} · failed {}",
        c.finished, c.running, c.queued, c.failed
    )
}

/// `h:mm:ss`.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

impl Drop for SweepProgress {
    fn drop(&mut self) {
        self.finish();
    }
}

impl SweepProgress {
    /// Feedback for a sweep of `total` runs: bars when `terminal`, else
    /// plain lines. Returns the printer the runs' lines go through.
    pub fn new(total: usize, terminal: bool) -> (SweepProgress, Printer) {
        let started = Instant::now();
        if !terminal {
            return (
                SweepProgress { bars: None, last: None, started, ended_before: None },
                Printer::default(),
            );
        }
        let all = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let sweep = all.add(ProgressBar::new(total as u64));
        sweep.set_style(
            ProgressStyle::with_template(
                "sweep {bar:30.green/white} {pos}/{len} runs ended  {msg}  [{elapsed_precise}, ETA {eta_precise}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let printer = Printer::above(all.clone());
        let bars = Bars { all, sweep, runs: BTreeMap::new(), printer: printer.clone() };
        (SweepProgress { bars: Some(bars), last: None, started, ended_before: None }, printer)
    }

    /// Shows the sweep as it is now.
    pub fn update(&mut self, counts: Counts, views: &[RunView]) {
        let ended = (counts.finished + counts.failed) as u64;
        let ended_before = *self.ended_before.get_or_insert(ended);
        match &mut self.bars {
            Some(bars) => {
                bars.printer.print_queued();
                bars.sweep.set_position(ended);
                bars.sweep.set_message(counts_text(&counts));
                for view in views {
                    let running = view.state == RunState::Running;
                    match (bars.runs.get(&view.id), running) {
                        (None, true) => {
                            let bar = bars.all.add(ProgressBar::new(0));
                            bar.set_style(
                                ProgressStyle::with_template(
                                    "  {prefix:>16} {bar:30.cyan/blue} {pos}/{len} updates  {msg}",
                                )
                                .unwrap_or_else(|_| ProgressStyle::default_bar()),
                            );
                            bar.set_prefix(view.id.clone());
                            bars.runs.insert(view.id.clone(), bar);
                        }
                        (Some(bar), false) => {
                            bar.finish_and_clear();
                            bars.all.remove(bar);
                            bars.runs.remove(&view.id);
                        }
                        _ => {}
                    }
                    if let Some(bar) = bars.runs.get(&view.id) {
                        bar.set_length(view.total_updates.unwrap_or(0));
                        bar.set_position(view.step);
                        bar.set_message(format!(
                            "epoch {} · attempt {} · {}",
                            view.epoch,
                            view.attempts,
                            view.hosts.join(", ")
                        ));
                    }
                }
            }
            None => {
                if self.last != Some(counts) {
                    let elapsed = self.started.elapsed().as_secs_f64();
                    let ended_now = ended - ended_before;
                    let eta = if ended_now > 0 {
                        let left = (counts.total as u64 - ended) as f64;
                        format!(", ETA {}", clock(elapsed / ended_now as f64 * left))
                    } else {
                        String::new()
                    };
                    crate::print_line!(
                        "sweep: {ended}/{} runs ended ({}), elapsed {}{eta}",
                        counts.total,
                        counts_text(&counts),
                        clock(elapsed)
                    );
                }
            }
        }
        self.last = Some(counts);
    }

    /// Clears the bars (the final counts stay printed), then prints the
    /// lines queued above them; later lines are printed at once. Dropping
    /// the progress does it too (an early error return of `up`).
    pub fn finish(&mut self) {
        if let Some(bars) = self.bars.take() {
            for bar in bars.runs.values() {
                bar.finish_and_clear();
            }
            bars.sweep.finish();
            bars.printer.detach();
        }
    }
}
