//! The physical reference for the 64-byte rows: how many 64-byte slots per second a
//! plain single-producer single-consumer ring moves between two CPUs on this machine.
//! The producer (pinned to CPU_A) writes each slot whole (eight 8-byte stores of its
//! sequence number), the consumer (CPU_B) reads its first and last word and checks them;
//! each side publishes its index once per batch of 32 slots and reads the other's only
//! when its cached copy says the ring is full/empty (Lamport's ring with cached indices,
//! the cheapest correct SPSC handshake). 256 slots (16 KiB), as the DPDK anchor notes' C ring.
//!
//! Each word is its own volatile access: a volatile read or write of the whole 64-byte
//! array compiles to a copy through the stack, which made this ring several times slower
//! than the same ring in C (numbers: commit f0d64de, docs/PERFORMANCE.md).
//!
//! Why: every 64 B forwarding row moves at least one 64-byte frame and its ring entries
//! between the two cores; this ring moves only the frame's line, so a row's rate over
//! this one says how much of the machine's core-to-core bandwidth the path uses.
//! `docs/PERFORMANCE.md` reports the 64 B rows as a fraction of it, measured in the same
//! session.
//!
//! ```sh
//! cargo run --release -p host-backend --example spsc_ref -- [CPU_A CPU_B [SECONDS]]
//! ```
//! Output: one line, `slots_per_s=N seconds=S`.

#[path = "common/pin.rs"]
mod common_pin;
use common_pin::pin;

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SLOTS: usize = 256;
const BATCH: u64 = 32;

#[repr(align(64))]
struct Slot(UnsafeCell<[u64; 8]>);

#[repr(align(64))]
struct Index(AtomicU64);

struct Ring {
    slots: Box<[Slot]>,
    /// Slots written (producer's index, published per batch).
    head: Index,
    /// Slots read (consumer's index, published per batch).
    tail: Index,
}

// SAFETY: a slot is written by the producer only while it is free (head - tail < SLOTS)
// and read by the consumer only after the producer's Release store of `head` covered it;
// the indices order every access, so no slot is read and written at once.
unsafe impl Sync for Ring {}

fn pin_or_exit(cpu: usize) {
    if let Err(e) = pin(cpu) {
        eprintln!("spsc_ref: cannot pin to cpu {cpu}: {e}");
        std::process::exit(1);
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let num = |i: usize, d: f64| a.get(i).map_or(Some(d), |s| s.parse().ok());
    let (Some(ca), Some(cb), Some(secs)) = (num(1, 0.0), num(2, 1.0), num(3, 2.0)) else {
        eprintln!("usage: spsc_ref [CPU_A CPU_B [SECONDS]]");
        std::process::exit(2)
    };
    if !(0.1..=600.0).contains(&secs) {
        eprintln!("spsc_ref: SECONDS must be in 0.1..=600");
        std::process::exit(2);
    }
    let ring = Arc::new(Ring {
        slots: (0..SLOTS).map(|_| Slot(UnsafeCell::new([0; 8]))).collect(),
        head: Index(AtomicU64::new(0)),
        tail: Index(AtomicU64::new(0)),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (ring, stop) = (ring.clone(), stop.clone());
        std::thread::spawn(move || {
            pin_or_exit(cb as usize);
            let (mut tail, mut head, mut bad) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                if tail == head {
                    // Acquire: the producer's slot writes before its Release of `head`.
                    head = ring.head.0.load(Ordering::Acquire);
                    continue;
                }
                let s = ring.slots[(tail as usize) & (SLOTS - 1)].0.get() as *const u64;
                // SAFETY: `tail < head`: the producer finished this slot (see `Sync`); words
                // 0 and 7 of its eight are read (the line's first and last).
                let (first, last) =
                    unsafe { (std::ptr::read_volatile(s), std::ptr::read_volatile(s.add(7))) };
                bad += (first != tail) as u64 + (last != tail) as u64;
                tail += 1;
                if tail % BATCH == 0 || tail == head {
                    // Release: our reads of the slots before the producer reuses them.
                    ring.tail.0.store(tail, Ordering::Release);
                }
            }
            (tail, bad)
        })
    };
    pin_or_exit(ca as usize);
    let (mut head, mut tail) = (0u64, 0u64);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut n = 0u32;
    loop {
        n = n.wrapping_add(1);
        if n % 4096 == 0 && Instant::now() >= end {
            break;
        }
        if head - tail == SLOTS as u64 {
            tail = ring.tail.0.load(Ordering::Acquire);
            continue;
        }
        let s = ring.slots[(head as usize) & (SLOTS - 1)].0.get() as *mut u64;
        for w in 0..8 {
            // SAFETY: `head - tail < SLOTS`: the consumer is done with this slot; `w < 8`
            // stays inside it.
            unsafe { std::ptr::write_volatile(s.add(w), head) };
        }
        head += 1;
        if head % BATCH == 0 {
            ring.head.0.store(head, Ordering::Release);
        }
    }
    ring.head.0.store(head, Ordering::Release);
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    let (read, bad) = consumer.join().unwrap_or((0, 1));
    if bad != 0 || read != head {
        eprintln!("spsc_ref: {bad} slots read with a wrong sequence number; {read} of {head} read");
        std::process::exit(1);
    }
    println!("slots_per_s={:.0} seconds={elapsed:.3}", head as f64 / elapsed);
}
