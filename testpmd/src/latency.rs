//! Latency and loss measurement (`--latency`): txonly/flowgen stamp each frame with a
//! sequence number and the time it was sent; whichever stream receives a stamped frame
//! (rxonly, io and the other receiving modes; txonly itself, when its frames come back
//! through a reflecting back-end) records the latency in a histogram and follows the
//! sequence numbers for loss and reordering. `--tx-pps` paces txonly/flowgen to a fixed
//! rate, so latency can be read at a known, low load.
//!
//! The stamp is 16 bytes right after the Ethernet/IPv4/UDP headers (offset 42, so a
//! 58-byte frame carries it): magic `0x4c54` ("LT"), source id (the sending port << 3 |
//! queue), a nonce per sending run, the sequence number (u32, per source) and the send
//! time in nanoseconds of `CLOCK_MONOTONIC` (system-wide: a receiver in another process
//! on this machine measures one-way latency; the same process, round trip). Time is
//! read once per burst on each side (vDSO, no system call): every frame of a burst
//! carries the same send time, which is when the burst was handed to the driver.
//!
//! The histogram has 32 linear buckets per power of two (values below 32 ns exact): a
//! percentile is the lower bound of its bucket, at most 1/32 (3.1%) below the true
//! value; min, max and mean are exact. Loss is what the sequence numbers show missing
//! at the receiver after the sending driver took the frame (a frame the transmit ring
//! refused, counted in TX-dropped, gives its number back); a frame that arrives after a later
//! one counts as reordered and no longer as lost; a frame of an earlier run (another
//! nonce, stale in a ring since the last `stop`) is counted stale and not measured.
//!
//! Owns: the stamp layout, pacing, the per-stream histogram and sequence state, and the
//! report. Must not: allocate or take a lock on the data path (the histogram is
//! preallocated; each counter has one writer, its forwarding thread).

use std::sync::atomic::{AtomicU64, Ordering};

use driver::frame::{ETH_HLEN, IPV4_HLEN, UDP_HLEN};
use driver::Packet;

/// Where the stamp starts: after the Ethernet, IPv4 and UDP headers.
pub const STAMP_AT: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN;
/// Bytes of the stamp.
pub const STAMP_LEN: usize = 16;
/// Shortest frame that carries a stamp.
pub const MIN_FRAME: usize = STAMP_AT + STAMP_LEN;
const MAGIC: [u8; 2] = *b"LT";

/// Linear sub-buckets per power of two.
const SUB: usize = 32;
const SUB_BITS: u32 = 5;
/// Buckets: exact below 32, then 32 per power of two up to 2^64.
const NB: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// `CLOCK_MONOTONIC` in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer; the monotonic
    // clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn bucket(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    (e - SUB_BITS + 1) as usize * SUB + ((v >> (e - SUB_BITS)) as usize & (SUB - 1))
}

/// The smallest value of bucket `i`.
fn bucket_low(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let e = (i / SUB) as u32 + SUB_BITS - 1;
    ((SUB + i % SUB) as u64) << (e - SUB_BITS)
}

/// One stream's receive-side figures (written by its forwarding thread only, read by
/// the prompt and the exit report).
#[derive(Debug)]
pub struct RxLatency {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
    lost: AtomicU64,
    reordered: AtomicU64,
    stale: AtomicU64,
}

impl Default for RxLatency {
    fn default() -> Self {
        RxLatency {
            buckets: (0..NB).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            stale: AtomicU64::new(0),
        }
    }
}

