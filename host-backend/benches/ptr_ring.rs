//! Pointer ring micro-benchmark: our batched `ptr_ring` against a
//! plain Lamport-style SPSC ring (shared head and tail indices, one publish per item,
//! written below) and crossbeam's `ArrayQueue`, with one producer thread pinned to
//! cpu 0 and one consumer thread pinned to cpu 1 (pinning failures are ignored).
//!
//! Run: `cargo bench -j1 -p host-backend --bench ptr_ring`. `PTR_RING_ITEMS` changes the
//! number of pointers per run (default 20 million); `PTR_RING_ONLY` runs only the rows
//! whose "case burst variant" contains it (e.g. `near-full 32`). Items are `NonZeroUsize`
//! tokens, so no variant allocates: only the hand-over is measured.
//!
//! Two cases, each at bursts of 1 (single-item calls) and 32 (our batch calls; the other
//! two variants have no batch call and move a burst item by item):
//! * `free-run`: the consumer only sums the tokens, so it keeps up and the ring is
//!   mostly near empty: both sides work on the same few lines.
//! * `near-full`: the consumer does a little work per item (a chain of dependent
//!   multiply-adds), so it is slower than the producer and the ring sits near full: the
//!   case where the deferred, reverse-order free keeps the two sides off each other's
//!   lines. The work alone, with no ring, is printed first: it is that case's ceiling.
//!
//! Each (case, burst, variant) runs 3 times; the table shows Mops/s per run and the
//! median, and how often the producer found the ring full (per 1000 items, median run).
//! On a shared two-core machine the numbers are indicative only.

use std::cell::UnsafeCell;
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use crossbeam_queue::ArrayQueue;
use host_backend::ptr_ring::{Consumer, Producer, PtrRing};

/// Slots in every ring.
const CAPACITY: usize = 1024;
/// Dependent multiply-adds the `near-full` consumer does per item (chained from item to
/// item, so the work cannot overlap and costs the same in every variant).
const WORK_ROUNDS: u32 = 8;

type Tok = NonZeroUsize;

/// The sending side of a variant.
trait Tx: Send + 'static {
    fn send_one(&mut self, t: Tok) -> Result<(), Tok>;
    /// Moves as many items as fit from the front of `items`; returns how many.
    fn send_burst(&mut self, items: &mut Vec<Tok>) -> usize;
}

/// The receiving side of a variant.
trait Rx: Send + 'static {
    fn recv_one(&mut self) -> Option<Tok>;
    /// Appends up to `max` items to `out`; returns how many.
    fn recv_burst(&mut self, out: &mut Vec<Tok>, max: usize) -> usize;
}

/// Item-by-item burst for the variants without a batch call.
fn burst_by_one(items: &mut Vec<Tok>, mut send: impl FnMut(Tok) -> Result<(), Tok>) -> usize {
    let n = items.iter().take_while(|&&t| send(t).is_ok()).count();
    items.drain(..n);
    n
}

fn recv_by_one(out: &mut Vec<Tok>, max: usize, mut recv: impl FnMut() -> Option<Tok>) -> usize {
    let mut n = 0;
    while n < max {
        match recv() {
            Some(t) => out.push(t),
            None => break,
        }
        n += 1;
    }
    n
}

// (a) Our ring.
impl Tx for Producer<Tok> {
    fn send_one(&mut self, t: Tok) -> Result<(), Tok> {
        self.produce(t)
    }
    fn send_burst(&mut self, items: &mut Vec<Tok>) -> usize {
        self.produce_batch(items)
    }
}
impl Rx for Consumer<Tok> {
    fn recv_one(&mut self) -> Option<Tok> {
        self.consume()
    }
    fn recv_burst(&mut self, out: &mut Vec<Tok>, max: usize) -> usize {
        self.consume_batch(out, max)
    }
}

// (b) A plain Lamport ring: the producer owns `head`, the consumer owns `tail`, each
// side reads the other's index once per item and publishes its own once per item.
#[repr(align(64))]
struct Padded<T>(T);

struct Lamport {
    buf: Box<[UnsafeCell<usize>]>,
    mask: usize,
    head: Padded<AtomicUsize>,
    tail: Padded<AtomicUsize>,
}

// SAFETY: a buffer cell is written only by the producer while it is outside
// `tail..head` and read only by the consumer while it is inside; the index release/acquire
// pairs below order those accesses.
unsafe impl Sync for Lamport {}

