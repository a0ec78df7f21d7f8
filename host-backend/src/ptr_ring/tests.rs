//! Unit and property tests of the pointer ring (a model queue as the oracle), and
//! threaded stress tests of both kinds of handles.

use super::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, Instant};

use proptest::prelude::*;

fn tok(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n + 1).unwrap()
}
fn untok(t: NonZeroUsize) -> usize {
    t.get() - 1
}

/// Counts how many times values of it were dropped.
struct Counted(Arc<AtomicUsize>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits without hogging a core the other side may need (the machine may have two),
/// and fails the test if `until` has passed, so a livelock fails instead of hanging.
fn backoff(spins: &mut u32, until: Instant, who: &str) {
    *spins = spins.wrapping_add(1);
    if *spins & 63 == 0 {
        std::thread::yield_now();
        assert!(Instant::now() < until, "{who} stuck");
    } else {
        std::hint::spin_loop();
    }
}

#[test]
fn rejects_bad_sizes() {
    type R = PtrRing<Box<u32>>;
    assert_eq!(R::new(0).err(), Some(Error::CapacityTooSmall(0)));
    assert_eq!(R::new(1).err(), Some(Error::CapacityTooSmall(1)));
    assert_eq!(R::new(MAX_CAPACITY + 1).err(), Some(Error::CapacityTooLarge(MAX_CAPACITY + 1)));
    assert_eq!(R::with_batch(8, 0).err(), Some(Error::Batch { batch: 0, capacity: 8 }));
    assert_eq!(R::with_batch(8, 5).err(), Some(Error::Batch { batch: 5, capacity: 8 }));
    let r = R::new(2).unwrap();
    assert_eq!((r.capacity(), r.batch()), (2, 1));
    assert_eq!(R::new(20).unwrap().batch(), 10);
    assert_eq!(R::new(1024).unwrap().batch(), DEFAULT_BATCH);
    assert_eq!(DEFAULT_BATCH, 2 * 64 / size_of::<usize>());
}

#[test]
fn empty_and_full_boundaries() {
    let (mut p, mut c) = PtrRing::<Box<u32>>::new(8).unwrap().split();
    assert!(c.is_empty() && !p.is_full());
    assert!(c.consume().is_none());
    for i in 0..8 {
        p.produce(Box::new(i)).unwrap();
    }
    assert!(p.is_full() && !c.is_empty());
    // The item that does not fit comes back, intact.
    assert_eq!(*p.produce(Box::new(99)).unwrap_err(), 99);

    // Taken slots stay "full" until a batch (4 here) is freed.
    assert_eq!(*c.consume().unwrap(), 0);
    assert!(p.is_full());
    for i in 1..4 {
        assert_eq!(*c.consume().unwrap(), i);
    }
    assert!(!p.is_full());
    for i in 8..12 {
        p.produce(Box::new(i)).unwrap();
    }
    assert!(p.produce(Box::new(12)).is_err());
    for i in 4..12 {
        assert_eq!(*c.consume().unwrap(), i);
    }
    assert!(c.is_empty() && c.consume().is_none());
    assert!(!p.is_full());
}

#[test]
fn capacity_two() {
    let (mut p, mut c) = PtrRing::<Box<&str>>::new(2).unwrap().split();
    p.produce(Box::new("a")).unwrap();
    p.produce(Box::new("b")).unwrap();
    assert_eq!(*p.produce(Box::new("x")).unwrap_err(), "x");
    assert_eq!(*c.consume().unwrap(), "a");
    // Batch 1: the slot is free at once.
    p.produce(Box::new("c")).unwrap();
    assert!(p.produce(Box::new("y")).is_err());
    assert_eq!(*c.consume().unwrap(), "b");
    assert_eq!(*c.consume().unwrap(), "c");
    assert!(c.consume().is_none());
    p.produce(Box::new("d")).unwrap();
    assert_eq!(*c.consume().unwrap(), "d");
}

#[test]
fn wraps_around_many_times() {
    // Odd capacity, so wraps land on every slot.
    let (mut p, mut c) = PtrRing::<NonZeroUsize>::with_batch(5, 2).unwrap().split();
    let (mut next_in, mut next_out) = (0, 0);
    for round in 0..20_000 {
        for _ in 0..round % 7 {
            if p.produce(tok(next_in)).is_err() {
                break;
            }
            next_in += 1;
        }
        for _ in 0..(round * 3) % 6 {
            match c.consume() {
                Some(t) => {
                    assert_eq!(untok(t), next_out);
                    next_out += 1;
                }
                None => break,
            }
        }
    }
    while let Some(t) = c.consume() {
        assert_eq!(untok(t), next_out);
        next_out += 1;
    }
    assert_eq!(next_out, next_in);
    assert!(next_in > 20_000 * 5 / 6, "too few items went through: {next_in}");
}

#[test]
fn batch_partial_fill_hands_back_the_rest() {
    let (mut p, mut c) = PtrRing::<Box<u32>>::new(4).unwrap().split();
    let mut items: Vec<Box<u32>> = (0..6).map(Box::new).collect();
    assert_eq!(p.produce_batch(&mut items), 4);
    assert_eq!(items.iter().map(|b| **b).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(p.produce_batch(&mut items), 0);
    assert_eq!(items.len(), 2);

    // `max` and the spare capacity of `out` both bound a consume.
    let mut out = Vec::with_capacity(8);
    assert_eq!(c.consume_batch(&mut out, 1), 1);
    let mut small = Vec::with_capacity(2);
    small.push(Box::new(100));
    assert_eq!(c.consume_batch(&mut small, 8), small.capacity() - 1);
    assert_eq!(small.capacity(), 2, "consume_batch must not grow its output");
    assert_eq!(c.consume_batch(&mut out, 8), 2);
    let seen: Vec<u32> = out.iter().chain(&small[1..]).map(|b| **b).collect();
    assert_eq!(seen.len(), 4);
    assert_eq!(*out[0], 0);
    assert_eq!(*small[1], 1);
    assert_eq!((*out[1], *out[2]), (2, 3));

    assert_eq!(p.produce_batch(&mut items), 2);
    assert!(items.is_empty());
    out.clear();
    assert_eq!(c.consume_batch(&mut out, 8), 2);
    assert_eq!((*out[0], *out[1]), (4, 5));
    // An empty ring and an empty batch are fine.
    assert_eq!(c.consume_batch(&mut out, 8), 0);
    assert_eq!(p.produce_batch(&mut Vec::new()), 0);
}

#[test]
fn drop_frees_leftovers_exactly_once() {
    let drops = Arc::new(AtomicUsize::new(0));
    let item = || Counted(drops.clone());
    {
        // Batch 4: the two consumed slots are taken but not freed when dropped.
        let (mut p, mut c) = PtrRing::<Box<Counted>>::new(8).unwrap().split();
        for _ in 0..6 {
            p.produce(Box::new(item())).ok().unwrap();
        }
        drop(c.consume());
        drop(c.consume());
        assert_eq!(drops.load(Ordering::Relaxed), 2);
        // Consumer first: the producer keeps working on the ring alone.
        drop(c);
        p.produce(Box::new(item())).ok().unwrap();
    }
    assert_eq!(drops.load(Ordering::Relaxed), 7);

    // A refused item is handed back, not dropped.
    drops.store(0, Ordering::Relaxed);
    let (mut p, c) = PtrRing::<Box<Counted>>::new(2).unwrap().split();
    p.produce(Box::new(item())).ok().unwrap();
    p.produce(Box::new(item())).ok().unwrap();
    let back = p.produce(Box::new(item())).err().unwrap();
    assert_eq!(drops.load(Ordering::Relaxed), 0);
    drop((p, c, back));
    assert_eq!(drops.load(Ordering::Relaxed), 3);

    // Shared handles, dropped in any order; and a ring never split holds nothing.
    drops.store(0, Ordering::Relaxed);
    let (sp, sc) = PtrRing::<Box<Counted>>::new(16).unwrap().shared();
    let sp2 = sp.clone();
    let mut batch: Vec<_> = (0..5).map(|_| Box::new(item())).collect();
    assert_eq!(sp2.produce_batch(&mut batch), 5);
    drop(sc.clone().consume());
    drop((sc, sp));
    assert_eq!(drops.load(Ordering::Relaxed), 1);
    drop(sp2);
    assert_eq!(drops.load(Ordering::Relaxed), 5);
    drop(PtrRing::<Box<Counted>>::new(4).unwrap());
}

#[test]
fn handles_are_send_and_shared_handles_sync() {
    fn send<T: Send>() {}
    fn sync<T: Send + Sync + Clone>() {}
    send::<Producer<Box<Vec<u8>>>>();
    send::<Consumer<Box<Vec<u8>>>>();
    sync::<SharedProducer<Box<Vec<u8>>>>();
    sync::<SharedConsumer<Box<Vec<u8>>>>();
    assert_eq!(std::mem::align_of::<Producer<NonZeroUsize>>(), CACHE_LINE);
    assert_eq!(std::mem::align_of::<Consumer<NonZeroUsize>>(), CACHE_LINE);
}

#[derive(Debug, Clone)]
enum Op {
    Produce(usize),
    Consume(usize),
}

proptest! {
    /// Against a `VecDeque`: FIFO order, nothing lost or duplicated, and the room the
    /// producer sees is the free slots less at most `batch - 1` taken ones.
    #[test]
    fn behaves_like_a_bounded_fifo(
        capacity in 2usize..40,
        batch_pick in 0usize..20,
        ops in prop::collection::vec(
            prop_oneof![(0usize..50).prop_map(Op::Produce), (0usize..50).prop_map(Op::Consume)],
            1..60,
        ),
    ) {
        let batch = 1 + batch_pick % (capacity / 2);
        let (mut p, mut c) = PtrRing::<NonZeroUsize>::with_batch(capacity, batch).unwrap().split();
        let mut model = VecDeque::new();
        let mut next = 0;
        let mut items = Vec::with_capacity(64);
        let mut out = Vec::with_capacity(64);
        for op in ops {
            match op {
                Op::Produce(n) => {
                    items.clear();
                    items.extend((next..next + n).map(tok));
                    let before = model.len();
                    let done = p.produce_batch(&mut items);
                    prop_assert_eq!(done + items.len(), n);
                    prop_assert!(before + done <= capacity);
                    if done < n {
                        prop_assert!(before + done + batch > capacity, "refused with room");
                        prop_assert_eq!(untok(items[0]), next + done);
                    }
                    model.extend(next..next + done);
                    next += done;
                }
                Op::Consume(n) => {
                    out.clear();
                    let done = c.consume_batch(&mut out, n);
                    prop_assert_eq!(done, n.min(model.len()));
                    for t in &out {
                        prop_assert_eq!(Some(untok(*t)), model.pop_front());
                    }
                }
            }
        }
    }
}

/// Bounds a stress test's wall time, so a livelock fails instead of hanging.
fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

#[test]
fn spsc_stress_in_order() {
    const N: u64 = 1_000_000;
    let (mut p, mut c) = PtrRing::<Box<u64>>::new(256).unwrap().split();
    let until = deadline();
    let producer = std::thread::spawn(move || {
        let mut items = Vec::with_capacity(32);
        let (mut next, mut spins, mut round) = (0u64, 0, 0u64);
        while next < N || !items.is_empty() {
            if items.is_empty() {
                // Bursts of 1 to 32 in a scrambled order, single items through `produce`.
                round += 1;
                let burst = 1 + (round * 13) % 32;
                if burst == 1 {
                    let mut item = Box::new(next);
                    while let Err(back) = p.produce(item) {
                        item = back;
                        backoff(&mut spins, until, "producer");
                    }
                    next += 1;
                    continue;
                }
                items.extend((next..(next + burst).min(N)).map(Box::new));
                next = (next + burst).min(N);
            }
            if p.produce_batch(&mut items) == 0 {
                backoff(&mut spins, until, "producer");
            }
        }
    });
    let mut out = Vec::with_capacity(32);
    let (mut expect, mut spins, mut sum, mut round) = (0u64, 0u32, 0u64, 0usize);
    while expect < N {
        out.clear();
        round += 1;
        let max = 1 + (round * 7) % 32;
        if c.consume_batch(&mut out, max) == 0 {
            backoff(&mut spins, until, "consumer");
            continue;
        }
        for item in out.drain(..) {
            assert_eq!(*item, expect, "out of order");
            sum += *item;
            expect += 1;
        }
    }
    producer.join().unwrap();
    assert_eq!(sum, N * (N - 1) / 2);
    assert!(c.consume().is_none(), "more items than produced");
}

#[test]
fn mpmc_stress_every_item_once() {
    const PRODUCERS: u64 = 4;
    const CONSUMERS: usize = 4;
    const PER: u64 = 100_000;
    const TOTAL: u64 = PRODUCERS * PER;
    let (sp, sc) = PtrRing::<Box<u64>>::new(64).unwrap().shared();
    let taken = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let until = deadline();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|id| {
            let sp = sp.clone();
            std::thread::spawn(move || {
                let mut items = Vec::with_capacity(16);
                let (mut next, mut spins) = (0, 0);
                while next < PER || !items.is_empty() {
                    if items.is_empty() {
                        let end = (next + 16).min(PER);
                        items.extend((next..end).map(|i| Box::new(id << 32 | i)));
                        next = end;
                    }
                    if sp.produce_batch(&mut items) == 0 {
                        backoff(&mut spins, until, "producer");
                    }
                }
            })
        })
        .collect();
    drop(sp);
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|_| {
            let (sc, taken, stop) = (sc.clone(), taken.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut out = Vec::with_capacity(16);
                let mut seen = Vec::with_capacity(TOTAL as usize);
                let mut last = [None::<u64>; PRODUCERS as usize];
                let mut spins = 0;
                while !stop.load(Ordering::Relaxed) {
                    out.clear();
                    let n = sc.consume_batch(&mut out, 16);
                    if n == 0 {
                        backoff(&mut spins, until, "consumer");
                        continue;
                    }
                    for v in out.drain(..) {
                        // One producer's items reach one consumer in its order.
                        let (id, seq) = ((*v >> 32) as usize, *v & 0xffff_ffff);
                        if let Some(l) = last[id] {
                            assert!(l < seq, "reordered");
                        }
                        last[id] = Some(seq);
                        seen.push(*v);
                    }
                    if taken.fetch_add(n, Ordering::Relaxed) + n == TOTAL as usize {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                seen
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    let mut all: Vec<u64> = consumers.into_iter().flat_map(|c| c.join().unwrap()).collect();
    assert_eq!(all.len() as u64, TOTAL);
    let sum: u64 = all.iter().map(|v| (v >> 32) * PER + (v & 0xffff_ffff)).sum();
    assert_eq!(sum, TOTAL * (TOTAL - 1) / 2);
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len() as u64, TOTAL, "an item was seen twice");
    assert!(sc.consume().is_none());
}