/// Adds `v` to a counter that only this thread writes.
#[inline]
fn add(c: &AtomicU64, v: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

impl RxLatency {
    /// Zero (at `start`, while no thread writes).
    pub fn reset(&self) {
        for b in self.buckets.iter() {
            b.store(0, Ordering::Relaxed);
        }
        for c in [&self.count, &self.sum, &self.max, &self.lost, &self.reordered, &self.stale] {
            c.store(0, Ordering::Relaxed);
        }
        self.min.store(u64::MAX, Ordering::Relaxed);
    }
}

/// What one source's sequence numbers have shown so far.
#[derive(Clone, Copy, Default)]
struct Source {
    seen: bool,
    nonce: u8,
    next: u32,
}

/// Per-stream state of both directions (owned by the stream, used by its thread).
pub struct StreamLatency {
    /// This stream's source id in the stamps it sends.
    src: u8,
    nonce: u8,
    seq: u32,
    /// Frames the last `stamp` stamped (those long enough).
    stamped: usize,
    /// `--tx-pps` pacing: when the stream started sending and how many it sent since.
    pace_start: u64,
    paced: u64,
    sources: Box<[Source; 256]>,
}

impl StreamLatency {
    /// State for the stream sending on port `port`, queue `queue`.
    pub fn new(port: u16, queue: u16) -> Self {
        StreamLatency {
            src: ((port << 3) | (queue & 7)) as u8,
            nonce: 0,
            seq: 0,
            stamped: 0,
            pace_start: 0,
            paced: 0,
            sources: Box::new([Source::default(); 256]),
        }
    }

    /// A new run (at `start`): sequence numbers from 0 under a new nonce, nothing seen.
    pub fn reset(&mut self, nonce: u8) {
        self.nonce = nonce;
        self.seq = 0;
        self.pace_start = 0;
        self.paced = 0;
        self.sources.iter_mut().for_each(|s| *s = Source::default());
    }

    /// How many frames `--tx-pps pps` allows now (at most `burst`); 0 pps: no pacing.
    pub fn allowance(&mut self, pps: u64, burst: usize, now: u64) -> usize {
        if pps == 0 {
            return burst;
        }
        if self.pace_start == 0 {
            self.pace_start = now;
        }
        let due = ((now - self.pace_start) as u128 * pps as u128 / 1_000_000_000) as u64;
        (due.saturating_sub(self.paced) as usize).min(burst)
    }

    /// After a transmit burst of stamped (or paced) frames: `sent` went out, the last
    /// `refused` did not fit the ring and are freed. Their sequence numbers are taken
    /// back, so a receiver's loss is what was lost after the driver took the frame.
    pub fn sent(&mut self, sent: usize, refused: usize) {
        self.paced += sent as u64;
        self.seq = self.seq.wrapping_sub(refused.min(self.stamped) as u32);
        self.stamped = 0;
    }

    /// Writes the stamp (send time `now`) into every frame long enough to carry it.
    pub fn stamp(&mut self, batch: &mut [Packet], now: u64) {
        self.stamped = 0;
        for p in batch.iter_mut() {
            let d = p.data_mut();
            if d.len() < MIN_FRAME {
                continue;
            }
            let s = &mut d[STAMP_AT..MIN_FRAME];
            s[0..2].copy_from_slice(&MAGIC);
            s[2] = self.src;
            s[3] = self.nonce;
            s[4..8].copy_from_slice(&self.seq.to_be_bytes());
            s[8..16].copy_from_slice(&now.to_be_bytes());
            self.seq = self.seq.wrapping_add(1);
            self.stamped += 1;
        }
    }

    /// Records the stamped frames of a received `batch` (receive time `now`) into `rx`.
    pub fn measure(&mut self, rx: &RxLatency, batch: &[Packet], now: u64) {
        let (mut n, mut sum, mut lost, mut late, mut stale) = (0u64, 0u64, 0u64, 0u64, 0u64);
        let (mut min, mut max) = (u64::MAX, 0u64);
        for p in batch {
            let d = p.data();
            if d.len() < MIN_FRAME || d[STAMP_AT..STAMP_AT + 2] != MAGIC {
                continue;
            }
            let s = &d[STAMP_AT..MIN_FRAME];
            let (src, nonce) = (s[2], s[3]);
            let seq = u32::from_be_bytes([s[4], s[5], s[6], s[7]]);
            let sent = u64::from_be_bytes([s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]]);
            let st = &mut self.sources[src as usize];
            if !st.seen || st.nonce != nonce {
                // A run's first frames carry small numbers; a large one under another
                // nonce was left in a ring by an earlier run.
                if st.seen && seq >= 1 << 16 {
                    stale += 1;
                    continue;
                }
                *st = Source { seen: true, nonce, next: 0 };
            }
            // Serial-number arithmetic (RFC 1982 style): u32 wraps.
            let ahead = seq.wrapping_sub(st.next) as i32;
            if ahead >= 0 {
                lost += ahead as u64;
                st.next = seq.wrapping_add(1);
            } else {
                late += 1;
            }
            let v = now.saturating_sub(sent);
            let b = &rx.buckets[bucket(v)];
            b.store(b.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            n += 1;
            sum = sum.wrapping_add(v);
            min = min.min(v);
            max = max.max(v);
        }
        if n + stale == 0 {
            return;
        }
        add(&rx.count, n);
        add(&rx.sum, sum);
        add(&rx.reordered, late);
        add(&rx.stale, stale);
        // A late frame was counted lost when a later one arrived first.
        let was_lost = rx.lost.load(Ordering::Relaxed) + lost;
        rx.lost.store(was_lost.saturating_sub(late), Ordering::Relaxed);
        if min < rx.min.load(Ordering::Relaxed) {
            rx.min.store(min, Ordering::Relaxed);
        }
        if max > rx.max.load(Ordering::Relaxed) {
            rx.max.store(max, Ordering::Relaxed);
        }
    }
}

/// The figures of one port (its receiving streams merged), in nanoseconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// Stamped frames measured.
    pub samples: u64,
    /// Smallest, mean and largest latency.
    pub min: u64,
    pub mean: u64,
    pub max: u64,
    /// Percentiles 50, 99 and 99.9 (bucket lower bounds).
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    /// Missing sequence numbers, late arrivals, frames of an earlier run.
    pub lost: u64,
    pub reordered: u64,
    pub stale: u64,
}