struct LamportTx(Arc<Lamport>);
struct LamportRx(Arc<Lamport>);

fn lamport(capacity: usize) -> (LamportTx, LamportRx) {
    assert!(capacity.is_power_of_two());
    let ring = Arc::new(Lamport {
        buf: (0..capacity).map(|_| UnsafeCell::new(0)).collect(),
        mask: capacity - 1,
        head: Padded(AtomicUsize::new(0)),
        tail: Padded(AtomicUsize::new(0)),
    });
    (LamportTx(ring.clone()), LamportRx(ring))
}

impl Tx for LamportTx {
    fn send_one(&mut self, t: Tok) -> Result<(), Tok> {
        let r = &*self.0;
        // Relaxed: only this thread writes `head`.
        let head = r.head.0.load(Ordering::Relaxed);
        // Acquire: pairs with the consumer's release of `tail`, so its read of the cell
        // we are about to overwrite is done.
        if head.wrapping_sub(r.tail.0.load(Ordering::Acquire)) == r.buf.len() {
            return Err(t);
        }
        // SAFETY: the cell at `head` is outside `tail..head` (the check above), so the
        // consumer does not read it until we publish the new `head`.
        unsafe { *r.buf[head & r.mask].get() = t.get() };
        // Release: pairs with the consumer's acquire of `head`: the cell is written first.
        r.head.0.store(head.wrapping_add(1), Ordering::Release);
        Ok(())
    }
    fn send_burst(&mut self, items: &mut Vec<Tok>) -> usize {
        burst_by_one(items, |t| self.send_one(t))
    }
}

impl Rx for LamportRx {
    fn recv_one(&mut self) -> Option<Tok> {
        let r = &*self.0;
        // Relaxed: only this thread writes `tail`.
        let tail = r.tail.0.load(Ordering::Relaxed);
        // Acquire: pairs with the producer's release of `head`: the cell is written.
        if tail == r.head.0.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: the cell at `tail` is inside `tail..head`: published, and the producer
        // does not write it again until we release the new `tail`.
        let v = unsafe { *r.buf[tail & r.mask].get() };
        // Release: pairs with the producer's acquire of `tail`: our read is done first.
        r.tail.0.store(tail.wrapping_add(1), Ordering::Release);
        Some(Tok::new(v).expect("tokens are non-zero"))
    }
    fn recv_burst(&mut self, out: &mut Vec<Tok>, max: usize) -> usize {
        recv_by_one(out, max, || self.recv_one())
    }
}

// (c) crossbeam's bounded MPMC queue.
struct Cb(Arc<ArrayQueue<Tok>>);

impl Tx for Cb {
    fn send_one(&mut self, t: Tok) -> Result<(), Tok> {
        self.0.push(t)
    }
    fn send_burst(&mut self, items: &mut Vec<Tok>) -> usize {
        burst_by_one(items, |t| self.0.push(t))
    }
}
impl Rx for Cb {
    fn recv_one(&mut self) -> Option<Tok> {
        self.0.pop()
    }
    fn recv_burst(&mut self, out: &mut Vec<Tok>, max: usize) -> usize {
        recv_by_one(out, max, || self.0.pop())
    }
}

