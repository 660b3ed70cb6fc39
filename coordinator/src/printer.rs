//! Where the coordinator's progress lines go: standard output (through
//! [`rsb_logging::stdout_line`]: never waiting, never panicking), or, while
//! terminal progress bars are drawn, above them (so lines and bars do not
//! garble each other). Every line of a sweep's run carries the run's id.

use indicatif::MultiProgress;

/// Prints progress lines (cheap to clone: the bars are shared).
#[derive(Clone, Default)]
pub struct Printer {
    bars: Option<MultiProgress>,
}

impl std::fmt::Debug for Printer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Printer").field("bars", &self.bars.is_some()).finish()
    }
}

impl Printer {
    /// Lines printed above `bars`.
    pub fn above(bars: MultiProgress) -> Printer {
        Printer { bars: Some(bars) }
    }

    /// Prints one line.
    pub fn line(&self, text: &str) {
        match &self.bars {
            Some(bars) if !bars.is_hidden() => {
                let _ = bars.println(text);
            }
            _ => rsb_logging::stdout_line(text),
        }
    }
}
