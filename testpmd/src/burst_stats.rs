//! `--record-burst-stats` (DPDK testpmd's option): how many packets each receive and
//! transmit burst call moved, per stream, shown with the forward statistics as DPDK
//! shows it: the share of empty bursts, the two most frequent burst sizes, and the rest
//! ("RX-bursts : N [a% of 0 pkts + b% of 32 pkts + c% of 7 pkts + d% of other]"), plus
//! the mean size of the non-empty bursts. It tells a loop running in full bursts from
//! one where the two sides trade a few frames at a time.
//!
//! Owns: the per-stream spreads (one counter per burst size, written by the stream's
//! forwarding thread only) and their text. Must not: change forwarding; when the option
//! is off the spreads are empty and nothing is counted.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::MAX_BURST;

/// Counts of bursts by packets moved (index: packets, 0..=MAX_BURST); empty when off.
#[derive(Debug, Default)]
pub struct Spread(Box<[AtomicU64]>);

impl Spread {
    /// A spread that records (`on`) or stays empty.
    pub fn new(on: bool) -> Spread {
        Spread(if on { (0..=MAX_BURST).map(|_| AtomicU64::new(0)).collect() } else { Box::default() })
    }

    /// Counts one burst of `n` packets (single writer: the stream's thread).
    #[inline]
    pub fn record(&self, n: usize) {
        if let Some(c) = self.0.get(n) {
            c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
    }

    /// Zero (at `start`).
    pub fn reset(&self) {
        self.0.iter().for_each(|c| c.store(0, Ordering::Relaxed));
    }

    /// The counts, added into `into` (sized MAX_BURST + 1 or empty).
    pub fn add_to(&self, into: &mut Vec<u64>) {
        if self.0.is_empty() {
            return;
        }
        into.resize(MAX_BURST + 1, 0);
        for (a, c) in into.iter_mut().zip(self.0.iter()) {
            *a += c.load(Ordering::Relaxed);
        }
    }
}

/// DPDK's line for one direction (`what`: "RX" or "TX") of `counts` (by burst size), or
/// `None` when no burst was recorded.
pub fn line(what: &str, counts: &[u64]) -> Option<String> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    // Empty bursts always first, then the two most frequent sizes.
    let mut top: Vec<(usize, u64)> =
        counts.iter().copied().enumerate().skip(1).filter(|&(_, c)| c > 0).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let rest: u64 = top.iter().skip(2).map(|&(_, c)| c).sum();
    let pct = |c: u64| (c as f64 * 100.0 / total as f64).round() as u64;
    let mut parts = vec![format!("{}% of 0 pkts", pct(counts[0]))];
    parts.extend(top.iter().take(2).map(|&(n, c)| format!("{}% of {n} pkts", pct(c))));
    if rest > 0 {
        parts.push(format!("{}% of other", pct(rest)));
    }
    let busy = total - counts[0];
    let pkts: u64 = counts.iter().enumerate().map(|(n, &c)| n as u64 * c).sum();
    let mean = if busy > 0 { pkts as f64 / busy as f64 } else { 0.0 };
    Some(format!(
        "  {what}-bursts : {total} [{}] mean {mean:.1} pkts per non-empty burst\n",
        parts.join(" + ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_empty_bursts_the_two_most_frequent_sizes_and_the_rest() {
        let s = Spread::new(true);
        for (n, times) in [(0, 50), (32, 30), (7, 15), (1, 4), (2, 1)] {
            for _ in 0..times {
                s.record(n);
            }
        }
        let mut c = Vec::new();
        s.add_to(&mut c);
        assert_eq!(
            line("RX", &c).unwrap(),
            "  RX-bursts : 100 [50% of 0 pkts + 30% of 32 pkts + 15% of 7 pkts + 5% of other] \
             mean 21.4 pkts per non-empty burst\n"
        );
        s.reset();
        let mut c = Vec::new();
        s.add_to(&mut c);
        assert_eq!(line("TX", &c), None);
        assert_eq!(line("TX", &[]), None);
        let off = Spread::new(false);
        off.record(3);
        let mut c = Vec::new();
        off.add_to(&mut c);
        assert!(c.is_empty());
    }
}