fn pin(cpu: usize) {
    // SAFETY: `set` is a plain bit set, zeroed and then filled by `CPU_SET`, and the
    // call only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        // Failure (fewer cpus, a restricted cpuset) only makes the numbers noisier.
        let _ = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Busy-waits, yielding now and then so a busy machine does not stall the other side.
#[inline]
fn wait(spins: &mut u64) {
    *spins += 1;
    if *spins & 1023 == 0 {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

#[inline]
fn work(x: usize, rounds: u32) -> usize {
    let mut x = x as u64;
    for _ in 0..rounds {
        x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
    }
    x as usize
}

struct Run {
    mops: f64,
    /// Times the producer found the ring full, per 1000 items.
    full_per_k: f64,
}

/// One timed run: `n` tokens 1..=n from cpu 0 to cpu 1.
fn run(mut tx: impl Tx, mut rx: impl Rx, n: usize, burst: usize, rounds: u32) -> Run {
    let start = Arc::new(Barrier::new(2));
    let s = start.clone();
    let producer = std::thread::spawn(move || {
        pin(0);
        s.wait();
        let (mut next, mut full) = (1usize, 0u64);
        if burst == 1 {
            while next <= n {
                let t = Tok::new(next).unwrap();
                while tx.send_one(t).is_err() {
                    wait(&mut full);
                }
                next += 1;
            }
        } else {
            let mut items = Vec::with_capacity(burst);
            while next <= n || !items.is_empty() {
                if items.is_empty() {
                    let end = (next + burst).min(n + 1);
                    items.extend((next..end).map(|v| Tok::new(v).unwrap()));
                    next = end;
                }
                let want = items.len();
                if tx.send_burst(&mut items) < want {
                    wait(&mut full);
                }
            }
        }
        full
    });
    pin(1);
    let mut out = Vec::with_capacity(burst);
    let (mut got, mut sum, mut acc, mut spins) = (0usize, 0usize, 0usize, 0u64);
    start.wait();
    let t0 = Instant::now();
    while got < n {
        let k = if burst == 1 {
            match rx.recv_one() {
                Some(t) => {
                    out.push(t);
                    1
                }
                None => 0,
            }
        } else {
            rx.recv_burst(&mut out, burst)
        };
        if k == 0 {
            wait(&mut spins);
            continue;
        }
        for t in out.drain(..) {
            sum = sum.wrapping_add(t.get());
            if rounds > 0 {
                acc = work(acc ^ t.get(), rounds);
            }
        }
        got += k;
    }
    let secs = t0.elapsed().as_secs_f64();
    let full = producer.join().unwrap();
    black_box(acc);
    assert_eq!(got, n);
    assert_eq!(sum, n.wrapping_mul(n + 1) / 2, "items lost or duplicated");
    Run { mops: n as f64 / secs / 1e6, full_per_k: full as f64 * 1000.0 / n as f64 }
}

fn one(variant: &str, n: usize, burst: usize, rounds: u32) -> Run {
    match variant {
        "ptr_ring (ours)" => {
            let (tx, rx) = PtrRing::<Tok>::new(CAPACITY).unwrap().split();
            run(tx, rx, n, burst, rounds)
        }
        "lamport spsc" => {
            let (tx, rx) = lamport(CAPACITY);
            run(tx, rx, n, burst, rounds)
        }
        "crossbeam ArrayQueue" => {
            let q = Arc::new(ArrayQueue::new(CAPACITY));
            run(Cb(q.clone()), Cb(q), n, burst, rounds)
        }
        _ => unreachable!(),
    }
}

fn main() {
    let only = std::env::var("PTR_RING_ONLY").ok();
    let n = std::env::var("PTR_RING_ITEMS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000_000);
    println!(
        "pointer ring: {n} items per run, capacity {CAPACITY}, producer on cpu 0, consumer on cpu 1, \
         near-full consumer work {WORK_ROUNDS} multiply-adds per item"
    );
    // What the near-full consumer manages with no ring at all: the ceiling for that case.
    let t0 = Instant::now();
    let mut acc = 0;
    for v in 1..=n {
        acc = work(acc ^ black_box(v), WORK_ROUNDS);
    }
    black_box(acc);
    println!("near-full consumer work alone: {:.1} Mops/s", n as f64 / t0.elapsed().as_secs_f64() / 1e6);
    println!(
        "{:<10} {:>5}  {:<21} {:>8} {:>8} {:>8}  {:>8}  {:>12}",
        "case", "burst", "variant", "run 1", "run 2", "run 3", "median", "full/k items"
    );
    for (case, rounds) in [("free-run", 0), ("near-full", WORK_ROUNDS)] {
        for burst in [1, 32] {
            for variant in ["ptr_ring (ours)", "lamport spsc", "crossbeam ArrayQueue"] {
                if only.as_ref().is_some_and(|o| !format!("{case} {burst} {variant}").contains(o.as_str())) {
                    continue;
                }
                let mut runs: Vec<Run> = (0..3).map(|_| one(variant, n, burst, rounds)).collect();
                let by_run: Vec<f64> = runs.iter().map(|r| r.mops).collect();
                runs.sort_by(|a, b| a.mops.total_cmp(&b.mops));
                println!(
                    "{case:<10} {burst:>5}  {variant:<21} {:>8.1} {:>8.1} {:>8.1}  {:>8.1}  {:>12.1}",
                    by_run[0], by_run[1], by_run[2], runs[1].mops, runs[1].full_per_k
                );
            }
        }
    }
    println!("(Mops/s; median of 3; full/k items = producer attempts that found the ring full)");
}