/// Merges the figures of `streams` into one report.
pub fn report<'a>(streams: impl Iterator<Item = &'a RxLatency>) -> Report {
    let mut h = vec![0u64; NB];
    let mut r = Report { min: u64::MAX, ..Default::default() };
    let mut sum = 0u64;
    for s in streams {
        for (a, b) in h.iter_mut().zip(s.buckets.iter()) {
            *a += b.load(Ordering::Relaxed);
        }
        r.samples += s.count.load(Ordering::Relaxed);
        sum = sum.wrapping_add(s.sum.load(Ordering::Relaxed));
        r.min = r.min.min(s.min.load(Ordering::Relaxed));
        r.max = r.max.max(s.max.load(Ordering::Relaxed));
        r.lost += s.lost.load(Ordering::Relaxed);
        r.reordered += s.reordered.load(Ordering::Relaxed);
        r.stale += s.stale.load(Ordering::Relaxed);
    }
    if r.samples == 0 {
        r.min = 0;
        return r;
    }
    r.mean = sum / r.samples;
    let total: u64 = h.iter().sum();
    let pct = |q: f64| {
        // The smallest bucket at which at least q of the samples are counted.
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, c) in h.iter().enumerate() {
            acc += c;
            if acc >= want {
                return bucket_low(i);
            }
        }
        r.max
    };
    (r.p50, r.p99, r.p999) = (pct(0.50), pct(0.99), pct(0.999));
    r
}

impl Report {
    /// DPDK-style text block for port `port`.
    pub fn text(&self, port: usize) -> String {
        let us = |v: u64| v as f64 / 1000.0;
        format!(
            "\n  ######################## Latency for port {port} ########################\n  \
             Samples: {}  Lost: {}  Reordered: {}  Stale: {}\n  \
             Min: {:.3} us  Mean: {:.3} us  Max: {:.3} us\n  \
             p50: {:.3} us  p99: {:.3} us  p99.9: {:.3} us\n  \
             ########################################################################\n",
            self.samples,
            self.lost,
            self.reordered,
            self.stale,
            us(self.min),
            us(self.mean),
            us(self.max),
            us(self.p50),
            us(self.p99),
            us(self.p999),
        )
    }

