//! Where the coordinator's progress lines go: standard output (through
//! [`rsb_logging::stdout_line`]: never waiting, never panicking), or, while
//! terminal progress bars are drawn, above them (so lines and bars do not
//! garble each other). Lines are printed under the job's lock, so above the
//! bars they are only queued there, and printed by the sweep's progress
//! ([`Printer::print_queued`]) outside it: a terminal paused with Ctrl-S
//! stops the progress (and the coordinator's main loop, which draws it),
//! not the calls. Once the bars are gone ([`Printer::detach`]), lines go
//! straight to stdout again. Every line of a sweep's run carries the run's
//! id.

use indicatif::MultiProgress;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Lines queued above the bars before the oldest are dropped.
pub const MAX_QUEUED_LINES: usize = 4096;

/// Prints progress lines (cheap to clone: the bars and the queue are shared).
#[derive(Clone, Default)]
pub struct Printer {
    bars: Option<MultiProgress>,
    queue: Arc<Mutex<Queue>>,
}

/// The lines waiting for the bars' next drawing.
#[derive(Debug, Default)]
struct Queue {
    lines: VecDeque<String>,
    /// Lines dropped since the last drawing (the queue was full).
    dropped: u64,
    /// The bars are gone: lines are written at once.
    detached: bool,
}

impl std::fmt::Debug for Printer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Printer").field("bars", &self.bars.is_some()).finish()
    }
}

impl Printer {
    /// Lines printed above `bars`, the bars of a terminal.
    pub fn above(bars: MultiProgress) -> Printer {
        Printer { bars: Some(bars), queue: Arc::default() }
    }

    /// Prints one line: queued while there are bars (see
    /// [`Printer::print_queued`]), else written through the non-blocking
    /// stdout. Never waits on the terminal.
    pub fn line(&self, text: &str) {
        if self.bars.is_some() {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if !queue.detached {
                if queue.lines.len() >= MAX_QUEUED_LINES {
                    queue.lines.pop_front();
                    queue.dropped += 1;
                }
                queue.lines.push_back(text.to_string());
                return;
            }
        }
        rsb_logging::stdout_line(text);
    }

    /// Prints the queued lines above the bars (plainly, when the bars turn
    /// out hidden), after a line that says how many were dropped, if any.
    /// This may wait on the terminal: call it outside the job's lock.
    pub fn print_queued(&self) {
        self.print(self.take());
    }

    /// Prints the queued lines, and every later line at once: the bars are
    /// gone (every clone of this printer sees it). The queued lines are
    /// handed to the non-blocking stdout under the queue's lock, so none
    /// comes after a later one.
    pub fn detach(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.detached = true;
        for line in Self::take_from(&mut queue) {
            rsb_logging::stdout_line(&line);
        }
    }

    fn take(&self) -> Vec<String> {
        Self::take_from(&mut self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn take_from(queue: &mut Queue) -> Vec<String> {
        let mut lines = Vec::with_capacity(queue.lines.len() + 1);
        if queue.dropped > 0 {
            lines.push(format!(
                "({} progress line(s) dropped: the terminal did not take them in time)",
                queue.dropped
            ));
            queue.dropped = 0;
        }
        lines.extend(queue.lines.drain(..));
        lines
    }

    fn print(&self, lines: Vec<String>) {
        for line in lines {
            match &self.bars {
                Some(bars) if !bars.is_hidden() => {
                    let _ = bars.println(line);
                }
                _ => rsb_logging::stdout_line(&line),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::ProgressDrawTarget;

    #[test]
    fn lines_above_bars_wait_in_a_bounded_queue_until_printed() {
        let printer = Printer::above(MultiProgress::with_draw_target(ProgressDrawTarget::hidden()));
        for i in 0..MAX_QUEUED_LINES + 2 {
            printer.line(&format!("line {i}"));
        }
        {
            let queue = printer.queue.lock().unwrap();
            assert_eq!(queue.lines.len(), MAX_QUEUED_LINES);
            assert_eq!(queue.lines.front().map(String::as_str), Some("line 2"), "oldest go first");
            assert_eq!(queue.dropped, 2);
        }
        let taken = printer.take();
        assert!(taken[0].contains("2 progress line(s) dropped"), "{}", taken[0]);
        assert_eq!(taken.len(), MAX_QUEUED_LINES + 1);
        printer.line("another");
        printer.print_queued();
        assert!(printer.queue.lock().unwrap().lines.is_empty());
        // Without bars, nothing waits.
        let plain = Printer::default();
        plain.line("a line of the test");
        assert!(plain.queue.lock().unwrap().lines.is_empty());
    }

    #[test]
    fn once_the_bars_are_gone_no_clone_queues_a_line() {
        let printer = Printer::above(MultiProgress::with_draw_target(ProgressDrawTarget::hidden()));
        // A job's clone, as each job of a sweep holds one.
        let jobs_printer = printer.clone();
        jobs_printer.line("before the end");
        printer.detach();
        assert!(printer.queue.lock().unwrap().lines.is_empty(), "the queue was printed");
        jobs_printer.line("[seed-000] checkpoint committed after the end");
        assert!(
            printer.queue.lock().unwrap().lines.is_empty(),
            "a line after the bars were gone waited for a drawing that never comes"
        );
    }
}
