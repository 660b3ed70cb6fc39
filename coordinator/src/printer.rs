//! Where the coordinator's progress lines go: standard output (through
//! [`rsb_logging::stdout_line`]: never waiting, never panicking), or, while
//! terminal progress bars are drawn, above them (so lines and bars do not
//! garble each other). Lines are printed under the job's lock, so above the
//! bars they are only queued there, and printed by the sweep's progress
//! ([`Printer::print_queued`]) outside it: a terminal paused with Ctrl-S
//! stops the progress, not the calls. Every line of a sweep's run carries
//! the run's id.

use indicatif::MultiProgress;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Lines queued above the bars before the oldest are dropped.
pub const MAX_QUEUED_LINES: usize = 4096;

/// Prints progress lines (cheap to clone: the bars and the queue are shared).
#[derive(Clone, Default)]
pub struct Printer {
    bars: Option<MultiProgress>,
    queued: Arc<Mutex<VecDeque<String>>>,
}

impl std::fmt::Debug for Printer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Printer").field("bars", &self.bars.is_some()).finish()
    }
}

impl Printer {
    /// Lines printed above `bars`, the bars of a terminal.
    pub fn above(bars: MultiProgress) -> Printer {
        Printer { bars: Some(bars), queued: Arc::default() }
    }

    /// Prints one line: queued when there are bars (see
    /// [`Printer::print_queued`]), else written through the non-blocking
    /// stdout. Never waits on the terminal.
    pub fn line(&self, text: &str) {
        match &self.bars {
            Some(_) => {
                let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
                if queued.len() >= MAX_QUEUED_LINES {
                    queued.pop_front();
                }
                queued.push_back(text.to_string());
            }
            None => rsb_logging::stdout_line(text),
        }
    }

    /// Prints the queued lines above the bars (plainly, when the bars turn
    /// out hidden). This may wait on the terminal: call it outside the
    /// job's lock.
    pub fn print_queued(&self) {
        let lines = std::mem::take(&mut *self.queued.lock().unwrap_or_else(|p| p.into_inner()));
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
            let queued = printer.queued.lock().unwrap();
            assert_eq!(queued.len(), MAX_QUEUED_LINES);
            assert_eq!(queued.front().map(String::as_str), Some("line 2"), "the oldest go first");
        }
        printer.print_queued();
        assert!(printer.queued.lock().unwrap().is_empty());
        // Without bars, nothing waits.
        let plain = Printer::default();
        plain.line("a line of the test");
        assert!(plain.queued.lock().unwrap().is_empty());
    }
}
