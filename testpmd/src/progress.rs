//! The live progress line of a non-interactive run: once a second, one line (rewritten
//! in place with `\r`) with the elapsed time and each port's receive and transmit rates
//! and totals. Only when stdout is a terminal and no `--stats-period` prints blocks; a
//! pipe or a file (tests, scripts) never sees it.
//!
//! Owns: when the line is due and how it reads. Must not: touch ports or counters (it
//! reads the totals the caller passes in).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// The line's state: the totals and time of the last line.
pub struct Progress {
    started: Instant,
    last_at: Instant,
    last: Vec<(u64, u64)>,
}

impl Progress {
    /// A progress line, if stdout is a terminal.
    pub fn for_terminal() -> Option<Progress> {
        std::io::stdout().is_terminal().then(|| {
            let now = Instant::now();
            Progress { started: now, last_at: now, last: Vec::new() }
        })
    }

    /// Shows the line if a second has passed; `totals` gives (rx, tx) packets per port.
    pub fn tick(&mut self, totals: impl FnOnce() -> Vec<(u64, u64)>) {
        let now = Instant::now();
        let secs = now.duration_since(self.last_at);
        if secs < Duration::from_secs(1) {
            return;
        }
        let totals = &totals();
        if self.last.len() != totals.len() {
            // The first line: rates since the start.
            self.last = vec![(0, 0); totals.len()];
        }
        let text = line(now.duration_since(self.started), secs, &self.last, totals);
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r{text}\x1b[K");
        let _ = out.flush();
        self.last = totals.to_vec();
        self.last_at = now;
    }

    /// Clears the line (before the exit statistics).
    pub fn finish(self) {
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r\x1b[K");
        let _ = out.flush();
    }
}

fn rate(pkts: u64, over: Duration) -> String {
    let pps = pkts as f64 / over.as_secs_f64().max(1e-9);
    if pps >= 1e6 {
        format!("{:.2} Mpps", pps / 1e6)
    } else {
        format!("{:.1} kpps", pps / 1e3)
    }
}

/// The line: `[elapsed] pN rx RATE (TOTAL) tx RATE (TOTAL) | ...`.
pub fn line(elapsed: Duration, over: Duration, last: &[(u64, u64)], now: &[(u64, u64)]) -> String {
    let ports: Vec<String> = now
        .iter()
        .zip(last)
        .enumerate()
        .map(|(i, (&(rx, tx), &(lrx, ltx)))| {
            format!(
                "p{i} rx {} ({rx}) tx {} ({tx})",
                rate(rx.saturating_sub(lrx), over),
                rate(tx.saturating_sub(ltx), over)
            )
        })
        .collect();
    format!("[{:>5}s] {}", elapsed.as_secs(), ports.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_rates_and_totals_per_port() {
        let l = line(
            Duration::from_secs(12),
            Duration::from_secs(2),
            &[(1_000, 0), (0, 10)],
            &[(25_001_000, 0), (40_000, 60_010)],
        );
        assert_eq!(
            l,
            "[   12s] p0 rx 12.50 Mpps (25001000) tx 0.0 kpps (0) | p1 rx 20.0 kpps (40000) tx 30.0 kpps (60010)"
        );
    }
}