    /// The JSON form (`--stats-format json`), nanoseconds.
    pub fn json(&self, port: usize) -> serde_json::Value {
        serde_json::json!({"type": "port_latency", "port": port, "samples": self.samples,
            "min_ns": self.min, "mean_ns": self.mean, "max_ns": self.max, "p50_ns": self.p50,
            "p99_ns": self.p99, "p999_ns": self.p999, "lost": self.lost,
            "reordered": self.reordered, "stale": self.stale})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_within_one_32nd() {
        let mut last = 0;
        for v in (0..100_000u64).chain([1 << 20, (1 << 40) + 12345, u64::MAX]) {
            let b = bucket(v);
            assert!(b >= last, "bucket of {v}");
            last = b;
            let low = bucket_low(b);
            assert!(low <= v && v - low <= v / 32, "{v} -> bucket {b} low {low}");
        }
        assert!(bucket(u64::MAX) < NB);
        for i in 0..NB {
            assert_eq!(bucket(bucket_low(i)), i);
        }
    }

    fn pool(n: u32) -> driver::Mempool {
        let arena = std::sync::Arc::new(driver::dma::DmaArena::new(8 << 20, false).unwrap());
        driver::Mempool::new(arena, n, 2304, 256).unwrap()
    }

    fn frames(pool: &driver::Mempool, n: usize, len: usize) -> Vec<Packet> {
        let mut v = Vec::new();
        pool.alloc_bulk(n, &mut v);
        for p in v.iter_mut() {
            p.push_tail(len).unwrap();
        }
        v
    }

    #[test]
    fn sequence_loss_reorder_and_stale_are_exact() {
        let pool = pool(64);
        let mut tx = StreamLatency::new(1, 2);
        let mut rx = StreamLatency::new(0, 0);
        let lat = RxLatency::default();
        tx.reset(7);
        let mut b = frames(&pool, 10, 64);
        tx.stamp(&mut b, 1_000);
        // Frames 0..10 sent; 3 and 4 lost, 6 arrives after 7, and a short frame is
        // not stamped at all.
        let mut got: Vec<Packet> = Vec::new();
        for (i, p) in b.into_iter().enumerate() {
            if i != 3 && i != 4 {
                got.push(p);
            }
        }
        got.swap(4, 5); // order now ... 5, 7, 6, 8, 9
        got.extend(frames(&pool, 1, 50));
        rx.measure(&lat, &got, 1_000 + 2_500);
        let r = report([&lat].into_iter());
        assert_eq!((r.samples, r.lost, r.reordered, r.stale), (8, 2, 1, 0));
        assert_eq!((r.min, r.max, r.mean), (2_500, 2_500, 2_500));
        assert_eq!(bucket_low(bucket(2_500)), r.p50);
        drop(got);
        // A new run (nonce 8) starts from 0; a leftover of run 7 numbered high is stale.
        let mut old = frames(&pool, 1, 64);
        tx.seq = 1 << 20;
        tx.stamp(&mut old, 5_000);
        tx.reset(8);
        let mut new = frames(&pool, 2, 64);
        tx.stamp(&mut new, 5_000);
        new.extend(old);
        rx.measure(&lat, &new, 6_000);
        let r = report([&lat].into_iter());
        assert_eq!((r.samples, r.lost, r.reordered, r.stale), (10, 2, 1, 1));
        assert_eq!((r.min, r.max), (1_000, 2_500));
    }

    #[test]
    fn refused_frames_give_their_numbers_back() {
        let pool = pool(64);
        let (mut tx, mut rx, lat) =
            (StreamLatency::new(0, 0), StreamLatency::new(0, 0), RxLatency::default());
        tx.reset(3);
        let mut b = frames(&pool, 8, 64);
        tx.stamp(&mut b, 100);
        let refused = b.split_off(5); // the ring took 5 of 8
        tx.sent(5, refused.len());
        drop(refused);
        let mut c = frames(&pool, 4, 64);
        tx.stamp(&mut c, 100);
        b.extend(c);
        rx.measure(&lat, &b, 200);
        let r = report([&lat].into_iter());
        assert_eq!((r.samples, r.lost, r.reordered), (9, 0, 0));
    }

    #[test]
    fn pacing_allows_the_rate_and_no_more() {
        let mut s = StreamLatency::new(0, 0);
        assert_eq!(s.allowance(0, 32, 5), 32);
        assert_eq!(s.allowance(1_000_000, 32, 1_000), 0); // starts the clock
        assert_eq!(s.allowance(1_000_000, 32, 1_000 + 10_000), 10);
        s.sent(10, 0);
        assert_eq!(s.allowance(1_000_000, 32, 1_000 + 10_500), 0);
        assert_eq!(s.allowance(1_000_000, 32, 1_000 + 1_000_000), 32);
    }

    #[test]
    fn percentiles_of_a_known_spread() {
        let lat = RxLatency::default();
        let mut s = StreamLatency::new(0, 0);
        let pool = pool(1100);
        let mut tx = StreamLatency::new(0, 0);
        tx.reset(1);
        // 1000 frames with latencies 1..=1000 ns, one at a time.
        for v in 1..=1000u64 {
            let mut b = frames(&pool, 1, 64);
            tx.stamp(&mut b, 10_000);
            s.measure(&lat, &b, 10_000 + v);
        }
        let r = report([&lat].into_iter());
        assert_eq!((r.samples, r.min, r.max, r.mean, r.lost), (1000, 1, 1000, 500, 0));
        for (p, want) in [(r.p50, 500), (r.p99, 990), (r.p999, 999)] {
            assert!(p <= want && want - p <= want / 32, "{p} vs {want}");
        }
    }
}
